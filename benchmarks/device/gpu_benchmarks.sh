#!/usr/bin/env bash
# Prepared GPU runs, for the device tool (see docs/performance.md). None of these parts has run on a GPU yet.
#
#   bash benchmarks/device/fetch_wheels.sh            # here, once
#   device run, carry [".wheels"], timeout_s 570:
#     bash benchmarks/device/gpu_benchmarks.sh                                       # issue 15 (the default)
#     PARTS="inference train_sd3 train_sdxl" bash benchmarks/device/gpu_benchmarks.sh  # issue 6
#
# Each part has its own time limit so that one slow part cannot eat the others; the parts of one PARTS
# set fit one 570 s call. Outputs (markdown and JSON) go to $OUT. Order by value within each set:
#   issue 15: flux_bf16    does tiny Flux trained in bf16 end finite (an earlier report: non-finite adapters)?
#             memory_flux  the real peak memory of a Flux-shaped step, bf16 vs bitsandbytes nf4 vs GGUF Q4_0
#             memory_rows  the rows the CPU table lacks: fp32, bitsandbytes int8 and nf4, SDXL- and Flux-shaped
#   issue 6:  inference    unmerged inference before/after (the 1.10x miss)
#             train_sd3    the SD3-medium training step before/after (1.09x/1.22x)
#             train_sdxl   the SDXL 1024 px bf16 table
# DEVICE=cpu QUICK=1 runs the same script on a CPU at small sizes (a dry run of the script itself; the
# bitsandbytes bases need CUDA and are left out there).
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

PARTS="${PARTS:-flux_bf16 memory_flux memory_rows}"
if [ "${QUICK:-0}" = 1 ]; then
  G="--device $DEVICE --dtype fp32"
  INF="--ranks 4 --rounds 1 --resolution 128 --depth 1"
  SD3="--ranks 4 --rounds 1 --no-rss"
  SDXL="--ranks 4 --rounds 1 --no-rss"
  FLUX_STEPS=4
  MEM="--device $DEVICE --resolution 64 --steps 1"
  MEM_FLUX="bf16 q4_0-gguf q4_0-gguf_stock" MEM_ROWS_FLUX="fp32" MEM_ROWS_SDXL="fp32"
  T1=300 T2=300 T3=300 T4=600 T5=900 T6=900
else
  G="--device $DEVICE --dtype bf16"
  INF="--ranks 4 16 --rounds 20"
  SD3="--depth 24 --resolution 1024 --batch 1 --ranks 4 16 --rounds 10"
  SDXL="--depth 2 --transformer-depth 10 --resolution 1024 --batch 1 --ranks 4 16 64 --rounds 6"
  FLUX_STEPS=200
  # measured at 512 px and (the smaller depth) 1024 px, projected to full depth at 1024 px
  MEM="--device $DEVICE --resolution 512 --steps 3"
  MEM_FLUX="bf16 nf4-bnb q4_0-gguf q4_0-gguf_stock" MEM_ROWS_FLUX="fp32 int8-bnb" MEM_ROWS_SDXL="fp32 bf16 int8-bnb nf4-bnb"
  T1=120 T2=180 T3=220 T4=120 T5=240 T6=200
fi
M="peft_lora moslora moslora_v1"
run() {  # name, seconds, command... (the command takes --json FILE)
  local name=$1 seconds=$2; shift 2
  echo "== $name (limit ${seconds}s)"
  timeout "$seconds" "$@" --json "$OUT/$name.json" > "$OUT/$name.md" 2> "$OUT/$name.err"
  echo "exit $? after ${SECONDS}s"; cat "$OUT/$name.md"
}
run_logged() {  # name, seconds, command... (the command writes its own $OUT/<name>.md and .json)
  local name=$1 seconds=$2; shift 2
  echo "== $name (limit ${seconds}s)"
  timeout "$seconds" "$@" > "$OUT/$name.log" 2> "$OUT/$name.err"
  echo "exit $? after ${SECONDS}s"; cat "$OUT/$name.log"
}
# bench_memory.py: one subprocess per (model, base, depth, px); --cache keeps the finished ones, so a part
# cut off by its limit still leaves its measured rows in $OUT/memory_runs.json.
MEMORY="python3 benchmarks/bench_memory.py $MEM --cache $OUT/memory_runs.json"
for part in $PARTS; do
  case $part in
    inference) run inference "$T1" python3 benchmarks/bench_inference.py $G $INF ;;
    train_sd3) run train_sd3 "$T2" python3 benchmarks/bench_train_step.py $G --model sd3 $SD3 --methods $M ;;
    train_sdxl) run train_sdxl "$T3" python3 benchmarks/bench_train_step.py $G --model sdxl $SDXL --methods $M lycoris_locon ;;
    flux_bf16) run_logged flux_bf16 "$T4" python3 benchmarks/device/check_flux_bf16.py --steps "$FLUX_STEPS" --out "$OUT/flux_bf16" ;;
    memory_flux) run_logged memory_flux "$T5" $MEMORY --models flux --bases $MEM_FLUX --out "$OUT/memory_flux" ;;
    memory_rows)
      run_logged memory_rows_flux "$((T6 / 3))" $MEMORY --models flux --bases $MEM_ROWS_FLUX --out "$OUT/memory_rows_flux"
      run_logged memory_rows_sdxl "$((T6 - T6 / 3))" $MEMORY --models sdxl --bases $MEM_ROWS_SDXL --out "$OUT/memory_rows_sdxl" ;;
    *) echo "unknown part '$part' (parts: flux_bf16 memory_flux memory_rows inference train_sd3 train_sdxl)" ;;
  esac
done
