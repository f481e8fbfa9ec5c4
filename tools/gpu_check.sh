#!/usr/bin/env bash
# The GPU check, in one command on a bare GPU machine (no package index): install the carried
# wheels, check every import, then the bench (llama-1.1b, bf16, ZeRO-3: dense and PMP tokens/s,
# MFU, peak memory) and a reduced study (configs/study/gpu_small.yaml). Its time on one
# H100/H200 is unmeasured; the README derives an estimate from the tiny run's stages.
# OUT_DIR/gpu_check.md, the table, is rewritten after every stage; bench.json, study.md and
# gpu_check.log beside it.
#
#   bash tools/gpu_check.sh OUT_DIR [WHEEL_DIR] [--tiny] [--stage bench|study]
#
# It uses the machine's own python (PYTHON, default python3) and its torch, transformers and
# numpy, untouched: the wheels of WHEEL_DIR (tools/gpu_wheels.sh) are installed with
# `pip install --no-index --no-deps --no-compile --target SITE` and SITE goes first on
# PYTHONPATH (SITE: GPU_CHECK_SITE, default $TMPDIR/pmp_gpu/site-packages). --tiny (or GPU_CHECK_TINY=1)
# runs the same stages at tiny size on a CPU rank (DS_ACCELERATOR=cpu): the simulated-device
# test. --stage runs one of the two. Work files go to GPU_CHECK_WORK (default
# $TMPDIR/pmp_gpu_check); rerunning resumes the study (finished runs are reused).
# (one function, parsed whole before it runs: editing the file mid-run cannot derail it)
main() {
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}
TINY=${GPU_CHECK_TINY:-0}
ONLY=""
POS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --tiny) TINY=1; shift ;;
        --stage) ONLY="${2:-}"; shift 2 ;;
        -*) echo "error: unknown option $1 (use OUT_DIR [WHEEL_DIR] [--tiny] [--stage bench|study])" >&2; exit 2 ;;
        *) POS+=("$1"); shift ;;
    esac
done
if [ ${#POS[@]} -lt 1 ] || [ ${#POS[@]} -gt 2 ]; then
    echo "error: usage: bash tools/gpu_check.sh OUT_DIR [WHEEL_DIR] [--tiny] [--stage bench|study]" >&2
    exit 2
fi
case "$ONLY" in ""|bench|study) ;; *) echo "error: --stage must be bench or study, not '$ONLY'" >&2; exit 2 ;; esac
OUT=$(mkdir -p "${POS[0]}" && cd "${POS[0]}" && pwd)
WHEELS=${POS[1]:-}
TMP=${TMPDIR:-/tmp}
# A folder named site-packages: dill (datasets' hashing) pickles functions of modules outside
# sys.prefix by value unless their path names site-packages, and fails on pyarrow's types.
SITE=${GPU_CHECK_SITE:-$TMP/pmp_gpu/site-packages}
WORK=${GPU_CHECK_WORK:-$TMP/pmp_gpu_check}
LOG=$OUT/gpu_check.log
mkdir -p "$WORK"
: > "$LOG"
stage() { "$PY" "$REPO/bench/gpu_bench_check.py" stage "$OUT" "$@"; }
say() { echo "gpu_check: $*" | tee -a "$LOG"; }
elapsed() { echo "$(( $(date +%s%N) / 1000000 - $1 ))" | awk '{printf "%.1f", $1 / 1000}'; }
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
rm -f "$OUT/stages.json" "$OUT/gpu_check.md" "$OUT/bench.json" "$OUT/study.md"

