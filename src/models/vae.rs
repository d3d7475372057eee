//! Adapted from candle-transformers 0.11.1 (MIT OR Apache-2.0), stable_diffusion/vae.rs
//!
//! The variational auto-encoder of Stable Diffusion, as diffusers' `AutoencoderKL`
//! (`models/autoencoders/autoencoder_kl.py`, `models/autoencoders/vae.py`): images in [-1, 1] to
//! a diagonal Gaussian over latents, and latents back to images.

use super::unet_2d_blocks::{
    DownEncoderBlock2D, DownEncoderBlock2DConfig, UNetMidBlock2D, UNetMidBlock2DConfig, UpDecoderBlock2D,
    UpDecoderBlock2DConfig,
};
use super::{parse_config, unsupported};
use crate::models::nn::{conv2d, group_norm, Conv2d, Conv2dConfig, GroupNorm};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;
use serde_json::Value;

const CONFIG_FILE: &str = "vae/config.json";
const CONFIG_FIX: &str = "use a Stable Diffusion v1.x/2.x VAE config (AutoencoderKL)";

#[derive(Debug, Clone, PartialEq)]
pub struct AutoencoderKLConfig {
    /// Image channels in.
    pub in_channels: usize,
    /// Image channels out.
    pub out_channels: usize,
    /// Channels per resolution level, highest resolution first; each level but the last halves the size.
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    /// The image size the model was trained at.
    pub sample_size: usize,
    /// Latents are multiplied by this before the UNet (the caller's job, see [`AutoencoderKL::scaling_factor`]).
    pub scaling_factor: f64,
    /// Self-attention in the encoder's and decoder's mid blocks.
    pub mid_block_add_attention: bool,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
}

impl Default for AutoencoderKLConfig {
    /// Stable Diffusion v1.5.
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: 512,
            scaling_factor: 0.18215,
            mid_block_add_attention: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
        }
    }
}

/// diffusers' `AutoencoderKL` config keys, with its defaults.
#[derive(Debug, Deserialize)]
#[serde(default)]
struct RawVaeConfig {
    in_channels: usize,
    out_channels: usize,
    down_block_types: Vec<String>,
    up_block_types: Vec<String>,
    block_out_channels: Vec<usize>,
    layers_per_block: usize,
    act_fn: String,
    latent_channels: usize,
    norm_num_groups: usize,
    sample_size: Value,
    scaling_factor: f64,
    use_quant_conv: bool,
    use_post_quant_conv: bool,
    mid_block_add_attention: bool,
}

impl Default for RawVaeConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".into(),
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: Value::from(32),
            scaling_factor: 0.18215,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

const UNSUPPORTED_UNLESS: &[(&str, &[&str])] =
    &[("shift_factor", &["null"]), ("latents_mean", &["null"]), ("latents_std", &["null"])];

fn bad(key: &str, value: impl std::fmt::Display) -> crate::Error {
    unsupported(CONFIG_FILE, key, value, CONFIG_FIX)
}

impl AutoencoderKLConfig {
    /// Reads diffusers' `vae/config.json`, with diffusers' defaults for missing keys.
    pub fn from_json(config: &Value) -> crate::Result<Self> {
        let raw: RawVaeConfig = parse_config(config, CONFIG_FILE, CONFIG_FIX, UNSUPPORTED_UNLESS)?;
        let n = raw.block_out_channels.len();
        let groups = raw.norm_num_groups;
        if n == 0 || groups == 0 || raw.block_out_channels.iter().any(|c| !c.is_multiple_of(groups)) {
            return Err(bad("block_out_channels", format!("{:?}", raw.block_out_channels)));
        }
        if raw.down_block_types.len() != n || raw.down_block_types.iter().any(|t| t != "DownEncoderBlock2D") {
            return Err(bad("down_block_types", format!("{:?}", raw.down_block_types)));
        }
        if raw.up_block_types.len() != n || raw.up_block_types.iter().any(|t| t != "UpDecoderBlock2D") {
            return Err(bad("up_block_types", format!("{:?}", raw.up_block_types)));
        }
        if raw.act_fn != "silu" {
            return Err(bad("act_fn", format!("{:?}", raw.act_fn)));
        }
        let sample_size = match &raw.sample_size {
            Value::Array(hw) if hw.len() == 2 && hw[0] == hw[1] => hw[0].as_u64(),
            v => v.as_u64(),
        }
        .ok_or_else(|| bad("sample_size", &raw.sample_size))? as usize;
        Ok(Self {
            in_channels: raw.in_channels,
            out_channels: raw.out_channels,
            block_out_channels: raw.block_out_channels,
            layers_per_block: raw.layers_per_block,
            latent_channels: raw.latent_channels,
            norm_num_groups: raw.norm_num_groups,
            sample_size,
            scaling_factor: raw.scaling_factor,
            mid_block_add_attention: raw.mid_block_add_attention,
            use_quant_conv: raw.use_quant_conv,
            use_post_quant_conv: raw.use_post_quant_conv,
        })
    }
}

