#!/usr/bin/env bash
# The device check of issue 5, in two halves:
#
#   scripts/gpu-check.sh prepare      here, on the CPU machine (no GPU needed): builds the `cuda`
#                                     binary and the parity test binary with tools/build-cuda.sh,
#                                     and both again with `--features cudnn`,
#                                     and downloads the wheels the GPU machine lacks (diffusers),
#                                     all into gpu-bundle/ (git-ignored; carry it; about 18 MB).
#   scripts/gpu-check.sh run          there, from the repo root (no network): the tiny-model
#                                     parity tests on CUDA (also with LAYERDIFF_HTOD_CACHE=0,
#                                     without the fused kernels, LAYERDIFF_FUSED=0, and the
#                                     `cudnn` build's, fused and not), a demo
#                                     edit, then `layerdiff bench --stages` and
#                                     tools/bench_stages_ref.py at 512x512 in bf16 and f32, LoRA and
#                                     full (bf16), full with gradient checkpointing in bf16, the
#                                     variants (the fused kernels off, cuDNN's convolutions, the
#                                     host-side settings off, 128 px), a table of all (tools/bench_table.py), stacks of
#                                     the host's thread
#                                     sampled with cuda-gdb (tools/host_samples.sh), and Nsight
#                                     Compute's kernel times with the fused kernels
#                                     (tools/ncu_summary.py); every log and
#                                     JSON packed into $OUT/gpu-check.tgz, plus summary.txt, the
#                                     two tables and the host's samples.
#   scripts/gpu-check.sh quick        there, the short check (about 5 minutes): parity in both
#                                     builds, bf16 LoRA and full fine-tuning in both builds (and
#                                     full once more with the attention composed, LAYERDIFF_FLASH=0)
#                                     and f32 LoRA against PyTorch, and Nsight Compute over one step of
#                                     full fine-tuning's stage 2 (`bench --profile-stage 2`).
#
# With the device tool: run(command="STEPS=5 scripts/gpu-check.sh run", carry=["gpu-bundle"],
# timeout_s=480). The run half took 5.8 minutes on an H200 (350 s of device time, plus about 40 s
# to start the machine; results in docs/bench/h200-2026-11-28), before the fused kernels' and
# cuDNN's steps, which add about 90 s. To fit a smaller budget:
# VARIANTS= skips the host-side settings' variants (about 40 s), HOST_SAMPLES=0 the host's stack
# samples (about 45 s), PROFILE= (empty) both of the last two steps, the samples and Nsight
# Compute (about 60 s).
# The tree that travels must stay under 64 MiB with the bundle: move the fixtures it does not read
# (tests/fixtures/{grads.safetensors,sam,eval,mobile-sam,tiny-sd/tokenizer}, assets/clip-tokenizer,
# assets/toy-sd) out of the checkout for the call and back after.
# DEVICE=cpu SIZE=128 TINY=1 PY=~/venv-ref/bin/python scripts/gpu-check.sh run tests it here.
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
  # `cargo build --release --features cuda --bin layerdiff --test models_parity`, with nvcc and
  # link stubs; cargo's JSON names the executables (the test binary's file name has a hash).
  rm -rf "$BUNDLE" /tmp/gpu-check-bins && mkdir -p "$BUNDLE/wheels" /tmp/gpu-check-bins
  # Symbols kept (`strip = false`), for the host-side samples of `run`. Then the same two with
  # cuDNN's convolutions (`--features cudnn`), as `<name>-cudnn`: a binary linked to libcudnn does
  # not start where it is missing, so the plain pair stays apart. Each build's binaries are copied
  # before the next, which writes the same path.
  local features suffix
  for features in cuda cudnn; do
    suffix=-$features
    [ "$features" = cuda ] && suffix=
    CARGO_PROFILE_RELEASE_STRIP=false CARGO_TARGET_DIR=target/cuda \
      tools/build-cuda.sh --features "$features" --bin layerdiff --test models_parity \
      --message-format=json-render-diagnostics >/tmp/gpu-check-bins/build.json
    SUFFIX=$suffix python3 -c 'import json, os, shutil
