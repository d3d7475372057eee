//! The paper's baselines on the tiny model: SDEdit is img2img at strength 0.6, Imagic is
//! LayerDiffusion's stages on the whole image with one embedding.

#[path = "common/tiny.rs"]
mod tiny;
use tiny::{bytes, demo_request, load, Recorder};
use candle_core::{DType, Tensor};
use layerdiff::baselines::{imagic, imagic_settings, imagic_train, sdedit, BaselineSession, IMAGIC_ETA, SDEDIT_STRENGTH};
use layerdiff::image_io::{self, image_to_tensor, load_rgb, resize_center_crop, tensor_to_images};
use layerdiff::method::edit::{sample_session, EditRequest, Resample};
use layerdiff::method::optimize::{noisy_step, object_term};
use layerdiff::method::session::{self, SessionInfo};
use layerdiff::method::{EditSettings, LayeredLatents};
use layerdiff::pipeline::{generate, guided_noise, seeded_noise, GenerateOptions, Guidance, StableDiffusion};

fn request(settings: EditSettings) -> EditRequest {
    demo_request(settings)
}

/// Small Imagic settings for the tiny model.
fn imagic_request(eta: f64) -> EditRequest {
    request(EditSettings {
        alpha: eta,
        embedding_steps: 4,
        embedding_lr: 1e-2,
        finetune_steps: 3,
        finetune_lr: 1e-4,
        steps: 4,
        ..imagic_settings()
    })
}

/// The photo at the working size, as the baselines see it.
fn subject(req: &EditRequest) -> image::RgbImage {
    resize_center_crop(&load_rgb(&req.image).unwrap(), req.size, req.size).0
}

fn mean_abs_diff(a: &image::RgbImage, b: &image::RgbImage) -> f64 {
    let n = a.as_raw().len() as f64;
    a.as_raw().iter().zip(b.as_raw()).map(|(&x, &y)| (x as f64 - y as f64).abs()).sum::<f64>() / n
}

