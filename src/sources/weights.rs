//! A component's safetensors files: checked when resolved, memory-mapped when read, and, for an
//! original checkpoint, renamed to diffusers' names as each tensor is asked for.

use super::Component;
use crate::error::{bad_input, io_err, Error, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where a diffusers-named tensor lives in an original (CompVis) checkpoint.
#[derive(Debug, Clone)]
pub(crate) struct Original {
    pub name: String,
    /// A 1x1 conv weight `[o, i, 1, 1]` that diffusers stores as a linear weight `[o, i]`.
    pub to_linear: bool,
}

/// The files holding one component's weights.
#[derive(Debug)]
pub(crate) struct ComponentWeights {
    /// The file to name in messages: the weights, their shard index, or the single checkpoint.
    shown: PathBuf,
    files: Vec<PathBuf>,
    /// `None`: the files use diffusers' names already.
    renames: Option<Arc<HashMap<String, Original>>>,
}

impl ComponentWeights {
    /// Diffusers-layout weights; each file's header is checked now.
    pub fn diffusers(shown: PathBuf, files: Vec<PathBuf>) -> Result<Self> {
        for f in &files {
            tensor_names(f)?;
        }
        Ok(Self { shown, files, renames: None })
    }

    /// One component of an original checkpoint whose header was already checked.
    pub fn renamed(path: &Path, renames: HashMap<String, Original>) -> Self {
        Self { shown: path.to_path_buf(), files: vec![path.to_path_buf()], renames: Some(Arc::new(renames)) }
    }

    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    pub fn open(&self) -> Result<Reader> {
        // SAFETY: the files are only read; like every mmap user we assume nobody truncates them meanwhile.
        let st = unsafe { MmapedSafetensors::multi(&self.files) }.map_err(|e| {
            bad_input(self.shown.display(), format!("cannot be read any more ({})", root_cause(&e)), "re-download it")
        })?;
        Ok(Reader { st, renames: self.renames.clone() })
    }

    pub fn tensor_error(&self, c: Component, err: candle_core::Error) -> Error {
        let problem = match root_cause(&err) {
            candle_core::Error::CannotFindTensor { path } => format!("the {c} has no tensor {path}"),
            candle_core::Error::UnexpectedShape { msg, expected, got } => match msg.strip_prefix("shape mismatch for ") {
                Some(name) => format!("the {c} tensor {name} has shape {got:?} but the config needs {expected:?}"),
                None => return Error::Candle(err),
            },
            _ => return Error::Candle(err),
        };
        bad_input(
            self.shown.display(),
            problem,
            "the checkpoint does not match the config; use the matching config.json or a different checkpoint",
        )
    }
}

/// Reads a safetensors header: the tensor names, or a one-line error naming the file when it is
/// truncated or corrupt (an interrupted download), before any work is done with it.
pub(crate) fn tensor_names(path: &Path) -> Result<Vec<String>> {
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    // SAFETY: read-only map of a file we do not modify.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err(path))?;
    let (_, metadata) = safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| {
        bad_input(path.display(), format!("truncated or corrupt safetensors file ({e})"), "re-download it")
    })?;
    Ok(metadata.tensors().into_keys().collect())
}

/// An open component: memory-mapped files plus the renaming, if any.
pub(crate) struct Reader {
    st: MmapedSafetensors,
    renames: Option<Arc<HashMap<String, Original>>>,
}

impl Reader {
    /// The diffusers names of all tensors.
    pub fn names(&self) -> Vec<String> {
        match &self.renames {
            None => self.st.tensors().into_iter().map(|(name, _)| name).collect(),
            Some(renames) => renames.keys().cloned().collect(),
        }
    }

    /// A tensor by diffusers name, in the file's dtype.
    pub fn load(&self, name: &str, device: &Device) -> candle_core::Result<Tensor> {
        let Some(renames) = &self.renames else {
            return self.st.load(name, device);
        };
        let original = renames
            .get(name)
            .ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.to_string() }.bt())?;
        let t = self.st.load(&original.name, device)?;
        if original.to_linear {
            linear_from_conv(t)
        } else {
            Ok(t)
        }
    }
}

impl candle_nn::var_builder::SimpleBackend for Reader {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: s,
                got: t.shape().clone(),
            }
            .bt());
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        match &self.renames {
            None => self.st.get(name).is_ok(),
            Some(renames) => renames.contains_key(name),
        }
    }
}

/// `w[:, :, 0, 0]`, as diffusers' conversion does for attention weights stored as 1x1 convs.
fn linear_from_conv(mut t: Tensor) -> candle_core::Result<Tensor> {
    while t.rank() > 2 {
        let last = t.rank() - 1;
        t = t.narrow(last, 0, 1)?.squeeze(last)?;
    }
    Ok(t)
}

/// The error inside candle's backtrace, context and path wrappers.
fn root_cause(mut e: &candle_core::Error) -> &candle_core::Error {
    loop {
        match e {
            candle_core::Error::WithBacktrace { inner, .. }
            | candle_core::Error::Context { inner, .. }
            | candle_core::Error::WithPath { inner, .. } => e = &**inner,
            _ => return e,
        }
    }
}
