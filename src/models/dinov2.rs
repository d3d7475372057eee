//! DINOv2, as transformers' `Dinov2Model` (`models/dinov2/modeling_dinov2.py`), in the hub's
//! checkpoint layout (`encoder.layer.N.attention.attention.query`, ...; transformers 5 renames
//! these to `q_proj`, ... when it loads them and back when it saves, and both are read here).
//! The image's embedding is the class token after the final layer norm (`pooler_output`,
//! `last_hidden_state[:, 0]`), the one DreamBooth's DINO metric compares.
//!
//! Written after candle-transformers 0.11.1's `dinov2.rs` (MIT OR Apache-2.0), which holds the
//! original facebookresearch layout (`blocks.N.attn.qkv`); this one follows transformers' names,
//! interpolates the position embeddings exactly as transformers does, and is configured from its
//! `config.json`.

use super::clip::{activation, activation_name};
use super::clip_text::Activation;
use super::{parse_config, unsupported};
use crate::models::nn::{layer_norm, linear, full_attention, Conv2d, Conv2dConfig, LayerNorm, Linear};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;
use serde_json::Value;

const CONFIG_FILE: &str = "config.json";
const CONFIG_FIX: &str = "use the config.json of a transformers Dinov2Model, such as facebook/dinov2-base";

#[derive(Debug, Clone, PartialEq)]
pub struct Dinov2Config {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// The MLP's width is `int(hidden_size * mlp_ratio)`.
    pub mlp_ratio: f64,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
    /// The side of the square input the position embeddings were trained for (518): other
    /// sizes interpolate them.
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    pub qkv_bias: bool,
    /// `true`: the SwiGLU feed-forward of the giant model (`mlp.weights_in`, `mlp.weights_out`).
    pub use_swiglu_ffn: bool,
}

impl Dinov2Config {
    /// `facebook/dinov2-base` (ViT-B/14).
    pub fn base() -> Self {
        Self { hidden_size: 768, num_hidden_layers: 12, num_attention_heads: 12, ..Self::small() }
    }

    /// `facebook/dinov2-small` (ViT-S/14).
    pub fn small() -> Self {
        Self {
            hidden_size: 384,
            num_hidden_layers: 12,
            num_attention_heads: 6,
            mlp_ratio: 4.0,
            hidden_act: Activation::Gelu,
            layer_norm_eps: 1e-6,
            image_size: 518,
            patch_size: 14,
            num_channels: 3,
            qkv_bias: true,
            use_swiglu_ffn: false,
        }
    }

    /// `facebook/dinov2-large` (ViT-L/14).
    pub fn large() -> Self {
        Self { hidden_size: 1024, num_hidden_layers: 24, num_attention_heads: 16, ..Self::small() }
    }

    fn mlp_hidden(&self) -> usize {
        (self.hidden_size as f64 * self.mlp_ratio) as usize
    }

    fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Reads a `Dinov2Model`'s `config.json`, with transformers' defaults for missing keys.
    pub fn from_json(config: &Value) -> crate::Result<Self> {
        let raw: RawDinov2Config = parse_config(config, CONFIG_FILE, CONFIG_FIX, &[])?;
        let bad = |key: &str, value: String| unsupported(CONFIG_FILE, key, value, CONFIG_FIX);
        let hidden_act = activation(&raw.hidden_act).ok_or_else(|| bad("hidden_act", format!("{:?}", raw.hidden_act)))?;
        if raw.num_attention_heads == 0 || !raw.hidden_size.is_multiple_of(raw.num_attention_heads) {
            return Err(bad("num_attention_heads", raw.num_attention_heads.to_string()));
        }
        let square = |key: &str, v: &Value| -> crate::Result<usize> {
            let side = match v {
                Value::Number(n) => n.as_u64(),
                Value::Array(a) if a.len() == 2 && a[0] == a[1] => a[0].as_u64(),
                _ => None,
            };
            side.filter(|&s| s > 0).map(|s| s as usize).ok_or_else(|| bad(key, format!("{v} (only a square size is supported)")))
        };
        let image_size = square("image_size", &raw.image_size)?;
        let patch_size = square("patch_size", &raw.patch_size)?;
        if image_size < patch_size {
            return Err(bad("patch_size", patch_size.to_string()));
        }
        Ok(Self {
            hidden_size: raw.hidden_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            mlp_ratio: raw.mlp_ratio,
            hidden_act,
            layer_norm_eps: raw.layer_norm_eps,
            image_size,
            patch_size,
            num_channels: raw.num_channels,
            qkv_bias: raw.qkv_bias,
            use_swiglu_ffn: raw.use_swiglu_ffn,
        })
    }

