//! The command line as a user meets it: the demo, the tiny-model writer, and one-line errors that
//! leave nothing partial behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn layerdiff(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_layerdiff"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", std::env::temp_dir().join("layerdiff-cli-test-hf-home"))
        .output()
        .expect("runs")
}

fn tiny_sd() -> String {
    format!("{}/tests/fixtures/tiny-sd", env!("CARGO_MANIFEST_DIR"))
}

fn demo_model() -> String {
    format!("{}/assets/tiny-sd", env!("CARGO_MANIFEST_DIR"))
}

/// Runs a command that must fail; returns its one-line error.
fn error_of(args: &[&str]) -> String {
    let out = layerdiff(args);
    assert!(!out.status.success(), "{args:?} succeeded");
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let last = stderr.lines().last().unwrap_or_default().to_string();
    assert!(last.starts_with("error: "), "{stderr}");
    last
}

fn generate_args<'a>(model: &'a str, out: &'a str) -> Vec<&'a str> {
    vec!["generate", "--model", model, "--prompt", "a photo of a dog", "--width", "64", "--height", "64", "--steps", "2", "--seed", "1", "--out", out]
}

#[test]
fn readme_demo_writes_a_png_of_the_asked_size() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo.png");
    let model = demo_model();
    let status = layerdiff(&generate_args(&model, out.to_str().unwrap()));
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let img = image::open(&out).unwrap();
    assert_eq!((img.width(), img.height()), (64, 64));
}

#[test]
fn num_images_writes_numbered_files_that_differ() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let model = tiny_sd();
    let mut args = generate_args(&model, out.to_str().unwrap());
    args.extend(["--num-images", "2"]);
    assert!(layerdiff(&args).status.success());
    let a = image::open(dir.path().join("x-0.png")).unwrap();
    let b = image::open(dir.path().join("x-1.png")).unwrap();
    assert_ne!(a.as_bytes(), b.as_bytes());
}

#[test]
fn tiny_model_is_deterministic_and_loads() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, seed: &str| {
        let path = dir.path().join(name);
        assert!(layerdiff(&["tiny-model", "--out", path.to_str().unwrap(), "--seed", seed]).status.success());
        path
    };
    let (a, b, c) = (write("a", "5"), write("b", "5"), write("c", "6"));
    let unet = |p: &Path| std::fs::read(p.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    assert_eq!(unet(&a), unet(&b));
    assert_ne!(unet(&a), unet(&c));
    for f in ["model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json", "text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt"] {
        assert!(a.join(f).is_file(), "{f} missing");
    }
    let out = dir.path().join("o.png");
    assert!(layerdiff(&generate_args(a.to_str().unwrap(), out.to_str().unwrap())).status.success());
}

#[test]
fn tiny_model_config_overrides_apply() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cfg.json");
    std::fs::write(&cfg, r#"{"unet": {"block_out_channels": [16, 32, 32]}}"#).unwrap();
    let out = dir.path().join("m");
    assert!(layerdiff(&["tiny-model", "--out", out.to_str().unwrap(), "--config", cfg.to_str().unwrap()]).status.success());
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("unet/config.json")).unwrap()).unwrap();
    assert_eq!(config["block_out_channels"], serde_json::json!([16, 32, 32]));
}

#[test]
fn bad_inputs_give_one_line_errors_and_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("never.png");
    let out_s = out.to_str().unwrap().to_string();
    let model = tiny_sd();
    let ckpt = dir.path().join("model.ckpt");
    std::fs::write(&ckpt, b"PK\x03\x04 pickle").unwrap();
    let bad_image = dir.path().join("bad.png");
    std::fs::write(&bad_image, b"not a png").unwrap();
    let missing = dir.path().join("no-such-model");

    let (missing, ckpt, bad_image) = (missing.to_str().unwrap(), ckpt.to_str().unwrap(), bad_image.to_str().unwrap());
    // (model, width, steps, extra flags, what the error must name)
    let cases: [(&str, &str, &str, &[&str], &str); 7] = [
        (missing, "64", "2", &[], "no-such-model"),
        (ckpt, "64", "2", &[], "safetensors"),
        ("some-org/not-cached-model", "64", "2", &[], "offline"),
        (&model, "60", "2", &[], "--width"),
        (&model, "64", "0", &[], "--steps"),
        (&model, "64", "2", &["--init-image", bad_image], "bad.png"),
        (&model, "64", "2", &["--cpu", "--dtype", "bf16"], "bf16"),
    ];
    for (model, width, steps, extra, must_mention) in cases {
        let mut args = vec!["generate", "--model", model, "--prompt", "x", "--width", width, "--height", "64", "--steps", steps, "--out", &out_s];
        args.extend_from_slice(extra);
        let err = error_of(&args);
        assert!(err.contains(must_mention), "{args:?}: {err}");
        assert!(!out.exists(), "{args:?} wrote an output");
    }
}

#[test]
fn incomplete_model_directory_names_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("m");
    copy_dir(Path::new(&tiny_sd()), &copy);
    std::fs::remove_file(copy.join("vae/config.json")).unwrap();
    let out = dir.path().join("o.png");
    let err = error_of(&generate_args(copy.to_str().unwrap(), out.to_str().unwrap()));
    assert!(err.contains("vae"), "{err}");
    assert!(!out.exists());
}

