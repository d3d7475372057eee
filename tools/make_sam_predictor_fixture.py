#!/usr/bin/env python3
"""Generate tests/fixtures/sam/predictor.safetensors: the official `SamPredictor` from photo to
mask logits at the photo's size, checked by tests/segment.rs against `layerdiff::segment`.

Run from the repository root after tools/make_sam_fixtures.py (it reuses its tiny model):

    ~/venv-ref/bin/python tools/make_sam_predictor_fixture.py

Where tools/make_sam_fixtures.py starts from an already resized, preprocessed input, this covers
what a user's photo goes through: `ResizeLongestSide` (PIL bilinear), prompt coordinates mapped
from the photo's pixels into the model's frame, and `postprocess_masks` (bilinear upsampling to
the input, padding cropped, bilinear resize to the photo). For each case: the photo (u8, HWC),
the prompt in the photo's pixels, and the logits and IoU of the candidate with the highest
predicted IoU (what `Segmenter::mask_logits` returns). The metadata "cases" lists them as JSON.
"""

import json
from pathlib import Path

import numpy as np
import torch
from make_sam_fixtures import OUT, TINY, build_sam
from safetensors.torch import load_file, save_file
from segment_anything import SamPredictor

torch.set_num_threads(2)


def main():
    sam = build_sam(TINY)
    sam.load_state_dict(load_file(OUT / "tiny-sam.safetensors"))
    predictor = SamPredictor(sam)
    rng = np.random.default_rng(0)
    # (name, photo width, height, points [(x, y, label)], box, multimask). 256x192 needs no resize
    # (the model's side is 256); 160x120 is enlarged and 320x240 shrunk by ResizeLongestSide.
    cases = [
        ("exact_point", 256, 192, [(100.3, 57.8, 1)], None, True),
        ("exact_box_points", 256, 192, [(120.0, 90.0, 1), (60.2, 40.9, 0)], [40.5, 30.0, 200.25, 150.75], False),
        ("enlarged_points", 160, 120, [(70.0, 40.0, 1), (150.0, 110.0, 0)], None, False),
        ("shrunk_box", 320, 240, [], [50.0, 40.0, 290.0, 220.0], False),
    ]
    out, listing = {}, []
    for name, w, h, points, box, multimask in cases:
        # A smooth picture, so that resampling differences stay small.
        yy, xx = np.mgrid[0:h, 0:w]
        photo = np.stack([128 + 100 * np.sin(xx / 17.0 + c) * np.cos(yy / 23.0 - c) for c in range(3)], axis=-1)
        photo = np.clip(photo + rng.normal(0, 3, photo.shape), 0, 255).astype(np.uint8)
        predictor.set_image(photo)
        kwargs = {"multimask_output": multimask, "return_logits": True}
        if points:
            kwargs["point_coords"] = np.array([[x, y] for x, y, _ in points], dtype=np.float32)
            kwargs["point_labels"] = np.array([l for _, _, l in points], dtype=np.float32)
        if box is not None:
            kwargs["box"] = np.array(box, dtype=np.float32)
        logits, iou, _ = predictor.predict(**kwargs)
        best = int(np.argmax(iou))
        out[f"{name}.photo"] = torch.from_numpy(photo)
        out[f"{name}.logits"] = torch.from_numpy(logits[best].astype(np.float32))
        out[f"{name}.iou"] = torch.tensor([float(iou[best])])
        listing.append({"name": name, "points": points, "box": box, "multimask": multimask})
        print(f"{name:18} {w}x{h} best {best} iou {iou[best]:.4f} max|logit| {np.abs(logits[best]).max():.2f}")
    save_file({k: v.contiguous() for k, v in out.items()}, OUT / "predictor.safetensors", metadata={"cases": json.dumps(listing)})


if __name__ == "__main__":
    main()
