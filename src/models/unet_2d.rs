//! Adapted from candle-transformers 0.11.1 (MIT OR Apache-2.0), stable_diffusion/unet_2d.rs
//!
//! The conditional 2D UNet of Stable Diffusion, as diffusers' `UNet2DConditionModel`
//! (`models/unets/unet_2d_condition.py`): it predicts the noise of a noisy latent at a timestep,
//! conditioned on text embeddings through cross-attention.

use super::checkpoint::{Direct, Segments};
use super::attention::Transformer2DModel;
use super::embeddings::{TimestepEmbedding, Timesteps};
use super::resnet::ResnetBlock2D;
use super::unet_2d_blocks::*;
use super::{parse_config, unsupported};
use crate::models::nn::{conv2d, group_norm, Conv2d, Conv2dConfig, GroupNorm};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;
use serde_json::Value;

const CONFIG_FILE: &str = "unet/config.json";
const CONFIG_FIX: &str = "use a Stable Diffusion v1.x/2.x UNet config";

/// One resolution level of the UNet: a down block and, mirrored, an up block.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockConfig {
    pub out_channels: usize,
    /// The down block is a `CrossAttnDownBlock2D` (else a `DownBlock2D`).
    pub down_cross_attn: bool,
    /// The up block at this level is a `CrossAttnUpBlock2D` (else an `UpBlock2D`).
    pub up_cross_attn: bool,
    /// The number of attention heads of this level's transformers.
    pub num_attention_heads: usize,
    /// The number of transformer blocks in each of this level's transformers.
    pub transformer_layers_per_block: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UNet2DConditionModelConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// The latent height and width the model was trained at.
    pub sample_size: Option<usize>,
    /// The input is mapped from [0, 1] to [-1, 1] first.
    pub center_input_sample: bool,
    /// The sinusoidal timestep features are ordered cos, sin (else sin, cos).
    pub flip_sin_to_cos: bool,
    /// `downscale_freq_shift` of the timestep features.
    pub freq_shift: f64,
    /// The resolution levels, highest resolution first.
    pub blocks: Vec<BlockConfig>,
    pub layers_per_block: usize,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub cross_attention_dim: usize,
    /// Compute attention this many (batch x head) pairs at a time, to bound memory; `None`: all at once.
    /// Not read from the config file.
    pub attention_slice_size: Option<usize>,
    /// `proj_in`/`proj_out` of the transformers are linear layers (SD 2.x) rather than 1x1 convolutions.
    pub use_linear_projection: bool,
    /// Attention scores in f32; attention always runs in at least f32 here, so this changes nothing.
    pub upcast_attention: bool,
}

impl Default for UNet2DConditionModelConfig {
    /// Stable Diffusion v1.5.
    fn default() -> Self {
        let block = |out_channels, cross_attn| BlockConfig {
            out_channels,
            down_cross_attn: cross_attn,
            up_cross_attn: cross_attn,
            num_attention_heads: 8,
            transformer_layers_per_block: 1,
        };
        Self {
            in_channels: 4,
            out_channels: 4,
            sample_size: Some(64),
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.,
            blocks: vec![block(320, true), block(640, true), block(1280, true), block(1280, false)],
            layers_per_block: 2,
            downsample_padding: 1,
            mid_block_scale_factor: 1.,
            norm_num_groups: 32,
            norm_eps: 1e-5,
            cross_attention_dim: 768,
            attention_slice_size: None,
            use_linear_projection: false,
            upcast_attention: false,
        }
    }
}

/// diffusers' `UNet2DConditionModel` config keys, with its defaults. Keys that may be an int or a
/// list per block are kept as JSON values.
#[derive(Debug, Deserialize)]
#[serde(default)]
struct RawUNetConfig {
    sample_size: Value,
    in_channels: usize,
    out_channels: usize,
    center_input_sample: bool,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    down_block_types: Vec<String>,
    mid_block_type: Option<String>,
    up_block_types: Vec<String>,
    block_out_channels: Vec<usize>,
    layers_per_block: Value,
    downsample_padding: usize,
    mid_block_scale_factor: f64,
    act_fn: String,
    norm_num_groups: Option<usize>,
    norm_eps: f64,
    cross_attention_dim: Value,
    transformer_layers_per_block: Value,
    attention_head_dim: Value,
    num_attention_heads: Value,
    use_linear_projection: bool,
    upcast_attention: bool,
}

