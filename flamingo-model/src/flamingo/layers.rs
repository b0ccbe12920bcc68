//! Trainable building blocks of the connector: a bias-free linear layer,
//! LayerNorm and RMSNorm, and the feed-forward blocks (a norm followed by a
//! GELU or ReLU MLP, or by a SiLU-gated one).
//!
//! Each `forward` returns its output and a saved-activations struct;
//! `backward` takes that struct and the output gradient, adds the weight
//! gradients into the [`ParamStore`] and returns the input gradient.

use flamingo_kernels::{Activation, Matmul, NormStats, Tensor};
use serde::{Deserialize, Serialize};

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

/// The normalisation a [`Norm`] applies over the last axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormKind {
    /// (x − mean) / √(var + eps) · w + b, PyTorch's `nn.LayerNorm`.
    #[default]
    LayerNorm,
    /// x / √(mean(x²) + eps) · w, without a bias, as in Llama and IDEFICS.
    RmsNorm,
}

/// A LayerNorm or RMSNorm over the last axis with a trainable weight (and,
/// for LayerNorm, a trainable bias).
#[derive(Debug, Clone)]
pub struct Norm {
    pub kind: NormKind,
    pub weight: ParamId,
    /// `None` for RMSNorm.
    pub bias: Option<ParamId>,
    pub eps: f32,
}

/// Activations saved for [`Norm::backward`].
#[derive(Debug)]
pub struct NormSaved {
    pub input: Tensor,
    pub stats: NormStats,
}

impl Norm {
    /// Registers `name.weight` (ones) and, for LayerNorm, `name.bias`
    /// (zeros), as PyTorch does.
    pub fn new(store: &mut ParamStore, name: &str, dim: usize, kind: NormKind, eps: f32) -> Result<Self> {
        let weight = store.add(format!("{name}.weight"), &[dim], Init::Ones, false)?;
        let bias = match kind {
            NormKind::LayerNorm => Some(store.add(format!("{name}.bias"), &[dim], Init::Zeros, false)?),
            NormKind::RmsNorm => None,
        };
        Ok(Self { kind, weight, bias, eps })
    }

    /// Normalises every row of the last axis of `x`.
    pub fn forward(&self, store: &ParamStore, x: &Tensor) -> Result<(Tensor, NormSaved)> {
        let device = store.device();
        let weight = store.value(self.weight);
        let (y, stats) = match self.kind {
            NormKind::LayerNorm => device.layer_norm(x, weight, self.bias.map(|bias| store.value(bias)), self.eps)?,
            NormKind::RmsNorm => device.rms_norm(x, weight, self.eps)?,
        };
        Ok((y, NormSaved { input: x.clone(), stats }))
    }

    /// Adds the weight (and bias) gradients into the store and returns dx.
    pub fn backward(&self, store: &mut ParamStore, saved: &NormSaved, dy: &Tensor) -> Result<Tensor> {
        let device = store.device().clone();
        let weight = store.value(self.weight);
        let grads = match self.kind {
            NormKind::LayerNorm => device.layer_norm_backward(&saved.input, weight, &saved.stats, dy, true)?,
            NormKind::RmsNorm => device.rms_norm_backward(&saved.input, weight, &saved.stats, dy, true)?,
        };
        if let Some(dweight) = grads.dweight {
            store.accumulate(self.weight, dweight)?;
        }
        if let (Some(bias), Some(dbias)) = (self.bias, grads.dbias) {
            store.accumulate(bias, dbias)?;
        }
        Ok(grads.dx)
    }

    /// Runs `norm` on `x` when there is one and passes `x` through otherwise;
    /// used for the optional query and key norms.
    pub fn forward_optional(norm: Option<&Norm>, store: &ParamStore, x: Tensor) -> Result<(Tensor, Option<NormSaved>)> {
        match norm {
            Some(norm) => {
                let (y, saved) = norm.forward(store, &x)?;
                Ok((y, Some(saved)))
            }
            None => Ok((x, None)),
        }
    }

    /// Runs the backward pass of [`Norm::forward_optional`]. Without a norm,
    /// `dy` passes through unchanged.
    pub fn backward_optional(norm: Option<&Norm>, store: &mut ParamStore, saved: Option<&NormSaved>, dy: Tensor) -> Result<Tensor> {
        match (norm, saved) {
            (Some(norm), Some(saved)) => norm.backward(store, saved, &dy),
            _ => Ok(dy),
        }
    }
}

/// The feed-forward block after a norm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeedForwardKind {
    /// Linear, exact GELU, Linear: OpenFlamingo and flamingo-pytorch.
    #[default]
    GeluMlp,
    /// Linear, ReLU, Linear: the MLP of IDEFICS's perceiver resampler.
    ReluMlp,
    /// down(silu(gate(x)) ⊙ up(x)): Llama's MLP, which IDEFICS's gated
    /// cross-attention blocks use.
    #[serde(rename = "swiglu")]
    SwiGlu,
}

