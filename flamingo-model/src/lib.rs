//! Frozen backbones, the Perceiver Resampler, gated cross-attention and generation for Flamingo.

pub mod convert;
pub mod error;
pub mod flamingo;
pub mod lm;
pub mod loader;
pub mod pipeline;
pub mod vision;

pub use error::{Error, Result};
pub use pipeline::FlamingoPipeline;
