//! Imagic (Kawar et al. 2023) as the paper's baseline, built from LayerDiffusion's own stages:
//!
//! 1. optimize `e = c(T)` to reconstruct the whole of `I_s`, the UNet frozen:
//!    `L = ||eps - eps_theta(z_s,t, t, e)||^2` ([`LayeredOptimization`] on the object term alone
//!    with an all-ones subject mask; lr `settings.embedding_lr`, `settings.embedding_steps` steps);
//! 2. fine-tune the UNet on `e*`: `L = ||eps - eps_theta(z_s,t, t, e*)||^2`
//!    ([`LayeredFinetune`] on the object term alone, `lambda_o = 1`, all-ones mask; lr
//!    `settings.finetune_lr`, `settings.finetune_steps` steps, `settings.finetune` full or LoRA);
//! 3. sample with `eta c(T) + (1 - eta) e*` and plain classifier-free guidance (no iterative
//!    guidance), DDIM `settings.steps`, scale `settings.guidance_scale`.
//!
//! **For Imagic, `settings.alpha` is `eta`.** [`imagic_settings`] gives the spec's defaults
//! (lr 1e-3 / 500 steps, lr 2e-6 / 1000 steps, eta 0.7).
//!
//! Each stage runs one UNet forward of batch 1 per step (the background layer is switched off,
//! not masked out), so a step costs half of a LayerDiffusion step. The steps draw `t` and the
//! noise from `req.train_seed` as LayerDiffusion's stages do.
//!
//! The session it writes is one `layerdiff sample` can read: `session.safetensors` holds
//! `object_embedding = c(T)`, `background_embedding = e*` (so Eq. 3's
//! `alpha object + (1 - alpha) background` is Imagic's mix), `interpolated_embedding`,
//! `target_object_embedding = c(T)`, `uncond_embedding` and the fine-tuned weights under `unet.`;
//! `session.json`'s request has `guidance_period` 0, what sampling used.

use super::{load_subject, start_session, write_sheet};
use crate::method::edit::check_request;
use crate::error::Result;
use crate::image_io::{self, Crop};
use crate::method::edit::{check_memory_for_full_finetune, EditRequest, Progress, Stage3};
use crate::method::finetune::LayeredFinetune;
use crate::method::optimize::{interpolate_embeddings, LayeredOptimization};
use crate::method::session::{self, names, Losses};
use crate::method::{EditSettings, FinetuneMode, LayeredLatents, StepLoss};
use crate::models::unet_2d::{UNet2DConditionModel, UNet2DConditionModelConfig};
use crate::pipeline::StableDiffusion;
use crate::schedulers::TrainSchedule;
use crate::sources::{Component, ModelFiles};
use candle_core::Tensor;
use image::RgbImage;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Instant;

/// The spec's `eta`: the share of `c(T)` in the sampling embedding.
pub const IMAGIC_ETA: f64 = 0.7;

/// The spec's Imagic settings: stage 1 lr 1e-3, 500 steps; stage 2 lr 2e-6, 1000 steps;
/// `alpha` = eta = 0.7; no iterative guidance; the rest as LayerDiffusion's defaults.
pub fn imagic_settings() -> EditSettings {
    EditSettings {
        alpha: IMAGIC_ETA,
        embedding_steps: 500,
        embedding_lr: 1e-3,
        finetune_steps: 1000,
        finetune_lr: 2e-6,
        guidance_period: 0,
        ..Default::default()
    }
}

/// `eta c(T) + (1 - eta) e*`, eta in [0, 1]; eta 1 gives `c(T)` exactly.
pub fn imagic_embedding(target: &Tensor, optimized: &Tensor, eta: f64) -> Result<Tensor> {
    interpolate_embeddings(target, optimized, eta)
}

/// Stages 1 and 2 of Imagic, done.
pub struct ImagicTrained {
    /// `I_s` at the working size and how it was cropped.
    pub subject: RgbImage,
    pub crop: Crop,
    /// `c(T)`.
    pub target: Tensor,
    /// `c("")`.
    pub uncond: Tensor,
    /// Stage 1: [`LayeredOptimization::object`] is `e*`.
    pub stage1: LayeredOptimization,
    /// Stage 2: [`LayeredFinetune::unet`] is the fine-tuned UNet.
    pub stage2: LayeredFinetune,
    /// Seconds of "stage1" and "stage2".
    pub timings: HashMap<String, f64>,
}

impl ImagicTrained {
    /// `e*`, the optimized embedding.
    pub fn optimized(&self) -> &Tensor {
        self.stage1.object()
    }

    /// The fine-tuned UNet.
    pub fn unet(&self) -> &UNet2DConditionModel {
        self.stage2.unet()
    }
}

