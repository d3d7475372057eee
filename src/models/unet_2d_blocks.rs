//! Adapted from candle-transformers 0.11.1 (MIT OR Apache-2.0), stable_diffusion/unet_2d_blocks.rs
//!
//! The down, mid and up blocks of the UNet and the VAE, as diffusers'
//! `models/unets/unet_2d_blocks.py`, `models/downsampling.py` and `models/upsampling.py`.

use super::attention::{AttentionBlock, AttentionBlockConfig, Transformer2DModel, Transformer2DModelConfig};
use super::resnet::{ResnetBlock2D, ResnetBlock2DConfig};
use crate::models::nn::{conv2d, upsample_nearest, Conv2d, Conv2dConfig};
use candle_core::{Module, Result, Tensor, D};
use candle_nn::VarBuilder;

/// Halves the resolution with a stride-2 3x3 convolution, as diffusers' `Downsample2D(use_conv=True)`.
#[derive(Debug, Clone)]
pub struct Downsample2D {
    conv: Conv2d,
    padding: usize,
}

impl Downsample2D {
    /// `padding`: 1 in the UNet; 0 in the VAE encoder, which then pads right and bottom by one.
    pub fn new(vb: VarBuilder, in_channels: usize, out_channels: usize, padding: usize) -> Result<Self> {
        let cfg = Conv2dConfig { stride: 2, padding, ..Default::default() };
        let conv = conv2d(in_channels, out_channels, 3, cfg, vb.pp("conv"))?;
        Ok(Self { conv, padding })
    }
}

impl Module for Downsample2D {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if self.padding == 0 {
            let xs = xs.pad_with_zeros(D::Minus1, 0, 1)?.pad_with_zeros(D::Minus2, 0, 1)?;
            self.conv.forward(&xs)
        } else {
            self.conv.forward(xs)
        }
    }
}

/// Doubles the resolution (nearest neighbour) then a 3x3 convolution, as diffusers' `Upsample2D(use_conv=True)`.
#[derive(Debug, Clone)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(vb: VarBuilder, in_channels: usize, out_channels: usize) -> Result<Self> {
        let cfg = Conv2dConfig { padding: 1, ..Default::default() };
        Ok(Self { conv: conv2d(in_channels, out_channels, 3, cfg, vb.pp("conv"))? })
    }

    /// `size`: the output height and width when not twice the input's (odd sizes in the UNet).
    pub fn forward(&self, xs: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let xs = match size {
            None => upsample_nearest(xs, 2)?,
            Some((h, w)) => upsample_nearest2d(xs, h, w)?,
        };
        self.conv.forward(&xs)
    }
}

/// Nearest-neighbour resize to `(h, w)`, as torch's `F.interpolate(size=(h, w), mode="nearest")`:
/// source index `min(floor(i * (in / out)), in - 1)` in f32. Equal integer factors are
/// [`upsample_nearest`]; other sizes gather rows and columns (`index_select`, differentiable).
fn upsample_nearest2d(xs: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (_, _, in_h, in_w) = xs.dims4()?;
    if h.is_multiple_of(in_h) && w.is_multiple_of(in_w) && h / in_h == w / in_w {
        return upsample_nearest(xs, h / in_h);
    }
    let indices = |input: usize, output: usize| -> Result<Tensor> {
        let scale = input as f32 / output as f32;
        let idx: Vec<u32> = (0..output).map(|i| ((i as f32 * scale).floor() as usize).min(input - 1) as u32).collect();
        Tensor::from_vec(idx, output, xs.device())
    };
    xs.index_select(&indices(in_h, h)?, 2)?.index_select(&indices(in_w, w)?, 3)
}

/// The settings diffusers passes alike to every resnet of a block (dropout 0, SiLU and pre-norm are
/// fixed here); the output channels default to the input's.
fn resnet_config(
    temb_channels: Option<usize>,
    groups: usize,
    eps: f64,
    output_scale_factor: f64,
) -> ResnetBlock2DConfig {
    ResnetBlock2DConfig { temb_channels, groups, eps, output_scale_factor, ..Default::default() }
}

