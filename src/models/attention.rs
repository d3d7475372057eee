//! Adapted from candle-transformers 0.11.1 (MIT OR Apache-2.0), stable_diffusion/attention.rs
//!
//! Attention blocks, as diffusers' `models/attention.py`, `models/attention_processor.py` and
//! `models/transformers/transformer_2d.py`:
//! - [`Attention`]: multi-head (cross-)attention of the UNet (`to_q`, `to_k`, `to_v`, `to_out.0`);
//! - [`BasicTransformerBlock`]: self-attention, cross-attention and a GEGLU feed-forward;
//! - [`Transformer2DModel`]: group norm, `proj_in`, transformer blocks, `proj_out`, residual;
//! - [`AttentionBlock`]: the VAE's single-head spatial self-attention (diffusers' `Attention`
//!   with a `group_norm` and a residual connection).

use crate::models::cuda_kernels;
use crate::models::nn::{
    attention, conv2d, group_norm, layer_norm, linear, linear_b, swap_axes, Conv2d, Conv2dConfig, GroupNorm, LayerNorm,
    Linear,
};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

/// The dtype attention runs in: at least f32, except bf16 on a GPU. There cuBLAS sums the
/// products and candle's softmax and sum kernels their terms in f32 either way, and half-precision
/// scores are what diffusers' classic attention processor keeps too; in f32 the `seq x seq`
/// scores, the costliest tensors of a step, took twice the bytes (docs/performance.md). f16 keeps
/// f32: candle sums f16 in f16 (the backward's row sums over 4096 scores). On the CPU candle's
/// half-precision matmuls are slower than f32 ones; the GPU's path emulated on the CPU
/// (`cuda_kernels::emulate_on_cpu`) takes the GPU's dtype.
fn attention_dtype(dtype: DType, device: &candle_core::Device) -> DType {
    match dtype {
        DType::BF16 if device.is_cuda() || cuda_kernels::emulating() => DType::BF16,
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    }
}

/// `softmax(q k^T * scale) v` on `(batch * heads, seq, head_dim)` tensors, in
/// [`attention_dtype`], optionally `slice_size` (batch x head) pairs at a time to bound the
/// scores' memory.
fn scaled_dot_product_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, slice_size: Option<usize>) -> Result<Tensor> {
    let in_dtype = q.dtype();
    let dtype = attention_dtype(in_dtype, q.device());
    let (q, k, v) = (q.to_dtype(dtype)?, k.to_dtype(dtype)?, v.to_dtype(dtype)?);
    attention(&q, &k, &v, scale, slice_size)?.to_dtype(in_dtype)
}

/// `(batch, seq, heads * dim)` -> `(batch * heads, seq, dim)`.
fn heads_to_batch(xs: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, dim) = xs.dims3()?;
    swap_axes(xs, (b, n, heads, dim / heads))?.reshape((b * heads, n, dim / heads))
}

/// Multi-head attention of the UNet, as diffusers' `Attention` with `AttnProcessor2_0`:
/// self-attention when no context is given, cross-attention otherwise.
#[derive(Debug, Clone)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
    slice_size: Option<usize>,
}

impl Attention {
    /// `context_dim`: the width of the cross-attention context, `None` for self-attention.
    /// `slice_size`: compute the attention `slice_size` (batch x head) pairs at a time.
    pub fn new(
        vb: VarBuilder,
        query_dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        dim_head: usize,
        slice_size: Option<usize>,
    ) -> Result<Self> {
        let inner_dim = dim_head * heads;
        let context_dim = context_dim.unwrap_or(query_dim);
        let to_q = linear_b(query_dim, inner_dim, false, vb.pp("to_q"))?;
        let to_k = linear_b(context_dim, inner_dim, false, vb.pp("to_k"))?;
        let to_v = linear_b(context_dim, inner_dim, false, vb.pp("to_v"))?;
        let to_out = linear(inner_dim, query_dim, vb.pp("to_out.0"))?;
        let scale = 1.0 / (dim_head as f64).sqrt();
        Ok(Self { to_q, to_k, to_v, to_out, heads, scale, slice_size })
    }

