//! The tiny fixture model and the demo photo, as the method's tests use them.

use candle_core::{DType, Device};
use layerdiff::method::edit::{BackgroundSource, EditRequest};
use layerdiff::method::EditSettings;
use layerdiff::pipeline::StableDiffusion;
use layerdiff::sources::{ModelFiles, SourceOptions};
use std::path::PathBuf;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// tests/fixtures/tiny-sd in f32 on the CPU.
pub fn load() -> (ModelFiles, StableDiffusion) {
    let files = ModelFiles::resolve(root().join("tests/fixtures/tiny-sd").to_str().unwrap(), &SourceOptions::default()).unwrap();
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
