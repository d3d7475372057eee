//! The metrics on tiny random-weight CLIP and DINOv2 models: identical images score 1, different
//! ones less, and the masks confine what is compared.

#[path = "common/hub_server.rs"]
mod hub_server;

use candle_core::Device;
use image::{GrayImage, Luma, Rgb, RgbImage};
use layerdiff::eval::{write_tiny_clip, write_tiny_dinov2, Scorer, ScorerOptions};
use layerdiff::sources::SourceOptions;
use std::sync::OnceLock;

struct Tiny {
    _dir: tempfile::TempDir,
    scorer: Scorer,
    clip_dir: String,
    dino_dir: String,
}

fn tiny() -> &'static Tiny {
    static TINY: OnceLock<Tiny> = OnceLock::new();
    TINY.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let (clip_dir, dino_dir) = (dir.path().join("clip"), dir.path().join("dino"));
        write_tiny_clip(&clip_dir, 1).unwrap();
        write_tiny_dinov2(&dino_dir, 2).unwrap();
        let (clip_dir, dino_dir) = (clip_dir.to_str().unwrap().to_string(), dino_dir.to_str().unwrap().to_string());
        let opts = ScorerOptions { clip_model: clip_dir.clone(), dino_model: Some(dino_dir.clone()), source: SourceOptions::default(), device: Device::Cpu };
        Tiny { scorer: Scorer::load(&opts).unwrap(), _dir: dir, clip_dir, dino_dir }
    })
}

/// A 64 x 48 picture: smooth colours plus a pattern that depends on `seed`.
fn picture(seed: u32) -> RgbImage {
    RgbImage::from_fn(64, 48, |x, y| {
        let n = (x * 7 + y * 13 + seed * 101).wrapping_mul(2654435761) >> 24;
        Rgb([(x * 4) as u8, (y * 5) as u8, (n as u8) / 2 + (seed * 40) as u8])
    })
}

/// The subject: a 20 x 16 box at (10, 12).
fn mask() -> GrayImage {
    GrayImage::from_fn(64, 48, |x, y| Luma([if (10..30).contains(&x) && (12..28).contains(&y) { 255 } else { 0 }]))
}

fn close(a: f32, b: f32) -> bool {
    (a - b).abs() < 1e-5
}

#[test]
fn identical_images_score_one_and_different_ones_less() {
    let s = &tiny().scorer;
    let (a, b) = (picture(1), picture(2));
    let same = s.image_fidelity(&a, &a).unwrap();
    assert!(close(same.clip, 1.0) && close(same.dino.unwrap(), 1.0), "{same:?}");
    let diff = s.image_fidelity(&a, &b).unwrap();
    assert!(diff.clip < 0.9999 && diff.dino.unwrap() < 0.9999, "{diff:?}");
    let subject = s.subject_fidelity(&a, &mask(), &a).unwrap();
    assert!(close(subject.clip, 1.0) && close(subject.dino.unwrap(), 1.0), "{subject:?}");
    let nb = mask();
    let background = s.background_fidelity(&a, &nb, &a).unwrap().unwrap();
    assert!(close(background.clip, 1.0) && close(background.dino.unwrap(), 1.0), "{background:?}");
    assert!(s.background_fidelity(&a, &nb, &b).unwrap().unwrap().clip < 0.9999);
}

#[test]
fn masks_confine_what_is_compared() {
    let s = &tiny().scorer;
    let (input, output) = (picture(1), picture(3));
    let m = mask();
    // the output changed only outside the subject: subject fidelity does not move
    let mut outside = output.clone();
    for (x, y, p) in outside.enumerate_pixels_mut() {
        if m.get_pixel(x, y).0[0] == 0 {
            *p = Rgb([255, 0, 255]);
        }
    }
    assert_eq!(s.subject_fidelity(&input, &m, &output).unwrap(), s.subject_fidelity(&input, &m, &outside).unwrap());
    // ... and the background fidelity does
    assert_ne!(s.background_fidelity(&input, &m, &output).unwrap(), s.background_fidelity(&input, &m, &outside).unwrap());
    // the output changed only inside the subject: the background fidelity does not move
    let mut inside = output.clone();
    for (x, y, p) in inside.enumerate_pixels_mut() {
        if m.get_pixel(x, y).0[0] != 0 {
            *p = Rgb([0, 255, 0]);
        }
    }
    assert_eq!(s.background_fidelity(&input, &m, &output).unwrap(), s.background_fidelity(&input, &m, &inside).unwrap());
    assert_ne!(s.subject_fidelity(&input, &m, &output).unwrap(), s.subject_fidelity(&input, &m, &inside).unwrap());
}

