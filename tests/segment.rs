//! Segment Anything as a user meets it: tiny checkpoints written by `tiny-model`, loaded from a
//! path, a folder or the hub; `layerdiff segment` and `edit --point/--box`; one-line errors.

#[path = "common/hub_server.rs"]
mod hub_server;

use candle_core::Device;
use hub_server::HubServer;
use image::{GenericImageView, GrayImage, Luma, Rgb, RgbImage};
use layerdiff::segment::{clean_mask, CleanOptions, Multimask, Point, Prompt, SegmentOptions, Segmenter};
use layerdiff::sources::SourceOptions;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn layerdiff(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_layerdiff"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", std::env::temp_dir().join("layerdiff-segment-test-hf-home"))
        .output()
        .expect("runs")
}

fn ok(args: &[&str]) -> String {
    let out = layerdiff(args);
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command that must fail; returns its one-line error.
fn error_of(args: &[&str]) -> String {
    let out = layerdiff(args);
    assert!(!out.status.success(), "{args:?} succeeded");
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    errors[0].to_string()
}

/// `tiny-model --kind`'s checkpoint in a fresh folder.
fn tiny_sam(dir: &Path, kind: &str) -> PathBuf {
    let out = ok(&["tiny-model", "--kind", kind, "--out", dir.to_str().unwrap()]);
    PathBuf::from(out.trim())
}

/// A plain photo with a red disc, 96x64.
fn disc_photo(path: &Path) {
    RgbImage::from_fn(96, 64, |x, y| {
        let d = ((x as f32 - 40.0).powi(2) + (y as f32 - 30.0).powi(2)).sqrt();
        if d < 15.0 { Rgb([220, 30, 30]) } else { Rgb([200, 200, 190]) }
    })
    .save(path)
    .unwrap();
}

fn box_prompt() -> Prompt {
    Prompt { points: vec![], bbox: Some([10.0, 5.0, 90.0, 60.0]) }
}

#[test]
fn tiny_checkpoints_load_from_a_file_a_folder_and_the_hub() {
    let dir = tempfile::tempdir().unwrap();
    let sam = tiny_sam(dir.path(), "sam");
    assert_eq!(sam.file_name().unwrap(), "tiny-sam.safetensors");
    let loaded = Segmenter::load(sam.to_str().unwrap(), &SourceOptions::default(), &Device::Cpu).unwrap();
    assert!(loaded.describe().starts_with("SAM ViT"), "{}", loaded.describe());
    // The same seed writes the same bytes.
    let again = tempfile::tempdir().unwrap();
    assert_eq!(std::fs::read(&sam).unwrap(), std::fs::read(tiny_sam(again.path(), "sam")).unwrap());

    let mobile_dir = tempfile::tempdir().unwrap();
    tiny_sam(mobile_dir.path(), "mobile-sam");
    let mobile = Segmenter::load(mobile_dir.path().to_str().unwrap(), &SourceOptions::default(), &Device::Cpu).unwrap();
    assert!(mobile.describe().starts_with("MobileSAM TinyViT"), "{}", mobile.describe());

    let files = hub_server::RepoFiles::from([("weights/tiny-sam.safetensors".to_string(), std::fs::read(&sam).unwrap())]);
    let server = HubServer::start([("org/sam".to_string(), files)].into(), None);
    let cache = tempfile::tempdir().unwrap();
    let opts = SourceOptions { endpoint: Some(server.endpoint.clone()), cache_dir: Some(cache.path().to_path_buf()), ..Default::default() };
    let hub = Segmenter::load("org/sam/weights/tiny-sam.safetensors", &opts, &Device::Cpu).unwrap();
    assert_eq!(std::fs::read(&hub.path).unwrap(), std::fs::read(&sam).unwrap());
    assert!(server.requests().iter().any(|r| r.contains("/org/sam/resolve/main/weights/tiny-sam.safetensors")), "{:?}", server.requests());
    // Downloaded once, it loads from the cache offline.
    let offline = SourceOptions { offline: true, ..opts.clone() };
    assert_eq!(Segmenter::load("org/sam/weights/tiny-sam.safetensors", &offline, &Device::Cpu).unwrap().path, hub.path);
    let err = Segmenter::load("org/sam/missing.safetensors", &opts, &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("org/sam/missing.safetensors") && err.contains("not in the repo"), "{err}");
}

#[test]
fn segmenting_thresholds_the_upsampled_logits_and_cleans_them() {
    let dir = tempfile::tempdir().unwrap();
    let sam = Segmenter::load(tiny_sam(dir.path(), "sam").to_str().unwrap(), &SourceOptions::default(), &Device::Cpu).unwrap();
    let photo_path = dir.path().join("disc.png");
    disc_photo(&photo_path);
    let photo = image::open(&photo_path).unwrap().to_rgb8();
    let embedding = sam.embed(&photo).unwrap();
    for (prompt, multimask) in [
        (box_prompt(), false),
        (Prompt { points: vec![Point { x: 40.0, y: 30.0, foreground: true }, Point { x: 85.0, y: 55.0, foreground: false }], bbox: None }, true),
        (Prompt { points: vec![Point { x: 40.0, y: 30.0, foreground: true }], bbox: Some([20.0, 10.0, 60.0, 50.0]) }, false),
    ] {
        let (logits, iou) = sam.mask_logits(&embedding, &prompt, multimask).unwrap();
        assert_eq!(logits.len(), 96 * 64);
        let binary = GrayImage::from_fn(96, 64, |x, y| Luma([if logits[(y * 96 + x) as usize] > 0.0 { 255 } else { 0 }]));
        let expected = clean_mask(&binary, &prompt, &CleanOptions::default());
        let opts = SegmentOptions { multimask: if multimask { Multimask::On } else { Multimask::Off }, clean: CleanOptions::default() };
        match sam.segment(&embedding, &prompt, &opts) {
            Ok(seg) => {
                assert_eq!(seg.mask, expected);
                assert_eq!(seg.iou, iou);
            }
            Err(e) => {
                assert!(expected.pixels().all(|p| p.0[0] == 0), "{e}");
                assert!(e.to_string().contains("the mask came out empty"), "{e}");
            }
        }
    }
}

#[test]
fn segment_writes_the_mask_and_its_overlay_at_the_photos_size() {
    let dir = tempfile::tempdir().unwrap();
    let sam = tiny_sam(dir.path(), "mobile-sam");
    let photo = dir.path().join("disc.png");
    disc_photo(&photo);
    let mask = dir.path().join("out/mask.png");
    let (sam_s, photo_s, mask_s) = (sam.to_str().unwrap(), photo.to_str().unwrap(), mask.to_str().unwrap());
    let stdout = ok(&["segment", "--image", photo_s, "--box", "10,5,90,60", "--point", "40,30", "--sam-model", sam_s, "--out", mask_s]);
    let overlay = dir.path().join("out/mask-overlay.png");
    assert_eq!(stdout.lines().collect::<Vec<_>>(), [mask_s, overlay.to_str().unwrap()]);
    let written = image::open(&mask).unwrap().to_luma8();
    assert_eq!(written.dimensions(), (96, 64));
    assert!(written.pixels().all(|p| p.0[0] == 0 || p.0[0] == 255));
    assert!(written.pixels().any(|p| p.0[0] == 255));
    assert_eq!(image::open(&overlay).unwrap().dimensions(), (96, 64));

    // The library gives the same mask.
    let segmenter = Segmenter::load(sam_s, &SourceOptions::default(), &Device::Cpu).unwrap();
    let prompt = Prompt { points: vec![Point { x: 40.0, y: 30.0, foreground: true }], bbox: Some([10.0, 5.0, 90.0, 60.0]) };
    let seg = segmenter.segment(&segmenter.embed(&image::open(&photo).unwrap().to_rgb8()).unwrap(), &prompt, &SegmentOptions::default()).unwrap();
    assert_eq!(seg.mask, written);
}

#[test]
fn segment_input_errors_are_one_line_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let sam = tiny_sam(dir.path(), "sam");
    let photo = dir.path().join("disc.png");
    disc_photo(&photo);
    let mask = dir.path().join("mask.png");
    let (sam_s, photo_s, mask_s) = (sam.to_str().unwrap(), photo.to_str().unwrap(), mask.to_str().unwrap());
    let run = |extra: &[&str]| {
        let mut args = vec!["segment", "--image", photo_s, "--sam-model", sam_s, "--out", mask_s];
        args.extend_from_slice(extra);
        error_of(&args)
    };
    let e = run(&["--point", "100,10"]);
    assert!(e.contains("--point 100,10") && e.contains("outside the image (96x64)"), "{e}");
    let e = run(&["--box", "50,10,40,60"]);
    assert!(e.contains("--box") && e.contains("not ordered"), "{e}");
    let e = run(&[]);
    assert!(e.contains("no prompt") && e.contains("--point x,y"), "{e}");
    let e = run(&["--point", "12"]);
    assert!(e.contains("give x,y"), "{e}");
    let e = error_of(&["segment", "--image", "Cargo.toml", "--point", "1,1", "--sam-model", sam_s, "--out", mask_s]);
    assert!(e.contains("Cargo.toml") && e.contains("image"), "{e}");
    let unet = "tests/fixtures/tiny-sd/unet/diffusion_pytorch_model.safetensors";
    let e = error_of(&["segment", "--image", photo_s, "--point", "1,1", "--sam-model", unet, "--out", mask_s]);
    assert!(e.contains(unet) && e.contains("unknown checkpoint layout") && e.contains("lmz/candle-sam"), "{e}");
    assert!(!mask.exists());
}