    /// The config as transformers writes it (`Dinov2Model`'s `config.json`), for tiny models.
    pub fn to_json(&self) -> Value {
        // transformers 5 types `mlp_ratio` as an int and refuses 4.0
        let mlp_ratio: Value = if self.mlp_ratio.fract() == 0.0 { (self.mlp_ratio as u64).into() } else { self.mlp_ratio.into() };
        serde_json::json!({
            "architectures": ["Dinov2Model"],
            "model_type": "dinov2",
            "hidden_size": self.hidden_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "mlp_ratio": mlp_ratio,
            "hidden_act": activation_name(self.hidden_act), "layer_norm_eps": self.layer_norm_eps,
            "image_size": self.image_size, "patch_size": self.patch_size, "num_channels": self.num_channels,
            "qkv_bias": self.qkv_bias, "use_swiglu_ffn": self.use_swiglu_ffn,
            "layerscale_value": 1.0, "use_mask_token": true, "initializer_range": 0.02
        })
    }
}

/// transformers' `Dinov2Config` keys, with its defaults.
#[derive(Debug, Deserialize)]
#[serde(default)]
struct RawDinov2Config {
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    mlp_ratio: f64,
    hidden_act: String,
    layer_norm_eps: f64,
    image_size: Value,
    patch_size: Value,
    num_channels: usize,
    qkv_bias: bool,
    use_swiglu_ffn: bool,
}

impl Default for RawDinov2Config {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            mlp_ratio: 4.0,
            hidden_act: "gelu".into(),
            layer_norm_eps: 1e-6,
            image_size: 224.into(),
            patch_size: 14.into(),
            num_channels: 3,
            qkv_bias: true,
            use_swiglu_ffn: false,
        }
    }
}

/// The class token, patch embeddings and position embeddings, as `Dinov2Embeddings`.
#[derive(Debug, Clone)]
struct Dinov2Embeddings {
    cls_token: Tensor,
    projection: Conv2d,
    /// `(1, 1 + grid * grid, hidden)`.
    position_embeddings: Tensor,
    patch_size: usize,
    grid: usize,
}

impl Dinov2Embeddings {
    fn new(vb: VarBuilder, c: &Dinov2Config) -> Result<Self> {
        let h = c.hidden_size;
        let cls_token = vb.get((1, 1, h), "cls_token")?;
        let proj = vb.pp("patch_embeddings").pp("projection");
        let weight = proj.get((h, c.num_channels, c.patch_size, c.patch_size), "weight")?;
        let bias = proj.get(h, "bias")?;
        let projection = Conv2d::new(weight, Some(bias), Conv2dConfig { stride: c.patch_size, ..Default::default() });
        let position_embeddings = vb.get((1, c.grid() * c.grid() + 1, h), "position_embeddings")?;
        // `mask_token` is only used in pre-training (`bool_masked_pos`); it is not loaded.
        Ok(Self { cls_token, projection, position_embeddings, patch_size: c.patch_size, grid: c.grid() })
    }

