//! Elementwise arithmetic and trailing-axis broadcasting.
//!
//! `add`, `mul` and `scale` take tensors of one shape. `broadcast_add`
//! adds `y` to every block of `x` when `y`'s shape is a suffix of `x`'s
//! (a bias or a position table); its backward for `y` is
//! [`Device::sum_leading`]. In-place ops need a tensor no clone shares.

use rayon::prelude::*;

use crate::device::{Backend, Device};
use crate::error::{shape_err, Result};
use crate::ops::{par_zip_map, CPU_CHUNK};
use crate::tensor::{DType, Tensor};

/// A binary elementwise operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binary {
    Add,
    Sub,
    Mul,
}

impl Binary {
    fn apply(self, a: f32, b: f32) -> f32 {
        match self {
            Binary::Add => a + b,
            Binary::Sub => a - b,
            Binary::Mul => a * b,
        }
    }
}

pub(crate) fn check_same_shape(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.shape() != b.shape() {
        return Err(shape_err!(op, "operands have shapes {:?} and {:?}; they must be equal", a.shape(), b.shape()));
    }
    Ok(())
}

pub(crate) fn check_suffix(op: &'static str, x: &Tensor, y: &Tensor) -> Result<()> {
    let (long, short) = (x.shape(), y.shape());
    if short.len() > long.len() || long[long.len() - short.len()..] != *short {
        return Err(shape_err!(op, "shape {:?} is not a suffix of {:?}, so it cannot be broadcast", short, long));
    }
    Ok(())
}

impl Device {
    /// Returns `a + b`.
    pub fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        self.binary(a, b, Binary::Add)
    }

    /// Returns `a - b`.
    pub fn sub(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        self.binary(a, b, Binary::Sub)
    }

    /// Returns `a * b`, elementwise.
    pub fn mul(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        self.binary(a, b, Binary::Mul)
    }

    /// Applies `op` elementwise to two f32 tensors of one shape.
    pub fn binary(&self, a: &Tensor, b: &Tensor, op: Binary) -> Result<Tensor> {
        const OP: &str = "binary";
        self.check_f(OP, "a", a, DType::F32)?;
        self.check_f(OP, "b", b, DType::F32)?;
        check_same_shape(OP, a, b)?;
        match self.backend() {
            Backend::Cpu => {
                let (x, y) = (a.cpu_f32_slice(OP, "a")?, b.cpu_f32_slice(OP, "b")?);
                let mut out = y.to_vec();
                par_zip_map(&mut out, x, |o, x| *o = op.apply(x, *o));
                Ok(Tensor::cpu_f32(a.shape.clone(), out, self.id()))
            }
            Backend::Gpu(gpu) => gpu.binary(a, b, op),
        }
    }

    /// Returns `alpha * x`.
    pub fn scale(&self, x: &Tensor, alpha: f32) -> Result<Tensor> {
        const OP: &str = "scale";
        self.check_f(OP, "x", x, DType::F32)?;
        match self.backend() {
            Backend::Cpu => {
                let input = x.cpu_f32_slice(OP, "x")?;
                let mut out = vec![0.0; input.len()];
                par_zip_map(&mut out, input, |o, x| *o = alpha * x);
                Ok(Tensor::cpu_f32(x.shape.clone(), out, self.id()))
            }
            Backend::Gpu(gpu) => gpu.scale(x, alpha),
        }
    }

    /// Adds `alpha * src` to `dst` in place (the BLAS axpy).
    pub fn axpy(&self, dst: &mut Tensor, alpha: f32, src: &Tensor) -> Result<()> {
        const OP: &str = "axpy";
        self.check_f(OP, "dst", dst, DType::F32)?;
        self.check_f(OP, "src", src, DType::F32)?;
        check_same_shape(OP, dst, src)?;
        match self.backend() {
            Backend::Cpu => {
                let src = src.cpu_f32_slice(OP, "src")?;
                let dst = dst.cpu_f32_mut(OP, "dst")?;
                par_zip_map(dst, src, |d, s| *d += alpha * s);
                Ok(())
            }
            Backend::Gpu(gpu) => gpu.axpy(dst, alpha, src),
        }
    }

    /// Adds `src` to `dst` in place; the usual way gradients accumulate.
    pub fn add_assign(&self, dst: &mut Tensor, src: &Tensor) -> Result<()> {
        self.axpy(dst, 1.0, src)
    }

    /// Multiplies `dst` by `alpha` in place.
    pub fn scale_assign(&self, dst: &mut Tensor, alpha: f32) -> Result<()> {
        const OP: &str = "scale_assign";
        self.check_f(OP, "dst", dst, DType::F32)?;
        match self.backend() {
            Backend::Cpu => {
                dst.cpu_f32_mut(OP, "dst")?
                    .par_chunks_mut(CPU_CHUNK)
                    .for_each(|chunk| chunk.iter_mut().for_each(|value| *value *= alpha));
                Ok(())
            }
            Backend::Gpu(gpu) => gpu.scale_assign(dst, alpha),
        }
    }

    /// Returns `x + y` where `y`'s shape is a suffix of `x`'s, repeated over
    /// the leading axes.
    pub fn broadcast_add(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        const OP: &str = "broadcast_add";
        self.check_f(OP, "x", x, DType::F32)?;
        self.check_f(OP, "y", y, DType::F32)?;
        check_suffix(OP, x, y)?;
        match self.backend() {
            Backend::Cpu => {
                let (input, row) = (x.cpu_f32_slice(OP, "x")?, y.cpu_f32_slice(OP, "y")?);
                let mut out = input.to_vec();
                if !row.is_empty() {
                    out.par_chunks_mut(row.len()).for_each(|block| {
                        block.iter_mut().zip(row).for_each(|(o, r)| *o += r);
                    });
                }
                Ok(Tensor::cpu_f32(x.shape.clone(), out, self.id()))
            }
            Backend::Gpu(gpu) => gpu.broadcast_add(x, y),
        }
    }

    /// Repeats `y` over new leading axes so that the result has `shape`,
    /// of which `y`'s shape must be a suffix.
    pub fn broadcast_to(&self, y: &Tensor, shape: &[usize]) -> Result<Tensor> {
        let zeros = self.zeros(shape.to_vec(), DType::F32)?;
        self.broadcast_add(&zeros, y)
    }
}
