//! Tiny random-weight metric models in the transformers layout, for tests and demos: a CLIP with
//! both towers (`config.json`, `model.safetensors`, `preprocessor_config.json` and the real CLIP
//! tokenizer) and a DINOv2. The weights are a deterministic function of the seed.

use super::preprocess::{ImageProcessor, ResizeTo};
use crate::error::{bad_input, Result};
use crate::image_io::write_atomic;
use crate::models::clip::{ClipConfig, ClipModel, ClipVisionConfig};
use crate::models::clip_text::{Activation, ClipTextConfig};
use crate::models::dinov2::{Dinov2Config, Dinov2Model};
use crate::tiny::seeded_model;
use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// The tiny CLIP: CLIP's real vocabulary (so the bundled tokenizer works), 32 wide, 2 layers
/// per tower, 32 px images in 8 px patches, 16-dimensional embeddings.
pub fn tiny_clip_config() -> ClipConfig {
    let text = ClipTextConfig {
        vocab_size: 49408,
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        max_position_embeddings: 77,
        hidden_act: Activation::QuickGelu,
        layer_norm_eps: 1e-5,
    };
    let vision = ClipVisionConfig {
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_channels: 3,
        image_size: 32,
        patch_size: 8,
        hidden_act: Activation::QuickGelu,
        layer_norm_eps: 1e-5,
    };
    ClipConfig { text, text_eos_token_id: 2, vision, projection_dim: 16, logit_scale_init_value: 2.6592 }
}

/// The tiny CLIP's image processor: `CLIPImageProcessor` at 32 px.
pub fn tiny_clip_processor() -> ImageProcessor {
    ImageProcessor { size: ResizeTo::ShortestEdge(32), crop_size: (32, 32), ..ImageProcessor::clip() }
}

/// The tiny DINOv2: 32 wide, 2 layers, positions trained for a 7 x 7 grid of 8 px patches (56 px)
/// and used at 4 x 4 (32 px crops), so that every image takes the interpolation path, as the
/// real models do (trained at 518 px, used at 224).
pub fn tiny_dinov2_config() -> Dinov2Config {
    Dinov2Config {
        hidden_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        mlp_ratio: 4.0,
        hidden_act: Activation::Gelu,
        layer_norm_eps: 1e-6,
        image_size: 56,
        patch_size: 8,
        num_channels: 3,
        qkv_bias: true,
        use_swiglu_ffn: false,
    }
}

/// The tiny DINOv2's image processor: the dinov2 models' `BitImageProcessor` scaled down
/// (shortest side 36, crop 32).
pub fn tiny_dinov2_processor() -> ImageProcessor {
    ImageProcessor { size: ResizeTo::ShortestEdge(36), crop_size: (32, 32), ..ImageProcessor::dinov2() }
}

/// Writes a tiny random-weight `CLIPModel` to `dir`: `config.json`, `model.safetensors` (f32),
/// `preprocessor_config.json` and the CLIP tokenizer files.
pub fn write_tiny_clip(dir: &Path, seed: u64) -> Result<()> {
    write_clip(dir, &tiny_clip_config(), &tiny_clip_processor(), seed)
}

/// [`write_tiny_clip`] for any config: with [`ClipConfig::vit_large_patch14`] it makes a
/// full-size model with random weights (for timing).
pub fn write_clip(dir: &Path, config: &ClipConfig, processor: &ImageProcessor, seed: u64) -> Result<()> {
    let (_, tensors) = seeded_model(seed, DType::F32, &Device::Cpu, |vb| Ok(ClipModel::new(vb, config.clone())?))?;
    write_json(&dir.join("config.json"), &config.to_json())?;
    write_json(&dir.join("preprocessor_config.json"), &processor.to_json("CLIPImageProcessor"))?;
    write_safetensors(&dir.join("model.safetensors"), tensors)?;
    crate::assets::write_clip_tokenizer(dir, 77)
}

/// Writes a tiny random-weight `Dinov2Model` to `dir`: `config.json`, `model.safetensors` (f32)
/// and `preprocessor_config.json`.
pub fn write_tiny_dinov2(dir: &Path, seed: u64) -> Result<()> {
    write_dinov2(dir, &tiny_dinov2_config(), &tiny_dinov2_processor(), seed)
}

/// [`write_tiny_dinov2`] for any config ([`Dinov2Config::base`]: full size, random weights).
pub fn write_dinov2(dir: &Path, config: &Dinov2Config, processor: &ImageProcessor, seed: u64) -> Result<()> {
    let (_, mut tensors) = seeded_model(seed, DType::F32, &Device::Cpu, |vb| Ok(Dinov2Model::new(vb, config.clone())?))?;
    // transformers' Dinov2Model holds a mask token (pre-training only) that the model here never reads.
    tensors.insert("embeddings.mask_token".into(), Tensor::zeros((1, config.hidden_size), DType::F32, &Device::Cpu)?);
    write_json(&dir.join("config.json"), &config.to_json())?;
    write_json(&dir.join("preprocessor_config.json"), &processor.to_json("BitImageProcessor"))?;
    write_safetensors(&dir.join("model.safetensors"), tensors)
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| bad_input(path.display(), e, "report this bug"))?;
    write_atomic(path, text.as_bytes())
}

fn write_safetensors(path: &Path, tensors: BTreeMap<String, Tensor>) -> Result<()> {
    let bytes = safetensors::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), None)
        .map_err(|e| bad_input(path.display(), e, "report this bug"))?;
    write_atomic(path, &bytes)
}
