//! The metric models and their preprocessing against transformers 5.23.0 (fixtures from
//! tools/make_eval_fixtures.py; tests/fixtures/eval/README.md): CLIP image and text embeddings,
//! DINOv2 class tokens (with interpolated positions), and CLIPImageProcessor / BitImageProcessor
//! on real TEdBench photos.

use candle_core::{DType, Device, Tensor};
use layerdiff::eval::models::{MetricModelKind, TransformersFiles};
use layerdiff::eval::preprocess::{load_rgb_for_metrics, pil_resize, ImageProcessor, Resample, ResizeTo, IMAGENET_MEAN, IMAGENET_STD};
use layerdiff::models::clip::{ClipConfig, ClipModel};
use layerdiff::models::clip_text::Activation;
use layerdiff::models::dinov2::{Dinov2Config, Dinov2Model};
use layerdiff::sources::SourceOptions;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const TOL: f32 = 1e-4;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixtures() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(root().join("tests/fixtures/eval/parity.safetensors"), &Device::Cpu).unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn check(what: &str, ours: &Tensor, theirs: &Tensor) {
    let err = max_abs(ours, theirs);
    println!("{what}: max abs error {err:.2e}");
    assert!(err <= TOL, "{what}: max abs error {err}");
}

fn files(folder: &str, kind: MetricModelKind) -> TransformersFiles {
    TransformersFiles::resolve(root().join("tests/fixtures").join(folder).to_str().unwrap(), kind, &SourceOptions::default()).unwrap()
}

fn clip(config_change: impl FnOnce(&mut ClipConfig)) -> ClipModel {
    let f = files("clip-tiny", MetricModelKind::Clip);
    let mut config = ClipConfig::from_json(&f.config).unwrap();
    config_change(&mut config);
    ClipModel::new(f.var_builder(DType::F32, &Device::Cpu).unwrap(), config).unwrap()
}

fn dino(folder: &str) -> Dinov2Model {
    let f = files(folder, MetricModelKind::Dinov2);
    Dinov2Model::new(f.var_builder(DType::F32, &Device::Cpu).unwrap(), Dinov2Config::from_json(&f.config).unwrap()).unwrap()
}

/// The TEdBench photos the fixtures were made from (not copied into the repository).
fn photos_dir() -> Option<PathBuf> {
    let dir = root().join("../shared/data/tedbench/originals");
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!("SKIPPED: {} is missing, so the photo cases were not run", dir.display());
        None
    }
}

#[test]
fn clip_image_and_text_embeddings_match_transformers() {
    let t = fixtures();
    let model = clip(|_| {});
    assert_eq!(model.config().text_eos_token_id, 300);
    check("clip image_embeds (quick_gelu)", &model.get_image_features(&t["clip.pixel_values"]).unwrap(), &t["clip.image_embeds"]);
    check("clip text_embeds (first eos_token_id)", &model.get_text_features(&t["clip.input_ids"]).unwrap(), &t["clip.text_embeds"]);

    let gelu = clip(|c| c.vision.hidden_act = Activation::Gelu);
    check("clip image_embeds (gelu)", &gelu.get_image_features(&t["clip.pixel_values"]).unwrap(), &t["clip.image_embeds_gelu"]);
    let argmax = clip(|c| c.text_eos_token_id = 2);
    check("clip text_embeds (eos_token_id 2: argmax)", &argmax.get_text_features(&t["clip.input_ids"]).unwrap(), &t["clip.text_embeds_argmax"]);
    // exp(2.6592) = 14.29
    assert!((model.logit_scale().unwrap().unwrap() - 2.6592f32.exp()).abs() < 1e-3);
}

#[test]
fn dinov2_class_tokens_match_transformers_with_interpolated_positions() {
    let t = fixtures();
    for (prefix, folder, cases) in [
        ("dino", "dinov2-tiny", &["native", "small", "wide", "odd"][..]),
        ("swiglu", "dinov2-swiglu-tiny", &["native", "wide"][..]),
    ] {
        let model = dino(folder);
        for case in cases {
            let x = &t[&format!("{prefix}.{case}.pixel_values")];
            check(&format!("{prefix} {case} {:?} pooler_output", x.dims()), &model.pooler_output(x).unwrap(), &t[&format!("{prefix}.{case}.pooler_output")]);
            if let Some(expected) = t.get(&format!("{prefix}.{case}.last_hidden_state")) {
                check(&format!("{prefix} {case} last_hidden_state"), &model.forward(x).unwrap(), expected);
            }
        }
    }
}

