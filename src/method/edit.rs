//! The edit pipeline, top-down like diffusers' pipelines: inputs, the three stages, the session.

use super::finetune::{lambda_object, LayeredFinetune};
use super::guidance::iterative_guidance_sample;
use super::masks;
use super::optimize::{interpolate_embeddings, LayeredOptimization};
use super::session::{self, names, Losses, SessionInfo};
use super::{EditSettings, GuidanceEmbedding, LayeredLatents, StepLoss};
use crate::error::{bad_input, Result};
use crate::image_io::{self, save_png_atomic};
use crate::pipeline::{generate, seeded_noise, GenerateOptions, StableDiffusion};
use crate::models::UNet2DConditionModelConfig;
use crate::schedulers::TrainSchedule;
use crate::sources::{Component, ModelFiles};
use candle_core::Tensor;
use image::{GrayImage, RgbImage};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// Reports the stages of a long run (the CLI draws progress bars from it).
pub trait Progress {
    fn start(&mut self, stage: &str, total: usize);
    fn step(&mut self, done: usize, loss: Option<f64>);
    fn finish(&mut self);
    /// Asked after each checkpoint: `true` stops the run there (it can be resumed).
    fn should_stop(&mut self) -> bool {
        false
    }
}

/// Where the background layer `I_b` comes from.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum BackgroundSource {
    /// Stable Diffusion's own image for `T_b`, seeded (the paper's "target image").
    Generated,
    /// A user's picture, with the mask of what is not background on it (none: all background).
    Image { image: PathBuf, mask: Option<PathBuf> },
    /// `I_s` itself: edit only the subject.
    Keep,
}

/// One edit, as the user asked for it; stored in `session.json` so that `--resume` can redo it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EditRequest {
    /// The subject photo `I_s`.
    pub image: PathBuf,
    /// `M_s`, white = subject, any size (resized to the photo).
    pub mask: PathBuf,
    /// `T_o`, the object layer's text ("a jumping dog").
    pub object: String,
    /// `T_b`, the background layer's text ("a dense forest").
    pub background: String,
    /// The full target text `T`; `None`: "`T_o` in `T_b`".
    pub prompt: Option<String>,
    pub background_source: BackgroundSource,
    /// Side of the square the photo is resized and centre-cropped to.
    pub size: u32,
    /// One edited image per seed.
    pub seeds: Vec<u64>,
    /// Seed of stages 1 and 2 and of the generated background.
    pub train_seed: u64,
    pub settings: EditSettings,
    /// Steps between checkpoints in stages 1 and 2.
    pub checkpoint_every: usize,
}

impl EditRequest {
    /// `T`: the user's, or "`T_o` in `T_b`" (the spec's default).
    pub fn prompt(&self) -> String {
        self.prompt.clone().unwrap_or_else(|| format!("{} in {}", self.object, self.background))
    }
}

/// A thumbnail blown up to SD's size gives a blurred subject: a photo needs 64 pixels a side, or
/// the working size where that is smaller (a toy model works at 32 px).
pub(crate) fn check_photo_size(req: &EditRequest, (w, h): (u32, u32)) -> Result<()> {
    let min_side = req.size.min(64);
    if w.min(h) < min_side {
        return Err(bad_input(req.image.display(), format!("{w}x{h} is too small"), format!("give a photo at least {min_side} pixels on each side")));
    }
    Ok(())
}

/// What an edit produced.
pub struct EditResult {
    pub images: Vec<(u64, RgbImage)>,
    pub info: SessionInfo,
}