/// diffusers' `resnets` list of the down and up blocks: `num_layers` resnets to `out_channels`,
/// resnet `i` taking `in_channels(i)` channels (the blocks differ only in how their channels chain).
fn resnet_stack(
    vb: &VarBuilder,
    num_layers: usize,
    in_channels: impl Fn(usize) -> usize,
    out_channels: usize,
    config: ResnetBlock2DConfig,
) -> Result<Vec<ResnetBlock2D>> {
    let vb = vb.pp("resnets");
    let config = ResnetBlock2DConfig { out_channels: Some(out_channels), ..config };
    (0..num_layers).map(|i| ResnetBlock2D::new(vb.pp(i), in_channels(i), config)).collect()
}

/// diffusers' `downsamplers`: one [`Downsample2D`] keeping the channels, when the block has one.
fn downsampler(vb: &VarBuilder, add_downsample: bool, channels: usize, padding: usize) -> Result<Option<Downsample2D>> {
    add_downsample.then(|| Downsample2D::new(vb.pp("downsamplers").pp("0"), channels, channels, padding)).transpose()
}

/// diffusers' `upsamplers`: one [`Upsample2D`] keeping the channels, when the block has one.
fn upsampler(vb: &VarBuilder, add_upsample: bool, channels: usize) -> Result<Option<Upsample2D>> {
    add_upsample.then(|| Upsample2D::new(vb.pp("upsamplers").pp("0"), channels, channels)).transpose()
}

/// diffusers' `attentions` of the cross-attention down and up blocks: `num_layers` transformers on
/// `channels`, in `n_heads` heads of `channels / n_heads`.
fn transformer_stack(
    vb: &VarBuilder,
    num_layers: usize,
    channels: usize,
    n_heads: usize,
    config: Transformer2DModelConfig,
) -> Result<Vec<Transformer2DModel>> {
    let vb = vb.pp("attentions");
    (0..num_layers).map(|i| Transformer2DModel::new(vb.pp(i), channels, n_heads, channels / n_heads, config)).collect()
}

/// The mid blocks' layers, as diffusers' `resnets[0]`, then `zip(attentions, resnets[1:])`, all on
/// `channels`; built in that interleaved order, which seeded weights depend on.
fn mid_block_layers<A>(
    vb: &VarBuilder,
    num_layers: usize,
    channels: usize,
    resnet_cfg: ResnetBlock2DConfig,
    attention: impl Fn(VarBuilder) -> Result<A>,
) -> Result<(ResnetBlock2D, Vec<(A, ResnetBlock2D)>)> {
    let vb_resnets = vb.pp("resnets");
    let vb_attns = vb.pp("attentions");
    let resnet = ResnetBlock2D::new(vb_resnets.pp("0"), channels, resnet_cfg)?;
    let attn_resnets = (0..num_layers)
        .map(|i| {
            let attn = attention(vb_attns.pp(i))?;
            Ok((attn, ResnetBlock2D::new(vb_resnets.pp(i + 1), channels, resnet_cfg)?))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((resnet, attn_resnets))
}

#[derive(Debug, Clone, Copy)]
pub struct DownEncoderBlock2DConfig {
    pub num_layers: usize,
    pub resnet_eps: f64,
    pub resnet_groups: usize,
    pub output_scale_factor: f64,
    pub add_downsample: bool,
    pub downsample_padding: usize,
}

impl Default for DownEncoderBlock2DConfig {
    fn default() -> Self {
        Self {
            num_layers: 1,
            resnet_eps: 1e-6,
            resnet_groups: 32,
            output_scale_factor: 1.,
            add_downsample: true,
            downsample_padding: 1,
        }
    }
}

/// A down block of the VAE encoder: resnets without time embedding, then a downsampler.
#[derive(Debug, Clone)]
pub struct DownEncoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<Downsample2D>,
    pub config: DownEncoderBlock2DConfig,
}

impl DownEncoderBlock2D {
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        config: DownEncoderBlock2DConfig,
    ) -> Result<Self> {
        let resnet_cfg = resnet_config(None, config.resnet_groups, config.resnet_eps, config.output_scale_factor);
        let resnet_in = |i| if i == 0 { in_channels } else { out_channels };
        let resnets = resnet_stack(&vb, config.num_layers, resnet_in, out_channels, resnet_cfg)?;
        let downsampler = downsampler(&vb, config.add_downsample, out_channels, config.downsample_padding)?;
        Ok(Self { resnets, downsampler, config })
    }
}

