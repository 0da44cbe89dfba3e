#!/usr/bin/env bash
# Issue 22's GPU work, as one prepared command for a lent GPU machine (the device tool):
#   1. install the carried weights and images (benchmarks/device_pack.py pack .gpu, here first);
#   2. the GPU speed rows of profile_snell_step.py (lora / snella / snella-compiled, 112 px);
#   3. quality_pool.py's plan (the 112 px point, the 30-epoch point, the component ladder),
#      runs in parallel until the deadline.
# Everything it keeps lands in $OUT (at most 8 files): env.txt, profile_112.{json,md}, pool.log
# and the groups' quality_<tag>.json; `bench_quality.py --report-only --tag <tag>` here then
# writes their .md / .png.
# Usage (device tool, carry [".gpu"]): [PROFILE=0] bash benchmarks/gpu_i22.sh [PLAN] [DEADLINE_S] [WORKERS]
# A dry run on this CPU machine: OUT=/tmp/out DEVICE=cpu bash benchmarks/gpu_i22.sh smoke 120 2
set -u
PLAN=${1:-i22-gpu}
DEADLINE=${2:-400}
WORKERS=${3:-10}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:/tmp/site" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export TRIMTUNE_CACHE=${TRIMTUNE_CACHE:-/tmp/trimtune_cache}
t0=$(date +%s)
if ! $PY -c "import mlxtend" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/*.whl
fi
$PY benchmarks/device_pack.py unpack .gpu ${DATASET_DIR:+--dataset-dir "$DATASET_DIR"} \
    > "$OUT/env.txt" 2>&1 || { cat "$OUT/env.txt"; exit 2; }
{ nvidia-smi 2>&1 | head -15; $PY -c "import torch, timm, peft, accelerate, sklearn;
print('torch', torch.__version__, 'timm', timm.__version__, 'peft', peft.__version__,
      'accelerate', accelerate.__version__, 'sklearn', sklearn.__version__)"; nproc; free -g; } \
    >> "$OUT/env.txt" 2>&1
echo "setup $(( $(date +%s) - t0 )) s"; cat "$OUT/env.txt"
if [ "$DEVICE" = cuda ] && [ "${PROFILE:-1}" = 1 ]; then  # PROFILE=0: skip (already measured)
    timeout 100 $PY benchmarks/profile_snell_step.py --device cuda --img-size 112 --batch 32 \
        --reps 10 --threads 4 --variants lora,snella,snella-compiled \
        --json "$OUT/profile_112.json" > "$OUT/profile_112.md" 2>&1
    echo "profile rc $? at $(( $(date +%s) - t0 )) s"; tail -8 "$OUT/profile_112.md"
fi
left=$(( DEADLINE - ( $(date +%s) - t0 ) ))
$PY benchmarks/quality_pool.py --plan "$PLAN" --workers "$WORKERS" --device "$DEVICE" \
    --speculate --deadline-s "$left" --results-dir "$OUT" --scratch /tmp/pool 2>&1 \
    | tee "$OUT/pool.log" | grep -E "done|FAILED|deadline|complete|Error|error" | tail -60
echo "total $(( $(date +%s) - t0 )) s"