#[test]
fn sdedit_writes_its_folder_and_equals_img2img() {
    let (files, sd) = load();
    let req = request(EditSettings { steps: 5, ..Default::default() });
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path();
    let mut rec = Recorder::default();
    let images = sdedit(&sd, &files, &req, SDEDIT_STRENGTH, out, &mut rec).unwrap();
    assert_eq!(rec.stages, ["seed 1", "seed 2"]);
    for f in ["edit-1.png", "edit-2.png", "sheet.png", "session.json"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let info: SessionInfo = session::read_json(&out.join(session::SESSION_JSON)).unwrap();
    assert_eq!((info.method.as_str(), info.progress.as_str()), ("sdedit", "done"));
    assert_eq!(info.request.settings.steps, 5);
    assert!(info.timings.contains_key("total"));
    let baseline: BaselineSession = session::read_json(&out.join(session::SESSION_JSON)).unwrap();
    assert_eq!(baseline.parameters["strength"], 0.6);

    // Each image is `generate` with the photo as init image, T = "T_o in T_b", the seed: bit for bit.
    let init = image_to_tensor(&subject(&req), &sd.device, sd.dtype).unwrap();
    for (seed, image) in &images {
        let opts = GenerateOptions {
            prompt: "a jumping dog in a dense forest".into(),
            steps: 5,
            guidance_scale: 7.5,
            width: 64,
            height: 64,
            seed: *seed,
            init_image: Some(init.clone()),
            strength: 0.6,
            ..Default::default()
        };
        let expected = tensor_to_images(&generate(&sd, &opts, &mut |_, _| {}).unwrap()).unwrap().remove(0);
        assert!(expected == *image, "seed {seed}: sdedit differs from img2img");
        assert_eq!(image::open(out.join(format!("edit-{seed}.png"))).unwrap().to_rgb8(), expected);
    }
    assert_ne!(images[0].1, images[1].1, "seeds give different images");
}

#[test]
fn sdedit_at_a_lower_strength_stays_closer_to_the_photo() {
    let (files, sd) = load();
    let mut req = request(EditSettings { steps: 10, ..Default::default() });
    req.seeds = vec![1, 2, 3];
    // The tiny model's VAE is random: its decoder cannot give the photo back, only its own
    // reconstruction D(E(photo)). That is what SDEdit tends to as the strength goes to 0.
    let photo = image_to_tensor(&subject(&req), &sd.device, sd.dtype).unwrap();
    let input = tensor_to_images(&sd.decode_latents(&sd.encode_image(&photo, None).unwrap()).unwrap()).unwrap().remove(0);
    let dir = tempfile::tempdir().unwrap();
    let distance = |strength: f64| {
        let images = sdedit(&sd, &files, &req, strength, &dir.path().join(format!("{strength}")), &mut Recorder::default()).unwrap();
        images.iter().map(|(_, img)| mean_abs_diff(img, &input)).sum::<f64>() / images.len() as f64
    };
    let (low, mid, high) = (distance(0.2), distance(0.6), distance(1.0));
    eprintln!("mean |sdedit - D(E(photo))| at strength 0.2 / 0.6 / 1.0: {low:.2} / {mid:.2} / {high:.2}");
    assert!(low < mid && mid < high, "{low} / {mid} / {high}");
}

#[test]
fn sdedit_refuses_a_strength_that_leaves_no_step_before_writing() {
    let (files, sd) = load();
    let req = request(EditSettings { steps: 4, ..Default::default() });
    let dir = tempfile::tempdir().unwrap();
    for strength in [0.0, 0.2, 1.5] {
        let err = sdedit(&sd, &files, &req, strength, dir.path(), &mut Recorder::default()).expect_err("refused").to_string();
        assert!(err.contains("strength") && !err.contains('\n'), "{err}");
    }
    assert!(!dir.path().join("session.json").exists());
}

/// The whole photo as the one layer, as Imagic trains on it.
fn whole_image(sd: &StableDiffusion, req: &EditRequest) -> LayeredLatents {
    let z = sd.encode_image(&image_to_tensor(&subject(req), &sd.device, sd.dtype).unwrap(), None).unwrap();
    let ones = Tensor::ones((1, 1, 8, 8), sd.dtype, &sd.device).unwrap();
    LayeredLatents { subject: z.clone(), subject_mask: ones.clone(), background: z, background_mask: ones }
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
}

#[test]
fn imagic_stage1_reconstruction_loss_falls() {
    let (files, sd) = load();
    let mut req = imagic_request(IMAGIC_ETA);
    req.settings.embedding_steps = 40;
    req.settings.embedding_lr = 5e-2;
    req.settings.finetune_steps = 0;
    let trained = imagic_train(&sd, &files, &req, &mut Recorder::default()).unwrap();
    assert_eq!(trained.stage1.losses.len(), 40);
    assert!(trained.stage2.losses.is_empty());

    // The whole-image reconstruction loss on held-out draws (not trained on) falls from c(T) to e*.
    let data = whole_image(&sd, &req);
    let ac = layerdiff::schedulers::TrainSchedule::from_scheduler(&sd.scheduler().unwrap());
    let held_out = |e: &Tensor| {
        (1000..1008)
            .map(|k| scalar(&object_term(sd.unet().unwrap(), &noisy_step(&ac, &data, 0, 77, k).unwrap(), &data, e).unwrap()))
            .sum::<f64>()
            / 8.0
    };
    let (before, after) = (held_out(&trained.target), held_out(trained.optimized()));
    let l = &trained.stage1.losses;
    let mean = |s: &[layerdiff::method::StepLoss]| s.iter().map(|l| l.loss).sum::<f64>() / s.len() as f64;
    let (first, last) = (mean(&l[..5]), mean(&l[35..]));
    eprintln!("imagic stage 1: first 5 {first:.5}, last 5 {last:.5}; held-out {before:.5} -> {after:.5}");
    assert!(after < before, "held-out reconstruction loss did not fall: {before} -> {after}");
    assert!(last < first, "training loss did not fall: {first} -> {last}");
    // Only the one embedding trained: the unused background embedding is still c(T).
    assert_ne!(bits(trained.optimized()), bits(&trained.target));
    assert_eq!(bits(trained.stage1.background()), bits(&trained.target));
}

#[test]
fn imagic_writes_its_folder_reproducibly_and_sample_redraws_it() {
    let (files, sd) = load();
    let req = imagic_request(IMAGIC_ETA);
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut rec = Recorder::default();
    let images = imagic(&sd, &files, &req, a.path(), &mut rec).unwrap();
    assert_eq!(rec.stages, ["stage 1", "stage 2", "seed 1", "seed 2"]);
    for f in ["edit-1.png", "edit-2.png", "sheet.png", "session.json", "session.safetensors"] {
        assert!(a.path().join(f).is_file(), "{f} missing");
    }
    let baseline: BaselineSession = session::read_json(&a.path().join(session::SESSION_JSON)).unwrap();
    let info = &baseline.info;
    assert_eq!((info.method.as_str(), info.progress.as_str()), ("imagic", "done"));
    assert_eq!(baseline.parameters["eta"], 0.7);
    assert_eq!((info.losses.stage1.len(), info.losses.stage2.len()), (4, 3));
    assert_eq!(info.request.settings.guidance_period, 0);
    for stage in ["stage1", "stage2", "stage3", "total"] {
        assert!(info.timings.contains_key(stage), "no timing for {stage}");
    }
    assert_ne!(images[0].1, images[1].1, "seeds give different images");

    // The same request and seed give the same image.
    imagic(&sd, &files, &req, b.path(), &mut Recorder::default()).unwrap();
    for f in ["edit-1.png", "edit-2.png", "session.safetensors"] {
        assert_eq!(bytes(&a.path().join(f)), bytes(&b.path().join(f)), "{f} differs between two runs");
    }
    // `layerdiff sample` redraws an Imagic session bit for bit.
    let again = a.path().join("again");
    let redrawn = sample_session(&sd, &files, a.path(), &[2], Resample::default(), &again, &mut Recorder::default()).unwrap();
    assert!(redrawn[0].1 == images[1].1, "sample differs from imagic's own image");
}

#[test]
fn imagic_at_eta_one_is_plain_sampling_on_the_target_text_with_the_finetuned_unet() {
    let (files, sd) = load();
    let req = imagic_request(1.0);
    let dir = tempfile::tempdir().unwrap();
    let images = imagic(&sd, &files, &req, dir.path(), &mut Recorder::default()).unwrap();

    // Stages 1-2 again (deterministic), then a plain CFG DDIM loop on c(T) with the tuned UNet.
    let trained = imagic_train(&sd, &files, &req, &mut Recorder::default()).unwrap();
    let guidance = Guidance { cond: &trained.target, uncond: &trained.uncond, scale: 7.5 };
    for (seed, image) in &images {
        let mut scheduler = sd.scheduler().unwrap();
        scheduler.set_timesteps(4).unwrap();
        let mut latents = seeded_noise(*seed, &[1, 4, 8, 8], &sd.device, sd.dtype).unwrap();
        for &t in scheduler.timesteps() {
            let input = scheduler.scale_model_input(latents.clone(), t).unwrap();
            let eps = guided_noise(trained.unet(), &input, t, &guidance).unwrap();
            latents = scheduler.step(&eps, t, &latents).unwrap();
        }
        let plain = image_io::tensor_to_images(&sd.decode_latents(&latents).unwrap()).unwrap().remove(0);
        assert!(plain == *image, "seed {seed}: eta 1 differs from plain sampling on c(T)");
    }

    // The fine-tuning did change the model, and eta < 1 the image.
    let x = seeded_noise(9, &[1, 4, 8, 8], &sd.device, sd.dtype).unwrap();
    let probe = |u: &layerdiff::models::unet_2d::UNet2DConditionModel| bits(&u.forward(&x, 321.0, &trained.target).unwrap());
    assert_ne!(probe(trained.unet()), probe(sd.unet().unwrap()), "stage 2 left the UNet as it was");
    let other = imagic(&sd, &files, &imagic_request(0.5), &dir.path().join("half"), &mut Recorder::default()).unwrap();
    assert!(other[0].1 != images[0].1, "eta 0.5 gave the eta 1 image");
}

#[test]
fn imagic_refuses_an_eta_outside_zero_one_before_writing() {
    let (files, sd) = load();
    let dir = tempfile::tempdir().unwrap();
    let err = imagic(&sd, &files, &imagic_request(1.5), dir.path(), &mut Recorder::default()).expect_err("refused").to_string();
    assert!(err.contains("--alpha") && err.contains("eta") && !err.contains('\n'), "{err}");
    assert!(!dir.path().join("session.json").exists());
}

#[test]
fn object_only_stages_equal_the_mask_trick() {
    use layerdiff::method::finetune::LayeredFinetune;
    use layerdiff::method::optimize::LayeredOptimization;
    use layerdiff::method::FinetuneMode;
    use layerdiff::sources::Component;
    let (files, sd) = load();
    let req = imagic_request(IMAGIC_ETA);
    // All-ones masks: (1 - M_b) = 0 switches the background term off in the batched loss.
    let data = whole_image(&sd, &req);
    let ac = layerdiff::schedulers::TrainSchedule::from_scheduler(&sd.scheduler().unwrap());
    let target = sd.encode_prompt(&req.prompt()).unwrap();
    let close = |a: f64, b: f64| assert!((a - b).abs() <= 1e-5 * b.abs(), "{a} vs {b}");

    let stage1 = |object_only: bool| {
        let s = LayeredOptimization::new(&target, &target, 1e-2).unwrap();
        let mut s = if object_only { s.object_only() } else { s };
        s.run(sd.unet().unwrap(), &ac, &data, 0, 2, &mut |_| {}).unwrap();
        s
    };
    let (alone, masked) = (stage1(true), stage1(false));
    close(alone.losses[0].loss, masked.losses[0].loss);
    close(alone.losses[1].loss, masked.losses[1].loss);

    let stage2 = |object_only: bool| {
        let weights = files.tensors(Component::Unet, &sd.device).unwrap();
        let s = LayeredFinetune::new(weights, sd.unet().unwrap().config().clone(), FinetuneMode::Full, 4, 1e-4, sd.dtype, &sd.device).unwrap();
        let mut s = if object_only { s.object_only() } else { s };
        s.run(&target, 1.0, 0.0, &ac, &data, 0, 2, &mut |_| {}).unwrap();
        s
    };
    let (alone, masked) = (stage2(true), stage2(false));
    close(alone.losses[0].loss, masked.losses[0].loss);
    close(alone.losses[1].loss, masked.losses[1].loss);
}
