//! Frozen backbones, the Perceiver Resampler, gated cross-attention and generation for Flamingo.

pub mod convert;
pub mod error;
pub mod loader;

pub use error::{Error, Result};
