//! Rotary position embedding in the half-split layout of Hugging Face Llama.
//!
//! x is [B, T, H, D] and positions is u32 [B, T]. For i < D/2, with
//! θᵢ = position · base^(−2i/D), the pair (x[i], x[i + D/2]) is rotated by θᵢ:
//!
//!   y[i] = x[i]·cos θᵢ − x[i + D/2]·sin θᵢ
//!   y[i + D/2] = x[i + D/2]·cos θᵢ + x[i]·sin θᵢ
//!
//! A rotation's transpose is the rotation by −θ, which is the backward pass.
//! Angles are computed in f32 as PyTorch does, so outputs match to rounding.

use crate::device::{Backend, Device};
use crate::error::{shape_err, Result};
use crate::ops::par_rows;
use crate::tensor::{DType, Tensor};

/// The inverse frequency of rotary pair `i` for head size `head_dim`.
pub fn rope_inv_freq(base: f32, i: usize, head_dim: usize) -> f32 {
    1.0 / base.powf((2 * i) as f32 / head_dim as f32)
}

impl Device {
    /// Rotates every head of `x` by its token's position.
    pub fn rope(&self, x: &Tensor, positions: &Tensor, base: f32) -> Result<Tensor> {
        self.rope_rotate("rope", x, positions, base, 1.0)
    }

    /// The gradient of [`Device::rope`]: rotates `dy` back by each position.
    pub fn rope_backward(&self, dy: &Tensor, positions: &Tensor, base: f32) -> Result<Tensor> {
        self.rope_rotate("rope_backward", dy, positions, base, -1.0)
    }

    fn rope_rotate(&self, op: &'static str, x: &Tensor, positions: &Tensor, base: f32, direction: f32) -> Result<Tensor> {
        self.check_f(op, "x", x, DType::F32)?;
        self.check_f(op, "positions", positions, DType::U32)?;
        if x.rank() != 4 || !x.shape[3].is_multiple_of(2) {
            return Err(shape_err!(op, "x must be [B, T, H, D] with even D, found {:?}", x.shape()));
        }
        let (batch, time, heads, head_dim) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3]);
        if positions.shape() != [batch, time] {
            return Err(shape_err!(op, "positions has shape {:?}, expected [{batch}, {time}]", positions.shape()));
        }
        match self.backend() {
            Backend::Cpu => {
                let pos = positions.cpu_u32_slice(op, "positions")?;
                let half = head_dim / 2;
                let inv_freq: Vec<f32> = (0..half).map(|i| rope_inv_freq(base, i, head_dim)).collect();
                let mut out = x.cpu_f32_slice(op, "x")?.to_vec();
                par_rows(&mut out, head_dim, |row, values| {
                    let position = pos[row / heads] as f32;
                    for i in 0..half {
                        let angle = position * inv_freq[i];
                        let (sin, cos) = (direction * angle.sin(), angle.cos());
                        let (a, b) = (values[i], values[i + half]);
                        values[i] = a * cos - b * sin;
                        values[i + half] = b * cos + a * sin;
                    }
                });
                Ok(Tensor::cpu_f32(x.shape.clone(), out, self.id()))
            }
            Backend::Gpu(gpu) => gpu.rope(x, positions, base, direction),
        }
    }
}
