//! Stable Diffusion text-to-image and image-to-image, read top-down like diffusers'
//! `StableDiffusionPipeline.__call__` and `StableDiffusionImg2ImgPipeline.__call__`.

use crate::error::{bad_input, Result};
use crate::models::clip_text::{ClipTextConfig, ClipTextTransformer};
use crate::models::unet_2d::{UNet2DConditionModel, UNet2DConditionModelConfig};
use crate::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use crate::schedulers::{DdimConfig, DdimScheduler};
use crate::sources::{Component, ModelFiles};
use crate::tokenizer::ClipTokenizer;
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

/// The four parts of a Stable Diffusion v1.x pipeline, loaded in one dtype on one device.
pub struct StableDiffusion {
    /// `None` once [`StableDiffusion::release_unet`] freed it, until
    /// [`StableDiffusion::reload_unet`].
    unet: Option<UNet2DConditionModel>,
    pub vae: AutoencoderKL,
    pub text_encoder: ClipTextTransformer,
    pub tokenizer: ClipTokenizer,
    pub scheduler_config: DdimConfig,
    pub device: Device,
    pub dtype: DType,
}

fn load_unet(files: &ModelFiles, device: &Device, dtype: DType) -> Result<UNet2DConditionModel> {
    let cfg = UNet2DConditionModelConfig::from_json(&files.unet_config)?;
    let vb = files.var_builder(Component::Unet, dtype, device)?;
    UNet2DConditionModel::new(vb, cfg).map_err(|e| files.weights_error(Component::Unet, e))
}

impl StableDiffusion {
    pub fn load(files: &ModelFiles, device: &Device, dtype: DType) -> Result<Self> {
        check_dtype(device, dtype)?;
        let vae_cfg = AutoencoderKLConfig::from_json(&files.vae_config)?;
        let clip_cfg = ClipTextConfig::from_json(&files.text_encoder_config)?;
        let load = |c: Component| files.var_builder(c, dtype, device);
        let unet = load_unet(files, device, dtype)?;
        let vae = AutoencoderKL::new(load(Component::Vae)?, vae_cfg)
            .map_err(|e| files.weights_error(Component::Vae, e))?;
        let text_encoder = ClipTextTransformer::new(load(Component::TextEncoder)?, clip_cfg)
            .map_err(|e| files.weights_error(Component::TextEncoder, e))?;
        Ok(Self {
            unet: Some(unet),
            vae,
            text_encoder,
            tokenizer: files.tokenizer()?,
            scheduler_config: DdimConfig::from_json(&files.scheduler_config)?,
            device: device.clone(),
            dtype,
        })
    }

    /// The UNet; an error after [`StableDiffusion::release_unet`].
    pub fn unet(&self) -> Result<&UNet2DConditionModel> {
        self.unet.as_ref().ok_or_else(|| {
            bad_input("the pipeline's UNet", "released by an edit", "call StableDiffusion::reload_unet first (edit does)")
        })
    }

    /// Frees the UNet's weights. An edit does after stage 1: stage 2 trains its own copy from the
    /// model's files and stage 3 samples from that, so this one was a UNet's size of memory at
    /// stage 2's peak (1.6 GiB in bf16, over a 16 GB GPU's limit with full fine-tuning).
    pub fn release_unet(&mut self) {
        self.unet = None;
    }

    /// Loads the UNet from `files` (the ones this pipeline was loaded from) if it was released.
    pub fn reload_unet(&mut self, files: &ModelFiles) -> Result<()> {
        if self.unet.is_none() {
            self.unet = Some(load_unet(files, &self.device, self.dtype)?);
        }
        Ok(())
    }

    /// A fresh DDIM scheduler with this model's configuration.
    pub fn scheduler(&self) -> Result<DdimScheduler> {
        DdimScheduler::new(self.scheduler_config.clone())
    }

    /// The VAE's downsampling factor (8 for SD v1): image sides must be multiples of it.
    pub fn vae_factor(&self) -> usize {
        self.vae.downsampling_factor()
    }

    /// `c(T)`: the CLIP text encoder's last hidden state for a prompt, `[1, 77, D]`.
    pub fn encode_prompt(&self, prompt: &str) -> Result<Tensor> {
        let ids = self.tokenizer.encode(prompt)?;
        let ids = Tensor::new(ids.as_slice(), &self.device)?.unsqueeze(0)?;
        Ok(self.text_encoder.forward(&ids)?.to_dtype(self.dtype)?)
    }

    /// `z = scaling_factor * E(image)`: the posterior mean, or a sample when `noise` is given.
    pub fn encode_image(&self, image: &Tensor, noise: Option<&Tensor>) -> Result<Tensor> {
        let posterior = self.vae.encode(&image.to_dtype(self.dtype)?)?;
        let z = match noise {
            Some(n) => posterior.sample(n)?,
            None => posterior.mean().clone(),
        };
        Ok((z * self.vae.scaling_factor())?)
    }

