import sys, torch, numpy as np
from diffusers import StableDiffusionPipeline, DDIMScheduler
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1], torch_dtype=torch.float32, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
print(type(pipe.scheduler).__name__, pipe.unet.dtype)
from safetensors.torch import save_file
lat = torch.randn(1,4,8,8, generator=torch.Generator().manual_seed(0))
save_file({"latents": lat}, "/tmp/lat.safetensors")
img = pipe("a photo of a dog", height=64, width=64, num_inference_steps=5, guidance_scale=7.5, latents=lat, output_type="np").images[0]
np.save("/tmp/ref.npy", img)
