//! Trainable building blocks of the connector: a bias-free linear layer, a
//! LayerNorm and the feed-forward block (LayerNorm, Linear, GELU, Linear).
//!
//! Each `forward` returns its output and a saved-activations struct;
//! `backward` takes that struct and the output gradient, adds the weight
//! gradients into the [`ParamStore`] and returns the input gradient.

use flamingo_kernels::{Activation, Matmul, NormStats, Tensor};

use crate::error::Result;
use crate::flamingo::params::{Init, ParamId, ParamStore};

/// y = x·Wᵀ, with W [out, in] as in PyTorch's `nn.Linear(bias=False)`.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: ParamId,
    pub in_features: usize,
    pub out_features: usize,
}

impl Linear {
    /// Registers `name.weight`, initialised as PyTorch initialises `nn.Linear`.
    pub fn new(store: &mut ParamStore, name: &str, in_features: usize, out_features: usize, weight_decay: bool) -> Result<Self> {
        let weight = store.add(format!("{name}.weight"), &[out_features, in_features], Init::LinearDefault { fan_in: in_features }, weight_decay)?;
        Ok(Self { weight, in_features, out_features })
    }

    /// y = x·Wᵀ for x [..., in].
    pub fn forward(&self, store: &ParamStore, x: &Tensor) -> Result<Tensor> {
        Ok(store.device().matmul(x, store.value(self.weight), &Matmul::linear(None))?)
    }

    /// Adds dW = dyᵀ·x into the store and returns dx = dy·W when `need_dx`.
    pub fn backward(&self, store: &mut ParamStore, x: &Tensor, dy: &Tensor, need_dx: bool) -> Result<Option<Tensor>> {
        let device = store.device().clone();
        let dx = if need_dx { Some(device.matmul(dy, store.value(self.weight), &Matmul::new())?) } else { None };
        device.matmul_accumulate(store.grad_mut(self.weight)?, dy, x, true, false, 1.0)?;
        Ok(dx)
    }
}

/// LayerNorm over the last axis with a trainable weight and bias.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: ParamId,
    pub bias: ParamId,
    pub eps: f32,
}

/// What [`LayerNorm::backward`] needs.
#[derive(Debug)]
pub struct LayerNormSaved {
    pub input: Tensor,
    pub stats: NormStats,
}

impl LayerNorm {
    /// Registers `name.weight` (ones) and `name.bias` (zeros), as PyTorch does.
    pub fn new(store: &mut ParamStore, name: &str, dim: usize, eps: f32) -> Result<Self> {
        let weight = store.add(format!("{name}.weight"), &[dim], Init::Ones, false)?;
        let bias = store.add(format!("{name}.bias"), &[dim], Init::Zeros, false)?;
        Ok(Self { weight, bias, eps })
    }

    pub fn forward(&self, store: &ParamStore, x: &Tensor) -> Result<(Tensor, LayerNormSaved)> {
        let (y, stats) = store.device().layer_norm(x, store.value(self.weight), Some(store.value(self.bias)), self.eps)?;
        Ok((y, LayerNormSaved { input: x.clone(), stats }))
    }

    /// Adds the weight and bias gradients into the store and returns dx.
    pub fn backward(&self, store: &mut ParamStore, saved: &LayerNormSaved, dy: &Tensor) -> Result<Tensor> {
        let device = store.device().clone();
        let grads = device.layer_norm_backward(&saved.input, store.value(self.weight), &saved.stats, dy, true)?;
        if let Some(dweight) = grads.dweight {
            store.accumulate(self.weight, dweight)?;
        }
        if let Some(dbias) = grads.dbias {
            store.accumulate(self.bias, dbias)?;
        }
        Ok(grads.dx)
    }
}

/// The feed-forward block of OpenFlamingo and flamingo-pytorch:
/// `Sequential(LayerNorm, Linear, GELU, Linear)`, saved as `.0`, `.1`, `.3`.
#[derive(Debug, Clone)]
pub struct FeedForward {
    pub norm: LayerNorm,
    pub up: Linear,
    pub down: Linear,
}

/// What [`FeedForward::backward`] needs.
#[derive(Debug)]
pub struct FeedForwardSaved {
    norm: LayerNormSaved,
    normed: Tensor,
    hidden: Tensor,
    activated: Tensor,
}

impl FeedForward {
    /// Registers `name.0` (LayerNorm), `name.1` and `name.3` (Linear) with an
    /// inner width of `mult · dim`.
    pub fn new(store: &mut ParamStore, name: &str, dim: usize, mult: usize, weight_decay: bool) -> Result<Self> {
        let inner = dim * mult;
        Ok(Self {
            norm: LayerNorm::new(store, &format!("{name}.0"), dim, 1e-5)?,
            up: Linear::new(store, &format!("{name}.1"), dim, inner, weight_decay)?,
            down: Linear::new(store, &format!("{name}.3"), inner, dim, weight_decay)?,
        })
    }

    pub fn forward(&self, store: &ParamStore, x: &Tensor) -> Result<(Tensor, FeedForwardSaved)> {
        let device = store.device();
        let (normed, norm) = self.norm.forward(store, x)?;
        let hidden = self.up.forward(store, &normed)?;
        let activated = device.activation(&hidden, Activation::GeluExact)?;
        let out = self.down.forward(store, &activated)?;
        Ok((out, FeedForwardSaved { norm, normed, hidden, activated }))
    }

    pub fn backward(&self, store: &mut ParamStore, saved: &FeedForwardSaved, dy: &Tensor) -> Result<Tensor> {
        let device = store.device().clone();
        let dactivated = self.down.backward(store, &saved.activated, dy, true)?.expect("dx was requested");
        let dhidden = device.activation_backward(&saved.hidden, &dactivated, Activation::GeluExact)?;
        let dnormed = self.up.backward(store, &saved.normed, &dhidden, true)?.expect("dx was requested");
        self.norm.backward(store, &saved.norm, &dnormed)
    }
}
