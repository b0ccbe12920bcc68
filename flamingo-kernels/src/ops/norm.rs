//! LayerNorm and RMSNorm over the last axis, with their backward passes.
//!
//! x is [R, C] with any leading axes folded into R. Forward returns the
//! per-row statistics backward needs (mean and 1/σ for LayerNorm, 1/rms
//! for RMSNorm). With x̂ the normalised input and g = dy ⊙ w:
//!
//! - LayerNorm: dx = rstd · (g − mean(g) − x̂ · mean(g ⊙ x̂)); dw = Σ dy ⊙ x̂; db = Σ dy
//! - RMSNorm:   dx = rstd · (g − x̂ · mean(g ⊙ x̂));          dw = Σ dy ⊙ x̂
//!
//! Weight gradients are computed only when asked: frozen norms skip them.

use crate::device::{Backend, Device};
use crate::error::{shape_err, Result};
use crate::ops::{par_column_sums, par_rows};
use crate::tensor::{DType, Tensor};

/// Per-row statistics saved by a norm's forward pass.
#[derive(Debug, Clone)]
pub struct NormStats {
    /// Row means, [R]; empty for RMSNorm.
    pub mean: Option<Tensor>,
    /// Reciprocal standard deviation (LayerNorm) or root mean square (RMSNorm), [R].
    pub rstd: Tensor,
}

/// Gradients returned by a norm's backward pass.
#[derive(Debug)]
pub struct NormGrads {
    pub dx: Tensor,
    pub dweight: Option<Tensor>,
    pub dbias: Option<Tensor>,
}

fn check_param(op: &'static str, name: &'static str, param: &Tensor, cols: usize) -> Result<()> {
    if param.shape() != [cols] {
        return Err(shape_err!(op, "{name} has shape {:?}, expected [{cols}]", param.shape()));
    }
    Ok(())
}

impl Device {
    /// Returns LayerNorm(x)·w + b and the statistics its backward needs.
    pub fn layer_norm(&self, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, eps: f32) -> Result<(Tensor, NormStats)> {
        const OP: &str = "layer_norm";
        self.check_f(OP, "x", x, DType::F32)?;
        self.check_f(OP, "weight", weight, DType::F32)?;
        let (rows, cols) = x.rows_cols();
        check_param(OP, "weight", weight, cols)?;
        if let Some(bias) = bias {
            self.check_f(OP, "bias", bias, DType::F32)?;
            check_param(OP, "bias", bias, cols)?;
        }
        match self.backend() {
            Backend::Cpu => {
                let input = x.cpu_f32_slice(OP, "x")?;
                let w = weight.cpu_f32_slice(OP, "weight")?;
                let b = match bias {
                    Some(bias) => Some(bias.cpu_f32_slice(OP, "bias")?),
                    None => None,
                };
                let mut out = input.to_vec();
                let mut stats = vec![0.0f32; rows * 2];
                par_rows(&mut stats, 2, |row, stat| {
                    let values = &input[row * cols..(row + 1) * cols];
                    let mean = values.iter().map(|&v| v as f64).sum::<f64>() / cols as f64;
                    let var = values.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / cols as f64;
                    stat[0] = mean as f32;
                    stat[1] = (1.0 / (var + eps as f64).sqrt()) as f32;
                });
                par_rows(&mut out, cols, |row, values| {
                    let (mean, rstd) = (stats[row * 2], stats[row * 2 + 1]);
                    for (c, value) in values.iter_mut().enumerate() {
                        *value = (*value - mean) * rstd * w[c] + b.map_or(0.0, |b| b[c]);
                    }
                });
                let id = self.id();
                let mean = stats.iter().step_by(2).copied().collect();
                let rstd = stats.iter().skip(1).step_by(2).copied().collect();
                Ok((
                    Tensor::cpu_f32(x.shape.clone(), out, id),
                    NormStats { mean: Some(Tensor::cpu_f32(vec![rows], mean, id)), rstd: Tensor::cpu_f32(vec![rows], rstd, id) },
                ))
            }
            Backend::Gpu(gpu) => gpu.layer_norm(x, weight, bias, eps, rows, cols),
        }
    }

    /// Returns the gradients of LayerNorm given its input, weight and saved statistics.
    pub fn layer_norm_backward(&self, x: &Tensor, weight: &Tensor, stats: &NormStats, dy: &Tensor, param_grads: bool) -> Result<NormGrads> {
        const OP: &str = "layer_norm_backward";
        self.norm_backward(OP, x, weight, stats, dy, param_grads, true)
    }

