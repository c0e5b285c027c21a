#!/usr/bin/env bash
# A cron trial on the shared arXiv file: `embedbatch serve` injects commit-then-5xx on uploads and
# creates, 429s, a cut download and an expired batch; one `embedbatch run` goes while a cron-like
# loop of `poll --ingest` passes runs on the same workspace. Prints what was embedded, what
# failed and why, and what the provider holds (duplicates must be 0). Usage:
#   bash scripts/cron_trial.sh [ROWS_PER_BATCH]
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
DATA=${DATA:-../shared/data/arxiv_cs_daily_2025.jsonl.gz}
[ -f "$DATA" ] || { echo "no $DATA (the shared data is absent)"; exit 0; }
TMP=$(mktemp -d)
export EMBEDBATCH_WORKSPACE=$TMP/ws OPENAI_API_KEY=trial-key EMBEDBATCH_RETRY_INITIAL_S=0.05 EMBEDBATCH_REQUEUE_S=1
PORT=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export OPENAI_BASE_URL="http://127.0.0.1:$PORT/v1"
embedbatch serve --port "$PORT" --api-key "$OPENAI_API_KEY" --step-s 0.5 --data-dir "$TMP/server" \
  --faults "fail_after_commit=/files|/batches|/batches,rate_429=0.03,cut_downloads=1,expire_batches=1" \
  >"$TMP/serve.log" 2>&1 &
SERVE=$!
trap 'kill $SERVE $CRON 2>/dev/null || true; rm -rf "$TMP"' EXIT
for _ in $(seq 100); do curl -s -o /dev/null "$OPENAI_BASE_URL/models" && break || sleep 0.1; done
( while true; do embedbatch --log-format json poll --ingest >>"$TMP/cron.log" 2>&1 || echo "cron pass rc=$?" >>"$TMP/cron.log"; sleep 1; done ) &
CRON=$!
start=$(date +%s)
embedbatch run "$DATA" --fields title,summary --max-requests-per-batch "${1:-5000}" --poll-seconds 1 --json \
  >"$TMP/run.json" 2>"$TMP/run.log"
echo "run exit 0 after $(( $(date +%s) - start )) s"
kill $CRON; wait $CRON 2>/dev/null || true
python - "$TMP" <<'PY'
import csv, json, sys, urllib.request
from pathlib import Path
tmp = Path(sys.argv[1])
summary = json.loads((tmp / "run.json").read_text())
run = Path(summary["run_dir"])
failed = list(csv.DictReader(open(run / "failed_ids.tsv", encoding="utf-8"), delimiter="\t"))
req = urllib.request.Request(
    f"{__import__('os').environ['OPENAI_BASE_URL'][:-3]}/_admin/counts",
    headers={"Authorization": "Bearer trial-key"},
)
counts = json.loads(urllib.request.urlopen(req).read())
cron = (tmp / "cron.log").read_text().splitlines()
print(json.dumps({"embedded": summary["embedded"], "failed": len(failed), "retried": summary["retries"],
                  "reasons": sorted({r["reason"].split(":")[0] for r in failed}),
                  "server": counts, "cron_passes": sum('"poll pass"' in line for line in cron),
                  "cron_failures": sum("rc=" in line for line in cron)}, indent=1))
PY
embedbatch verify
