#!/usr/bin/env python3
"""Generate the metric-model parity fixtures (checked by tests/eval_parity.rs).

Run from the repository root (CPU only, deterministic, a few seconds):

    ~/venv-ref/bin/pip install -r tools/requirements.txt   # transformers 5.23.0, torch 2.11.0, torchvision 0.26.0, pillow
    ~/venv-ref/bin/python tools/make_eval_fixtures.py

Writes (tests/fixtures/eval/README.md says more):

1. tests/fixtures/clip-tiny/: a tiny transformers `CLIPModel` (config.json, model.safetensors,
   preprocessor_config.json), every parameter re-drawn from a seeded generator (weights
   randn / sqrt(fan_in), biases 0.1 randn, norm weights 1 + 0.1 randn, embeddings randn), saved by
   `save_pretrained`. No tokenizer: its vocabulary has 512 ids, the tests feed ids directly.
2. tests/fixtures/dinov2-tiny/ and dinov2-swiglu-tiny/: tiny `Dinov2Model`s likewise (the second
   with the SwiGLU feed-forward of dinov2-giant), with a `BitImageProcessor` config.
3. tests/fixtures/eval/parity.safetensors: inputs and expected outputs, f32:
   - `clip.pixel_values` [3, 3, 32, 32] (seeded normal) -> `clip.image_embeds` (vision
     `quick_gelu`, as saved) and `clip.image_embeds_gelu` (the same weights with vision
     `hidden_act="gelu"`);
   - `clip.input_ids` [4, 77] (i64) -> `clip.text_embeds` (config `eos_token_id` = 300: the first
     300 is pooled) and `clip.text_embeds_argmax` (the same weights with `eos_token_id = 2`:
     transformers' legacy rule, the highest id is pooled); rows 1 and 3 tell the rules apart;
   - `dino.{case}.pixel_values` and `dino.{case}.pooler_output` for inputs of 56x56 (the trained
     7x7 grid: no interpolation), 32x32 (4x4), 40x72 (5x9: non-square, down and up) and 44x60
     (not a multiple of the patch: 5x7); `dino.native.last_hidden_state`, `dino.wide.last_hidden_state`;
     `swiglu.{case}...` the same for the SwiGLU model (cases native, wide);
   - for each photo of PHOTOS (read from ../shared/data/tedbench/originals, not copied), the tiny
     processors' `photo.{name}.clip_tiny.pixel_values` / `.dino_tiny.pixel_values` (torchvision
     backend, transformers 5's default) and the tiny models' embeddings of them.
   - `resize.src` [61, 97, 3] u8 seeded noise and `resize.{filter}.{w}x{h}` its Pillow
     `Image.resize` for the cases of RESIZES.
4. tests/fixtures/eval/preprocess/{name}.{clip,dino}.png: the full-size processors' output
   (CLIPImageProcessor defaults = openai/clip-vit-*'s; BitImageProcessor with
   facebook/dinov2-*'s settings) as 8-bit levels, from the PIL backend (`*ImageProcessorPil`);
   `preprocess.json`: for each, the positions and signs where the torchvision backend
   (`CLIPImageProcessor`, the default) differs from it (by 1 level), and checks that
   pixel_values == (level / 255 - mean) / std for both backends.
"""

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import BitImageProcessor, CLIPConfig, CLIPImageProcessor, CLIPModel, Dinov2Config, Dinov2Model
from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

torch.set_num_threads(2)
torch.use_deterministic_algorithms(True)

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
PHOTOS_DIR = ROOT.parent / "shared" / "data" / "tedbench" / "originals"
# Non-square JPEG (downscale), small JPEG (DINOv2 resizes 300 -> 256), RGBA PNG (DINOv2: no resize).
PHOTOS = ["tennis_ball.jpeg", "milk_cookie.jpeg", "dog2_standing.png"]

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
DINO_PROC = dict(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, resample=3,
                 image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, do_center_crop=True)
DINO_TINY_PROC = dict(DINO_PROC, size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32})
# (filter, (width, height)) of the resize cases: down, up, one axis only, every filter.
RESIZES = [("bicubic", (40, 30)), ("bicubic", (150, 120)), ("bicubic", (97, 30)), ("bicubic", (30, 61)),
           ("lanczos", (50, 50)), ("bilinear", (50, 50)), ("box", (33, 20)), ("hamming", (45, 70))]