#[test]
fn score_gives_every_metric_as_the_single_calls() {
    let s = &tiny().scorer;
    let (input, output, source) = (picture(1), picture(4), picture(5));
    let m = mask();
    // the source's own "not background": its left quarter
    let source_mask = GrayImage::from_fn(64, 48, |x, _| Luma([if x < 16 { 255 } else { 0 }]));
    let reference = s.reference(&input, Some(&m), Some((&source, Some(&source_mask)))).unwrap();
    let text = "a photo of a jumping dog";
    let scores = s.score(&reference, &output, text).unwrap();
    let clip = s.clip_score(&output, text).unwrap();
    assert!(close(scores.clip_score.cosine, clip.cosine), "{scores:?} {clip:?}");
    assert!((-1.0..=1.0).contains(&clip.cosine));
    assert_eq!(clip.torchmetrics, (100.0 * clip.cosine).max(0.0));
    let image = s.image_fidelity(&input, &output).unwrap();
    assert!(close(scores.image.unwrap().clip, image.clip) && close(scores.image.unwrap().dino.unwrap(), image.dino.unwrap()));
    let subject = s.subject_fidelity(&input, &m, &output).unwrap();
    assert!(close(scores.subject.unwrap().clip, subject.clip) && close(scores.subject.unwrap().dino.unwrap(), subject.dino.unwrap()));
    let union = GrayImage::from_fn(64, 48, |x, y| Luma([m.get_pixel(x, y).0[0].max(source_mask.get_pixel(x, y).0[0])]));
    let background = s.background_fidelity(&source, &union, &output).unwrap().unwrap();
    assert!(close(scores.background.unwrap().clip, background.clip) && close(scores.background.unwrap().dino.unwrap(), background.dino.unwrap()));
    // no mask, no background source: the whole photo is the subject, no background metric
    let whole = s.reference(&input, None, None).unwrap();
    let scores = s.score(&whole, &output, text).unwrap();
    assert!(scores.subject.is_none() && scores.background.is_none());
    let alone = s.score(&Scorer::no_reference(), &output, text).unwrap();
    assert!(alone.image.is_none() && alone.subject.is_none() && alone.background.is_none());
    assert_eq!(alone.clip_score, scores.clip_score);
    // a different text scores differently
    assert_ne!(s.clip_score(&output, "a dense forest").unwrap(), clip);
}

#[test]
fn mismatched_sizes_and_wrong_kinds_are_one_line_errors() {
    let t = tiny();
    let small = RgbImage::new(32, 32);
    let err = t.scorer.subject_fidelity(&picture(1), &mask(), &small).unwrap_err().to_string();
    assert!(err.contains("differ in size") && !err.contains('\n'), "{err}");
    let err = t.scorer.subject_fidelity(&picture(1), &GrayImage::new(64, 48), &picture(1)).unwrap_err().to_string();
    assert!(err.contains("selects nothing"), "{err}");
    for (clip, dino, expected) in [(&t.dino_dir, &t.dino_dir, "not a CLIP model"), (&t.clip_dir, &t.clip_dir, "not a DINOv2 model")] {
        let opts = ScorerOptions { clip_model: clip.clone(), dino_model: Some(dino.clone()), source: SourceOptions::default(), device: Device::Cpu };
        let err = Scorer::load(&opts).unwrap_err().to_string();
        assert!(err.contains(expected) && !err.contains('\n'), "{err}");
    }
}

