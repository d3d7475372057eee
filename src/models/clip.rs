//! CLIP with both towers, as transformers' `CLIPModel` (`models/clip/modeling_clip.py`): image
//! and text embeddings in the shared space, exactly `get_image_features` and `get_text_features`.
//!
//! The vision tower is adapted from candle-transformers 0.11.1 (MIT OR Apache-2.0),
//! `clip/vision_model.rs` and `clip/text_model.rs`: the same layers, built on our [`nn`] layers
//! (`Linear`, `LayerNorm`) and configured from transformers' `config.json`. The text tower is our
//! [`ClipTextTransformer`] (Stable Diffusion's text encoder), pooled at the end-of-text token and
//! projected.
//!
//! [`nn`]: crate::models::nn

use super::clip_text::{Activation, ClipTextConfig, ClipTextTransformer};
use super::{parse_config, unsupported};
use crate::models::nn::{layer_norm, linear, linear_no_bias, full_attention, Conv2d, Conv2dConfig, LayerNorm, Linear};
use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Embedding, VarBuilder};
use serde::Deserialize;
use serde_json::Value;

const CONFIG_FILE: &str = "config.json";
const CONFIG_FIX: &str = "use the config.json of a transformers CLIPModel, such as openai/clip-vit-large-patch14";

/// `vision_config` of a `CLIPModel`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    /// The side of the square input the position embeddings were trained for (224).
    pub image_size: usize,
    /// The side of a patch (14 for ViT-L/14, 32 for ViT-B/32).
    pub patch_size: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
}

impl ClipVisionConfig {
    /// ViT-L/14 at 224 px, the vision tower of `openai/clip-vit-large-patch14`.
    pub fn vit_large_patch14() -> Self {
        Self {
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            num_channels: 3,
            image_size: 224,
            patch_size: 14,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
        }
    }

    /// ViT-B/32 at 224 px, the vision tower of `openai/clip-vit-base-patch32`.
    pub fn vit_base_patch32() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
        }
    }

    fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }
}

/// transformers' `CLIPVisionConfig` keys, with its defaults.
#[derive(Debug, Deserialize)]
#[serde(default)]
struct RawClipVisionConfig {
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_channels: usize,
    image_size: usize,
    patch_size: usize,
    hidden_act: String,
    layer_norm_eps: f64,
}

impl Default for RawClipVisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
        }
    }
}

/// The top-level keys of transformers' `CLIPConfig` that matter here.
#[derive(Debug, Deserialize)]
#[serde(default)]
struct RawClipConfig {
    projection_dim: usize,
    logit_scale_init_value: f64,
}

impl Default for RawClipConfig {
    fn default() -> Self {
        Self { projection_dim: 512, logit_scale_init_value: 2.6592 }
    }
}

/// A `CLIPModel`'s config: both towers and the shared embedding width.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipConfig {
    pub text: ClipTextConfig,
    /// `text_config.eos_token_id`: which token's state is the text's pooled output. `2` (the
    /// value of configs written before transformers PR #24773, such as OpenAI's) means "the
    /// highest id", as transformers keeps it for those; any other id, its first occurrence.
    pub text_eos_token_id: u32,
    pub vision: ClipVisionConfig,
    /// The width of `image_embeds` and `text_embeds`.
    pub projection_dim: usize,
    pub logit_scale_init_value: f64,
}

impl ClipConfig {
    /// `openai/clip-vit-large-patch14`.
    pub fn vit_large_patch14() -> Self {
        let text = ClipTextConfig::default();
        Self { text, text_eos_token_id: 2, vision: ClipVisionConfig::vit_large_patch14(), projection_dim: 768, logit_scale_init_value: 2.6592 }
    }

    /// `openai/clip-vit-base-patch32`.
    pub fn vit_base_patch32() -> Self {
        let text = ClipTextConfig { hidden_size: 512, intermediate_size: 2048, num_attention_heads: 8, ..ClipTextConfig::default() };
        Self { text, text_eos_token_id: 2, vision: ClipVisionConfig::vit_base_patch32(), projection_dim: 512, logit_scale_init_value: 2.6592 }
    }

