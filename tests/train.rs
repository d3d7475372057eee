//! Training from scratch (`layerdiff train`) on a tiny toy-world dataset: losses fall, a run
//! stopped at every step and resumed ends bit for bit where an uninterrupted one does, the
//! exported model loads and samples, and bad runs are refused with one-line errors.

use candle_core::{DType, Device};
use layerdiff::pipeline::{generate, GenerateOptions, StableDiffusion};
use layerdiff::sources::{ModelFiles, SourceOptions};
use layerdiff::toyworld::data::{write_dataset, DataOptions};
use layerdiff::train::{train, TrainEvent, TrainSettings, LOG_FILE};
use std::path::Path;
use std::time::Duration;

fn dataset(dir: &Path) -> std::path::PathBuf {
    let data = dir.join("data");
    write_dataset(&DataOptions { n: 24, size: 16, seed: 3, out: data.clone() }, &mut |_, _| {}).unwrap();
    data
}

fn small(vae_steps: usize, steps: usize) -> TrainSettings {
    TrainSettings {
        vae_steps,
        steps,
        batch: 8,
        warmup: 1,
        checkpoint_every: 1,
        eval_samples: 2,
        eval_steps: 2,
        ..TrainSettings::default()
    }
}

/// The loss of every checkpoint of `phase`, in order.
fn logged_losses(out: &Path, phase: &str) -> Vec<f64> {
    std::fs::read_to_string(out.join(LOG_FILE))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["phase"] == phase)
        .map(|v| v["loss"].as_f64().unwrap())
        .collect()
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

#[test]
fn losses_fall_and_the_model_samples() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let out = dir.path().join("model");
    let settings = TrainSettings { checkpoint_every: 40, eval_samples: 2, ..small(40, 40) };
    let (mut accuracies, mut vae, mut diffusion) = (0, Vec::new(), Vec::new());
    train(&data, &out, &settings, false, None, &Device::Cpu, &mut |e| match e {
        TrainEvent::Checkpoint { accuracy: Some(a), .. } => {
            assert_eq!(a.total, 2);
            accuracies += 1;
        }
        TrainEvent::Step { phase: "vae", loss, .. } => vae.push(loss),
        TrainEvent::Step { loss, .. } => diffusion.push(loss),
        _ => {}
    })
    .unwrap();
    assert_eq!(accuracies, 1, "one diffusion checkpoint, evaluated");
    assert!(mean(&vae[35..]) < 0.5 * mean(&vae[..5]), "VAE loss {vae:?}");
    assert!(mean(&diffusion[30..]) < 0.8 * mean(&diffusion[..5]), "diffusion loss {diffusion:?}");
    assert_eq!(logged_losses(&out, "vae").len(), 1, "one VAE checkpoint logged");

    // The export is a diffusers pipeline that our loader takes and samples at 16 px.
    let files = ModelFiles::resolve(out.to_str().unwrap(), &SourceOptions { offline: true, ..Default::default() }).unwrap();
    let sd = StableDiffusion::load(&files, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(sd.tokenizer.max_len(), 24);
    let opts = GenerateOptions { prompt: "a large red circle on the left in a plain background".into(), steps: 3, guidance_scale: 3.0, width: 16, height: 16, seed: 1, ..Default::default() };
    let image = generate(&sd, &opts, &mut |_, _| {}).unwrap();
    assert_eq!(image.dims(), &[1, 3, 16, 16]);
    assert!(image.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|v| v.is_finite()));
}

#[test]
fn a_run_stopped_at_every_step_resumes_to_the_same_weights() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let settings = small(3, 3);
    let whole = dir.path().join("whole");
    train(&data, &whole, &settings, false, None, &Device::Cpu, &mut |_| {}).unwrap();

    let pieces = dir.path().join("pieces");
    let mut runs = 0;
    let mut resume = false;
    // A zero time limit stops each run after one step, with a checkpoint.
    loop {
        let mut last = None;
        train(&data, &pieces, &settings, resume, Some(Duration::ZERO), &Device::Cpu, &mut |e| {
            if let TrainEvent::Step { phase, step, .. } = e {
                last = Some((phase, step));
            }
        })
        .unwrap();
        runs += 1;
        resume = true;
        if last == Some(("diffusion", 3)) || runs > 10 {
            break;
        }
    }
    // The run that finishes the VAE goes on to one diffusion step.
    assert_eq!(runs, 5, "3 VAE steps and 3 diffusion steps, one a run");
    for file in ["unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors"] {
        let a = std::fs::read(whole.join(file)).unwrap();
        let b = std::fs::read(pieces.join(file)).unwrap();
        assert!(a == b, "{file} differs between the whole run and the resumed one");
    }
}

#[test]
fn bad_runs_are_refused_with_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let out = dir.path().join("model");
    let settings = TrainSettings { eval_samples: 0, ..small(1, 1) };
    let err = |r: layerdiff::Result<()>| r.unwrap_err().to_string();

    let e = err(train(&data, &out, &settings, true, None, &Device::Cpu, &mut |_| {}));
    assert!(e.contains("no training state to resume"), "{e}");
    train(&data, &out, &settings, false, None, &Device::Cpu, &mut |_| {}).unwrap();
    let e = err(train(&data, &out, &settings, false, None, &Device::Cpu, &mut |_| {}));
    assert!(e.contains("holds a training run") && e.contains("--resume"), "{e}");
    let other = TrainSettings { lr: 5e-4, ..settings.clone() };
    let e = err(train(&data, &out, &other, true, None, &Device::Cpu, &mut |_| {}));
    assert!(e.contains("other settings"), "{e}");
    // Longer phases continue the same run.
    let longer = TrainSettings { steps: 2, ..settings.clone() };
    let mut steps = Vec::new();
    train(&data, &out, &longer, true, None, &Device::Cpu, &mut |e| {
        if let TrainEvent::Step { phase, step, .. } = e {
            steps.push((phase, step));
        }
    })
    .unwrap();
    assert_eq!(steps, [("diffusion", 2)]);
    let e = err(train(&dir.path().join("nothing"), &dir.path().join("m2"), &settings, false, None, &Device::Cpu, &mut |_| {}));
    assert!(e.contains("nothing") && !e.contains('\n'), "{e}");
}