/// Every file of a folder, for the stand-in hub.
fn repo(dir: &str) -> hub_server::RepoFiles {
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).map(|p| (p.file_name().unwrap().to_str().unwrap().to_string(), std::fs::read(&p).unwrap())).collect()
}

#[test]
fn metric_models_load_from_a_hub_repo_then_offline() {
    let t = tiny();
    let mut dino = repo(&t.dino_dir);
    dino.remove("preprocessor_config.json"); // optional: the dinov2 defaults apply
    let server = hub_server::HubServer::start([("org/clip".to_string(), repo(&t.clip_dir)), ("org/dino".to_string(), dino)].into(), None);
    let cache = tempfile::tempdir().unwrap();
    let source = SourceOptions { endpoint: Some(server.endpoint.clone()), cache_dir: Some(cache.path().to_path_buf()), ..Default::default() };
    let opts = ScorerOptions { clip_model: "org/clip".into(), dino_model: Some("org/dino".into()), source: source.clone(), device: Device::Cpu };
    let scorer = Scorer::load(&opts).unwrap();
    let img = picture(1);
    assert_eq!(scorer.clip_score(&img, "a dog").unwrap(), t.scorer.clip_score(&img, "a dog").unwrap());
    assert_eq!(scorer.dino.as_ref().unwrap().processor, layerdiff::eval::ImageProcessor::dinov2());
    // a DINOv2 repo as the CLIP model: refused from its config.json, before any weights are fetched
    let wrong = ScorerOptions { clip_model: "org/dino".into(), dino_model: None, ..opts.clone() };
    let before = server.requests().len();
    let err = Scorer::load(&wrong).unwrap_err().to_string();
    assert!(err.contains("org/dino") && err.contains("not a CLIP model"), "{err}");
    assert!(server.requests()[before..].iter().all(|r| !r.contains("model.safetensors")), "{:?}", server.requests());
    drop(server);
    // everything needed is cached
    let offline = ScorerOptions { source: SourceOptions { offline: true, ..source }, ..opts };
    Scorer::load(&offline).unwrap();
}

/// CPU time of each metric at full size, with random weights: CLIP ViT-L/14 (openai/clip-vit-
/// large-patch14's config) and DINOv2-base written in the transformers layout by the tiny
/// writers. Not in CI (it writes 2 GB and takes about a minute):
/// `cargo test --release --test eval_metrics -- --ignored --nocapture full_size`. The folders stay
/// in `$LAYERDIFF_EVAL_FULLSIZE_DIR` (default `/tmp/layerdiff-eval-fullsize`), with the
/// embeddings of one TEdBench photo in `rust.safetensors`, for `tools/eval_fullsize_ref.py`.
#[test]
#[ignore]
fn full_size_timing() {
    use layerdiff::eval::preprocess::ImageProcessor;
    use layerdiff::eval::tiny::{write_clip, write_dinov2};
    use layerdiff::models::clip::ClipConfig;
    use layerdiff::models::dinov2::Dinov2Config;
    use std::time::Instant;
    let root = std::path::PathBuf::from(std::env::var("LAYERDIFF_EVAL_FULLSIZE_DIR").unwrap_or("/tmp/layerdiff-eval-fullsize".into()));
    let (clip_dir, dino_dir) = (root.join("clip-vit-large-patch14-random"), root.join("dinov2-base-random"));
    if !clip_dir.join("model.safetensors").exists() {
        write_clip(&clip_dir, &ClipConfig::vit_large_patch14(), &ImageProcessor::clip(), 0).unwrap();
    }
    if !dino_dir.join("model.safetensors").exists() {
        write_dinov2(&dino_dir, &Dinov2Config::base(), &ImageProcessor::dinov2(), 0).unwrap();
    }
    let opts = ScorerOptions { clip_model: clip_dir.to_str().unwrap().into(), dino_model: Some(dino_dir.to_str().unwrap().into()), source: SourceOptions::default(), device: Device::Cpu };
    let t = Instant::now();
    let s = Scorer::load(&opts).unwrap();
    println!("load both models: {:.2} s", t.elapsed().as_secs_f64());
    let (input, _, _) = timings(&s, 512);
    let dino = s.dino.as_ref().unwrap();
    let text = TEXT;
    let tensors = std::collections::HashMap::from([
        ("image_embeds", s.clip.image_embeds(&[&input]).unwrap()),
        ("text_embeds", s.clip.text_embeds(&[text]).unwrap()),
        ("dino_pooler_output", dino.image_embeds(&[&input]).unwrap()),
        ("clip_pixel_values", s.clip.processor.preprocess(&input, &Device::Cpu).unwrap()),
        ("dino_pixel_values", dino.processor.preprocess(&input, &Device::Cpu).unwrap()),
    ]);
    candle_core::safetensors::save(&tensors, root.join("rust.safetensors")).unwrap();
    std::fs::write(root.join("text.txt"), text).unwrap();
}