    /// `interpolate_pos_encoding`: the position embeddings for a `height x width` patch grid,
    /// `(1, 1 + height * width, hidden)`. The trained grid is resized with PyTorch's bicubic
    /// interpolation (`align_corners=False`, no antialias, `a = -0.75`), as transformers 5 does
    /// (`interpolate(size=(height, width))`; older versions passed a `scale_factor` with a 0.1
    /// offset instead), in f32.
    fn interpolate_pos_encoding(&self, height: usize, width: usize) -> Result<Tensor> {
        if (height, width) == (self.grid, self.grid) {
            return Ok(self.position_embeddings.clone());
        }
        let dtype = self.position_embeddings.dtype();
        let (_, n, dim) = self.position_embeddings.dims3()?;
        let class_pos_embed = self.position_embeddings.narrow(1, 0, 1)?;
        let grid = self.position_embeddings.narrow(1, 1, n - 1)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let resized = bicubic_resize(&grid, self.grid, self.grid, dim, height, width);
        let patch_pos_embed = Tensor::from_vec(resized, (1, height * width, dim), self.position_embeddings.device())?.to_dtype(dtype)?;
        Tensor::cat(&[&class_pos_embed, &patch_pos_embed], 1)
    }

    /// `(b, c, h, w)` pixels -> `(b, 1 + patches, hidden)`.
    fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = pixel_values.dims4()?;
        // 1. patches: (b, hidden, gh, gw) -> (b, gh * gw, hidden)
        let patches = self.projection.forward(pixel_values)?;
        let (gh, gw) = (patches.dim(2)?, patches.dim(3)?);
        let patches = patches.flatten_from(2)?.transpose(1, 2)?;
        // 2. the class token first
        let hidden = self.cls_token.dim(2)?;
        let cls = self.cls_token.to_dtype(patches.dtype())?.expand((b, 1, hidden))?;
        let embeddings = Tensor::cat(&[&cls, &patches], 1)?;
        // 3. position embeddings, interpolated to the input's grid
        debug_assert_eq!((gh, gw), (h / self.patch_size, w / self.patch_size));
        embeddings.broadcast_add(&self.interpolate_pos_encoding(gh, gw)?.to_dtype(embeddings.dtype())?)
    }
}

/// `torch.nn.functional.interpolate(mode="bicubic", align_corners=False)` of an `(h, w, c)` grid
/// (row-major, channels last) to `(out_h, out_w, c)`: cubic convolution with `a = -0.75`, source
/// coordinates `(dst + 0.5) * in / out - 0.5`, border samples repeated.
pub fn bicubic_resize(src: &[f32], h: usize, w: usize, c: usize, out_h: usize, out_w: usize) -> Vec<f32> {
    // (first index, four weights) per output coordinate along one axis
    let taps = |in_size: usize, out_size: usize| -> Vec<(i64, [f32; 4])> {
        let scale = in_size as f32 / out_size as f32;
        (0..out_size)
            .map(|d| {
                let real = scale * (d as f32 + 0.5) - 0.5;
                let floor = real.floor();
                (floor as i64, cubic_weights(real - floor))
            })
            .collect()
    };
    let (ty, tx) = (taps(h, out_h), taps(w, out_w));
    let clamp = |i: i64, n: usize| i.clamp(0, n as i64 - 1) as usize;
    let mut out = vec![0f32; out_h * out_w * c];
    let mut row = vec![0f32; c];
    for (oy, (y0, wy)) in ty.iter().enumerate() {
        for (ox, (x0, wx)) in tx.iter().enumerate() {
            let dst = &mut out[(oy * out_w + ox) * c..][..c];
            for (j, wyj) in wy.iter().enumerate() {
                let y = clamp(y0 - 1 + j as i64, h);
                // interpolate along x on row y, then accumulate along y
                row.iter_mut().for_each(|v| *v = 0.);
                for (i, wxi) in wx.iter().enumerate() {
                    let x = clamp(x0 - 1 + i as i64, w);
                    let s = &src[(y * w + x) * c..][..c];
                    row.iter_mut().zip(s).for_each(|(r, v)| *r += wxi * v);
                }
                dst.iter_mut().zip(&row).for_each(|(d, r)| *d += wyj * r);
            }
        }
    }
    out
}