    /// Reads a `CLIPModel`'s `config.json` (with `text_config` and `vision_config`), with
    /// transformers' defaults for missing keys.
    ///
    /// Old configs (OpenAI's among them) may also hold `text_config_dict` / `vision_config_dict`:
    /// transformers then builds each tower from that dict alone, with its defaults for missing
    /// keys, whatever `text_config` / `vision_config` say; so does this.
    pub fn from_json(config: &Value) -> crate::Result<Self> {
        let tower = |name: &str| config.get(format!("{name}_dict")).filter(|v| v.is_object()).or_else(|| config.get(name).filter(|v| v.is_object()));
        let (Some(text_config), Some(vision_config)) = (tower("text_config"), tower("vision_config")) else {
            return Err(crate::bad_input(CONFIG_FILE, "has no text_config and vision_config: not a CLIPModel", CONFIG_FIX));
        };
        let raw: RawClipConfig = parse_config(config, CONFIG_FILE, CONFIG_FIX, &[])?;
        let text = ClipTextConfig::from_json(text_config)?;
        let text_eos_token_id = match text_config.get("eos_token_id") {
            None | Some(Value::Null) => 49407,
            Some(v) => v.as_u64().and_then(|v| u32::try_from(v).ok()).ok_or_else(|| {
                unsupported(CONFIG_FILE, "text_config.eos_token_id", v, CONFIG_FIX)
            })?,
        };
        let vision = Self::vision_from_json(vision_config)?;
        Ok(Self { text, text_eos_token_id, vision, projection_dim: raw.projection_dim, logit_scale_init_value: raw.logit_scale_init_value })
    }

    fn vision_from_json(config: &Value) -> crate::Result<ClipVisionConfig> {
        let raw: RawClipVisionConfig = parse_config(config, CONFIG_FILE, CONFIG_FIX, &[])?;
        let bad = |key: &str, value: String| unsupported(CONFIG_FILE, &format!("vision_config.{key}"), value, CONFIG_FIX);
        let hidden_act = activation(&raw.hidden_act).ok_or_else(|| bad("hidden_act", format!("{:?}", raw.hidden_act)))?;
        if raw.num_attention_heads == 0 || !raw.hidden_size.is_multiple_of(raw.num_attention_heads) {
            return Err(bad("num_attention_heads", raw.num_attention_heads.to_string()));
        }
        if raw.patch_size == 0 || raw.image_size < raw.patch_size {
            return Err(bad("patch_size", raw.patch_size.to_string()));
        }
        Ok(ClipVisionConfig {
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            num_channels: raw.num_channels,
            image_size: raw.image_size,
            patch_size: raw.patch_size,
            hidden_act,
            layer_norm_eps: raw.layer_norm_eps,
        })
    }

    /// The config as transformers writes it (`CLIPModel`'s `config.json`), for tiny models.
    pub fn to_json(&self) -> Value {
        let (t, v) = (&self.text, &self.vision);
        serde_json::json!({
            "architectures": ["CLIPModel"],
            "model_type": "clip",
            "projection_dim": self.projection_dim,
            "logit_scale_init_value": self.logit_scale_init_value,
            "text_config": {
                "model_type": "clip_text_model",
                "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
                "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
                "num_attention_heads": t.num_attention_heads,
                "max_position_embeddings": t.max_position_embeddings,
                "hidden_act": activation_name(t.hidden_act), "layer_norm_eps": t.layer_norm_eps,
                "projection_dim": self.projection_dim,
                "bos_token_id": 49406, "eos_token_id": self.text_eos_token_id, "pad_token_id": 1
            },
            "vision_config": {
                "model_type": "clip_vision_model",
                "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
                "num_hidden_layers": v.num_hidden_layers, "num_attention_heads": v.num_attention_heads,
                "num_channels": v.num_channels, "image_size": v.image_size, "patch_size": v.patch_size,
                "hidden_act": activation_name(v.hidden_act), "layer_norm_eps": v.layer_norm_eps,
                "projection_dim": self.projection_dim
            }
        })
    }
}

