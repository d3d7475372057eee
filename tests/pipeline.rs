//! End-to-end parity with diffusers' StableDiffusionPipeline and its img2img, on the tiny fixture
//! model (tests/fixtures/README.md says how the fixtures were made).

#[path = "common/tiny.rs"]
mod tiny;

use candle_core::{DType, Device, Tensor};
use layerdiff::image_io::{tensor_to_images, write_atomic};
use layerdiff::pipeline::{generate, GenerateOptions, Guidance, StableDiffusion};
use std::collections::HashMap;
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn load_tiny() -> StableDiffusion {
    tiny::load().1
}

fn tensors() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("pipeline.safetensors"), &Device::Cpu).unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// Largest difference in 0..255 levels between our image and diffusers' float image in [0, 1].
fn max_level_diff(ours: &Tensor, reference_nhwc: &Tensor) -> u8 {
    let ours = &tensor_to_images(ours).unwrap()[0];
    let reference: Vec<f32> = reference_nhwc.flatten_all().unwrap().to_vec1().unwrap();
    ours.as_raw()
        .iter()
        .zip(&reference)
        .map(|(&a, &b)| a.abs_diff((b * 255.0).round() as u8))
        .max()
        .unwrap()
}

#[test]
fn text_to_image_matches_diffusers() {
    let sd = load_tiny();
    let t = tensors();
    let opts = GenerateOptions {
        prompt: "a photo of a dog".into(),
        steps: 10,
        width: 64,
        height: 64,
        init_latents: Some(t["init_latents"].clone()),
        ..Default::default()
    };
    let mut steps_seen = 0;
    let image = generate(&sd, &opts, &mut |done, total| {
        assert_eq!(total, 10);
        steps_seen = done;
    })
    .unwrap();
    assert_eq!(steps_seen, 10);
    let levels = max_level_diff(&image, &t["image"]);
    eprintln!("text-to-image: max difference {levels}/255 levels");
    assert!(levels <= 2, "image differs from diffusers by {levels}/255");
}

#[test]
fn image_to_image_matches_diffusers() {
    let sd = load_tiny();
    let t = tensors();
    let mut scheduler = sd.scheduler().unwrap();
    scheduler.set_timesteps(10).unwrap();
    let timesteps = scheduler.timesteps_for_strength(0.6).unwrap().to_vec();
    let expected: Vec<i64> = t["img2img.timesteps"].to_vec1().unwrap();
    assert_eq!(timesteps.iter().map(|&x| x as i64).collect::<Vec<_>>(), expected);

    let z = sd.encode_image(&t["img2img.init_image"], None).unwrap();
    let err_z = max_abs(&z, &t["img2img.init_latents"]);
    let noisy = scheduler.add_noise(&z, &t["img2img.noise"], timesteps[0]).unwrap();
    let cond = sd.encode_prompt("a photo of a dog").unwrap();
    let uncond = sd.encode_prompt("").unwrap();
    let guidance = Guidance { cond: &cond, uncond: &uncond, scale: 7.5 };
    let latents = sd.denoise(&scheduler, &timesteps, noisy, &guidance, &mut |_, _| {}).unwrap();
    let err_final = max_abs(&latents, &t["img2img.final_latents"]);
    let levels = max_level_diff(&sd.decode_latents(&latents).unwrap(), &t["img2img.image"]);
    eprintln!("img2img: init latents {err_z:.2e}, final latents {err_final:.2e}, image {levels}/255 levels");
    assert!(err_z < 1e-4 && err_final < 1e-4 && levels <= 2);
}

#[test]
fn init_latents_of_the_wrong_shape_are_refused() {
    let sd = load_tiny();
    let opts = GenerateOptions {
        prompt: "x".into(),
        steps: 2,
        width: 64,
        height: 64,
        init_latents: Some(Tensor::zeros((1, 4, 16, 16), DType::F32, &Device::Cpu).unwrap()),
        ..Default::default()
    };
    let msg = generate(&sd, &opts, &mut |_, _| {}).unwrap_err().to_string();
    assert!(msg.contains("--init-latents") && msg.contains("[1, 4, 8, 8]"), "{msg}");
}

#[test]
fn sizes_and_steps_are_checked() {
    let sd = load_tiny();
    for (width, steps, flag) in [(60, 2, "--width"), (64, 0, "--steps")] {
        let opts = GenerateOptions { prompt: "x".into(), steps, width, height: 64, ..Default::default() };
        let msg = generate(&sd, &opts, &mut |_, _| {}).unwrap_err().to_string();
        assert!(msg.starts_with(flag) && !msg.contains('\n'), "{msg}");
    }
}

#[test]
fn a_seed_gives_the_same_image_and_another_seed_a_different_one() {
    let sd = load_tiny();
    let run = |seed| {
        let opts = GenerateOptions { prompt: "a dog".into(), steps: 3, width: 64, height: 64, seed, ..Default::default() };
        generate(&sd, &opts, &mut |_, _| {}).unwrap()
    };
    let (a, b, c) = (run(7), run(7), run(8));
    assert_eq!(max_abs(&a, &b), 0.0);
    assert!(max_abs(&a, &c) > 1e-3);
}

#[test]
fn init_latents_file_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l.safetensors");
    let latents = Tensor::ones((1, 4, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let bytes = safetensors::serialize([("latents", &latents)], None).unwrap();
    write_atomic(&path, &bytes).unwrap();
    let read = layerdiff::pipeline::load_latents(&path, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(max_abs(&read, &latents), 0.0);
    let bytes = safetensors::serialize([("other", &latents)], None).unwrap();
    write_atomic(&path, &bytes).unwrap();
    let msg = layerdiff::pipeline::load_latents(&path, &Device::Cpu, DType::F32).unwrap_err().to_string();
    assert!(msg.contains("latents"), "{msg}");
}
