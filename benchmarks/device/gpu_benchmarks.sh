#!/usr/bin/env bash
# One prepared GPU run of the issue-6 measurements, for the device tool (see docs/performance.md):
#
#   bash benchmarks/device/fetch_wheels.sh            # here, once
#   device run, carry [".wheels"], timeout_s 570:
#     bash benchmarks/device/gpu_benchmarks.sh
#
# Each benchmark has its own time limit so that one slow part cannot eat the others; outputs (markdown
# and JSON) go to $OUT. The order is by value: unmerged inference before/after (the 1.10x miss), then
# the SD3-medium training step before/after (1.09x/1.22x), then the SDXL 1024 px bf16 table (never run).
# DEVICE=cpu QUICK=1 runs the same script on a CPU at small sizes (a dry run of the script itself).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/gpu-out}"
mkdir -p "$OUT"
DEVICE="${DEVICE:-cuda}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -d .wheels ]; then
  python3 -m pip install --quiet --no-deps --no-index .wheels/*.whl 2>&1 | tail -3
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || true
  python3 -c "import torch, diffusers, peft; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__)"
} | tee "$OUT/machine.txt"

if [ "${QUICK:-0}" = 1 ]; then
  G="--device $DEVICE --dtype fp32"
  INF="--ranks 4 --rounds 1 --resolution 128 --depth 1"
  SD3="--ranks 4 --rounds 1 --no-rss"
  SDXL="--ranks 4 --rounds 1 --no-rss"
  T1=300 T2=300 T3=300
else
  G="--device $DEVICE --dtype bf16"
  INF="--ranks 4 16 --rounds 20"
  SD3="--depth 24 --resolution 1024 --batch 1 --ranks 4 16 --rounds 10"
  SDXL="--depth 2 --transformer-depth 10 --resolution 1024 --batch 1 --ranks 4 16 64 --rounds 6"
  T1=120 T2=180 T3=220
fi
M="peft_lora moslora moslora_v1"
run() {  # name, seconds, command...
  local name=$1 seconds=$2; shift 2
  echo "== $name (limit ${seconds}s)"
  timeout "$seconds" "$@" --json "$OUT/$name.json" > "$OUT/$name.md" 2> "$OUT/$name.err"
  echo "exit $? after ${SECONDS}s"; cat "$OUT/$name.md"
}
run inference "$T1" python3 benchmarks/bench_inference.py $G $INF
run train_sd3 "$T2" python3 benchmarks/bench_train_step.py $G --model sd3 $SD3 --methods $M
run train_sdxl "$T3" python3 benchmarks/bench_train_step.py $G --model sdxl $SDXL --methods $M lycoris_locon