/// transformers' `hidden_act` names of the activations CLIP and DINOv2 use.
pub(crate) fn activation(name: &str) -> Option<Activation> {
    match name {
        "quick_gelu" => Some(Activation::QuickGelu),
        "gelu" => Some(Activation::Gelu),
        "gelu_new" | "gelu_pytorch_tanh" => Some(Activation::GeluTanh),
        _ => None,
    }
}

pub(crate) fn activation_name(a: Activation) -> &'static str {
    match a {
        Activation::QuickGelu => "quick_gelu",
        Activation::Gelu => "gelu",
        Activation::GeluTanh => "gelu_pytorch_tanh",
    }
}

/// The class token, patch embedding and position embeddings, as `CLIPVisionEmbeddings`.
#[derive(Debug, Clone)]
struct ClipVisionEmbeddings {
    class_embedding: Tensor,
    patch_embedding: Conv2d,
    position_embedding: Embedding,
    image_size: usize,
}

impl ClipVisionEmbeddings {
    fn new(vb: VarBuilder, c: &ClipVisionConfig) -> Result<Self> {
        let class_embedding = vb.get(c.hidden_size, "class_embedding")?;
        let weight = vb.pp("patch_embedding").get((c.hidden_size, c.num_channels, c.patch_size, c.patch_size), "weight")?;
        let patch_embedding = Conv2d::new(weight, None, Conv2dConfig { stride: c.patch_size, ..Default::default() });
        let position_embedding = candle_nn::embedding(c.num_patches() + 1, c.hidden_size, vb.pp("position_embedding"))?;
        Ok(Self { class_embedding, patch_embedding, position_embedding, image_size: c.image_size })
    }

    /// `(b, c, h, w)` pixels -> `(b, 1 + patches, hidden)`.
    fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = pixel_values.dims4()?;
        if (h, w) != (self.image_size, self.image_size) {
            candle_core::bail!("CLIP vision: input is {h}x{w}, the model takes {0}x{0}", self.image_size)
        }
        // 1. patches: (b, hidden, gh, gw) -> (b, gh * gw, hidden)
        let patch_embeds = self.patch_embedding.forward(pixel_values)?.flatten_from(2)?.transpose(1, 2)?;
        // 2. the class token first
        let hidden = self.class_embedding.dim(0)?;
        let class_embeds = self.class_embedding.to_dtype(patch_embeds.dtype())?.reshape((1, 1, hidden))?.expand((b, 1, hidden))?;
        let embeddings = Tensor::cat(&[&class_embeds, &patch_embeds], 1)?;
        // 3. position embeddings
        let positions = self.position_embedding.embeddings().unsqueeze(0)?;
        embeddings.broadcast_add(&positions)
    }
}

/// Multi-head self-attention without a mask, as `CLIPAttention` on images.
#[derive(Debug, Clone)]
struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    num_heads: usize,
    scale: f64,
}