# 1. install: carried wheels only, into SITE, nothing resolved, nothing of the image touched.
t=$(now_ms)
if [ -n "$WHEELS" ]; then
    if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
        echo "error: no wheels in $WHEELS (build them with: bash tools/gpu_wheels.sh $WHEELS)" >&2
        exit 2
    fi
    tag=$("$PY" -c 'import sys; print("%d%d" % sys.version_info[:2])')
    foreign=$(ls "$WHEELS"/*.whl | grep -E -- '-(cp|py)3[0-9]+-' | grep -v -E -- "-(cp|py)$tag-" \
        | head -n1 || true)
    if [ -n "$foreign" ]; then
        py=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
        echo "error: $(basename "$foreign") is not for this python ($py): build the set for it with bash tools/gpu_wheels.sh DIR --python $py" >&2
        exit 2
    fi
    rm -rf "$SITE"
    if ! "$PY" -m pip install --quiet --disable-pip-version-check --no-index --no-deps \
            --no-compile --target "$SITE" "$WHEELS"/*.whl >>"$LOG" 2>&1; then
        echo "error: installing the wheels of $WHEELS into $SITE failed (see $LOG)" >&2
        exit 2
    fi
    export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
    stage install ok "$(elapsed "$t")" "$(ls "$WHEELS"/*.whl | wc -l) wheels into $SITE"
else
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
    stage install skipped "$(elapsed "$t")" "no WHEEL_DIR: the python's own packages"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1
if [ "$TINY" = 1 ]; then
    export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi

# 2. imports: all of them before anything runs, one line naming what is missing.
t=$(now_ms)
if ! "$PY" "$REPO/bench/gpu_bench_check.py" imports "$OUT" 2> >(tee -a "$LOG" >&2); then
    stage imports failed "$(elapsed "$t")" "see the error line"
    exit 2
fi
stage imports ok "$(elapsed "$t")" "every module the bench and the study import"
status=0

# 3. the bench: dense and PMP blocks alternating on one engine.
if [ -z "$ONLY" ] || [ "$ONLY" = bench ]; then
    if [ "$TINY" = 1 ]; then
        BENCH=(--preset llama-tiny --precision fp32 --micro-batch 2 --seq-len 128 --blocks 1
               --steps 2 --vocab-size 512)
    else
        BENCH=(--preset llama-1.1b --precision bf16 --micro-batch 4 --seq-len 2048 --blocks 3
               --steps 5)
    fi
    port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    t=$(now_ms)
    say "bench: ${BENCH[*]}"
    # One rank needs no launcher: the variables it would set, and two interpreter starts saved.
    if RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 LOCAL_WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 \
            MASTER_PORT=$port "$PY" "$REPO/bench/gpu_bench.py" "${BENCH[@]}" \
            --work "$WORK/bench" --out "$OUT/bench.json" >>"$LOG" 2>&1 \
            && [ -s "$OUT/bench.json" ]; then
        note=$("$PY" -c 'import json,sys; b=json.load(open(sys.argv[1]))
print("data %.0f s, engine %.0f s, %d timed steps %.0f s; PMP/dense %.3f"
      % (b["prepare_data_s"], b["build_engine_s"], b["steps_timed"], b["steps_s"], b["pmp_dense_ratio"]))' "$OUT/bench.json")
        stage bench ok "$(elapsed "$t")" "$note"
    else
        why=$(grep -E '^(error|[A-Za-z]*Error)' "$LOG" | tail -n1)
        stage bench failed "$(elapsed "$t")" "${why:-see gpu_check.log}"
        status=1
    fi
fi

# 4. the reduced study: data, dense + PMP pre-training, releases, grid, attacks, claims.
if [ -z "$ONLY" ] || [ "$ONLY" = study ]; then
    SETS=(--set "out_dir=$WORK/study" --set "data.path=$WORK/study/mds")
    if [ "$TINY" = 1 ]; then
        SETS+=(--set "data.seq_len=64" --set "data.corpus=data/corpus/persuasion.txt.gz"
            --set "presets=[gpt2-tiny]" --set "pretrain.nproc=1"
            --set "secrecy.attacks=[bits, magnitude]" --set "curvature.samples=1" --set "curvature.iters=2"
            --set "pretrain.overrides=[seed=3, train.micro_batch_size=2, train.global_batch_size=4, train.max_steps=3, train.log_every=1, train.eval_every=3, train.eval_batches=1, optim.warmup_steps=1, checkpoint.every=3, train.precision=auto, logging.tensorboard=false]"
            --set "variants=[{mask_ratio: [0.5], mask_source: [random]}]"
            --set "pmp={mask_seed: 3}"
            --set "finetune.overrides=[task.max_length=32, task.max_train_examples=16, task.max_eval_examples=4, train.micro_batch_size=4, train.global_batch_size=4, train.eval_batch_size=4, optim.warmup_steps=0]"
            --set "finetune.lrs=[1.0e-3]" --set "finetune.steps=[1]" --set "finetune.seeds=[0, 1]"
            --set "finetune.min_seeds=2" --set "finetune.scratch=false")
    fi
    t=$(now_ms)
    start=$("$PY" -c 'import time; print(time.time())')
    say "study: configs/study/gpu_small.yaml$([ "$TINY" = 1 ] && echo " at tiny size")"
    "$PY" "$REPO/tools/study.py" --config "$REPO/configs/study/gpu_small.yaml" "${SETS[@]}" \
        --quiet > >(tee "$WORK/study.out") 2> >(tee "$WORK/study.log" >&2)
    code=$?
    sleep 0.2  # the tee processes flush
    cat "$WORK/study.out" "$WORK/study.log" >>"$LOG"
    [ -f "$WORK/study/study.md" ] && cp "$WORK/study/study.md" "$OUT/study.md"
    "$PY" "$REPO/bench/gpu_bench_check.py" study-stages "$OUT" "$WORK/study.log" "$start"
    if [ "$code" = 0 ]; then
        stage study ok "$(elapsed "$t")" "claims in study.md (runs, releases, grid, attacks: $WORK/study)"
    else
        why=$(grep -E '^error' "$WORK/study.log" | tail -n1)
        stage study failed "$(elapsed "$t")" "${why:-exit $code, see gpu_check.log}"
        status=1
    fi
fi
say "table: $OUT/gpu_check.md"
cat "$OUT/gpu_check.md"
exit $status
}
main "$@"