CLIP_TINY_PROC = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def redraw(model, seed):
    """Every parameter from a seeded generator, so that activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            n = torch.randn(p.shape, generator=g)
            if name.endswith("logit_scale"):
                p.copy_(torch.tensor(2.6592))
            elif p.ndim == 1 and (name.endswith("weight") or name.endswith("lambda1")):
                p.copy_(1 + 0.1 * n)
            elif p.ndim == 1:
                p.copy_(0.1 * n)
            elif "embedding" in name or "token" in name:
                p.copy_(n)
            else:
                p.copy_(n / math.sqrt(p[0].numel()))


def clip_model():
    config = CLIPConfig(
        text_config=dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                         bos_token_id=1, eos_token_id=300, pad_token_id=300, projection_dim=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, hidden_act="quick_gelu", projection_dim=16),
        projection_dim=16,
    )
    model = CLIPModel(config).eval()
    redraw(model, 1)
    return model


def dino_model(seed, swiglu=False):
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=4,
                          image_size=56, patch_size=8, use_swiglu_ffn=swiglu)
    model = Dinov2Model(config).eval()
    redraw(model, seed)
    return model


def ids_rows():
    g = torch.Generator().manual_seed(5)
    rows = torch.full((4, 77), 300, dtype=torch.int64)
    rows[0, :3] = torch.tensor([1, 10, 45])  # eos at 3; 300 is also the highest id
    rows[1, :6] = torch.tensor([1, 5, 400, 7, 9, 300])  # argmax -> 2, first eos -> 5
    rows[1, 6:] = 0
    rows[2, :76] = torch.randint(2, 300, (76,), generator=g)  # a full row, eos last
    rows[2, 0] = 1
    rows[3, :5] = torch.tensor([1, 3, 300, 511, 12])  # first eos -> 2, argmax -> 3
    rows[3, 5:] = 7
    return rows


def levels(pixel_values, mean, std):
    """The 8-bit levels behind normalized pixel values, checked to be exact."""
    mean = np.array(mean, dtype=np.float64)[:, None, None]
    std = np.array(std, dtype=np.float64)[:, None, None]
    v = (pixel_values.astype(np.float64) * std + mean) * 255
    lv = np.round(v)
    assert np.abs(v - lv).max() < 1e-3, np.abs(v - lv).max()
    assert lv.min() >= 0 and lv.max() <= 255
    return lv.astype(np.uint8)


def main():
    out = {}
    # 1. CLIP
    clip = clip_model()
    clip_dir = FIX / "clip-tiny"
    clip.save_pretrained(clip_dir)
    CLIPImageProcessor(**CLIP_TINY_PROC).save_pretrained(clip_dir)
    g = torch.Generator().manual_seed(2)
    pixel_values = torch.randn((3, 3, 32, 32), generator=g)
    ids = ids_rows()
    with torch.no_grad():
        out["clip.pixel_values"] = pixel_values
        out["clip.image_embeds"] = clip.get_image_features(pixel_values=pixel_values).pooler_output
        out["clip.input_ids"] = ids
        out["clip.text_embeds"] = clip.get_text_features(input_ids=ids).pooler_output
        clip.text_model.eos_token_id = 2
        out["clip.text_embeds_argmax"] = clip.get_text_features(input_ids=ids).pooler_output
        clip.text_model.eos_token_id = 300
        gelu_config = clip.config.to_dict()
        gelu_config["vision_config"]["hidden_act"] = "gelu"
        clip_gelu = CLIPModel(CLIPConfig(**{k: v for k, v in gelu_config.items() if k in ("text_config", "vision_config", "projection_dim")})).eval()
        clip_gelu.load_state_dict(clip.state_dict())
        out["clip.image_embeds_gelu"] = clip_gelu.get_image_features(pixel_values=pixel_values).pooler_output
    assert not torch.allclose(out["clip.text_embeds"][1], out["clip.text_embeds_argmax"][1])
    assert torch.allclose(out["clip.text_embeds"][0], out["clip.text_embeds_argmax"][0])

    # 2. DINOv2
    cases = {"native": (56, 56), "small": (32, 32), "wide": (40, 72), "odd": (44, 60)}
    for prefix, seed, swiglu, folder, names in [
        ("dino", 3, False, "dinov2-tiny", list(cases)),
        ("swiglu", 4, True, "dinov2-swiglu-tiny", ["native", "wide"]),
    ]:
        model = dino_model(seed, swiglu)
        model.save_pretrained(FIX / folder)
        BitImageProcessor(**DINO_TINY_PROC).save_pretrained(FIX / folder)
        g = torch.Generator().manual_seed(seed + 10)
        for case in names:
            h, w = cases[case]
            x = torch.randn((2 if case == "native" else 1, 3, h, w), generator=g)
            with torch.no_grad():
                o = model(pixel_values=x)
            out[f"{prefix}.{case}.pixel_values"] = x
            out[f"{prefix}.{case}.pooler_output"] = o.pooler_output
            assert torch.equal(o.pooler_output, o.last_hidden_state[:, 0])
            if case in ("native", "wide"):
                out[f"{prefix}.{case}.last_hidden_state"] = o.last_hidden_state

    # 3. photos through the tiny processors and models (torchvision backend, the default)
    dino = dino_model(3)
    clip_tiny_proc = CLIPImageProcessor(**CLIP_TINY_PROC)
    dino_tiny_proc = BitImageProcessor(**DINO_TINY_PROC)
    for name in PHOTOS:
        img = Image.open(PHOTOS_DIR / name)
        key = name.replace(".", "_")
        cp = clip_tiny_proc(img, return_tensors="pt").pixel_values
        dp = dino_tiny_proc(img, return_tensors="pt").pixel_values
        with torch.no_grad():
            out[f"photo.{key}.clip_tiny.pixel_values"] = cp
            out[f"photo.{key}.clip_tiny.image_embeds"] = clip.get_image_features(pixel_values=cp).pooler_output
            out[f"photo.{key}.dino_tiny.pixel_values"] = dp
            out[f"photo.{key}.dino_tiny.pooler_output"] = dino(pixel_values=dp).pooler_output

    # 4. Pillow's resize on a seeded noise image (the worst case for the 8-bit intermediate)
    g = torch.Generator().manual_seed(6)
    src = torch.randint(0, 256, (61, 97, 3), generator=g, dtype=torch.uint8)
    out["resize.src"] = src
    src_img = Image.fromarray(src.numpy())
    for filt, (w, h) in RESIZES:
        res = src_img.resize((w, h), resample=getattr(Image.Resampling, filt.upper()))
        out[f"resize.{filt}.{w}x{h}"] = torch.from_numpy(np.array(res))

    out = {k: v.contiguous().clone() for k, v in out.items()}
    (FIX / "eval").mkdir(parents=True, exist_ok=True)
    save_file(out, FIX / "eval" / "parity.safetensors", metadata={"photos": json.dumps(PHOTOS)})

    # 5. the full-size processors on the photos
    procs = {
        "clip": (CLIPImageProcessorPil(), CLIPImageProcessor()),
        "dino": (BitImageProcessorPil(**DINO_PROC), BitImageProcessor(**DINO_PROC)),
    }
    (FIX / "eval" / "preprocess").mkdir(exist_ok=True)
    report = {"photos_dir": "../shared/data/tedbench/originals", "cases": []}
    for name in PHOTOS:
        img = Image.open(PHOTOS_DIR / name)
        for kind, (pil, tv) in procs.items():
            lp = levels(pil(img, return_tensors="np").pixel_values[0], pil.image_mean, pil.image_std)
            lt = levels(tv(img, return_tensors="pt").pixel_values[0].numpy(), tv.image_mean, tv.image_std)
            diff = lt.astype(np.int16) - lp.astype(np.int16)
            assert np.abs(diff).max() <= 1
            png = f"preprocess/{name.rsplit('.', 1)[0]}.{kind}.png"
            Image.fromarray(np.ascontiguousarray(lp.transpose(1, 2, 0))).save(FIX / "eval" / png, optimize=True)
            idx = np.flatnonzero(diff)
            report["cases"].append({
                "photo": name, "processor": kind, "pil_levels": png,
                "shape": list(lp.shape), "image_mean": list(pil.image_mean), "image_std": list(pil.image_std),
                "torchvision_minus_pil": {"index": idx.tolist(), "delta": diff.ravel()[idx].tolist()},
            })
    (FIX / "eval" / "preprocess.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
