//! Tensors in host memory: what loaders produce and what downloads return.

use half::f16;

use crate::error::{shape_err, Result};
use crate::tensor::DType;

/// The elements of a [`HostTensor`], row-major.
#[derive(Debug, Clone, PartialEq)]
pub enum HostData {
    F32(Vec<f32>),
    F16(Vec<f16>),
    U32(Vec<u32>),
}

/// A dense row-major tensor in host memory.
///
/// Checkpoint loaders return these; [`crate::Device::upload`] turns one into
/// a device tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: HostData,
}

impl HostTensor {
    /// Wraps `data` as a tensor of `shape`, checking that the sizes agree.
    pub fn new(shape: impl Into<Vec<usize>>, data: HostData) -> Result<Self> {
        let shape = shape.into();
        let expected: usize = shape.iter().product();
        let found = match &data {
            HostData::F32(values) => values.len(),
            HostData::F16(values) => values.len(),
            HostData::U32(values) => values.len(),
        };
        if expected != found {
            return Err(shape_err!(
                "HostTensor::new",
                "shape {shape:?} has {expected} elements but {found} values were given"
            ));
        }
        Ok(Self { shape, data })
    }

    /// Wraps f32 values as a tensor of `shape`.
    pub fn from_f32(shape: impl Into<Vec<usize>>, values: Vec<f32>) -> Result<Self> {
        Self::new(shape, HostData::F32(values))
    }

    /// Wraps f16 values as a tensor of `shape`.
    pub fn from_f16(shape: impl Into<Vec<usize>>, values: Vec<f16>) -> Result<Self> {
        Self::new(shape, HostData::F16(values))
    }

    /// Wraps u32 values (token ids, indices) as a tensor of `shape`.
    pub fn from_u32(shape: impl Into<Vec<usize>>, values: Vec<u32>) -> Result<Self> {
        Self::new(shape, HostData::U32(values))
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        match self.data {
            HostData::F32(_) => DType::F32,
            HostData::F16(_) => DType::F16,
            HostData::U32(_) => DType::U32,
        }
    }

    /// The number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Returns the values as f32, converting f16 and u32 elements.
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.data {
            HostData::F32(values) => values.clone(),
            HostData::F16(values) => values.iter().map(|value| value.to_f32()).collect(),
            HostData::U32(values) => values.iter().map(|&value| value as f32).collect(),
        }
    }

    /// Converts the elements to f32 in place of the original storage.
    pub fn into_f32(self) -> HostTensor {
        match self.data {
            HostData::F32(_) => self,
            _ => HostTensor {
                data: HostData::F32(self.to_f32()),
                shape: self.shape,
            },
        }
    }

    /// Converts the elements to f16, rounding to nearest.
    pub fn into_f16(self) -> HostTensor {
        let data = match self.data {
            HostData::F16(values) => HostData::F16(values),
            HostData::F32(values) => HostData::F16(values.iter().map(|&v| f16::from_f32(v)).collect()),
            HostData::U32(values) => {
                HostData::F16(values.iter().map(|&v| f16::from_f32(v as f32)).collect())
            }
        };
        HostTensor { shape: self.shape, data }
    }
}
