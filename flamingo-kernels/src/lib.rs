//! Tensors, devices and the ops of Flamingo, each with its handwritten backward pass.
//!
//! A [`Device`] is either a wgpu adapter or the CPU reference backend; every
//! op is a method on it and behaves the same on both. Tensors are dense,
//! row-major and live on one device. There is no autograd: each op has a
//! forward method and, where training needs it, a backward method that
//! takes what the forward returned.
//!
//! ```
//! use flamingo_kernels::{Device, DeviceRequest, HostTensor, Matmul};
//!
//! # fn main() -> flamingo_kernels::Result<()> {
//! // `Auto` picks a hardware GPU when there is one, else the CPU backend.
//! let device = Device::open(DeviceRequest::Cpu)?;
//! let a = device.upload(&HostTensor::from_f32([2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0])?)?;
//! let b = device.upload(&HostTensor::from_f32([3, 1], vec![1.0, 0.0, -1.0])?)?;
//! let product = device.matmul(&a, &b, &Matmul::new())?;
//! assert_eq!(product.to_host()?.to_f32(), vec![-2.0, -2.0]);
//! # Ok(())
//! # }
//! ```

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
