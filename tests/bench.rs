//! `layerdiff bench --stages` end to end on the tiny UNet (the hidden `--tiny`): the same code
//! path as the full-size benchmark, in seconds. Checks the JSON, not the speed.

use layerdiff::method::EditSettings;
use serde_json::Value;
use std::process::{Command, Output};

fn layerdiff(args: &[&str]) -> Output {
    // A thread count of our own, which the report must give back.
    Command::new(env!("CARGO_BIN_EXE_layerdiff")).args(args).env("RAYON_NUM_THREADS", "3").output().expect("runs")
}

/// The keys of the JSON, documented at `layerdiff::bench::StageBench`.
const KEYS: &[&str] = &[
    "framework",
    "unet",
    "parameters",
    "host",
    "device",
    "dtype",
    "size",
    "latent_size",
    "finetune",
    "gradient_checkpointing",
    "lora_rank",
    "steps",
    "gpu_paths",
    "memory",
    "stage1_step_s",
    "stage1_host_s",
    "stage1_peak_mib",
    "stage2_step_s",
    "stage2_host_s",
    "stage2_peak_mib",
    "stage2_trained_parameters",
    "stage3_step_s",
    "stage3_host_s",
    "stage3_peak_mib",
    "stage1_edit_steps",
    "stage2_edit_steps",
    "stage3_edit_steps",
    "projected_edit_s",
];

/// Runs the tiny stage bench with `--json`; returns the JSON (stdout and file must agree) and stderr.
fn bench_stages(extra: &[&str]) -> (Value, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out/stages.json");
    let path_str = path.to_str().unwrap();
    let mut args = vec!["bench", "--stages", "--tiny", "--cpu", "--size", "64", "--steps", "2", "--json", path_str];
    args.extend_from_slice(extra);
    let out = layerdiff(&args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{args:?}: {stderr}");
    let stdout: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    let file: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).expect("JSON in --json");
    assert_eq!(stdout, file);
    (stdout, stderr)
}

fn f(json: &Value, key: &str) -> f64 {
    json[key].as_f64().unwrap_or_else(|| panic!("{key} is not a number: {json}"))
}

/// The machine's description, as this process sees the same CPU.
fn check_host(host: &Value) {
    assert!(!host["cpu"].as_str().unwrap().is_empty(), "{host}");
    assert_eq!(host["threads"], 3, "{host}");
    #[cfg(target_arch = "x86_64")]
    {
        let simd = if is_x86_feature_detected!("avx512f") {
            "avx512"
        } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            "avx2"
        } else {
            "default"
        };
        assert_eq!(host["simd"], simd, "{host}");
    }
}

fn check_report(json: &Value, finetune: &str) {
    let keys: Vec<&str> = json.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys.len(), KEYS.len(), "{keys:?}");
    for key in KEYS {
        assert!(json.get(*key).is_some(), "{key} missing: {json}");
    }
    assert_eq!(json["unet"], "tiny");
    assert_eq!(json["device"], "cpu");
    assert_eq!(json["dtype"], "f32");
    assert_eq!(json["size"], 64);
    assert_eq!(json["latent_size"], 8);
    assert_eq!(json["finetune"], finetune);
    assert_eq!(json["steps"], 2);
    assert_eq!(json["gradient_checkpointing"], false);
    check_host(&json["host"]);
    // On the CPU none of our GPU paths runs.
    assert_eq!(json["gpu_paths"], serde_json::json!([]));
    let defaults = EditSettings::default();
    assert_eq!(json["stage1_edit_steps"], defaults.embedding_steps);
    assert_eq!(json["stage2_edit_steps"], defaults.finetune_steps);
    assert_eq!(json["stage3_edit_steps"], defaults.steps);
    assert_eq!(json["lora_rank"], defaults.lora_rank);
    let (s1, s2, s3) = (f(json, "stage1_step_s"), f(json, "stage2_step_s"), f(json, "stage3_step_s"));
    // On the CPU the work is done when issued: the host's share is all of a step, not more.
    for n in 1..=3 {
        let (step, host) = (f(json, &format!("stage{n}_step_s")), f(json, &format!("stage{n}_host_s")));
        assert!(host > 0.0 && host <= step, "stage {n}: host {host} s, step {step} s");
    }
    for s in [s1, s2, s3] {
        assert!(s > 0.0 && s < 60.0, "{json}");
    }
    let projected = defaults.embedding_steps as f64 * s1 + defaults.finetune_steps as f64 * s2 + defaults.steps as f64 * s3;
    assert!((f(json, "projected_edit_s") - projected).abs() <= 1e-9 * projected, "{json}");
    // Linux: the process's peak RSS, which holds at least the weights.
    if json["memory"] == "rss" {
        let weights_mib = f(json, "parameters") * 4.0 / (1024.0 * 1024.0);
        for key in ["stage1_peak_mib", "stage2_peak_mib", "stage3_peak_mib"] {
            assert!(f(json, key) > weights_mib, "{key}: {json}");
        }
    }
}

