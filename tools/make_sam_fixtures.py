#!/usr/bin/env python3
"""Generate the SAM parity fixtures under tests/fixtures/sam/ (checked by tests/sam_parity.rs).

Run from the repository root (CPU only, deterministic, a few seconds):

    ~/venv-ref/bin/pip install -r tools/requirements.txt   # pins segment-anything==1.0, torchvision==0.26.0
    ~/venv-ref/bin/python tools/make_sam_fixtures.py

segment-anything 1.0 is the official package (facebookresearch/segment-anything, code only, no
weights); torchvision is only needed because its package imports it. Deterministic: two runs give
byte-identical files. What it writes (tests/fixtures/sam/README.md lists every tensor):

1. tiny-sam.safetensors: the official `Sam` built from its modeling classes with the values of
   `SamConfig::tiny_vit()` (TINY below), every parameter and buffer re-drawn from a seeded
   generator so that activations stay O(1) and nothing is trivially 0 or 1 (weights
   randn / sqrt(fan_in), biases 0.1 randn, norm weights 1 + 0.1 randn, embeddings and relative
   position tables randn). Official state-dict names; the config is stored as JSON in the
   metadata under "sam_config", in serde's format of `SamConfig`.
2. parity.safetensors: a seeded random 192x256 u8 image (already "resized": longer side 256, so the
   bottom is padded), `Sam.preprocess` of it, the image embeddings, and for each prompt case its
   inputs and `SamPredictor.predict_torch`'s low-res logits and IoU predictions. The metadata
   "cases" lists the cases as JSON: name, multimask, which prompts are given.
3. official-shapes.json: {name: shape} of `sam_model_registry[k]()` for vit_b, vit_l, vit_h (built
   on the meta device, no weights), to check `SamConfig::from_checkpoint` against the real layouts.
"""

import json
from functools import partial
from pathlib import Path

import segment_anything
import torch
from safetensors.torch import save_file
from segment_anything import SamPredictor, sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.modeling.common import LayerNorm2d

torch.set_num_threads(2)
torch.use_deterministic_algorithms(True)

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "sam"

# SamConfig::tiny_vit(), in serde's format (src/models/sam/mod.rs).
TINY = {
    "image_size": 256,
    "encoder": {
        "kind": "vit",
        "embed_dim": 32,
        "depth": 2,
        "num_heads": 2,
        "global_attn_indexes": [1],
        "window_size": 5,
        "patch_size": 16,
        "mlp_ratio": 4.0,
        "out_chans": 32,
    },
    "prompt_embed_dim": 32,
    "mask_in_chans": 8,
    "decoder_depth": 2,
    "decoder_heads": 4,
    "decoder_mlp_dim": 64,
    "num_multimask_outputs": 3,
    "iou_head_depth": 3,
    "iou_head_hidden_dim": 32,
}


def build_sam(cfg):
    """segment_anything.build_sam._build_sam with every size taken from `cfg`."""
    enc = cfg["encoder"]
    embedding_size = cfg["image_size"] // enc["patch_size"]
    dim = cfg["prompt_embed_dim"]
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=enc["depth"],
            embed_dim=enc["embed_dim"],
            img_size=cfg["image_size"],
            mlp_ratio=enc["mlp_ratio"],
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=enc["num_heads"],
            patch_size=enc["patch_size"],
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=enc["global_attn_indexes"],
            window_size=enc["window_size"],
            out_chans=enc["out_chans"],
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(embedding_size, embedding_size),
            input_image_size=(cfg["image_size"], cfg["image_size"]),
            mask_in_chans=cfg["mask_in_chans"],
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=cfg["num_multimask_outputs"],
            transformer=TwoWayTransformer(
                depth=cfg["decoder_depth"],
                embedding_dim=dim,
                mlp_dim=cfg["decoder_mlp_dim"],
                num_heads=cfg["decoder_heads"],
            ),
            transformer_dim=dim,
            iou_head_depth=cfg["iou_head_depth"],
            iou_head_hidden_dim=cfg["iou_head_hidden_dim"],
        ),
    ).eval()


