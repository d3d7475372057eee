#!/usr/bin/env bash
# The device check of issue 5, in two halves:
#
#   scripts/gpu-check.sh prepare      here, on the CPU machine (no GPU needed): builds the `cuda`
#                                     binary and the parity test binary with tools/build-cuda.sh,
#                                     and downloads the wheels the GPU machine lacks (diffusers),
#                                     all into gpu-bundle/ (git-ignored; carry it).
#   scripts/gpu-check.sh run          there, from the repo root (no network): the tiny-model
#                                     parity tests on CUDA, a demo edit, then `layerdiff bench
#                                     --stages` and tools/bench_stages_ref.py at 512x512 in f32 and
#                                     bf16; every log and JSON packed into $OUT/gpu-check.tgz
#                                     (the device tool returns at most 8 files), plus summary.txt.
#
# With the device tool: run(command="scripts/gpu-check.sh run", carry=["gpu-bundle"], timeout_s=540).
# The run half took 4.2 minutes on an H100 (2026-11-27; results in docs/bench/h100-2026-11-27).
# The tree that travels must stay under 64 MiB with the bundle (21 MB): that run moved the fixtures
# it does not read (tests/fixtures/{grads.safetensors,sam,eval,mobile-sam}, assets/clip-tokenizer)
# out of the checkout for the call and back after.
# DEVICE=cpu SIZE=64 TINY=1 scripts/gpu-check.sh run tests the same script here, on tiny models.
set -uo pipefail
cd "$(dirname "$0")/.."
BUNDLE=${BUNDLE:-gpu-bundle}
OUT=${OUT:-target/gpu-check}
WORK=${WORK:-/tmp/gpu-check-work}
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-512}
STEPS=${STEPS:-3}
PY=${PY:-python3}   # a Python with PyTorch and diffusers

prepare() {
  set -e
  # `cargo build --release --features cuda|cudnn --bin layerdiff --test models_parity`, with nvcc
  # and link stubs; one target folder, so the cudnn build reuses the kernels of the first.
  rm -rf "$BUNDLE" /tmp/gpu-check-bins && mkdir -p "$BUNDLE/wheels" /tmp/gpu-check-bins
  local feature
  for feature in cuda cudnn; do
    # cargo's JSON names each executable it built (the test binary's file name has a hash).
    CARGO_TARGET_DIR=target/cuda tools/build-cuda.sh --features "$feature" --bin layerdiff --test models_parity \
      --message-format=json-render-diagnostics >/tmp/gpu-check-bins/build.json
    python3 -c 'import json, shutil, sys
for m in map(json.loads, open("/tmp/gpu-check-bins/build.json")):
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        shutil.copy(m["executable"], "/tmp/gpu-check-bins/%s-%s" % (m["target"]["name"], sys.argv[1]))' "$feature"
  done
  # The four binaries carry the same PTX kernels (70 MB each): one xz stream with a dictionary
  # that spans them packs them into about what one takes alone (a carry holds 64 MiB).
  rm /tmp/gpu-check-bins/build.json
  tar cf - -C /tmp/gpu-check-bins . | xz -T1 --lzma2=preset=6,dict=320MiB >"$BUNDLE/bins.tar.xz"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$BUNDLE/wheels" \
    diffusers==0.42.1 importlib_metadata
  du -sh "$BUNDLE"
}

# One step: its output into $WORK/<name>.log, its status into the summary; never stops the script.
step() {
  local name=$1 limit=$2
  shift 2
  echo "== $name"
  local start=$SECONDS
  timeout "$limit" "$@" >"$WORK/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$WORK/$name.log"
  echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$WORK/summary.txt"
  # What is done so far comes back even if the device call is cut short.
  tar czf "$OUT/gpu-check.tgz" -C "$WORK" . && cp "$WORK/summary.txt" "$OUT/summary.txt"
}

# Our bench: `ours NAME BUILD [VAR=VALUE...] -- FLAGS`, the JSON into $WORK/NAME.json.
ours() {
  local name=$1 build=$2
  shift 2
  local env=()
  while [ "$1" != -- ]; do env+=("$1"); shift; done
  shift
  step "$name" 120 env "${env[@]}" "$(bin "$build")" bench --stages --device "$DEVICE" "$@" "${tiny[@]}" --json "$WORK/$name.json"
}

