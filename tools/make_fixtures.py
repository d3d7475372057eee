#!/usr/bin/env python3
"""Generate the small, committed parity fixtures under tests/fixtures/.

Run from the repository root (CPU only, deterministic, ~1-2 minutes on 2 cores):

    python3 -m venv ~/venv-ref
    ~/venv-ref/bin/pip install -r tools/requirements.txt
    ~/venv-ref/bin/python tools/make_fixtures.py

What it does (see tests/fixtures/README.md for the full file/tensor listing):

1. Builds a tiny Stable Diffusion v1 pipeline in diffusers (UNet 32/64/64, VAE 16/32/32/32 with
   the real 8x downsampling, a 2-layer hidden-32 CLIP text encoder with the real 49408 vocab, the
   real SD v1 CLIP tokenizer and the SD v1 DDIM scheduler config), re-initialises EVERY parameter
   with seeded random values (no parameter is trivially 0 or 1), and saves it in the exact
   diffusers layout to tests/fixtures/tiny-sd/ (f32 safetensors).  A text-encoder variant with
   hidden_act "gelu" (same weights) goes to tests/fixtures/tiny-text-gelu/.
2. Writes reference inputs/outputs: text.safetensors (+prompts.json), unet.safetensors,
   vae.safetensors, grads.safetensors (float64 UNet gradients), pipeline.safetensors
   (+pipeline.json, pipeline.png), img2img (inside pipeline.safetensors, + img2img-input.png),
   ddim.safetensors (+ddim.json).

Everything is seeded; inputs are drawn from explicit torch.Generator objects, never from the
pipelines' internal RNG, so the Rust side can reproduce every case from the stored inputs.
"""

import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

import diffusers
import transformers
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

torch.set_num_threads(2)
torch.use_deterministic_algorithms(True)

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
TINY = FIX / "tiny-sd"
GELU = FIX / "tiny-text-gelu"
TOKENIZER_SRC = Path("/work/shared/assets/clip-tokenizer")

# ----------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------
UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[32, 64, 64],
    layers_per_block=2,
    norm_num_groups=8,
    cross_attention_dim=32,
    attention_head_dim=4,
    use_linear_projection=False,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
)
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[16, 32, 32, 32],
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=64,
    scaling_factor=0.18215,
    act_fn="silu",
)
TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=32,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=1,
)
SD_DDIM_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
    timestep_spacing="leading",
)

PROMPT = "a photo of a dog"
LONG_PROMPT = " ".join(
    ["A very long prompt describing a dog that jumps over a fence in a sunny forest full of tall trees,"] * 6
)
PROMPTS = [
    PROMPT,
    "",
    "A Dog   jumping!! in the Forest.",
    "un chien qui saute \u2014 dans la for\u00eat \U0001F332\U0001F415",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8",
    LONG_PROMPT,
]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape, seed, dtype=torch.float32):
    return torch.randn(shape, generator=gen(seed), dtype=torch.float32).to(dtype)


# ----------------------------------------------------------------------------------------------
# parameter re-initialisation
# ----------------------------------------------------------------------------------------------
NORM_TYPES = (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d)


@torch.no_grad()
def reinit_(model: nn.Module, seed: int, out_scale: dict | None = None) -> None:
    """Re-initialise EVERY parameter of `model` deterministically.

    * norm weights: 1 + 0.1*randn, norm biases: 0.1*randn
    * all other biases: 0.1*randn
    * conv / linear weights: randn / sqrt(fan_in)  (fan_in = in_channels * kh * kw)
    * embeddings: randn (std 1)
    `out_scale` maps a parameter name to an extra multiplier (used to tame output layers).
    """
    g = gen(seed)
    owner = {}
    for mname, m in model.named_modules():
        for pname, _ in m.named_parameters(recurse=False):
            owner[f"{mname}.{pname}" if mname else pname] = m
    seen = 0
    for name, p in model.named_parameters():
        m = owner[name]
        leaf = name.rsplit(".", 1)[-1]
        r = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if isinstance(m, NORM_TYPES):
            v = 1.0 + 0.1 * r if leaf == "weight" else 0.1 * r
        elif leaf == "bias":
            v = 0.1 * r
        elif isinstance(m, nn.Embedding):
            v = r
        elif p.dim() >= 2:
            fan_in = p[0].numel()
            v = r / math.sqrt(fan_in)
        else:
            raise RuntimeError(f"don't know how to init {name} {tuple(p.shape)} in {type(m)}")
        if out_scale and name in out_scale:
            v = v * out_scale[name]
        p.copy_(v.to(p.dtype))
        seen += 1
    assert seen == len(list(model.parameters()))