/// Runs LayerDiffusion and writes the session into `out`. With `resume`, continues from the
/// checkpoint in `out` (the result equals an uninterrupted run's).
pub fn edit(
    sd: &mut StableDiffusion,
    files: &ModelFiles,
    req: &EditRequest,
    out: &Path,
    resume: bool,
    progress: &mut dyn Progress,
) -> Result<EditResult> {
    let settings = &req.settings;
    // An earlier edit released the pipeline's UNet (stage 2).
    sd.reload_unet(files)?;
    // 1. check inputs
    check_request(req, sd.vae_factor(), "--alpha", true)?;
    let image = image_io::load_rgb(&req.image)?;
    let (w, h) = image.dimensions();
    check_photo_size(req, (w, h))?;
    let started = Instant::now();

    // 2. prepare the two layers' images and masks at the working size
    let (subject, crop) = image_io::resize_center_crop(&image, req.size, req.size);
    let (subject_mask, _) = image_io::resize_center_crop(&masks::load_mask(&req.mask, (w, h))?, req.size, req.size);
    masks::validate_mask(&subject_mask, &req.mask.display().to_string())?;
    let subject_area = masks::area_fraction(&subject_mask);
    let lambda_o = lambda_object(settings.lambda_object, subject_area);
    let mut info = SessionInfo::start("layerdiffusion", files, sd.dtype, req, crop, lambda_o, subject_area)?;
    info.progress = "stage1".into();
    session::write_json(&out.join(session::SESSION_JSON), &info)?;
    let (background, background_mask) = background_layer(sd, req, &subject, &subject_mask, progress)?;
    info.timings.insert("background".to_string(), started.elapsed().as_secs_f64());

    // 3. encode both layers: z = scaling * E(I) (posterior mean), masks at latent size
    let f = sd.vae_factor();
    let to_latent = |m: &GrayImage| masks::mask_to_latent(m, f, &sd.device, sd.dtype);
    let encode = |img: &RgbImage| sd.encode_image(&image_io::image_to_tensor(img, &sd.device, sd.dtype)?, None);
    let data = LayeredLatents {
        subject: encode(&subject)?,
        subject_mask: to_latent(&subject_mask)?,
        background: encode(&background)?,
        background_mask: to_latent(&background_mask)?,
    };

    // 4. encode the texts
    let target_object = sd.encode_prompt(&req.object)?;
    let target_background = sd.encode_prompt(&req.background)?;
    let uncond = sd.encode_prompt("")?;

    let checkpoint = if resume { read_checkpoint(out, &sd.device)? } else { None };
    let schedule = TrainSchedule::from_scheduler(&sd.scheduler()?);

    // 5. stage 1: layered controlled optimization (Eq. 2)
    let t = Instant::now();
    let mut stage1 = match &checkpoint {
        Some(c) => {
            let mut s = LayeredOptimization::from_state(&session::strip_prefix(&c.tensors, "stage1."), settings.embedding_lr)?;
            s.losses = c.info.losses.stage1.clone();
            s
        }
        None => LayeredOptimization::new(&target_object, &target_background, settings.embedding_lr)?,
    };
    progress.start("stage 1", settings.embedding_steps);
    progress.step(stage1.step, stage1.losses.last().map(|l| l.loss));
    while stage1.step < settings.embedding_steps {
        let until = (stage1.step + req.checkpoint_every.max(1)).min(settings.embedding_steps);
        stage1.run(sd.unet()?, &schedule, &data, req.train_seed, until, &mut |l: StepLoss| progress.step(l.step + 1, Some(l.loss)))?;
        let losses = Losses { stage1: stage1.losses.clone(), stage2: vec![] };
        write_checkpoint(out, "stage1", stage1.step, losses, session::with_prefix(stage1.state(), "stage1.").collect())?;
        stop_if_asked(progress, out, "stage 1", stage1.step)?;
    }
    progress.finish();
    info.timings.insert("stage1".to_string(), t.elapsed().as_secs_f64());
    after_stage();

    // 6. interpolate the layers (Eq. 3)
    let e_bar = interpolate_embeddings(stage1.object(), stage1.background(), settings.alpha)?;

    // 7. stage 2: layered diffusion fine-tuning (Eq. 4-6), on a copy of the UNet from the files;
    // the pipeline's own is not used again, and would be a UNet's size more at stage 2's peak
    sd.release_unet();
    let t = Instant::now();
    let unet_weights = files.tensors(Component::Unet, &sd.device)?;
    if settings.finetune == super::FinetuneMode::Full {
        let params = unet_weights.values().map(|t| t.elem_count()).sum();
        check_memory_for_full_finetune(params, &sd.device, settings.gradient_checkpointing)?;
    }
    let unet_cfg = UNet2DConditionModelConfig::from_json(&files.unet_config)?;
    // Consumed: the file's tensors (for full fine-tuning, the size of the UNet three times) are
    // freed once copied into stage 2.
    let mut stage2 = match checkpoint.filter(|c| c.stage == "stage2") {
        Some(c) => {
            let state = session::strip_prefix(&c.tensors, "stage2.");
            let s = LayeredFinetune::from_state(unet_weights, unet_cfg, settings.finetune, settings.lora_rank, settings.finetune_lr, sd.dtype, &sd.device, &state)?;
            let mut s = s.with_gradient_checkpointing(settings.gradient_checkpointing);
            s.losses = c.info.losses.stage2.clone();
            s
        }
        None => LayeredFinetune::new(unet_weights, unet_cfg, settings.finetune, settings.lora_rank, settings.finetune_lr, sd.dtype, &sd.device)?
            .with_gradient_checkpointing(settings.gradient_checkpointing),
    };
    progress.start("stage 2", settings.finetune_steps);
    progress.step(stage2.step, stage2.losses.last().map(|l| l.loss));
    while stage2.step < settings.finetune_steps {
        let until = (stage2.step + req.checkpoint_every.max(1)).min(settings.finetune_steps);
        let lambda_b = settings.lambda_background;
        stage2.run(&e_bar, lambda_o, lambda_b, &schedule, &data, req.train_seed, until, &mut |l: StepLoss| progress.step(l.step + 1, Some(l.loss)))?;
        let mut tensors: HashMap<String, Tensor> = session::with_prefix(stage1.state(), "stage1.").collect();
        tensors.extend(session::with_prefix(stage2.state(), "stage2."));
        let losses = Losses { stage1: stage1.losses.clone(), stage2: stage2.losses.clone() };
        write_checkpoint(out, "stage2", stage2.step, losses, tensors)?;
        stop_if_asked(progress, out, "stage 2", stage2.step)?;
    }
    progress.finish();
    info.timings.insert("stage2".to_string(), t.elapsed().as_secs_f64());

    // 8. the session: embeddings and fine-tuned weights, then what made them
    let mut tensors: HashMap<String, Tensor> = HashMap::from([
        (names::OBJECT.to_string(), stage1.object().clone()),
        (names::BACKGROUND.to_string(), stage1.background().clone()),
        (names::BAR.to_string(), e_bar.clone()),
        (names::TARGET_OBJECT.to_string(), target_object.clone()),
        (names::UNCOND.to_string(), uncond.clone()),
    ]);
    tensors.extend(session::with_prefix(stage2.trained_tensors()?, names::UNET_PREFIX));
    session::write_tensors(&out.join(session::SESSION_TENSORS), &tensors)?;
    // With full fine-tuning, a copy of the UNet: not held while sampling.
    drop(tensors);
    info.losses = Losses { stage1: stage1.losses.clone(), stage2: stage2.losses.clone() };
    info.progress = "stage3".into();
    session::write_json(&out.join(session::SESSION_JSON), &info)?;

    // 9. stage 3: iterative guidance sampling (Eq. 7-8), one image per seed, on the fine-tuned
    // UNet without its training state
    let unet = stage2.into_unet();
    after_stage();
    let t = Instant::now();
    let e_g = match settings.guidance_embedding {
        GuidanceEmbedding::Target => &target_object,
        GuidanceEmbedding::Optimized => stage1.object(),
    };
    let stage3 = Stage3 { sd, unet: &unet, e_bar: &e_bar, e_g, uncond: &uncond, settings, size: (req.size, req.size) };
    let images = stage3.sample_all(&req.seeds, out, progress)?;
    info.timings.insert("stage3".to_string(), t.elapsed().as_secs_f64());
    info.timings.insert("total".to_string(), started.elapsed().as_secs_f64());
    info.progress = "done".into();

    // 10. what a person looks at: the mask, the background, and everything side by side
    save_png_atomic(&image_io::gray_to_rgb(&subject_mask), &out.join("mask.png"))?;
    save_png_atomic(&background, &out.join("background.png"))?;
    let mut sheet = vec![
        ("input".to_string(), subject.clone()),
        ("mask".to_string(), image_io::gray_to_rgb(&subject_mask)),
        ("background".to_string(), background.clone()),
    ];
    sheet.extend(images.iter().map(|(seed, img)| (format!("seed {seed}"), img.clone())));
    save_png_atomic(&image_io::contact_sheet(&sheet, 256), &out.join("sheet.png"))?;
    session::write_json(&out.join(session::SESSION_JSON), &info)?;
    remove_checkpoint(out)?;
    Ok(EditResult { images, info })
}

