//! Benchmarks of the full-size SD v1.4 UNet with random weights (no download needed): one forward,
//! and one forward + backward with respect to the text context; the steps of the method's three
//! stages with the projected time of an edit ([`bench_stages`], the JSON of [`StageBench`], which
//! `tools/bench_stages_ref.py` mirrors in PyTorch); and Segment Anything's image embedding and
//! decoding.

use crate::error::{bad_input, Result};
use crate::method::finetune::LayeredFinetune;
use crate::method::optimize::LayeredOptimization;
use crate::method::{EditSettings, FinetuneMode, LayeredLatents};
use crate::models::sam::{Sam, SamConfig};
use crate::models::unet_2d::{UNet2DConditionModel, UNet2DConditionModelConfig};
use crate::pipeline::seeded_noise;
use candle_core::{DType, Device, DeviceLocation, Tensor, Var};
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

/// The machine a benchmark ran on, so that figures from two machines are never read as one run:
/// on this project's 2-core machines the same binary was a third slower where the CPU lacked
/// AVX-512, and PyTorch's CPU kernels pick their instructions at run time as ours do.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Host {
    /// The CPU's model name (Linux `/proc/cpuinfo`), else the architecture.
    pub cpu: String,
    /// The widest vector instructions the CPU offers of those the matrix products pick from at
    /// run time, in PyTorch's words (`torch.backends.cpu.get_cpu_capability()`, lower case):
    /// `avx512` (gemm's AVX-512 kernels), `avx2` (its AVX2 + FMA kernels), else `default`;
    /// `neon` on 64-bit Arm.
    pub simd: String,
    /// Threads of the CPU work (rayon's pool; PyTorch's `torch.get_num_threads()`).
    pub threads: usize,
}

impl Host {
    pub fn this() -> Self {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| info.lines().find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())))
            .unwrap_or_else(|| std::env::consts::ARCH.to_string());
        Self { cpu, simd: simd_level().to_string(), threads: rayon::current_num_threads() }
    }
}

impl std::fmt::Display for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}, {} threads)", self.cpu, self.simd, self.threads)
    }
}

#[cfg(target_arch = "x86_64")]
fn simd_level() -> &'static str {
    if is_x86_feature_detected!("avx512f") {
        "avx512"
    } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        "avx2"
    } else {
        "default"
    }
}

#[cfg(target_arch = "aarch64")]
fn simd_level() -> &'static str {
    "neon"
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn simd_level() -> &'static str {
    "default"
}

#[derive(Debug, Serialize)]
pub struct UnetBench {
    pub host: Host,
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
        host: Host::this(),
        device: format!("{device:?}"),
        dtype: format!("{dtype:?}"),
        latent_size,
        forward_s,
        forward_backward_context_s: fb_s,
        forward_peak_rss_mib: forward_peak,
        forward_backward_peak_rss_mib: fb_peak,
    })
}

/// What `layerdiff bench --stages` times.
#[derive(Debug, Clone)]
pub struct StageBenchOptions {
    /// Image side in pixels, a positive multiple of 8; the latents are `size / 8` on a side.
    pub size: usize,
    /// Weights and activations (stage 1's embeddings and stage 2's trained tensors keep f32
    /// master copies under f16/bf16, as an edit does).
    pub dtype: DType,
    /// Which stage 2 to time: every weight, or rank-[`EditSettings::lora_rank`] LoRA adapters.
    pub finetune: FinetuneMode,
    /// Timed steps per stage, after one untimed warm-up step (0 counts as 1).
    pub steps: usize,
    /// Stage 2 with gradient checkpointing ([`EditSettings::gradient_checkpointing`]).
    pub gradient_checkpointing: bool,
    /// The UNet's diffusers `config.json`; `None`: SD v1.4's ([`sd_v14_unet_config`]). Tests
    /// pass a tiny one (`tiny::default_configs()["unet"]`) to run the same code in seconds.
    pub unet_config: Option<serde_json::Value>,
    /// On a GPU, the stage (1, 2 or 3) whose timed steps a profiler started with its collection
    /// off records: they run between `cuProfilerStart` and `cuProfilerStop`.
    pub profile_stage: Option<usize>,
}

