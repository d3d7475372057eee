//! The metric models, loaded from a transformers-layout folder or hub repo: CLIP (`CLIPModel`,
//! both towers, with its tokenizer and image processor) and DINOv2 (`Dinov2Model`, with its
//! image processor). Each turns images (and CLIP texts) into embedding rows.

use super::preprocess::ImageProcessor;
use crate::error::{bad_input, io_err, Result};
use crate::models::clip::{ClipConfig, ClipModel};
use crate::models::dinov2::{Dinov2Config, Dinov2Model};
use crate::sources::SourceOptions;
use crate::tokenizer::ClipTokenizer;
use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The two kinds of metric model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricModelKind {
    Clip,
    Dinov2,
}

impl MetricModelKind {
    fn describe(self) -> &'static str {
        match self {
            Self::Clip => "a CLIP model with both towers (a transformers CLIPModel, such as openai/clip-vit-large-patch14 or openai/clip-vit-base-patch32)",
            Self::Dinov2 => "a DINOv2 model (a transformers Dinov2Model, such as facebook/dinov2-base)",
        }
    }

    /// Whether a `config.json` is this kind's; `Err` names what it is instead.
    fn check(self, config: &Value, shown: &str) -> Result<()> {
        let model_type = config.get("model_type").and_then(Value::as_str).unwrap_or("");
        let ok = match self {
            Self::Clip => model_type == "clip" || (model_type.is_empty() && config.get("text_config").is_some() && config.get("vision_config").is_some()),
            Self::Dinov2 => model_type == "dinov2",
        };
        if ok {
            return Ok(());
        }
        let what = match model_type {
            "" => "a model of unknown type (config.json has no model_type)".to_string(),
            t => format!("a `{t}` model"),
        };
        let flag = match self {
            Self::Clip => "--clip-model",
            Self::Dinov2 => "--dino-model",
        };
        Err(bad_input(shown, format!("is {what}, not {}", self.describe()), format!("give {flag} a model of that kind")))
    }
}

/// The files of a transformers model: `config.json`, the safetensors weights,
/// `preprocessor_config.json` if there is one, and the folder that holds them (and the
/// tokenizer files, for CLIP).
#[derive(Debug, Clone)]
pub struct TransformersFiles {
    /// What the user gave.
    pub id: String,
    pub dir: PathBuf,
    pub config: Value,
    pub weights: Vec<PathBuf>,
    pub preprocessor_config: Option<Value>,
}

impl TransformersFiles {
    /// Finds the model `spec` names, a folder or a hub repo id (downloaded into the hub cache as
    /// [`crate::sources::ModelFiles::resolve`] does, with the same options), and checks it is of
    /// `kind` before its weights are fetched. For CLIP, the tokenizer files are fetched too.
    pub fn resolve(spec: &str, kind: MetricModelKind, opts: &SourceOptions) -> Result<Self> {
        let path = Path::new(spec);
        if path.is_dir() {
            return Self::local(spec, path, kind);
        }
        if path.is_file() {
            return Err(bad_input(spec, "is a file", format!("give the folder of {}, with its config.json, or a hub repo id", kind.describe())));
        }
        let repo_like = spec.split('/').count() == 2 && !spec.starts_with(['.', '/']) && !spec.ends_with(".safetensors");
        if !repo_like {
            return Err(bad_input(spec, "no such file or directory", format!("give the folder of {}, or its hub repo id", kind.describe())));
        }
        Self::hub(spec, kind, opts)
    }

