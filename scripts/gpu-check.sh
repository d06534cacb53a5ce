#!/usr/bin/env bash
# The device check, for a machine with an NVIDIA GPU (driver for CUDA 13), cargo and python3:
#   1. builds the CUDA `peft` binary and the CLI tests (`--features cuda`; nvcc from PyPI via
#      scripts/build-cuda.sh when the machine has none; CUDA_COMPUTE_CAP from nvidia-smi);
#   2. `peft devices --device cuda:0`;
#   3. the CLI parity tests (`peft logits` against the Python peft fixtures to 1e-4 in f32;
#      merging; QLoRA training, eval, generation and merging on an NF4/int8 base) with
#      PEFT_DEVICE=cuda:0, so every model the tests run loads onto the GPU;
#   4. a QLoRA step (NF4 base) and a short SmolLM2-135M LoRA fine-tune on cuda:0, each
#      compared with the same run on the CPU;
# and prints one summary line: `gpu-check: PASS ...` or `gpu-check: FAIL ...`.
# Tunables: DEVICE (cuda:0), STEPS (20), SKIP_TESTS=1 (only the runs of step 4).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DEVICE=${DEVICE:-cuda:0}
STEPS=${STEPS:-20}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target/cuda}
OUT=$ROOT/out/gpu-check
mkdir -p "$OUT"
fail() { echo "gpu-check: FAIL at $1 (log: $OUT)"; exit 1; }

if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu-check: FAIL no nvidia-smi: run this on a machine with an NVIDIA GPU"; exit 1
fi
if [ -z "${CUDA_COMPUTE_CAP:-}" ]; then
    CUDA_COMPUTE_CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '.')
    export CUDA_COMPUTE_CAP
fi
GPU=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1)
echo "gpu-check: $GPU, sm_$CUDA_COMPUTE_CAP, device $DEVICE" >&2

# 1. Build.
if command -v nvcc >/dev/null 2>&1; then
    cargo build --release -p peft-cli --features cuda >"$OUT/build.log" 2>&1 || fail build
else
    scripts/build-cuda.sh >"$OUT/build.log" 2>&1 || fail build
    SDK=${PEFT_CUDA_DIR:-$ROOT/target/cuda-sdk}
    export CUDA_ROOT=$SDK/root PATH=$SDK/root/bin:$PATH
fi
PEFT=$CARGO_TARGET_DIR/release/peft

# 2. The device opens.
"$PEFT" --device "$DEVICE" devices | tee "$OUT/devices.txt" >&2 || fail devices

# 3. The CLI tests on the GPU.
tests=skipped
if [ -z "${SKIP_TESTS:-}" ]; then
    start=$(date +%s)
    PEFT_DEVICE=$DEVICE cargo test --release -p peft-cli --features cuda \
        --test cli --test quant_cli --test train_cli >"$OUT/tests.log" 2>&1 || fail tests
    passed=$(grep -h '^test result' "$OUT/tests.log" | awk '{s += $4} END {print s}')
    tests="$passed CLI tests passed on $DEVICE in $(( $(date +%s) - start )) s"
fi

# 4. QLoRA and SmolLM2 runs, GPU against CPU.
gguf=$(scripts/fetch-smollm2.sh | tail -n 1) || fail fetch-smollm2
data=$OUT/data.jsonl
python3 - "$data" <<'PY'
import json, sys
lines = ["The quick brown fox jumps over the lazy dog.", "A journey of a thousand miles begins with a single step.",
         "To be or not to be, that is the question.", "All that glitters is not gold."]
with open(sys.argv[1], "w") as f:
    for i in range(32):
        f.write(json.dumps({"text": lines[i % len(lines)]}) + "\n")
PY
run_train() { # device quant tag: prints "last-logged-loss seconds"
    local q=(); [ -n "$2" ] && q=(--quant "$2")
    local start; start=$(date +%s)
    rm -rf "${OUT:?}/$3"
    "$PEFT" --device "$1" train --model "$gguf" "${q[@]}" --data "$data" --max-steps "$STEPS" \
        --batch-size 4 --seq-len 64 --lr 1e-3 --seed 0 --log-every 1 --no-progress \
        --out "$OUT/$3" >"$OUT/$3.log" 2>&1 || return 1
    echo "$(python3 -c "
import json, sys
losses = [json.loads(l)['loss'] for l in open(sys.argv[1]) if '\"loss\"' in l]
print(losses[-1])" "$OUT/$3/metrics.jsonl") $(( $(date +%s) - start ))"
}
read -r nf4_gpu nf4_gpu_s < <(run_train "$DEVICE" nf4 nf4-gpu) || fail qlora-gpu
read -r nf4_cpu nf4_cpu_s < <(run_train cpu nf4 nf4-cpu) || fail qlora-cpu
read -r f32_gpu f32_gpu_s < <(run_train "$DEVICE" "" f32-gpu) || fail smollm2-gpu
read -r f32_cpu f32_cpu_s < <(run_train cpu "" f32-cpu) || fail smollm2-cpu
close() { python3 -c "import sys; a,b=float(sys.argv[1]),float(sys.argv[2]); sys.exit(0 if abs(a-b) <= 2e-2*max(1,abs(b)) else 1)" "$1" "$2"; }
close "$nf4_gpu" "$nf4_cpu" || fail "qlora loss $nf4_gpu on $DEVICE vs $nf4_cpu on cpu"
close "$f32_gpu" "$f32_cpu" || fail "smollm2 loss $f32_gpu on $DEVICE vs $f32_cpu on cpu"
echo "gpu-check: PASS $GPU; $tests; QLoRA nf4 $STEPS steps loss $nf4_gpu ($nf4_gpu_s s) vs cpu $nf4_cpu ($nf4_cpu_s s); SmolLM2 f32 LoRA loss $f32_gpu ($f32_gpu_s s) vs cpu $f32_cpu ($f32_cpu_s s)"