impl Default for RawUNetConfig {
    fn default() -> Self {
        Self {
            sample_size: Value::Null,
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.,
            down_block_types: ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
                .map(String::from)
                .to_vec(),
            mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
            up_block_types: ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
                .map(String::from)
                .to_vec(),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: Value::from(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.,
            act_fn: "silu".into(),
            norm_num_groups: Some(32),
            norm_eps: 1e-5,
            cross_attention_dim: Value::from(1280),
            transformer_layers_per_block: Value::from(1),
            attention_head_dim: Value::from(8),
            num_attention_heads: Value::Null,
            use_linear_projection: false,
            upcast_attention: false,
        }
    }
}

/// Keys of diffusers' UNet config that select features this UNet does not have, with the values
/// that leave them off.
const UNSUPPORTED_UNLESS: &[(&str, &[&str])] = &[
    ("dual_cross_attention", &["false"]),
    ("only_cross_attention", &["false"]),
    ("mid_block_only_cross_attention", &["null", "false"]),
    ("class_embed_type", &["null"]),
    ("num_class_embeds", &["null"]),
    ("class_embeddings_concat", &["false"]),
    ("projection_class_embeddings_input_dim", &["null"]),
    ("addition_embed_type", &["null"]),
    ("addition_time_embed_dim", &["null"]),
    ("encoder_hid_dim", &["null"]),
    ("encoder_hid_dim_type", &["null"]),
    ("resnet_time_scale_shift", &["\"default\""]),
    ("resnet_skip_time_act", &["false"]),
    ("resnet_out_scale_factor", &["1", "1.0"]),
    ("time_embedding_type", &["\"positional\""]),
    ("time_embedding_dim", &["null"]),
    ("time_embedding_act_fn", &["null"]),
    ("timestep_post_act", &["null"]),
    ("time_cond_proj_dim", &["null"]),
    ("conv_in_kernel", &["3"]),
    ("conv_out_kernel", &["3"]),
    ("attention_type", &["\"default\""]),
    ("cross_attention_norm", &["null"]),
    ("reverse_transformer_layers_per_block", &["null"]),
];

fn bad(key: &str, value: impl std::fmt::Display) -> crate::Error {
    unsupported(CONFIG_FILE, key, value, CONFIG_FIX)
}

/// An int, or a list with one int per block.
fn per_block(key: &str, value: &Value, n_blocks: usize) -> crate::Result<Vec<usize>> {
    let as_usize = |v: &Value| v.as_u64().filter(|&v| v > 0).map(|v| v as usize);
    match value {
        Value::Array(items) if items.len() == n_blocks => {
            items.iter().map(|v| as_usize(v).ok_or_else(|| bad(key, value))).collect()
        }
        v => as_usize(v).map(|v| vec![v; n_blocks]).ok_or_else(|| bad(key, value)),
    }
}

/// An int, or a list of equal ints.
fn same_for_all(key: &str, value: &Value, n_blocks: usize) -> crate::Result<usize> {
    let values = per_block(key, value, n_blocks)?;
    if values.iter().any(|&v| v != values[0]) {
        return Err(bad(key, value));
    }
    Ok(values[0])
}

impl UNet2DConditionModelConfig {
    /// Reads diffusers' `unet/config.json`, with diffusers' defaults for missing keys.
    pub fn from_json(config: &Value) -> crate::Result<Self> {
        let raw: RawUNetConfig = parse_config(config, CONFIG_FILE, CONFIG_FIX, UNSUPPORTED_UNLESS)?;
        let n = raw.block_out_channels.len();
        if n == 0 {
            return Err(bad("block_out_channels", "[]"));
        }
        if raw.down_block_types.len() != n {
            return Err(bad("down_block_types", format!("{:?} (one per block_out_channels)", raw.down_block_types)));
        }
        if raw.up_block_types.len() != n {
            return Err(bad("up_block_types", format!("{:?} (one per block_out_channels)", raw.up_block_types)));
        }
        if raw.act_fn != "silu" {
            return Err(bad("act_fn", format!("{:?}", raw.act_fn)));
        }
        if raw.mid_block_type.as_deref() != Some("UNetMidBlock2DCrossAttn") {
            return Err(bad("mid_block_type", format!("{:?}", raw.mid_block_type)));
        }
        let Some(norm_num_groups) = raw.norm_num_groups else { return Err(bad("norm_num_groups", "null")) };
        // diffusers' naming quirk: without `num_attention_heads`, `attention_head_dim` is the number of heads.
        let heads = if raw.num_attention_heads.is_null() { &raw.attention_head_dim } else { &raw.num_attention_heads };
        let heads_key = if raw.num_attention_heads.is_null() { "attention_head_dim" } else { "num_attention_heads" };
        let num_attention_heads = per_block(heads_key, heads, n)?;
        let transformer_layers = per_block("transformer_layers_per_block", &raw.transformer_layers_per_block, n)?;
        let mut blocks = Vec::with_capacity(n);
        for i in 0..n {
            let down_cross_attn = match raw.down_block_types[i].as_str() {
                "CrossAttnDownBlock2D" => true,
                "DownBlock2D" => false,
                other => return Err(bad("down_block_types", format!("{other:?}"))),
            };
            // Up blocks run from the deepest level.
            let up_cross_attn = match raw.up_block_types[n - 1 - i].as_str() {
                "CrossAttnUpBlock2D" => true,
                "UpBlock2D" => false,
                other => return Err(bad("up_block_types", format!("{other:?}"))),
            };
            let out_channels = raw.block_out_channels[i];
            if norm_num_groups == 0
                || !out_channels.is_multiple_of(norm_num_groups)
                || !out_channels.is_multiple_of(num_attention_heads[i])
            {
                return Err(bad("block_out_channels", format!("{:?}", raw.block_out_channels)));
            }
            blocks.push(BlockConfig {
                out_channels,
                down_cross_attn,
                up_cross_attn,
                num_attention_heads: num_attention_heads[i],
                transformer_layers_per_block: transformer_layers[i],
            });
        }
        let sample_size = match &raw.sample_size {
            Value::Null => None,
            Value::Array(hw) if hw.len() == 2 && hw[0] == hw[1] => hw[0].as_u64().map(|v| v as usize),
            v => Some(v.as_u64().ok_or_else(|| bad("sample_size", v))? as usize),
        };
        Ok(Self {
            in_channels: raw.in_channels,
            out_channels: raw.out_channels,
            sample_size,
            center_input_sample: raw.center_input_sample,
            flip_sin_to_cos: raw.flip_sin_to_cos,
            freq_shift: raw.freq_shift,
            blocks,
            layers_per_block: same_for_all("layers_per_block", &raw.layers_per_block, n)?,
            downsample_padding: raw.downsample_padding,
            mid_block_scale_factor: raw.mid_block_scale_factor,
            norm_num_groups,
            norm_eps: raw.norm_eps,
            cross_attention_dim: same_for_all("cross_attention_dim", &raw.cross_attention_dim, n)?,
            attention_slice_size: None,
            use_linear_projection: raw.use_linear_projection,
            upcast_attention: raw.upcast_attention,
        })
    }
}

#[derive(Debug, Clone)]
enum UNetDownBlock {
    Basic(DownBlock2D),
    CrossAttn(CrossAttnDownBlock2D),
}

#[derive(Debug, Clone)]
enum UNetUpBlock {
    Basic(UpBlock2D),
    CrossAttn(CrossAttnUpBlock2D),
}

/// A block's layers, for the forward to run one at a time.
impl UNetDownBlock {
    fn resnets(&self) -> &[ResnetBlock2D] {
        match self {
            Self::Basic(b) => &b.resnets,
            Self::CrossAttn(b) => &b.downblock.resnets,
        }
    }