/// A norm followed by a feed-forward block, all without biases.
///
/// The two MLP kinds keep the names of OpenFlamingo's
/// `Sequential(LayerNorm, Linear, GELU, Linear)`: `.0` (norm), `.1` and `.3`
/// (Linear). SwiGLU uses Llama's names: `.norm`, `.gate_proj`, `.up_proj`
/// and `.down_proj`.
#[derive(Debug, Clone)]
pub struct FeedForward {
    pub kind: FeedForwardKind,
    pub norm: Norm,
    /// The MLPs' first Linear, or SwiGLU's `up_proj`.
    pub up: Linear,
    /// SwiGLU's `gate_proj`; `None` for the MLPs.
    pub gate: Option<Linear>,
    pub down: Linear,
}

/// Activations saved for [`FeedForward::backward`].
#[derive(Debug)]
pub struct FeedForwardSaved {
    norm: NormSaved,
    normed: Tensor,
    /// Output of `up`.
    hidden: Tensor,
    /// Output of `gate` (SwiGLU only).
    gate: Option<Tensor>,
    /// Input of `down`.
    activated: Tensor,
}

impl FeedForward {
    /// Registers a block of inner width `inner` under `name`, with the
    /// tensor names given in the type's documentation.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: &mut ParamStore,
        name: &str,
        dim: usize,
        inner: usize,
        kind: FeedForwardKind,
        norm: NormKind,
        norm_eps: f32,
        weight_decay: bool,
    ) -> Result<Self> {
        match kind {
            FeedForwardKind::GeluMlp | FeedForwardKind::ReluMlp => Ok(Self {
                kind,
                norm: Norm::new(store, &format!("{name}.0"), dim, norm, norm_eps)?,
                up: Linear::new(store, &format!("{name}.1"), dim, inner, weight_decay)?,
                gate: None,
                down: Linear::new(store, &format!("{name}.3"), inner, dim, weight_decay)?,
            }),
            FeedForwardKind::SwiGlu => Ok(Self {
                kind,
                norm: Norm::new(store, &format!("{name}.norm"), dim, norm, norm_eps)?,
                gate: Some(Linear::new(store, &format!("{name}.gate_proj"), dim, inner, weight_decay)?),
                up: Linear::new(store, &format!("{name}.up_proj"), dim, inner, weight_decay)?,
                down: Linear::new(store, &format!("{name}.down_proj"), inner, dim, weight_decay)?,
            }),
        }
    }

    pub fn forward(&self, store: &ParamStore, x: &Tensor) -> Result<(Tensor, FeedForwardSaved)> {
        let device = store.device();
        let (normed, norm) = self.norm.forward(store, x)?;
        let hidden = self.up.forward(store, &normed)?;
        let (gate, activated) = match (&self.gate, self.activation()) {
            (Some(gate_proj), _) => {
                let gate = gate_proj.forward(store, &normed)?;
                let activated = device.silu_mul(&gate, &hidden)?;
                (Some(gate), activated)
            }
            (None, activation) => (None, device.activation(&hidden, activation)?),
        };
        let out = self.down.forward(store, &activated)?;
        Ok((out, FeedForwardSaved { norm, normed, hidden, gate, activated }))
    }

    pub fn backward(&self, store: &mut ParamStore, saved: &FeedForwardSaved, dy: &Tensor) -> Result<Tensor> {
        let device = store.device().clone();
        let dactivated = self.down.backward(store, &saved.activated, dy, true)?.expect("dx was requested");
        let dnormed = match (&self.gate, &saved.gate) {
            (Some(gate_proj), Some(gate)) => {
                let (dgate, dhidden) = device.silu_mul_backward(gate, &saved.hidden, &dactivated)?;
                let mut dnormed = gate_proj.backward(store, &saved.normed, &dgate, true)?.expect("dx was requested");
                let from_up = self.up.backward(store, &saved.normed, &dhidden, true)?.expect("dx was requested");
                device.add_assign(&mut dnormed, &from_up)?;
                dnormed
            }
            _ => {
                let dhidden = device.activation_backward(&saved.hidden, &dactivated, self.activation())?;
                self.up.backward(store, &saved.normed, &dhidden, true)?.expect("dx was requested")
            }
        };
        self.norm.backward(store, &saved.norm, &dnormed)
    }

    /// Returns the pointwise activation of the MLP kinds. SwiGLU's SiLU is
    /// fused into `silu_mul` instead.
    fn activation(&self) -> Activation {
        match self.kind {
            FeedForwardKind::GeluMlp => Activation::GeluExact,
            FeedForwardKind::ReluMlp => Activation::Relu,
            FeedForwardKind::SwiGlu => Activation::Silu,
        }
    }
}
