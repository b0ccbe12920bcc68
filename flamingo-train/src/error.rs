//! The error type of training and evaluation.

use std::path::PathBuf;

use thiserror::Error;

use crate::data::DataError;

/// Everything that can stop a training or evaluation run.
///
/// Each message names the value, file or step involved and what to do.
#[derive(Debug, Error)]
pub enum TrainError {
    /// A configuration value is missing, out of range or inconsistent.
    #[error("invalid training configuration: {0}")]
    Config(String),

    /// One configuration field is missing, out of range or does not fit
    /// the others. `key` is the field's dotted TOML path, such as
    /// `optimizer.lr`, and `problem` is written to follow it, so that a
    /// command line can name its own flag in the key's place.
    #[error("invalid training configuration: `{key}` {problem}")]
    Field { key: String, problem: String },

    /// A configuration file could not be parsed.
    #[error("{}: {message}", path.display())]
    ConfigFile { path: PathBuf, message: String },

    /// A file or folder could not be created, read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The dataset as a whole is unusable.
    #[error(transparent)]
    Data(#[from] DataError),

    /// Loading or running a backbone or the connector failed.
    #[error(transparent)]
    Model(#[from] flamingo_model::Error),

    /// A device op failed.
    #[error(transparent)]
    Kernel(#[from] flamingo_kernels::Error),

    /// The loss of a step was NaN or infinite; the step was not applied.
    #[error(
        "the loss at step {step} is {loss}, so the run stopped before applying that step; {}",
        last_good_hint(.last_checkpoint)
    )]
    NonFiniteLoss { step: u64, loss: f32, last_checkpoint: Option<PathBuf> },

    /// The gradient norm of a step was NaN or infinite; the step was not applied.
    #[error(
        "the gradient norm at step {step} is {norm}, so the run stopped before applying that step; {}",
        last_good_hint(.last_checkpoint)
    )]
    NonFiniteGradient { step: u64, norm: f32, last_checkpoint: Option<PathBuf> },

    /// A checkpoint to resume or evaluate is missing, incomplete or does not fit this run.
    #[error("checkpoint {}: {message}", path.display())]
    Checkpoint { path: PathBuf, message: String },

    /// A [`TrainObserver`](crate::TrainObserver) callback failed.
    #[error("training observer failed: {0}")]
    Observer(String),
}

fn last_good_hint(checkpoint: &Option<PathBuf>) -> String {
    match checkpoint {
        Some(path) => format!(
            "the last good checkpoint is {}; resume from it with a lower learning rate or stronger gradient clipping",
            path.display()
        ),
        None => "no checkpoint was written yet; restart with a lower learning rate or stronger gradient clipping".to_string(),
    }
}

impl TrainError {
    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TrainError::Io { path: path.into(), source }
    }

    /// Builds a [`TrainError::Field`] for the field at `key`.
    pub fn field(key: impl Into<String>, problem: impl Into<String>) -> Self {
        TrainError::Field { key: key.into(), problem: problem.into() }
    }

    /// Builds a checkpoint error for `path`.
    pub fn checkpoint(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        TrainError::Checkpoint { path: path.into(), message: message.into() }
    }
}

/// Shorthand for results of training operations.
pub type Result<T, E = TrainError> = std::result::Result<T, E>;