    /// `(batch, seq, heads * dim)` -> `(batch * heads, seq, dim)`.
    fn heads_to_batch(&self, xs: &Tensor) -> Result<Tensor> {
        heads_to_batch(xs, self.heads)
    }

    /// `(batch * heads, seq, dim)` -> `(batch, seq, heads * dim)`.
    fn batch_to_heads(&self, xs: &Tensor) -> Result<Tensor> {
        let (bh, n, dim) = xs.dims3()?;
        let b = bh / self.heads;
        swap_axes(xs, (b, self.heads, n, dim))?.reshape((b, n, dim * self.heads))
    }

    /// `xs`: `(batch, seq, query_dim)`; `context`: `(batch, context_seq, context_dim)`.
    pub fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        // 1. projections
        let context = context.unwrap_or(xs);
        let query = self.heads_to_batch(&self.to_q.forward(xs)?)?;
        let key = self.heads_to_batch(&self.to_k.forward(context)?)?;
        let value = self.heads_to_batch(&self.to_v.forward(context)?)?;
        // 2. scaled dot-product attention per head
        let xs = scaled_dot_product_attention(&query, &key, &value, self.scale, self.slice_size)?;
        // 3. merge the heads, output projection (to_out.1 is dropout)
        self.to_out.forward(&self.batch_to_heads(&xs)?)
    }
}

/// GEGLU: `h * gelu(gate)` with `[h, gate] = proj(x)` and the exact (erf) GELU, as torch's `F.gelu`.
#[derive(Debug, Clone)]
pub struct GeGlu {
    proj: Linear,
}

impl GeGlu {
    pub fn new(vb: VarBuilder, dim_in: usize, dim_out: usize) -> Result<Self> {
        Ok(Self { proj: linear(dim_in, dim_out * 2, vb.pp("proj"))? })
    }

    /// `[h, gate]`, the projection GEGLU gates (see [`Linear::forward_geglu`]).
    fn project(&self, xs: &Tensor) -> Result<Tensor> {
        self.proj.forward(xs)
    }
}

/// The feed-forward of a transformer block: `net.0` (GEGLU), `net.1` (dropout), `net.2` (linear).
#[derive(Debug, Clone)]
pub struct FeedForward {
    project_in: GeGlu,
    linear: Linear,
}

impl FeedForward {
    /// `mult`: the inner width as a multiple of `dim` (4 in Stable Diffusion).
    pub fn new(vb: VarBuilder, dim: usize, dim_out: Option<usize>, mult: usize) -> Result<Self> {
        let inner_dim = dim * mult;
        let dim_out = dim_out.unwrap_or(dim);
        let vb = vb.pp("net");
        let project_in = GeGlu::new(vb.pp("0"), dim, inner_dim)?;
        let linear = linear(inner_dim, dim_out, vb.pp("2"))?;
        Ok(Self { project_in, linear })
    }
}

impl Module for FeedForward {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.linear.forward_geglu(&self.project_in.project(xs)?)
    }
}

/// A transformer block, as diffusers' `BasicTransformerBlock` with `norm_type = "layer_norm"`.
#[derive(Debug, Clone)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    pub fn new(
        vb: VarBuilder,
        dim: usize,
        n_heads: usize,
        d_head: usize,
        context_dim: Option<usize>,
        slice_size: Option<usize>,
    ) -> Result<Self> {
        let norm1 = layer_norm(dim, 1e-5, vb.pp("norm1"))?;
        let attn1 = Attention::new(vb.pp("attn1"), dim, None, n_heads, d_head, slice_size)?;
        let norm2 = layer_norm(dim, 1e-5, vb.pp("norm2"))?;
        let attn2 = Attention::new(vb.pp("attn2"), dim, context_dim, n_heads, d_head, slice_size)?;
        let norm3 = layer_norm(dim, 1e-5, vb.pp("norm3"))?;
        let ff = FeedForward::new(vb.pp("ff"), dim, None, 4)?;
        Ok(Self { norm1, attn1, norm2, attn2, norm3, ff })
    }

    pub fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        // 1. self-attention
        let xs = (self.attn1.forward(&self.norm1.forward(xs)?, None)? + xs)?;
        // 2. cross-attention
        let xs = (self.attn2.forward(&self.norm2.forward(&xs)?, context)? + xs)?;
        // 3. feed-forward
        self.ff.forward(&self.norm3.forward(&xs)?)? + xs
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Transformer2DModelConfig {
    /// The number of transformer blocks.
    pub depth: usize,
    pub num_groups: usize,
    /// The width of the cross-attention context.
    pub context_dim: Option<usize>,
    /// Attention slicing (see [`Attention::new`]).
    pub slice_size: Option<usize>,
    /// `proj_in`/`proj_out` are linear layers (SD 2.x) rather than 1x1 convolutions (SD 1.x).
    pub use_linear_projection: bool,
}