@torch.no_grad()
def randomize(model, gen):
    """Re-draws every parameter and buffer of the state dict (see the module doc)."""
    modules = dict(model.named_modules())
    for name, t in model.state_dict().items():
        owner, leaf = name.rsplit(".", 1)
        module = modules[owner]
        randn = torch.randn(t.shape, generator=gen, dtype=torch.float32)
        if leaf == "bias":
            value = 0.1 * randn
        elif isinstance(module, (torch.nn.LayerNorm, LayerNorm2d)):
            value = 1 + 0.1 * randn
        elif isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            value = randn / (t[0].numel() ** 0.5)  # [out, in, ...]: fan_in = in * k * k
        elif isinstance(module, torch.nn.ConvTranspose2d):
            value = randn / (t.shape[0] ** 0.5)  # [in, out, k, k] with k == stride: each output sees `in` values
        else:
            # Embeddings, pos_embed, rel_pos_h/w, the Gaussian matrix of the positional encoding.
            value = randn
        t.copy_(value)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    sam = build_sam(TINY)
    randomize(sam, gen)
    weights = {k: v.contiguous() for k, v in sam.state_dict().items()}
    save_file(weights, OUT / "tiny-sam.safetensors", metadata={"sam_config": json.dumps(TINY)})

    # 1. image: 192x256 RGB (u8), as after ResizeLongestSide(256)
    image = torch.randint(0, 256, (3, 192, 256), generator=gen, dtype=torch.uint8)
    predictor = SamPredictor(sam)
    predictor.set_torch_image(image[None].float(), original_image_size=(192, 256))
    out = {
        "image": image,
        "input": sam.preprocess(image.float())[None],
        "image_embeddings": predictor.get_image_embedding(),
    }

    # 2. prompt cases, in the 192x256 input frame
    def pts(*xyl):
        coords = torch.tensor([[[x, y] for x, y, _ in p] for p in xyl], dtype=torch.float32)
        labels = torch.tensor([[l for _, _, l in p] for p in xyl], dtype=torch.float32)
        return coords, labels

    box = torch.tensor([[40.5, 30.0, 200.25, 150.75]])
    cases = [
        ("point_multi", True, pts([(100.3, 57.8, 1)]), None, None),
        ("point_single", False, pts([(100.3, 57.8, 1)]), None, None),
        ("points3_single", False, pts([(100.3, 57.8, 1), (180.0, 120.5, 1), (20.7, 170.2, 0)]), None, None),
        ("points3_multi", True, pts([(100.3, 57.8, 1), (180.0, 120.5, 1), (20.7, 170.2, 0)]), None, None),
        ("box_single", False, None, box, None),
        ("box_multi", True, None, box, None),
        ("box_points_single", False, pts([(120.0, 90.0, 1), (60.2, 40.9, 0)]), box, None),
        ("box_points_multi", True, pts([(120.0, 90.0, 1), (60.2, 40.9, 0)]), box, None),
        ("mask_points_single", False, pts([(100.3, 57.8, 1), (20.7, 170.2, 0)]), None, "point_single"),
        ("mask_only_multi", True, None, None, "point_single"),
        ("none_multi", True, None, None, None),
        (
            "batch2_multi",
            True,
            pts([(100.3, 57.8, 1), (12.0, 8.0, -1)], [(30.1, 150.6, 1), (250.9, 5.5, 0)]),
            torch.tensor([[40.5, 30.0, 200.25, 150.75], [0.0, 100.0, 255.0, 191.0]]),
            None,
        ),
    ]
    listing = []
    for name, multimask, points, boxes, mask_from in cases:
        coords, labels = points if points is not None else (None, None)
        mask_input = out[f"{mask_from}.low_res"] if mask_from is not None else None
        _, iou, low_res = predictor.predict_torch(coords, labels, boxes, mask_input, multimask_output=multimask)
        for key, value in [("coords", coords), ("labels", labels), ("boxes", boxes), ("mask_input", mask_input)]:
            if value is not None:
                out[f"{name}.{key}"] = value
        out[f"{name}.low_res"] = low_res
        out[f"{name}.iou"] = iou
        listing.append(
            {
                "name": name,
                "multimask": multimask,
                "points": points is not None,
                "boxes": boxes is not None,
                "mask_input": mask_from is not None,
            }
        )
    out = {k: v.detach().clone().contiguous() for k, v in out.items()}
    save_file(out, OUT / "parity.safetensors", metadata={"cases": json.dumps(listing)})

    # 3. the released models' state-dict shapes
    shapes = {}
    with torch.device("meta"):
        for kind in ["vit_b", "vit_l", "vit_h"]:
            model = sam_model_registry[kind]()
            shapes[kind] = {k: list(v.shape) for k, v in model.state_dict().items()}
    with open(OUT / "official-shapes.json", "w") as f:
        json.dump(shapes, f, separators=(",", ":"))
        f.write("\n")

    print(f"segment-anything {getattr(segment_anything, '__version__', '1.0')}, torch {torch.__version__}")
    for name, t in out.items():
        print(f"{name:32} {list(t.shape)} max|x| {t.abs().max().item():.3f}")


if __name__ == "__main__":
    main()