#[test]
fn edit_makes_its_subject_mask_from_a_box() {
    let dir = tempfile::tempdir().unwrap();
    let sam = tiny_sam(dir.path(), "sam");
    let out = dir.path().join("edit");
    let args = [
        "edit", "--model", "assets/tiny-sd", "--image", "assets/demo/dog.png", "--box", "30,20,220,230",
        "--sam-model", sam.to_str().unwrap(), "--object", "a jumping dog", "--background", "a dense forest",
        "--size", "64", "--embedding-steps", "2", "--finetune-steps", "1", "--steps", "2", "--seeds", "1",
        "--out", out.to_str().unwrap(),
    ];
    let run = layerdiff(&args);
    let stderr = String::from_utf8_lossy(&run.stderr);
    if !run.status.success() {
        // Random weights may select all or nothing; the error must then say so about the SAM mask.
        assert!(stderr.contains("sam-mask.png") || stderr.contains("the mask came out empty"), "{stderr}");
        return;
    }
    for f in ["sam-mask.png", "sam-mask-overlay.png", "mask.png", "edit-1.png"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let info: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("session.json")).unwrap()).unwrap();
    assert_eq!(info["request"]["mask"], out.join("sam-mask.png").to_str().unwrap());
    let photo = image::open("assets/demo/dog.png").unwrap();
    assert_eq!(image::open(out.join("sam-mask.png")).unwrap().dimensions(), (photo.width(), photo.height()));
}