for m in map(json.loads, open("/tmp/gpu-check-bins/build.json")):
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        shutil.copy(m["executable"], "/tmp/gpu-check-bins/" + m["target"]["name"] + os.environ["SUFFIX"])'
  done
  rm /tmp/gpu-check-bins/build.json
  # The four binaries carry the same PTX kernels (about 50 MB): one xz stream with a dictionary
  # that spans them all packs them into little more than one takes alone (a carry holds 64 MiB).
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

# Our bench: `ours NAME [VAR=VALUE...] -- FLAGS`, the JSON into $WORK/NAME.json.
ours() {
  local name=$1
  shift
  local env=()
  while [ "$1" != -- ]; do env+=("$1"); shift; done
  shift
  step "$name" 90 env "${env[@]}" "$BIN" bench --stages --device "$DEVICE" "$@" "${tiny[@]}" --json "$WORK/$name.json"
}

# PyTorch's: `ref NAME FLAGS`.
ref() {
  local name=$1
  shift
  step "$name" 90 "$PY" tools/bench_stages_ref.py --device "$DEVICE" "$@" "${tiny[@]}" --json "$WORK/$name.json"
}

# The bundle unpacked, the GPU's name, diffusers and the CUDA libraries' path; $BIN the binary.
setup() {
  mkdir -p "$OUT" "$WORK"
  : >"$WORK/summary.txt"
  tiny=()
  [ -n "${TINY:-}" ] && tiny=(--tiny)
  BIN=target/release/layerdiff
  if [ "$DEVICE" = cuda ]; then
    BIN=/tmp/gpu-check/layerdiff
    mkdir -p /tmp/gpu-check
    xz -dc "$BUNDLE/bins.tar.xz" | tar xf - -C /tmp/gpu-check
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$WORK/gpu.txt" 2>&1
    python3 -m pip install -q --no-index --no-deps --target /tmp/site "$BUNDLE"/wheels/*.whl \
      && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    # cuBLAS, cuRAND and NVRTC of CUDA 13 come from PyTorch's wheels there (as
    # ../shared/tools/cuda/run-on-gpu.sh does), and cuDNN 9 from its nvidia-cudnn wheel.
    export LD_LIBRARY_PATH=$(python3 -c 'import glob, os, nvidia
dirs = [os.path.join(p, "cu13", "lib") for p in nvidia.__path__]
dirs += sorted({os.path.dirname(f) for p in nvidia.__path__ for f in glob.glob(os.path.join(p, "**", "libcudnn.so.9"), recursive=True)})
print(":".join(dirs))')${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  fi
}

# Nsight Compute's time per kernel, summed by kernel: `profile NAME LIMIT ARGS...` (its options,
# then the command) into $WORK/NAME.log and $OUT/NAME-kernels.txt.
profile() {
  local name=$1 limit=$2 ncu
  shift 2
  ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  step "$name" "$limit" "$ncu" --clock-control none --cache-control none --metrics gpu__time_duration.sum \
    --print-summary per-kernel --csv "$@"
  "$PY" tools/ncu_summary.py "$WORK/$name.log" 30 | tee "$WORK/$name-kernels.txt"
  cp "$WORK/$name-kernels.txt" "$OUT/"
}

# The short check (about 5 minutes on an H200 with STEPS=5, PROFILE= skips the last minute),
# the most wanted first: parity in the `cudnn` build, bf16 LoRA and full fine-tuning in both builds
# against PyTorch (and full with the attention composed), f32 LoRA against PyTorch with TF32 where PyTorch has it by default (its cuDNN's
# convolutions, `LAYERDIFF_TF32=conv`), parity in the plain build, then Nsight Compute over one
# step of full fine-tuning's stage 2 (`bench --profile-stage 2`).
quick() {
  setup
  if [ "$DEVICE" = cuda ]; then
    step parity-cudnn 90 env LAYERDIFF_TEST_DEVICE=cuda /tmp/gpu-check/models_parity-cudnn --test-threads 1
  fi
  local mode
  for mode in lora full; do
    ours "ours-bf16-$mode" -- --size "$SIZE" --dtype bf16 --finetune "$mode" --steps "$STEPS"
    [ "$DEVICE" = cuda ] && BIN=$BIN-cudnn ours "ours-bf16-$mode-cudnn" -- --size "$SIZE" --dtype bf16 --finetune "$mode" --steps "$STEPS"
    ref "torch-bf16-$mode" --size "$SIZE" --dtype bf16 --finetune "$mode" --steps "$STEPS"
  done
  if [ "$DEVICE" = cuda ]; then
    # the fused attention's gain: the same step with the attention composed
    BIN=$BIN-cudnn ours ours-bf16-full-cudnn-noflash LAYERDIFF_FLASH=0 -- --size "$SIZE" --dtype bf16 --finetune full --steps "$STEPS"
    BIN=$BIN-cudnn ours ours-f32-lora-cudnn-tf32conv LAYERDIFF_TF32=conv -- --size "$SIZE" --dtype f32 --finetune lora --steps "$STEPS"
  fi
  ref torch-f32-lora --size "$SIZE" --dtype f32 --finetune lora --steps "$STEPS"
  "$PY" tools/bench_table.py "$WORK"/*.json | tee "$WORK/table.txt"
  cp "$WORK/table.txt" "$OUT/"
  if [ "$DEVICE" = cuda ]; then
    step parity 90 env LAYERDIFF_TEST_DEVICE=cuda /tmp/gpu-check/models_parity --test-threads 1
  fi
  if [ "$DEVICE" = cuda ] && [ -n "${PROFILE-1}" ]; then
    profile ncu-full-stage2 "${NCU_LIMIT:-150}" --profile-from-start off "$BIN-cudnn" bench --stages --device cuda \
      --size "$SIZE" --dtype bf16 --finetune full --steps 1 --profile-stage 2
  fi
  cat "$WORK/summary.txt"
}

run() {
  setup
  if [ "$DEVICE" = cuda ]; then
    # 1. correctness on the device
    step parity 90 env LAYERDIFF_TEST_DEVICE=cuda /tmp/gpu-check/models_parity --test-threads 1
    step parity-no-htod-cache 90 env LAYERDIFF_TEST_DEVICE=cuda LAYERDIFF_HTOD_CACHE=0 /tmp/gpu-check/models_parity --test-threads 1
    step parity-unfused 90 env LAYERDIFF_TEST_DEVICE=cuda LAYERDIFF_FUSED=0 /tmp/gpu-check/models_parity --test-threads 1
    # cuDNN's convolutions (src/models/cudnn_conv.rs), with the fused kernels and without
    step parity-cudnn 90 env LAYERDIFF_TEST_DEVICE=cuda /tmp/gpu-check/models_parity-cudnn --test-threads 1
    step parity-cudnn-unfused 90 env LAYERDIFF_TEST_DEVICE=cuda LAYERDIFF_FUSED=0 /tmp/gpu-check/models_parity-cudnn --test-threads 1
  fi
  step demo-edit 60 "$BIN" edit --device "$DEVICE" --model assets/tiny-sd --image assets/demo/dog.png \
    --mask assets/demo/dog-mask.png --object "a jumping dog" --background "a dense forest" --size 64 \
    --embedding-steps 20 --finetune-steps 10 --steps 10 --seeds 1,2 --force --out "$WORK/demo-edit"
  # 2. speed, each stage's step, ours then PyTorch's, the most wanted first; the small size shows
  #    what a step costs besides its arithmetic.
  local dtype mode
  for dtype in bf16 f32; do
    for mode in lora full; do
      [ "$dtype-$mode" = f32-full ] && continue
      ours "ours-$dtype-$mode" -- --size "$SIZE" --dtype "$dtype" --finetune "$mode" --steps "$STEPS"
      ref "torch-$dtype-$mode" --size "$SIZE" --dtype "$dtype" --finetune "$mode" --steps "$STEPS"
    done
  done
  # without the fused CUDA kernels (src/models/cuda_kernels.rs, on by default)
  ours ours-bf16-lora-unfused LAYERDIFF_FUSED=0 -- --size "$SIZE" --dtype bf16 --finetune lora --steps "$STEPS"
  ours ours-bf16-full-unfused LAYERDIFF_FUSED=0 -- --size "$SIZE" --dtype bf16 --finetune full --steps "$STEPS"
  # with the fused kernels but the attention composed (LAYERDIFF_FLASH=0)
  ours ours-bf16-lora-noflash LAYERDIFF_FLASH=0 -- --size "$SIZE" --dtype bf16 --finetune lora --steps "$STEPS"
  # cuDNN's convolutions ($BIN-cudnn), with the fused kernels and without
  if [ "$DEVICE" = cuda ]; then
    BIN=$BIN-cudnn ours ours-bf16-lora-cudnn -- --size "$SIZE" --dtype bf16 --finetune lora --steps "$STEPS"
    BIN=$BIN-cudnn ours ours-bf16-lora-cudnn-unfused LAYERDIFF_FUSED=0 -- --size "$SIZE" --dtype bf16 --finetune lora --steps "$STEPS"
    BIN=$BIN-cudnn ours ours-bf16-full-cudnn -- --size "$SIZE" --dtype bf16 --finetune full --steps "$STEPS"
  fi
  # full fine-tuning with gradient checkpointing (the 16 GB target), ours and diffusers'
  ours ours-bf16-full-ckpt -- --size "$SIZE" --dtype bf16 --finetune full --gradient-checkpointing --steps "$STEPS"
  ref torch-bf16-full-ckpt --size "$SIZE" --dtype bf16 --finetune full --gradient-checkpointing --steps "$STEPS"
  # each of the host-side settings of src/pipeline.rs (configure_cuda) turned off, then both
  # (VARIANTS= skips them)
  if [ -n "${VARIANTS-1}" ]; then
    ours ours-bf16-lora-no-htod-cache LAYERDIFF_HTOD_CACHE=0 -- --size "$SIZE" --dtype bf16 --finetune lora --steps "$STEPS"
    ours ours-bf16-lora-events LAYERDIFF_SINGLE_STREAM=0 -- --size "$SIZE" --dtype bf16 --finetune lora --steps "$STEPS"
    ours ours-bf16-lora-candle LAYERDIFF_HTOD_CACHE=0 LAYERDIFF_SINGLE_STREAM=0 -- --size "$SIZE" --dtype bf16 --finetune lora --steps "$STEPS"
  fi
  ours ours-bf16-lora-small -- --size $((SIZE / 4)) --dtype bf16 --finetune lora --steps "$STEPS"
  ref torch-bf16-lora-small --size $((SIZE / 4)) --dtype bf16 --finetune lora --steps "$STEPS"
  "$PY" tools/bench_table.py "$WORK"/*.json | tee "$WORK/table.txt"
  cp "$WORK/table.txt" "$OUT/"
  # 3. where the host's time goes in a stage-1 step (the GPU waits on it): stacks of the main
  #    thread sampled with cuda-gdb (there is no perf there), summed by function.
  if [ "$DEVICE" = cuda ] && [ -n "${PROFILE-1}" ]; then
    local gdb
    gdb=$(command -v cuda-gdb || ls /usr/local/cuda*/bin/cuda-gdb 2>/dev/null | head -1)
    if [ "${HOST_SAMPLES:-40}" != 0 ]; then
      step host-samples "${HOST_LIMIT:-180}" env GDB="$gdb" WAIT=25 SAMPLES="${HOST_SAMPLES:-40}" tools/host_samples.sh "$WORK/host" \
        "$BIN" bench --stages --device cuda --size "$SIZE" --dtype bf16 --finetune lora --steps 400
      cp "$WORK/host-samples.log" "$OUT/host-samples.txt"
    fi
    # 4. where our GPU time goes: each kernel's time, summed by kernel (Nsight Compute), over the
    #    plain bench's forward + backward (after its forwards); last, as it may run out of time.
    #    With the fused kernels (NCU_FUSED=0: without; h200-2026-11-28 has that profile), and
    #    cuDNN's convolutions where its parity passed above.
    local ncu_bin=$BIN
    grep -q "^parity-cudnn rc=0 " "$WORK/summary.txt" && ncu_bin=$BIN-cudnn
    export LAYERDIFF_FUSED=${NCU_FUSED-1}  # the default; NCU_FUSED=0 profiles without them
    step plain-bf16 60 "$ncu_bin" bench --device cuda --size "$SIZE" --dtype bf16 --runs 1
    profile ncu-bf16 "${NCU_LIMIT:-120}" -s "${NCU_SKIP:-3000}" -c "${NCU_KERNELS:-6000}" \
      "$ncu_bin" bench --device cuda --size "$SIZE" --dtype bf16 --runs 1
    unset LAYERDIFF_FUSED
  fi
  cat "$WORK/summary.txt"
}

case "${1:-}" in
  prepare) prepare ;;
  run) run ;;
  quick) quick ;;
  *) echo "usage: scripts/gpu-check.sh prepare|run|quick" >&2; exit 2 ;;
esac