const TEXT: &str = "A photo of a tomato in a blue tennis court.";

/// Times each metric on a TEdBench photo (or a made-up picture) at `size`, as if it were the
/// edit's input and a hue-rotated copy its output; returns (input, output, mask).
fn timings(s: &Scorer, size: u32) -> (RgbImage, RgbImage, GrayImage) {
    use layerdiff::eval::preprocess::load_rgb_for_metrics;
    use std::time::Instant;
    let photo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/tedbench/originals/tennis_ball.jpeg");
    let input = if photo.exists() { load_rgb_for_metrics(&photo).unwrap() } else { picture(1) };
    let input = image::imageops::resize(&input, size, size, image::imageops::FilterType::Lanczos3);
    let output = image::imageops::colorops::huerotate(&input, 40);
    let m = GrayImage::from_fn(size, size, |x, y| Luma([if (size / 5..size * 4 / 5).contains(&x) && (size / 4..size * 5 / 6).contains(&y) { 255 } else { 0 }]));
    let text = TEXT;
    let time = |what: &str, runs: usize, f: &mut dyn FnMut()| {
        f(); // warm-up
        let t = Instant::now();
        for _ in 0..runs {
            f();
        }
        println!("{what}: {:.3} s", t.elapsed().as_secs_f64() / runs as f64 / if what.contains("batch of 3") { 3. } else { 1. });
    };
    let dino = s.dino.as_ref().unwrap();
    time("CLIP image embedding, 1 image", 3, &mut || {
        let _ = s.clip.image_embeds(&[&output]).unwrap();
    });
    time("CLIP image embedding, batch of 3 (one output's crops in score), per image", 1, &mut || {
        let _ = s.clip.image_embeds(&[&output, &output, &output]).unwrap();
    });
    time("CLIP text embedding, 1 text", 3, &mut || {
        let _ = s.clip.text_embeds(&[text]).unwrap();
    });
    time("DINOv2 image embedding, 1 image", 3, &mut || {
        let _ = dino.image_embeds(&[&output]).unwrap();
    });
    time("clip_score (1 image + 1 text)", 2, &mut || {
        let _ = s.clip_score(&output, text).unwrap();
    });
    time("subject_fidelity (2 crops, CLIP + DINOv2)", 2, &mut || {
        let _ = s.subject_fidelity(&input, &m, &output).unwrap();
    });
    time("background_fidelity (2 regions, CLIP + DINOv2)", 2, &mut || {
        let _ = s.background_fidelity(&input, &m, &output).unwrap();
    });
    time("image_fidelity (2 images, CLIP + DINOv2)", 2, &mut || {
        let _ = s.image_fidelity(&input, &output).unwrap();
    });
    let reference = s.reference(&input, Some(&m), Some((&input, None))).unwrap();
    time("score: every metric of one output, input side embedded once", 2, &mut || {
        let _ = s.score(&reference, &output, text).unwrap();
    });
    time("reference: the input side, once per input", 1, &mut || {
        let _ = s.reference(&input, Some(&m), Some((&input, None))).unwrap();
    });
    (input, output, m)
}

/// CPU time of each metric on the tiny models: `cargo test --release --test eval_metrics --
/// --ignored --nocapture tiny_timing`.
#[test]
#[ignore]
fn tiny_timing() {
    timings(&tiny().scorer, 512);
}
