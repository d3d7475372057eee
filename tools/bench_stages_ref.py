#!/usr/bin/env python3
"""PyTorch reference for `layerdiff bench --stages`: the steps of an edit's three stages on
diffusers' UNet2DConditionModel with the SD v1.4 config (seeded random init, no download), timed
the same way, printed as the same JSON (keys documented at `StageBench` in src/bench.rs).

    ~/venv-ref/bin/python tools/bench_stages_ref.py [--device cpu|cuda] [--dtype f32|f16|bf16]
        [--size 256] [--finetune full|lora] [--steps 3] [--json PATH] [--tiny | --unet-config PATH]

The workloads follow src/method/optimize.rs and src/method/finetune.rs step for step:

* stage 1 (`LayeredOptimization::run`): per step, a timestep t ~ U{0..999} and the noise of both
  layers drawn on the CPU, `z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps`; both layers in ONE UNet
  call of batch 2 (latents `[z_s,t; z_b,t]`, contexts `[e_o; e_b]`); the loss
  `||M_s (.) (eps_s - pred_s)||^2 + ||(1 - M_b) (.) (eps_b - pred_b)||^2` (means, in f32);
  backward to the two embeddings only (UNet weights frozen); Adam (lr 1e-3) on the embeddings;
  then the loss and the embeddings read back in one transfer and checked finite.
* stage 2 (`LayeredFinetune::run`): the same batched call with `e_bar` frozen for both layers,
  loss `2 L_o + 1 L_b`, backward to the trained tensors, Adam (lr 2e-6), then the loss read back
  and checked finite. `--finetune full`: every UNet weight. `--finetune lora`: rank-4 LoRA on to_q,
  to_k, to_v and to_out.0 of every attn1/attn2 (A `[r, in]` kaiming-uniform as PEFT's, B `[out, r]`
  zero, scale lora_alpha / r = 1), the base weights frozen; a small wrapper of our own (as PEFT's
  `Linear` without dropout), so that the script needs nothing beyond diffusers.
* stage 3 (`pipeline::guided_noise`): one classifier-free-guided call of batch 2 under no_grad,
  `eps_u + 7.5 (eps_c - eps_u)`.

Attention is diffusers' default `AttnProcessor2_0` (`F.scaled_dot_product_attention`, whichever
backend torch picks). On the CPU, `torch.set_num_threads(2)`.

Precision, as ours: the UNet's weights and activations are in `--dtype`. Under f16/bf16 the
trained tensors have f32 master copies (stage 1: the embeddings, cast to the dtype on the graph;
stage 2: every trained weight or adapter), so Adam's state and updates are f32 as in
src/method/adam.rs: after the backward the half-precision gradients are cast to f32 onto the
masters, Adam steps the masters, and the masters are copied back into the model's half weights
(an fp32-master scheme, not autocast).

Timing and memory, as ours: stage 1, then stage 3, then stage 2 (the largest last); each stage one
warm-up step, then `--steps` steps timed one by one (synchronized on a GPU), the median reported.
Peak memory per stage: on the CPU the process's peak RSS (VmHWM, reset through
/proc/self/clear_refs after the warm-up), `"memory": "rss"`; on a GPU
`torch.cuda.max_memory_allocated` (reset after the warm-up), `"memory": "cuda_max_allocated"`.
The projected edit is 500 x stage 1 + 250 x stage 2 + 50 x stage 3 (EditSettings::default()).

--tiny uses the tiny test UNet (src/tiny.rs `default_configs()["unet"]`) to check the script in
seconds; its numbers mean nothing. --unet-config PATH builds the UNet from a diffusers
config.json instead (as `layerdiff bench --stages --unet-config`).
"""

import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import diffusers
from diffusers import UNet2DConditionModel
from fullsize_unet_ref import _proc_status, _reset_peak, host  # the peak RSS as that bench reads it; the machine

# src/bench.rs sd_v14_unet_config(): CompVis/stable-diffusion-v1-4 unet/config.json.
SD14_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False,
    flip_sin_to_cos=True, freq_shift=0,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, downsample_padding=1,
    mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
    cross_attention_dim=768, attention_head_dim=8,
)