#[test]
fn truncated_weights_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("m");
    copy_dir(Path::new(&tiny_sd()), &copy);
    let weights = copy.join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let out = dir.path().join("o.png");
    let err = error_of(&generate_args(copy.to_str().unwrap(), out.to_str().unwrap()));
    assert!(err.contains("diffusion_pytorch_model.safetensors"), "{err}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target: PathBuf = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// The README's edit demo (the trained toy model), with fewer steps.
fn edit_args(out: &str) -> Vec<&str> {
    vec![
        "edit", "--model", "assets/toy-sd", "--image", "assets/demo/toy-scene.png", "--mask", "assets/demo/toy-mask.png",
        "--object", "a large green triangle on the left", "--background", "a horizontal stripes background", "--size", "32",
        "--embedding-steps", "4", "--finetune-steps", "2", "--finetune-lr", "1e-4", "--steps", "3", "--guidance-scale", "3",
        "--seeds", "1,2", "--out", out,
    ]
}

fn layerdiff_in_repo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_layerdiff")).args(args).current_dir(env!("CARGO_MANIFEST_DIR")).output().expect("runs")
}

#[test]
fn edit_demo_writes_the_session_and_sample_reproduces_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("edit");
    let out_s = out.to_str().unwrap();
    let run = layerdiff_in_repo(&edit_args(out_s));
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    for f in ["edit-1.png", "edit-2.png", "sheet.png", "mask.png", "background.png", "session.json", "session.safetensors"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let info: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("session.json")).unwrap()).unwrap();
    assert_eq!(info["progress"], "done");
    assert_eq!(info["request"]["object"], "a large green triangle on the left");
    assert_eq!(info["request"]["settings"]["alpha"], 0.7);
    assert_eq!(info["request"]["settings"]["guidance_period"], 2);
    assert_eq!(info["losses"]["stage1"].as_array().unwrap().len(), 4);
    assert_eq!(image::open(out.join("edit-1.png")).unwrap().width(), 32);

    // A second edit into the same folder is refused, unless --force.
    let err = String::from_utf8_lossy(&layerdiff_in_repo(&edit_args(out_s)).stderr).to_string();
    assert!(err.contains("holds another edit") && err.contains("--force"), "{err}");
    // A finished edit cannot be resumed.
    let err = String::from_utf8_lossy(&layerdiff_in_repo(&["edit", "--resume", out_s]).stderr).to_string();
    assert!(err.contains("finished") && err.contains("layerdiff sample"), "{err}");

    let more = dir.path().join("more");
    let run = layerdiff_in_repo(&["sample", "--session", out_s, "--seeds", "2", "--out", more.to_str().unwrap()]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert_eq!(std::fs::read(more.join("edit-2.png")).unwrap(), std::fs::read(out.join("edit-2.png")).unwrap());
}

/// `--gradient-checkpointing` is recorded in the session and trains as the plain backward does:
/// the same stage-2 losses to f32 rounding (its forward runs on the detached weights, whose
/// layers may take other kernels than trainable ones).
#[test]
fn edit_with_gradient_checkpointing_takes_the_same_steps() {
    let dir = tempfile::tempdir().unwrap();
    let stage2 = |name: &str, extra: &[&str]| -> (Vec<f64>, serde_json::Value) {
        let out = dir.path().join(name);
        let mut args = edit_args(out.to_str().unwrap());
        args.extend_from_slice(extra);
        let run = layerdiff_in_repo(&args);
        assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
        let info: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("session.json")).unwrap()).unwrap();
        let losses = info["losses"]["stage2"].as_array().unwrap().iter().map(|l| l["loss"].as_f64().unwrap()).collect();
        (losses, info["request"]["settings"]["gradient_checkpointing"].clone())
    };
    let (plain, flag) = stage2("plain", &[]);
    assert_eq!(flag, false);
    let (checkpointed, flag) = stage2("checkpointed", &["--gradient-checkpointing"]);
    assert_eq!(flag, true);
    assert_eq!(plain.len(), 2);
    for (a, b) in plain.iter().zip(&checkpointed) {
        assert!((a - b).abs() <= 1e-5 * a.abs(), "stage 2 loss {a} vs {b}");
    }
}

#[test]
fn edit_input_errors_are_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("e");
    let out_s = out.to_str().unwrap();
    let with = |extra: &[&str]| {
        let mut args = edit_args(out_s);
        args.extend_from_slice(extra);
        let output = layerdiff_in_repo(&args);
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        stderr
    };
    assert!(with(&["--background-source", "image"]).contains("--background-image"));
    assert!(with(&["--alpha", "1.5"]).contains("--alpha"));
    assert!(!out.join("session.safetensors").exists());
}

#[test]
fn baselines_run_from_the_same_command() {
    let dir = tempfile::tempdir().unwrap();
    for method in ["imagic", "sdedit"] {
        let out = dir.path().join(method);
        let mut args = edit_args(out.to_str().unwrap());
        args.extend(["--method", method]);
        let run = layerdiff_in_repo(&args);
        assert!(run.status.success(), "{method}: {}", String::from_utf8_lossy(&run.stderr));
        let info: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("session.json")).unwrap()).unwrap();
        assert_eq!(info["method"], method);
        assert!(out.join("edit-1.png").is_file() && out.join("edit-2.png").is_file());
        if method == "imagic" {
            // Imagic's own defaults: eta 0.7, no iterative guidance; explicit flags still win.
            assert_eq!(info["request"]["settings"]["guidance_period"], 0);
            assert_eq!(info["request"]["settings"]["finetune_steps"], 2);
        }
    }
}
