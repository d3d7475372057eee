//! Where model weights come from: a diffusers folder, a single-file SD v1 checkpoint, or a
//! Hugging Face hub repo id. Each resolves to [`ModelFiles`]: the parsed configs, the tokenizer
//! files, and weights whose headers were checked, loaded under diffusers' tensor names whatever
//! the source.
//!
//! ```no_run
//! use layerdiff::sources::{Component, ModelFiles, SourceOptions};
//! use candle_core::{DType, Device};
//! # fn main() -> layerdiff::Result<()> {
//! let files = ModelFiles::resolve("CompVis/stable-diffusion-v1-4", &SourceOptions::from_env())?;
//! let vb = files.var_builder(Component::Unet, DType::F16, &Device::Cpu)?;
//! let conv_in = vb.get((320, 4, 3, 3), "conv_in.weight")?;
//! # Ok(()) }
//! ```

mod hub;
mod layout;
mod sd_v1;
mod single_file;
mod weights;

pub use single_file::{diffusers_key, DiffusersKey, LdmLayout};

use crate::error::{bad_input, io_err, Error, Result};
use crate::tokenizer::ClipTokenizer;
use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use weights::ComponentWeights;

/// The three networks of a Stable Diffusion pipeline that have weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Component {
    Unet,
    Vae,
    TextEncoder,
}

impl Component {
    pub const ALL: [Component; 3] = [Component::Unet, Component::Vae, Component::TextEncoder];

    /// The component's folder in the diffusers layout.
    pub fn dir_name(&self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::Vae => "vae",
            Component::TextEncoder => "text_encoder",
        }
    }

    /// The weight files' stem: diffusers saves `diffusion_pytorch_model.*`, transformers `model.*`.
    fn weights_stem(&self) -> &'static str {
        match self {
            Component::Unet | Component::Vae => "diffusion_pytorch_model",
            Component::TextEncoder => "model",
        }
    }
}

impl std::fmt::Display for Component {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.dir_name())
    }
}

/// A single weight file, as `--sam-model` names one: a `.safetensors` path, a folder holding
/// exactly one, or `org/name/file.safetensors` in a hub repo (cached as [`ModelFiles::resolve`]
/// caches, and with the same [`SourceOptions`]).
pub fn resolve_weight_file(spec: &str, opts: &SourceOptions) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    if path.is_dir() {
        let entries = std::fs::read_dir(path).map_err(io_err(path))?;
        let mut found: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        return match found.len() {
            1 => Ok(found.remove(0)),
            n => Err(bad_input(spec, format!("holds {n} .safetensors files"), "name the file itself")),
        };
    }
    let mut parts = spec.splitn(3, '/');
    if let (Some(org), Some(name), Some(file)) = (parts.next(), parts.next(), parts.next()) {
        let id = format!("{org}/{name}");
        if hub::is_repo_id(&id) && !file.is_empty() {
            return hub::fetch_file(&id, file, opts);
        }
    }
    Err(bad_input(spec, "no such file or directory", "give a .safetensors file, a folder holding one, or a hub file like lmz/candle-sam/mobile_sam-tiny-vitt.safetensors"))
}

/// How to find a model. Hub settings left `None` come from the environment at resolve time, as
/// Python's huggingface_hub reads it: `HF_ENDPOINT`, `HF_HUB_CACHE` or `HF_HOME`, `HF_TOKEN` or
/// the token file that `huggingface-cli login` writes.
#[derive(Debug, Clone, Default)]
pub struct SourceOptions {
    /// Use only the local hub cache; also on when `HF_HUB_OFFLINE=1`, whatever this says.
    pub offline: bool,
    /// Hub access token, for gated or private repos.
    pub token: Option<String>,
    /// Hub branch, tag or commit; `main` when `None`.
    pub revision: Option<String>,
    /// Weight file variant of a diffusers model, e.g. `fp16` for `diffusion_pytorch_model.fp16.safetensors`.
    pub variant: Option<String>,
    /// A folder with `vocab.json` + `merges.txt` or `tokenizer.json` (or a model folder with a
    /// `tokenizer/`), used instead of the model's own tokenizer.
    pub tokenizer: Option<PathBuf>,
    /// Hub URL, e.g. a mirror; `HF_ENDPOINT` or `https://huggingface.co` when `None`.
    pub endpoint: Option<String>,
    /// Hub cache folder (the one holding `models--org--name/`); the standard one when `None`.
    pub cache_dir: Option<PathBuf>,
}

impl SourceOptions {
    /// Defaults, with `offline` and `token` taken from `HF_HUB_OFFLINE` and `HF_TOKEN` so that a
    /// caller can show or override them.
    pub fn from_env() -> Self {
        Self { offline: hub::offline_from_env(), token: hub::token_from_env(), ..Self::default() }
    }
}

