#!/usr/bin/env bash
# GPU benchmark (llama-1.1b, bf16, ZeRO-3, SDPA, activation checkpointing, one GPU): dense vs
# PMP tokens/s, MFU, peak memory. For a machine without internet: put the wheels of the
# pinned dependency set in .whl/ beforehand, e.g.
#     pip download -d .whl -c constraints.txt torch torchvision -e .
# and this script installs from there only (--no-index) into $PMP_BENCH_VENV.
#
#   bash bench/gpu_bench.sh [gpu_bench.py options, e.g. --steps 10 --out bench.json]
#
# Environment: PMP_BENCH_VENV (default .venv-bench; an existing virtualenv is used as is when
# there is no .whl/), PMP_WHEELS (default .whl), PMP_BENCH_GPUS (default 1).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${PMP_BENCH_VENV:-.venv-bench}
WHEELS=${PMP_WHEELS:-.whl}
if [ -d "$WHEELS" ] && compgen -G "$WHEELS/*.whl" >/dev/null; then
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check --no-index --find-links "$WHEELS" \
        "$WHEELS"/*.whl
elif [ ! -x "$VENV/bin/python" ]; then
    echo "error: no wheels in $WHEELS/ and no virtualenv at $VENV" >&2
    exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$VENV/bin/python" -m deepspeed.launcher.runner --num_gpus "${PMP_BENCH_GPUS:-1}" \
    --master_port "${PMP_BENCH_PORT:-29561}" bench/gpu_bench.py "$@"