impl Module for DownEncoderBlock2D {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = xs.clone();
        for resnet in self.resnets.iter() {
            xs = resnet.forward(&xs, None)?
        }
        match &self.downsampler {
            Some(downsampler) => downsampler.forward(&xs),
            None => Ok(xs),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct UpDecoderBlock2DConfig {
    pub num_layers: usize,
    pub resnet_eps: f64,
    pub resnet_groups: usize,
    pub output_scale_factor: f64,
    pub add_upsample: bool,
}

impl Default for UpDecoderBlock2DConfig {
    fn default() -> Self {
        Self { num_layers: 1, resnet_eps: 1e-6, resnet_groups: 32, output_scale_factor: 1., add_upsample: true }
    }
}

/// An up block of the VAE decoder: resnets without time embedding, then an upsampler.
#[derive(Debug, Clone)]
pub struct UpDecoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<Upsample2D>,
    pub config: UpDecoderBlock2DConfig,
}

impl UpDecoderBlock2D {
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        config: UpDecoderBlock2DConfig,
    ) -> Result<Self> {
        let resnet_cfg = resnet_config(None, config.resnet_groups, config.resnet_eps, config.output_scale_factor);
        let resnet_in = |i| if i == 0 { in_channels } else { out_channels };
        let resnets = resnet_stack(&vb, config.num_layers, resnet_in, out_channels, resnet_cfg)?;
        let upsampler = upsampler(&vb, config.add_upsample, out_channels)?;
        Ok(Self { resnets, upsampler, config })
    }
}

impl Module for UpDecoderBlock2D {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = xs.clone();
        for resnet in self.resnets.iter() {
            xs = resnet.forward(&xs, None)?
        }
        match &self.upsampler {
            Some(upsampler) => upsampler.forward(&xs, None),
            None => Ok(xs),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct UNetMidBlock2DConfig {
    pub num_layers: usize,
    pub resnet_eps: f64,
    pub resnet_groups: usize,
    /// Channels per attention head; `None` for one head over all channels.
    pub attn_num_head_channels: Option<usize>,
    /// Whether there is an attention block between resnets (`mid_block_add_attention`).
    pub add_attention: bool,
    pub output_scale_factor: f64,
}

impl Default for UNetMidBlock2DConfig {
    fn default() -> Self {
        Self {
            num_layers: 1,
            resnet_eps: 1e-6,
            resnet_groups: 32,
            attn_num_head_channels: None,
            add_attention: true,
            output_scale_factor: 1.,
        }
    }
}

/// The VAE's mid block: resnet, then (attention, resnet) pairs.
#[derive(Debug, Clone)]
pub struct UNetMidBlock2D {
    resnet: ResnetBlock2D,
    attn_resnets: Vec<(Option<AttentionBlock>, ResnetBlock2D)>,
    pub config: UNetMidBlock2DConfig,
}

impl UNetMidBlock2D {
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        temb_channels: Option<usize>,
        config: UNetMidBlock2DConfig,
    ) -> Result<Self> {
        let resnet_cfg =
            resnet_config(temb_channels, config.resnet_groups, config.resnet_eps, config.output_scale_factor);
        let attn_cfg = AttentionBlockConfig {
            num_head_channels: config.attn_num_head_channels,
            num_groups: config.resnet_groups,
            rescale_output_factor: config.output_scale_factor,
            eps: config.resnet_eps,
        };
        let (resnet, attn_resnets) = mid_block_layers(&vb, config.num_layers, in_channels, resnet_cfg, |vb| {
            config.add_attention.then(|| AttentionBlock::new(vb, in_channels, attn_cfg)).transpose()
        })?;
        Ok(Self { resnet, attn_resnets, config })
    }

    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let mut xs = self.resnet.forward(xs, temb)?;
        for (attn, resnet) in self.attn_resnets.iter() {
            if let Some(attn) = attn {
                xs = attn.forward(&xs)?
            }
            xs = resnet.forward(&xs, temb)?
        }
        Ok(xs)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct UNetMidBlock2DCrossAttnConfig {
    pub num_layers: usize,
    pub resnet_eps: f64,
    pub resnet_groups: usize,
    /// The number of attention heads.
    pub num_attention_heads: usize,
    pub output_scale_factor: f64,
    pub cross_attn_dim: usize,
    /// Attention slicing (see [`super::attention::Attention::new`]).
    pub slice_size: Option<usize>,
    pub use_linear_projection: bool,
    pub transformer_layers_per_block: usize,
}

impl Default for UNetMidBlock2DCrossAttnConfig {
    fn default() -> Self {
        Self {
            num_layers: 1,
            resnet_eps: 1e-6,
            resnet_groups: 32,
            num_attention_heads: 1,
            output_scale_factor: 1.,
            cross_attn_dim: 1280,
            slice_size: None,
            use_linear_projection: false,
            transformer_layers_per_block: 1,
        }
    }
}

/// The UNet's mid block: resnet, then (transformer, resnet) pairs.
#[derive(Debug, Clone)]
pub struct UNetMidBlock2DCrossAttn {
    pub(crate) resnet: ResnetBlock2D,
    pub(crate) attn_resnets: Vec<(Transformer2DModel, ResnetBlock2D)>,
    pub config: UNetMidBlock2DCrossAttnConfig,
}

impl UNetMidBlock2DCrossAttn {
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        temb_channels: Option<usize>,
        config: UNetMidBlock2DCrossAttnConfig,
    ) -> Result<Self> {
        let resnet_cfg =
            resnet_config(temb_channels, config.resnet_groups, config.resnet_eps, config.output_scale_factor);
        let n_heads = config.num_attention_heads;
        let attn_cfg = Transformer2DModelConfig {
            depth: config.transformer_layers_per_block,
            num_groups: config.resnet_groups,
            context_dim: Some(config.cross_attn_dim),
            slice_size: config.slice_size,
            use_linear_projection: config.use_linear_projection,
        };
        let (resnet, attn_resnets) = mid_block_layers(&vb, config.num_layers, in_channels, resnet_cfg, |vb| {
            Transformer2DModel::new(vb, in_channels, n_heads, in_channels / n_heads, attn_cfg)
        })?;
        Ok(Self { resnet, attn_resnets, config })
    }

}

#[derive(Debug, Clone, Copy)]
pub struct DownBlock2DConfig {
    pub num_layers: usize,
    pub resnet_eps: f64,
    pub resnet_groups: usize,
    pub output_scale_factor: f64,
    pub add_downsample: bool,
    pub downsample_padding: usize,
}

impl Default for DownBlock2DConfig {
    fn default() -> Self {
        Self {
            num_layers: 1,
            resnet_eps: 1e-6,
            resnet_groups: 32,
            output_scale_factor: 1.,
            add_downsample: true,
            downsample_padding: 1,
        }
    }
}

/// A UNet down block without attention: resnets, then a downsampler; every output is kept for the skips.
#[derive(Debug, Clone)]
pub struct DownBlock2D {
    pub(crate) resnets: Vec<ResnetBlock2D>,
    pub(crate) downsampler: Option<Downsample2D>,
    pub config: DownBlock2DConfig,
}

impl DownBlock2D {
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        temb_channels: Option<usize>,
        config: DownBlock2DConfig,
    ) -> Result<Self> {
        let resnet_cfg =
            resnet_config(temb_channels, config.resnet_groups, config.resnet_eps, config.output_scale_factor);
        let resnet_in = |i| if i == 0 { in_channels } else { out_channels };
        let resnets = resnet_stack(&vb, config.num_layers, resnet_in, out_channels, resnet_cfg)?;
        let downsampler = downsampler(&vb, config.add_downsample, out_channels, config.downsample_padding)?;
        Ok(Self { resnets, downsampler, config })
    }

}

