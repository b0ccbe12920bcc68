//! Dequantization of GGUF tensor data (GGML blocks) into a device tensor.
//!
//! `bytes` holds whole blocks of `ty` for `shape.iter().product()` elements,
//! in storage order. The CPU backend runs [`crate::quant`]'s reference
//! dequantization; the wgpu backend uploads the raw blocks and expands them
//! in shaders/dequantize.wgsl, which follows the same steps. F32, F16,
//! BF16, Q8_0, Q4_0 and Q4_1 are supported; the result is f32 or f16.

use crate::device::{Backend, Device};
use crate::error::{shape_err, Error, Result};
use crate::quant::{self, GgmlType};
use crate::tensor::{CpuStorage, DType, Storage, Tensor};

impl Device {
    /// Dequantizes the GGML blocks in `bytes` into a tensor of `shape` and `dtype`.
    pub fn dequantize(&self, ty: GgmlType, bytes: &[u8], shape: &[usize], dtype: DType) -> Result<Tensor> {
        const OP: &str = "dequantize";
        if dtype == DType::U32 {
            return Err(Error::InvalidValue { op: OP, message: "dequantized tensors are f32 or f16, not u32".into() });
        }
        let numel: usize = shape.iter().product();
        match self.backend() {
            Backend::Cpu => {
                let storage = match dtype {
                    DType::F16 => CpuStorage::F16(quant::dequantize_to_f16(ty, bytes, numel)?),
                    _ => CpuStorage::F32(quant::dequantize(ty, bytes, numel)?),
                };
                Ok(Tensor::from_storage(shape.to_vec(), dtype, Storage::Cpu(storage), self.id()))
            }
            Backend::Gpu(gpu) => {
                if !ty.can_dequantize() {
                    return Err(Error::Unsupported {
                        op: OP,
                        backend: "wgpu".into(),
                        reason: format!("GGML type {ty} cannot be dequantized yet; supported types: {}", quant::dequantizable_type_names()),
                    });
                }
                let expected = ty.byte_size(numel).map_err(|_| {
                    shape_err!(OP, "{numel} elements are not a whole number of {ty} blocks of {} elements", ty.block_size())
                })?;
                if bytes.len() != expected {
                    return Err(shape_err!(
                        OP,
                        "{numel} elements of {ty} take {expected} bytes ({} blocks of {} bytes), but {} bytes were given",
                        numel / ty.block_size(),
                        ty.type_size(),
                        bytes.len()
                    ));
                }
                gpu.dequantize(ty, bytes, shape.to_vec(), dtype)
            }
        }
    }
}
