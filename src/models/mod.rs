//! Stable Diffusion v1.x/2.x models, adapted from candle-transformers 0.11.1's `stable_diffusion`
//! module (MIT OR Apache-2.0) and made differentiable through [`nn`].
pub mod attention;
pub mod checkpoint;
pub mod clip;
pub mod clip_text;
pub mod dinov2;
pub mod embeddings;
pub mod nn;
pub mod resnet;
pub mod sam;
pub(crate) mod cpu_kernels;
pub mod cuda_kernels;
pub mod cudnn_conv;
pub mod unet_2d;
pub mod unet_2d_blocks;
pub mod vae;

pub use clip_text::{ClipTextConfig, ClipTextTransformer};
pub use unet_2d::{UNet2DConditionModel, UNet2DConditionModelConfig};
pub use vae::{AutoencoderKL, AutoencoderKLConfig, DiagonalGaussian};

use serde::de::DeserializeOwned;
use serde_json::Value;
use std::fmt::Display;

/// The one error for a config key set to a value these models do not implement, worded alike for
/// every config file.
pub(crate) fn unsupported(file: &str, key: &str, value: impl Display, fix: &str) -> crate::Error {
    crate::bad_input(file, format!("`{key}` = {value} is not supported"), fix)
}

/// Reads a config file into its raw key struct, after `check_unsupported`: the shared first step of
/// the models' `from_json`.
pub(crate) fn parse_config<T: DeserializeOwned>(
    config: &Value,
    file: &str,
    fix: &str,
    unsupported_unless: &[(&str, &[&str])],
) -> crate::Result<T> {
    check_unsupported(config, file, fix, unsupported_unless)?;
    serde_json::from_value(config.clone()).map_err(|e| crate::bad_input(file, format!("unreadable config: {e}"), fix))
}

/// `config[key]` is absent or one of the values that leave the feature off (a list of them too).
fn check_unsupported(config: &Value, file: &str, fix: &str, keys: &[(&str, &[&str])]) -> crate::Result<()> {
    for (key, allowed) in keys {
        let Some(value) = config.get(*key) else { continue };
        let ok = |v: &Value| allowed.contains(&v.to_string().as_str());
        let fine = match value {
            Value::Array(items) => items.iter().all(ok),
            v => ok(v),
        };
        if !fine {
            return Err(unsupported(file, key, value, fix));
        }
    }
    Ok(())
}
