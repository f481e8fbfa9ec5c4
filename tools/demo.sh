#!/usr/bin/env bash
# The demo, from a fresh clone: virtualenv, tokenizer + MDS shards from the embedded corpus,
# then a dense and a PMP pre-training run of the same ~5M-parameter Llama with DeepSpeed ZeRO-3
# (2 CPU ranks when there is no GPU), a comparison of the two, their mask-free releases and the
# non-fine-tunability report (authorized vs unauthorized fine-tuning, runs/nft_report/).
# --verbose: also show third-party notices (the DeepSpeed launcher's INFO lines, the ranks'
# DeepSpeed/torch notices); by default every line is pmp_scale's own, or an error.
set -euo pipefail
cd "$(dirname "$0")/.."
LAUNCHER_LOG=(--log_level error)  # the deepspeed launcher still reports failures
RANK_FLAGS=()
if [ "${1:-}" = "--verbose" ]; then
    LAUNCHER_LOG=(--log_level info)
    RANK_FLAGS=(--verbose)
fi
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

for run in demo demo_pmp; do
    deepspeed "${LAUNCHER_LOG[@]}" --num_gpus "$NPROC" launchers/pretrain.py \
        --config "configs/$run.yaml" --resume auto ${RANK_FLAGS[@]+"${RANK_FLAGS[@]}"}
done
$PY tools/compare_runs.py runs/demo runs/demo_pmp
bash tools/demo_report.sh ${RANK_FLAGS[@]+"${RANK_FLAGS[@]}"}
