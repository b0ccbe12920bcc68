//! Device tensors: a shape, an element type and storage on one device.
//!
//! Tensors are dense and row-major; there are no strides or views. Cloning a
//! tensor is cheap and shares its storage. Ops that change a tensor in place
//! (accumulating gradients, optimizer steps) require that no clone shares it,
//! so the change can never surprise another holder.

use std::sync::Arc;

use half::f16;

use crate::error::{shape_err, Error, Result};
use crate::gpu::GpuBuffer;
use crate::host::{HostData, HostTensor};

/// The element type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    U32,
}

impl DType {
    /// The size of one element in bytes.
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::F16 => 2,
        }
    }

    /// The lower-case name used in messages.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::U32 => "u32",
        }
    }
}

/// Elements of a tensor that lives in host memory on the CPU backend.
#[derive(Debug)]
pub(crate) enum CpuStorage {
    F32(Vec<f32>),
    F16(Vec<f16>),
    U32(Vec<u32>),
}

/// Where a tensor's elements live.
#[derive(Debug)]
pub(crate) enum Storage {
    Cpu(CpuStorage),
    Gpu(GpuBuffer),
}

/// A dense row-major tensor on one [`crate::Device`].
#[derive(Debug, Clone)]
pub struct Tensor {
    pub(crate) shape: Vec<usize>,
    pub(crate) dtype: DType,
    pub(crate) storage: Arc<Storage>,
    /// Identifies the device that owns the storage, for mismatch checks.
    pub(crate) device_id: u64,
}

impl Tensor {
    pub(crate) fn from_storage(shape: Vec<usize>, dtype: DType, storage: Storage, device_id: u64) -> Self {
        Self { shape, dtype, storage: Arc::new(storage), device_id }
    }