impl Default for StageBenchOptions {
    fn default() -> Self {
        Self {
            size: 512,
            dtype: DType::F32,
            finetune: EditSettings::default().finetune,
            steps: 3,
            gradient_checkpointing: false,
            unet_config: None,
            profile_stage: None,
        }
    }
}

/// Per-step medians of the method's three stages, each with its peak memory, and the projected
/// time of a default edit. Serialized as the JSON of `layerdiff bench --stages`;
/// `tools/bench_stages_ref.py` writes the same keys for PyTorch. The keys are stable:
///
/// | key | meaning |
/// | --- | --- |
/// | `framework` | `"candle 0.11.1"` here, `"torch <version>"` from the PyTorch script |
/// | `unet` | `"sd-v1.4"`; `"tiny"` (the tiny test UNet) or `"custom"` for a config given in [`StageBenchOptions::unet_config`] |
/// | `parameters` | the UNet's parameter count |
/// | `host` | the machine's CPU: `cpu` (model), `simd` (`avx512`, `avx2`, ...) and `threads` ([`Host`]) |
/// | `device`, `dtype` | `"cpu"` or `"cuda:N"`; `"f32"`, `"f16"` or `"bf16"` |
/// | `size`, `latent_size` | image side in pixels, latent side (`size / 8`) |
/// | `finetune` | the stage 2 timed: `"full"` or `"lora"` (with `lora_rank`) |
/// | `gradient_checkpointing` | whether stage 2 recomputed activations in its backward |
/// | `steps` | timed steps per stage (after one warm-up step) |
/// | `gpu_paths` | our own GPU paths that ran: `fused` (the fused CUDA kernels), `cudnn` (cuDNN's convolutions) |
/// | `memory` | what the peaks measure (see [`StageBench::memory`]) |
/// | `stageN_step_s` | median seconds of one step of stage N |
/// | `stageN_host_s` | median seconds the host took to issue a step's work, before the closing synchronize |
/// | `stageN_peak_mib` | peak memory during stage N's timed steps, MiB, or null |
/// | `stage2_trained_parameters` | elements stage 2 trains (all of `parameters` when full) |
/// | `stageN_edit_steps` | steps of stage N in a default edit ([`EditSettings::default`]) |
/// | `projected_edit_s` | `sum over N of stageN_edit_steps * stageN_step_s` |
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct StageBench {
    pub framework: String,
    pub unet: String,
    pub parameters: usize,
    /// Absent in older reports.
    #[serde(default)]
    pub host: Option<Host>,
    pub device: String,
    pub dtype: String,
    pub size: usize,
    pub latent_size: usize,
    pub finetune: FinetuneMode,
    pub lora_rank: usize,
    /// Stage 2 with gradient checkpointing; absent (false) in older reports.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    pub steps: usize,
    /// Our own GPU paths that ran, each only where it passed its check on the device: `"fused"`
    /// (the fused CUDA kernels, on unless `LAYERDIFF_FUSED=0`), `"cudnn"` (cuDNN's convolutions, a `cudnn`
    /// build). So a run that asked for one shows whether it got it. Empty on the CPU; absent in
    /// older reports.
    #[serde(default)]
    pub gpu_paths: Vec<String>,
    /// What `stageN_peak_mib` measures:
    /// - `"rss"`: on the CPU, the process's peak resident memory (Linux VmHWM, reset through
    ///   `/proc/self/clear_refs` before each stage's timed steps; everything resident counts,
    ///   weights included);
    /// - `"cuda_pool_peak"`: on a GPU, the high-water mark of the memory in use from the device's
    ///   current memory pool (`CU_MEMPOOL_ATTR_USED_MEM_HIGH`, reset before each stage's timed
    ///   steps). candle 0.11.1 keeps no allocator statistics of its own, but cudarc 0.19 allocates
    ///   every tensor with `cuMemAllocAsync` from that pool when the device supports memory pools,
    ///   so this is the counterpart of `torch.cuda.max_memory_allocated` (cuBLAS workspaces and
    ///   the CUDA context are outside both);
    /// - `"cuda_used_after"`: on a GPU without memory pools, `total - free` of `cuMemGetInfo`
    ///   after the timed steps: the device's used memory (other processes and the context
    ///   included), not a peak;
    /// - `null`: none of these could be read (the peaks are null too).
    pub memory: Option<String>,
    /// Stage 1: both layers in one batched UNet call (batch 2), masked MSE losses, backward to the
    /// two text embeddings only (weights frozen), Adam on the embeddings
    /// ([`LayeredOptimization::run`]).
    pub stage1_step_s: f64,
    /// Of each step, the seconds until the host had issued its work (the synchronize that ends
    /// the step not counted; a synchronize inside the step, as the loss check's read, counted).
    /// Near `stageN_step_s` the device waited on the host: a cost per op, not per FLOP. Absent
    /// in older reports.
    #[serde(default)]
    pub stage1_host_s: Option<f64>,
    pub stage1_peak_mib: Option<f64>,
    /// Stage 2 in mode `finetune`: the same batched call with `e_bar` frozen, backward to the
    /// trained tensors, Adam ([`LayeredFinetune::run`]).
    pub stage2_step_s: f64,
    #[serde(default)]
    pub stage2_host_s: Option<f64>,
    pub stage2_peak_mib: Option<f64>,
    /// The elements stage 2 trains (full: every weight; LoRA: the adapters).
    pub stage2_trained_parameters: usize,
    /// Stage 3: one classifier-free-guided UNet call (batch 2), no graph
    /// ([`crate::pipeline::guided_noise`]).
    pub stage3_step_s: f64,
    #[serde(default)]
    pub stage3_host_s: Option<f64>,
    pub stage3_peak_mib: Option<f64>,
    pub stage1_edit_steps: usize,
    pub stage2_edit_steps: usize,
    pub stage3_edit_steps: usize,
    /// Seconds of a default edit's UNet work, one seed: the steps above times the medians.
    pub projected_edit_s: f64,
}