#[test]
fn edit_prompt_errors_come_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("edit");
    let base = ["edit", "--model", "assets/tiny-sd", "--image", "assets/demo/dog.png", "--object", "a dog", "--background", "a forest", "--out", out.to_str().unwrap()];
    let with = |extra: &[&str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        error_of(&args)
    };
    let e = with(&["--point", "5000,10"]);
    assert!(e.contains("--point 5000,10") && e.contains("outside the image"), "{e}");
    let e = with(&["--mask", "assets/demo/dog-mask.png", "--point", "10,10"]);
    assert!(e.contains("--mask") && e.contains("--point"), "{e}");
    let mut args = base.to_vec();
    args.extend_from_slice(&["--box", "10,10,20,20", "--background-point", "3,3"]);
    let e = String::from_utf8_lossy(&layerdiff(&args).stderr).into_owned();
    assert!(e.contains("required arguments were not provided") && e.contains("--background-image"), "{e}");
    assert!(!out.join("session.json").exists());
}

/// The official `SamPredictor` from photo to logits (tools/make_sam_predictor_fixture.py): the
/// longest-side resize, the prompt's mapping into the model's frame, and the upsampling back.
#[test]
fn mask_logits_match_the_official_predictor() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sam");
    let sam = Segmenter::load(root.join("tiny-sam.safetensors").to_str().unwrap(), &SourceOptions::default(), &Device::Cpu).unwrap();
    let bytes = std::fs::read(root.join("predictor.safetensors")).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let cases: serde_json::Value = serde_json::from_str(&header.metadata().as_ref().unwrap()["cases"]).unwrap();
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
    for case in cases.as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let photo = &tensors[&format!("{name}.photo")];
        let (h, w, _) = photo.dims3().unwrap();
        let photo = RgbImage::from_raw(w as u32, h as u32, photo.flatten_all().unwrap().to_vec1::<u8>().unwrap()).unwrap();
        let f = |v: &serde_json::Value| v.as_f64().unwrap() as f32;
        let prompt = Prompt {
            points: case["points"].as_array().unwrap().iter().map(|p| Point { x: f(&p[0]), y: f(&p[1]), foreground: p[2] == 1 }).collect(),
            bbox: case["box"].as_array().map(|b| [f(&b[0]), f(&b[1]), f(&b[2]), f(&b[3])]),
        };
        let (logits, iou) = sam.mask_logits(&sam.embed(&photo).unwrap(), &prompt, case["multimask"].as_bool().unwrap()).unwrap();
        let expected = tensors[&format!("{name}.logits")].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let expected_iou = tensors[&format!("{name}.iou")].to_vec1::<f32>().unwrap()[0];
        let max_err = logits.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let signs_agree = logits.iter().zip(&expected).filter(|(a, b)| (**a > 0.0) == (**b > 0.0)).count() as f64 / expected.len() as f64;
        println!("{name}: max |logit error| {max_err:.2e}, iou error {:.2e}, mask agreement {:.4}", (iou - expected_iou).abs(), signs_agree);
        if name.starts_with("exact") {
            assert!(max_err < 1e-4 && (iou - expected_iou).abs() < 1e-4, "{name}: {max_err}");
        } else {
            // PIL's bilinear resize and the image crate's triangle filter differ by a level here
            // and there; the model sees almost the same photo.
            assert!(max_err < 2e-2 && (iou - expected_iou).abs() < 2e-2 && signs_agree > 0.99, "{name}: {max_err} {signs_agree}");
        }
    }
}