#[test]
fn preprocessor_configs_are_read_from_the_folders() {
    let clip = files("clip-tiny", MetricModelKind::Clip);
    let p = ImageProcessor::from_json(clip.preprocessor_config.as_ref().unwrap(), "clip", ImageProcessor::dinov2()).unwrap();
    assert_eq!(p, ImageProcessor { size: ResizeTo::ShortestEdge(32), crop_size: (32, 32), ..ImageProcessor::clip() });
    let dino = files("dinov2-tiny", MetricModelKind::Dinov2);
    let p = ImageProcessor::from_json(dino.preprocessor_config.as_ref().unwrap(), "dino", ImageProcessor::clip()).unwrap();
    assert_eq!((p.size, p.crop_size, p.image_mean, p.image_std), (ResizeTo::ShortestEdge(36), (32, 32), IMAGENET_MEAN, IMAGENET_STD));
}

/// `(level / 255 - mean) / std` back to the level, per value.
fn to_levels(pixel_values: &Tensor, p: &ImageProcessor) -> Vec<f32> {
    let (c, h, w) = pixel_values.dims3().unwrap();
    let v = pixel_values.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    (0..c * h * w).map(|i| (v[i] * p.image_std[i / (h * w)] + p.image_mean[i / (h * w)]) * 255.).collect()
}

#[test]
fn photos_through_the_tiny_processors_and_models_match_transformers() {
    let Some(dir) = photos_dir() else { return };
    let t = fixtures();
    let (clip_files, dino_files) = (files("clip-tiny", MetricModelKind::Clip), files("dinov2-tiny", MetricModelKind::Dinov2));
    let clip_proc = ImageProcessor::from_json(clip_files.preprocessor_config.as_ref().unwrap(), "clip", ImageProcessor::clip()).unwrap();
    let dino_proc = ImageProcessor::from_json(dino_files.preprocessor_config.as_ref().unwrap(), "dino", ImageProcessor::dinov2()).unwrap();
    let (clip_model, dino_model) = (clip(|_| {}), dino("dinov2-tiny"));
    for name in ["tennis_ball.jpeg", "milk_cookie.jpeg", "dog2_standing.png"] {
        let key = name.replace('.', "_");
        let img = load_rgb_for_metrics(&dir.join(name)).unwrap();
        for (kind, proc) in [("clip_tiny", &clip_proc), ("dino_tiny", &dino_proc)] {
            let theirs = t[&format!("photo.{key}.{kind}.pixel_values")].squeeze(0).unwrap();
            let ours = proc.preprocess(&img, &Device::Cpu).unwrap();
            let worst = to_levels(&ours, proc).iter().zip(to_levels(&theirs, proc)).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            println!("{name} {kind}: preprocessing within {worst:.3} levels of transformers");
            assert!(worst <= decode_tolerance(name).max(1.) + 1e-3, "{name} {kind}: {worst} levels");
            let (theirs, ours) = (theirs.unsqueeze(0).unwrap(), ours.unsqueeze(0).unwrap());
            let (expected, from_theirs, from_ours) = match kind {
                "clip_tiny" => (
                    &t[&format!("photo.{key}.clip_tiny.image_embeds")],
                    clip_model.get_image_features(&theirs).unwrap(),
                    clip_model.get_image_features(&ours).unwrap(),
                ),
                _ => (
                    &t[&format!("photo.{key}.dino_tiny.pooler_output")],
                    dino_model.pooler_output(&theirs).unwrap(),
                    dino_model.pooler_output(&ours).unwrap(),
                ),
            };
            check(&format!("{name} {kind} embedding of transformers' pixels"), &from_theirs, expected);
            println!("{name} {kind}: embedding of our pixels within {:.2e}", max_abs(&from_ours, expected));
        }
    }
}

