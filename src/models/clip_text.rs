//! Adapted from candle-transformers 0.11.1 (MIT OR Apache-2.0), stable_diffusion/clip.rs
//!
//! The CLIP text encoder of Stable Diffusion, as transformers' `CLIPTextModel`
//! (`models/clip/modeling_clip.py`): token ids to the last hidden state, after the final layer norm.

use super::{parse_config, unsupported};
use crate::models::nn::{layer_norm, linear, softmax_last_dim, LayerNorm, Linear};
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};
use serde::Deserialize;
use serde_json::Value;

const CONFIG_FILE: &str = "text_encoder/config.json";
const CONFIG_FIX: &str = "use the CLIP text encoder config of a Stable Diffusion v1.x/2.x pipeline";

/// The MLP activation, transformers' `hidden_act`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(1.702 x)` (`"quick_gelu"`, SD 1.x).
    QuickGelu,
    /// The exact GELU (`"gelu"`, SD 2.x).
    Gelu,
    /// The tanh approximation of GELU (`"gelu_new"`, `"gelu_pytorch_tanh"`).
    GeluTanh,
}

impl Module for Activation {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Activation::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702f64)?)?,
            Activation::Gelu => xs.gelu_erf(),
            Activation::GeluTanh => xs.gelu(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    /// The width of the hidden states (the UNet's `cross_attention_dim`).
    pub hidden_size: usize,
    /// The width of the MLPs.
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// The longest token sequence (77).
    pub max_position_embeddings: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
}

impl Default for ClipTextConfig {
    /// The text encoder of Stable Diffusion v1.5 (openai/clip-vit-large-patch14).
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
        }
    }
}

/// transformers' `CLIPTextConfig` keys, with its defaults.
#[derive(Debug, Deserialize)]
#[serde(default)]
struct RawClipTextConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    max_position_embeddings: usize,
    hidden_act: String,
    layer_norm_eps: f64,
}

impl Default for RawClipTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
        }
    }
}

impl ClipTextConfig {
    /// Reads transformers' `text_encoder/config.json` (a `CLIPTextModel`; a full `CLIPModel`
    /// config is read from its `text_config`), with transformers' defaults for missing keys.
    pub fn from_json(config: &Value) -> crate::Result<Self> {
        let config = config.get("text_config").unwrap_or(config);
        let raw: RawClipTextConfig = parse_config(config, CONFIG_FILE, CONFIG_FIX, &[])?;
        let bad = |key: &str, value: String| unsupported(CONFIG_FILE, key, value, CONFIG_FIX);
        let hidden_act = match raw.hidden_act.as_str() {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluTanh,
            other => return Err(bad("hidden_act", format!("{other:?}"))),
        };
        if raw.num_attention_heads == 0 || !raw.hidden_size.is_multiple_of(raw.num_attention_heads) {
            return Err(bad("num_attention_heads", raw.num_attention_heads.to_string()));
        }
        Ok(Self {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            max_position_embeddings: raw.max_position_embeddings,
            hidden_act,
            layer_norm_eps: raw.layer_norm_eps,
        })
    }
}

/// Token and position embeddings, as `CLIPTextEmbeddings`.
#[derive(Debug, Clone)]
struct ClipTextEmbeddings {
    token_embedding: Embedding,
    position_embedding: Embedding,
}

impl ClipTextEmbeddings {
    fn new(vb: VarBuilder, c: &ClipTextConfig) -> Result<Self> {
        let token_embedding = candle_nn::embedding(c.vocab_size, c.hidden_size, vb.pp("token_embedding"))?;
        let position_embedding =
            candle_nn::embedding(c.max_position_embeddings, c.hidden_size, vb.pp("position_embedding"))?;
        Ok(Self { token_embedding, position_embedding })
    }

    fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let seq_len = input_ids.dim(1)?;
        let position_ids = Tensor::arange(0u32, seq_len as u32, input_ids.device())?.unsqueeze(0)?;
        let token_embedding = self.token_embedding.forward(input_ids)?;
        let position_embedding = self.position_embedding.forward(&position_ids)?;
        token_embedding.broadcast_add(&position_embedding)
    }
}

/// Multi-head self-attention, as `CLIPAttention`.
#[derive(Debug, Clone)]
struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    num_heads: usize,
    head_dim: usize,
    scale: f64,
}

