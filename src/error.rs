//! The library's error type. Every message names the input at fault and what to do about it,
//! on one line, so the CLI can print it as is.

use std::fmt::Display;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Something the user gave (a path, a flag, a file's contents) is unusable.
    #[error("{input}: {problem}; {fix}")]
    BadInput { input: String, problem: String, fix: String },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, #[source] source: std::io::Error },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// `input: problem; fix` — the one-line error for bad user input.
pub fn bad_input(input: impl Display, problem: impl Display, fix: impl Display) -> Error {
    Error::BadInput { input: input.to_string(), problem: problem.to_string(), fix: fix.to_string() }
}

/// Attaches the path to an I/O error.
pub fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}
