#!/usr/bin/env bash
# Full-size SD v1.4 UNet on this CPU, Rust (layerdiff bench) and PyTorch (tools/fullsize_unet_ref.py)
# in one go, same shapes, same loss; prints the per-measure ratio Rust/PyTorch.
# usage: tools/bench_cpu.sh [PYTHON] [REPEATS]   (PYTHON: a venv with tools/requirements.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-$HOME/venv-ref/bin/python}
REPEATS=${2:-1}
OUT=${OUT:-target/bench}
mkdir -p "$OUT"
cargo build --release -q
for size in 256 512; do
  ./target/release/layerdiff bench --cpu --size $size --runs "$REPEATS" --json "$OUT/rust-$((size / 8)).json" >/dev/null
done
"$PY" tools/fullsize_unet_ref.py --bench --no-save --repeats "$REPEATS" --sizes 32,64 > "$OUT/pytorch.json"
"$PY" - "$OUT" <<'PYEOF'
import json, sys
out = sys.argv[1]
torch = json.load(open(f"{out}/pytorch.json"))
ours = json.load(open(f"{out}/rust-32.json"))["host"]
print(f"host: ours {ours['cpu']} ({ours['simd']}, {ours['threads']} threads); PyTorch {torch['host']['simd']}, {torch['host']['threads']} threads")
print(f"{'measure':<34}{'rust s':>9}{'torch s':>9}{'ratio':>7}{'rust MiB':>10}{'torch MiB':>10}")
for hw in (32, 64):
    rust = json.load(open(f"{out}/rust-{hw}.json"))
    for name, key, rkey in [("forward", "forward", "forward"), ("forward+backward(context)", "forward_backward_context", "forward_backward")]:
        t = torch[f"{key}_{hw}x{hw}"]
        rs = rust[f"{rkey}_s" if rkey == "forward" else "forward_backward_context_s"]
        rm = rust[f"{rkey}_peak_rss_mib"]
        print(f"{name + f' {hw}x{hw}':<34}{rs:>9.2f}{t['median_s']:>9.2f}{rs / t['median_s']:>7.2f}{rm:>10.0f}{t['peak_rss_mb']:>10.0f}")
PYEOF