/// The mid block of the encoder and of the decoder, which diffusers builds alike: one attention
/// head over all channels, no time embedding.
fn mid_block(vb: VarBuilder, channels: usize, cfg: &AutoencoderKLConfig) -> Result<UNetMidBlock2D> {
    let mid_cfg = UNetMidBlock2DConfig {
        resnet_eps: 1e-6,
        resnet_groups: cfg.norm_num_groups,
        attn_num_head_channels: None,
        add_attention: cfg.mid_block_add_attention,
        ..Default::default()
    };
    UNetMidBlock2D::new(vb, channels, None, mid_cfg)
}

/// The VAE encoder, as diffusers' `Encoder` (`double_z = True`).
#[derive(Debug, Clone)]
pub struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownEncoderBlock2D>,
    mid_block: UNetMidBlock2D,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    /// `out_channels`: the latent channels; the encoder outputs twice as many (mean and log-variance).
    pub fn new(vb: VarBuilder, in_channels: usize, out_channels: usize, cfg: &AutoencoderKLConfig) -> Result<Self> {
        let channels = &cfg.block_out_channels;
        let conv_cfg = Conv2dConfig { padding: 1, ..Default::default() };
        let conv_in = conv2d(in_channels, channels[0], 3, conv_cfg, vb.pp("conv_in"))?;
        let vb_down = vb.pp("down_blocks");
        let down_blocks = (0..channels.len())
            .map(|i| {
                let in_channels = if i > 0 { channels[i - 1] } else { channels[0] };
                let block_cfg = DownEncoderBlock2DConfig {
                    num_layers: cfg.layers_per_block,
                    resnet_eps: 1e-6,
                    resnet_groups: cfg.norm_num_groups,
                    add_downsample: i + 1 < channels.len(),
                    downsample_padding: 0,
                    ..Default::default()
                };
                DownEncoderBlock2D::new(vb_down.pp(i), in_channels, channels[i], block_cfg)
            })
            .collect::<Result<Vec<_>>>()?;
        let last = *channels.last().expect("at least one block");
        let mid_block = mid_block(vb.pp("mid_block"), last, cfg)?;
        let conv_norm_out = group_norm(cfg.norm_num_groups, last, 1e-6, vb.pp("conv_norm_out"))?;
        let conv_out = conv2d(last, 2 * out_channels, 3, conv_cfg, vb.pp("conv_out"))?;
        Ok(Self { conv_in, down_blocks, mid_block, conv_norm_out, conv_out })
    }
}

impl Module for Encoder {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        // 1. conv_in, 2. down, 3. mid, 4. post-process
        let mut xs = self.conv_in.forward(xs)?;
        for down_block in self.down_blocks.iter() {
            xs = down_block.forward(&xs)?
        }
        let xs = self.mid_block.forward(&xs, None)?;
        let xs = self.conv_norm_out.forward_silu(&xs)?;
        self.conv_out.forward(&xs)
    }
}

/// The VAE decoder, as diffusers' `Decoder`.
#[derive(Debug, Clone)]
pub struct Decoder {
    conv_in: Conv2d,
    mid_block: UNetMidBlock2D,
    up_blocks: Vec<UpDecoderBlock2D>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    pub fn new(vb: VarBuilder, in_channels: usize, out_channels: usize, cfg: &AutoencoderKLConfig) -> Result<Self> {
        let reversed: Vec<usize> = cfg.block_out_channels.iter().copied().rev().collect();
        let conv_cfg = Conv2dConfig { padding: 1, ..Default::default() };
        let conv_in = conv2d(in_channels, reversed[0], 3, conv_cfg, vb.pp("conv_in"))?;
        let mid_block = mid_block(vb.pp("mid_block"), reversed[0], cfg)?;
        let vb_up = vb.pp("up_blocks");
        let up_blocks = (0..reversed.len())
            .map(|i| {
                let in_channels = if i > 0 { reversed[i - 1] } else { reversed[0] };
                let block_cfg = UpDecoderBlock2DConfig {
                    num_layers: cfg.layers_per_block + 1,
                    resnet_eps: 1e-6,
                    resnet_groups: cfg.norm_num_groups,
                    add_upsample: i + 1 < reversed.len(),
                    ..Default::default()
                };
                UpDecoderBlock2D::new(vb_up.pp(i), in_channels, reversed[i], block_cfg)
            })
            .collect::<Result<Vec<_>>>()?;
        let first = cfg.block_out_channels[0];
        let conv_norm_out = group_norm(cfg.norm_num_groups, first, 1e-6, vb.pp("conv_norm_out"))?;
        let conv_out = conv2d(first, out_channels, 3, conv_cfg, vb.pp("conv_out"))?;
        Ok(Self { conv_in, mid_block, up_blocks, conv_norm_out, conv_out })
    }
}

