//! Cross-entropy of logits against target ids, fused with its softmax.
//!
//! logits is [N, V], targets u32 [N]. Rows whose target is
//! [`IGNORE_INDEX`] contribute no loss and get zero gradient. Forward keeps
//! only the per-row log-sum-exp, never a probability tensor; backward
//! rebuilds softmax(x) = exp(x − lse) one row at a time:
//!
//!   loss_n = lse_n − x[n, t_n];   dlogits[n] = scale · (softmax(x_n) − onehot(t_n))

use crate::device::{Backend, Device};
use crate::error::{shape_err, value_err, Result};
use crate::ops::par_rows;
use crate::tensor::{DType, Tensor};

/// A target id that marks a row with no loss (padding, prompt text).
pub const IGNORE_INDEX: u32 = u32::MAX;

/// What the cross-entropy forward pass returns.
#[derive(Debug, Clone)]
pub struct CrossEntropyOutput {
    /// Loss of each row, [N]; 0 for ignored rows.
    pub losses: Tensor,
    /// Log-sum-exp of each row of logits, [N].
    pub lse: Tensor,
}

fn check_targets(op: &'static str, logits: &Tensor, targets: &Tensor) -> Result<(usize, usize)> {
    if logits.rank() != 2 {
        return Err(shape_err!(op, "logits must be [N, V], found {:?}", logits.shape()));
    }
    let (rows, vocab) = (logits.shape[0], logits.shape[1]);
    if targets.shape() != [rows] {
        return Err(shape_err!(op, "targets has shape {:?}, expected [{rows}]", targets.shape()));
    }
    Ok((rows, vocab))
}

impl Device {
    /// Returns the per-row loss and log-sum-exp of `logits` against `targets`.
    pub fn cross_entropy(&self, logits: &Tensor, targets: &Tensor) -> Result<CrossEntropyOutput> {
        const OP: &str = "cross_entropy";
        self.check_f(OP, "logits", logits, DType::F32)?;
        self.check_f(OP, "targets", targets, DType::U32)?;
        let (rows, vocab) = check_targets(OP, logits, targets)?;
        match self.backend() {
            Backend::Cpu => {
                let x = logits.cpu_f32_slice(OP, "logits")?;
                let t = targets.cpu_u32_slice(OP, "targets")?;
                if let Some(bad) = t.iter().find(|&&id| id != IGNORE_INDEX && id as usize >= vocab) {
                    return Err(value_err!(OP, "target id {bad} is outside the vocabulary of {vocab} logits"));
                }
                let mut out = vec![0.0f32; rows * 2];
                par_rows(&mut out, 2, |n, pair| {
                    let row = &x[n * vocab..(n + 1) * vocab];
                    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                    let total: f32 = row.iter().map(|&v| (v - max).exp()).sum();
                    let lse = max + total.ln();
                    pair[1] = lse;
                    pair[0] = if t[n] == IGNORE_INDEX { 0.0 } else { lse - row[t[n] as usize] };
                });
                let id = self.id();
                let losses = out.iter().step_by(2).copied().collect();
                let lse = out.iter().skip(1).step_by(2).copied().collect();
                Ok(CrossEntropyOutput { losses: Tensor::cpu_f32(vec![rows], losses, id), lse: Tensor::cpu_f32(vec![rows], lse, id) })
            }
            Backend::Gpu(gpu) => gpu.cross_entropy(logits, targets, rows, vocab),
        }
    }

    /// Returns `scale · (softmax(logits) − onehot(targets))`, zero on ignored rows.
    pub fn cross_entropy_backward(&self, logits: &Tensor, lse: &Tensor, targets: &Tensor, scale: f32) -> Result<Tensor> {
        const OP: &str = "cross_entropy_backward";
        self.check_f(OP, "logits", logits, DType::F32)?;
        self.check_f(OP, "lse", lse, DType::F32)?;
        self.check_f(OP, "targets", targets, DType::U32)?;
        let (rows, vocab) = check_targets(OP, logits, targets)?;
        if lse.shape() != [rows] {
            return Err(shape_err!(OP, "lse has shape {:?}, expected [{rows}]", lse.shape()));
        }
        match self.backend() {
            Backend::Cpu => {
                let x = logits.cpu_f32_slice(OP, "logits")?;
                let (l, t) = (lse.cpu_f32_slice(OP, "lse")?, targets.cpu_u32_slice(OP, "targets")?);
                let mut out = vec![0.0f32; rows * vocab];
                par_rows(&mut out, vocab, |n, row| {
                    if t[n] == IGNORE_INDEX {
                        return;
                    }
                    for (o, &v) in row.iter_mut().zip(&x[n * vocab..(n + 1) * vocab]) {
                        *o = scale * (v - l[n]).exp();
                    }
                    if let Some(target) = row.get_mut(t[n] as usize) {
                        *target -= scale;
                    }
                });
                Ok(Tensor::cpu_f32(logits.shape.clone(), out, self.id()))
            }
            Backend::Gpu(gpu) => gpu.cross_entropy_backward(logits, lse, targets, scale, rows, vocab),
        }
    }
}
