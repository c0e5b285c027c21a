#!/usr/bin/env bash
# The test command: installs what the tests need into .venv (a no-op when present), then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
# torch first: 2.13.0 is a local CPU wheel here; any other version downloads gigabytes.
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[local,dev]'
HF_HUB_OFFLINE=1 python -m pytest -q "$@"
