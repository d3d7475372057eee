//! Tiny random-weight Stable Diffusion pipelines in exactly the diffusers layout, for tests and
//! the demo. The weights are a deterministic function of the seed; they give noise, not pictures.

use crate::error::{bad_input, Result};
use crate::image_io::write_atomic;
use crate::models::clip_text::{ClipTextConfig, ClipTextTransformer};
use crate::models::sam::{Sam, SamConfig};
use crate::models::unet_2d::{UNet2DConditionModel, UNet2DConditionModelConfig};
use crate::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Mutex;

/// The default tiny configs: SD v1's block structure at toy widths, VAE factor 8 as the real one.
pub fn default_configs() -> Value {
    json!({
        "unet": {
            "_class_name": "UNet2DConditionModel",
            "sample_size": 8, "in_channels": 4, "out_channels": 4,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "block_out_channels": [32, 64, 64], "layers_per_block": 2, "norm_num_groups": 8,
            "cross_attention_dim": 32, "attention_head_dim": 4, "use_linear_projection": false,
            "act_fn": "silu", "flip_sin_to_cos": true, "freq_shift": 0
        },
        "vae": {
            "_class_name": "AutoencoderKL",
            "in_channels": 3, "out_channels": 3, "latent_channels": 4,
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
            "block_out_channels": [16, 32, 32, 32], "layers_per_block": 1, "norm_num_groups": 8,
            "sample_size": 64, "scaling_factor": 0.18215, "act_fn": "silu"
        },
        "text_encoder": {
            "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
            "vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5, "projection_dim": 32,
            "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1
        },
        "scheduler": {
            "_class_name": "DDIMScheduler",
            "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "clip_sample": false, "set_alpha_to_one": false,
            "steps_offset": 1, "prediction_type": "epsilon", "timestep_spacing": "leading"
        }
    })
}

/// How `SeededWeights` draws a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightInit {
    /// For tests: scales chosen so activations stay O(1) and no weight is trivially 0 or 1 (so
    /// that a swapped or missing weight shows up in parity tests): fan-in scaled normals for
    /// matrices and kernels, `1 + 0.1 n` for norm scales and variances, `0.1 n` for biases.
    Test,
    /// For training from scratch, as torch's layer defaults: `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`
    /// for matrices and kernels, norm scales 1, biases 0, embedding tables `N(0, 0.02)` (CLIP's).
    Torch,
}

/// Hands out seeded random tensors for whatever a model asks for, and remembers them.
struct SeededWeights {
    rng: Mutex<rand::rngs::StdRng>,
    made: Mutex<BTreeMap<String, Tensor>>,
    init: WeightInit,
}

impl SeededWeights {
    fn new(seed: u64, init: WeightInit) -> Self {
        Self { rng: Mutex::new(rand::rngs::StdRng::seed_from_u64(seed)), made: Mutex::new(BTreeMap::new()), init }
    }

    fn sample(&self, shape: &Shape, name: &str) -> candle_core::Result<Tensor> {
        let dims = shape.dims();
        let fan_in: usize = dims.iter().skip(1).product();
        let fan_scale = 1.0 / (fan_in.max(1) as f32).sqrt();
        let unit_weight = name.ends_with("weight") || name.ends_with("running_var");
        // (offset, scale, uniform): offset + scale * (U(-1, 1) or N(0, 1))
        let (offset, scale, uniform) = match (self.init, dims.len()) {
            (WeightInit::Test, 1) if unit_weight => (1.0, 0.1, false),
            (WeightInit::Test, 1) => (0.0, 0.1, false),
            (WeightInit::Test, _) => (0.0, fan_scale, false),
            (WeightInit::Torch, 1) => (if unit_weight { 1.0 } else { 0.0 }, 0.0, false),
            (WeightInit::Torch, _) if name.contains("embedding") && dims.len() == 2 => (0.0, 0.02, false),
            (WeightInit::Torch, _) => (0.0, fan_scale, true),
        };
        let mut rng = self.rng.lock().map_err(|_| candle_core::Error::Msg("poisoned lock".into()))?;
        let data: Vec<f32> = (0..shape.elem_count())
            .map(|_| {
                let draw = if uniform {
                    rand::Rng::random_range(&mut *rng, -1f32..1f32)
                } else {
                    Distribution::<f32>::sample(&StandardNormal, &mut *rng)
                };
                offset + scale * draw
            })
            .collect();
        Tensor::from_vec(data, shape.clone(), &Device::Cpu)
    }

    fn into_tensors(self) -> BTreeMap<String, Tensor> {
        self.made.into_inner().unwrap_or_default()
    }
}

impl SimpleBackend for &SeededWeights {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let mut made = self.made.lock().map_err(|_| candle_core::Error::Msg("poisoned lock".into()))?;
        let t = match made.get(name) {
            Some(t) => t.clone(),
            None => {
                let t = self.sample(&s, name)?;
                made.insert(name.to_string(), t.clone());
                t
            }
        };
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("tiny model: {name} requested without a shape")
    }

    /// Every weight a model asks for exists, except LoRA adapters: a base model has none.
    fn contains_tensor(&self, name: &str) -> bool {
        !name.contains(".lora_")
    }
}

/// Builds a model from seeded random weights (drawn by [`WeightInit::Test`]); also returns the
/// weights it asked for, by checkpoint name (f32, on the CPU).
pub fn seeded_model<M>(
    seed: u64,
    dtype: DType,
    device: &Device,
    build: impl FnOnce(VarBuilder) -> Result<M>,
) -> Result<(M, BTreeMap<String, Tensor>)> {
    seeded_model_with(WeightInit::Test, seed, dtype, device, build)
}