    /// One per resnet, or none.
    fn attentions(&self) -> &[Transformer2DModel] {
        match self {
            Self::Basic(_) => &[],
            Self::CrossAttn(b) => &b.attentions,
        }
    }

    fn downsampler(&self) -> Result<&Downsample2D> {
        let d = match self {
            Self::Basic(b) => &b.downsampler,
            Self::CrossAttn(b) => &b.downblock.downsampler,
        };
        d.as_ref().ok_or_else(|| candle_core::Error::Msg("this down block has no downsampler".into()))
    }
}

impl UNetUpBlock {
    fn resnets(&self) -> &[ResnetBlock2D] {
        match self {
            Self::Basic(b) => &b.resnets,
            Self::CrossAttn(b) => &b.upblock.resnets,
        }
    }

    /// One per resnet, or none.
    fn attentions(&self) -> &[Transformer2DModel] {
        match self {
            Self::Basic(_) => &[],
            Self::CrossAttn(b) => &b.attentions,
        }
    }

    fn upsampler(&self) -> Result<&Upsample2D> {
        let u = match self {
            Self::Basic(b) => &b.upsampler,
            Self::CrossAttn(b) => &b.upblock.upsampler,
        };
        u.as_ref().ok_or_else(|| candle_core::Error::Msg("this up block has no upsampler".into()))
    }
}

#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    conv_in: Conv2d,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    down_blocks: Vec<UNetDownBlock>,
    mid_block: UNetMidBlock2DCrossAttn,
    up_blocks: Vec<UNetUpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    config: UNet2DConditionModelConfig,
}