impl ClipAttention {
    fn new(vb: VarBuilder, c: &ClipTextConfig) -> Result<Self> {
        let dim = c.hidden_size;
        let head_dim = dim / c.num_attention_heads;
        Ok(Self {
            q_proj: linear(dim, dim, vb.pp("q_proj"))?,
            k_proj: linear(dim, dim, vb.pp("k_proj"))?,
            v_proj: linear(dim, dim, vb.pp("v_proj"))?,
            out_proj: linear(dim, dim, vb.pp("out_proj"))?,
            num_heads: c.num_attention_heads,
            head_dim,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    /// `(b, n, heads * d)` -> `(b * heads, n, d)`.
    fn heads_to_batch(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, n, _) = xs.dims3()?;
        xs.reshape((b, n, self.num_heads, self.head_dim))?.transpose(1, 2)?.contiguous()?.reshape((
            b * self.num_heads,
            n,
            self.head_dim,
        ))
    }

    /// `causal_mask`: `(n, n)`, 0 on and below the diagonal and very negative above.
    fn forward(&self, xs: &Tensor, causal_mask: &Tensor) -> Result<Tensor> {
        let in_dtype = xs.dtype();
        let (b, n, dim) = xs.dims3()?;
        let dtype = match in_dtype {
            DType::F16 | DType::BF16 => DType::F32,
            d => d,
        };
        let q = self.heads_to_batch(&self.q_proj.forward(xs)?)?.to_dtype(dtype)?;
        let k = self.heads_to_batch(&self.k_proj.forward(xs)?)?.to_dtype(dtype)?;
        let v = self.heads_to_batch(&self.v_proj.forward(xs)?)?.to_dtype(dtype)?;
        let scores = (q.matmul(&k.t()?)? * self.scale)?.broadcast_add(&causal_mask.to_dtype(dtype)?)?;
        let xs = softmax_last_dim(&scores)?.matmul(&v)?.to_dtype(in_dtype)?;
        let xs = xs.reshape((b, self.num_heads, n, self.head_dim))?.transpose(1, 2)?.reshape((b, n, dim))?;
        self.out_proj.forward(&xs)
    }
}

#[derive(Debug, Clone)]
struct ClipMlp {
    fc1: Linear,
    fc2: Linear,
    activation: Activation,
}

impl ClipMlp {
    fn new(vb: VarBuilder, c: &ClipTextConfig) -> Result<Self> {
        Ok(Self {
            fc1: linear(c.hidden_size, c.intermediate_size, vb.pp("fc1"))?,
            fc2: linear(c.intermediate_size, c.hidden_size, vb.pp("fc2"))?,
            activation: c.hidden_act,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.activation.forward(&self.fc1.forward(xs)?)?)
    }
}

/// A pre-norm transformer layer, as `CLIPEncoderLayer`.
#[derive(Debug, Clone)]
struct ClipEncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: ClipAttention,
    layer_norm2: LayerNorm,
    mlp: ClipMlp,
}

impl ClipEncoderLayer {
    fn new(vb: VarBuilder, c: &ClipTextConfig) -> Result<Self> {
        Ok(Self {
            layer_norm1: layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("layer_norm1"))?,
            self_attn: ClipAttention::new(vb.pp("self_attn"), c)?,
            layer_norm2: layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("layer_norm2"))?,
            mlp: ClipMlp::new(vb.pp("mlp"), c)?,
        })
    }

    fn forward(&self, xs: &Tensor, causal_mask: &Tensor) -> Result<Tensor> {
        let xs = (self.self_attn.forward(&self.layer_norm1.forward(xs)?, causal_mask)? + xs)?;
        self.mlp.forward(&self.layer_norm2.forward(&xs)?)? + xs
    }
}

/// The CLIP text transformer, as transformers' `CLIPTextTransformer`.
#[derive(Debug, Clone)]
pub struct ClipTextTransformer {
    embeddings: ClipTextEmbeddings,
    layers: Vec<ClipEncoderLayer>,
    final_layer_norm: LayerNorm,
    config: ClipTextConfig,
}

impl ClipTextTransformer {
    /// `vb`: the root of `text_encoder/model.safetensors`, whose weights are named `text_model.*`
    /// (names without the prefix are read too).
    pub fn new(vb: VarBuilder, config: ClipTextConfig) -> Result<Self> {
        let c = &config;
        let root_level = !vb.contains_tensor("text_model.embeddings.token_embedding.weight")
            && vb.contains_tensor("embeddings.token_embedding.weight");
        let vb = if root_level { vb } else { vb.pp("text_model") };
        let embeddings = ClipTextEmbeddings::new(vb.pp("embeddings"), c)?;
        let vb_layers = vb.pp("encoder").pp("layers");
        let layers =
            (0..c.num_hidden_layers).map(|i| ClipEncoderLayer::new(vb_layers.pp(i), c)).collect::<Result<Vec<_>>>()?;
        let final_layer_norm = layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("final_layer_norm"))?;
        Ok(Self { embeddings, layers, final_layer_norm, config })
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// `(seq_len, seq_len)`: 0 where a token may attend (itself and before), the most negative f32 after.
    fn causal_mask(seq_len: usize, dtype: DType, device: &Device) -> Result<Tensor> {
        let mask: Vec<f32> =
            (0..seq_len).flat_map(|i| (0..seq_len).map(move |j| if j > i { f32::MIN } else { 0. })).collect();
        Tensor::from_vec(mask, (seq_len, seq_len), device)?.to_dtype(dtype)
    }

    /// The last hidden state `(batch, seq_len, hidden_size)` for token ids `(batch, seq_len)`
    /// (any integer dtype).
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        // 1. embeddings
        let input_ids = input_ids.to_dtype(DType::U32)?;
        let xs = self.embeddings.forward(&input_ids)?;
        // 2. encoder layers under a causal mask
        let mask_dtype = match xs.dtype() {
            DType::F16 | DType::BF16 => DType::F32,
            d => d,
        };
        let causal_mask = Self::causal_mask(input_ids.dim(1)?, mask_dtype, xs.device())?;
        let mut xs = xs;
        for layer in self.layers.iter() {
            xs = layer.forward(&xs, &causal_mask)?;
        }
        // 3. final layer norm
        self.final_layer_norm.forward(&xs)
    }
}