impl Module for Decoder {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        // 1. conv_in, 2. mid, 3. up, 4. post-process
        let xs = self.conv_in.forward(xs)?;
        let mut xs = self.mid_block.forward(&xs, None)?;
        for up_block in self.up_blocks.iter() {
            xs = up_block.forward(&xs)?
        }
        let xs = self.conv_norm_out.forward_silu(&xs)?;
        self.conv_out.forward(&xs)
    }
}

/// The encoder's output: a Gaussian with diagonal covariance over the latents, as diffusers'
/// `DiagonalGaussianDistribution`.
#[derive(Debug, Clone)]
pub struct DiagonalGaussian {
    mean: Tensor,
    logvar: Tensor,
    std: Tensor,
}

impl DiagonalGaussian {
    /// Splits the encoder's `2 * latent_channels` channels into mean and log-variance.
    pub fn new(parameters: &Tensor) -> Result<Self> {
        let channels = parameters.dim(1)? / 2;
        let mean = parameters.narrow(1, 0, channels)?;
        let logvar = parameters.narrow(1, channels, channels)?.clamp(-30f32, 20f32)?;
        let std = (&logvar * 0.5)?.exp()?;
        Ok(Self { mean, logvar, std })
    }

    /// `mean + std * noise`, with `noise` standard normal of the mean's shape (the caller seeds it).
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        &self.mean + (&self.std * noise)?
    }

    /// The mean (also the mode), `(batch, latent_channels, h / f, w / f)`.
    pub fn mean(&self) -> &Tensor {
        &self.mean
    }

    /// The log-variance, clamped to [-30, 20].
    pub fn logvar(&self) -> &Tensor {
        &self.logvar
    }

    /// The standard deviation, `exp(logvar / 2)`.
    pub fn std(&self) -> &Tensor {
        &self.std
    }
}

/// Stable Diffusion's VAE, as diffusers' `AutoencoderKL`.
#[derive(Debug, Clone)]
pub struct AutoencoderKL {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    config: AutoencoderKLConfig,
}

impl AutoencoderKL {
    /// Builds the VAE from weights named as in diffusers' `vae/diffusion_pytorch_model.safetensors`.
    pub fn new(vb: VarBuilder, config: AutoencoderKLConfig) -> Result<Self> {
        let latent = config.latent_channels;
        let encoder = Encoder::new(vb.pp("encoder"), config.in_channels, latent, &config)?;
        let decoder = Decoder::new(vb.pp("decoder"), latent, config.out_channels, &config)?;
        let conv_cfg = Conv2dConfig::default();
        let quant_conv = if config.use_quant_conv {
            Some(conv2d(2 * latent, 2 * latent, 1, conv_cfg, vb.pp("quant_conv"))?)
        } else {
            None
        };
        let post_quant_conv = if config.use_post_quant_conv {
            Some(conv2d(latent, latent, 1, conv_cfg, vb.pp("post_quant_conv"))?)
        } else {
            None
        };
        Ok(Self { encoder, decoder, quant_conv, post_quant_conv, config })
    }

    pub fn config(&self) -> &AutoencoderKLConfig {
        &self.config
    }

    /// Latents are multiplied by this before the UNet and divided by it before [`Self::decode`].
    pub fn scaling_factor(&self) -> f64 {
        self.config.scaling_factor
    }

    /// Image size over latent size: `2^(levels - 1)`.
    pub fn downsampling_factor(&self) -> usize {
        1 << (self.config.block_out_channels.len() - 1)
    }

    /// The latent distribution of images `(batch, in_channels, h, w)` in [-1, 1].
    pub fn encode(&self, xs: &Tensor) -> Result<DiagonalGaussian> {
        let xs = self.encoder.forward(xs)?;
        let parameters = match &self.quant_conv {
            None => xs,
            Some(quant_conv) => quant_conv.forward(&xs)?,
        };
        DiagonalGaussian::new(&parameters)
    }

    /// Images in [-1, 1] (not clamped) from raw (unscaled) latents.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            None => z.clone(),
            Some(post_quant_conv) => post_quant_conv.forward(z)?,
        };
        self.decoder.forward(&z)
    }
}
