//! Adapted from candle-transformers 0.11.1 (MIT OR Apache-2.0), stable_diffusion/resnet.rs
//!
//! The residual block of the UNet and the VAE, as diffusers' `ResnetBlock2D`
//! (`models/resnet.py`, `resnet_time_scale_shift = "default"`, `non_linearity = "silu"`).

use crate::models::nn::{conv2d, group_norm, linear, silu, Conv2d, Conv2dConfig, GroupNorm, Linear};
use candle_core::{Module, Result, Tensor, D};
use candle_nn::VarBuilder;

/// Configuration for a ResNet block.
#[derive(Debug, Clone, Copy)]
pub struct ResnetBlock2DConfig {
    /// The number of output channels, defaults to the number of input channels.
    pub out_channels: Option<usize>,
    /// Channels of the time embedding; `None` for the VAE (no `time_emb_proj`).
    pub temb_channels: Option<usize>,
    /// The number of groups of both group norms.
    pub groups: usize,
    /// The number of groups of `norm2`, defaults to `groups`.
    pub groups_out: Option<usize>,
    /// The epsilon of the group norms.
    pub eps: f64,
    /// Whether the skip connection has a 1x1 convolution; by default, when the number of channels changes.
    pub use_in_shortcut: Option<bool>,
    /// The output is divided by this value.
    pub output_scale_factor: f64,
}

impl Default for ResnetBlock2DConfig {
    fn default() -> Self {
        Self {
            out_channels: None,
            temb_channels: Some(512),
            groups: 32,
            groups_out: None,
            eps: 1e-6,
            use_in_shortcut: None,
            output_scale_factor: 1.,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    time_emb_proj: Option<Linear>,
    conv_shortcut: Option<Conv2d>,
    config: ResnetBlock2DConfig,
}

impl ResnetBlock2D {
    pub fn new(vb: VarBuilder, in_channels: usize, config: ResnetBlock2DConfig) -> Result<Self> {
        let out_channels = config.out_channels.unwrap_or(in_channels);
        let conv_cfg = Conv2dConfig { padding: 1, ..Default::default() };
        let norm1 = group_norm(config.groups, in_channels, config.eps, vb.pp("norm1"))?;
        let conv1 = conv2d(in_channels, out_channels, 3, conv_cfg, vb.pp("conv1"))?;
        let groups_out = config.groups_out.unwrap_or(config.groups);
        let norm2 = group_norm(groups_out, out_channels, config.eps, vb.pp("norm2"))?;
        let conv2 = conv2d(out_channels, out_channels, 3, conv_cfg, vb.pp("conv2"))?;
        let use_in_shortcut = config.use_in_shortcut.unwrap_or(in_channels != out_channels);
        let conv_shortcut = if use_in_shortcut {
            Some(conv2d(in_channels, out_channels, 1, Conv2dConfig::default(), vb.pp("conv_shortcut"))?)
        } else {
            None
        };
        let time_emb_proj = match config.temb_channels {
            None => None,
            Some(temb_channels) => Some(linear(temb_channels, out_channels, vb.pp("time_emb_proj"))?),
        };
        Ok(Self { norm1, conv1, norm2, conv2, time_emb_proj, conv_shortcut, config })
    }

    pub fn forward(&self, input: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        // 1. norm1 -> silu -> conv1
        let xs = self.conv1.forward(&self.norm1.forward_silu(input)?)?;
        // 2. add the projected time embedding, broadcast over the pixels
        let xs = match (temb, &self.time_emb_proj) {
            (Some(temb), Some(proj)) => {
                // over [b, c, h w]: candle's GPU broadcast kernels cost more per dimension
                let (b, c, h, w) = xs.dims4()?;
                let temb = proj.forward(&silu(temb)?)?.unsqueeze(D::Minus1)?;
                xs.reshape((b, c, h * w))?.broadcast_add(&temb)?.reshape((b, c, h, w))?
            }
            _ => xs,
        };
        // 3. norm2 -> silu -> (dropout) -> conv2
        let xs = self.conv2.forward(&self.norm2.forward_silu(&xs)?)?;
        // 4. shortcut, residual and output scale
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(input)?,
            None => input.clone(),
        };
        let out = (shortcut + xs)?;
        if self.config.output_scale_factor == 1. {
            Ok(out)
        } else {
            out / self.config.output_scale_factor
        }
    }
}