/// [`seeded_model`] with the initialization `init`.
pub fn seeded_model_with<M>(
    init: WeightInit,
    seed: u64,
    dtype: DType,
    device: &Device,
    build: impl FnOnce(VarBuilder) -> Result<M>,
) -> Result<(M, BTreeMap<String, Tensor>)> {
    let weights = SeededWeights::new(seed, init);
    let model = build(VarBuilder::from_backend(Box::new(&weights), dtype, device.clone()))?;
    Ok((model, weights.into_tensors()))
}

/// Writes a tiny pipeline to `out`: `model_index.json`, `unet/`, `vae/`, `text_encoder/`,
/// `tokenizer/` (the real SD v1 CLIP tokenizer) and `scheduler/`, weights in `dtype`.
/// `overrides` replaces keys of [`default_configs`], per component (`{"unet": {...}, ...}`).
pub fn write_tiny_model(out: &Path, seed: u64, overrides: Option<&Value>, dtype: DType) -> Result<()> {
    let mut configs = default_configs();
    if let Some(o) = overrides {
        merge_overrides(&mut configs, o)?;
    }
    let unet_cfg = UNet2DConditionModelConfig::from_json(&configs["unet"])?;
    let vae_cfg = AutoencoderKLConfig::from_json(&configs["vae"])?;
    let clip_cfg = ClipTextConfig::from_json(&configs["text_encoder"])?;
    // Each component gets its own stream so that changing one config leaves the others' weights alone.
    let cpu = Device::Cpu;
    let (_, unet) = seeded_model(seed, DType::F32, &cpu, |vb| Ok(UNet2DConditionModel::new(vb, unet_cfg)?))?;
    let (_, vae) = seeded_model(seed.wrapping_add(1), DType::F32, &cpu, |vb| Ok(AutoencoderKL::new(vb, vae_cfg)?))?;
    let (_, clip) = seeded_model(seed.wrapping_add(2), DType::F32, &cpu, |vb| Ok(ClipTextTransformer::new(vb, clip_cfg)?))?;

    write_pipeline(out, &configs, unet, vae, clip, dtype)
}

/// Writes a Stable Diffusion pipeline in the diffusers layout to `out`: `model_index.json`, each
/// component's config (from `configs`, keyed `unet`, `vae`, `text_encoder`, `scheduler`) and
/// weights (cast to `dtype`), and the real SD v1 CLIP tokenizer padded to the text encoder's
/// `max_position_embeddings`.
pub fn write_pipeline(
    out: &Path,
    configs: &Value,
    unet: BTreeMap<String, Tensor>,
    vae: BTreeMap<String, Tensor>,
    text_encoder: BTreeMap<String, Tensor>,
    dtype: DType,
) -> Result<()> {
    let model_index = json!({
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": [null, null],
        "requires_safety_checker": false,
        "safety_checker": [null, null],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]
    });
    write_json(&out.join("model_index.json"), &model_index)?;
    write_json(&out.join("unet/config.json"), &configs["unet"])?;
    write_json(&out.join("vae/config.json"), &configs["vae"])?;
    write_json(&out.join("text_encoder/config.json"), &configs["text_encoder"])?;
    write_json(&out.join("scheduler/scheduler_config.json"), &configs["scheduler"])?;
    write_safetensors(&out.join("unet/diffusion_pytorch_model.safetensors"), unet, dtype, None)?;
    write_safetensors(&out.join("vae/diffusion_pytorch_model.safetensors"), vae, dtype, None)?;
    write_safetensors(&out.join("text_encoder/model.safetensors"), text_encoder, dtype, None)?;
    let max_len = configs["text_encoder"]["max_position_embeddings"].as_u64().unwrap_or(77) as usize;
    crate::assets::write_clip_tokenizer(&out.join("tokenizer"), max_len)
}

/// Replaces keys of `configs` per component (`{"unet": {...}, ...}`).
pub(crate) fn merge_overrides(configs: &mut Value, overrides: &Value) -> Result<()> {
    let Some(o) = overrides.as_object() else {
        return Err(bad_input("--config", "not a JSON object", r#"give {"unet": {...}, "vae": {...}, "text_encoder": {...}, "scheduler": {...}}"#));
    };
    for (component, values) in o {
        let (Some(target), Some(values)) = (configs.get_mut(component).and_then(Value::as_object_mut), values.as_object()) else {
            return Err(bad_input("--config", format!("unknown component or non-object value `{component}`"), "use the keys unet, vae, text_encoder, scheduler"));
        };
        for (k, v) in values {
            target.insert(k.clone(), v.clone());
        }
    }
    Ok(())
}

pub(crate) fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| bad_input(path.display(), e, "report this bug"))?;
    write_atomic(path, text.as_bytes())
}

/// Writes a tiny Segment Anything checkpoint in the segment-anything layout (as `lmz/candle-sam`
/// converts it), f32, to `path`. The config travels in the file's metadata (`sam_config`), since
/// a tiny model's input size and decoder heads cannot be read off its tensors.
pub fn write_tiny_sam(path: &Path, cfg: &SamConfig, seed: u64) -> Result<()> {
    let (_, tensors) = seeded_model(seed, DType::F32, &Device::Cpu, |vb| Ok(Sam::new(vb, cfg)?))?;
    let config = serde_json::to_string(cfg).map_err(|e| bad_input(path.display(), e, "report this bug"))?;
    write_safetensors(path, tensors, DType::F32, Some(HashMap::from([("sam_config".to_string(), config)])))
}

pub(crate) fn write_safetensors(
    path: &Path,
    tensors: BTreeMap<String, Tensor>,
    dtype: DType,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let tensors = tensors
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_dtype(dtype)?)))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let bytes = safetensors::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), metadata)
        .map_err(|e| bad_input(path.display(), e, "report this bug"))?;
    write_atomic(path, &bytes)
}
