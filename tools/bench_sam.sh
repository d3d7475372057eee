#!/usr/bin/env bash
# Segment Anything's image encoders on this CPU, Rust (layerdiff bench --sam) and PyTorch
# (tools/sam_bench_ref.py: segment-anything 1.0, ultralytics' TinyViT) in one go; prints the
# per-model ratio Rust/PyTorch. Random weights, 1024x1024, f32, batch 1.
# usage: tools/bench_sam.sh [PYTHON] [REPEATS]   (PYTHON: a venv with tools/requirements.txt and ultralytics)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-$HOME/venv-ref/bin/python}
REPEATS=${2:-1}
OUT=${OUT:-target/bench}
mkdir -p "$OUT"
cargo build --release -q
for model in mobile-sam vit-b vit-l vit-h; do
  ./target/release/layerdiff bench --cpu --sam $model --runs "$REPEATS" --json "$OUT/sam-rust-$model.json" >/dev/null
done
(cd tools && "$PY" sam_bench_ref.py --runs "$REPEATS") > "$OUT/sam-pytorch.jsonl"
"$PY" - "$OUT" <<'PYEOF'
import json, sys
out = sys.argv[1]
torch = {d["model"]: d for d in map(json.loads, open(f"{out}/sam-pytorch.jsonl"))}
print(f"{'model':<12}{'params':>8}{'rust s':>9}{'torch s':>9}{'ratio':>7}{'rust MiB':>10}{'decode s':>10}")
for model in ["mobile-sam", "vit-b", "vit-l", "vit-h"]:
    r = json.load(open(f"{out}/sam-rust-{model}.json"))
    t = torch[model.replace("-", "_")]["embed_s"]
    print(f"{model:<12}{r['parameters'] / 1e6:>7.0f}M{r['embed_s']:>9.2f}{t:>9.2f}{r['embed_s'] / t:>7.2f}{r['embed_peak_rss_mib']:>10.0f}{r['decode_s']:>10.3f}")
PYEOF