/// Levels our pixels may differ by from transformers': none. PNG decoders agree, JPEGs are
/// decoded by libjpeg-turbo's code as Pillow decodes them (`image_io::load_image`), and the
/// resize is Pillow's.
fn decode_tolerance(_photo: &str) -> f32 {
    0.
}

#[test]
fn resize_is_pillows_byte_for_byte() {
    let t = fixtures();
    let src = &t["resize.src"];
    let (h, w, _) = src.dims3().unwrap();
    let src = image::RgbImage::from_raw(w as u32, h as u32, src.flatten_all().unwrap().to_vec1::<u8>().unwrap()).unwrap();
    let mut cases = 0;
    for (name, expected) in t.iter().filter(|(k, _)| k.starts_with("resize.") && *k != "resize.src") {
        let (_, filter, size) = (name.split('.').next(), name.split('.').nth(1).unwrap(), name.split('.').nth(2).unwrap());
        let (ow, oh) = size.split_once('x').map(|(a, b)| (a.parse::<u32>().unwrap(), b.parse::<u32>().unwrap())).unwrap();
        let filter = match filter {
            "bicubic" => Resample::Bicubic,
            "lanczos" => Resample::Lanczos,
            "bilinear" => Resample::Bilinear,
            "box" => Resample::Box,
            "hamming" => Resample::Hamming,
            f => panic!("{f}"),
        };
        let ours = pil_resize(&src, ow, oh, filter);
        assert_eq!(ours.as_raw(), &expected.flatten_all().unwrap().to_vec1::<u8>().unwrap(), "{name}");
        cases += 1;
    }
    assert_eq!(cases, 8);
}

#[derive(serde::Deserialize)]
struct Case {
    photo: String,
    processor: String,
    pil_levels: String,
    torchvision_minus_pil: Sparse,
}

#[derive(serde::Deserialize)]
struct Sparse {
    index: Vec<usize>,
    delta: Vec<i16>,
}

/// CLIPImageProcessor (openai/clip-vit-*) and BitImageProcessor (facebook/dinov2-*) at full
/// size: our resize is Pillow's, so the PIL backend's levels come out exactly; transformers 5's
/// default torchvision backend is within one level.
#[test]
fn full_size_preprocessing_matches_both_transformers_backends() {
    let Some(dir) = photos_dir() else { return };
    let fix = root().join("tests/fixtures/eval");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fix.join("preprocess.json")).unwrap()).unwrap();
    let cases: Vec<Case> = serde_json::from_value(report["cases"].clone()).unwrap();
    assert_eq!(cases.len(), 6);
    for case in cases {
        let proc = if case.processor == "clip" { ImageProcessor::clip() } else { ImageProcessor::dinov2() };
        let img = load_rgb_for_metrics(&dir.join(&case.photo)).unwrap();
        let ours = proc.resize_and_crop(&img);
        let pil = image::open(fix.join(&case.pil_levels)).unwrap().to_rgb8();
        assert_eq!(ours.dimensions(), (224, 224));
        // channels-first levels, as the fixture's indices count them
        let chw = |img: &image::RgbImage| -> Vec<i16> { (0..3).flat_map(|c| img.pixels().map(move |p| p.0[c] as i16)).collect() };
        let (ours_l, pil_l) = (chw(&ours), chw(&pil));
        let mut tv_l = pil_l.clone();
        for (&i, &d) in case.torchvision_minus_pil.index.iter().zip(&case.torchvision_minus_pil.delta) {
            tv_l[i] += d;
        }
        let stats = |theirs: &[i16]| {
            let diff: Vec<i16> = ours_l.iter().zip(theirs).map(|(a, b)| (a - b).abs()).collect();
            (diff.iter().copied().max().unwrap(), diff.iter().filter(|&&d| d != 0).count() as f64 / diff.len() as f64)
        };
        let ((pil_max, pil_frac), (tv_max, tv_frac)) = (stats(&pil_l), stats(&tv_l));
        println!(
            "{} {}: vs PIL backend max {pil_max} level ({:.3} % differ); vs torchvision backend max {tv_max} level ({:.3} % differ)",
            case.photo, case.processor, 100. * pil_frac, 100. * tv_frac
        );
        let tol = decode_tolerance(&case.photo) as i16;
        if tol == 0 {
            assert_eq!(pil_max, 0, "{} {}: Pillow's resize is not reproduced exactly", case.photo, case.processor);
        }
        assert!(pil_max <= tol.max(1) && tv_max <= tol.max(1), "{} {}", case.photo, case.processor);
        // normalized values: within one level, 1/255/std
        let pv = proc.preprocess(&img, &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let n = 224 * 224;
        for (i, (&v, &level)) in pv.iter().zip(&tv_l).enumerate() {
            let c = i / n;
            let expected = (level as f32 / 255. - proc.image_mean[c]) / proc.image_std[c];
            let levels = tol.max(1) as f32;
            assert!((v - expected).abs() <= levels / 255. / proc.image_std[c] + 1e-5, "{} {} value {i}", case.photo, case.processor);
        }
    }
}