/// PyTorch's `get_cubic_upsample_coefficients` for the fraction `t`, `A = -0.75`.
fn cubic_weights(t: f32) -> [f32; 4] {
    const A: f32 = -0.75;
    let near = |x: f32| ((A + 2.) * x - (A + 3.)) * x * x + 1.;
    let far = |x: f32| ((A * x - 5. * A) * x + 8. * A) * x - 4. * A;
    [far(t + 1.), near(t), near(1. - t), far(2. - t)]
}

/// Multi-head self-attention, as `Dinov2Attention` (`Dinov2SelfAttention` + `Dinov2SelfOutput`
/// before transformers 5).
#[derive(Debug, Clone)]
struct Dinov2Attention {
    query: Linear,
    key: Linear,
    value: Linear,
    output: Linear,
    num_heads: usize,
    scale: f64,
}

impl Dinov2Attention {
    fn new(vb: VarBuilder, c: &Dinov2Config) -> Result<Self> {
        let dim = c.hidden_size;
        let head_dim = dim / c.num_attention_heads;
        let lin = |vb: VarBuilder| crate::models::nn::linear_b(dim, dim, c.qkv_bias, vb);
        // The hub's names, else transformers 5's own.
        let (query, key, value, output) = if vb.contains_tensor("attention.query.weight") || !vb.contains_tensor("q_proj.weight") {
            let a = vb.pp("attention");
            (lin(a.pp("query"))?, lin(a.pp("key"))?, lin(a.pp("value"))?, linear(dim, dim, vb.pp("output").pp("dense"))?)
        } else {
            (lin(vb.pp("q_proj"))?, lin(vb.pp("k_proj"))?, lin(vb.pp("v_proj"))?, linear(dim, dim, vb.pp("o_proj"))?)
        };
        Ok(Self { query, key, value, output, num_heads: c.num_attention_heads, scale: (head_dim as f64).powf(-0.5) })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (q, k, v) = (self.query.forward(xs)?, self.key.forward(xs)?, self.value.forward(xs)?);
        self.output.forward(&full_attention(&q, &k, &v, self.num_heads, self.scale)?)
    }
}

/// The feed-forward: `Dinov2MLP` (`fc1`, activation, `fc2`) or `Dinov2SwiGLUFFN`.
#[derive(Debug, Clone)]
enum Dinov2Mlp {
    Mlp { fc1: Linear, fc2: Linear, activation: Activation },
    /// The hub stores the gate and up projections as one `weights_in`, gate first.
    SwiGlu { gate_proj: Linear, up_proj: Linear, down_proj: Linear },
}

impl Dinov2Mlp {
    fn new(vb: VarBuilder, c: &Dinov2Config) -> Result<Self> {
        let h = c.hidden_size;
        if !c.use_swiglu_ffn {
            let hidden = c.mlp_hidden();
            return Ok(Self::Mlp { fc1: linear(h, hidden, vb.pp("fc1"))?, fc2: linear(hidden, h, vb.pp("fc2"))?, activation: c.hidden_act });
        }
        // (int(hidden_features * 2 / 3) + 7) // 8 * 8
        let hidden = (c.mlp_hidden() * 2 / 3).div_ceil(8) * 8;
        if vb.contains_tensor("weights_in.weight") {
            let w = vb.pp("weights_in");
            let (weight, bias) = (w.get((2 * hidden, h), "weight")?, w.get(2 * hidden, "bias")?);
            let part = |i: usize| -> Result<Linear> { Ok(Linear::new(weight.narrow(0, i * hidden, hidden)?, Some(bias.narrow(0, i * hidden, hidden)?))) };
            Ok(Self::SwiGlu { gate_proj: part(0)?, up_proj: part(1)?, down_proj: linear(hidden, h, vb.pp("weights_out"))? })
        } else {
            Ok(Self::SwiGlu {
                gate_proj: linear(h, hidden, vb.pp("gate_proj"))?,
                up_proj: linear(h, hidden, vb.pp("up_proj"))?,
                down_proj: linear(hidden, h, vb.pp("down_proj"))?,
            })
        }
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Mlp { fc1, fc2, activation } => fc2.forward(&activation.forward(&fc1.forward(xs)?)?),
            Self::SwiGlu { gate_proj, up_proj, down_proj } => {
                down_proj.forward(&(candle_nn::ops::silu(&gate_proj.forward(xs)?)? * up_proj.forward(xs)?)?)
            }
        }
    }
}

