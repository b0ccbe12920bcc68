//! The error type of model loading, conversion and inference.

use std::path::PathBuf;

use thiserror::Error;

/// Everything that can go wrong while loading or running a model.
///
/// Each variant names the file, tensor or value involved, so the message
/// alone tells a user what to fix.
#[derive(Debug, Error)]
pub enum Error {
    /// A file could not be opened, read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A file is not valid in its format (truncated, bad magic, bad header).
    #[error("{}: {message}", path.display())]
    Format { path: PathBuf, message: String },

    /// A checkpoint lacks a tensor the model needs.
    #[error("{source_name}: tensor `{name}` is missing; check that the checkpoint matches the model (its config.json or GGUF architecture)")]
    MissingTensor { source_name: String, name: String },

    /// A checkpoint tensor has another shape than the config implies.
    #[error("{source_name}: tensor `{name}` has shape {found:?}, but the config implies {expected:?}")]
    TensorShape {
        source_name: String,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    /// A configuration value is missing, invalid or unsupported.
    #[error("{origin}: {message}")]
    Config { origin: String, message: String },

    /// A feature or format that this crate does not implement.
    #[error("unsupported: {0}")]
    Unsupported(String),

    /// The tokenizer could not be built or failed on an input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// An image could not be decoded or processed.
    #[error("{origin}: {message}")]
    Image { origin: String, message: String },

    /// A caller passed input the model cannot take (too long, mismatched counts).
    #[error("{0}")]
    InvalidInput(String),

    /// An op on the device failed.
    #[error(transparent)]
    Kernel(#[from] flamingo_kernels::Error),
}

/// Shorthand for results of model operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    /// Builds a format error for `path`.
    pub fn format(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Format { path: path.into(), message: message.into() }
    }
}
