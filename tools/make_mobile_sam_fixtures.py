#!/usr/bin/env python3
"""Generate the MobileSAM TinyViT parity fixtures under tests/fixtures/mobile-sam/.

Run from the repository root (CPU, deterministic, a few seconds):

    ~/venv-ref/bin/pip install torch==2.11.0 safetensors==0.8.0 numpy
    ~/venv-ref/bin/pip install --no-deps ultralytics==8.4.190
    ~/venv-ref/bin/python tools/make_mobile_sam_fixtures.py

The reference is ultralytics' port of MobileSAM's TinyViT
(`ultralytics/models/sam/modules/tiny_encoder.py`, the module ultralytics loads `mobile_sam.pt`
with; same state-dict names as MobileSAM's `tiny_vit_sam.py`). ultralytics is installed without
its dependencies (cv2, yaml, ...), so this script loads that one file by path and stubs the three
names it imports from the rest of ultralytics:

* `ultralytics.nn.modules.LayerNorm2d`: copied verbatim from `ultralytics/nn/modules/transformer.py`;
* `ultralytics.utils.instance.to_2tuple`: `n -> (n, n)` for an int;
* `ultralytics.utils.torch_utils.TORCH_1_11`: `True` (only used for gradient checkpointing).

Outputs:

* `tiny-vit.safetensors`: the reference TinyViT built with `TinyVitConfig::tiny()`'s values
  (`TINY` below), every parameter and BatchNorm running statistic re-drawn from a seeded generator
  so activations are O(1): conv/linear weights `randn / sqrt(fan_in)`, biases `0.1 * randn`,
  norm weights `1 + 0.1 * randn`, BatchNorm `running_mean = 0.1 * randn`,
  `running_var = 0.5 + rand`, `attention_biases = 0.5 * randn`. The whole state dict (including
  the unused classifier `norm_head`/`head` and `num_batches_tracked`, as in a real checkpoint), f32,
  under the `image_encoder.` prefix.
* `parity.safetensors`: `input` [1, 3, 256, 256] (seeded randn rounded to f16 and stored as f16,
  to halve the file; the reference runs on exactly those values) and `output` [1, 32, 16, 16], the
  eval-mode reference run in float64 on the same (f32-rounded) weights, stored as f32. Its
  metadata `config` holds `TINY` as JSON (the Rust test checks it equals `TinyVitConfig::tiny()`).
* `official-shapes.json`: name -> shape of the state dict of MobileSAM's image encoder
  (`MOBILE_SAM`, built exactly as MobileSAM's `build_sam_vit_t`), with the `image_encoder.` prefix.

Two settings of the reference are widened for the tiny config, as MobileSAM hard-codes them for its
own sizes (module types and forward code are untouched):

* the neck is 256 channels wide in the reference; it is rebuilt with `out_chans` channels (the same
  `Conv2d(bias=False), LayerNorm2d, Conv2d(3x3, bias=False), LayerNorm2d`);
* the patch merging into the last stage has stride 1 only when its width is 320, 448 or 576 (the
  TinyViT-5M/11M/21M last stages); the reference's stage resolutions assume that stride for every
  4-stage config, so the tiny config's last merging gets stride 1 too.

The script also checks that the reference's state-dict names equal the ones `tiny_vit.rs` loads
(`expected_keys`, which mirrors `TinyViT::new`).
"""

import importlib.metadata
import importlib.util
import json
import math
import sys
import types
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

torch.set_num_threads(2)
torch.use_deterministic_algorithms(True)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "mobile-sam"
PREFIX = "image_encoder."
ULTRALYTICS = importlib.metadata.version("ultralytics")

# `TinyVitConfig::tiny()` and `TinyVitConfig::mobile_sam()` in src/models/sam/tiny_vit.rs.
TINY = {
    "img_size": 256,
    "in_chans": 3,
    "embed_dims": [8, 16, 16, 32],
    "depths": [1, 1, 2, 1],
    "num_heads": [2, 2, 2, 4],
    "window_sizes": [7, 3, 5, 16],
    "mlp_ratio": 4.0,
    "mbconv_expand_ratio": 4.0,
    "out_chans": 32,
    "local_conv_size": 3,
}
MOBILE_SAM = {
    "img_size": 1024,
    "in_chans": 3,
    "embed_dims": [64, 128, 160, 320],
    "depths": [2, 2, 6, 2],
    "num_heads": [2, 4, 5, 10],
    "window_sizes": [7, 7, 14, 7],
    "mlp_ratio": 4.0,
    "mbconv_expand_ratio": 4.0,
    "out_chans": 256,
    "local_conv_size": 3,
}