/// A SAM whose mask decoder outputs 0 everywhere selects nothing: the error says so and suggests
/// another prompt, and no file is written.
#[test]
fn an_empty_mask_is_an_error_that_suggests_another_point() {
    let dir = tempfile::tempdir().unwrap();
    let sam = tiny_sam(dir.path(), "sam");
    let bytes = std::fs::read(&sam).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
    // Zero hypernetwork outputs make every mask logit exactly 0, which is not > 0.
    for (name, t) in tensors.iter_mut() {
        if name.starts_with("mask_decoder.output_hypernetworks_mlps.") && name.contains(".layers.2.") {
            *t = t.zeros_like().unwrap();
        }
    }
    let silent = dir.path().join("silent.safetensors");
    safetensors::serialize_to_file(tensors.iter().map(|(k, v)| (k.as_str(), v)), header.metadata().clone(), &silent).unwrap();
    let photo = dir.path().join("disc.png");
    disc_photo(&photo);
    let mask = dir.path().join("mask.png");
    let e = error_of(&["segment", "--image", photo.to_str().unwrap(), "--point", "40,30", "--sam-model", silent.to_str().unwrap(), "--out", mask.to_str().unwrap()]);
    assert!(e.contains("disc.png") && e.contains("the mask came out empty") && e.contains("try another point"), "{e}");
    assert!(!mask.exists());
}