/// A pre-norm transformer layer with layer scale, as `Dinov2Layer`.
#[derive(Debug, Clone)]
struct Dinov2Layer {
    norm1: LayerNorm,
    attention: Dinov2Attention,
    layer_scale1: Tensor,
    norm2: LayerNorm,
    mlp: Dinov2Mlp,
    layer_scale2: Tensor,
}

impl Dinov2Layer {
    fn new(vb: VarBuilder, c: &Dinov2Config) -> Result<Self> {
        let h = c.hidden_size;
        Ok(Self {
            norm1: layer_norm(h, c.layer_norm_eps, vb.pp("norm1"))?,
            attention: Dinov2Attention::new(vb.pp("attention"), c)?,
            layer_scale1: vb.pp("layer_scale1").get(h, "lambda1")?,
            norm2: layer_norm(h, c.layer_norm_eps, vb.pp("norm2"))?,
            mlp: Dinov2Mlp::new(vb.pp("mlp"), c)?,
            layer_scale2: vb.pp("layer_scale2").get(h, "lambda1")?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let attn = self.attention.forward(&self.norm1.forward(xs)?)?.broadcast_mul(&self.layer_scale1)?;
        let xs = (attn + xs)?;
        let mlp = self.mlp.forward(&self.norm2.forward(&xs)?)?.broadcast_mul(&self.layer_scale2)?;
        mlp + xs
    }
}

/// DINOv2's ViT, as transformers' `Dinov2Model`.
#[derive(Debug, Clone)]
pub struct Dinov2Model {
    embeddings: Dinov2Embeddings,
    layers: Vec<Dinov2Layer>,
    layernorm: LayerNorm,
    config: Dinov2Config,
}

impl Dinov2Model {
    /// `vb`: the root of a `Dinov2Model`'s `model.safetensors` (`embeddings.*`, `encoder.layer.N.*`,
    /// `layernorm.*`); the same under `dinov2.` (a classifier's checkpoint) is read too.
    pub fn new(vb: VarBuilder, config: Dinov2Config) -> Result<Self> {
        let c = &config;
        let vb = if !vb.contains_tensor("embeddings.cls_token") && vb.contains_tensor("dinov2.embeddings.cls_token") { vb.pp("dinov2") } else { vb };
        let embeddings = Dinov2Embeddings::new(vb.pp("embeddings"), c)?;
        let vb_layers = vb.pp("encoder").pp("layer");
        let layers = (0..c.num_hidden_layers).map(|i| Dinov2Layer::new(vb_layers.pp(i), c)).collect::<Result<Vec<_>>>()?;
        let layernorm = layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("layernorm"))?;
        Ok(Self { embeddings, layers, layernorm, config })
    }

    pub fn config(&self) -> &Dinov2Config {
        &self.config
    }

    /// `last_hidden_state (b, 1 + patches, hidden)`, after the final layer norm, for normalized
    /// pixels `(b, 3, h, w)` of any size (the patches that fit; positions interpolated).
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.layernorm.forward(&self.encode(pixel_values)?)
    }

    /// `pooler_output (b, hidden)`: the class token of [`Self::forward`] (the norm is per token,
    /// so only that token is normed).
    pub fn pooler_output(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.layernorm.forward(&self.encode(pixel_values)?.narrow(1, 0, 1)?.squeeze(1)?.contiguous()?)
    }

    /// The encoder's output before the final norm.
    fn encode(&self, pixel_values: &Tensor) -> Result<Tensor> {
        // 1. embeddings
        let mut xs = self.embeddings.forward(pixel_values)?;
        // 2. encoder
        for layer in &self.layers {
            xs = layer.forward(&xs)?;
        }
        Ok(xs)
    }
}
