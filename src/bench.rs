//! Benchmarks of the full-size SD v1.4 UNet with random weights (no download needed): one forward,
//! and one forward + backward with respect to the text context (the step of stage 1).

use crate::error::Result;
use crate::models::unet_2d::{UNet2DConditionModel, UNet2DConditionModelConfig};
use crate::pipeline::seeded_noise;
use candle_core::{DType, Device, Var};
use serde::Serialize;
use std::time::Instant;

/// The UNet of CompVis/stable-diffusion-v1-4 (`unet/config.json`).
pub fn sd_v14_unet_config() -> serde_json::Value {
    serde_json::json!({
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu", "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": false,
        "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
        "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
        "out_channels": 4, "sample_size": 64,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
    })
}

#[derive(Debug, Serialize)]
pub struct UnetBench {
    pub device: String,
    pub dtype: String,
    pub latent_size: usize,
    /// Median seconds of one UNet forward, batch 1.
    pub forward_s: f64,
    /// Median seconds of one forward + backward with respect to the context, weights frozen.
    pub forward_backward_context_s: f64,
    /// Peak resident memory of the process during each measurement (Linux VmHWM), in MiB.
    pub forward_peak_rss_mib: Option<f64>,
    pub forward_backward_peak_rss_mib: Option<f64>,
}

/// Times the full-size UNet at `latent_size` x `latent_size` latents, median of `runs` after a warm-up.
pub fn bench_unet(device: &Device, dtype: DType, latent_size: usize, runs: usize) -> Result<UnetBench> {
    crate::pipeline::check_dtype(device, dtype)?;
    let cfg = UNet2DConditionModelConfig::from_json(&sd_v14_unet_config())?;
    let (unet, _) = crate::tiny::seeded_model(0, dtype, device, |vb| Ok(UNet2DConditionModel::new(vb, cfg)?))?;
    let sample = seeded_noise(1, &[1, 4, latent_size, latent_size], device, dtype)?;
    let context = seeded_noise(2, &[1, 77, 768], device, dtype)?;
    let time = |f: &dyn Fn() -> Result<()>| -> Result<(f64, Option<f64>)> {
        f()?;
        reset_peak_rss();
        let mut times = Vec::with_capacity(runs);
        for _ in 0..runs.max(1) {
            let start = Instant::now();
            f()?;
            device.synchronize()?;
            times.push(start.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        Ok((times[times.len() / 2], peak_rss_mib()))
    };
    let (forward_s, forward_peak) = time(&|| {
        unet.forward(&sample, 500.0, &context)?;
        Ok(())
    })?;
    let (fb_s, fb_peak) = time(&|| {
        let ctx = Var::from_tensor(&context)?;
        let loss = unet.forward(&sample, 500.0, ctx.as_tensor())?.sqr()?.mean_all()?;
        let grads = loss.backward()?;
        grads.get(ctx.as_tensor()).ok_or_else(|| candle_core::Error::Msg("no context gradient".into()))?;
        Ok(())
    })?;
    Ok(UnetBench {
        device: format!("{device:?}"),
        dtype: format!("{dtype:?}"),
        latent_size,
        forward_s,
        forward_backward_context_s: fb_s,
        forward_peak_rss_mib: forward_peak,
        forward_backward_peak_rss_mib: fb_peak,
    })
}

/// Resets the kernel's peak-RSS counter (Linux: writing 5 to clear_refs), so each measurement has its own.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}
