//! The full-size SD v1.4 UNet against PyTorch (slow, not in CI: it needs a 3.4 GB weight file).
//!
//! ```sh
//! ~/venv-ref/bin/python tools/fullsize_unet_ref.py --out /tmp/fullsize-unet
//! LAYERDIFF_FULLSIZE_DIR=/tmp/fullsize-unet cargo test --release --test fullsize -- --ignored --nocapture
//! ```

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use layerdiff::models::unet_2d::{UNet2DConditionModel, UNet2DConditionModelConfig};
use std::path::PathBuf;

#[test]
#[ignore = "needs tools/fullsize_unet_ref.py's 3.4 GB output; see the file's doc"]
fn fullsize_unet_forward_matches_pytorch() {
    let dir = PathBuf::from(std::env::var("LAYERDIFF_FULLSIZE_DIR").unwrap_or_else(|_| "/tmp/fullsize-unet".into()));
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("unet/config.json")).unwrap()).unwrap();
    let weights = dir.join("unet/diffusion_pytorch_model.safetensors");
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &Device::Cpu).unwrap() };
    let unet = UNet2DConditionModel::new(vb, UNet2DConditionModelConfig::from_json(&config).unwrap()).unwrap();
    let io = candle_core::safetensors::load(dir.join("fullsize_io.safetensors"), &Device::Cpu).unwrap();
    let t = io["timestep"].to_scalar::<f32>().unwrap() as f64;
    let out = unet.forward(&io["sample"], t, &io["context"]).unwrap();
    let err = (out - &io["out"]).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    let scale = io["out"].abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    eprintln!("full-size UNet, 32x32 latents: max abs error {err:.3e} (largest output {scale:.3})");
    assert!(err < 1e-4, "max abs error {err}");
}