impl StageBench {
    /// `sum over N of stageN_edit_steps * stageN_step_s`.
    pub fn projected(&self) -> f64 {
        self.stage1_edit_steps as f64 * self.stage1_step_s
            + self.stage2_edit_steps as f64 * self.stage2_step_s
            + self.stage3_edit_steps as f64 * self.stage3_step_s
    }
}

/// The table `layerdiff bench --stages` prints on stderr.
impl std::fmt::Display for StageBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |m: Option<f64>| m.map_or("-".to_string(), |m| format!("{m:.0}"));
        let mut mode = match self.finetune {
            FinetuneMode::Full => "full".to_string(),
            FinetuneMode::Lora => format!("lora r{}", self.lora_rank),
        };
        if self.gradient_checkpointing {
            mode += ", ckpt";
        }
        let paths = if self.gpu_paths.is_empty() { String::new() } else { format!(" with {}", self.gpu_paths.join(" and ")) };
        writeln!(
            f,
            "{} UNet ({:.0}M parameters), {}x{} px ({}x{} latents), {}, {}, {}{paths}; median of {} step(s) after a warm-up",
            self.unet,
            self.parameters as f64 / 1e6,
            self.size,
            self.size,
            self.latent_size,
            self.latent_size,
            self.dtype,
            self.device,
            self.framework,
            self.steps
        )?;
        if let Some(host) = &self.host {
            writeln!(f, "host: {host}")?;
        }
        let memory = match self.memory.as_deref() {
            Some("rss") => "the process's peak RSS",
            Some("cuda_pool_peak") => "the CUDA memory pool's peak",
            Some("cuda_used_after") => "CUDA memory in use after the steps (not a peak)",
            Some(other) => other,
            None => "not measured",
        };
        let secs = |s: Option<f64>| s.map_or("-".to_string(), |s| format!("{s:.3}"));
        writeln!(f, "{:<38}{:>10}{:>10}{:>10}{:>12}{:>10}", "stage step", "step s", "host s", "peak MiB", "edit steps", "edit s")?;
        let rows = [
            ("1: embeddings (batch 2, Adam)".to_string(), self.stage1_step_s, self.stage1_host_s, self.stage1_peak_mib, self.stage1_edit_steps),
            (format!("2: fine-tune {mode} (batch 2, Adam)"), self.stage2_step_s, self.stage2_host_s, self.stage2_peak_mib, self.stage2_edit_steps),
            ("3: guided sampling (batch 2)".to_string(), self.stage3_step_s, self.stage3_host_s, self.stage3_peak_mib, self.stage3_edit_steps),
        ];
        for (name, s, host, peak, n) in rows {
            writeln!(f, "{name:<38}{s:>10.3}{:>10}{:>10}{n:>12}{:>10.0}", secs(host), mib(peak), n as f64 * s)?;
        }
        write!(
            f,
            "projected default edit (one seed): {:.0} s ({:.2} h); peak memory: {memory}",
            self.projected_edit_s,
            self.projected_edit_s / 3600.0
        )
    }
}

