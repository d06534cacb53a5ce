#!/usr/bin/env bash
# Compile-checks (and builds) the `peft` binary with CUDA on a machine without a GPU.
#
#   scripts/build-cuda.sh              # release build of peft-cli --features cuda
#   CUDA_COMPUTE_CAP=80 scripts/build-cuda.sh
#
# nvcc and the CUDA headers come from PyPI (CUDA 13.0 wheels, pinned: cudarc 0.19 knows CUDA
# up to 13.4, and a GPU machine with driver 580 JITs PTX from 13.0 but not newer), unpacked
# into $PEFT_CUDA_DIR (default target/cuda-sdk). The driver, cuBLAS, cuRAND and NVRTC
# libraries are not needed to compile; candle links them dynamically, so link stubs (every
# symbol cudarc may load, each returning CUDA_ERROR_NO_DEVICE) stand in for them at link time.
# Never put the stubs on a GPU machine's library path: there the driver and the CUDA 13
# runtime libraries must be found instead.
#
# CUDA_COMPUTE_CAP (default 80: sm_80, A100 and newer; 90 builds sm_90a, H100/H200 only)
# is needed because there is no nvidia-smi here to ask. A clean build takes about 20
# minutes on 2 cores (candle's quantized-matmul kernels compile one at a time), so this is
# kept out of `.ci/run`.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
SDK=${PEFT_CUDA_DIR:-$ROOT/target/cuda-sdk}
CAP=${CUDA_COMPUTE_CAP:-80}
PY=${PYTHON:-python3}

if [ ! -x "$SDK/wheels/nvidia/cu13/bin/nvcc" ]; then
    echo "build-cuda: installing nvcc 13.0 and the CUDA headers into $SDK/wheels" >&2
    "$PY" -m pip install -q --no-cache-dir --target "$SDK/wheels" \
        nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
        nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
fi
CU=$SDK/wheels/nvidia/cu13
CUDA=$SDK/root
mkdir -p "$CUDA/lib64/stubs"
for d in bin include nvvm; do ln -sfn "$CU/$d" "$CUDA/$d"; done
# candle-kernels links -lcudart; the wheel ships only the versioned library.
ln -sf "$CU/lib/libcudart.so.13" "$CUDA/lib64/libcudart.so"

# cudarc's source (for the symbol lists of the stubs).
cargo fetch -q
CUDARC=$(cargo metadata --format-version 1 2>/dev/null | "$PY" -c '
import json, sys
for p in json.load(sys.stdin)["packages"]:
    if p["name"] == "cudarc":
        print(p["manifest_path"].rsplit("/", 1)[0]); break')
if [ -z "$CUDARC" ]; then
    # The default feature set does not pull cudarc in: ask for the cuda one.
    CUDARC=$(cargo metadata --format-version 1 --features peft-cli/cuda 2>/dev/null | "$PY" -c '
import json, sys
for p in json.load(sys.stdin)["packages"]:
    if p["name"] == "cudarc":
        print(p["manifest_path"].rsplit("/", 1)[0]); break')
fi
[ -n "$CUDARC" ] || { echo "build-cuda: cudarc's source not found (cargo fetch failed?)" >&2; exit 1; }
stub() { # module library soname-version
    local src=$CUDARC/src/$1/sys/mod.rs out=$CUDA/lib64/stubs
    grep -ho 'load::<_F>("[A-Za-z0-9_]*")' "$src" | sed 's/.*("\(.*\)")/int \1(void){return 100;}/' \
        | sort -u > "$out/$2.c"
    gcc -shared -fPIC -Wl,-soname,lib$2.so.$3 -o "$out/lib$2.so" "$out/$2.c"
    ln -sf "lib$2.so" "$out/lib$2.so.$3"
}
stub driver cuda 1
stub cublas cublas 13
stub cublaslt cublasLt 13
stub curand curand 10
stub nvrtc nvrtc 13

export CUDA_ROOT=$CUDA CUDA_PATH=$CUDA CUDA_HOME=$CUDA PATH=$CUDA/bin:$PATH CUDA_COMPUTE_CAP=$CAP
export LIBRARY_PATH=$CUDA/lib64/stubs:$CUDA/lib64:${LIBRARY_PATH:-}
# Its own target folder: switching candle's features would otherwise rebuild the CPU build.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target/cuda}
echo "build-cuda: cargo build --release -p peft-cli --features cuda (sm_$CAP) into $CARGO_TARGET_DIR" >&2
time cargo build --release -p peft-cli --features cuda "$@"
BIN=$CARGO_TARGET_DIR/release/peft
echo "build-cuda: built $BIN" >&2
# Without a GPU the binary starts only with the stubs on the loader path, and then reports
# that there is no device.
if ! command -v nvidia-smi >/dev/null 2>&1; then
    LD_LIBRARY_PATH=$CUDA/lib64/stubs:$CU/lib "$BIN" devices || true
fi