    /// Latents to an image tensor in [-1, 1].
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Tensor> {
        Ok(self.vae.decode(&(latents / self.vae.scaling_factor())?)?)
    }

    /// One classifier-free-guided noise prediction with this pipeline's UNet; see [`guided_noise`].
    pub fn guided_noise(&self, latents: &Tensor, t: usize, guidance: &Guidance) -> Result<Tensor> {
        guided_noise(self.unet()?, latents, t, guidance)
    }

    /// The denoising loop over `timesteps`, from `latents`, with classifier-free guidance.
    pub fn denoise(
        &self,
        scheduler: &DdimScheduler,
        timesteps: &[usize],
        mut latents: Tensor,
        guidance: &Guidance,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        for (i, &t) in timesteps.iter().enumerate() {
            let input = scheduler.scale_model_input(latents.clone(), t)?;
            let eps = guided_noise(self.unet()?, &input, t, guidance)?;
            latents = scheduler.step(&eps, t, &latents)?;
            on_step(i + 1, timesteps.len());
        }
        Ok(latents)
    }
}

/// One classifier-free-guided noise prediction of any UNet (the pipeline's, or a fine-tuned one):
/// `eps_u + w (eps_c - eps_u)`, both halves in one batched UNet call. `w <= 1` skips the
/// unconditional half, as diffusers does.
pub fn guided_noise(unet: &UNet2DConditionModel, latents: &Tensor, t: usize, guidance: &Guidance) -> Result<Tensor> {
    let Guidance { cond, uncond, scale } = *guidance;
    if scale <= 1.0 {
        return Ok(unet.forward(latents, t as f64, cond)?);
    }
    let batch = latents.dim(0)?;
    let input = Tensor::cat(&[latents, latents], 0)?;
    let context = Tensor::cat(&[uncond.repeat((batch, 1, 1))?, cond.repeat((batch, 1, 1))?], 0)?;
    let eps = unet.forward(&input, t as f64, &context)?;
    let (eps_u, eps_c) = (eps.narrow(0, 0, batch)?, eps.narrow(0, batch, batch)?);
    Ok((&eps_u + ((eps_c - &eps_u)? * scale)?)?)
}

/// The text conditions of classifier-free guidance and its scale.
#[derive(Clone, Copy)]
pub struct Guidance<'a> {
    /// `[1, 77, D]` embedding of the prompt.
    pub cond: &'a Tensor,
    /// `[1, 77, D]` embedding of the negative (unconditional) prompt.
    pub uncond: &'a Tensor,
    pub scale: f64,
}

/// Settings of a CUDA device, from the environment (no effect elsewhere):
/// - `LAYERDIFF_TF32=1` (off by default): float32 matrix products through the tensor cores in
///   TF32 (10-bit mantissa inputs, float32 sums), as PyTorch's
///   `torch.backends.cuda.matmul.allow_tf32`, and cuDNN's float32 convolutions too in a `cudnn`
///   build; `LAYERDIFF_TF32=conv` the convolutions alone, PyTorch's default
///   (`models::cudnn_conv`).
///
/// Two settings that make a step cheaper on the host are on by default; each variable set to
/// `0` turns its own off, for comparison (`scripts/gpu-check.sh`, README):
/// - `LAYERDIFF_HTOD_CACHE`: candle uploads the shape and strides of each strided kernel launch
///   from pageable host memory; its CUDA-graph upload cache keeps each distinct upload on the
///   device and reuses it (host tensors of at most 4 KiB too, as a device-to-device copy; it
///   never forgets, which at real sizes holds shapes, strides and timesteps). Measured on an
///   H200: a bf16 LoRA edit 214 s without it, 196 s with both.
/// - `LAYERDIFF_SINGLE_STREAM`: no CUDA events per allocation (cudarc's cross-stream tracking):
///   218 s without it.
///
/// Call it right after making the device, before any tensor is on it.
pub fn configure_cuda(device: &Device) {
    let env = |name: &str| std::env::var(name).ok();
    if device.is_cuda() {
        let tf32 = env("LAYERDIFF_TF32");
        candle_core::cuda::set_gemm_reduced_precision_f32(tf32.as_deref() == Some("1"));
        crate::models::cudnn_conv::set_tf32_convolutions(tf32.as_deref() == Some("conv"));
    }
    #[cfg(feature = "cuda")]
    if let Ok(cuda) = device.as_cuda_device() {
        let default_on = |name: &str| env(name).as_deref() != Some("0");
        if default_on("LAYERDIFF_SINGLE_STREAM") {
            // cudarc gives every allocation two CUDA events (created, and destroyed when freed)
            // to order its uses across streams. candle runs all of a device's work on one
            // stream, where the stream's order is enough: four driver calls per op saved.
            // SAFETY: no tensor of this device is used on another stream.
            unsafe { cuda.disable_event_tracking() };
        }
        if default_on("LAYERDIFF_HTOD_CACHE") {
            // The cache is on while the guard lives, on this thread (the one that runs the model).
            std::mem::forget(cuda.enable_cuda_graph_htod_cache());
        }
    }
}

