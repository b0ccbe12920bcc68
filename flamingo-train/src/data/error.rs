//! Fatal dataset errors ([`DataError`]) and the per-sample failure ([`BadSample`]).

use std::fmt;
use std::path::PathBuf;

use thiserror::Error;

use super::skip::SkipReason;

/// A failure that makes a whole dataset unusable.
///
/// Each message names the file or value involved and what to change.
#[derive(Debug, Error)]
pub enum DataError {
    /// A file the dataset needs could not be opened or read.
    #[error("failed to read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A dataset file or folder does not exist.
    #[error("{} not found; {hint}", path.display())]
    NotFound { path: PathBuf, hint: String },

    /// A file is not valid in its format (truncated, wrong header, bad gzip data).
    #[error("{}: {message}", path.display())]
    Format { path: PathBuf, message: String },

    /// An IDX file starts with another magic number than its role requires.
    #[error(
        "{}: IDX magic number is {found:#010x}, expected {expected:#010x} for an {role} file; \
         check that this is the {role} file of an MNIST-style dataset",
        path.display()
    )]
    IdxMagic {
        path: PathBuf,
        found: u32,
        expected: u32,
        role: &'static str,
    },

    /// The image and label files of an IDX dataset hold different numbers of items.
    #[error(
        "{} holds {images} images but {} holds {labels} labels; \
         pass the label file that belongs to this image file",
        images_path.display(),
        labels_path.display()
    )]
    CountMismatch {
        images_path: PathBuf,
        images: usize,
        labels_path: PathBuf,
        labels: usize,
    },

    /// A label has no entry in the class-name list.
    #[error(
        "{}: item {index} has label {label}, but the class list has only {classes} names; \
         pass a class list that covers every label",
        path.display()
    )]
    LabelOutOfRange {
        path: PathBuf,
        index: usize,
        label: u8,
        classes: usize,
    },

    /// A CSV header lacks a column the configuration names.
    #[error(
        "{}: the header has no column `{column}` (columns: {found}); \
         set the column name in the CSV configuration",
        path.display()
    )]
    MissingColumn {
        path: PathBuf,
        column: String,
        found: String,
    },

    /// No sample of the dataset can be used.
    #[error("{dataset}: no usable samples ({detail}); fix the data or the paths in it and retry")]
    NoSamples { dataset: String, detail: String },

    /// A prompt or class template is malformed or lacks a required part.
    #[error("invalid template {template:?}: {reason}")]
    Template { template: String, reason: String },

    /// A shard pattern has unbalanced braces or an invalid range.
    #[error("invalid shard pattern {pattern:?}: {reason}")]
    Pattern { pattern: String, reason: String },

    /// A WebDataset shard is missing or is not a tar archive.
    #[error("WebDataset shard {}: {reason}; re-download the shard or remove it from the shard list", path.display())]
    Shard { path: PathBuf, reason: String },

    /// The background thread that reads shards could not be started.
    #[error("failed to start a WebDataset shard reader thread: {0}")]
    Thread(#[source] std::io::Error),

    /// A saved cursor does not fit the dataset it is restored into.
    #[error("cannot restore the data position: {0}")]
    Cursor(String),

    /// A configuration value is outside its valid range.
    #[error("invalid data configuration: {0}")]
    Config(String),
}

impl DataError {
    /// Builds a [`DataError::Io`] for `path`.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }

    /// Builds a [`DataError::Format`] for `path`.
    pub(crate) fn format(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        DataError::Format {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// One sample that cannot be used; it is skipped and counted, never fatal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadSample {
    /// The reason for skipping the sample.
    pub reason: SkipReason,
    /// The sample's origin: `file:line`, `shard.tar:key` or `file[index]`.
    pub id: String,
    /// The failing path or value and the underlying error.
    pub detail: String,
}

impl BadSample {
    /// Builds a bad sample from its parts.
    pub fn new(reason: SkipReason, id: impl Into<String>, detail: impl Into<String>) -> Self {
        BadSample {
            reason,
            id: id.into(),
            detail: detail.into(),
        }
    }
}

impl fmt::Display for BadSample {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.id, self.reason, self.detail)
    }
}

impl std::error::Error for BadSample {}