# PyTorch's: `ref NAME FLAGS`.
ref() {
  local name=$1
  shift
  step "$name" 120 "$PY" tools/bench_stages_ref.py --device "$DEVICE" "$@" "${tiny[@]}" --json "$WORK/$name.json"
}

# The layerdiff binary of a build: cuda (candle's im2col convolutions) or cudnn.
bin() {
  if [ "$DEVICE" = cuda ]; then echo "/tmp/gpu-check/layerdiff-$1"; else echo target/release/layerdiff; fi
}

run() {
  mkdir -p "$OUT" "$WORK"
  : >"$WORK/summary.txt"
  tiny=()
  [ -n "${TINY:-}" ] && tiny=(--tiny)
  if [ "$DEVICE" = cuda ]; then
    mkdir -p /tmp/gpu-check
    xz -dc "$BUNDLE/bins.tar.xz" | tar xf - -C /tmp/gpu-check
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$WORK/gpu.txt" 2>&1
    python3 -m pip install -q --no-index --no-deps --target /tmp/site "$BUNDLE"/wheels/*.whl \
      && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    # cuBLAS, cuRAND, NVRTC and cuDNN of CUDA 13 come from PyTorch's wheels there (as
    # ../shared/tools/cuda/run-on-gpu.sh does for the first three).
    local libs
    libs=$(python3 -c 'import os, nvidia; print(":".join(os.path.join(p, d, "lib") for p in nvidia.__path__ for d in ("cu13", "cudnn") if os.path.isdir(os.path.join(p, d, "lib"))))')
    export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" >>"$WORK/gpu.txt"
    # 1. correctness on the device, both builds
    local build
    for build in cuda cudnn; do
      step "parity-$build" 90 env LAYERDIFF_TEST_DEVICE=cuda "/tmp/gpu-check/models_parity-$build" --test-threads 1
    done
  fi
  step demo-edit 60 "$(bin cudnn)" edit --device "$DEVICE" --model assets/tiny-sd --image assets/demo/dog.png \
    --mask assets/demo/dog-mask.png --object "a jumping dog" --background "a dense forest" --size 64 \
    --embedding-steps 20 --finetune-steps 10 --steps 10 --seeds 1,2 --force --out "$WORK/demo-edit"
  # 2. speed, each stage's step: ours per build, then PyTorch's, per precision (LoRA), the most
  #    wanted first; the small size shows what each step costs besides its arithmetic.
  local common=(--size "$SIZE" --finetune lora --steps "$STEPS")
  for dtype in bf16 f32; do
    ours "ours-cuda-$dtype-lora" cuda -- "${common[@]}" --dtype "$dtype"
    ours "ours-cudnn-$dtype-lora" cudnn -- "${common[@]}" --dtype "$dtype"
    ref "torch-$dtype-lora" "${common[@]}" --dtype "$dtype"
  done
  [ -n "${TF32:-}" ] && ours ours-cudnn-f32-tf32-lora cudnn LAYERDIFF_TF32=1 -- "${common[@]}" --dtype f32
  ours ours-cudnn-bf16-lora-small cudnn -- --size 128 --finetune lora --steps "$STEPS" --dtype bf16
  ref torch-bf16-lora-small --size 128 --finetune lora --steps "$STEPS" --dtype bf16
  "$PY" tools/bench_table.py "$WORK"/*.json | tee "$WORK/table.txt"
  cp "$WORK/table.txt" "$OUT/"
  # 3. where our GPU time goes: every kernel's time, summed by kernel (Nsight Compute), over a
  #    forward and a forward + backward of the plain bench; last, as it may run out of time.
  if [ "$DEVICE" = cuda ] && [ -n "${PROFILE:-1}" ]; then
    local ncu
    ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
    step plain-bf16 60 "$(bin cudnn)" bench --device cuda --size "$SIZE" --dtype bf16 --runs 1
    step ncu-bf16 "${NCU_LIMIT:-100}" "$ncu" --clock-control none --cache-control none --metrics gpu__time_duration.sum \
      -c "${NCU_KERNELS:-4000}" --print-summary per-kernel --csv "$(bin cudnn)" bench --device cuda --size "$SIZE" --dtype bf16 --runs 1
  fi
  cat "$WORK/summary.txt"
}

case "${1:-}" in
  prepare) prepare ;;
  run) run ;;
  *) echo "usage: scripts/gpu-check.sh prepare|run" >&2; exit 2 ;;
esac
