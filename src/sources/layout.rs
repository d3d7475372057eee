//! The diffusers layout: which files a Stable Diffusion model is made of, wherever it is kept.
//! A local folder and a hub repo differ only in how one file is found ([`ModelRoot`]).

use super::weights::ComponentWeights;
use super::{Component, ModelFiles, SourceOptions, TokenizerFiles};
use crate::error::{bad_input, io_err, Error, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// A model in diffusers layout; `file` is relative to its root, with `/` separators.
pub(crate) trait ModelRoot {
    /// The local path of `file`, or `None` when the model has no such file.
    fn find(&self, file: &str) -> Result<Option<PathBuf>>;
    /// Like `find`, for a file the model may lack: where reaching it fails (no network), it is
    /// taken as absent, so that a cached model loads offline.
    fn find_optional(&self, file: &str) -> Result<Option<PathBuf>> {
        self.find(file)
    }
    /// How to name `file` in messages.
    fn display(&self, file: &str) -> String;
    /// Why a required file was not found, and what to do: `(problem, fix)`.
    fn absence(&self) -> (String, String);
    /// The file names in folder `dir` where they can be listed, to say what is there instead.
    fn list(&self, _dir: &str) -> Vec<String> {
        Vec::new()
    }
}

/// A diffusers folder on disk.
pub(crate) struct LocalDir {
    root: PathBuf,
}

impl LocalDir {
    pub fn new(root: &Path) -> Self {
        Self { root: root.to_path_buf() }
    }
}

impl ModelRoot for LocalDir {
    fn find(&self, file: &str) -> Result<Option<PathBuf>> {
        let path = self.root.join(file);
        Ok(path.is_file().then_some(path))
    }

    fn display(&self, file: &str) -> String {
        self.root.join(file).display().to_string()
    }

    fn absence(&self) -> (String, String) {
        (
            "missing".into(),
            "a diffusers folder needs unet/, vae/, text_encoder/, tokenizer/ and scheduler/ as diffusers' \
             save_pretrained writes them; or give a .safetensors checkpoint or a hub repo id"
                .into(),
        )
    }

    fn list(&self, dir: &str) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.root.join(dir)) else { return Vec::new() };
        let mut names: Vec<String> = entries.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect();
        names.sort();
        names
    }
}

/// Resolves a diffusers-layout model: configs, tokenizer, and each component's weights.
pub(crate) fn resolve(root: &dyn ModelRoot, id: &str, opts: &SourceOptions) -> Result<ModelFiles> {
    let model_index = root.find_optional("model_index.json")?.map(|p| read_json(&p)).transpose()?;
    let config = |file: &str| -> Result<Value> {
        let path = root.find(file)?.ok_or_else(|| missing(root, file))?;
        read_json(&path)
    };
    let unet_config = config("unet/config.json")?;
    let vae_config = config("vae/config.json")?;
    let text_encoder_config = config("text_encoder/config.json")?;
    let scheduler_config = config("scheduler/scheduler_config.json")?;
    let tokenizer = match &opts.tokenizer {
        Some(dir) => tokenizer_dir(dir)?,
        None => TokenizerFiles::Dir(find_tokenizer(root, "tokenizer/")?.ok_or_else(|| missing(root, "tokenizer/vocab.json"))?),
    };
    let variant = opts.variant.as_deref();
    Ok(ModelFiles {
        id: id.to_string(),
        model_index,
        unet_config,
        vae_config,
        text_encoder_config,
        scheduler_config,
        tokenizer_files: tokenizer,
        weights: [
            component_weights(root, Component::Unet, variant)?,
            component_weights(root, Component::Vae, variant)?,
            component_weights(root, Component::TextEncoder, variant)?,
        ],
    })
}

/// The tokenizer in a folder given by the user: the folder itself, or its `tokenizer/`.
pub(crate) fn tokenizer_dir(dir: &Path) -> Result<TokenizerFiles> {
    let root = LocalDir::new(dir);
    for prefix in ["", "tokenizer/"] {
        if let Some(found) = find_tokenizer(&root, prefix)? {
            return Ok(TokenizerFiles::Dir(found));
        }
    }
    Err(bad_input(
        dir.display(),
        "no tokenizer here (vocab.json and merges.txt, or tokenizer.json)",
        "give the folder that holds them, such as a Stable Diffusion model's tokenizer/",
    ))
}

/// The tokenizer folder `prefix`, when it has `vocab.json` + `merges.txt` (what SD v1 repos
/// ship; looked for first so that a cached hub model needs no request) or `tokenizer.json`.
/// The optional `tokenizer_config.json` and `special_tokens_map.json` (pad token, length) are
/// fetched too, so that the folder is complete.
pub(crate) fn find_tokenizer(root: &dyn ModelRoot, prefix: &str) -> Result<Option<PathBuf>> {
    let found = match root.find(&format!("{prefix}vocab.json"))? {
        Some(vocab) if root.find(&format!("{prefix}merges.txt"))?.is_some() => vocab,
        _ => match root.find(&format!("{prefix}tokenizer.json"))? {
            Some(json) => json,
            None => return Ok(None),
        },
    };
    for config in ["tokenizer_config.json", "special_tokens_map.json"] {
        root.find_optional(&format!("{prefix}{config}"))?;
    }
    Ok(found.parent().map(Path::to_path_buf))
}