impl UNet2DConditionModel {
    /// Builds the UNet from weights named as in diffusers' `unet/diffusion_pytorch_model.safetensors`.
    pub fn new(vb: VarBuilder, config: UNet2DConditionModelConfig) -> Result<Self> {
        let cfg = &config;
        let n_blocks = cfg.blocks.len();
        let b_channels = cfg.blocks[0].out_channels;
        let last = *cfg.blocks.last().expect("at least one block");
        let time_embed_dim = b_channels * 4;
        let conv_cfg = Conv2dConfig { padding: 1, ..Default::default() };
        let conv_in = conv2d(cfg.in_channels, b_channels, 3, conv_cfg, vb.pp("conv_in"))?;

        let time_proj = Timesteps::new(b_channels, cfg.flip_sin_to_cos, cfg.freq_shift);
        let time_embedding = TimestepEmbedding::new(vb.pp("time_embedding"), b_channels, time_embed_dim)?;

        let vb_db = vb.pp("down_blocks");
        let down_blocks = (0..n_blocks)
            .map(|i| {
                let block = cfg.blocks[i];
                let in_channels = if i > 0 { cfg.blocks[i - 1].out_channels } else { b_channels };
                let db_cfg = DownBlock2DConfig {
                    num_layers: cfg.layers_per_block,
                    resnet_eps: cfg.norm_eps,
                    resnet_groups: cfg.norm_num_groups,
                    add_downsample: i < n_blocks - 1,
                    downsample_padding: cfg.downsample_padding,
                    ..Default::default()
                };
                if block.down_cross_attn {
                    let xa_cfg = CrossAttnDownBlock2DConfig {
                        downblock: db_cfg,
                        num_attention_heads: block.num_attention_heads,
                        cross_attention_dim: cfg.cross_attention_dim,
                        slice_size: cfg.attention_slice_size,
                        use_linear_projection: cfg.use_linear_projection,
                        transformer_layers_per_block: block.transformer_layers_per_block,
                    };
                    let b = CrossAttnDownBlock2D::new(
                        vb_db.pp(i),
                        in_channels,
                        block.out_channels,
                        Some(time_embed_dim),
                        xa_cfg,
                    )?;
                    Ok(UNetDownBlock::CrossAttn(b))
                } else {
                    let b =
                        DownBlock2D::new(vb_db.pp(i), in_channels, block.out_channels, Some(time_embed_dim), db_cfg)?;
                    Ok(UNetDownBlock::Basic(b))
                }
            })
            .collect::<Result<Vec<_>>>()?;

        let mid_cfg = UNetMidBlock2DCrossAttnConfig {
            resnet_eps: cfg.norm_eps,
            resnet_groups: cfg.norm_num_groups,
            output_scale_factor: cfg.mid_block_scale_factor,
            cross_attn_dim: cfg.cross_attention_dim,
            num_attention_heads: last.num_attention_heads,
            slice_size: cfg.attention_slice_size,
            use_linear_projection: cfg.use_linear_projection,
            transformer_layers_per_block: last.transformer_layers_per_block,
            ..Default::default()
        };
        let mid_block =
            UNetMidBlock2DCrossAttn::new(vb.pp("mid_block"), last.out_channels, Some(time_embed_dim), mid_cfg)?;

        let vb_ub = vb.pp("up_blocks");
        let up_blocks = (0..n_blocks)
            .map(|i| {
                // Up block `i` mirrors level `n_blocks - 1 - i`.
                let block = cfg.blocks[n_blocks - 1 - i];
                let prev_out_channels = if i > 0 { cfg.blocks[n_blocks - i].out_channels } else { last.out_channels };
                let in_channels = cfg.blocks[(n_blocks - 1 - i).saturating_sub(1)].out_channels;
                let ub_cfg = UpBlock2DConfig {
                    num_layers: cfg.layers_per_block + 1,
                    resnet_eps: cfg.norm_eps,
                    resnet_groups: cfg.norm_num_groups,
                    add_upsample: i < n_blocks - 1,
                    ..Default::default()
                };
                if block.up_cross_attn {
                    let xa_cfg = CrossAttnUpBlock2DConfig {
                        upblock: ub_cfg,
                        num_attention_heads: block.num_attention_heads,
                        cross_attention_dim: cfg.cross_attention_dim,
                        slice_size: cfg.attention_slice_size,
                        use_linear_projection: cfg.use_linear_projection,
                        transformer_layers_per_block: block.transformer_layers_per_block,
                    };
                    let b = CrossAttnUpBlock2D::new(
                        vb_ub.pp(i),
                        in_channels,
                        prev_out_channels,
                        block.out_channels,
                        Some(time_embed_dim),
                        xa_cfg,
                    )?;
                    Ok(UNetUpBlock::CrossAttn(b))
                } else {
                    let b = UpBlock2D::new(
                        vb_ub.pp(i),
                        in_channels,
                        prev_out_channels,
                        block.out_channels,
                        Some(time_embed_dim),
                        ub_cfg,
                    )?;
                    Ok(UNetUpBlock::Basic(b))
                }
            })
            .collect::<Result<Vec<_>>>()?;

        let conv_norm_out = group_norm(cfg.norm_num_groups, b_channels, cfg.norm_eps, vb.pp("conv_norm_out"))?;
        let conv_out = conv2d(b_channels, cfg.out_channels, 3, conv_cfg, vb.pp("conv_out"))?;
        Ok(Self {
            conv_in,
            time_proj,
            time_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
            config,
        })
    }

