#!/usr/bin/env bash
# The study on one GPU (configs/study/gpu_small.yaml, about 8 minutes on one H200 with the
# installation): installs what the machine lacks from wheels carried in .whl/ (no network
# needed), prepares the data, runs tools/study.py and prints the claims table.
#
#   bash tools/gpu_study.sh                  # the embedded corpus (data/corpus/)
#   bash tools/gpu_study.sh corpus-large/    # a directory of .jsonl / .txt(.gz) documents
#   bash tools/gpu_study.sh --tiny           # CPU-sized smoke run of the same path (tests)
#
# Rerunning it resumes: finished runs, releases and fine-tuning cells are reused.
# .whl/ is filled on a machine with network, for the GPU machine's Python version:
#   pip download -d .whl deepspeed mosaicml-streaming sentencepiece peft scikit-learn matplotlib
# (DeepSpeed ships as an sdist: it is built against the installed torch, no build isolation).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TINY=${STUDY_TINY:-0}
CORPUS=""
for arg in "$@"; do
    case "$arg" in
        --tiny) TINY=1 ;;
        -*) echo "error: unknown option $arg (use --tiny or a corpus directory)" >&2; exit 2 ;;
        *) CORPUS="$arg" ;;
    esac
done

# 1. Python packages the GPU image lacks (it has torch and transformers), from .whl/.
declare -A PACKAGE=([deepspeed]=deepspeed [streaming]=mosaicml-streaming
    [sentencepiece]=sentencepiece [pydantic]=pydantic [peft]=peft [sklearn]=scikit-learn
    [matplotlib]=matplotlib [safetensors]=safetensors [yaml]=pyyaml [tqdm]=tqdm)
missing=()
for module in "${!PACKAGE[@]}"; do
    $PY -c "import $module" 2>/dev/null || missing+=("${PACKAGE[$module]}")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ ! -d .whl ]; then
        echo "error: missing Python packages (${missing[*]}) and no .whl/ directory to install them from" >&2
        exit 2
    fi
    $PY -m pip install --quiet --no-index --find-links .whl --no-build-isolation "${missing[@]}"
fi

# 2. The study: GPU-sized, or everything shrunk for a CPU smoke run.
if ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }; then
    export DS_ACCELERATOR=cpu
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
SETS=()
if [ -n "$CORPUS" ]; then
    if [ ! -d "$CORPUS" ]; then echo "error: corpus directory $CORPUS does not exist" >&2; exit 2; fi
    name=$(basename "$CORPUS")
    pattern="$CORPUS/*.jsonl"
    compgen -G "$pattern" >/dev/null || pattern="$CORPUS/*"
    SETS+=(--set "data.corpus=$pattern" --set "data.path=runs/gpu_study/mds_$name")
fi
if [ "$TINY" = 1 ]; then
    OUT=${STUDY_OUT:-runs/gpu_study_tiny}
    SETS+=(--set "out_dir=$OUT" --set "data.path=$OUT/mds" --set "data.seq_len=64"
        --set "data.corpus=data/corpus/persuasion.txt.gz" --set "presets=[gpt2-tiny]"
        --set "pretrain.overrides=[seed=3, train.micro_batch_size=2, train.global_batch_size=4, train.max_steps=3, train.log_every=1, train.eval_every=3, train.eval_batches=1, optim.warmup_steps=1, checkpoint.every=3, train.precision=auto, logging.tensorboard=false]"
        --set "variants=[{mask_ratio: [0.5], mask_source: [random]}]"
        --set "pmp={mask_seed: 3}"
        --set "finetune.overrides=[task.max_length=32, task.max_train_examples=16, task.max_eval_examples=4, train.micro_batch_size=4, train.global_batch_size=4, train.eval_batch_size=4, optim.warmup_steps=0]"
        --set "finetune.lrs=[1.0e-3]" --set "finetune.steps=[1]" --set "finetune.seeds=[0, 1]"
        --set "finetune.min_seeds=2" --set "finetune.scratch=false")
fi
exec $PY tools/study.py --config configs/study/gpu_small.yaml "${SETS[@]}" --quiet