    /// Returns RMSNorm(x)·w and the statistics its backward needs.
    pub fn rms_norm(&self, x: &Tensor, weight: &Tensor, eps: f32) -> Result<(Tensor, NormStats)> {
        const OP: &str = "rms_norm";
        self.check_f(OP, "x", x, DType::F32)?;
        self.check_f(OP, "weight", weight, DType::F32)?;
        let (rows, cols) = x.rows_cols();
        check_param(OP, "weight", weight, cols)?;
        match self.backend() {
            Backend::Cpu => {
                let input = x.cpu_f32_slice(OP, "x")?;
                let w = weight.cpu_f32_slice(OP, "weight")?;
                let mut rstd = vec![0.0f32; rows];
                par_rows(&mut rstd, 1, |row, r| {
                    let values = &input[row * cols..(row + 1) * cols];
                    let mean_square = values.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / cols as f64;
                    r[0] = (1.0 / (mean_square + eps as f64).sqrt()) as f32;
                });
                let mut out = input.to_vec();
                par_rows(&mut out, cols, |row, values| {
                    values.iter_mut().zip(w).for_each(|(value, w)| *value = *value * rstd[row] * w);
                });
                let id = self.id();
                Ok((Tensor::cpu_f32(x.shape.clone(), out, id), NormStats { mean: None, rstd: Tensor::cpu_f32(vec![rows], rstd, id) }))
            }
            Backend::Gpu(gpu) => gpu.rms_norm(x, weight, eps, rows, cols),
        }
    }

    /// Returns the gradients of RMSNorm given its input, weight and saved statistics.
    pub fn rms_norm_backward(&self, x: &Tensor, weight: &Tensor, stats: &NormStats, dy: &Tensor, param_grads: bool) -> Result<NormGrads> {
        const OP: &str = "rms_norm_backward";
        self.norm_backward(OP, x, weight, stats, dy, param_grads, false)
    }

    #[allow(clippy::too_many_arguments)]
    fn norm_backward(
        &self,
        op: &'static str,
        x: &Tensor,
        weight: &Tensor,
        stats: &NormStats,
        dy: &Tensor,
        param_grads: bool,
        centered: bool,
    ) -> Result<NormGrads> {
        self.check_f(op, "x", x, DType::F32)?;
        self.check_f(op, "weight", weight, DType::F32)?;
        self.check_f(op, "dy", dy, DType::F32)?;
        let (rows, cols) = x.rows_cols();
        check_param(op, "weight", weight, cols)?;
        if dy.shape() != x.shape() {
            return Err(shape_err!(op, "dy has shape {:?}, x has {:?}", dy.shape(), x.shape()));
        }
        if stats.rstd.shape() != [rows] || (centered && stats.mean.is_none()) {
            return Err(shape_err!(op, "saved statistics do not match x of {rows} rows"));
        }
        match self.backend() {
            Backend::Cpu => {
                let input = x.cpu_f32_slice(op, "x")?;
                let w = weight.cpu_f32_slice(op, "weight")?;
                let grad = dy.cpu_f32_slice(op, "dy")?;
                let rstd = stats.rstd.cpu_f32_slice(op, "rstd")?;
                let mean = match &stats.mean {
                    Some(mean) if centered => Some(mean.cpu_f32_slice(op, "mean")?),
                    _ => None,
                };
                let normalized = |row: usize, c: usize| (input[row * cols + c] - mean.map_or(0.0, |m| m[row])) * rstd[row];

                let mut dx = vec![0.0f32; rows * cols];
                par_rows(&mut dx, cols, |row, out| {
                    let dy_row = &grad[row * cols..(row + 1) * cols];
                    let (mut sum_g, mut sum_gx) = (0.0f64, 0.0f64);
                    for c in 0..cols {
                        let g = (dy_row[c] * w[c]) as f64;
                        sum_g += g;
                        sum_gx += g * normalized(row, c) as f64;
                    }
                    let mean_g = if centered { (sum_g / cols as f64) as f32 } else { 0.0 };
                    let mean_gx = (sum_gx / cols as f64) as f32;
                    for c in 0..cols {
                        let g = dy_row[c] * w[c];
                        out[c] = rstd[row] * (g - mean_g - normalized(row, c) * mean_gx);
                    }
                });

                let id = self.id();
                let (dweight, dbias) = if param_grads {
                    let dw = par_column_sums(rows, cols, |row, sums| {
                        for (c, s) in sums.iter_mut().enumerate() {
                            *s += (grad[row * cols + c] * normalized(row, c)) as f64;
                        }
                    });
                    let db = centered.then(|| {
                        par_column_sums(rows, cols, |row, sums| {
                            for (c, s) in sums.iter_mut().enumerate() {
                                *s += grad[row * cols + c] as f64;
                            }
                        })
                    });
                    (Some(Tensor::cpu_f32(vec![cols], dw, id)), db.map(|db| Tensor::cpu_f32(vec![cols], db, id)))
                } else {
                    (None, None)
                };
                Ok(NormGrads { dx: Tensor::cpu_f32(x.shape.clone(), dx, id), dweight, dbias })
            }
            Backend::Gpu(gpu) => gpu.norm_backward(x, weight, stats, dy, param_grads, centered, rows, cols),
        }
    }
}