/// Times steps of each stage of an edit on a UNet with seeded random weights (SD v1.4's
/// architecture unless `opts.unet_config` says otherwise): the median of `opts.steps` timed
/// steps after one warm-up step, with each stage's peak memory. The workloads are the real steps
/// of [`LayeredOptimization::run`], [`LayeredFinetune::run`] and
/// [`crate::pipeline::guided_noise`]. Stage 3 runs before stage 2 (the largest: where the
/// allocator keeps freed memory and [`crate::method::edit::AFTER_STAGE`] is not set, its
/// memory would count in stage 3's peak), and the frozen UNet of stages 1 and 3 is dropped
/// before stage 2 builds its trainable copy. `on_stage` hears when each stage starts.
pub fn bench_stages(device: &Device, opts: &StageBenchOptions, on_stage: &mut dyn FnMut(&str)) -> Result<StageBench> {
    let StageBenchOptions { size, dtype, finetune, steps, gradient_checkpointing, ref unet_config, profile_stage } = *opts;
    if size == 0 || !size.is_multiple_of(8) {
        return Err(bad_input("--size", format!("{size} is not a positive multiple of 8"), "use 256 or 512"));
    }
    match profile_stage {
        Some(n) if !(1..=3).contains(&n) => return Err(bad_input("--profile-stage", format!("{n} is not a stage"), "use 1, 2 or 3")),
        Some(_) if !device.is_cuda() => return Err(bad_input("--profile-stage", "a profile needs a GPU", "add --device cuda")),
        _ => {}
    }
    let profiled = |stage| profile_stage == Some(stage);
    crate::pipeline::check_dtype(device, dtype)?;
    let settings = EditSettings::default();
    let steps = steps.max(1);
    let latent_size = size / 8;
    let unet_name = match unet_config {
        None => "sd-v1.4",
        Some(c) if *c == crate::tiny::default_configs()["unet"] => "tiny",
        Some(_) => "custom",
    };
    let cfg = UNet2DConditionModelConfig::from_json(unet_config.as_ref().unwrap_or(&sd_v14_unet_config()))?;
    let (unet, weights) = crate::tiny::seeded_model(0, dtype, device, |vb| Ok(UNet2DConditionModel::new(vb, cfg.clone())?))?;
    let parameters = weights.values().map(|t| t.elem_count()).sum();
    if finetune == FinetuneMode::Full {
        crate::method::edit::check_memory_for_full_finetune(parameters, device, gradient_checkpointing)?;
    }
    let meter = PeakMeter::new(device);

    // The data of an edit: two layers of latents, half-covering masks, one text embedding.
    let shape = [1, cfg.in_channels, latent_size, latent_size];
    let half_mask = |seed| -> Result<Tensor> {
        Ok(seeded_noise(seed, &[1, 1, latent_size, latent_size], device, dtype)?.ge(0.0)?.to_dtype(dtype)?)
    };
    let data = LayeredLatents {
        subject: seeded_noise(1, &shape, device, dtype)?,
        subject_mask: half_mask(2)?,
        background: seeded_noise(3, &shape, device, dtype)?,
        background_mask: half_mask(4)?,
    };
    let context = seeded_noise(5, &[1, 77, cfg.cross_attention_dim], device, dtype)?;
    let alphas = crate::schedulers::TrainSchedule {
        alphas_cumprod: (0..1000).map(|i| 1.0 - (i as f64 + 1.0) * 9e-4).collect(),
        prediction_type: crate::schedulers::PredictionType::Epsilon,
    };

    // 1. stage 1: layered optimization of the two embeddings
    on_stage("stage 1");
    let mut stage1 = LayeredOptimization::new(&context, &context, settings.embedding_lr)?;
    let stage1_timed = meter.time_loop(steps, profiled(1), &mut |n, tick| {
        let until = stage1.step + n;
        stage1.run(&unet, &alphas, &data, 0, until, &mut |_| tick())
    })?;
    drop(stage1);
    crate::method::edit::after_stage();

    // 2. stage 3: one classifier-free-guided call
    on_stage("stage 3");
    let latents = seeded_noise(6, &shape, device, dtype)?;
    let guidance = crate::pipeline::Guidance { cond: &context, uncond: &context, scale: settings.guidance_scale };
    let stage3_timed = meter.time_median(steps, profiled(3), &mut || {
        crate::pipeline::guided_noise(&unet, &latents, 500, &guidance)?;
        Ok(())
    })?;
    drop((unet, latents));
    crate::method::edit::after_stage();

    // 3. stage 2: layered fine-tuning, `e_bar` frozen
    on_stage("stage 2");
    let lambda_object = crate::method::finetune::lambda_object(settings.lambda_object, 0.5);
    let mut stage2 = LayeredFinetune::new(
        weights.into_iter().collect(),
        cfg,
        finetune,
        settings.lora_rank,
        settings.finetune_lr,
        dtype,
        device,
    )?
    .with_gradient_checkpointing(gradient_checkpointing);
    let stage2_trained_parameters =
        stage2.state().iter().filter(|(k, _)| k.starts_with("var.")).map(|(_, t)| t.elem_count()).sum();
    let stage2_timed = meter.time_loop(steps, profiled(2), &mut |n, tick| {
        let until = stage2.step + n;
        stage2.run(&context, lambda_object, settings.lambda_background, &alphas, &data, 0, until, &mut |_| tick())
    })?;
    drop(stage2);

    let mut report = StageBench {
        framework: "candle 0.11.1".to_string(),
        unet: unet_name.to_string(),
        parameters,
        host: Some(Host::this()),
        device: device_name(device),
        dtype: dtype_name(dtype).to_string(),
        size,
        latent_size,
        finetune,
        lora_rank: settings.lora_rank,
        gradient_checkpointing,
        steps,
        gpu_paths: gpu_paths(device),
        memory: meter.kind.map(str::to_string),
        stage1_step_s: stage1_timed.step_s,
        stage1_host_s: Some(stage1_timed.host_s),
        stage1_peak_mib: stage1_timed.peak_mib,
        stage2_step_s: stage2_timed.step_s,
        stage2_host_s: Some(stage2_timed.host_s),
        stage2_peak_mib: stage2_timed.peak_mib,
        stage2_trained_parameters,
        stage3_step_s: stage3_timed.step_s,
        stage3_host_s: Some(stage3_timed.host_s),
        stage3_peak_mib: stage3_timed.peak_mib,
        stage1_edit_steps: settings.embedding_steps,
        stage2_edit_steps: settings.finetune_steps,
        stage3_edit_steps: settings.steps,
        projected_edit_s: 0.0,
    };
    report.projected_edit_s = report.projected();
    Ok(report)
}

