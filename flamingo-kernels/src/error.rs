//! The error type of every fallible kernel operation.

use thiserror::Error;

/// Everything that can go wrong while creating a device or running an op.
///
/// Messages name the op or tensor involved and the values that did not fit,
/// so that a caller can pass them straight to a user.
#[derive(Debug, Error)]
pub enum Error {
    /// Two or more tensors, or a tensor and the op's parameters, disagree in shape.
    #[error("{op}: {message}")]
    Shape { op: &'static str, message: String },

    /// The op does not accept this element type for this operand.
    #[error("{op}: expected {expected} for {operand}, found {found}")]
    DType {
        op: &'static str,
        operand: &'static str,
        expected: &'static str,
        found: &'static str,
    },

    /// A tensor lives on another device than the one asked to run the op.
    #[error("{op}: tensor `{operand}` is on {found}, but the op runs on {expected}; move it with `Device::transfer` first")]
    DeviceMismatch {
        op: &'static str,
        operand: &'static str,
        expected: String,
        found: String,
    },

    /// An in-place op was given a tensor that other handles still share.
    #[error("{op}: tensor `{operand}` is shared with another handle, so it cannot be changed in place; copy it with `Device::copy` first")]
    Shared { op: &'static str, operand: &'static str },

    /// An index, id or parameter value is outside the range the op accepts.
    #[error("{op}: {message}")]
    InvalidValue { op: &'static str, message: String },

    /// The requested device could not be opened or does not exist.
    #[error("device: {0}")]
    Device(String),

    /// The GPU driver reported a failure (out of memory, lost device, failed map).
    #[error("GPU: {0}")]
    Gpu(String),

    /// The op or element type is not implemented on this backend.
    #[error("{op} is not supported on {backend}: {reason}")]
    Unsupported {
        op: &'static str,
        backend: String,
        reason: String,
    },
}

/// Shorthand for results of kernel operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Builds an [`Error::Shape`] from a format string.
macro_rules! shape_err {
    ($op:expr, $($arg:tt)*) => {
        $crate::error::Error::Shape { op: $op, message: format!($($arg)*) }
    };
}

/// Builds an [`Error::InvalidValue`] from a format string.
macro_rules! value_err {
    ($op:expr, $($arg:tt)*) => {
        $crate::error::Error::InvalidValue { op: $op, message: format!($($arg)*) }
    };
}

pub(crate) use shape_err;
pub(crate) use value_err;