    pub fn config(&self) -> &UNet2DConditionModelConfig {
        &self.config
    }

    /// The predicted noise for `sample` `(batch, in_channels, h, w)` at `timestep` (the same for the
    /// whole batch) given `encoder_hidden_states` `(batch, tokens, cross_attention_dim)`.
    pub fn forward(&self, sample: &Tensor, timestep: f64, encoder_hidden_states: &Tensor) -> Result<Tensor> {
        let timesteps = Tensor::full(timestep as f32, sample.dim(0)?, sample.device())?;
        self.forward_timesteps(sample, &timesteps, encoder_hidden_states)
    }

    /// [`Self::forward`] with one timestep per sample (`timesteps` f32 `(batch,)`), as training
    /// draws them.
    pub fn forward_timesteps(&self, sample: &Tensor, timesteps: &Tensor, encoder_hidden_states: &Tensor) -> Result<Tensor> {
        let mut direct = Direct(self);
        self.forward_segments(&mut direct, sample.clone(), timesteps.clone(), encoder_hidden_states.clone())
    }

    /// The forward as segments (see [`checkpoint`](super::checkpoint)): the time embedding with
    /// the input convolution; each resnet, transformer, downsampler and upsampler of the blocks;
    /// the output head. On a [`Tape`](super::checkpoint::Tape) it is the gradient-checkpointed
    /// forward: the largest segment, a transformer at the highest resolution, holds a few percent
    /// of a step's activations.
    pub fn forward_segments<S: Segments<Self>>(
        &self,
        s: &mut S,
        sample: S::Value,
        timesteps: S::Value,
        encoder_hidden_states: S::Value,
    ) -> Result<S::Value> {
        let (height, width) = match s.dims(&sample)[..] {
            [_, _, h, w] => (h, w),
            ref d => candle_core::bail!("the UNet's sample must be [batch, channels, height, width], got {d:?}"),
        };
        let n_blocks = self.config.blocks.len();
        // The input size need not be a multiple of the overall upsampling factor: then the up
        // blocks upsample to the sizes of the skips.
        let default_overall_up_factor = 1usize << (n_blocks - 1);
        let forward_upsample_size = height % default_overall_up_factor != 0 || width % default_overall_up_factor != 0;
        let context = encoder_hidden_states;

        // 0.-2. center the input if necessary; time: sinusoidal features in f32 (the f64 timestep
        // rounded to f32, as torch's `timesteps.float()`), cast to the model dtype, then the
        // embedding MLP; the input convolution.
        let pre = s.run(&[sample, timesteps], |m, x| {
            let xs = if m.config.center_input_sample { ((&x[0] * 2.0)? - 1.0)? } else { x[0].clone() };
            let t_emb = m.time_proj.forward(&x[1])?.to_dtype(xs.dtype())?;
            Ok(vec![m.time_embedding.forward(&t_emb)?, m.conv_in.forward(&xs)?])
        })?;
        let (emb, xs) = (pre[0].clone(), pre[1].clone());

        // 3. down: each resnet (then transformer) and the downsampler; every output is a skip of
        // the up blocks.
        let mut down_block_res_xs = vec![xs.clone()];
        let mut xs = xs;
        for (i, block) in self.down_blocks.iter().enumerate() {
            for j in 0..block.resnets().len() {
                xs = s.run1(&[xs, emb.clone()], move |m, x| m.down_blocks[i].resnets()[j].forward(&x[0], Some(&x[1])))?;
                if !block.attentions().is_empty() {
                    let inputs = [xs, context.clone()];
                    xs = s.run1(&inputs, move |m, x| m.down_blocks[i].attentions()[j].forward(&x[0], Some(&x[1])))?;
                }
                down_block_res_xs.push(xs.clone());
            }
            if block.downsampler().is_ok() {
                xs = s.run1(&[xs], move |m, x| m.down_blocks[i].downsampler()?.forward(&x[0]))?;
                down_block_res_xs.push(xs.clone());
            }
        }

        // 4. mid: resnet, then (transformer, resnet) pairs
        let mut xs = s.run1(&[xs, emb.clone()], |m, x| m.mid_block.resnet.forward(&x[0], Some(&x[1])))?;
        for j in 0..self.mid_block.attn_resnets.len() {
            xs = s.run1(&[xs, context.clone()], move |m, x| m.mid_block.attn_resnets[j].0.forward(&x[0], Some(&x[1])))?;
            xs = s.run1(&[xs, emb.clone()], move |m, x| m.mid_block.attn_resnets[j].1.forward(&x[0], Some(&x[1])))?;
        }

        // 5. up: each resnet takes the output so far with the last skip left, then its
        // transformer; then the upsampler
        for (i, block) in self.up_blocks.iter().enumerate() {
            for j in 0..block.resnets().len() {
                let skip = down_block_res_xs.pop().ok_or_else(|| candle_core::Error::Msg("the UNet ran out of skips".into()))?;
                xs = s.run1(&[xs, skip, emb.clone()], move |m, x| {
                    m.up_blocks[i].resnets()[j].forward(&Tensor::cat(&[&x[0], &x[1]], 1)?, Some(&x[2]))
                })?;
                if !block.attentions().is_empty() {
                    let inputs = [xs, context.clone()];
                    xs = s.run1(&inputs, move |m, x| m.up_blocks[i].attentions()[j].forward(&x[0], Some(&x[1])))?;
                }
            }
            if block.upsampler().is_ok() {
                let upsample_size = match down_block_res_xs.last() {
                    Some(skip) if i < n_blocks - 1 && forward_upsample_size => {
                        let d = s.dims(skip);
                        Some((d[2], d[3]))
                    }
                    _ => None,
                };
                xs = s.run1(&[xs], move |m, x| m.up_blocks[i].upsampler()?.forward(&x[0], upsample_size))?;
            }
        }

        // 6. post-process
        s.run1(&[xs], |m, x| m.conv_out.forward(&m.conv_norm_out.forward_silu(&x[0])?))
    }
}
