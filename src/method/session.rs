//! Edit sessions on disk: everything needed to draw new samples without repeating stages 1 and 2,
//! and the checkpoints that let a killed run resume where it stopped.
//!
//! A session folder holds `session.json` (settings, inputs, crop, model and file hashes, loss
//! curves, timings), `session.safetensors` (embeddings and fine-tuned weights) and, while stages
//! 1 and 2 run, `checkpoint.json` + `checkpoint.safetensors`. Every file is written atomically.

use super::edit::EditRequest;
use super::StepLoss;
use crate::error::{bad_input, io_err, Result};
use crate::image_io::write_atomic;
use crate::method::masks::Crop;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const SESSION_JSON: &str = "session.json";
pub const SESSION_TENSORS: &str = "session.safetensors";
pub const CHECKPOINT_JSON: &str = "checkpoint.json";
pub const CHECKPOINT_TENSORS: &str = "checkpoint.safetensors";

/// Tensor names in `session.safetensors`; fine-tuned weights are stored under `unet.`.
pub mod names {
    /// `e_o*`, the optimized object embedding.
    pub const OBJECT: &str = "object_embedding";
    /// `e_b*`, the optimized background embedding.
    pub const BACKGROUND: &str = "background_embedding";
    /// `e_bar` of Eq. 3 with the session's alpha.
    pub const BAR: &str = "interpolated_embedding";
    /// `c(T_o)`, the target object text's embedding (`e_g` by default).
    pub const TARGET_OBJECT: &str = "target_object_embedding";
    /// `c("")`, the unconditional embedding of classifier-free guidance.
    pub const UNCOND: &str = "uncond_embedding";
    pub const UNET_PREFIX: &str = "unet.";
}

/// `session.json`: what an edit was made from and with. Written when the edit starts (so that
/// `--resume` knows the request) and completed when it ends.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionInfo {
    pub version: u32,
    pub method: String,
    pub model: String,
    /// SHA-256 of each weight file of the model.
    pub model_files: Vec<FileHash>,
    pub dtype: String,
    pub request: EditRequest,
    pub image_sha256: String,
    /// How the photo was resized and cropped to the working size.
    pub crop: Crop,
    /// `lambda_o` actually used (after the small-subject rule).
    pub lambda_object: f64,
    /// Fraction of the working image covered by the subject mask.
    pub subject_area: f64,
    pub losses: Losses,
    /// Seconds per stage.
    pub timings: HashMap<String, f64>,
    /// Where the run is: "stage1", "stage2", "stage3" or "done".
    pub progress: String,
}

impl SessionInfo {
    /// The record of a run that starts now: the request, the model and the hashes of its files
    /// and of the photo, no losses or timings yet.
    pub fn start(
        method: &str,
        files: &crate::sources::ModelFiles,
        dtype: candle_core::DType,
        req: &EditRequest,
        crop: Crop,
        lambda_object: f64,
        subject_area: f64,
    ) -> Result<Self> {
        Ok(Self {
            version: 1,
            method: method.into(),
            model: files.id.clone(),
            model_files: hash_files(&files.weight_files())?,
            dtype: format!("{dtype:?}").to_lowercase(),
            request: req.clone(),
            image_sha256: sha256_file(&req.image)?,
            crop,
            lambda_object,
            subject_area,
            losses: Losses::default(),
            timings: HashMap::new(),
            progress: "started".into(),
        })
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Losses {
    pub stage1: Vec<StepLoss>,
    pub stage2: Vec<StepLoss>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileHash {
    pub file: String,
    pub sha256: String,
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(io_err(path))?;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(io_err(path))?;
    Ok(format!("{:x}", hasher.finalize()))
}

pub fn hash_files(files: &[PathBuf]) -> Result<Vec<FileHash>> {
    files
        .iter()
        .map(|f| Ok(FileHash { file: f.display().to_string(), sha256: sha256_file(f)? }))
        .collect()
}

pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| bad_input(path.display(), e, "report this bug"))?;
    write_atomic(path, text.as_bytes())
}

pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    serde_json::from_str(&text)
        .map_err(|e| bad_input(path.display(), format!("unreadable ({e})"), "give a folder written by `layerdiff edit`"))
}

pub fn write_tensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let mut named: Vec<(&String, &Tensor)> = tensors.iter().collect();
    named.sort_by_key(|(k, _)| k.as_str());
    let bytes = safetensors::serialize(named, None).map_err(|e| bad_input(path.display(), e, "report this bug"))?;
    write_atomic(path, &bytes)
}

pub fn read_tensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, device).map_err(|e| {
        bad_input(path.display(), format!("unreadable ({e})"), "the session is damaged; rerun `layerdiff edit`")
    })
}

/// Takes the tensors under `prefix`, without it.
pub fn strip_prefix(tensors: &HashMap<String, Tensor>, prefix: &str) -> HashMap<String, Tensor> {
    tensors.iter().filter_map(|(k, v)| k.strip_prefix(prefix).map(|k| (k.to_string(), v.clone()))).collect()
}

/// Puts `prefix` before every name.
pub fn with_prefix(tensors: HashMap<String, Tensor>, prefix: &str) -> impl Iterator<Item = (String, Tensor)> + '_ {
    tensors.into_iter().map(move |(k, v)| (format!("{prefix}{k}"), v))
}

/// Fetches a required tensor from a session file.
pub fn required<'a>(tensors: &'a HashMap<String, Tensor>, name: &str, file: &Path) -> Result<&'a Tensor> {
    tensors.get(name).ok_or_else(|| {
        bad_input(file.display(), format!("has no tensor {name}"), "the session is damaged; rerun `layerdiff edit`")
    })
}
