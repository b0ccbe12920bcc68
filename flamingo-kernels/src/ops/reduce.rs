//! Sums: of all elements, of squares (for gradient norms), and over leading
//! axes (bias gradients, and the backward of `broadcast_add`).
//!
//! The CPU backend accumulates in f64, so its sums are the reference the
//! GPU's tree reductions are compared against.

use rayon::prelude::*;

use crate::device::{Backend, Device};
use crate::error::{shape_err, Result};
use crate::ops::{par_column_sums, CPU_CHUNK};
use crate::tensor::{DType, Tensor};

impl Device {
    /// Returns the sum of all elements as a one-element tensor of shape [1].
    pub fn sum(&self, x: &Tensor) -> Result<Tensor> {
        const OP: &str = "sum";
        self.check_f(OP, "x", x, DType::F32)?;
        match self.backend() {
            Backend::Cpu => {
                let values = x.cpu_f32_slice(OP, "x")?;
                let total: f64 = values.par_chunks(CPU_CHUNK).map(|c| c.iter().map(|&v| v as f64).sum::<f64>()).sum();
                Ok(Tensor::cpu_f32(vec![1], vec![total as f32], self.id()))
            }
            Backend::Gpu(gpu) => gpu.sum(x, false),
        }
    }

    /// Returns the sum of squared elements as a tensor of shape [1].
    pub fn sum_squares(&self, x: &Tensor) -> Result<Tensor> {
        const OP: &str = "sum_squares";
        self.check_f(OP, "x", x, DType::F32)?;
        match self.backend() {
            Backend::Cpu => {
                let values = x.cpu_f32_slice(OP, "x")?;
                let total: f64 = values
                    .par_chunks(CPU_CHUNK)
                    .map(|c| c.iter().map(|&v| v as f64 * v as f64).sum::<f64>())
                    .sum();
                Ok(Tensor::cpu_f32(vec![1], vec![total as f32], self.id()))
            }
            Backend::Gpu(gpu) => gpu.sum(x, true),
        }
    }

    /// Sums over all but the last `trailing_rank` axes: [a…, t…] -> [t…].
    pub fn sum_leading(&self, x: &Tensor, trailing_rank: usize) -> Result<Tensor> {
        const OP: &str = "sum_leading";
        self.check_f(OP, "x", x, DType::F32)?;
        if trailing_rank > x.rank() {
            return Err(shape_err!(OP, "cannot keep {trailing_rank} trailing axes of a tensor of shape {:?}", x.shape()));
        }
        let out_shape = x.shape[x.rank() - trailing_rank..].to_vec();
        let cols: usize = out_shape.iter().product();
        let rows = x.numel().checked_div(cols).unwrap_or(0);
        match self.backend() {
            Backend::Cpu => {
                let values = x.cpu_f32_slice(OP, "x")?;
                let sums = par_column_sums(rows, cols, |row, sums| {
                    for (s, &v) in sums.iter_mut().zip(&values[row * cols..(row + 1) * cols]) {
                        *s += v as f64;
                    }
                });
                Ok(Tensor::cpu_f32(out_shape, sums, self.id()))
            }
            Backend::Gpu(gpu) => gpu.sum_leading(x, rows, cols, out_shape),
        }
    }
}