/// Which of our own GPU paths run on `device` (see [`StageBench::gpu_paths`]).
fn gpu_paths(device: &Device) -> Vec<String> {
    let ready = [("fused", crate::models::cuda_kernels::ready(device)), ("cudnn", crate::models::cudnn_conv::ready(device))];
    ready.into_iter().filter(|&(_, on)| on && device.is_cuda()).map(|(name, _)| name.to_string()).collect()
}

/// `cpu` or `cuda:N` (`metal:N`).
fn device_name(device: &Device) -> String {
    match device.location() {
        DeviceLocation::Cpu => "cpu".to_string(),
        DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// The CLI's name of a dtype.
fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::F64 => "f64",
        _ => "other",
    }
}

/// A stage that runs its own loop: `run(n, tick)` runs `n` steps and calls `tick` after each.
type StageLoop<'a> = dyn FnMut(usize, &mut dyn FnMut()) -> Result<()> + 'a;

/// Times a stage's steps and measures its peak memory, as [`StageBench::memory`] describes.
struct PeakMeter<'a> {
    device: &'a Device,
    /// [`StageBench::memory`].
    kind: Option<&'static str>,
}

impl<'a> PeakMeter<'a> {
    fn new(device: &'a Device) -> Self {
        let kind = if device.is_cpu() {
            (reset_peak_rss() && peak_rss_mib().is_some()).then_some("rss")
        } else {
            cuda_memory::kind(device)
        };
        Self { device, kind }
    }