/// candle 0.11.1 has no bf16 matrix multiply on the CPU: say so before loading anything.
pub fn check_dtype(device: &Device, dtype: DType) -> Result<()> {
    if device.is_cpu() && dtype == DType::BF16 {
        return Err(bad_input("--dtype bf16", "the CPU backend has no bf16 matrix multiply", "use --dtype f32 or f16 on the CPU, bf16 on a GPU"));
    }
    Ok(())
}

/// SplitMix64's finalizer: a bijective mix of 64 bits, so neighbouring inputs (steps, indices)
/// give unrelated seeds.
pub(crate) fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Standard normal noise from a seed, drawn on the CPU so that a seed gives the same image on
/// every device.
pub fn seeded_noise(seed: u64, shape: &[usize], device: &Device, dtype: DType) -> Result<Tensor> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| StandardNormal.sample(&mut rng)).collect();
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?.to_dtype(dtype)?.to_device(device)?)
}

/// Settings of `generate`; defaults as diffusers' StableDiffusionPipeline.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub guidance_scale: f64,
    pub width: usize,
    pub height: usize,
    pub seed: u64,
    /// Used instead of seeded noise (diffusers' `latents=`), `[1, 4, height/f, width/f]`.
    pub init_latents: Option<Tensor>,
    /// img2img (SDEdit): the start image in [-1, 1], `[1, 3, height, width]`.
    pub init_image: Option<Tensor>,
    /// img2img: how much of the schedule to re-noise, in (0, 1].
    pub strength: f64,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            steps: 50,
            guidance_scale: 7.5,
            width: 512,
            height: 512,
            seed: 0,
            init_latents: None,
            init_image: None,
            strength: 0.8,
        }
    }
}

/// Text-to-image, or image-to-image when `init_image` is set. Returns the image in [-1, 1].
pub fn generate(sd: &StableDiffusion, opts: &GenerateOptions, on_step: &mut dyn FnMut(usize, usize)) -> Result<Tensor> {
    // 1. check inputs
    let f = sd.vae_factor();
    for (name, v) in [("--width", opts.width), ("--height", opts.height)] {
        if v == 0 || !v.is_multiple_of(f) {
            return Err(bad_input(name, format!("{v} is not a positive multiple of {f}"), format!("use a multiple of {f}, the model's VAE factor")));
        }
    }
    if opts.steps == 0 {
        return Err(bad_input("--steps", "0 denoising steps", "use at least 1 (50 is the default)"));
    }
    let latent_shape = [1, sd.unet()?.config().in_channels, opts.height / f, opts.width / f];

    // 2. encode the prompt
    let cond = sd.encode_prompt(&opts.prompt)?;
    let uncond = sd.encode_prompt(&opts.negative_prompt)?;

    // 3. prepare timesteps
    let mut scheduler = sd.scheduler()?;
    scheduler.set_timesteps(opts.steps)?;

    // 4. prepare latents
    let noise = match &opts.init_latents {
        Some(l) => {
            if l.dims() != latent_shape {
                return Err(bad_input("--init-latents", format!("shape {:?}, expected {latent_shape:?}", l.dims()), "give latents for this width, height and model"));
            }
            l.to_device(&sd.device)?.to_dtype(sd.dtype)?
        }
        None => seeded_noise(opts.seed, &latent_shape, &sd.device, sd.dtype)?,
    };
    let (latents, timesteps) = match &opts.init_image {
        None => ((noise * scheduler.init_noise_sigma())?, scheduler.timesteps().to_vec()),
        Some(image) => {
            let timesteps = scheduler.timesteps_for_strength(opts.strength)?.to_vec();
            let posterior_noise = seeded_noise(opts.seed.wrapping_add(1 << 32), &latent_shape, &sd.device, sd.dtype)?;
            let z = sd.encode_image(image, Some(&posterior_noise))?;
            let Some(&t_start) = timesteps.first() else {
                return Err(bad_input("--strength", format!("{} leaves no denoising step out of {}", opts.strength, opts.steps), "raise --strength or --steps"));
            };
            (scheduler.add_noise(&z, &noise, t_start)?, timesteps)
        }
    };

    // 5. the denoising loop
    let guidance = Guidance { cond: &cond, uncond: &uncond, scale: opts.guidance_scale };
    let latents = sd.denoise(&scheduler, &timesteps, latents, &guidance, on_step)?;

    // 6. decode
    sd.decode_latents(&latents)
}

/// Reads `--init-latents`: a safetensors file holding a tensor named `latents`.
pub fn load_latents(path: &std::path::Path, device: &Device, dtype: DType) -> Result<Tensor> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| {
        bad_input(path.display(), format!("not a readable safetensors file ({e})"), "give a .safetensors file with a tensor named `latents`")
    })?;
    let latents = tensors.get("latents").ok_or_else(|| {
        bad_input(path.display(), "no tensor named `latents`", "save the tensor under the name `latents`")
    })?;
    Ok(latents.to_dtype(dtype)?.to_device(device)?)
}