/// Stage 3 for several seeds, shared by `edit` and `sample`.
pub struct Stage3<'a> {
    pub sd: &'a StableDiffusion,
    /// The fine-tuned UNet.
    pub unet: &'a crate::models::UNet2DConditionModel,
    pub e_bar: &'a Tensor,
    pub e_g: &'a Tensor,
    pub uncond: &'a Tensor,
    pub settings: &'a EditSettings,
    pub size: (u32, u32),
}

impl Stage3<'_> {
    /// Draws `edit-<seed>.png` into `out` for every seed.
    pub fn sample_all(&self, seeds: &[u64], out: &Path, progress: &mut dyn Progress) -> Result<Vec<(u64, RgbImage)>> {
        let f = self.sd.vae_factor();
        let shape = [1, self.unet.config().in_channels, self.size.1 as usize / f, self.size.0 as usize / f];
        let mut images = Vec::with_capacity(seeds.len());
        for &seed in seeds {
            progress.start(&format!("seed {seed}"), self.settings.steps);
            let mut scheduler = self.sd.scheduler()?;
            scheduler.set_timesteps(self.settings.steps)?;
            let noise = seeded_noise(seed, &shape, &self.sd.device, self.sd.dtype)?;
            let s = self.settings;
            let latents = iterative_guidance_sample(
                self.unet,
                &scheduler,
                self.e_bar,
                self.e_g,
                self.uncond,
                s.guidance_scale,
                s.guidance_period,
                noise,
                &mut |done, _| progress.step(done, None),
            )?;
            progress.finish();
            let image = image_io::tensor_to_images(&self.sd.decode_latents(&latents)?)?.remove(0);
            save_png_atomic(&image, &out.join(format!("edit-{seed}.png")))?;
            images.push((seed, image));
        }
        Ok(images)
    }
}