    fn reset(&self) {
        match self.kind {
            Some("rss") => {
                reset_peak_rss();
            }
            Some("cuda_pool_peak") => cuda_memory::reset_pool_peak(self.device),
            _ => {}
        }
    }

    fn peak_mib(&self) -> Option<f64> {
        match self.kind {
            Some("rss") => peak_rss_mib(),
            Some("cuda_pool_peak") => cuda_memory::pool_peak_mib(self.device),
            Some("cuda_used_after") => cuda_memory::used_mib(self.device),
            _ => None,
        }
    }

    /// One warm-up call, then `steps` timed calls (at least one), the device synchronized around
    /// each: the medians, and the peak memory of the timed calls.
    fn time_median(&self, steps: usize, profiled: bool, call: &mut dyn FnMut() -> Result<()>) -> Result<Timed> {
        self.time_loop(steps, profiled, &mut |n, tick| {
            for _ in 0..n {
                call()?;
                tick();
            }
            Ok(())
        })
    }

    /// A stage that runs its own loop ([`StageLoop`]): one warm-up step, then `steps` (at least one) in one loop, timed from tick to tick with
    /// the device synchronized at each: the medians, and the peak memory of the timed
    /// steps. What a stage does once per loop rather than per step (stage 2's check that every
    /// weight is finite, which an edit does once per checkpoint) falls outside the timed steps.
    /// With `profiled`, the timed steps run between `cuProfilerStart` and `cuProfilerStop`.
    fn time_loop(
        &self,
        steps: usize,
        profiled: bool,
        run: &mut StageLoop<'_>,
    ) -> Result<Timed> {
        run(1, &mut || {})?;
        self.device.synchronize()?;
        self.reset();
        // Collection stops where this function returns: no GPU work follows the steps.
        let _profiler = profiled.then(profiler).transpose()?;
        let steps = steps.max(1);
        let (mut times, mut hosts) = (Vec::with_capacity(steps), Vec::with_capacity(steps));
        let mut synced = Ok(());
        let mut last = Instant::now();
        run(steps, &mut || {
            let issued = Instant::now();
            if let Err(e) = self.device.synchronize() {
                synced = Err(e);
            }
            let now = Instant::now();
            times.push((now - last).as_secs_f64());
            hosts.push((issued - last).as_secs_f64());
            last = now;
        })?;
        synced?;
        if times.len() != steps {
            return Err(bad_input("bench", format!("{} timed steps ran, {steps} asked for", times.len()), "report this bug"));
        }
        Ok(Timed { step_s: median(times), host_s: median(hosts), peak_mib: self.peak_mib() })
    }
}

/// A profiler's collection, on from now until dropped (`--profile-stage`: for `ncu
/// --profile-from-start off` or `nsys profile --capture-range=cudaProfilerApi`).
#[cfg(feature = "cuda")]
fn profiler() -> Result<candle_core::cuda_backend::cudarc::driver::Profiler> {
    candle_core::cuda_backend::cudarc::driver::Profiler::new()
        .map_err(|e| bad_input("--profile-stage", format!("cuProfilerStart failed: {e:?}"), "run without it"))
}

/// Without CUDA no device takes a profile (`bench_stages` refuses the option first).
#[cfg(not(feature = "cuda"))]
fn profiler() -> Result<()> {
    Err(bad_input("--profile-stage", "this build has no CUDA", "build with --features cuda"))
}

