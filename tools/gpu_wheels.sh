#!/usr/bin/env bash
# The wheel set a GPU machine without a package index needs (tools/gpu_check.sh installs it).
# Run it where pip reaches an index. The GPU image brings python, torch, transformers 5,
# numpy 2 and the usual scientific stack; this set adds what it lacks, nothing that would
# shadow those: DeepSpeed (built here from its sdist, which is all PyPI has; DS_BUILD_OPS=0,
# so its ops are JIT-built on the GPU when used), mosaicml-streaming WITHOUT its dependencies
# (they are cloud SDKs, transformers<5 and numpy<2.2), pydantic, datasets and the
# compression codecs streaming reads shards with.
#
#   bash tools/gpu_wheels.sh [DIR] [--python 3.12]     # default DIR .whl/device-py3.12
#
# --python picks the target CPython (3.12 for the GPU image; 3.11 for this repository's
# simulated device, tests/test_device_sim.py). Versions come from constraints.txt.
# GPU_WHEELS_EXTRA="pkg ..." adds packages (for an image that lacks more). Prints the size;
# the set must stay small enough to travel with the code (<= 40 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=3.12
DIR=""
while [ $# -gt 0 ]; do
    case "$1" in
        --python) PYV="$2"; shift 2 ;;
        -*) echo "error: unknown option $1 (use [DIR] [--python 3.12])" >&2; exit 2 ;;
        *) DIR="$1"; shift ;;
    esac
done
DIR=${DIR:-.whl/device-py$PYV}
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
mkdir -p "$DIR"

# Binary wheels for the target interpreter, each at the version constraints.txt pins.
PACKAGES=(mosaicml-streaming pydantic pydantic_core annotated-types typing-inspection
    datasets dill multiprocess xxhash hjson py-cpuinfo msgpack einops brotli python-snappy
    cramjam zstd catalogue sentencepiece ${GPU_WHEELS_EXTRA:-})
pinned=()
for name in "${PACKAGES[@]}"; do
    line=$(grep -i -E "^${name//[-_]/[-_]}==" constraints.txt || true)
    if [ -z "$line" ]; then
        echo "error: $name is not pinned in constraints.txt; pin it there first" >&2
        exit 2
    fi
    pinned+=("$line")
done
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$PYV" --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
    -d "$DIR" "${pinned[@]}"

# DeepSpeed: a pure-python wheel from the sdist (no ops compiled, no build isolation: its
# setup.py reads the local torch for version info only).
ds=$(grep -i "^deepspeed==" constraints.txt)
if ! compgen -G "$DIR/deepspeed-${ds#*==}-*.whl" >/dev/null; then
    build=$(mktemp -d)
    trap 'rm -rf "$build"' EXIT
    "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --no-binary=:all: \
        -d "$build/sdist" "$ds"
    DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --disable-pip-version-check --no-deps \
        --no-build-isolation -w "$DIR" "$build"/sdist/*
fi

bytes=$(du -cb "$DIR"/*.whl | tail -n1 | cut -f1)
echo "$DIR: $(ls "$DIR"/*.whl | wc -l) wheels, $((bytes / 1000000)).$(((bytes % 1000000) / 100000)) MB (python $PYV)"
if [ "$bytes" -gt 40000000 ]; then
    echo "error: the wheel set is over 40 MB; it may not travel with the code" >&2
    exit 1
fi
