#!/usr/bin/env bash
# The demo's second half, after tools/demo.sh pre-trained runs/demo (dense) and runs/demo_pmp
# (PMP): release both as standard Hugging Face models (the PMP mask artifact is bound to its
# release by sha256), then the non-fine-tunability report: causal-LM fine-tuning of each
# release (dense: unauthorized; PMP: unauthorized and authorized) over learning rates x
# durations x 3 seeds, in one process on a W=1 DeepSpeed ZeRO-3 engine; then the mask-recovery
# attacks on the PMP release.
# Outputs: runs/release/{demo,demo_pmp}, runs/nft_report/{report.md,results.json,*.png},
# runs/attack/demo_pmp/{attack.md,attack.json,roc.png,masks/}.
# DEMO_SIZE=quick (set by tools/demo.sh without --full): the same under runs/quick/, with the
# smaller report grid (configs/finetune/demo_report_quick.yaml) and a shorter shadow run.
# Extra arguments go to tools/nft_report.py (e.g. --fresh, --set lrs=[1e-3]).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
if ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }; then
    export DS_ACCELERATOR=cpu
fi
# One process: let it use every core (tools/demo.sh sets 1 thread per rank for pre-training).
export OMP_NUM_THREADS="$(nproc)"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

R=runs REPORT=configs/finetune/demo_report.yaml SHADOW=()
if [ "${DEMO_SIZE:-full}" = quick ]; then
    R=runs/quick REPORT=configs/finetune/demo_report_quick.yaml
    SHADOW=(--shadow-set train.max_steps=20 --shadow-set pmp.warmup_max_steps=20
            --shadow-set pmp.check_every=5)
fi
for run in demo demo_pmp; do
    if [ ! -f "$R/$run/checkpoints/latest" ]; then
        echo "error: $R/$run has no checkpoint; run tools/demo.sh first" >&2
        exit 2
    fi
done
if [ ! -f "$R/demo_pmp/private/mask/mask.json" ]; then
    echo "error: $R/demo_pmp/private/mask/mask.json missing: the PMP run has not finished" >&2
    exit 2
fi

VERBOSE=()  # --verbose (among the report's arguments) also reaches the attack step
for arg in "$@"; do [ "$arg" = --verbose ] && VERBOSE=(--verbose); done
$PY tools/release.py "$R/demo" "$R/release/demo" --overwrite
$PY tools/release.py "$R/demo_pmp" "$R/release/demo_pmp" --overwrite \
    --private "$R/demo_pmp/private/mask"
$PY tools/nft_report.py --config "$REPORT" "$@"
# Mask secrecy: every attack on the PMP release (public text = the demo corpus, a shadow run of
# our own recipe), scored against the true mask; payoff = fine-tuning with the best recovered mask.
$PY tools/attack_mask.py "$R/release/demo_pmp" --out "$R/attack/demo_pmp" \
    --private "$R/demo_pmp/private/mask" --public data/demo/mds \
    --shadow-config configs/attack/demo_shadow.yaml --shadow-dir "$R/attack/shadow" \
    ${SHADOW[@]+"${SHADOW[@]}"} --payoff configs/finetune/review_lm.yaml \
    ${VERBOSE[@]+"${VERBOSE[@]}"}
