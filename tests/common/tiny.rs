//! The tiny fixture model and the demo photo, as the method's tests use them.
#![allow(dead_code)] // each test crate uses its part

use candle_core::{DType, Device};
use layerdiff::method::edit::{BackgroundSource, EditRequest, Progress};
use layerdiff::method::EditSettings;
use layerdiff::pipeline::StableDiffusion;
use layerdiff::sources::{ModelFiles, SourceOptions};
use std::path::{Path, PathBuf};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// tests/fixtures/tiny-sd (random weights, the parity fixtures' model) in f32 on the CPU.
pub fn load() -> (ModelFiles, StableDiffusion) {
    load_model("tests/fixtures/tiny-sd")
}

/// The bundled toy model, assets/toy-sd (trained on the toy world), in f32 on the CPU.
pub fn load_toy() -> (ModelFiles, StableDiffusion) {
    load_model("assets/toy-sd")
}

fn load_model(dir: &str) -> (ModelFiles, StableDiffusion) {
    let options = SourceOptions { offline: true, ..Default::default() };
    let files = ModelFiles::resolve(root().join(dir).to_str().unwrap(), &options).unwrap();
    let sd = StableDiffusion::load(&files, &Device::Cpu, DType::F32).unwrap();
    (files, sd)
}

/// The README's demo edit (assets/demo) at 64x64, seeds 1 and 2, with these settings.
pub fn demo_request(settings: EditSettings) -> EditRequest {
    EditRequest {
        image: root().join("assets/demo/dog.png"),
        mask: root().join("assets/demo/dog-mask.png"),
        object: "a jumping dog".into(),
        background: "a dense forest".into(),
        prompt: None,
        background_source: BackgroundSource::Generated,
        size: 64,
        seeds: vec![1, 2],
        train_seed: 0,
        settings,
        checkpoint_every: 2,
    }
}

/// The README's first command on the toy model: the toy scene (a large green triangle with a white
/// dot, on grey) at 32x32, horizontal stripes behind it, seeds 1 and 2, with these settings.
pub fn toy_request(settings: EditSettings) -> EditRequest {
    EditRequest {
        image: root().join("assets/demo/toy-scene.png"),
        mask: root().join("assets/demo/toy-mask.png"),
        object: "a large green triangle on the left".into(),
        background: "a horizontal stripes background".into(),
        size: 32,
        ..demo_request(settings)
    }
}

/// Records the stages a run reports, checks every loss is finite, and can stop the run after a
/// given number of checkpoints.
#[derive(Default)]
pub struct Recorder {
    pub stages: Vec<String>,
    stop_after_checkpoints: Option<usize>,
    checkpoints: usize,
}

impl Recorder {
    pub fn new(stop_after_checkpoints: Option<usize>) -> Self {
        Self { stop_after_checkpoints, ..Default::default() }
    }
}

impl Progress for Recorder {
    fn start(&mut self, stage: &str, _: usize) {
        self.stages.push(stage.to_string());
    }
    fn step(&mut self, _: usize, loss: Option<f64>) {
        assert!(loss.is_none_or(f64::is_finite));
    }
    fn finish(&mut self) {}
    fn should_stop(&mut self) -> bool {
        self.checkpoints += 1;
        self.stop_after_checkpoints.is_some_and(|n| self.checkpoints >= n)
    }
}

pub fn bytes(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
