#!/usr/bin/env python3
"""Full-size CLIP ViT-L/14 and DINOv2-base (random weights, written by the Rust test
`full_size_timing` in tests/eval_metrics.rs) in transformers: load them, embed the same pixels
as the Rust side, compare, and time the same workloads with PyTorch on 2 threads.

    cargo test --release --test eval_metrics -- --ignored --nocapture full_size
    ~/venv-ref/bin/python tools/eval_fullsize_ref.py [/tmp/layerdiff-eval-fullsize]
"""

import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import CLIPModel, CLIPTokenizer, Dinov2Model

torch.set_num_threads(2)
root = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/layerdiff-eval-fullsize")
rust = load_file(root / "rust.safetensors")
text = (root / "text.txt").read_text()

clip, info = CLIPModel.from_pretrained(root / "clip-vit-large-patch14-random", output_loading_info=True)
assert not any(info.values()), info
dino, info = Dinov2Model.from_pretrained(root / "dinov2-base-random", output_loading_info=True)
assert not any(info.values()), info
tok = CLIPTokenizer.from_pretrained(root / "clip-vit-large-patch14-random")
clip.eval(), dino.eval()


def timed(what, runs, f):
    f()
    t = time.perf_counter()
    for _ in range(runs):
        out = f()
    print(f"PyTorch {what}: {(time.perf_counter() - t) / runs:.3f} s")
    return out


with torch.inference_mode():
    cp = rust["clip_pixel_values"][None]
    dp = rust["dino_pixel_values"][None]
    ids = tok(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    img = timed("CLIP ViT-L/14 image embedding, 1 image", 3, lambda: clip.get_image_features(pixel_values=cp).pooler_output)
    txt = timed("CLIP text embedding, 1 text", 3, lambda: clip.get_text_features(input_ids=ids).pooler_output)
    dn = timed("DINOv2-base image embedding, 1 image", 3, lambda: dino(pixel_values=dp).pooler_output)
    for name, ours, theirs in [("image_embeds", rust["image_embeds"], img), ("text_embeds", rust["text_embeds"], txt),
                               ("dino pooler_output", rust["dino_pooler_output"], dn)]:
        err = (ours - theirs).abs().max().item()
        print(f"{name}: max abs error {err:.2e} (max |x| {theirs.abs().max().item():.2f}), cosine {torch.nn.functional.cosine_similarity(ours, theirs).item():.8f}")
