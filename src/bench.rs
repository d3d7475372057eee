//! Benchmarks of the full-size SD v1.4 UNet with random weights (no download needed): one forward,
//! and one forward + backward with respect to the text context (the step of stage 1); the
//! method's stage steps; and Segment Anything's image embedding and decoding.

use crate::error::Result;
use crate::models::sam::{Sam, SamConfig};
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
    let (forward_s, forward_peak) = time_median(device, runs, &mut || {
        unet.forward(&sample, 500.0, &context)?;
        Ok(())
    })?;
    let (fb_s, fb_peak) = time_median(device, runs, &mut || {
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

/// Per-step medians of the method's stages at full size, each with its peak RSS.
#[derive(Debug, Serialize)]
pub struct StageBench {
    pub device: String,
    pub dtype: String,
    pub latent_size: usize,
    /// Stage 1: both layers in one batched forward, backward to the two embeddings, Adam.
    pub stage1_step_s: f64,
    pub stage1_peak_rss_mib: Option<f64>,
    /// Stage 2, every UNet weight trained with Adam.
    pub stage2_full_step_s: Option<f64>,
    pub stage2_full_peak_rss_mib: Option<f64>,
    /// Stage 2, rank-4 LoRA adapters on the attention projections.
    pub stage2_lora_step_s: f64,
    pub stage2_lora_peak_rss_mib: Option<f64>,
    /// Stage 3: one classifier-free-guided UNet call (batch 2).
    pub stage3_step_s: f64,
    pub stage3_peak_rss_mib: Option<f64>,
}

/// Times one step of each stage of an edit on the full-size UNet with random weights, median of
/// `runs` after a warm-up step. `full` includes full fine-tuning (about 20 GB at 32x32 on a CPU).
pub fn bench_stages(device: &Device, dtype: DType, latent_size: usize, runs: usize, full: bool) -> Result<StageBench> {
    use crate::method::finetune::LayeredFinetune;
    use crate::method::optimize::LayeredOptimization;
    use crate::method::{FinetuneMode, LayeredLatents};

    crate::pipeline::check_dtype(device, dtype)?;
    let cfg = UNet2DConditionModelConfig::from_json(&sd_v14_unet_config())?;
    let (unet, weights) = crate::tiny::seeded_model(0, dtype, device, |vb| Ok(UNet2DConditionModel::new(vb, cfg.clone())?))?;
    let shape = [1, 4, latent_size, latent_size];
    let half_mask = |seed| -> Result<candle_core::Tensor> {
        Ok(seeded_noise(seed, &[1, 1, latent_size, latent_size], device, dtype)?.ge(0.0)?.to_dtype(dtype)?)
    };
    let data = LayeredLatents {
        subject: seeded_noise(1, &shape, device, dtype)?,
        subject_mask: half_mask(2)?,
        background: seeded_noise(3, &shape, device, dtype)?,
        background_mask: half_mask(4)?,
    };
    let context = seeded_noise(5, &[1, 77, 768], device, dtype)?;
    let alphas: Vec<f64> = (0..1000).map(|i| 1.0 - (i as f64 + 1.0) * 9e-4).collect();
    let mut stage1 = LayeredOptimization::new(&context, &context, 1e-3)?;
    let (stage1_step_s, stage1_peak) = time_median(device, runs, &mut || {
        let until = stage1.step + 1;
        stage1.run(&unet, &alphas, &data, 0, until, &mut |_| {})
    })?;
    drop(stage1);

    // Stage 3 before stage 2: freed memory is not always handed back, and full fine-tuning is the largest.
    let latents = seeded_noise(6, &shape, device, dtype)?;
    let guidance = crate::pipeline::Guidance { cond: &context, uncond: &context, scale: 7.5 };
    let (stage3_step_s, stage3_peak) = time_median(device, runs, &mut || {
        crate::pipeline::guided_noise(&unet, &latents, 500, &guidance)?;
        Ok(())
    })?;
    let finetune_step = |mode: FinetuneMode| -> Result<(f64, Option<f64>)> {
        let mut stage2 = LayeredFinetune::new(weights.clone().into_iter().collect(), cfg.clone(), mode, 4, 2e-6, dtype, device)?;
        time_median(device, runs, &mut || {
            let until = stage2.step + 1;
            stage2.run(&context, 2.0, 1.0, &alphas, &data, 0, until, &mut |_| {})
        })
    };
    let (stage2_lora_step_s, lora_peak) = finetune_step(FinetuneMode::Lora)?;
    let (stage2_full_step_s, full_peak) = match full {
        true => {
            let (s, p) = finetune_step(FinetuneMode::Full)?;
            (Some(s), p)
        }
        false => (None, None),
    };

    Ok(StageBench {
        device: format!("{device:?}"),
        dtype: format!("{dtype:?}"),
        latent_size,
        stage1_step_s,
        stage1_peak_rss_mib: stage1_peak,
        stage2_full_step_s,
        stage2_full_peak_rss_mib: full_peak,
        stage2_lora_step_s,
        stage2_lora_peak_rss_mib: lora_peak,
        stage3_step_s,
        stage3_peak_rss_mib: stage3_peak,
    })
}

/// Segment Anything at full size with random weights: the image embedding (once per photo) and
/// one prompt's decoding (per click).
#[derive(Debug, Serialize)]
pub struct SamBench {
    pub model: String,
    pub device: String,
    pub image_size: usize,
    pub parameters: usize,
    /// Median seconds of the image encoder on one padded input.
    pub embed_s: f64,
    pub embed_peak_rss_mib: Option<f64>,
    /// Median seconds of the prompt encoder and mask decoder, one point, three candidates.
    pub decode_s: f64,
}

/// Times a SAM of config `cfg` (f32), median of `runs` after a warm-up.
pub fn bench_sam(model: &str, cfg: &SamConfig, device: &Device, runs: usize) -> Result<SamBench> {
    let (sam, weights) = crate::tiny::seeded_model(0, DType::F32, device, |vb| Ok(Sam::new(vb, cfg)?))?;
    let parameters = weights.values().map(|t| t.elem_count()).sum();
    drop(weights);
    let size = cfg.image_size;
    let pixels = seeded_noise(1, &[3, size, size], device, DType::F32)?.clamp(-2f32, 2f32)?.affine(60.0, 128.0)?;
    let input = sam.preprocess(&pixels)?;
    let (embed_s, embed_peak) = time_median(device, runs, &mut || {
        sam.image_embeddings(&input)?;
        Ok(())
    })?;
    let embeddings = sam.image_embeddings(&input)?;
    let coords = candle_core::Tensor::new(&[[[size as f32 / 2.0, size as f32 / 3.0]]], device)?;
    let labels = candle_core::Tensor::new(&[[1f32]], device)?;
    let (decode_s, _) = time_median(device, runs, &mut || {
        sam.predict_masks(&embeddings, Some((&coords, &labels)), None, None, true)?;
        Ok(())
    })?;
    Ok(SamBench { model: model.to_string(), device: format!("{device:?}"), image_size: size, parameters, embed_s, embed_peak_rss_mib: embed_peak, decode_s })
}

/// One warm-up call, then `runs` timed calls (at least one): the median seconds, and the peak RSS
/// of the timed calls.
fn time_median(device: &Device, runs: usize, step: &mut dyn FnMut() -> Result<()>) -> Result<(f64, Option<f64>)> {
    step()?;
    reset_peak_rss();
    let mut times = Vec::with_capacity(runs.max(1));
    for _ in 0..runs.max(1) {
        let start = Instant::now();
        step()?;
        device.synchronize()?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], peak_rss_mib()))
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