def load_tiny_encoder():
    """Imports ultralytics' tiny_encoder.py by path, with stubs for what it imports (see above)."""
    spec = importlib.util.find_spec("ultralytics")
    path = Path(spec.submodule_search_locations[0]) / "models" / "sam" / "modules" / "tiny_encoder.py"

    class LayerNorm2d(nn.Module):
        # Verbatim from ultralytics/nn/modules/transformer.py (8.4.190).
        def __init__(self, num_channels: int, eps: float = 1e-6):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(num_channels))
            self.bias = nn.Parameter(torch.zeros(num_channels))
            self.eps = eps

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps).permute(
                0, 3, 1, 2
            )

    stubs = {
        "ultralytics": {},
        "ultralytics.nn": {},
        "ultralytics.nn.modules": {"LayerNorm2d": LayerNorm2d},
        "ultralytics.utils": {},
        "ultralytics.utils.instance": {"to_2tuple": lambda n: n if isinstance(n, tuple) else (n, n)},
        "ultralytics.utils.torch_utils": {"TORCH_1_11": True},
    }
    for name, attrs in stubs.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        sys.modules[name] = module
    spec = importlib.util.spec_from_file_location("tiny_encoder", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, LayerNorm2d, path


def build(tiny_encoder, cfg, num_classes, layer_lr_decay):
    return tiny_encoder.TinyViT(
        img_size=cfg["img_size"],
        in_chans=cfg["in_chans"],
        num_classes=num_classes,
        embed_dims=cfg["embed_dims"],
        depths=cfg["depths"],
        num_heads=cfg["num_heads"],
        window_sizes=cfg["window_sizes"],
        mlp_ratio=cfg["mlp_ratio"],
        drop_rate=0.0,
        drop_path_rate=0.0,
        use_checkpoint=False,
        mbconv_expand_ratio=cfg["mbconv_expand_ratio"],
        local_conv_size=cfg["local_conv_size"],
        layer_lr_decay=layer_lr_decay,
    )


def expected_keys(cfg):
    """The names `TinyViT::new` in src/models/sam/tiny_vit.rs loads, without the prefix."""
    conv_bn = lambda p: [f"{p}.c.weight"] + [f"{p}.bn.{n}" for n in ("weight", "bias", "running_mean", "running_var")]
    keys = conv_bn("patch_embed.seq.0") + conv_bn("patch_embed.seq.2")
    for i, depth in enumerate(cfg["depths"]):
        for j in range(depth):
            b = f"layers.{i}.blocks.{j}"
            if i == 0:
                keys += conv_bn(f"{b}.conv1") + conv_bn(f"{b}.conv2") + conv_bn(f"{b}.conv3")
            else:
                keys.append(f"{b}.attn.attention_biases")
                for lin in ("attn.norm", "attn.qkv", "attn.proj", "mlp.norm", "mlp.fc1", "mlp.fc2"):
                    keys += [f"{b}.{lin}.weight", f"{b}.{lin}.bias"]
                keys += conv_bn(f"{b}.local_conv")
        if i + 1 < len(cfg["depths"]):
            d = f"layers.{i}.downsample"
            keys += conv_bn(f"{d}.conv1") + conv_bn(f"{d}.conv2") + conv_bn(f"{d}.conv3")
    keys += ["neck.0.weight", "neck.1.weight", "neck.1.bias", "neck.2.weight", "neck.3.weight", "neck.3.bias"]
    return keys


def check_keys(model, cfg):
    ours = set(expected_keys(cfg))
    theirs = {
        k
        for k in model.state_dict()
        if not k.endswith("num_batches_tracked") and not k.startswith(("norm_head.", "head."))
    }
    assert ours == theirs, f"names differ: only ours {sorted(ours - theirs)}, only reference {sorted(theirs - ours)}"


@torch.no_grad()
def randomize(model, generator):
    """Seeded weights with O(1) activations (see the module docstring)."""
    randn = lambda shape: torch.randn(shape, generator=generator)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            fan_in = module.weight[0].numel()
            module.weight.copy_(randn(module.weight.shape) / math.sqrt(fan_in))
            if module.bias is not None:
                module.bias.copy_(0.1 * randn(module.bias.shape))
        elif isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)) or type(module).__name__ == "LayerNorm2d":
            module.weight.copy_(1 + 0.1 * randn(module.weight.shape))
            module.bias.copy_(0.1 * randn(module.bias.shape))
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(0.1 * randn(module.running_mean.shape))
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=generator))
        elif hasattr(module, "attention_biases"):
            module.attention_biases.copy_(0.5 * randn(module.attention_biases.shape))


