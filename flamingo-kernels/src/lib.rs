//! Tensors, devices and the ops of Flamingo, each with its handwritten backward pass.
//!
//! A [`Device`] is either a wgpu adapter or the CPU reference backend; every
//! op is a method on it and behaves the same on both. Tensors are dense,
//! row-major and live on one device. There is no autograd: each op has a
//! forward method and, where training needs it, a backward method that
//! takes what the forward returned.

pub mod device;
pub mod error;
pub mod gpu;
pub mod host;
pub mod ops;
pub mod quant;
pub mod tensor;

pub use device::{choose, Choice, Device, DeviceRequest, GraphicsApi};
pub use error::{Error, Result};
pub use host::{HostData, HostTensor};
pub use ops::activation::Activation;
pub use ops::adamw::AdamW;
pub use ops::attention::{AttentionGrads, AttentionMask, AttentionOutput, MediaMask};
pub use ops::conv::Conv2d;
pub use ops::cross_entropy::{CrossEntropyOutput, IGNORE_INDEX};
pub use ops::elementwise::Binary;
pub use ops::matmul::Matmul;
pub use ops::norm::{NormGrads, NormStats};
pub use tensor::{DType, Tensor};