/// A component's weights: `<stem>[.variant].safetensors`, else the shards its
/// `<stem>.safetensors.index[.variant].json` lists.
fn component_weights(root: &dyn ModelRoot, c: Component, variant: Option<&str>) -> Result<ComponentWeights> {
    let dir = c.dir_name();
    let stem = c.weights_stem();
    let single = with_variant(&format!("{dir}/{stem}.safetensors"), variant);
    if let Some(path) = root.find(&single)? {
        return ComponentWeights::diffusers(path.clone(), vec![path]);
    }
    let index = with_variant(&format!("{dir}/{stem}.safetensors.index.json"), variant);
    if let Some(index_path) = root.find(&index)? {
        let files = shard_names(&index_path)?
            .iter()
            .map(|shard| {
                let file = format!("{dir}/{shard}");
                root.find(&file)?.ok_or_else(|| missing(root, &file))
            })
            .collect::<Result<Vec<_>>>()?;
        return ComponentWeights::diffusers(index_path, files);
    }
    Err(no_weights(root, c, &single, variant))
}

/// Says why a component has no loadable weights, with what the folder holds instead if known.
fn no_weights(root: &dyn ModelRoot, c: Component, wanted: &str, variant: Option<&str>) -> Error {
    let present = root.list(c.dir_name());
    let safetensors: Vec<&str> =
        present.iter().map(String::as_str).filter(|n| n.ends_with(".safetensors")).collect();
    if !safetensors.is_empty() {
        let listed = safetensors.join(", ");
        let other_variant = safetensors.iter().find_map(|n| {
            n.strip_prefix(c.weights_stem())?.strip_prefix('.')?.strip_suffix(".safetensors")
        });
        let fix = match (variant, other_variant) {
            (Some(v), _) => format!("the folder has {listed} but no {v} variant; drop --variant or get that variant"),
            (None, Some(v)) => format!("the folder has {listed}; pass --variant {v}"),
            (None, None) => format!("the folder has {listed} under other names; re-download the model"),
        };
        return bad_input(root.display(wanted), "missing", fix);
    }
    if let Some(pickle) = present.iter().find(|n| is_pickle(Path::new(n))) {
        return bad_input(
            root.display(&format!("{}/{pickle}", c.dir_name())),
            "pickle weights are not loaded (they can run code)",
            "convert the model to safetensors, e.g. in Python: \
             DiffusionPipeline.from_pretrained(folder).save_pretrained(folder, safe_serialization=True)",
        );
    }
    missing(root, wanted)
}

/// Whether a file is a pickle checkpoint by its extension.
pub(crate) fn is_pickle(path: &Path) -> bool {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or_default().to_ascii_lowercase();
    matches!(ext.as_str(), "bin" | "ckpt" | "pt" | "pth" | "pkl")
}

/// diffusers' `_add_variant`: the variant goes before the last extension
/// (`model.safetensors.index.json` -> `model.safetensors.index.fp16.json`).
fn with_variant(file: &str, variant: Option<&str>) -> String {
    match (variant, file.rsplit_once('.')) {
        (Some(v), Some((head, ext))) => format!("{head}.{v}.{ext}"),
        _ => file.to_string(),
    }
}

/// The shard files named by a `*.safetensors.index.json` `weight_map`, each once, in order.
fn shard_names(index: &Path) -> Result<Vec<String>> {
    let json = read_json(index)?;
    let Some(map) = json.get("weight_map").and_then(Value::as_object) else {
        return Err(bad_input(index.display(), "has no weight_map object", "re-download it"));
    };
    let mut shards: Vec<String> = Vec::new();
    for file in map.values() {
        let Some(file) = file.as_str() else {
            return Err(bad_input(index.display(), "weight_map has a non-string file name", "re-download it"));
        };
        // Shards sit beside the index; anything else would let the index point anywhere.
        if file.is_empty() || file.contains(['/', '\\']) || file == ".." {
            return Err(bad_input(index.display(), format!("names a shard outside its folder: {file}"), "re-download it"));
        }
        if !shards.iter().any(|s| s == file) {
            shards.push(file.to_string());
        }
    }
    shards.sort();
    Ok(shards)
}

fn missing(root: &dyn ModelRoot, file: &str) -> Error {
    let (problem, fix) = root.absence();
    bad_input(root.display(file), problem, fix)
}

pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let value: Value = serde_json::from_str(&text)
        .map_err(|e| bad_input(path.display(), format!("not valid JSON ({e})"), "re-download it or fix the file"))?;
    if !value.is_object() {
        return Err(bad_input(path.display(), "not a JSON object", "re-download it or fix the file"));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variant_goes_before_the_last_extension() {
        let v = Some("fp16");
        assert_eq!(with_variant("unet/diffusion_pytorch_model.safetensors", v), "unet/diffusion_pytorch_model.fp16.safetensors");
        assert_eq!(with_variant("text_encoder/model.safetensors.index.json", v), "text_encoder/model.safetensors.index.fp16.json");
        assert_eq!(with_variant("vae/diffusion_pytorch_model.safetensors", None), "vae/diffusion_pytorch_model.safetensors");
    }

    #[test]
    fn pickles_are_known_by_extension() {
        assert!(is_pickle(Path::new("sd-v1-4.ckpt")));
        assert!(is_pickle(Path::new("unet/diffusion_pytorch_model.BIN")));
        assert!(!is_pickle(Path::new("model.safetensors")));
        assert!(!is_pickle(Path::new("model")));
    }
}