#[derive(Debug, Clone, Copy)]
pub struct CrossAttnDownBlock2DConfig {
    pub downblock: DownBlock2DConfig,
    /// The number of attention heads.
    pub num_attention_heads: usize,
    pub cross_attention_dim: usize,
    /// Attention slicing (see [`super::attention::Attention::new`]).
    pub slice_size: Option<usize>,
    pub use_linear_projection: bool,
    pub transformer_layers_per_block: usize,
}

impl Default for CrossAttnDownBlock2DConfig {
    fn default() -> Self {
        Self {
            downblock: Default::default(),
            num_attention_heads: 1,
            cross_attention_dim: 1280,
            slice_size: None,
            use_linear_projection: false,
            transformer_layers_per_block: 1,
        }
    }
}

/// A UNet down block with cross-attention: (resnet, transformer) pairs, then a downsampler.
#[derive(Debug, Clone)]
pub struct CrossAttnDownBlock2D {
    pub(crate) downblock: DownBlock2D,
    pub(crate) attentions: Vec<Transformer2DModel>,
    pub config: CrossAttnDownBlock2DConfig,
}

impl CrossAttnDownBlock2D {
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        temb_channels: Option<usize>,
        config: CrossAttnDownBlock2DConfig,
    ) -> Result<Self> {
        let downblock = DownBlock2D::new(vb.clone(), in_channels, out_channels, temb_channels, config.downblock)?;
        let n_heads = config.num_attention_heads;
        let cfg = Transformer2DModelConfig {
            depth: config.transformer_layers_per_block,
            context_dim: Some(config.cross_attention_dim),
            num_groups: config.downblock.resnet_groups,
            slice_size: config.slice_size,
            use_linear_projection: config.use_linear_projection,
        };
        let attentions = transformer_stack(&vb, config.downblock.num_layers, out_channels, n_heads, cfg)?;
        Ok(Self { downblock, attentions, config })
    }

}