impl ClipAttention {
    fn new(vb: VarBuilder, dim: usize, num_heads: usize) -> Result<Self> {
        let head_dim = dim / num_heads;
        Ok(Self {
            q_proj: linear(dim, dim, vb.pp("q_proj"))?,
            k_proj: linear(dim, dim, vb.pp("k_proj"))?,
            v_proj: linear(dim, dim, vb.pp("v_proj"))?,
            out_proj: linear(dim, dim, vb.pp("out_proj"))?,
            num_heads,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (q, k, v) = (self.q_proj.forward(xs)?, self.k_proj.forward(xs)?, self.v_proj.forward(xs)?);
        self.out_proj.forward(&full_attention(&q, &k, &v, self.num_heads, self.scale)?)
    }
}

/// A pre-norm transformer layer, as `CLIPEncoderLayer` (the vision tower's; the text tower's
/// lives in [`ClipTextTransformer`], with its causal mask).
#[derive(Debug, Clone)]
struct ClipEncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: ClipAttention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    activation: Activation,
}

impl ClipEncoderLayer {
    fn new(vb: VarBuilder, c: &ClipVisionConfig) -> Result<Self> {
        let mlp = vb.pp("mlp");
        Ok(Self {
            layer_norm1: layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("layer_norm1"))?,
            self_attn: ClipAttention::new(vb.pp("self_attn"), c.hidden_size, c.num_attention_heads)?,
            layer_norm2: layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: linear(c.hidden_size, c.intermediate_size, mlp.pp("fc1"))?,
            fc2: linear(c.intermediate_size, c.hidden_size, mlp.pp("fc2"))?,
            activation: c.hidden_act,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = (self.self_attn.forward(&self.layer_norm1.forward(xs)?)? + xs)?;
        let mlp = self.fc2.forward(&self.activation.forward(&self.fc1.forward(&self.layer_norm2.forward(&xs)?)?)?)?;
        mlp + xs
    }
}

/// The vision tower, as transformers' `CLIPVisionTransformer` (`CLIPVisionModel`).
#[derive(Debug, Clone)]
pub struct ClipVisionTransformer {
    embeddings: ClipVisionEmbeddings,
    pre_layrnorm: LayerNorm,
    layers: Vec<ClipEncoderLayer>,
    post_layernorm: LayerNorm,
}

impl ClipVisionTransformer {
    /// `vb`: the tower's root (`vision_model` of a `CLIPModel`).
    pub fn new(vb: VarBuilder, c: &ClipVisionConfig) -> Result<Self> {
        let embeddings = ClipVisionEmbeddings::new(vb.pp("embeddings"), c)?;
        // (sic: transformers' name)
        let pre_layrnorm = layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("pre_layrnorm"))?;
        let vb_layers = vb.pp("encoder").pp("layers");
        let layers = (0..c.num_hidden_layers).map(|i| ClipEncoderLayer::new(vb_layers.pp(i), c)).collect::<Result<Vec<_>>>()?;
        let post_layernorm = layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("post_layernorm"))?;
        Ok(Self { embeddings, pre_layrnorm, layers, post_layernorm })
    }

    /// `(last_hidden_state (b, 1 + patches, hidden), pooler_output (b, hidden))` for normalized
    /// pixels `(b, 3, image_size, image_size)`.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<(Tensor, Tensor)> {
        // 1. embeddings and the pre-norm
        let mut xs = self.pre_layrnorm.forward(&self.embeddings.forward(pixel_values)?)?;
        // 2. encoder
        for layer in &self.layers {
            xs = layer.forward(&xs)?;
        }
        // 3. pool: the class token, post-normed
        let pooled = self.post_layernorm.forward(&xs.narrow(1, 0, 1)?.squeeze(1)?.contiguous()?)?;
        Ok((xs, pooled))
    }
}

/// Both CLIP towers and their projections, as transformers' `CLIPModel`.
#[derive(Debug, Clone)]
pub struct ClipModel {
    text_model: ClipTextTransformer,
    vision_model: ClipVisionTransformer,
    text_projection: Linear,
    visual_projection: Linear,
    logit_scale: Option<Tensor>,
    config: ClipConfig,
}

impl ClipModel {
    /// `vb`: the root of a `CLIPModel`'s `model.safetensors` (`text_model.*`, `vision_model.*`,
    /// `text_projection.weight`, `visual_projection.weight`, `logit_scale`).
    pub fn new(vb: VarBuilder, config: ClipConfig) -> Result<Self> {
        let c = &config;
        let text_model = ClipTextTransformer::new(vb.clone(), c.text.clone())?;
        let vision_model = ClipVisionTransformer::new(vb.pp("vision_model"), &c.vision)?;
        let text_projection = linear_no_bias(c.text.hidden_size, c.projection_dim, vb.pp("text_projection"))?;
        let visual_projection = linear_no_bias(c.vision.hidden_size, c.projection_dim, vb.pp("visual_projection"))?;
        let logit_scale = if vb.contains_tensor("logit_scale") { Some(vb.get((), "logit_scale")?) } else { None };
        Ok(Self { text_model, vision_model, text_projection, visual_projection, logit_scale, config })
    }

    pub fn config(&self) -> &ClipConfig {
        &self.config
    }

