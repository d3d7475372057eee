#!/usr/bin/env python3
"""Full-size SD v1.4 UNet reference (NOT run in CI; needs ~3.5 GB disk and ~8 GB RAM).

Builds the real SD v1.4 UNet architecture (UNet2DConditionModel, 860M parameters) with seeded
random weights (torch.manual_seed(0), diffusers' default init), saves it as a diffusers `unet/`
folder (config.json + diffusion_pytorch_model.safetensors, f32) in --out, and writes
`fullsize_io.safetensors` in the same folder:

    sample  f32 [1,4,32,32]   randn
    timestep f32 0-d          500.0
    context f32 [1,77,768]    randn
    out     f32 [1,4,32,32]   unet(sample, timestep, context).sample

Usage (from the repo root, same venv as tools/make_fixtures.py):

    ~/venv-ref/bin/python tools/fullsize_unet_ref.py [--out /tmp/fullsize-unet]
    ~/venv-ref/bin/python tools/fullsize_unet_ref.py --bench [--out DIR] [--repeats 3] [--no-save]

--bench also times, on CPU with torch.set_num_threads(2), batch 1:
  * forward under torch.no_grad() at 32x32 and 64x64 latents,
  * forward + backward w.r.t. the context only (parameters requires_grad_(False),
    context.requires_grad_(True), loss = out.square().mean()) at 32x32 and 64x64
    (--sizes picks the latent sizes, default 32,64),
reporting the median of --repeats runs after one warm-up, in seconds, and memory: the process
peak RSS (resource.getrusage ru_maxrss) and, per measure, the peak RSS during that measure minus
the RSS before it (Linux VmHWM, reset through /proc/self/clear_refs). The result is printed as JSON.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import diffusers
from diffusers import UNet2DConditionModel

SD14_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
)


def host():
    """The machine, as layerdiff's reports give it (`layerdiff::bench::Host`): CPU model, the
    vector instructions PyTorch's CPU kernels picked, threads."""
    cpu = platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "simd": torch.backends.cpu.get_cpu_capability().lower(), "threads": torch.get_num_threads()}


def _proc_status(field):
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB -> bytes
    except OSError:
        pass
    return None


def _reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def maxrss_bytes():
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def measure(fn, repeats):
    rss_before = _proc_status("VmRSS")
    can_reset = _reset_peak()
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    peak = _proc_status("VmHWM") if can_reset else None
    return {
        "median_s": round(statistics.median(times), 4),
        "times_s": [round(t, 4) for t in times],
        "peak_rss_delta_mb": round((peak - rss_before) / 2**20, 1) if peak and rss_before else None,
        "peak_rss_mb": round(peak / 2**20, 1) if peak else None,
        "ru_maxrss_mb_after": round(maxrss_bytes() / 2**20, 1),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/fullsize-unet")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sizes", type=lambda v: [int(x) for x in v.split(",")], default=[32, 64],
                    help="latent sizes to time, comma-separated (default 32,64)")
    ap.add_argument("--no-save", action="store_true", help="skip writing the unet/ folder and io fixture")
    args = ap.parse_args()

    torch.set_num_threads(2)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    unet = UNet2DConditionModel(**SD14_UNET_CONFIG).eval()
    build_s = time.perf_counter() - t0
    nparams = sum(p.numel() for p in unet.parameters())
    print(f"built SD v1.4 UNet: {nparams} parameters in {build_s:.1f}s", file=sys.stderr)

    g = torch.Generator().manual_seed(1234)
    sample = torch.randn((1, 4, 32, 32), generator=g)
    timestep = torch.tensor(500.0)
    context = torch.randn((1, 77, 768), generator=g)

    out_dir = Path(args.out)
    if not args.no_save:
        unet_dir = out_dir / "unet"
        unet.save_pretrained(unet_dir, safe_serialization=True)
        with torch.no_grad():
            out = unet(sample, timestep, encoder_hidden_states=context).sample
        save_file({"sample": sample, "timestep": timestep, "context": context, "out": out.contiguous()},
                  str(out_dir / "fullsize_io.safetensors"))
        print(f"saved {unet_dir} and {out_dir / 'fullsize_io.safetensors'} "
              f"(out mean {out.mean():+.4f} std {out.std():.4f})", file=sys.stderr)

    if not args.bench:
        return 0

    for p in unet.parameters():
        p.requires_grad_(False)
    results = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "host": host(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "params": nparams,
        "repeats": args.repeats,
        "rss_after_build_mb": round((_proc_status("VmRSS") or 0) / 2**20, 1),
    }

    def fwd(hw):
        s = torch.randn((1, 4, hw, hw), generator=torch.Generator().manual_seed(hw))

        def run():
            with torch.no_grad():
                unet(s, timestep, encoder_hidden_states=context).sample
        return run

    def fwd_bwd(hw):
        s = torch.randn((1, 4, hw, hw), generator=torch.Generator().manual_seed(hw))

        def run():
            c = context.clone().requires_grad_(True)
            loss = unet(s, timestep, encoder_hidden_states=c).sample.square().mean()
            loss.backward()
            assert c.grad is not None
        return run

    for hw in args.sizes:
        results[f"forward_{hw}x{hw}"] = measure(fwd(hw), args.repeats)
        print(f"forward {hw}: {results[f'forward_{hw}x{hw}']}", file=sys.stderr)
        results[f"forward_backward_context_{hw}x{hw}"] = measure(fwd_bwd(hw), args.repeats)
        print(f"fwd+bwd {hw}: {results[f'forward_backward_context_{hw}x{hw}']}", file=sys.stderr)
    results["ru_maxrss_mb"] = round(maxrss_bytes() / 2**20, 1)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
