#!/usr/bin/env bash
# The test suite, from a fresh clone: virtualenv with the pinned packages, then pytest.
# Multi-rank tests launch real DeepSpeed ZeRO-3 ranks on CPU (gloo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
export DS_ACCELERATOR=cpu
exec "${PMP_VENV:-.venv}/bin/python" -m pytest -m "not slow" -q "$@"