/// The checks of a request that every method makes: the texts it needs (LayerDiffusion both layer
/// texts, a baseline only the target text `T`), `alpha` in [0, 1] (`alpha_flag` names what it
/// means for the method), a size the VAE can take, seeds, steps.
pub(crate) fn check_request(req: &EditRequest, factor: usize, alpha_flag: &str, needs_layers: bool) -> Result<()> {
    match &req.prompt {
        Some(p) if !needs_layers => {
            if p.trim().is_empty() {
                return Err(bad_input("--prompt", "empty text", "describe the target, e.g. --prompt \"a jumping dog in a dense forest\""));
            }
        }
        _ => {
            for (flag, text) in [("--object", &req.object), ("--background", &req.background)] {
                if text.trim().is_empty() {
                    return Err(bad_input(flag, "empty text", "describe the layer, e.g. --object \"a jumping dog\" --background \"a dense forest\""));
                }
            }
        }
    }
    let s = &req.settings;
    if !(0.0..=1.0).contains(&s.alpha) {
        return Err(bad_input(alpha_flag, format!("{} is outside [0, 1]", s.alpha), "use a value in [0, 1] (0.7 is the default)"));
    }
    if req.size == 0 || !(req.size as usize).is_multiple_of(factor) {
        return Err(bad_input("--size", format!("{} is not a positive multiple of {factor}", req.size), format!("use a multiple of {factor}, e.g. 512")));
    }
    if req.seeds.is_empty() {
        return Err(bad_input("--seeds", "no seed", "give --seeds 1,2,3 or --num-images N"));
    }
    if s.steps == 0 {
        return Err(bad_input("--steps", "0 sampling steps", "use at least 1 (50 is the default)"));
    }
    Ok(())
}

