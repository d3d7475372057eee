//! Adapted from candle-transformers 0.11.1 (MIT OR Apache-2.0), stable_diffusion/embeddings.rs
//!
//! Timestep embeddings of the UNet, as diffusers' `models/embeddings.py`
//! (`get_timestep_embedding`, `Timesteps`, `TimestepEmbedding`).

use crate::models::nn::{linear, silu, Linear};
use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

/// `TimestepEmbedding` with `act_fn = "silu"`: `linear_2(silu(linear_1(t_emb)))`.
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn new(vb: VarBuilder, channel: usize, time_embed_dim: usize) -> Result<Self> {
        let linear_1 = linear(channel, time_embed_dim, vb.pp("linear_1"))?;
        let linear_2 = linear(time_embed_dim, time_embed_dim, vb.pp("linear_2"))?;
        Ok(Self { linear_1, linear_2 })
    }
}

impl Module for TimestepEmbedding {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = silu(&self.linear_1.forward(xs)?)?;
        self.linear_2.forward(&xs)
    }
}

/// Sinusoidal timestep features, as diffusers' `Timesteps` (no weights).
#[derive(Debug, Clone, Copy)]
pub struct Timesteps {
    num_channels: usize,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f64,
}

impl Timesteps {
    pub fn new(num_channels: usize, flip_sin_to_cos: bool, downscale_freq_shift: f64) -> Self {
        Self { num_channels, flip_sin_to_cos, downscale_freq_shift }
    }
}

impl Module for Timesteps {
    /// `timesteps`: 1-D, one per batch element. The result is always f32, as in diffusers
    /// (`timesteps[:, None].float() * exp(exponent)`), and the caller casts it to the model dtype.
    fn forward(&self, timesteps: &Tensor) -> Result<Tensor> {
        let half_dim = self.num_channels / 2;
        // exponent = -ln(10000) * arange(half_dim) / (half_dim - downscale_freq_shift), in f32.
        let exponent =
            (Tensor::arange(0u32, half_dim as u32, timesteps.device())?.to_dtype(DType::F32)? * -f64::ln(10000.))?;
        // A true f32 division, as torch (dividing by a scalar in candle multiplies by its inverse).
        let denom = Tensor::new((half_dim as f64 - self.downscale_freq_shift) as f32, timesteps.device())?;
        let exponent = exponent.broadcast_div(&denom)?;
        let freqs = exponent.exp()?;
        let emb = timesteps.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?.broadcast_mul(&freqs.unsqueeze(0)?)?;
        let (sin, cos) = (emb.sin()?, emb.cos()?);
        let emb = if self.flip_sin_to_cos {
            Tensor::cat(&[&cos, &sin], D::Minus1)?
        } else {
            Tensor::cat(&[&sin, &cos], D::Minus1)?
        };
        if self.num_channels % 2 == 1 {
            emb.pad_with_zeros(D::Minus1, 0, 1)
        } else {
            Ok(emb)
        }
    }
}
