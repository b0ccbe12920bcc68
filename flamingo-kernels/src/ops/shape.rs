//! Copies that rearrange elements: concatenation, slicing, axis permutation
//! and element type conversion.

use half::f16;

use crate::device::{Backend, Device};
use crate::error::{shape_err, Result};
use crate::tensor::{CpuStorage, DType, Storage, Tensor};

impl Device {
    /// Joins tensors along `axis`; all other axes must agree.
    pub fn concat(&self, tensors: &[&Tensor], axis: usize) -> Result<Tensor> {
        const OP: &str = "concat";
        let first = tensors.first().ok_or_else(|| shape_err!(OP, "nothing to concatenate"))?;
        if axis >= first.rank() {
            return Err(shape_err!(OP, "axis {axis} is out of range for shape {:?}", first.shape()));
        }
        for t in tensors {
            self.check_f(OP, "tensors", t, DType::F32)?;
            let same_rank = t.rank() == first.rank();
            let same_other_axes = same_rank && (0..t.rank()).all(|a| a == axis || t.shape[a] == first.shape[a]);
            if !same_other_axes {
                return Err(shape_err!(OP, "shapes {:?} and {:?} differ outside axis {axis}", first.shape(), t.shape()));
            }
        }
        let outer: usize = first.shape[..axis].iter().product();
        let inner: usize = first.shape[axis + 1..].iter().product();
        let mut out_shape = first.shape.clone();
        out_shape[axis] = tensors.iter().map(|t| t.shape[axis]).sum();
        match self.backend() {
            Backend::Cpu => {
                let mut out = Vec::with_capacity(out_shape.iter().product());
                let slices = tensors.iter().map(|t| t.cpu_f32_slice(OP, "tensors")).collect::<Result<Vec<_>>>()?;
                for o in 0..outer {
                    for (t, values) in tensors.iter().zip(&slices) {
                        let block = t.shape[axis] * inner;
                        out.extend_from_slice(&values[o * block..(o + 1) * block]);
                    }
                }
                Ok(Tensor::cpu_f32(out_shape, out, self.id()))
            }
            Backend::Gpu(gpu) => gpu.concat(tensors, outer, inner, axis, out_shape),
        }
    }

    /// Returns elements `start .. start + len` of `axis`.
    pub fn narrow(&self, x: &Tensor, axis: usize, start: usize, len: usize) -> Result<Tensor> {
        const OP: &str = "narrow";
        self.check_f(OP, "x", x, DType::F32)?;
        if axis >= x.rank() || start + len > x.shape[axis] {
            return Err(shape_err!(OP, "range {start}..{} of axis {axis} is outside shape {:?}", start + len, x.shape()));
        }
        let outer: usize = x.shape[..axis].iter().product();
        let inner: usize = x.shape[axis + 1..].iter().product();
        let mut out_shape = x.shape.clone();
        out_shape[axis] = len;
        match self.backend() {
            Backend::Cpu => {
                let values = x.cpu_f32_slice(OP, "x")?;
                let mut out = Vec::with_capacity(outer * len * inner);
                for o in 0..outer {
                    let base = (o * x.shape[axis] + start) * inner;
                    out.extend_from_slice(&values[base..base + len * inner]);
                }
                Ok(Tensor::cpu_f32(out_shape, out, self.id()))
            }
            Backend::Gpu(gpu) => gpu.narrow(x, outer, inner, x.shape[axis], start, len, out_shape),
        }
    }

    /// Reorders axes: output axis a is input axis `perm[a]`.
    pub fn permute(&self, x: &Tensor, perm: &[usize]) -> Result<Tensor> {
        const OP: &str = "permute";
        self.check_f(OP, "x", x, DType::F32)?;
        let mut seen = vec![false; x.rank()];
        if perm.len() != x.rank() || perm.iter().any(|&a| a >= x.rank() || std::mem::replace(&mut seen[a], true)) {
            return Err(shape_err!(OP, "{perm:?} is not a permutation of the {} axes of {:?}", x.rank(), x.shape()));
        }
        let out_shape: Vec<usize> = perm.iter().map(|&a| x.shape[a]).collect();
        match self.backend() {
            Backend::Cpu => {
                let values = x.cpu_f32_slice(OP, "x")?;
                let rank = x.rank();
                let mut in_strides = vec![1usize; rank];
                for a in (0..rank.saturating_sub(1)).rev() {
                    in_strides[a] = in_strides[a + 1] * x.shape[a + 1];
                }
                let strides: Vec<usize> = perm.iter().map(|&a| in_strides[a]).collect();
                let mut out = Vec::with_capacity(values.len());
                let mut index = vec![0usize; rank];
                for _ in 0..values.len() {
                    out.push(values[index.iter().zip(&strides).map(|(i, s)| i * s).sum::<usize>()]);
                    for a in (0..rank).rev() {
                        index[a] += 1;
                        if index[a] < out_shape[a] {
                            break;
                        }
                        index[a] = 0;
                    }
                }
                Ok(Tensor::cpu_f32(out_shape, out, self.id()))
            }
            Backend::Gpu(gpu) => gpu.permute(x, perm, out_shape),
        }
    }

    /// Converts between f32 and f16, rounding to nearest.
    pub fn cast(&self, x: &Tensor, dtype: DType) -> Result<Tensor> {
        const OP: &str = "cast";
        self.check(OP, "x", x)?;
        if x.dtype() == dtype {
            return Ok(x.clone());
        }
        if dtype == DType::U32 || x.dtype() == DType::U32 {
            return Err(shape_err!(OP, "only f32 and f16 convert into each other, not {} to {}", x.dtype().name(), dtype.name()));
        }
        match self.backend() {
            Backend::Cpu => {
                let values = x.cpu_f32_cow(OP, "x")?;
                let storage = match dtype {
                    DType::F16 => CpuStorage::F16(values.iter().map(|&v| f16::from_f32(v)).collect()),
                    _ => CpuStorage::F32(values.into_owned()),
                };
                Ok(Tensor::from_storage(x.shape.clone(), dtype, Storage::Cpu(storage), self.id()))
            }
            Backend::Gpu(gpu) => gpu.cast(x, dtype),
        }
    }
}