impl Default for Transformer2DModelConfig {
    fn default() -> Self {
        Self { depth: 1, num_groups: 32, context_dim: None, slice_size: None, use_linear_projection: false }
    }
}

#[derive(Debug, Clone)]
enum Proj {
    Conv2d(Conv2d),
    Linear(Linear),
}

/// The spatial transformer of the UNet's cross-attention blocks, as diffusers' `Transformer2DModel`
/// on continuous inputs.
#[derive(Debug, Clone)]
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Proj,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Proj,
    pub config: Transformer2DModelConfig,
}

impl Transformer2DModel {
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        n_heads: usize,
        d_head: usize,
        config: Transformer2DModelConfig,
    ) -> Result<Self> {
        let inner_dim = n_heads * d_head;
        let norm = group_norm(config.num_groups, in_channels, 1e-6, vb.pp("norm"))?;
        let (proj_in, proj_out) = if config.use_linear_projection {
            (
                Proj::Linear(linear(in_channels, inner_dim, vb.pp("proj_in"))?),
                Proj::Linear(linear(inner_dim, in_channels, vb.pp("proj_out"))?),
            )
        } else {
            let cfg = Conv2dConfig::default();
            (
                Proj::Conv2d(conv2d(in_channels, inner_dim, 1, cfg, vb.pp("proj_in"))?),
                Proj::Conv2d(conv2d(inner_dim, in_channels, 1, cfg, vb.pp("proj_out"))?),
            )
        };
        let vb_tb = vb.pp("transformer_blocks");
        let transformer_blocks = (0..config.depth)
            .map(|i| {
                BasicTransformerBlock::new(
                    vb_tb.pp(i),
                    inner_dim,
                    n_heads,
                    d_head,
                    config.context_dim,
                    config.slice_size,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { norm, proj_in, transformer_blocks, proj_out, config })
    }

    pub fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let (batch, _channels, height, width) = xs.dims4()?;
        let residual = xs;
        // 1. input: group norm, (b, c, h, w) -> (b, h * w, inner_dim)
        let xs = self.norm.forward(xs)?;
        let to_tokens = |xs: &Tensor| -> Result<Tensor> {
            let c = xs.dim(1)?;
            swap_axes(xs, (batch, c, height * width, 1))?.reshape((batch, height * width, c))
        };
        let xs = match &self.proj_in {
            Proj::Conv2d(p) => to_tokens(&p.forward(&xs)?)?,
            Proj::Linear(p) => p.forward(&to_tokens(&xs)?)?,
        };
        // 2. transformer blocks
        let mut xs = xs;
        for block in self.transformer_blocks.iter() {
            xs = block.forward(&xs, context)?
        }
        // 3. output: (b, h * w, inner_dim) -> (b, c, h, w), proj_out
        let to_image = |xs: &Tensor| -> Result<Tensor> {
            let c = xs.dim(2)?;
            swap_axes(xs, (batch, height * width, c, 1))?.reshape((batch, c, height, width))
        };
        let xs = match &self.proj_out {
            Proj::Conv2d(p) => p.forward(&to_image(&xs)?)?,
            Proj::Linear(p) => to_image(&p.forward(&xs)?)?,
        };
        // 4. residual
        xs + residual
    }
}