def make_tiny(tiny_encoder, LayerNorm2d):
    cfg = TINY
    model = build(tiny_encoder, cfg, num_classes=8, layer_lr_decay=1.0)
    # Widen the two settings MobileSAM hard-codes for its own sizes (module docstring).
    c, out = cfg["embed_dims"][-1], cfg["out_chans"]
    model.neck = nn.Sequential(
        nn.Conv2d(c, out, kernel_size=1, bias=False),
        LayerNorm2d(out),
        nn.Conv2d(out, out, kernel_size=3, padding=1, bias=False),
        LayerNorm2d(out),
    )
    last_merge = model.layers[-2].downsample.conv2.c
    assert last_merge.stride == (2, 2)
    last_merge.stride = (1, 1)
    check_keys(model, cfg)

    randomize(model, torch.Generator().manual_seed(0))
    model.eval()  # BatchNorm on running statistics, attention biases gathered into `ab`
    x = torch.randn(1, cfg["in_chans"], cfg["img_size"], cfg["img_size"], generator=torch.Generator().manual_seed(1))
    x = x.half().float()

    # Report activation scales, to see they stay O(1).
    scales = []
    hooks = [
        m.register_forward_hook(lambda m, i, o, n=n: scales.append((n, o.std().item())))
        for n, m in [("patch_embed", model.patch_embed), *[(f"layers.{i}", l) for i, l in enumerate(model.layers)]]
    ]
    with torch.no_grad():
        y32 = model(x)
    for h in hooks:
        h.remove()
    print("activation std:", ", ".join(f"{n} {s:.2f}" for n, s in scales))

    state = {PREFIX + k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model64 = model.double()
        for m in model64.modules():  # re-gather the cached biases in float64
            if hasattr(m, "attention_biases"):
                m.train(False)
        y = model64(x.double()).float()
    print(f"output {tuple(y.shape)}, std {y.std().item():.3f}; torch f32 vs f64: {(y32 - y).abs().max().item():.2e}")
    assert y.shape == (1, cfg["out_chans"], cfg["img_size"] // 16, cfg["img_size"] // 16)

    save_file(state, OUT / "tiny-vit.safetensors")
    save_file(
        {"input": x.half().contiguous(), "output": y.contiguous()},
        OUT / "parity.safetensors",
        # One key: safetensors writes the metadata map in hash order, so two keys are not byte-stable.
        metadata={"config": json.dumps(cfg)},
    )


def make_official_shapes(tiny_encoder):
    # MobileSAM's build_sam_vit_t: num_classes 1000, drop_path_rate 0.0, layer_lr_decay 0.8.
    cfg = MOBILE_SAM
    model = build(tiny_encoder, cfg, num_classes=1000, layer_lr_decay=0.8)
    check_keys(model, cfg)
    entries = [f'"{PREFIX}{k}":{json.dumps(list(v.shape))}' for k, v in model.state_dict().items()]
    (OUT / "official-shapes.json").write_text("{\n" + ",\n".join(entries) + "\n}\n")
    print(f"official-shapes.json: {len(entries)} tensors")


def main():
    tiny_encoder, LayerNorm2d, path = load_tiny_encoder()
    print(f"reference: ultralytics {ULTRALYTICS}, {path}")
    OUT.mkdir(parents=True, exist_ok=True)
    make_tiny(tiny_encoder, LayerNorm2d)
    make_official_shapes(tiny_encoder)


if __name__ == "__main__":
    main()