#[test]
fn stages_lora_reports_every_key_and_the_projection() {
    let (json, stderr) = bench_stages(&["--finetune", "lora"]);
    check_report(&json, "lora");
    // Rank-4 adapters on to_q/to_k/to_v/to_out.0 of the tiny UNet's 22 attentions, as
    // tools/bench_stages_ref.py --tiny --finetune lora counts them.
    assert_eq!(json["stage2_trained_parameters"], 33280);
    assert!(stderr.contains("2: fine-tune lora r4"), "{stderr}");
    assert!(stderr.contains("projected default edit"), "{stderr}");
    assert!(stderr.contains("host s"), "{stderr}");
}

#[test]
fn stages_full_trains_every_weight() {
    let (json, stderr) = bench_stages(&["--finetune", "full"]);
    check_report(&json, "full");
    assert_eq!(json["stage2_trained_parameters"], json["parameters"]);
    assert!(stderr.contains("2: fine-tune full"), "{stderr}");
}

#[test]
fn stages_full_with_gradient_checkpointing_says_so() {
    let (json, stderr) = bench_stages(&["--finetune", "full", "--gradient-checkpointing"]);
    assert_eq!(json["gradient_checkpointing"], true);
    assert_eq!(json["stage2_trained_parameters"], json["parameters"]);
    assert!(f(&json, "stage2_step_s") > 0.0);
    assert!(stderr.contains("2: fine-tune full, ckpt"), "{stderr}");
}

#[test]
fn stage_flags_are_checked() {
    for (args, what) in [
        (&["bench", "--stages", "--tiny", "--cpu", "--size", "60"][..], "--size"),
        (&["bench", "--steps", "2"][..], "--stages"),
        (&["bench", "--finetune", "lora"][..], "--stages"),
        (&["bench", "--stages", "--runs", "2"][..], "--runs"),
    ] {
        let out = layerdiff(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(what), "{args:?}: {stderr}");
    }
}

/// The PyTorch reference writes the same keys (checked on its source: the test needs no Python).
#[test]
fn pytorch_reference_writes_the_same_keys() {
    let script = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tools/bench_stages_ref.py")).unwrap();
    for key in KEYS {
        assert!(script.contains(&format!("\"{key}\": ")), "tools/bench_stages_ref.py lacks \"{key}\"");
    }
}

/// `--unet-config` times the UNet a diffusers config.json describes: here the tiny one with one
/// layer per block and a wider text context, which must change the parameter count as it does.
#[test]
fn stages_take_a_unet_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = layerdiff::tiny::default_configs()["unet"].clone();
    cfg["layers_per_block"] = 1.into();
    cfg["cross_attention_dim"] = 48.into();
    let path = dir.path().join("config.json");
    std::fs::write(&path, serde_json::to_string(&cfg).unwrap()).unwrap();
    let run = |args: &[&str]| -> Value {
        let mut all = vec!["bench", "--stages", "--cpu", "--size", "32", "--steps", "1", "--finetune", "lora"];
        all.extend_from_slice(args);
        let out = layerdiff(&all);
        assert!(out.status.success(), "{all:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let custom = run(&["--unet-config", path.to_str().unwrap()]);
    let tiny = run(&["--tiny"]);
    assert_eq!(custom["unet"], "custom");
    assert_eq!(tiny["unet"], "tiny");
    // A layer per block fewer: fewer weights, and fewer attentions to adapt.
    assert!(f(&custom, "parameters") < f(&tiny, "parameters"), "{custom} {tiny}");
    assert!(f(&custom, "stage2_trained_parameters") < f(&tiny, "stage2_trained_parameters"));

    // A config the UNet cannot take, a file that is not JSON, a missing file: one line naming
    // the flag and the file.
    std::fs::write(&path, r#"{"block_out_channels": "wide"}"#).unwrap();
    let not_json = dir.path().join("notes.txt");
    std::fs::write(&not_json, "wide blocks").unwrap();
    let missing = dir.path().join("missing.json");
    for bad in [&path, &not_json, &missing] {
        let out = layerdiff(&["bench", "--stages", "--cpu", "--unet-config", bad.to_str().unwrap()]);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        let line = format!("--unet-config {}", bad.display());
        assert!(stderr.contains(&line) && stderr.trim().lines().count() == 1, "{stderr}");
    }
}
