#!/usr/bin/env bash
# The test suite, from a fresh clone: virtualenv with the pinned packages, then pytest.
# Multi-rank tests launch real DeepSpeed ZeRO-3 ranks on CPU (gloo).
# Default: every test but the extended tier (the long crash, multi-node and end-to-end
# scenarios, `-m extended`); --all: those too. Further arguments go to pytest.
# Every test has a time limit (pytest-timeout): a hang fails with every thread's stack.
set -euo pipefail
cd "$(dirname "$0")/.."
select="not slow and not extended"
if [ "${1:-}" = "--all" ]; then
    select="not slow"
    shift
fi
bash tools/setup_env.sh
export DS_ACCELERATOR=cpu
exec "${PMP_VENV:-.venv}/bin/python" -m pytest -m "$select" -q "$@"
