//! Frozen backbones, the Perceiver Resampler, gated cross-attention and generation for Flamingo.
//!
//! [`FlamingoPipeline`] loads a trained connector with its backbones and
//! captions images. The parts can also be used alone, such as a frozen
//! language model continuing a prompt:
//!
//! ```no_run
//! use flamingo_kernels::{Device, DeviceRequest};
//! use flamingo_model::lm::LanguageModel;
//!
//! # fn main() -> flamingo_model::Result<()> {
//! let device = Device::open(DeviceRequest::Auto)?;
//! let (lm, tokenizer, _special) = LanguageModel::load(&device, "SmolLM2-135M-Instruct.Q4_1.gguf".as_ref())?;
//! let text = lm.greedy_continue(&tokenizer, "The capital of France is", 4)?;
//! println!("{text}");
//! # Ok(())
//! # }
//! ```

pub mod convert;
pub mod error;
pub mod flamingo;
pub mod lm;
pub mod loader;
pub mod pipeline;
pub mod vision;

pub use error::{Error, Result};
pub use pipeline::FlamingoPipeline;
