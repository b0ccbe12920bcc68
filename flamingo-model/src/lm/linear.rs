//! A frozen linear layer and the helpers that load frozen weights.
//!
//! x is [..., in], y = x·Wᵀ + b is [..., out], W is stored [out, in] as a
//! PyTorch `Linear` stores it. The backward pass returns dx = dy·W only:
//! frozen layers never compute weight gradients.

use flamingo_kernels::{DType, Device, HostData, HostTensor, Matmul, Tensor};

use crate::error::{Error, Result};
use crate::loader::WeightSource;

/// A frozen `Linear`: an f32 or f16 weight and an f32 bias.
#[derive(Debug, Clone)]
pub struct Linear {
    /// [out, in].
    pub weight: Tensor,
    /// [out].
    pub bias: Option<Tensor>,
}

impl Linear {
    /// Wraps an already uploaded weight and bias.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// Returns x·Wᵀ + b.
    pub fn forward(&self, device: &Device, x: &Tensor) -> Result<Tensor> {
        Ok(device.matmul(x, &self.weight, &Matmul::linear(self.bias.as_ref()))?)
    }

    /// Returns dx = dy·W.
    pub fn backward(&self, device: &Device, dy: &Tensor) -> Result<Tensor> {
        Ok(device.matmul(dy, &self.weight, &Matmul::new())?)
    }
}

/// Reads frozen tensors from a checkpoint onto a device: matrices (linear
/// weights, embedding tables) in `dtype`, norm weights and biases in f32.
/// Every tensor's shape is checked before its data is read.
#[derive(Clone, Copy)]
pub struct WeightLoader<'a> {
    pub device: &'a Device,
    pub weights: &'a dyn WeightSource,
    /// f32, or f16 to halve the memory of frozen matrices.
    pub dtype: DType,
}

impl<'a> WeightLoader<'a> {
    /// Creates a loader; `dtype` must be f32 or f16.
    pub fn new(device: &'a Device, weights: &'a dyn WeightSource, dtype: DType) -> Result<Self> {
        if dtype == DType::U32 {
            return Err(Error::InvalidInput("frozen weights can be stored as f32 or f16, not u32".into()));
        }
        Ok(Self { device, weights, dtype })
    }

    /// Loads matrix `name` of shape `shape` in the loader's dtype.
    pub fn matrix(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let host = self.weights.tensor_with_shape(name, shape)?;
        self.upload_matrix(host)
    }

    /// Uploads a host matrix in the loader's dtype.
    pub fn upload_matrix(&self, host: HostTensor) -> Result<Tensor> {
        Ok(self.device.upload_as(host, self.dtype)?)
    }

    /// Loads vector `name` of `len` elements as f32.
    pub fn vector(&self, name: &str, len: usize) -> Result<Tensor> {
        let host = self.weights.tensor_f32_with_shape(name, &[len])?;
        Ok(self.device.upload_as(host, DType::F32)?)
    }

    /// Loads `{prefix}.weight` of shape [out, in] and, when `bias` is set,
    /// `{prefix}.bias` of shape [out].
    pub fn linear(&self, prefix: &str, out: usize, input: usize, bias: bool) -> Result<Linear> {
        let weight = self.matrix(&format!("{prefix}.weight"), &[out, input])?;
        let bias = if bias { Some(self.vector(&format!("{prefix}.bias"), out)?) } else { None };
        Ok(Linear::new(weight, bias))
    }
}

/// Transposes a host matrix [rows, cols] into [cols, rows], keeping its element type.
pub fn transpose_host(host: HostTensor) -> Result<HostTensor> {
    let [rows, cols] = host.shape[..] else {
        return Err(Error::InvalidInput(format!("transpose_host expects a matrix, found shape {:?}", host.shape)));
    };
    fn transpose<T: Copy>(values: &[T], rows: usize, cols: usize) -> Vec<T> {
        let mut out = Vec::with_capacity(values.len());
        for c in 0..cols {
            out.extend((0..rows).map(|r| values[r * cols + c]));
        }
        out
    }
    let data = match &host.data {
        HostData::F32(values) => HostData::F32(transpose(values, rows, cols)),
        HostData::F16(values) => HostData::F16(transpose(values, rows, cols)),
        HostData::U32(values) => HostData::U32(transpose(values, rows, cols)),
    };
    Ok(HostTensor::new(vec![cols, rows], data)?)
}

/// Splits a host tensor along its first axis into pieces of `sizes[i]` rows.
pub fn split_rows(host: &HostTensor, sizes: &[usize]) -> Result<Vec<HostTensor>> {
    let rows = host.shape.first().copied().unwrap_or(1);
    if sizes.iter().sum::<usize>() != rows {
        return Err(Error::InvalidInput(format!("cannot split {rows} rows into pieces of {sizes:?}")));
    }
    let row_len: usize = host.shape.iter().skip(1).product();
    let mut start = 0;
    let mut pieces = Vec::with_capacity(sizes.len());
    for &size in sizes {
        let range = start * row_len..(start + size) * row_len;
        let data = match &host.data {
            HostData::F32(values) => HostData::F32(values[range].to_vec()),
            HostData::F16(values) => HostData::F16(values[range].to_vec()),
            HostData::U32(values) => HostData::U32(values[range].to_vec()),
        };
        let mut shape = host.shape.clone();
        if shape.is_empty() {
            shape.push(size);
        } else {
            shape[0] = size;
        }
        pieces.push(HostTensor::new(shape, data)?);
        start += size;
    }
    Ok(pieces)
}