/// `I_b` and `M_b` at the working size, for the chosen background source.
fn background_layer(
    sd: &StableDiffusion,
    req: &EditRequest,
    subject: &RgbImage,
    subject_mask: &GrayImage,
    progress: &mut dyn Progress,
) -> Result<(RgbImage, GrayImage)> {
    let (w, h) = subject.dimensions();
    let all_background = || GrayImage::new(w, h);
    match &req.background_source {
        BackgroundSource::Keep => Ok((subject.clone(), subject_mask.clone())),
        BackgroundSource::Image { image, mask } => {
            let picture = image_io::load_rgb(image)?;
            let mask = match mask {
                Some(m) => {
                    let m = masks::load_mask(m, picture.dimensions())?;
                    image_io::resize_center_crop(&m, w, h).0
                }
                None => all_background(),
            };
            Ok((image_io::resize_center_crop(&picture, w, h).0, mask))
        }
        BackgroundSource::Generated => {
            let s = &req.settings;
            progress.start("background", s.steps);
            let opts = GenerateOptions {
                prompt: req.background.clone(),
                steps: s.steps,
                guidance_scale: s.guidance_scale,
                width: w as usize,
                height: h as usize,
                seed: req.train_seed,
                ..Default::default()
            };
            let image = generate(sd, &opts, &mut |done, _| progress.step(done, None))?;
            progress.finish();
            Ok((image_io::tensor_to_images(&image)?.remove(0), all_background()))
        }
    }
}