/// Imagic's stages 1 and 2 on the request's photo with `T = req.prompt()` (writes nothing).
pub fn imagic_train(
    sd: &StableDiffusion,
    files: &ModelFiles,
    req: &EditRequest,
    progress: &mut dyn Progress,
) -> Result<ImagicTrained> {
    check_request(req, sd.vae_factor(), "--alpha (Imagic's eta)", false)?;
    let settings = &req.settings;
    let (subject, crop) = load_subject(req)?;

    // The whole image is the one layer: z_s with an all-ones mask. The background layer is
    // switched off (object_only); it is given the same latents only to satisfy the shape checks.
    let z = sd.encode_image(&image_io::image_to_tensor(&subject, &sd.device, sd.dtype)?, None)?;
    let (_, _, h, w) = z.dims4()?;
    let ones = Tensor::ones((1, 1, h, w), sd.dtype, &sd.device)?;
    let data = LayeredLatents { subject: z.clone(), subject_mask: ones.clone(), background: z, background_mask: ones };
    let target = sd.encode_prompt(&req.prompt())?;
    let uncond = sd.encode_prompt("")?;
    let schedule = TrainSchedule::from_scheduler(&sd.scheduler()?);
    let mut timings = HashMap::new();

    // 1. optimize e from c(T)
    let t = Instant::now();
    let mut stage1 = LayeredOptimization::new(&target, &target, settings.embedding_lr)?.object_only();
    progress.start("stage 1", settings.embedding_steps);
    progress.step(0, None);
    stage1.run(sd.unet()?, &schedule, &data, req.train_seed, settings.embedding_steps, &mut |l: StepLoss| {
        progress.step(l.step + 1, Some(l.loss))
    })?;
    progress.finish();
    timings.insert("stage1".to_string(), t.elapsed().as_secs_f64());

    // 2. fine-tune the UNet on e*
    let t = Instant::now();
    let optimized = stage1.object().copy()?;
    let unet_weights = files.tensors(Component::Unet, &sd.device)?;
    if settings.finetune == FinetuneMode::Full {
        let params = unet_weights.values().map(|t| t.elem_count()).sum();
        check_memory_for_full_finetune(params, &sd.device, settings.gradient_checkpointing)?;
    }
    let mut stage2 = LayeredFinetune::new(
        unet_weights,
        UNet2DConditionModelConfig::from_json(&files.unet_config)?,
        settings.finetune,
        settings.lora_rank,
        settings.finetune_lr,
        sd.dtype,
        &sd.device,
    )?
    .object_only()
    .with_gradient_checkpointing(settings.gradient_checkpointing);
    progress.start("stage 2", settings.finetune_steps);
    progress.step(0, None);
    stage2.run(&optimized, 1.0, 0.0, &schedule, &data, req.train_seed, settings.finetune_steps, &mut |l: StepLoss| {
        progress.step(l.step + 1, Some(l.loss))
    })?;
    progress.finish();
    timings.insert("stage2".to_string(), t.elapsed().as_secs_f64());

    Ok(ImagicTrained { subject, crop, target, uncond, stage1, stage2, timings })
}

/// Imagic on the request's photo with `T = req.prompt()` and eta = `req.settings.alpha`: writes
/// `edit-<seed>.png` per seed, `sheet.png`, `session.json` (method "imagic", parameters `eta`,
/// both loss curves) and `session.safetensors` (see the module docs) into `out`.
pub fn imagic(
    sd: &StableDiffusion,
    files: &ModelFiles,
    req: &EditRequest,
    out: &Path,
    progress: &mut dyn Progress,
) -> Result<Vec<(u64, RgbImage)>> {
    check_request(req, sd.vae_factor(), "--alpha (Imagic's eta)", false)?;
    let started = Instant::now();
    // What sampling uses: plain guidance, whatever the request's guidance period.
    let mut stored = req.clone();
    stored.settings.guidance_period = 0;
    let eta = req.settings.alpha;
    let parameters = BTreeMap::from([("eta".to_string(), eta)]);
    let (_, crop) = load_subject(req)?;
    let mut session = start_session(sd, files, &stored, "imagic", crop, 1.0, parameters, "stage1")?;
    session.write(out)?;

    let trained = imagic_train(sd, files, &stored, progress)?;
    session.info.timings.extend(trained.timings.clone());
    session.info.losses = Losses { stage1: trained.stage1.losses.clone(), stage2: trained.stage2.losses.clone() };

    // The session, in the layout `sample_session` reads (module docs).
    let mixed = imagic_embedding(&trained.target, trained.optimized(), eta)?;
    let mut tensors: HashMap<String, Tensor> = HashMap::from([
        (names::OBJECT.to_string(), trained.target.clone()),
        (names::BACKGROUND.to_string(), trained.optimized().copy()?),
        (names::BAR.to_string(), mixed.clone()),
        (names::TARGET_OBJECT.to_string(), trained.target.clone()),
        (names::UNCOND.to_string(), trained.uncond.clone()),
    ]);
    tensors.extend(session::with_prefix(trained.stage2.trained_tensors()?, names::UNET_PREFIX));
    session::write_tensors(&out.join(session::SESSION_TENSORS), &tensors)?;
    session.info.progress = "stage3".into();
    session.write(out)?;

    // 3. plain CFG sampling on eta c(T) + (1 - eta) e*, the training state freed
    let unet = trained.stage2.into_unet();
    let t = Instant::now();
    let size = (stored.size, stored.size);
    let stage3 = Stage3 { sd, unet: &unet, e_bar: &mixed, e_g: &mixed, uncond: &trained.uncond, settings: &stored.settings, size };
    let images = stage3.sample_all(&stored.seeds, out, progress)?;
    session.info.timings.insert("stage3".to_string(), t.elapsed().as_secs_f64());
    session.info.timings.insert("total".to_string(), started.elapsed().as_secs_f64());
    session.info.progress = "done".into();
    write_sheet(out, &trained.subject, &images)?;
    session.write(out)?;
    Ok(images)
}
