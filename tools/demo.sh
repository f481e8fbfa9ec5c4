#!/usr/bin/env bash
# The demo, from a fresh clone: virtualenv, tokenizer + MDS shards from the embedded corpus,
# then a dense and a PMP pre-training run of the same ~5M-parameter Llama with DeepSpeed ZeRO-3
# (2 CPU ranks when there is no GPU), a comparison of the two, their mask-free releases, the
# non-fine-tunability report (authorized vs unauthorized fine-tuning) and the mask-recovery
# attacks on the PMP release.
# Default: every stage at a smaller size (fewer pre-training and fine-tuning steps, a smaller
# report grid, a shorter shadow run), into runs/quick/. --full: the full-size demo, into runs/.
# --verbose: also show third-party notices (the DeepSpeed launcher's INFO lines, the ranks'
# DeepSpeed/torch notices); by default every line is pmp_scale's own, or an error.
set -euo pipefail
cd "$(dirname "$0")/.."
LAUNCHER_LOG=(--log_level error)  # the deepspeed launcher still reports failures
RANK_FLAGS=()
FULL=0
for arg in "$@"; do
    case "$arg" in
        --verbose) LAUNCHER_LOG=(--log_level info); RANK_FLAGS=(--verbose) ;;
        --full) FULL=1 ;;
        *) echo "usage: bash tools/demo.sh [--full] [--verbose]" >&2; exit 2 ;;
    esac
done
bash tools/setup_env.sh
PY=.venv/bin/python
export PATH="$PWD/.venv/bin:$PATH"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    NPROC=$(nvidia-smi -L | wc -l)
else
    export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
    NPROC=2
fi

if [ ! -f data/demo/mds/meta.json ]; then
    $PY tools/train_tokenizer.py --input 'data/corpus/*.txt.gz' --vocab-size 4096 \
        --out data/demo/spm4k
    $PY tools/prepare_data.py --input 'data/corpus/*.txt.gz' --tokenizer data/demo/spm4k.model \
        --out data/demo/mds --seq-len 256 --val-fraction 0.05
fi

# The default's sizes: 60 dense steps; PMP discovery of at most 20 steps, then 60 masked steps.
export DEMO_SIZE=quick DEMO_RUNS=runs/quick
SIZE=(--set train.max_steps=60 --set train.eval_every=20 --set checkpoint.every=30)
PMP_SIZE=(--set pmp.warmup_max_steps=20 --set pmp.check_every=5 --set pmp.patience=3)
if [ "$FULL" = 1 ]; then
    export DEMO_SIZE=full DEMO_RUNS=runs
    SIZE=() PMP_SIZE=()
fi
deepspeed "${LAUNCHER_LOG[@]}" --num_gpus "$NPROC" launchers/pretrain.py \
    --config configs/demo.yaml --set "run_dir=$DEMO_RUNS/demo" ${SIZE[@]+"${SIZE[@]}"} \
    --resume auto ${RANK_FLAGS[@]+"${RANK_FLAGS[@]}"}
deepspeed "${LAUNCHER_LOG[@]}" --num_gpus "$NPROC" launchers/pretrain.py \
    --config configs/demo_pmp.yaml --set "run_dir=$DEMO_RUNS/demo_pmp" ${SIZE[@]+"${SIZE[@]}"} \
    ${PMP_SIZE[@]+"${PMP_SIZE[@]}"} --resume auto ${RANK_FLAGS[@]+"${RANK_FLAGS[@]}"}
$PY tools/compare_runs.py "$DEMO_RUNS/demo" "$DEMO_RUNS/demo_pmp"
bash tools/demo_report.sh ${RANK_FLAGS[@]+"${RANK_FLAGS[@]}"}