#[test]
fn a_model_of_the_wrong_kind_is_a_one_line_error() {
    let dino_dir = root().join("tests/fixtures/dinov2-tiny");
    let err = TransformersFiles::resolve(dino_dir.to_str().unwrap(), MetricModelKind::Clip, &SourceOptions::default()).unwrap_err().to_string();
    assert!(err.contains("`dinov2` model, not a CLIP model"), "{err}");
    assert!(!err.contains('\n'));
    let clip_dir = root().join("tests/fixtures/clip-tiny");
    let err = TransformersFiles::resolve(clip_dir.to_str().unwrap(), MetricModelKind::Dinov2, &SourceOptions::default()).unwrap_err().to_string();
    assert!(err.contains("`clip` model, not a DINOv2 model"), "{err}");
    let err = TransformersFiles::resolve(Path::new("/nonexistent/x").to_str().unwrap(), MetricModelKind::Clip, &SourceOptions::default()).unwrap_err().to_string();
    assert!(err.contains("no such file or directory"), "{err}");
}

/// `layerdiff tiny-model --kind clip|dinov2`'s writers: the folders load as metric models and
/// embed; the same seed writes the same bytes.
#[test]
fn tiny_metric_models_load_and_embed() {
    use layerdiff::eval::{write_tiny_clip, write_tiny_dinov2, ClipEmbedder, DinoEmbedder};
    let dir = tempfile::tempdir().unwrap();
    let (clip_dir, dino_dir) = (dir.path().join("clip"), dir.path().join("dino"));
    write_tiny_clip(&clip_dir, 3).unwrap();
    write_tiny_dinov2(&dino_dir, 3).unwrap();
    let img = image::RgbImage::from_fn(50, 40, |x, y| image::Rgb([(x * 5) as u8, (y * 6) as u8, 128]));
    let opts = SourceOptions::default();
    let clip = ClipEmbedder::load(clip_dir.to_str().unwrap(), &opts, &Device::Cpu).unwrap();
    assert_eq!(clip.image_embeds(&[&img, &img]).unwrap().dims(), &[2, 16]);
    assert_eq!(clip.text_embeds(&["a photo of a dog", ""]).unwrap().dims(), &[2, 16]);
    let dino = DinoEmbedder::load(dino_dir.to_str().unwrap(), &opts, &Device::Cpu).unwrap();
    assert_eq!(dino.image_embeds(&[&img]).unwrap().dims(), &[1, 32]);
    let again = dir.path().join("again");
    write_tiny_dinov2(&again, 3).unwrap();
    assert_eq!(std::fs::read(again.join("model.safetensors")).unwrap(), std::fs::read(dino_dir.join("model.safetensors")).unwrap());
    if let Ok(keep) = std::env::var("LAYERDIFF_KEEP_TINY_METRIC_MODELS") {
        for (from, to) in [(&clip_dir, "clip"), (&dino_dir, "dino")] {
            let to = Path::new(&keep).join(to);
            std::fs::create_dir_all(&to).unwrap();
            for f in std::fs::read_dir(from).unwrap() {
                let f = f.unwrap().path();
                std::fs::copy(&f, to.join(f.file_name().unwrap())).unwrap();
            }
        }
    }
}
