"""Copies a `layerdiff train` export (the diffusers layout) into the folder committed as
assets/toy-sd: the weights of the UNet, VAE and text encoder cast to f16 (half the bytes; the
tool loads them into f32 on the CPU), everything else as it is, the training state left out.

usage: ~/venv-ref/bin/python tools/toy_model_f16.py target/toy-train assets/toy-sd
(torch and safetensors as pinned in tools/requirements.txt). Keeps DST/README.md, the record.
"""

import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = ["unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"]
COPIED = ["model_index.json", "scheduler", "tokenizer", "unet/config.json", "vae/config.json", "text_encoder/config.json"]


def main(src: Path, dst: Path) -> None:
    for name in COPIED:
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        if (src / name).is_dir():
            shutil.copytree(src / name, dst / name, dirs_exist_ok=True)
        else:
            shutil.copy2(src / name, dst / name)
    for name in WEIGHTS:
        tensors = load_file(src / name)
        half = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in tensors.items()}
        tmp = dst / (name + ".tmp")
        save_file(half, tmp, metadata={"format": "pt"})
        tmp.replace(dst / name)
        print(f"{dst / name}: {len(half)} tensors in f16")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