#[derive(Debug, Clone, Copy)]
pub struct UpBlock2DConfig {
    pub num_layers: usize,
    pub resnet_eps: f64,
    pub resnet_groups: usize,
    pub output_scale_factor: f64,
    pub add_upsample: bool,
}

impl Default for UpBlock2DConfig {
    fn default() -> Self {
        Self { num_layers: 1, resnet_eps: 1e-6, resnet_groups: 32, output_scale_factor: 1., add_upsample: true }
    }
}

/// A UNet up block without attention: resnets, each on the concatenation of the previous output and
/// a skip from the down path, then an upsampler.
#[derive(Debug, Clone)]
pub struct UpBlock2D {
    pub resnets: Vec<ResnetBlock2D>,
    pub(crate) upsampler: Option<Upsample2D>,
    pub config: UpBlock2DConfig,
}

impl UpBlock2D {
    /// `in_channels`: channels of the last skip; `prev_output_channels`: channels of the previous block's output.
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        prev_output_channels: usize,
        out_channels: usize,
        temb_channels: Option<usize>,
        config: UpBlock2DConfig,
    ) -> Result<Self> {
        let resnet_cfg =
            resnet_config(temb_channels, config.resnet_groups, config.resnet_eps, config.output_scale_factor);
        // Each resnet takes the previous output concatenated with a skip; the last skip has `in_channels`.
        let resnet_in = |i| {
            let res_skip_channels = if i == config.num_layers - 1 { in_channels } else { out_channels };
            let prev_channels = if i == 0 { prev_output_channels } else { out_channels };
            prev_channels + res_skip_channels
        };
        let resnets = resnet_stack(&vb, config.num_layers, resnet_in, out_channels, resnet_cfg)?;
        let upsampler = upsampler(&vb, config.add_upsample, out_channels)?;
        Ok(Self { resnets, upsampler, config })
    }

}

#[derive(Debug, Clone, Copy)]
pub struct CrossAttnUpBlock2DConfig {
    pub upblock: UpBlock2DConfig,
    /// The number of attention heads.
    pub num_attention_heads: usize,
    pub cross_attention_dim: usize,
    /// Attention slicing (see [`super::attention::Attention::new`]).
    pub slice_size: Option<usize>,
    pub use_linear_projection: bool,
    pub transformer_layers_per_block: usize,
}

impl Default for CrossAttnUpBlock2DConfig {
    fn default() -> Self {
        Self {
            upblock: Default::default(),
            num_attention_heads: 1,
            cross_attention_dim: 1280,
            slice_size: None,
            use_linear_projection: false,
            transformer_layers_per_block: 1,
        }
    }
}

/// A UNet up block with cross-attention: (resnet, transformer) pairs on the skips, then an upsampler.
#[derive(Debug, Clone)]
pub struct CrossAttnUpBlock2D {
    pub upblock: UpBlock2D,
    pub attentions: Vec<Transformer2DModel>,
    pub config: CrossAttnUpBlock2DConfig,
}

impl CrossAttnUpBlock2D {
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        prev_output_channels: usize,
        out_channels: usize,
        temb_channels: Option<usize>,
        config: CrossAttnUpBlock2DConfig,
    ) -> Result<Self> {
        let upblock =
            UpBlock2D::new(vb.clone(), in_channels, prev_output_channels, out_channels, temb_channels, config.upblock)?;
        let n_heads = config.num_attention_heads;
        let cfg = Transformer2DModelConfig {
            depth: config.transformer_layers_per_block,
            context_dim: Some(config.cross_attention_dim),
            num_groups: config.upblock.resnet_groups,
            slice_size: config.slice_size,
            use_linear_projection: config.use_linear_projection,
        };
        let attentions = transformer_stack(&vb, config.upblock.num_layers, out_channels, n_heads, cfg)?;
        Ok(Self { upblock, attentions, config })
    }

}