# src/tiny.rs default_configs()["unet"].
TINY_UNET_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[32, 64, 64], layers_per_block=2, norm_num_groups=8,
    cross_attention_dim=32, attention_head_dim=4, use_linear_projection=False,
    act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
)

# EditSettings::default() (src/method/mod.rs).
EMBEDDING_STEPS, EMBEDDING_LR = 500, 1e-3
FINETUNE_STEPS, FINETUNE_LR = 250, 2e-6
SAMPLING_STEPS, GUIDANCE_SCALE = 50, 7.5
LORA_RANK = 4
LAMBDA_OBJECT, LAMBDA_BACKGROUND = 2.0, 1.0  # lambda_object(None, 0.5), lambda_background

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


class LoraLinear(torch.nn.Module):
    """`base(x) + scale * B(A(x))`, base frozen: PEFT's LoRA `Linear` without dropout."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_A = torch.nn.Linear(base.in_features, rank, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_B = torch.nn.Linear(rank, base.out_features, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        torch.nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        torch.nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scale


def add_lora(unet, rank):
    """Wraps to_q, to_k, to_v and to_out.0 of every attn1/attn2 (finetune.rs `lora_target`);
    returns the adapters' parameters."""
    params = []
    for name, module in list(unet.named_modules()):
        if not name.split(".")[-1] in ("attn1", "attn2"):
            continue
        for proj in ("to_q", "to_k", "to_v"):
            wrapped = LoraLinear(getattr(module, proj), rank, rank)
            setattr(module, proj, wrapped)
            params += [wrapped.lora_A.weight, wrapped.lora_B.weight]
        wrapped = LoraLinear(module.to_out[0], rank, rank)
        module.to_out[0] = wrapped
        params += [wrapped.lora_A.weight, wrapped.lora_B.weight]
    return params


class MasterAdam:
    """torch.optim.Adam over `params`; for half-precision params through f32 master copies (the
    gradients cast onto the masters, the masters copied back after the step), as src/method/adam.rs
    keeps f32 variables and moments for a half-precision model."""

    def __init__(self, params, lr):
        self.params = list(params)
        self.half = any(p.dtype != torch.float32 for p in self.params)
        if self.half:
            self.masters = [p.detach().float().requires_grad_(True) for p in self.params]
        else:
            self.masters = self.params
        self.opt = torch.optim.Adam(self.masters, lr=lr)

    def step(self):
        if self.half:
            for p, m in zip(self.params, self.masters):
                m.grad = None if p.grad is None else p.grad.float()
                p.grad = None
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.half:
            with torch.no_grad():
                for p, m in zip(self.params, self.masters):
                    p.copy_(m)


def masked_mse(pred, eps, mask):
    """optimize.rs `masked_mse`: mean of `(mask * (eps - pred))^2`, in f32 at least."""
    return ((eps.float() - pred.float()) * mask.float()).square().mean()


def noisy_step(gen, alphas, data, device, dtype):
    """optimize.rs `noisy_step`: t and both layers' noise drawn on the CPU."""
    t = int(torch.randint(0, len(alphas), (1,), generator=gen))
    abar = alphas[t]
    out = {"t": t}
    for layer in ("subject", "background"):
        z = data[layer]
        eps = torch.randn(z.shape, generator=gen).to(device=device, dtype=dtype)
        out[layer + "_noise"] = eps
        out[layer] = z * math.sqrt(abar) + eps * math.sqrt(1.0 - abar)
    return out


def layer_terms(unet, noisy, data, context_object, context_background):
    """optimize.rs `layer_terms`: both layers in one batched UNet call."""
    sample = torch.cat([noisy["subject"], noisy["background"]])
    context = torch.cat([context_object, context_background])
    t = torch.tensor(float(noisy["t"]), device=sample.device)
    pred = unet(sample, t, encoder_hidden_states=context).sample
    obj = masked_mse(pred[0:1], noisy["subject_noise"], data["subject_mask"])
    bg = masked_mse(pred[1:2], noisy["background_noise"], 1.0 - data["background_mask"])
    return obj, bg


def check_finite(value, what):
    if not math.isfinite(value):
        raise SystemExit(f"{what} became {value}")