def stats(name, t):
    t = t.detach().double()
    print(f"  {name:28s} {tuple(t.shape)!s:20s} mean {t.mean():+.4f} std {t.std() if t.numel() > 1 else 0:.4f} "
          f"min {t.min():+.4f} max {t.max():+.4f}")
    assert torch.isfinite(t).all(), name


def save(tensors: dict, path: Path, meta: dict | None = None):
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata=meta)
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size / 1e6:.2f} MB, {len(tensors)} tensors)")


def to_nhwc01(img: torch.Tensor) -> torch.Tensor:
    """diffusers VaeImageProcessor.postprocess(output_type='np') semantics, as a tensor."""
    return (img / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float()


def save_png(img01_nhwc: np.ndarray, path: Path):
    pil = StableDiffusionPipeline.numpy_to_pil(img01_nhwc)[0]
    pil.save(path)
    print(f"wrote {path.relative_to(ROOT)}")


# ----------------------------------------------------------------------------------------------
# 1. tiny pipeline
# ----------------------------------------------------------------------------------------------
def build_pipeline():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    # conv_out is scaled so that the noise prediction has std ~1 (like a trained eps-model).
    reinit_(unet, seed=1, out_scale={"conv_out.weight": 0.5})
    vae = AutoencoderKL(**VAE_CONFIG)
    # decoder.conv_out scaled so decoded images are ~[-1, 1] and only mildly clipped.
    reinit_(vae, seed=2, out_scale={"decoder.conv_out.weight": 0.5, "encoder.conv_out.weight": 0.5})
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    reinit_(text_encoder, seed=3)
    text_encoder.eval()
    unet.eval()
    vae.eval()

    tokenizer = CLIPTokenizer(
        vocab=str(TOKENIZER_SRC / "vocab.json"),
        merges=str(TOKENIZER_SRC / "merges.txt"),
        model_max_length=77,
        pad_token="<|endoftext|>",
    )
    scheduler = DDIMScheduler(**SD_DDIM_CONFIG)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_pipeline(pipe):
    if TINY.exists():
        shutil.rmtree(TINY)
    pipe.save_pretrained(TINY, safe_serialization=True)
    # The CompVis repos ship vocab.json + merges.txt; transformers 5 only writes tokenizer.json.
    for f in ("vocab.json", "merges.txt"):
        if not (TINY / "tokenizer" / f).exists():
            shutil.copy(TOKENIZER_SRC / f, TINY / "tokenizer" / f)
    # special_tokens_map.json as the CompVis repo ships it (transformers 5 no longer writes it)
    stm = TINY / "tokenizer" / "special_tokens_map.json"
    if not stm.exists():
        tok = {"content": None, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
        stm.write_text(json.dumps({
            "bos_token": dict(tok, content="<|startoftext|>"),
            "eos_token": dict(tok, content="<|endoftext|>"),
            "pad_token": "<|endoftext|>",
            "unk_token": dict(tok, content="<|endoftext|>"),
        }, indent=2) + "\n")

    # transformers 5 saves CLIPTextModel keys without the "text_model." prefix; the real SD v1.x
    # text_encoder/model.safetensors (written by transformers 4) has it, and transformers 5 loads
    # that layout too, so rewrite the file in the real layout.
    from safetensors.torch import load_file
    te_file = TINY / "text_encoder" / "model.safetensors"
    te = load_file(str(te_file))
    if not any(k.startswith("text_model.") for k in te):
        save_file({"text_model." + k: v for k, v in te.items()}, str(te_file), metadata={"format": "pt"})

    # gelu text-encoder variant: same weights (byte-identical safetensors file), other activation
    if GELU.exists():
        shutil.rmtree(GELU)
    GELU.mkdir(parents=True)
    cfg = CLIPTextConfig(**dict(TEXT_CONFIG, hidden_act="gelu"))
    cfg.architectures = ["CLIPTextModel"]
    cfg.save_pretrained(GELU)
    shutil.copy(TINY / "text_encoder" / "model.safetensors", GELU / "model.safetensors")

    # reload from disk and check that every tensor round-trips and is f32
    from safetensors import safe_open
    for sub, model in (("unet", pipe.unet), ("vae", pipe.vae), ("text_encoder", pipe.text_encoder)):
        files = list((TINY / sub).glob("*.safetensors"))
        assert len(files) == 1, files
        with safe_open(str(files[0]), "pt") as f:
            keys = set(f.keys())
            sd = model.state_dict()
            if sub == "text_encoder":
                sd = {"text_model." + k: v for k, v in sd.items() if k != "embeddings.position_ids"}
            missing = set(sd) - keys
            assert not missing, (sub, sorted(missing)[:5])
            for k in keys:
                t = f.get_tensor(k)
                assert t.dtype == torch.float32, (sub, k, t.dtype)
                assert torch.equal(t, sd[k]), (sub, k)
    total = sum(p.stat().st_size for p in TINY.rglob("*") if p.is_file())
    print(f"saved tiny pipeline: {total / 1e6:.2f} MB")


def load_gelu_text_encoder():
    m = CLIPTextModel.from_pretrained(GELU, torch_dtype=torch.float32)
    assert m.config.hidden_act == "gelu"
    return m.eval()


# ----------------------------------------------------------------------------------------------
# 2. fixtures
# ----------------------------------------------------------------------------------------------
def tokenize(tokenizer, prompt):
    ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return ids.to(torch.int64)


@torch.no_grad()
def text_fixtures(pipe):
    print("text")
    gelu = load_gelu_text_encoder()
    out = {}
    for i, p in enumerate(PROMPTS):
        ids = tokenize(pipe.tokenizer, p)
        assert ids.shape == (1, 77)
        out[f"ids.{i}"] = ids
        out[f"hidden.{i}"] = pipe.text_encoder(ids).last_hidden_state
        out[f"hidden_gelu.{i}"] = gelu(ids).last_hidden_state
        n = len(pipe.tokenizer(p).input_ids)
        print(f"  prompt {i}: {n} tokens untruncated")
    assert len(pipe.tokenizer(LONG_PROMPT).input_ids) > 100
    stats("hidden.0", out["hidden.0"])
    stats("hidden_gelu.0", out["hidden_gelu.0"])
    assert not torch.allclose(out["hidden.0"], out["hidden_gelu.0"])
    save(out, FIX / "text.safetensors")
    (FIX / "prompts.json").write_text(json.dumps({"prompts": PROMPTS}, indent=2, ensure_ascii=False) + "\n")
    return out


@torch.no_grad()
def unet_fixtures(pipe):
    print("unet")
    unet = pipe.unet
    out = {}
    a_s, a_t, a_c = randn((2, 4, 8, 8), 100), torch.tensor(981.0), randn((2, 77, 32), 101)
    out.update({"a.sample": a_s, "a.timestep": a_t, "a.context": a_c,
                "a.out": unet(a_s, a_t, encoder_hidden_states=a_c).sample})
    b_s, b_t, b_c = randn((1, 4, 8, 16), 102), torch.tensor(1.0), randn((1, 77, 32), 103)
    out.update({"b.sample": b_s, "b.timestep": b_t, "b.context": b_c,
                "b.out": unet(b_s, b_t, encoder_hidden_states=b_c).sample})
    stats("a.out", out["a.out"])
    stats("b.out", out["b.out"])
    save(out, FIX / "unet.safetensors")


@torch.no_grad()
def vae_fixtures(pipe):
    print("vae")
    vae = pipe.vae
    image = torch.rand((1, 3, 64, 64), generator=gen(200)) * 2 - 1
    post = vae.encode(image).latent_dist
    latents = randn((1, 4, 8, 8), 201)
    decoded = vae.decode(latents).sample
    out = {"image": image, "mean": post.mean, "logvar": post.logvar, "latents": latents, "decoded": decoded}
    for k in ("mean", "logvar", "decoded"):
        stats(k, out[k])
    save(out, FIX / "vae.safetensors")


def grad_fixtures(pipe):
    print("grads (float64)")
    import copy
    unet = copy.deepcopy(pipe.unet).double()
    unet.train(False)
    sample = randn((1, 4, 8, 8), 300, torch.float64)
    t = torch.tensor(500.0, dtype=torch.float64)
    context = randn((1, 77, 32), 301, torch.float64).requires_grad_(True)
    noise = randn((1, 4, 8, 8), 302, torch.float64)
    unet.zero_grad(set_to_none=True)
    pred = unet(sample, t, encoder_hidden_states=context).sample
    loss = F.mse_loss(pred, noise)
    loss.backward()
    out = {"sample": sample, "timestep": t, "context": context.detach(), "noise": noise,
           "out": pred.detach(), "loss": loss.detach(), "grad.context": context.grad}
    no_grad = []
    for name, p in unet.named_parameters():
        if p.grad is None:
            no_grad.append(name)
            out[f"grad.{name}"] = torch.zeros_like(p)
        else:
            out[f"grad.{name}"] = p.grad
    # Parameter gradients are computed in float64 but STORED as float32 to keep the file at
    # ~8.7 MB instead of ~17 MB (f32 rounding, 6e-8 relative, is far below the 1e-3 tolerance).
    for k in list(out):
        if k.startswith("grad.") and k != "grad.context":
            out[k] = out[k].float()
    if no_grad:
        print("  WARNING: parameters without gradient (stored as zeros):", no_grad)
    print(f"  loss {loss.item():.6f}, {sum(1 for _ in unet.parameters())} params tensors, "
          f"{sum(p.numel() for p in unet.parameters())} scalars")
    stats("grad.context", out["grad.context"])
    stats("grad.conv_in.weight", out["grad.conv_in.weight"])
    for k, v in out.items():
        assert v.dtype == (torch.float32 if k.startswith("grad.") and k != "grad.context" else torch.float64), k
    save(out, FIX / "grads.safetensors", meta={"params_without_grad": ",".join(no_grad)})
    return no_grad


def encode_text(pipe, prompt):
    return pipe.text_encoder(tokenize(pipe.tokenizer, prompt))[0]


@torch.no_grad()
def cfg_loop(pipe, scheduler, latents, timesteps, prompt, negative_prompt, guidance_scale):
    """The StableDiffusionPipeline denoising loop, spelled out (eta = 0)."""
    embeds = torch.cat([encode_text(pipe, negative_prompt), encode_text(pipe, prompt)])
    steps = []
    for t in timesteps:
        lmi = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        noise_pred = pipe.unet(lmi, t, encoder_hidden_states=embeds).sample
        uncond, text = noise_pred.chunk(2)
        noise_pred = uncond + guidance_scale * (text - uncond)
        latents = scheduler.step(noise_pred, t, latents, eta=0.0).prev_sample
        steps.append(latents)
    return latents, torch.stack(steps)


@torch.no_grad()
def decode_image(pipe, latents):
    return to_nhwc01(pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample)


def synthetic_image():
    """Smooth 64x64 RGB picture in [-1, 1]: gradients + two soft discs."""
    y, x = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    r = x
    g = y
    b = 0.5 + 0.5 * torch.sin(2 * math.pi * (x + y))
    d1 = torch.exp(-(((x - 0.3) ** 2 + (y - 0.35) ** 2) / 0.02))
    d2 = torch.exp(-(((x - 0.7) ** 2 + (y - 0.65) ** 2) / 0.03))
    img = torch.stack([r * (1 - d1) + d1, g * (1 - d2) + 0.2 * d2, b * (1 - d1) + 0.1 * d1])
    return (img.clamp(0, 1) * 2 - 1)[None].float()


@torch.no_grad()
def pipeline_fixtures(pipe):
    print("pipeline (text-to-image)")
    steps, gs = 10, 7.5
    init_latents = randn((1, 4, 8, 8), 400)
    captured = {}

    def cb(p, i, t, kw):
        captured.setdefault("steps", []).append(kw["latents"].clone())
        return kw

    res = pipe(PROMPT, negative_prompt="", height=64, width=64, num_inference_steps=steps,
               guidance_scale=gs, latents=init_latents.clone(), output_type="np",
               callback_on_step_end=cb, callback_on_step_end_tensor_inputs=["latents"])
    image = torch.from_numpy(res.images).float()
    final_latents = captured["steps"][-1]
    step_latents = torch.stack(captured["steps"])
    timesteps = pipe.scheduler.timesteps.clone().to(torch.int64)

    # cross-check: the spelled-out loop reproduces the pipeline
    sch = DDIMScheduler.from_config(pipe.scheduler.config)
    sch.set_timesteps(steps)
    my_final, _ = cfg_loop(pipe, sch, init_latents.clone() * sch.init_noise_sigma, sch.timesteps, PROMPT, "", gs)
    my_image = decode_image(pipe, my_final)
    assert torch.allclose(my_final, final_latents, atol=1e-6, rtol=0), (my_final - final_latents).abs().max()
    assert torch.allclose(my_image, image, atol=1e-6), (my_image - image).abs().max()

    out = {"init_latents": init_latents, "timesteps": timesteps, "step_latents": step_latents,
           "final_latents": final_latents, "image": image}
    stats("final_latents", final_latents)
    stats("image", image)
    sat = ((image == 0) | (image == 1)).float().mean().item()
    print(f"  image: {100 * sat:.1f}% of values clipped to 0/1")
    assert image.std() > 0.02
    save_png(res.images, FIX / "pipeline.png")
    meta = dict(prompt=PROMPT, negative_prompt="", height=64, width=64, num_inference_steps=steps,
                guidance_scale=gs, eta=0.0, output_type="np", scheduler=dict(pipe.scheduler.config))

    # ---------------- img2img ----------------
    print("pipeline (img2img, mirrored)")
    strength = 0.6
    init_image = synthetic_image()
    save_png(((init_image / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1).numpy(), FIX / "img2img-input.png")
    # Use the image exactly as the PNG stores it (8-bit quantised), so that the Rust side may load
    # either the tensor or the PNG.
    init_image = (torch.round((init_image / 2 + 0.5).clamp(0, 1) * 255) / 255) * 2 - 1
    sch = DDIMScheduler.from_config(pipe.scheduler.config)
    sch.set_timesteps(steps)
    init_timestep = min(int(steps * strength), steps)
    t_start = max(steps - init_timestep, 0)
    i2i_timesteps = sch.timesteps[t_start * sch.order:]
    sf = pipe.vae.config.scaling_factor
    init_lat = pipe.vae.encode(init_image).latent_dist.mean * sf
    noise = randn((1, 4, 8, 8), 401)
    noisy = sch.add_noise(init_lat, noise, i2i_timesteps[:1])
    i2i_final, i2i_steps = cfg_loop(pipe, sch, noisy, i2i_timesteps, PROMPT, "", gs)
    i2i_image = decode_image(pipe, i2i_final)

    # verify against the real StableDiffusionImg2ImgPipeline with its noise / posterior sampling patched
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as i2i_mod
    orig_randn, orig_retrieve = i2i_mod.randn_tensor, i2i_mod.retrieve_latents
    try:
        i2i_mod.randn_tensor = lambda shape, **kw: noise.clone().to(kw.get("dtype", torch.float32))
        i2i_mod.retrieve_latents = lambda enc, generator=None, sample_mode="sample": orig_retrieve(
            enc, generator, sample_mode="argmax")
        i2i_pipe = StableDiffusionImg2ImgPipeline(
            vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
            scheduler=DDIMScheduler.from_config(pipe.scheduler.config), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
        i2i_pipe.set_progress_bar_config(disable=True)
        cap = {}

        def cb2(p, i, t, kw):
            cap["latents"] = kw["latents"].clone()
            return kw

        ref = i2i_pipe(PROMPT, image=init_image.clone(), strength=strength, num_inference_steps=steps,
                       guidance_scale=gs, negative_prompt="", output_type="np",
                       callback_on_step_end=cb2, callback_on_step_end_tensor_inputs=["latents"])
    finally:
        i2i_mod.randn_tensor, i2i_mod.retrieve_latents = orig_randn, orig_retrieve
    ref_image = torch.from_numpy(ref.images).float()
    d_lat = (cap["latents"] - i2i_final).abs().max().item()
    d_img = (ref_image - i2i_image).abs().max().item()
    print(f"  img2img mirror vs StableDiffusionImg2ImgPipeline: latents max|d| {d_lat:.3g}, image max|d| {d_img:.3g}")
    assert d_lat < 1e-5 and d_img < 1e-5

    out.update({
        "img2img.init_image": init_image,
        "img2img.init_latents": init_lat,
        "img2img.noise": noise,
        "img2img.timesteps": i2i_timesteps.clone().to(torch.int64),
        "img2img.noisy_latents": noisy,
        "img2img.step_latents": i2i_steps,
        "img2img.final_latents": i2i_final,
        "img2img.image": i2i_image,
    })
    stats("img2img.final_latents", i2i_final)
    stats("img2img.image", i2i_image)
    assert i2i_image.std() > 0.02
    meta["img2img"] = dict(strength=strength, num_inference_steps=steps, guidance_scale=gs, prompt=PROMPT,
                           negative_prompt="", posterior="mean", eta=0.0,
                           timesteps=[int(t) for t in i2i_timesteps])
    meta["timesteps"] = [int(t) for t in timesteps]
    save(out, FIX / "pipeline.safetensors")
    (FIX / "pipeline.json").write_text(json.dumps(meta, indent=2) + "\n")


def ddim_fixtures():
    print("ddim")
    cases = [
        dict(SD_DDIM_CONFIG),
        dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
             clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True, steps_offset=0,
             prediction_type="epsilon", timestep_spacing="leading"),
        dict(SD_DDIM_CONFIG, timestep_spacing="trailing", prediction_type="v_prediction", steps_offset=1),
        dict(SD_DDIM_CONFIG, timestep_spacing="linspace"),
        dict(SD_DDIM_CONFIG, prediction_type="sample"),
    ]
    out = {}
    for c, cfg in enumerate(cases):
        s = DDIMScheduler(**cfg)
        out[f"c{c}.alphas_cumprod"] = s.alphas_cumprod.to(torch.float64)
        s.set_timesteps(50)
        out[f"c{c}.timesteps50"] = s.timesteps.clone().to(torch.int64)
        s = DDIMScheduler(**cfg)
        s.set_timesteps(7)
        ts = s.timesteps.clone().to(torch.int64)
        out[f"c{c}.timesteps7"] = ts
        x0 = randn((1, 4, 8, 8), 500 + 10 * c)
        model_out = randn((7, 1, 4, 8, 8), 501 + 10 * c)
        x, prevs = x0, []
        for k, t in enumerate(s.timesteps):
            x = s.step(model_out[k], t, x, eta=0.0).prev_sample
            prevs.append(x)
        noise = randn((1, 4, 8, 8), 502 + 10 * c)
        out[f"c{c}.x0"] = x0
        out[f"c{c}.model_out"] = model_out
        out[f"c{c}.prev"] = torch.stack(prevs)
        out[f"c{c}.noise"] = noise
        out[f"c{c}.add_noise_t"] = ts[3:4].clone()
        out[f"c{c}.add_noise"] = s.add_noise(x0, noise, ts[3:4].clone())
        assert torch.isfinite(out[f"c{c}.prev"]).all()
        print(f"  case {c}: timesteps7 {ts.tolist()}  prev[-1] std {out[f'c{c}.prev'][-1].std():.4f}")
    save(out, FIX / "ddim.safetensors")
    (FIX / "ddim.json").write_text(json.dumps({
        "note": "each case: DDIMScheduler(**config); trajectory uses set_timesteps(7), eta=0, float32",
        "num_inference_steps": [50, 7],
        "eta": 0.0,
        "add_noise_timestep_index": 3,
        "cases": [{"name": f"c{c}", "config": cfg} for c, cfg in enumerate(cases)],
    }, indent=2) + "\n")


def main():
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}")
    FIX.mkdir(parents=True, exist_ok=True)
    pipe = build_pipeline()
    save_pipeline(pipe)
    # reload the saved pipeline so every fixture is computed from exactly what is on disk
    pipe = StableDiffusionPipeline.from_pretrained(TINY, torch_dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    text_fixtures(pipe)
    unet_fixtures(pipe)
    vae_fixtures(pipe)
    grad_fixtures(pipe)
    pipeline_fixtures(pipe)
    ddim_fixtures()
    total = sum(p.stat().st_size for p in FIX.rglob("*") if p.is_file())
    print(f"total fixture size: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    sys.exit(main())