/// A checkpoint of stages 1-2: which stage and step, the loss curves, and the state tensors.
struct Checkpoint {
    stage: String,
    info: CheckpointInfo,
    tensors: HashMap<String, Tensor>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct CheckpointInfo {
    stage: String,
    step: usize,
    losses: Losses,
}

fn write_checkpoint(out: &Path, stage: &str, step: usize, losses: Losses, tensors: HashMap<String, Tensor>) -> Result<()> {
    // Tensors first: a checkpoint.json always describes a complete tensor file.
    session::write_tensors(&out.join(session::CHECKPOINT_TENSORS), &tensors)?;
    session::write_json(&out.join(session::CHECKPOINT_JSON), &CheckpointInfo { stage: stage.into(), step, losses })
}

/// Called, once set, when a full fine-tuning on the CPU will need more than half the free memory:
/// the binary then has its allocator give freed memory back at once instead of keeping it for
/// reuse (kept memory tipped a full-size run at 256 px over 24 GiB).
pub static ON_TIGHT_MEMORY: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Called, once set, when a stage's loop is over (after stages 1 and 2 of [`edit`], and between
/// the stages of [`crate::bench::bench_stages`]): the binary then has its allocator give back the
/// memory the stage freed and kept for reuse, so that the next stage holds only what it needs.
/// Sampling after a full fine-tuning otherwise held the training's peak.
pub static AFTER_STAGE: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Runs [`AFTER_STAGE`], if set.
pub fn after_stage() {
    if let Some(hook) = AFTER_STAGE.get() {
        hook();
    }
}

/// Full fine-tuning holds the weights several times over (f32 masters, gradients, two Adam
/// moments) and the activations: refuse at once on a CPU without that much free memory, rather
/// than be killed hours later; where it fits only with freed memory given back, call
/// [`ON_TIGHT_MEMORY`]. With gradient checkpointing the gradients exist a layer at a time and the
/// activations are a fraction.
pub fn check_memory_for_full_finetune(params: usize, device: &candle_core::Device, gradient_checkpointing: bool) -> Result<()> {
    if !device.is_cpu() {
        return Ok(());
    }
    let (kept, given_back) = peak_multiples(gradient_checkpointing);
    let bytes = |copies: f64| params as f64 * 4.0 * copies;
    let Some(available) = available_memory_bytes() else { return Ok(()) };
    let needed = bytes(given_back);
    if bytes(kept) > available {
        if let Some(on_tight_memory) = ON_TIGHT_MEMORY.get() {
            on_tight_memory();
        }
    }
    if needed > available {
        let gib = |b: f64| b / (1u64 << 30) as f64;
        return Err(bad_input(
            "--finetune full",
            format!("not enough memory: about {:.1} GiB needed, {:.1} GiB available", gib(needed), gib(available)),
            if gradient_checkpointing {
                "use --finetune lora, which trains small adapters only"
            } else {
                "add --gradient-checkpointing, or use --finetune lora, which trains small adapters only"
            },
        ));
    }
    Ok(())
}

/// Full fine-tuning's peak RSS on the CPU in multiples of the weights' f32 size, with freed
/// memory kept for reuse and given back at once: the full-size UNet at 256 px measured 4.24 and
/// 3.68 (4.20 and 3.23 with checkpointing; `docs/bench/cpu-2026-11-28`), plus a margin.
fn peak_multiples(gradient_checkpointing: bool) -> (f64, f64) {
    if gradient_checkpointing {
        (4.45, 3.45)
    } else {
        (4.5, 3.9)
    }
}

/// `MemAvailable` of /proc/meminfo (Linux), in bytes.
fn available_memory_bytes() -> Option<f64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<f64>().ok()? * 1024.0)
}

fn stop_if_asked(progress: &mut dyn Progress, out: &Path, stage: &str, step: usize) -> Result<()> {
    if progress.should_stop() {
        return Err(bad_input(
            out.display(),
            format!("stopped after {stage} step {step}"),
            format!("continue with `layerdiff edit --resume {}`", out.display()),
        ));
    }
    Ok(())
}

fn read_checkpoint(out: &Path, device: &candle_core::Device) -> Result<Option<Checkpoint>> {
    let json = out.join(session::CHECKPOINT_JSON);
    if !json.is_file() {
        return Ok(None);
    }
    let info: CheckpointInfo = session::read_json(&json)?;
    let tensors = session::read_tensors(&out.join(session::CHECKPOINT_TENSORS), device)?;
    Ok(Some(Checkpoint { stage: info.stage.clone(), info, tensors }))
}

fn remove_checkpoint(out: &Path) -> Result<()> {
    for name in [session::CHECKPOINT_JSON, session::CHECKPOINT_TENSORS] {
        let path = out.join(name);
        if path.exists() {
            std::fs::remove_file(&path).map_err(crate::error::io_err(&path))?;
        }
    }
    Ok(())
}

/// Stage-3 settings that `sample_session` may change: they need no new stages 1 and 2.
#[derive(Debug, Clone, Copy, Default)]
pub struct Resample {
    /// Eq. 3's alpha, in place of the session's.
    pub alpha: Option<f64>,
    /// Eq. 7's period (0: no iterative guidance), in place of the session's.
    pub guidance_period: Option<usize>,
}

