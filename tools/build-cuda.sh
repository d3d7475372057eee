#!/usr/bin/env bash
# Adapted from ../shared/tools/cuda/build-cuda.sh: `cargo metadata` is asked with --features cuda,
# since cudarc is an optional dependency that the plain metadata does not list.
# Build a Rust crate that uses candle 0.11.x with its `cuda` feature on a machine
# without a GPU, for an H100 whose driver is 580 (CUDA 13.0). Idempotent.
# usage (from the crate's root): ../shared/tools/cuda/build-cuda.sh --features cuda [--bin NAME]
# A cold build takes 15+ minutes on 2 cores (candle-kernels' MoE kernels); later ones are quick.
# Only PyPI packages are used: nvcc 13.0 and headers; the CUDA libraries that only the
# GPU machine has are replaced at link time by stubs that carry their real names.
set -euo pipefail
PROJECT=${PROJECT:-$PWD}
CUDA_PIP=${CUDA_PIP:-$HOME/.cache/cuda13-pip}
CUDA_ROOT=$CUDA_PIP/nvidia/cu13          # wheel layout: bin/ include/ lib/ nvvm/
STUBS=$CUDA_ROOT/lib/stubs

# 1. nvcc + headers + cudart from PyPI, pinned to 13.0: driver 580 JITs PTX
#    only up to ISA 9.0 (nvcc 13.0); cudarc 0.19.10 knows CUDA <= 13.4.
if [ ! -x "$CUDA_ROOT/bin/nvcc" ] || [ ! -e "$CUDA_ROOT/include/nv/target" ]; then
  python3 -m pip install -q --no-deps --upgrade --target "$CUDA_PIP" \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
fi
export CUDA_HOME=$CUDA_ROOT               # cudarc links from $CUDA_HOME/lib{,/stubs}
export PATH=$CUDA_ROOT/bin:$PATH          # cudaforge runs nvcc
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}   # no nvidia-smi here; 90 -> sm_90a
export CUDARC_CUDA_VERSION=13000

# 2. Link-time only (never shipped): libcudart.so symlink, and stubs with the
#    real SONAMEs for libs that only the GPU box has (libcuda from the driver;
#    cublas/cublasLt/curand/nvrtc from the torch cu130 wheels).
ln -sf libcudart.so.13 "$CUDA_ROOT/lib/libcudart.so"
(cd "$PROJECT" && cargo fetch -q)
CUDARC_SRC=$(cd "$PROJECT" && cargo metadata -q --format-version 1 --features cuda | python3 -c \
  'import json,sys,os; print(next(os.path.dirname(p["manifest_path"]) for p in json.load(sys.stdin)["packages"] if p["name"]=="cudarc"))')
mkdir -p "$STUBS"
mkstub() { # <cudarc sys dir> <soname> <version node or "">
  local dir=$1 soname=$2 ver=$3 base=${2%%.so*} vs=()
  [ -e "$STUBS/$soname" ] && return 0
  grep -oE '^pub unsafe fn [A-Za-z0-9_]+' "$CUDARC_SRC/src/$dir/sys/mod.rs" | awk '{print $4}' \
    | sort -u | sed 's/.*/int &(void){return 100;}/' > "$STUBS/$base.c"
  if [ -n "$ver" ]; then
    echo "$ver { global: *; };" > "$STUBS/$base.map"; vs=(-Wl,--version-script="$STUBS/$base.map")
  fi
  gcc -shared -fPIC -o "$STUBS/$soname" -Wl,-soname,"$soname" "${vs[@]}" "$STUBS/$base.c"
  ln -sf "$soname" "$STUBS/$base.so"
}
mkstub driver   libcuda.so.1      ""      # driver lib: unversioned symbols
mkstub nvrtc    libnvrtc.so.13    libnvrtc.so.13
mkstub curand   libcurand.so.10   libcurand.so.10
mkstub cublas   libcublas.so.13   libcublas.so.13
mkstub cublaslt libcublasLt.so.13 libcublasLt.so.13
# cuDNN (the `cudnn` feature) from the nvidia-cudnn-cu13 wheel there; unversioned, which links
# whether or not the real library versions its symbols.
mkstub cudnn    libcudnn.so.9     ""

# 3. Build (release profile should have strip = true).
cd "$PROJECT"
time cargo build --release "$@"