class PeakMeter:
    """Per-stage peak memory: VmHWM on the CPU, max_memory_allocated on a GPU (see the docstring)."""

    def __init__(self, device):
        self.device = device
        if device.type == "cuda":
            self.kind = "cuda_max_allocated"
        else:
            self.kind = "rss" if _reset_peak() and _proc_status("VmHWM") else None

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset(self):
        if self.kind == "rss":
            _reset_peak()
        elif self.kind == "cuda_max_allocated":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_mib(self):
        if self.kind == "rss":
            return _proc_status("VmHWM") / 2**20
        if self.kind == "cuda_max_allocated":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return None

    def time_median(self, steps, step):
        """One warm-up step, then `steps` timed steps: (median seconds, median seconds until the
        step's work was issued, before the closing synchronize; peak MiB of the timed steps)."""
        step()
        self.sync()
        self.reset()
        times, hosts = [], []
        for _ in range(max(steps, 1)):
            t0 = time.perf_counter()
            step()
            issued = time.perf_counter()
            self.sync()
            times.append(time.perf_counter() - t0)
            hosts.append(issued - t0)
        return statistics.median(times), statistics.median(hosts), self.peak_mib()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="f32")
    ap.add_argument("--size", type=int, default=256, help="image side in pixels, a positive multiple of 8")
    ap.add_argument("--finetune", choices=["full", "lora"], default="full")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per stage, after one warm-up")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="stage 2 with diffusers' unet.enable_gradient_checkpointing() (in train mode)")
    ap.add_argument("--json", help="also write the JSON here")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--tiny", action="store_true", help="the tiny test UNet (checks the script; numbers mean nothing)")
    which.add_argument("--unet-config", help="a diffusers UNet config.json instead of SD v1.4's (random weights)")
    args = ap.parse_args()
    if args.size <= 0 or args.size % 8:
        ap.error(f"--size {args.size} is not a positive multiple of 8")

    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = DTYPES[args.dtype]
    steps = max(args.steps, 1)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    cfg, unet_name = (TINY_UNET_CONFIG, "tiny") if args.tiny else (SD14_UNET_CONFIG, "sd-v1.4")
    if args.unet_config:
        with open(args.unet_config) as f:
            cfg, unet_name = json.load(f), "custom"
    # Built on the device (seconds rather than a minute of CPU init at full size; timings do not
    # depend on the random values). torch's own Module.to: diffusers' override warns about modules
    # to keep in f32 (there are none).
    with device:
        unet = torch.nn.Module.to(UNet2DConditionModel.from_config(cfg), device=device, dtype=dtype)
    unet.train(False)  # no dropout (there is none with the SD config; as ours)
    unet.requires_grad_(False)
    parameters = sum(p.numel() for p in unet.parameters())
    meter = PeakMeter(device)
    print(f"built the {unet_name} UNet: {parameters} parameters; attention: "
          f"{type(unet.attn_processors[next(iter(unet.attn_processors))]).__name__}", file=sys.stderr)

    # The data of an edit: two layers of latents, half-covering masks, one text embedding.
    hw = args.size // 8
    g = torch.Generator().manual_seed(1234)

    def randn(*shape):
        return torch.randn(shape, generator=g).to(device=device, dtype=dtype)

    data = {
        "subject": randn(1, unet.config.in_channels, hw, hw),
        "subject_mask": (randn(1, 1, hw, hw) >= 0).to(dtype),
        "background": randn(1, unet.config.in_channels, hw, hw),
        "background_mask": (randn(1, 1, hw, hw) >= 0).to(dtype),
    }
    context = randn(1, 77, unet.config.cross_attention_dim)
    alphas = [1.0 - (i + 1.0) * 9e-4 for i in range(1000)]
    noise_gen = torch.Generator().manual_seed(0)

    # 1. stage 1: layered optimization of the two embeddings, the UNet frozen
    print(f"stage 1: a warm-up step and {steps} timed", file=sys.stderr)
    master = torch.float32 if dtype != torch.float32 else dtype
    e_o = context.detach().to(master).clone().requires_grad_(True)
    e_b = context.detach().to(master).clone().requires_grad_(True)
    adam1 = torch.optim.Adam([e_o, e_b], lr=EMBEDDING_LR)

    def stage1_step():
        noisy = noisy_step(noise_gen, alphas, data, device, dtype)
        obj, bg = layer_terms(unet, noisy, data, e_o.to(dtype), e_b.to(dtype))
        loss = obj + bg
        loss.backward()
        adam1.step()
        adam1.zero_grad(set_to_none=True)
        sums = torch.stack([loss.detach().double(), e_o.detach().double().abs().sum(), e_b.detach().double().abs().sum()])
        value, *embeddings = sums.tolist()
        check_finite(value, "stage 1 loss")
        check_finite(sum(embeddings), "the embeddings")

    stage1_s, stage1_host, stage1_peak = meter.time_median(steps, stage1_step)
    del e_o, e_b, adam1

    # 2. stage 3: one classifier-free-guided call
    print(f"stage 3: a warm-up step and {steps} timed", file=sys.stderr)
    latents = randn(1, unet.config.in_channels, hw, hw)
    t500 = torch.tensor(500.0, device=device)

    def stage3_step():
        with torch.no_grad():
            eps = unet(torch.cat([latents, latents]), t500, encoder_hidden_states=torch.cat([context, context])).sample
            eps_u, eps_c = eps[0:1], eps[1:2]
            return eps_u + (eps_c - eps_u) * GUIDANCE_SCALE

    stage3_s, stage3_host, stage3_peak = meter.time_median(steps, stage3_step)

    # 3. stage 2: layered fine-tuning, e_bar frozen
    print(f"stage 2 ({args.finetune}): a warm-up step and {steps} timed", file=sys.stderr)
    if args.finetune == "full":
        unet.requires_grad_(True)
        trained = list(unet.parameters())
    else:
        trained = add_lora(unet, LORA_RANK)
        print(f"LoRA: {len(trained) // 2} adapted projections, {sum(p.numel() for p in trained)} parameters", file=sys.stderr)
    adam2 = MasterAdam(trained, FINETUNE_LR)
    e_bar = context.detach()
    if args.gradient_checkpointing:
        # diffusers checkpoints each block only while training (dropout is 0: no other change).
        unet.enable_gradient_checkpointing()
        unet.train()

    def stage2_step():
        noisy = noisy_step(noise_gen, alphas, data, device, dtype)
        obj, bg = layer_terms(unet, noisy, data, e_bar, e_bar)
        loss = obj * LAMBDA_OBJECT + bg * LAMBDA_BACKGROUND
        loss.backward()
        adam2.step()
        check_finite(loss.item(), "stage 2 loss")

    stage2_s, stage2_host, stage2_peak = meter.time_median(steps, stage2_step)

    report = {
        "framework": f"torch {torch.__version__}, diffusers {diffusers.__version__}",
        "unet": unet_name,
        "parameters": parameters,
        "host": host(),
        "device": "cpu" if device.type == "cpu" else f"{device.type}:{device.index}",
        "dtype": args.dtype,
        "size": args.size,
        "latent_size": hw,
        "finetune": args.finetune,
        "lora_rank": LORA_RANK,
        "gradient_checkpointing": args.gradient_checkpointing,
        "steps": steps,
        # layerdiff's own GPU paths (its fused kernels, its use of cuDNN): none here; PyTorch's
        # convolutions are always cuDNN's on a GPU.
        "gpu_paths": [],
        "memory": meter.kind,
        "stage1_step_s": stage1_s,
        "stage1_host_s": stage1_host,
        "stage1_peak_mib": stage1_peak,
        "stage2_step_s": stage2_s,
        "stage2_host_s": stage2_host,
        "stage2_peak_mib": stage2_peak,
        "stage2_trained_parameters": sum(p.numel() for p in trained),
        "stage3_step_s": stage3_s,
        "stage3_host_s": stage3_host,
        "stage3_peak_mib": stage3_peak,
        "stage1_edit_steps": EMBEDDING_STEPS,
        "stage2_edit_steps": FINETUNE_STEPS,
        "stage3_edit_steps": SAMPLING_STEPS,
        "projected_edit_s": EMBEDDING_STEPS * stage1_s + FINETUNE_STEPS * stage2_s + SAMPLING_STEPS * stage3_s,
    }
    text = json.dumps(report, indent=2)
    if args.json:
        import os
        import tempfile
        folder = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=folder, prefix=".bench-", delete=False) as f:
            f.write(text)
        os.chmod(f.name, 0o644)
        os.replace(f.name, args.json)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