    fn local(spec: &str, dir: &Path, kind: MetricModelKind) -> Result<Self> {
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            return Err(bad_input(config_path.display(), "missing", format!("give the folder of {}, as transformers' save_pretrained writes it", kind.describe())));
        }
        let config = read_json(&config_path)?;
        kind.check(&config, &dir.display().to_string())?;
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let weights = if single.is_file() {
            vec![single]
        } else if index.is_file() {
            shards(&index)?.into_iter().map(|s| dir.join(s)).collect()
        } else if dir.join("pytorch_model.bin").is_file() {
            return Err(bad_input(
                dir.join("pytorch_model.bin").display(),
                "pickle weights are not loaded (they can run code)",
                "convert them to model.safetensors, e.g. in Python: Model.from_pretrained(folder).save_pretrained(folder)",
            ));
        } else {
            return Err(bad_input(single.display(), "missing", "give a folder with model.safetensors (or its shards and model.safetensors.index.json)"));
        };
        let preprocessor = dir.join("preprocessor_config.json");
        let preprocessor_config = preprocessor.is_file().then(|| read_json(&preprocessor)).transpose()?;
        Ok(Self { id: spec.to_string(), dir: dir.to_path_buf(), config, weights, preprocessor_config })
    }

    fn hub(id: &str, kind: MetricModelKind, opts: &SourceOptions) -> Result<Self> {
        let fetch = |file: &str| crate::sources::resolve_weight_file(&format!("{id}/{file}"), opts);
        // Files a model may lack: any failure (absent, or no network with nothing cached) leaves
        // them out; the next required file reports a real problem.
        let optional = |file: &str| match fetch(file) {
            Ok(path) => Some(path),
            Err(e) => {
                tracing::debug!("{id}/{file}: {e}");
                None
            }
        };
        let config_path = fetch("config.json")?;
        let config = read_json(&config_path)?;
        kind.check(&config, id)?;
        let dir = config_path.parent().map(Path::to_path_buf).unwrap_or_default();
        let weights = match fetch("model.safetensors") {
            Ok(path) => vec![path],
            Err(single_err) => match optional("model.safetensors.index.json") {
                Some(index) => shards(&index)?.iter().map(|s| fetch(s)).collect::<Result<Vec<_>>>()?,
                None => return Err(single_err),
            },
        };
        let preprocessor_config = optional("preprocessor_config.json").map(|p| read_json(&p)).transpose()?;
        if kind == MetricModelKind::Clip {
            if optional("vocab.json").is_none() || optional("merges.txt").is_none() {
                fetch("tokenizer.json")?;
            }
            for file in ["tokenizer_config.json", "special_tokens_map.json"] {
                optional(file);
            }
        }
        Ok(Self { id: id.to_string(), dir, config, weights, preprocessor_config })
    }

    /// A VarBuilder over the weights (memory-mapped), converted to `dtype` on `device`.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> Result<candle_nn::VarBuilder<'static>> {
        for f in &self.weights {
            check_header(f)?;
        }
        // SAFETY: the files are only read; like every mmap user we assume nobody truncates them meanwhile.
        let vb = unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&self.weights, dtype, device) }
            .map_err(|e| bad_input(self.weights[0].display(), format!("cannot be read ({e})"), "re-download it"))?;
        Ok(vb)
    }

    /// Turns candle's "cannot find tensor" or "shape mismatch" from building the model into a
    /// one-line error naming the checkpoint.
    fn weights_error(&self, err: candle_core::Error) -> crate::Error {
        let text = err.to_string();
        let first = text.lines().next().unwrap_or_default().to_string();
        if first.contains("cannot find tensor") || first.contains("shape mismatch") {
            bad_input(&self.id, format!("the weights do not match config.json ({first})"), "use the config.json that came with the weights")
        } else {
            err.into()
        }
    }

    fn preprocessor(&self, defaults: ImageProcessor) -> Result<ImageProcessor> {
        match &self.preprocessor_config {
            Some(v) => ImageProcessor::from_json(v, &format!("{}/preprocessor_config.json", self.id), defaults),
            None => Ok(defaults),
        }
    }
}

/// CLIP, ready to embed images and texts.
#[derive(Debug)]
pub struct ClipEmbedder {
    pub model: ClipModel,
    pub processor: ImageProcessor,
    pub tokenizer: ClipTokenizer,
    pub files: TransformersFiles,
    device: Device,
}

impl ClipEmbedder {
    /// Loads a `CLIPModel` folder or hub repo (`openai/clip-vit-large-patch14`) in f32.
    pub fn load(spec: &str, opts: &SourceOptions, device: &Device) -> Result<Self> {
        let files = TransformersFiles::resolve(spec, MetricModelKind::Clip, opts)?;
        let config = ClipConfig::from_json(&files.config)?;
        let processor = files.preprocessor(ImageProcessor::clip())?;
        let tokenizer = ClipTokenizer::from_dir(&files.dir)?;
        let vb = files.var_builder(DType::F32, device)?;
        let model = ClipModel::new(vb, config).map_err(|e| files.weights_error(e))?;
        Ok(Self { model, processor, tokenizer, files, device: device.clone() })
    }

