//! Frozen LayerNorm (GPT-2) and RMSNorm (Llama) over the last axis.
//!
//! x and y are [..., C]; weight and bias are f32 [C]. The backward pass
//! returns dx only, because frozen norms need no weight gradients.

use flamingo_kernels::{Device, NormStats, Tensor};

use crate::error::Result;
use crate::lm::linear::WeightLoader;

/// A frozen normalization layer.
#[derive(Debug, Clone)]
pub enum Norm {
    /// (x − mean) / sqrt(var + eps) · weight + bias.
    Layer { weight: Tensor, bias: Tensor, eps: f32 },
    /// x / sqrt(mean(x²) + eps) · weight.
    Rms { weight: Tensor, eps: f32 },
}

/// The input and per-row statistics that a norm's backward pass needs.
#[derive(Debug, Clone)]
pub struct NormSaved {
    /// [..., C].
    pub x: Tensor,
    pub stats: NormStats,
}

impl Norm {
    /// Loads `{prefix}.weight` and `{prefix}.bias`, both [C].
    pub fn load_layer_norm(loader: &WeightLoader, prefix: &str, channels: usize, eps: f32) -> Result<Self> {
        Ok(Norm::Layer {
            weight: loader.vector(&format!("{prefix}.weight"), channels)?,
            bias: loader.vector(&format!("{prefix}.bias"), channels)?,
            eps,
        })
    }

    /// Loads `{prefix}.weight` [C].
    pub fn load_rms_norm(loader: &WeightLoader, prefix: &str, channels: usize, eps: f32) -> Result<Self> {
        Ok(Norm::Rms { weight: loader.vector(&format!("{prefix}.weight"), channels)?, eps })
    }

    /// Normalizes `x` and returns the statistics its backward pass needs.
    pub fn forward(&self, device: &Device, x: &Tensor) -> Result<(Tensor, NormStats)> {
        let result = match self {
            Norm::Layer { weight, bias, eps } => device.layer_norm(x, weight, Some(bias), *eps)?,
            Norm::Rms { weight, eps } => device.rms_norm(x, weight, *eps)?,
        };
        Ok(result)
    }

    /// Returns dx given the forward input `x`, its statistics and dy.
    pub fn backward(&self, device: &Device, x: &Tensor, stats: &NormStats, dy: &Tensor) -> Result<Tensor> {
        let grads = match self {
            Norm::Layer { weight, .. } => device.layer_norm_backward(x, weight, stats, dy, false)?,
            Norm::Rms { weight, .. } => device.rms_norm_backward(x, weight, stats, dy, false)?,
        };
        Ok(grads.dx)
    }

    /// Normalizes `x`, keeping the input and statistics when `save` is set.
    pub fn forward_saved(&self, device: &Device, x: &Tensor, save: bool) -> Result<(Tensor, Option<NormSaved>)> {
        let (y, stats) = self.forward(device, x)?;
        let saved = save.then(|| NormSaved { x: x.clone(), stats });
        Ok((y, saved))
    }

    /// Returns dx for the forward pass that produced `saved`.
    pub fn backward_saved(&self, device: &Device, saved: &NormSaved, dy: &Tensor) -> Result<Tensor> {
        self.backward(device, &saved.x, &saved.stats, dy)
    }
}