/// Where the CLIP tokenizer's files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerFiles {
    /// A tokenizer folder as transformers saves it: `vocab.json` + `merges.txt` or
    /// `tokenizer.json`, with `tokenizer_config.json` and `special_tokens_map.json` if the model has them.
    Dir(PathBuf),
    /// The SD v1 CLIP `vocab.json` and `merges.txt` compiled into the binary
    /// ([`crate::assets::CLIP_VOCAB`], [`crate::assets::CLIP_MERGES`]), for a single-file
    /// checkpoint with no tokenizer folder beside it: every SD v1.x model uses this tokenizer.
    Bundled,
}

/// A resolved Stable Diffusion v1 model: its configs, tokenizer and weights.
#[derive(Debug)]
pub struct ModelFiles {
    /// What the user gave: a path or a hub repo id.
    pub id: String,
    /// `model_index.json`, when the model has one.
    pub model_index: Option<Value>,
    pub unet_config: Value,
    pub vae_config: Value,
    pub text_encoder_config: Value,
    pub scheduler_config: Value,
    pub tokenizer_files: TokenizerFiles,
    /// Indexed by `Component as usize`, in the order of [`Component::ALL`].
    weights: [ComponentWeights; 3],
}

impl ModelFiles {
    /// Finds the model that `spec` names: an existing folder (diffusers layout) or `.safetensors`
    /// file (original CompVis checkpoint), else a hub repo id such as `CompVis/stable-diffusion-v1-4`.
    /// Everything needed is downloaded (hub) and every weight file's header checked here, so
    /// that a bad input fails before any work.
    pub fn resolve(spec: &str, opts: &SourceOptions) -> Result<ModelFiles> {
        let path = Path::new(spec);
        if path.is_dir() {
            layout::resolve(&layout::LocalDir::new(path), spec, opts)
        } else if path.is_file() {
            single_file::resolve(path, spec, opts)
        } else if hub::is_repo_id(spec) {
            hub::resolve(spec, opts)
        } else {
            Err(bad_input(
                spec,
                "no such file or directory",
                "give a diffusers folder, a .safetensors file, or a hub repo id like CompVis/stable-diffusion-v1-4",
            ))
        }
    }

    /// A VarBuilder over a component's weights, named as diffusers names them (`conv_in.weight`,
    /// `text_model.embeddings.token_embedding.weight`), converted to `dtype` on `device` as
    /// each tensor is read. Tensors stay memory-mapped until asked for.
    pub fn var_builder(&self, c: Component, dtype: DType, device: &Device) -> Result<candle_nn::VarBuilder<'static>> {
        let reader = self.weights(c).open()?;
        Ok(candle_nn::VarBuilder::from_backend(Box::new(reader), dtype, device.clone()))
    }

    /// Every tensor of a component (diffusers name -> tensor, in the file's dtype), for code
    /// that copies them into trainable variables. Includes non-parameter buffers the file may
    /// hold, such as the text encoder's integer `text_model.embeddings.position_ids`.
    pub fn tensors(&self, c: Component, device: &Device) -> Result<HashMap<String, Tensor>> {
        let reader = self.weights(c).open()?;
        reader
            .names()
            .into_iter()
            .map(|name| {
                let t = reader.load(&name, device)?;
                Ok((name, t))
            })
            .collect()
    }

    /// The CLIP tokenizer from [`Self::tokenizer_files`].
    pub fn tokenizer(&self) -> Result<ClipTokenizer> {
        match &self.tokenizer_files {
            TokenizerFiles::Dir(dir) => ClipTokenizer::from_dir(dir),
            TokenizerFiles::Bundled => {
                // ClipTokenizer reads files: give it the bundled ones in a scratch folder.
                let dir = tempfile::tempdir().map_err(io_err(&std::env::temp_dir()))?;
                crate::assets::write_clip_tokenizer(dir.path(), 77)?;
                ClipTokenizer::from_dir(dir.path())
            }
        }
    }

    /// Turns candle's "cannot find tensor X" or "shape mismatch for X", from building a
    /// component's model, into a one-line error that names the checkpoint; other errors pass.
    pub fn weights_error(&self, c: Component, err: candle_core::Error) -> Error {
        self.weights(c).tensor_error(c, err)
    }

    /// The weight files of every component, for recording what an edit was made with.
    pub fn weight_files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = self.weights.iter().flat_map(|w| w.files().iter().cloned()).collect();
        files.dedup();
        files
    }

    fn weights(&self, c: Component) -> &ComponentWeights {
        &self.weights[c as usize]
    }
}
