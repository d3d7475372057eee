#!/usr/bin/env bash
# The steps of an edit's three stages, Rust (layerdiff bench --stages) and PyTorch
# (tools/bench_stages_ref.py: diffusers' UNet2DConditionModel, same config, batches, losses and
# optimizer) in one go, one after the other; prints per stage both medians, the ratio Rust/PyTorch
# and both peak memories, then both projected times of a default edit. Random weights, no download.
# usage: tools/bench_stages.sh [PYTHON] [--size N] [--device D] [--dtype T] [--finetune M] [--steps N]
#          [--gradient-checkpointing] [--unet-config PATH]
#   PYTHON: a venv with tools/requirements.txt (default ~/venv-ref/bin/python); the flags go to both
#   sides (defaults: --size 256 --device cpu --dtype f32 --finetune full --steps 3).
#   OUT=DIR keeps the JSON there (default target/bench); BIN=PATH uses that layerdiff binary
#   instead of building one (a `cuda` build, say).
# Full fine-tuning at --size 256 on the CPU peaks at about 12.9 GB (ours; 11.4 GB with
# --gradient-checkpointing) and 15.9 GB (PyTorch's); the two never run together. LoRA: about 5.2
# and 5.7 GB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$HOME/venv-ref/bin/python
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then
  PY=$1
  shift
fi
SIZE=256 DEVICE=cpu DTYPE=f32 FINETUNE=full STEPS=3
TINY=() CKPT=() UNET=()
while [ $# -gt 0 ]; do
  case "$1" in
    --tiny) TINY=(--tiny); shift; continue ;;  # the tiny test UNet: checks this script in seconds
    --gradient-checkpointing) CKPT=(--gradient-checkpointing); shift; continue ;;
    --size) SIZE=$2 ;;
    --device) DEVICE=$2 ;;
    --dtype) DTYPE=$2 ;;
    --finetune) FINETUNE=$2 ;;
    --steps) STEPS=$2 ;;
    --unet-config) UNET=(--unet-config "$2") ;;
    *) echo "usage: tools/bench_stages.sh [PYTHON] [--size N] [--device D] [--dtype T] [--finetune M] [--steps N] [--gradient-checkpointing] [--unet-config PATH]" >&2; exit 2 ;;
  esac
  shift 2
done
OUT=${OUT:-target/bench}
mkdir -p "$OUT"
if [ -z "${BIN:-}" ]; then
  cargo build --release -q
  BIN=target/release/layerdiff
fi
NAME=stages-$DEVICE-$DTYPE-$SIZE-$FINETUNE${CKPT:+-ckpt}${TINY:+-tiny}${UNET:+-custom}
FLAGS=(--size "$SIZE" --device "$DEVICE" --dtype "$DTYPE" --finetune "$FINETUNE" --steps "$STEPS" "${CKPT[@]}" "${TINY[@]}" "${UNET[@]}")
echo "== layerdiff bench --stages ${FLAGS[*]}" >&2
"$BIN" bench --stages "${FLAGS[@]}" --json "$OUT/$NAME-rust.json" >/dev/null
echo "== tools/bench_stages_ref.py ${FLAGS[*]}" >&2
"$PY" tools/bench_stages_ref.py "${FLAGS[@]}" --json "$OUT/$NAME-pytorch.json" >/dev/null
"$PY" - "$OUT/$NAME-rust.json" "$OUT/$NAME-pytorch.json" <<'PYEOF'
import json, sys
rust, torch = (json.load(open(p)) for p in sys.argv[1:3])
mib = lambda v: "-" if v is None else f"{v:.0f}"
mode = ("full" if rust["finetune"] == "full" else f"lora r{rust['lora_rank']}") + \
    (", checkpointed" if rust.get("gradient_checkpointing") else "")
print(f"{rust['unet']} UNet, {rust['size']}x{rust['size']} px, {rust['dtype']}, {rust['device']}, "
      f"median of {rust['steps']} step(s) after a warm-up; ours: {rust['framework']}; PyTorch: {torch['framework']}")
host = lambda r: "?" if not r.get("host") else f"{r['host']['cpu']} ({r['host']['simd']}, {r['host']['threads']} threads)"
print(f"host: ours {host(rust)}; PyTorch {host(torch)}")
print(f"peak memory: ours {rust['memory']}, PyTorch {torch['memory']}")
print(f"{'stage step':<28}{'ours s':>10}{'torch s':>10}{'ratio':>7}{'ours MiB':>10}{'torch MiB':>10}")
names = {1: "1: embeddings", 2: f"2: fine-tune {mode}", 3: "3: guided sampling"}
for n in (1, 2, 3):
    r, t = rust[f"stage{n}_step_s"], torch[f"stage{n}_step_s"]
    print(f"{names[n]:<28}{r:>10.3f}{t:>10.3f}{r / t:>7.2f}"
          f"{mib(rust[f'stage{n}_peak_mib']):>10}{mib(torch[f'stage{n}_peak_mib']):>10}")
r, t = rust["projected_edit_s"], torch["projected_edit_s"]
steps = " + ".join(f"{rust[f'stage{n}_edit_steps']} x stage {n}" for n in (1, 2, 3))
print(f"{'projected edit s':<28}{r:>10.0f}{t:>10.0f}{r / t:>7.2f}   ({steps}; ours {r / 3600:.2f} h, PyTorch {t / 3600:.2f} h)")
PYEOF