    /// `image_embeds (n, projection_dim)` of RGB images, not normalized.
    pub fn image_embeds(&self, images: &[&RgbImage]) -> Result<Tensor> {
        let pixel_values = self.processor.preprocess_batch(images, &self.device)?;
        let size = self.model.config().vision.image_size;
        if pixel_values.dim(2)? != size || pixel_values.dim(3)? != size {
            return Err(bad_input(
                format!("{}/preprocessor_config.json", self.files.id),
                format!("makes {}x{} images, but the model takes {size}x{size}", pixel_values.dim(3)?, pixel_values.dim(2)?),
                "fix its crop_size",
            ));
        }
        Ok(self.model.get_image_features(&pixel_values)?)
    }

    /// `text_embeds (n, projection_dim)` of texts, not normalized; each is tokenized and cut to
    /// CLIP's 77 tokens as transformers' tokenizer does with `truncation=True`.
    pub fn text_embeds(&self, texts: &[&str]) -> Result<Tensor> {
        let max_positions = self.model.config().text.max_position_embeddings;
        let mut ids = Vec::with_capacity(texts.len());
        for text in texts {
            let row = self.tokenizer.encode(text)?;
            if row.len() > max_positions {
                return Err(bad_input(&self.files.id, format!("its tokenizer makes {} tokens, the text model takes {max_positions}", row.len()), "fix model_max_length in tokenizer_config.json"));
            }
            ids.push(Tensor::new(row, &self.device)?);
        }
        let ids = Tensor::stack(&ids, 0)?;
        Ok(self.model.get_text_features(&ids)?)
    }
}

/// DINOv2, ready to embed images.
#[derive(Debug)]
pub struct DinoEmbedder {
    pub model: Dinov2Model,
    pub processor: ImageProcessor,
    pub files: TransformersFiles,
    device: Device,
}

impl DinoEmbedder {
    /// Loads a `Dinov2Model` folder or hub repo (`facebook/dinov2-base`) in f32.
    pub fn load(spec: &str, opts: &SourceOptions, device: &Device) -> Result<Self> {
        let files = TransformersFiles::resolve(spec, MetricModelKind::Dinov2, opts)?;
        let config = Dinov2Config::from_json(&files.config)?;
        let processor = files.preprocessor(ImageProcessor::dinov2())?;
        let vb = files.var_builder(DType::F32, device)?;
        let model = Dinov2Model::new(vb, config).map_err(|e| files.weights_error(e))?;
        Ok(Self { model, processor, files, device: device.clone() })
    }

    /// The class-token embeddings `(n, hidden)` (`pooler_output`) of RGB images.
    pub fn image_embeds(&self, images: &[&RgbImage]) -> Result<Tensor> {
        let pixel_values = self.processor.preprocess_batch(images, &self.device)?;
        Ok(self.model.pooler_output(&pixel_values)?)
    }
}

/// Reads a safetensors header: a truncated or corrupt file (an interrupted download) is a
/// one-line error naming it, before any work.
fn check_header(path: &Path) -> Result<()> {
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    // SAFETY: read-only map of a file we do not modify.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err(path))?;
    safetensors::SafeTensors::read_metadata(&mmap)
        .map_err(|e| bad_input(path.display(), format!("truncated or corrupt safetensors file ({e})"), "re-download it"))?;
    Ok(())
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let value: Value = serde_json::from_str(&text).map_err(|e| bad_input(path.display(), format!("not valid JSON ({e})"), "re-download it or fix the file"))?;
    if !value.is_object() {
        return Err(bad_input(path.display(), "not a JSON object", "re-download it or fix the file"));
    }
    Ok(value)
}

/// The shard files a `model.safetensors.index.json` names, each once, sorted; only names
/// beside the index.
fn shards(index: &Path) -> Result<Vec<String>> {
    let json = read_json(index)?;
    let Some(map) = json.get("weight_map").and_then(Value::as_object) else {
        return Err(bad_input(index.display(), "has no weight_map object", "re-download it"));
    };
    let mut names: Vec<String> = Vec::new();
    for file in map.values() {
        let Some(file) = file.as_str().filter(|f| !f.is_empty() && !f.contains(['/', '\\']) && *f != "..") else {
            return Err(bad_input(index.display(), format!("names a shard that is not a file beside it: {file}"), "re-download it"));
        };
        if !names.iter().any(|n| n == file) {
            names.push(file.to_string());
        }
    }
    names.sort();
    Ok(names)
}