/// Draws new images from a finished edit session without repeating stages 1 and 2: the same
/// seed and settings give the same image as `edit` did; `resample` changes stage 3's settings.
pub fn sample_session(
    sd: &StableDiffusion,
    files: &ModelFiles,
    session_dir: &Path,
    seeds: &[u64],
    resample: Resample,
    out: &Path,
    progress: &mut dyn Progress,
) -> Result<Vec<(u64, RgbImage)>> {
    if let Some(alpha) = resample.alpha.filter(|a| !(0.0..=1.0).contains(a)) {
        return Err(bad_input("--alpha", format!("{alpha} is outside [0, 1]"), "use a value in [0, 1]"));
    }
    let json = session_dir.join(session::SESSION_JSON);
    if !json.is_file() {
        return Err(bad_input(session_dir.display(), "holds no session.json", "give the --out folder of a finished `layerdiff edit`"));
    }
    let info: SessionInfo = session::read_json(&json)?;
    if info.progress != "stage3" && info.progress != "done" {
        return Err(bad_input(session_dir.display(), format!("the edit stopped in {}", info.progress), format!("finish it with `layerdiff edit --resume {}`", session_dir.display())));
    }
    let mut settings = info.request.settings.clone();
    settings.alpha = resample.alpha.unwrap_or(settings.alpha);
    settings.guidance_period = resample.guidance_period.unwrap_or(settings.guidance_period);
    let tensors_path = session_dir.join(session::SESSION_TENSORS);
    let tensors = session::read_tensors(&tensors_path, &sd.device)?;
    let trained = session::strip_prefix(&tensors, names::UNET_PREFIX);
    let unet = LayeredFinetune::load_trained(
        files.tensors(Component::Unet, &sd.device)?,
        UNet2DConditionModelConfig::from_json(&files.unet_config)?,
        settings.finetune,
        settings.lora_rank,
        &trained,
        sd.dtype,
        &sd.device,
    )?;
    let object = session::required(&tensors, names::OBJECT, &tensors_path)?;
    let e_bar = interpolate_embeddings(object, session::required(&tensors, names::BACKGROUND, &tensors_path)?, settings.alpha)?;
    let e_g = match settings.guidance_embedding {
        GuidanceEmbedding::Target => session::required(&tensors, names::TARGET_OBJECT, &tensors_path)?,
        GuidanceEmbedding::Optimized => object,
    };
    let uncond = session::required(&tensors, names::UNCOND, &tensors_path)?;
    let size = info.request.size;
    let stage3 = Stage3 { sd, unet: &unet, e_bar: &e_bar, e_g, uncond, settings: &settings, size: (size, size) };
    stage3.sample_all(seeds, out, progress)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_finetuning_without_the_memory_points_to_lora() {
        let msg = check_memory_for_full_finetune(1 << 50, &candle_core::Device::Cpu, false).unwrap_err().to_string();
        assert!(msg.contains("--finetune lora") && msg.contains("--gradient-checkpointing") && msg.contains("GiB"), "{msg}");
        let msg = check_memory_for_full_finetune(1 << 50, &candle_core::Device::Cpu, true).unwrap_err().to_string();
        assert!(msg.contains("--finetune lora") && !msg.contains("--gradient-checkpointing"), "{msg}");
        check_memory_for_full_finetune(1000, &candle_core::Device::Cpu, false).unwrap();
    }

    #[test]
    fn a_full_finetuning_near_the_free_memory_calls_the_tight_memory_hook() {
        // Per thread: the other memory test may run the hook at the same time.
        thread_local!(static CALLED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });
        ON_TIGHT_MEMORY.get_or_init(|| || CALLED.set(true));
        let Some(available) = available_memory_bytes() else { return };
        check_memory_for_full_finetune(1000, &candle_core::Device::Cpu, false).unwrap();
        assert!(!CALLED.get(), "a small model is not tight");
        // Fits only if freed memory is given back: tight.
        let (kept, given_back) = peak_multiples(false);
        let params = (available / (4.0 * (kept + given_back) / 2.0)) as usize;
        check_memory_for_full_finetune(params, &candle_core::Device::Cpu, false).unwrap();
        assert!(CALLED.get());
    }
}
