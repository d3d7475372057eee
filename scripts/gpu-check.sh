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

prepare() {
  set -e
  # `cargo build --release --features cuda --bin layerdiff --test models_parity`, with nvcc and link stubs.
  CARGO_TARGET_DIR=target/cuda tools/build-cuda.sh --features cuda --bin layerdiff --test models_parity
  rm -rf "$BUNDLE" && mkdir -p "$BUNDLE/wheels"
  # xz: the binaries carry candle's PTX kernels (120 MB together, 15 MB packed; a carry holds 64 MiB).
  local parity
  parity=$(ls -t target/cuda/release/deps/models_parity-* | grep -v '\.d$' | head -1)
  xz -T2 -6 -c target/cuda/release/layerdiff >"$BUNDLE/layerdiff.xz"
  xz -T2 -6 -c "$parity" >"$BUNDLE/models_parity.xz"
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

run() {
  mkdir -p "$OUT" "$WORK"
  : >"$WORK/summary.txt"
  local bin=/tmp/gpu-check/layerdiff
  if [ "$DEVICE" = cuda ]; then
    mkdir -p /tmp/gpu-check
    xz -dc "$BUNDLE/layerdiff.xz" >"$bin" && xz -dc "$BUNDLE/models_parity.xz" >/tmp/gpu-check/models_parity
    chmod +x "$bin" /tmp/gpu-check/models_parity
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$WORK/gpu.txt" 2>&1
    python3 -m pip install -q --no-index --no-deps --target /tmp/site "$BUNDLE"/wheels/*.whl \
      && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    # cuBLAS, cuRAND and NVRTC of CUDA 13 come from PyTorch's wheels there (as ../shared/tools/cuda/run-on-gpu.sh).
    export LD_LIBRARY_PATH=$(python3 -c 'import os, nvidia; print(":".join(os.path.join(p, "cu13", "lib") for p in nvidia.__path__))')${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  else
    bin=target/release/layerdiff
  fi
  local tiny=()
  [ -n "${TINY:-}" ] && tiny=(--tiny)
  # 1. correctness on the device
  if [ "$DEVICE" = cuda ]; then
    step parity 60 env LAYERDIFF_TEST_DEVICE=cuda /tmp/gpu-check/models_parity --test-threads 1 --nocapture
  fi
  step demo-edit 60 "$bin" edit --device "$DEVICE" --model assets/tiny-sd --image assets/demo/dog.png \
    --mask assets/demo/dog-mask.png --object "a jumping dog" --background "a dense forest" --size 64 \
    --embedding-steps 20 --finetune-steps 10 --steps 10 --seeds 1,2 --force --out "$WORK/demo-edit"
  # 2. speed: ours, then PyTorch's (tools/bench_stages.sh prints both and the ratios), per
  #    fine-tuning mode and precision, the most wanted first
  for mode in lora full; do
    for dtype in f32 bf16; do
      step "stages-$dtype-$mode" 100 env BIN="$bin" OUT="$WORK" tools/bench_stages.sh python3 --device "$DEVICE" \
        --size "$SIZE" --dtype "$dtype" --finetune "$mode" --steps "$STEPS" "${tiny[@]}"
    done
  done
  cat "$WORK/summary.txt"
}

case "${1:-}" in
  prepare) prepare ;;
  run) run ;;
  *) echo "usage: scripts/gpu-check.sh prepare|run" >&2; exit 2 ;;
esac