    /// `exp(logit_scale)`: the temperature of CLIP's contrastive logits (100 in OpenAI's models);
    /// `None` when the checkpoint does not hold it.
    pub fn logit_scale(&self) -> Result<Option<f32>> {
        self.logit_scale.as_ref().map(|t| t.to_dtype(DType::F32)?.exp()?.to_scalar::<f32>()).transpose()
    }

    /// `get_image_features`: `image_embeds (b, projection_dim)`, not normalized, for pixels
    /// `(b, 3, image_size, image_size)` as [`crate::eval::preprocess`] makes them.
    pub fn get_image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (_, pooled) = self.vision_model.forward(pixel_values)?;
        self.visual_projection.forward(&pooled)
    }

    /// `get_text_features`: `text_embeds (b, projection_dim)`, not normalized, for token ids
    /// `(b, seq_len)` as [`crate::tokenizer::ClipTokenizer`] makes them.
    pub fn get_text_features(&self, input_ids: &Tensor) -> Result<Tensor> {
        let last_hidden_state = self.text_model.forward(input_ids)?;
        let positions = self.pooled_positions(input_ids)?;
        let positions = Tensor::from_vec(positions, last_hidden_state.dim(0)?, last_hidden_state.device())?;
        // last_hidden_state[arange(b), positions]
        let (b, n, hidden) = last_hidden_state.dims3()?;
        let offsets = Tensor::arange(0u32, b as u32, positions.device())?.affine(n as f64, 0.)?.to_dtype(DType::U32)?;
        let rows = (positions + offsets)?;
        let pooled = last_hidden_state.reshape((b * n, hidden))?.index_select(&rows, 0)?;
        self.text_projection.forward(&pooled)
    }

    /// The position pooled per sequence, by transformers' rule for the config's `eos_token_id`.
    fn pooled_positions(&self, input_ids: &Tensor) -> Result<Vec<u32>> {
        let ids = input_ids.to_dtype(DType::I64)?.to_vec2::<i64>()?;
        let eos = self.config.text_eos_token_id as i64;
        Ok(ids
            .iter()
            .map(|row| {
                let position = if eos == 2 {
                    // argmax: the first of the highest id (the end-of-text token of CLIP's vocabulary)
                    let max = row.iter().copied().max().unwrap_or(0);
                    row.iter().position(|&id| id == max)
                } else {
                    // the first end-of-text token; 0 when there is none, as argmax of all-false
                    row.iter().position(|&id| id == eos)
                };
                position.unwrap_or(0) as u32
            })
            .collect())
    }
}

/// Cosine similarity of two `(b, d)` batches of embeddings, row by row: `(b,)`.
pub fn cosine_similarity(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
    let norm = |t: &Tensor| t.sqr()?.sum_keepdim(D::Minus1)?.sqrt();
    let a = a.broadcast_div(&norm(&a)?)?;
    let b = b.broadcast_div(&norm(&b)?)?;
    (a * b)?.sum(D::Minus1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_dicts_replace_the_towers_configs_as_in_transformers() {
        let config = serde_json::json!({
            "projection_dim": 768,
            "text_config": {"hidden_size": 512, "hidden_act": "gelu", "eos_token_id": 2},
            "text_config_dict": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12},
            "vision_config": {"hidden_size": 1024, "patch_size": 14, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24},
            "vision_config_dict": null
        });
        let c = ClipConfig::from_json(&config).unwrap();
        // the dict wins, and transformers' defaults fill what it lacks (quick_gelu, eos 49407)
        assert_eq!((c.text.hidden_size, c.text.hidden_act, c.text_eos_token_id), (768, Activation::QuickGelu, 49407));
        assert_eq!((c.vision.hidden_size, c.vision.patch_size, c.projection_dim), (1024, 14, 768));
        assert_eq!(ClipConfig::from_json(&ClipConfig::vit_large_patch14().to_json()).unwrap(), ClipConfig::vit_large_patch14());
        assert!(ClipConfig::from_json(&serde_json::json!({"model_type": "dinov2"})).is_err());
    }
}
