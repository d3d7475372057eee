#!/usr/bin/env bash
# Build the null CUDA libraries (nullcuda.c) into target/nullcuda/, under the real libraries'
# names, for running the `cuda` build of layerdiff on a machine without a GPU:
#   tools/nullcuda/build.sh
#   NULLCUDA_REPORT=/tmp/calls.tsv LD_LIBRARY_PATH=$PWD/target/nullcuda \
#     target/cuda/release/layerdiff bench --stages --device cuda --dtype bf16 ...
# Every entry point cudarc declares and nullcuda.c leaves out is generated as one that answers
# an error and counts itself as `missing` in the report.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${NULLCUDA_DIR:-$PWD/target/nullcuda}
SRC=$PWD/tools/nullcuda/nullcuda.c
mkdir -p "$OUT"
CUDARC_SRC=$(cargo metadata -q --format-version 1 --features cuda | python3 -c \
  'import json,sys,os; print(next(os.path.dirname(p["manifest_path"]) for p in json.load(sys.stdin)["packages"] if p["name"]=="cudarc"))')

build() { # <cudarc sys dir> <define> <soname> <versioned: 1 or 0>
  local dir=$1 define=$2 soname=$3 versioned=$4 base=${3%%.so*} vs=()
  gcc -O2 -fPIC -c -D"$define" -DLIBNAME="\"$base\"" -o "$OUT/$base.o" "$SRC"
  nm --defined-only -g "$OUT/$base.o" | awk '{print $3}' | sort -u > "$OUT/$base.defined"
  grep -oE '^pub unsafe fn [A-Za-z0-9_]+' "$CUDARC_SRC/src/$dir/sys/mod.rs" | awk '{print $4}' \
    | sort -u | comm -23 - "$OUT/$base.defined" \
    | sed 's/.*/int nullcuda_missing(const char *); int &(void) { return nullcuda_missing("&"); }/' \
    > "$OUT/$base.missing.c"
  if [ "$versioned" = 1 ]; then
    echo "$soname { global: *; };" > "$OUT/$base.map"; vs=(-Wl,--version-script="$OUT/$base.map")
  fi
  gcc -O2 -shared -fPIC -o "$OUT/$soname" -Wl,-soname,"$soname" "${vs[@]}" \
    "$OUT/$base.o" "$OUT/$base.missing.c" -lpthread -ldl
  rm -f "$OUT/$base.o"
}
build driver   LIB_CUDA     libcuda.so.1      0   # the driver's symbols carry no version
build cublas   LIB_CUBLAS   libcublas.so.13   1
build cublaslt LIB_CUBLASLT libcublasLt.so.13 1
build curand   LIB_CURAND   libcurand.so.10   1
build nvrtc    LIB_NVRTC    libnvrtc.so.13    1
build cudnn    LIB_CUDNN    libcudnn.so.9     0   # for the `cudnn` feature's build
echo "null CUDA libraries in $OUT"
