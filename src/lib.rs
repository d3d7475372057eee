//! LayerDiffusion in Rust: Stable Diffusion v1.x on candle, equal to diffusers and differentiable
//! end to end.
//!
//! ```no_run
//! use layerdiff::pipeline::{generate, GenerateOptions, StableDiffusion};
//! use layerdiff::sources::{ModelFiles, SourceOptions};
//! # fn main() -> layerdiff::Result<()> {
//! let files = ModelFiles::resolve("CompVis/stable-diffusion-v1-4", &SourceOptions::from_env())?;
//! let sd = StableDiffusion::load(&files, &candle_core::Device::Cpu, candle_core::DType::F32)?;
//! let opts = GenerateOptions { prompt: "a photo of a dog".into(), seed: 1, ..Default::default() };
//! let image = generate(&sd, &opts, &mut |_, _| {})?;
//! layerdiff::image_io::save_png_atomic(&layerdiff::image_io::tensor_to_images(&image)?[0], "dog.png".as_ref())?;
//! # Ok(()) }
//! ```
pub mod assets;
pub mod baselines;
pub mod bench;
pub mod error;
pub mod eval;
pub mod image_io;
pub mod method;
pub mod models;
pub mod pipeline;
pub mod schedulers;
pub mod segment;
pub mod sources;
pub mod tiny;
pub mod tokenizer;
pub mod toyworld;
pub mod train;

pub use error::{bad_input, Error, Result};