    pub(crate) fn cpu_f32(shape: Vec<usize>, values: Vec<f32>, device_id: u64) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), values.len());
        Self::from_storage(shape, DType::F32, Storage::Cpu(CpuStorage::F32(values)), device_id)
    }

    pub(crate) fn cpu_u32(shape: Vec<usize>, values: Vec<u32>, device_id: u64) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), values.len());
        Self::from_storage(shape, DType::U32, Storage::Cpu(CpuStorage::U32(values)), device_id)
    }

    /// The shape, outermost dimension first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The number of dimensions.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// The size of dimension `axis`; negative values count from the end.
    pub fn dim(&self, axis: isize) -> usize {
        let index = if axis < 0 { self.shape.len() as isize + axis } else { axis };
        self.shape[index as usize]
    }

    /// The number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The size of the storage in bytes.
    pub fn size_in_bytes(&self) -> usize {
        self.numel() * self.dtype.size_in_bytes()
    }

    /// The size of the last dimension and the product of all others, as a
    /// matrix of rows by columns. A scalar is one row of one column.
    pub fn rows_cols(&self) -> (usize, usize) {
        match self.shape.last() {
            Some(&cols) => (self.numel() / cols.max(1), cols),
            None => (1, 1),
        }
    }

    /// Returns the same storage viewed with another shape of equal size.
    pub fn reshape(&self, shape: impl Into<Vec<usize>>) -> Result<Tensor> {
        let shape = shape.into();
        let numel: usize = shape.iter().product();
        if numel != self.numel() {
            return Err(shape_err!(
                "reshape",
                "cannot view a tensor of shape {:?} ({} elements) as {:?} ({} elements)",
                self.shape,
                self.numel(),
                shape,
                numel
            ));
        }
        Ok(Tensor { shape, ..self.clone() })
    }

    /// Whether no other handle shares this tensor's storage.
    pub fn is_unique(&self) -> bool {
        Arc::strong_count(&self.storage) == 1
    }

    /// Copies the tensor into host memory, waiting for pending GPU work.
    pub fn to_host(&self) -> Result<HostTensor> {
        let data = match self.storage.as_ref() {
            Storage::Cpu(CpuStorage::F32(values)) => HostData::F32(values.clone()),
            Storage::Cpu(CpuStorage::F16(values)) => HostData::F16(values.clone()),
            Storage::Cpu(CpuStorage::U32(values)) => HostData::U32(values.clone()),
            Storage::Gpu(buffer) => buffer.download(self.dtype, self.numel())?,
        };
        HostTensor::new(self.shape.clone(), data)
    }

    /// Copies the elements to host memory as f32, converting f16 and u32.
    pub fn to_vec_f32(&self) -> Result<Vec<f32>> {
        match self.storage.as_ref() {
            Storage::Cpu(CpuStorage::F32(values)) => Ok(values.clone()),
            _ => Ok(self.to_host()?.to_f32()),
        }
    }

    /// Copies u32 elements (ids, indices) to host memory.
    pub fn to_vec_u32(&self) -> Result<Vec<u32>> {
        match self.to_host()?.data {
            HostData::U32(values) => Ok(values),
            _ => Err(Error::DType {
                op: "to_vec_u32",
                operand: "tensor",
                expected: "u32",
                found: self.dtype.name(),
            }),
        }
    }

    /// Copies a one-element tensor to the host as an f32.
    pub fn to_scalar(&self) -> Result<f32> {
        if self.numel() != 1 {
            return Err(shape_err!("to_scalar", "expected one element, found shape {:?}", self.shape));
        }
        Ok(self.to_vec_f32()?[0])
    }

    /// The f32 elements of a CPU tensor.
    pub(crate) fn cpu_f32_slice(&self, op: &'static str, operand: &'static str) -> Result<&[f32]> {
        match self.storage.as_ref() {
            Storage::Cpu(CpuStorage::F32(values)) => Ok(values),
            Storage::Cpu(_) => Err(self.dtype_error(op, operand, "f32")),
            Storage::Gpu(_) => Err(not_on_cpu(op, operand)),
        }
    }

    /// The u32 elements of a CPU tensor.
    pub(crate) fn cpu_u32_slice(&self, op: &'static str, operand: &'static str) -> Result<&[u32]> {
        match self.storage.as_ref() {
            Storage::Cpu(CpuStorage::U32(values)) => Ok(values),
            Storage::Cpu(_) => Err(self.dtype_error(op, operand, "u32")),
            Storage::Gpu(_) => Err(not_on_cpu(op, operand)),
        }
    }

    /// The elements of a CPU tensor as f32, converting f16 storage.
    pub(crate) fn cpu_f32_cow(&self, op: &'static str, operand: &'static str) -> Result<std::borrow::Cow<'_, [f32]>> {
        match self.storage.as_ref() {
            Storage::Cpu(CpuStorage::F32(values)) => Ok(std::borrow::Cow::Borrowed(values)),
            Storage::Cpu(CpuStorage::F16(values)) => {
                Ok(std::borrow::Cow::Owned(values.iter().map(|value| value.to_f32()).collect()))
            }
            Storage::Cpu(CpuStorage::U32(_)) => Err(self.dtype_error(op, operand, "f32 or f16")),
            Storage::Gpu(_) => Err(not_on_cpu(op, operand)),
        }
    }

    /// Mutable f32 elements of a CPU tensor that no other handle shares.
    pub(crate) fn cpu_f32_mut(&mut self, op: &'static str, operand: &'static str) -> Result<&mut [f32]> {
        let dtype = self.dtype;
        let storage = Arc::get_mut(&mut self.storage).ok_or(Error::Shared { op, operand })?;
        match storage {
            Storage::Cpu(CpuStorage::F32(values)) => Ok(values),
            Storage::Cpu(_) => Err(Error::DType { op, operand, expected: "f32", found: dtype.name() }),
            Storage::Gpu(_) => Err(not_on_cpu(op, operand)),
        }
    }

    /// The GPU buffer of a tensor, for the wgpu backend.
    pub(crate) fn gpu_buffer(&self, op: &'static str, operand: &'static str) -> Result<&GpuBuffer> {
        match self.storage.as_ref() {
            Storage::Gpu(buffer) => Ok(buffer),
            Storage::Cpu(_) => Err(Error::DeviceMismatch {
                op,
                operand,
                expected: "a GPU".into(),
                found: "the CPU".into(),
            }),
        }
    }

    /// The GPU buffer of a tensor that no other handle shares, for in-place ops.
    pub(crate) fn gpu_buffer_unique(&mut self, op: &'static str, operand: &'static str) -> Result<&GpuBuffer> {
        if !self.is_unique() {
            return Err(Error::Shared { op, operand });
        }
        self.gpu_buffer(op, operand)
    }

    pub(crate) fn dtype_error(&self, op: &'static str, operand: &'static str, expected: &'static str) -> Error {
        Error::DType { op, operand, expected, found: self.dtype.name() }
    }
}

fn not_on_cpu(op: &'static str, operand: &'static str) -> Error {
    Error::DeviceMismatch { op, operand, expected: "the CPU".into(), found: "a GPU".into() }
}