/// What [`PeakMeter::time_loop`] measures of a stage's steps.
struct Timed {
    step_s: f64,
    host_s: f64,
    peak_mib: Option<f64>,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// GPU memory through cudarc (candle 0.11.1 keeps no allocator statistics): the high-water mark
/// of the device's current memory pool, which cudarc's `cuMemAllocAsync` allocations come from,
/// or `cuMemGetInfo`'s used memory where the device has no memory pools.
#[cfg(feature = "cuda")]
mod cuda_memory {
    use candle_core::cuda::cudarc::driver::{result, sys, CudaContext};
    use candle_core::Device;
    use std::sync::Arc;

    const HIGH: sys::CUmemPool_attribute = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;

    fn context(device: &Device) -> Option<Arc<CudaContext>> {
        let ctx = device.as_cuda_device().ok()?.cuda_stream().context().clone();
        ctx.bind_to_thread().ok()?;
        Some(ctx)
    }

    /// The pool cudarc allocates from, when it allocates from one.
    fn pool(device: &Device) -> Option<sys::CUmemoryPool> {
        let ctx = context(device)?;
        if !ctx.has_async_alloc() {
            return None;
        }
        // SAFETY: `cu_device` is the live context's device.
        unsafe { result::device::get_mem_pool(ctx.cu_device()) }.ok()
    }

    pub fn kind(device: &Device) -> Option<&'static str> {
        if pool(device).is_some() && pool_peak_mib(device).is_some() {
            Some("cuda_pool_peak")
        } else {
            used_mib(device).map(|_| "cuda_used_after")
        }
    }

    /// Resets the pool's high-water mark (it can only be reset to zero).
    pub fn reset_pool_peak(device: &Device) {
        if let Some(pool) = pool(device) {
            let mut zero: u64 = 0;
            // SAFETY: a valid pool; USED_MEM_HIGH takes a cuuint64_t.
            let _ = unsafe { result::mem_pool::set_attribute(pool, HIGH, (&mut zero as *mut u64).cast()) };
        }
    }

    pub fn pool_peak_mib(device: &Device) -> Option<f64> {
        let pool = pool(device)?;
        let mut high: u64 = 0;
        // SAFETY: a valid pool; USED_MEM_HIGH is a cuuint64_t.
        unsafe { result::mem_pool::get_attribute(pool, HIGH, (&mut high as *mut u64).cast()) }.ok()?;
        Some(high as f64 / (1024.0 * 1024.0))
    }

    pub fn used_mib(device: &Device) -> Option<f64> {
        let (free, total) = context(device)?.mem_get_info().ok()?;
        Some(total.saturating_sub(free) as f64 / (1024.0 * 1024.0))
    }
}

/// Without the `cuda` feature there is no GPU to measure.
#[cfg(not(feature = "cuda"))]
mod cuda_memory {
    use candle_core::Device;

    pub fn kind(_: &Device) -> Option<&'static str> {
        None
    }
    pub fn reset_pool_peak(_: &Device) {}
    pub fn pool_peak_mib(_: &Device) -> Option<f64> {
        None
    }
    pub fn used_mib(_: &Device) -> Option<f64> {
        None
    }
}

/// Segment Anything at full size with random weights: the image embedding (once per photo) and
/// one prompt's decoding (per click).
#[derive(Debug, Serialize)]
pub struct SamBench {
    pub host: Host,
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
    Ok(SamBench { host: Host::this(), model: model.to_string(), device: format!("{device:?}"), image_size: size, parameters, embed_s, embed_peak_rss_mib: embed_peak, decode_s })
}

/// One warm-up call, then `runs` timed calls (at least one): the median seconds, and the peak RSS
/// of the timed calls.
fn time_median(device: &Device, runs: usize, step: &mut dyn FnMut() -> Result<()>) -> Result<(f64, Option<f64>)> {
    step()?;
    device.synchronize()?;
    reset_peak_rss();
    let mut times = Vec::with_capacity(runs.max(1));
    for _ in 0..runs.max(1) {
        let start = Instant::now();
        step()?;
        device.synchronize()?;
        times.push(start.elapsed().as_secs_f64());
    }
    Ok((median(times), peak_rss_mib()))
}

/// Resets the kernel's peak-RSS counter (Linux: writing 5 to clear_refs), so each measurement has its own.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}
