//! Stable Diffusion v1.x/2.x models, adapted from candle-transformers 0.11.1's `stable_diffusion`
//! module (MIT OR Apache-2.0) and made differentiable through [`nn`].
pub mod attention;
pub mod clip_text;
pub mod embeddings;
pub mod nn;
pub mod resnet;
pub mod unet_2d;
pub mod unet_2d_blocks;
pub mod vae;

pub use clip_text::{ClipTextConfig, ClipTextTransformer};
pub use unet_2d::{UNet2DConditionModel, UNet2DConditionModelConfig};
pub use vae::{AutoencoderKL, AutoencoderKLConfig, DiagonalGaussian};