/// Configuration of the VAE's attention block.
#[derive(Debug, Clone, Copy)]
pub struct AttentionBlockConfig {
    /// Channels per head; `None` for a single head over all channels (the VAE's default).
    pub num_head_channels: Option<usize>,
    pub num_groups: usize,
    /// The output (after the residual) is divided by this value.
    pub rescale_output_factor: f64,
    pub eps: f64,
}

impl Default for AttentionBlockConfig {
    fn default() -> Self {
        Self { num_head_channels: None, num_groups: 32, rescale_output_factor: 1., eps: 1e-6 }
    }
}

/// A `channels x channels` projection stored as a linear weight or a 1x1 convolution weight.
fn channel_linear(channels: usize, vb: VarBuilder) -> Result<Linear> {
    let weight = match vb.get((channels, channels), "weight") {
        Ok(w) => w,
        Err(_) => vb.get((channels, channels, 1, 1), "weight")?.reshape((channels, channels))?,
    };
    Ok(Linear::new(weight, Some(vb.get(channels, "bias")?)))
}

/// The VAE's spatial self-attention over all pixels, as diffusers' `Attention` built by
/// `UNetMidBlock2D` (`group_norm`, `to_q`, `to_k`, `to_v`, `to_out.0`, residual connection);
/// the pre-0.14 names `query`, `key`, `value`, `proj_attn` are read too.
#[derive(Debug, Clone)]
pub struct AttentionBlock {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    num_heads: usize,
    scale: f64,
    config: AttentionBlockConfig,
}

impl AttentionBlock {
    pub fn new(vb: VarBuilder, channels: usize, config: AttentionBlockConfig) -> Result<Self> {
        let num_head_channels = config.num_head_channels.unwrap_or(channels);
        let num_heads = channels / num_head_channels;
        let group_norm = group_norm(config.num_groups, channels, config.eps, vb.pp("group_norm"))?;
        let legacy = !vb.contains_tensor("to_q.weight") && vb.contains_tensor("query.weight");
        let (q, k, v, out) =
            if legacy { ("query", "key", "value", "proj_attn") } else { ("to_q", "to_k", "to_v", "to_out.0") };
        Ok(Self {
            group_norm,
            to_q: channel_linear(channels, vb.pp(q))?,
            to_k: channel_linear(channels, vb.pp(k))?,
            to_v: channel_linear(channels, vb.pp(v))?,
            to_out: channel_linear(channels, vb.pp(out))?,
            num_heads,
            scale: 1.0 / (num_head_channels as f64).sqrt(),
            config,
        })
    }

    /// `(b, n, heads * d)` -> `(b * heads, n, d)`.
    fn heads_to_batch(&self, xs: &Tensor) -> Result<Tensor> {
        heads_to_batch(xs, self.num_heads)
    }
}

impl Module for AttentionBlock {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let residual = xs;
        let (batch, channels, height, width) = xs.dims4()?;
        // 1. group norm, (b, c, h, w) -> (b, h * w, c)
        let xs = self.group_norm.forward(xs)?.reshape((batch, channels, height * width))?.transpose(1, 2)?;
        // 2. projections and attention
        let q = self.heads_to_batch(&self.to_q.forward(&xs)?)?;
        let k = self.heads_to_batch(&self.to_k.forward(&xs)?)?;
        let v = self.heads_to_batch(&self.to_v.forward(&xs)?)?;
        let xs = scaled_dot_product_attention(&q, &k, &v, self.scale, None)?;
        let xs = xs
            .reshape((batch, self.num_heads, height * width, channels / self.num_heads))?
            .transpose(1, 2)?
            .reshape((batch, height * width, channels))?;
        // 3. output projection, (b, h * w, c) -> (b, c, h, w)
        let xs = self.to_out.forward(&xs)?.transpose(1, 2)?.reshape((batch, channels, height, width))?;
        // 4. residual and rescale
        let xs = (xs + residual)?;
        if self.config.rescale_output_factor == 1. {
            Ok(xs)
        } else {
            xs / self.config.rescale_output_factor
        }
    }
}
