#!/usr/bin/env python3
"""PyTorch's side of `layerdiff bench --sam`: the official SAM image encoders (segment-anything
1.0) and MobileSAM's TinyViT (ultralytics' port, as tools/make_mobile_sam_fixtures.py loads it),
full size, random weights, f32, batch 1 at 1024x1024, 2 threads; median seconds after a warm-up
and the process's peak RSS, as JSON lines.

    ~/venv-ref/bin/python tools/sam_bench_ref.py [--runs 1] [--models vit_b,vit_l,vit_h,mobile_sam]

`tools/bench_sam.sh` runs both sides and prints the ratios.
"""

import argparse
import json
import resource
import time

import torch
from fullsize_unet_ref import host
from make_mobile_sam_fixtures import MOBILE_SAM, build, load_tiny_encoder
from segment_anything import sam_model_registry

torch.set_num_threads(2)


def encoder(name):
    if name == "mobile_sam":
        tiny_encoder, _, _ = load_tiny_encoder()
        return build(tiny_encoder, MOBILE_SAM, num_classes=1000, layer_lr_decay=0.8)
    return sam_model_registry[name]().image_encoder


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--models", default="vit_b,vit_l,vit_h,mobile_sam")
    args = parser.parse_args()
    for name in args.models.split(","):
        model = encoder(name).eval()
        x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
        model(x)
        times = []
        for _ in range(max(1, args.runs)):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
        times.sort()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"host": host(), "model": name, "embed_s": times[len(times) // 2], "peak_rss_mib_so_far": peak}), flush=True)
        del model


if __name__ == "__main__":
    main()
