//! Softmax over the last axis, and its backward.
//!
//! y = exp(x - max) / Σ exp(x - max) per row; dx = y ⊙ (dy - Σ dy ⊙ y).

use crate::device::{Backend, Device};
use crate::error::Result;
use crate::ops::elementwise::check_same_shape;
use crate::ops::par_rows;
use crate::tensor::{DType, Tensor};

impl Device {
    /// Returns the softmax of each row (last axis) of `x`.
    pub fn softmax(&self, x: &Tensor) -> Result<Tensor> {
        const OP: &str = "softmax";
        self.check_f(OP, "x", x, DType::F32)?;
        let (_, cols) = x.rows_cols();
        match self.backend() {
            Backend::Cpu => {
                let mut out = x.cpu_f32_slice(OP, "x")?.to_vec();
                par_rows(&mut out, cols, |_, row| {
                    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                    let mut total = 0.0f32;
                    for value in row.iter_mut() {
                        *value = (*value - max).exp();
                        total += *value;
                    }
                    row.iter_mut().for_each(|value| *value /= total);
                });
                Ok(Tensor::cpu_f32(x.shape.clone(), out, self.id()))
            }
            Backend::Gpu(gpu) => gpu.softmax(x),
        }
    }

    /// Returns the gradient with respect to the softmax input, given its output `y`.
    pub fn softmax_backward(&self, y: &Tensor, dy: &Tensor) -> Result<Tensor> {
        const OP: &str = "softmax_backward";
        self.check_f(OP, "y", y, DType::F32)?;
        self.check_f(OP, "dy", dy, DType::F32)?;
        check_same_shape(OP, y, dy)?;
        let (_, cols) = y.rows_cols();
        match self.backend() {
            Backend::Cpu => {
                let ys = y.cpu_f32_slice(OP, "y")?;
                let mut out = dy.cpu_f32_slice(OP, "dy")?.to_vec();
                par_rows(&mut out, cols, |row_index, row| {
                    let y_row = &ys[row_index * cols..(row_index + 1) * cols];
                    let dot: f32 = row.iter().zip(y_row).map(|(d, y)| d * y).sum();
                    row.iter_mut().zip(y_row).for_each(|(d, y)| *d = y * (*d - dot));
                });
                Ok(Tensor::cpu_f32(y.shape.clone(), out, self.id()))
            }
            Backend::Gpu(gpu) => gpu.softmax_backward(y, dy),
        }
    }
}
