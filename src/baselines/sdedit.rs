//! SDEdit (Meng et al. 2021) as the paper's baseline: noise the subject image's latents to
//! `strength` of the schedule (0.6) and denoise them with `c(T)` and classifier-free guidance.
//! It is `pipeline::generate` with `init_image` (diffusers' img2img) at the request's
//! `settings.steps` and `settings.guidance_scale`, one image per seed: the seed draws both the
//! VAE posterior sample and the added noise, exactly as `layerdiff generate --init-image` does.

use super::{load_subject, start_session, write_sheet};
use crate::method::edit::check_request;
use crate::error::Result;
use crate::image_io::{self, save_png_atomic};
use crate::method::edit::{EditRequest, Progress};
use crate::pipeline::{generate, GenerateOptions, StableDiffusion};
use crate::sources::ModelFiles;
use image::RgbImage;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

/// The spec's SDEdit strength: the share of the schedule re-noised.
pub const SDEDIT_STRENGTH: f64 = 0.6;

/// SDEdit on the request's photo with `T = req.prompt()`: writes `edit-<seed>.png` per seed,
/// `sheet.png` and `session.json` (method "sdedit", parameters `strength`) into `out`.
/// The request's mask, background source and `alpha` are not used.
pub fn sdedit(
    sd: &StableDiffusion,
    files: &ModelFiles,
    req: &EditRequest,
    strength: f64,
    out: &Path,
    progress: &mut dyn Progress,
) -> Result<Vec<(u64, RgbImage)>> {
    check_request(req, sd.vae_factor(), "--alpha", false)?;
    // The strength and the step count must leave a denoising step: ask the scheduler now,
    // before any file is written.
    let mut scheduler = sd.scheduler()?;
    scheduler.set_timesteps(req.settings.steps)?;
    let denoise_steps = scheduler.timesteps_for_strength(strength)?.len();
    let (subject, crop) = load_subject(req)?;
    let started = Instant::now();
    let parameters = BTreeMap::from([("strength".to_string(), strength)]);
    let mut session = start_session(sd, files, req, "sdedit", crop, 0.0, parameters, "sampling")?;
    session.write(out)?;

    let init_image = image_io::image_to_tensor(&subject, &sd.device, sd.dtype)?;
    let size = req.size as usize;
    let mut images = Vec::with_capacity(req.seeds.len());
    for &seed in &req.seeds {
        let opts = GenerateOptions {
            prompt: req.prompt(),
            negative_prompt: String::new(),
            steps: req.settings.steps,
            guidance_scale: req.settings.guidance_scale,
            width: size,
            height: size,
            seed,
            init_latents: None,
            init_image: Some(init_image.clone()),
            strength,
        };
        progress.start(&format!("seed {seed}"), denoise_steps);
        let image = generate(sd, &opts, &mut |done, _| progress.step(done, None))?;
        progress.finish();
        let image = image_io::tensor_to_images(&image)?.remove(0);
        save_png_atomic(&image, &out.join(format!("edit-{seed}.png")))?;
        images.push((seed, image));
    }
    session.info.timings.insert("sample".to_string(), started.elapsed().as_secs_f64());
    session.info.timings.insert("total".to_string(), started.elapsed().as_secs_f64());
    session.info.progress = "done".into();
    write_sheet(out, &subject, &images)?;
    session.write(out)?;
    Ok(images)
}
