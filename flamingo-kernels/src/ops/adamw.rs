//! One AdamW step (Loshchilov and Hutter's decoupled weight decay), in place.
//!
//! In PyTorch's order: p ← p·(1 − lr·λ); m ← β₁m + (1 − β₁)g;
//! v ← β₂v + (1 − β₂)g²; p ← p − lr · (m / (1 − β₁ᵗ)) / (√(v / (1 − β₂ᵗ)) + ε).

use rayon::prelude::*;

use crate::device::{Backend, Device};
use crate::error::{value_err, Result};
use crate::ops::elementwise::check_same_shape;
use crate::ops::CPU_CHUNK;
use crate::tensor::{DType, Tensor};

/// Hyperparameters of one AdamW step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// The 1-based step number, for bias correction.
    pub step: u64,
}

impl AdamW {
    /// The bias corrections 1 − β₁ᵗ and 1 − β₂ᵗ.
    pub fn bias_corrections(&self) -> (f32, f32) {
        let t = self.step.min(i32::MAX as u64) as i32;
        (1.0 - self.beta1.powi(t), 1.0 - self.beta2.powi(t))
    }
}

impl Device {
    /// Updates `param` and its moments `m` and `v` from `grad` in place.
    pub fn adamw_step(&self, param: &mut Tensor, grad: &Tensor, m: &mut Tensor, v: &mut Tensor, hyper: &AdamW) -> Result<()> {
        const OP: &str = "adamw_step";
        self.check_f(OP, "param", param, DType::F32)?;
        self.check_f(OP, "grad", grad, DType::F32)?;
        self.check_f(OP, "m", m, DType::F32)?;
        self.check_f(OP, "v", v, DType::F32)?;
        check_same_shape(OP, param, grad)?;
        check_same_shape(OP, param, m)?;
        check_same_shape(OP, param, v)?;
        if hyper.step == 0 {
            return Err(value_err!(OP, "the step number starts at 1, found 0"));
        }
        match self.backend() {
            Backend::Cpu => {
                let (c1, c2) = hyper.bias_corrections();
                let g = grad.cpu_f32_slice(OP, "grad")?;
                let p = param.cpu_f32_mut(OP, "param")?;
                let m = m.cpu_f32_mut(OP, "m")?;
                let v = v.cpu_f32_mut(OP, "v")?;
                // Each element is independent, so chunks update in parallel.
                p.par_chunks_mut(CPU_CHUNK)
                    .zip(m.par_chunks_mut(CPU_CHUNK))
                    .zip(v.par_chunks_mut(CPU_CHUNK))
                    .zip(g.par_chunks(CPU_CHUNK))
                    .for_each(|(((p, m), v), g)| {
                        for i in 0..p.len() {
                            p[i] *= 1.0 - hyper.lr * hyper.weight_decay;
                            m[i] = hyper.beta1 * m[i] + (1.0 - hyper.beta1) * g[i];
                            v[i] = hyper.beta2 * v[i] + (1.0 - hyper.beta2) * g[i] * g[i];
                            p[i] -= hyper.lr * (m[i] / c1) / ((v[i] / c2).sqrt() + hyper.eps);
                        }
                    });
                Ok(())
            }
            Backend::Gpu(gpu) => gpu.adamw_step(param, grad, m, v, hyper),
        }
    }
}
