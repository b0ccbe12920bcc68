//! Activations, the SiLU-gated product of Llama's MLP, and the tanh-gated
//! residual of Flamingo's cross-attention blocks.
//!
//! Backward passes take the activation's input `x` (not its output), so a
//! layer that fuses an activation into a matmul keeps the pre-activation.

use crate::device::{Backend, Device};
use crate::error::{shape_err, Result};
use crate::ops::elementwise::check_same_shape;
use rayon::prelude::*;

use crate::ops::{par_zip_map, CPU_CHUNK};
use crate::tensor::{DType, Tensor};

/// A pointwise activation function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Activation {
    #[default]
    Identity,
    Relu,
    /// min(max(x, 0), 6), as in MobileNetV2.
    Relu6,
    /// x·Φ(x) with the exact normal CDF (PyTorch `gelu`, BERT, ViT, SigLIP's `gelu` configs).
    GeluExact,
    /// The tanh approximation of GELU (GPT-2's `gelu_new`, SigLIP's `gelu_pytorch_tanh`).
    GeluTanh,
    /// x·σ(1.702x), CLIP's `quick_gelu`.
    QuickGelu,
    /// x·σ(x), also called swish.
    Silu,
    Tanh,
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_TANH_COEFF: f32 = 0.044_715;

/// The error function, with an absolute error below 1.5e-7
/// (Abramowitz and Stegun, formula 7.1.26). The WGSL kernels use the same
/// formula, so both backends round alike.
pub fn erf(x: f32) -> f32 {
    let sign = if x < 0.0 { -1.0 } else { 1.0 };
    let x = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * x);
    let poly = t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152 + t * 1.061_405_4))));
    sign * (1.0 - poly * (-x * x).exp())
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

impl Activation {
    /// Parses a Hugging Face `hidden_act` / `activation_function` value.
    pub fn from_hf_name(name: &str) -> Option<Activation> {
        let activation = match name {
            "gelu" => Activation::GeluExact,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "quick_gelu" => Activation::QuickGelu,
            "silu" | "swish" => Activation::Silu,
            "relu" => Activation::Relu,
            "relu6" => Activation::Relu6,
            "tanh" => Activation::Tanh,
            "linear" | "identity" => Activation::Identity,
            _ => return None,
        };
        Some(activation)
    }

    /// f(x).
    #[inline]
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Activation::Identity => x,
            Activation::Relu => x.max(0.0),
            Activation::Relu6 => x.clamp(0.0, 6.0),
            Activation::GeluExact => 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2)),
            Activation::GeluTanh => {
                0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + GELU_TANH_COEFF * x * x * x)).tanh())
            }
            Activation::QuickGelu => x * sigmoid(1.702 * x),
            Activation::Silu => x * sigmoid(x),
            Activation::Tanh => x.tanh(),
        }
    }

    /// Replaces every value v by f(v). The match on the activation sits
    /// outside the loop, so each arm compiles to its own vectorisable loop.
    pub fn apply_in_place(self, values: &mut [f32]) {
        macro_rules! each {
            ($activation:expr) => {
                values.iter_mut().for_each(|v| *v = $activation.apply(*v))
            };
        }
        match self {
            Activation::Identity => {}
            Activation::Relu => each!(Activation::Relu),
            Activation::Relu6 => each!(Activation::Relu6),
            Activation::GeluExact => each!(Activation::GeluExact),
            Activation::GeluTanh => each!(Activation::GeluTanh),
            Activation::QuickGelu => each!(Activation::QuickGelu),
            Activation::Silu => each!(Activation::Silu),
            Activation::Tanh => each!(Activation::Tanh),
        }
    }

    /// f'(x).
    #[inline]
    pub fn derivative(self, x: f32) -> f32 {
        match self {
            Activation::Identity => 1.0,
            Activation::Relu => (x > 0.0) as u8 as f32,
            Activation::Relu6 => (x > 0.0 && x < 6.0) as u8 as f32,
            Activation::GeluExact => {
                let cdf = 0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
                let pdf = (-0.5 * x * x).exp() * 0.398_942_3;
                cdf + x * pdf
            }
            Activation::GeluTanh => {
                let inner = SQRT_2_OVER_PI * (x + GELU_TANH_COEFF * x * x * x);
                let t = inner.tanh();
                let inner_derivative = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_TANH_COEFF * x * x);
                0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * inner_derivative
            }
            Activation::QuickGelu => {
                let s = sigmoid(1.702 * x);
                s + 1.702 * x * s * (1.0 - s)
            }
            Activation::Silu => {
                let s = sigmoid(x);
                s * (1.0 + x * (1.0 - s))
            }
            Activation::Tanh => {
                let t = x.tanh();
                1.0 - t * t
            }
        }
    }
}

impl Device {
    /// Returns `act(x)`.
    pub fn activation(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        const OP: &str = "activation";
        self.check_f(OP, "x", x, DType::F32)?;
        match self.backend() {
            Backend::Cpu => {
                let mut out = x.cpu_f32_slice(OP, "x")?.to_vec();
                out.par_chunks_mut(CPU_CHUNK).for_each(|chunk| act.apply_in_place(chunk));
                Ok(Tensor::cpu_f32(x.shape.clone(), out, self.id()))
            }
            Backend::Gpu(gpu) => gpu.activation(x, act),
        }
    }

    /// Returns `dy * act'(x)`, the gradient with respect to the activation's input.
    pub fn activation_backward(&self, x: &Tensor, dy: &Tensor, act: Activation) -> Result<Tensor> {
        const OP: &str = "activation_backward";
        self.check_f(OP, "x", x, DType::F32)?;
        self.check_f(OP, "dy", dy, DType::F32)?;
        check_same_shape(OP, x, dy)?;
        match self.backend() {
            Backend::Cpu => {
                let input = x.cpu_f32_slice(OP, "x")?;
                let mut out = dy.cpu_f32_slice(OP, "dy")?.to_vec();
                par_zip_map(&mut out, input, |o, x| *o *= act.derivative(x));
                Ok(Tensor::cpu_f32(x.shape.clone(), out, self.id()))
            }
            Backend::Gpu(gpu) => gpu.activation_backward(x, dy, act),
        }
    }

    /// Returns `silu(gate) * up`, the gated product of a Llama MLP.
    pub fn silu_mul(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        const OP: &str = "silu_mul";
        self.check_f(OP, "gate", gate, DType::F32)?;
        self.check_f(OP, "up", up, DType::F32)?;
        check_same_shape(OP, gate, up)?;
        match self.backend() {
            Backend::Cpu => {
                let g = gate.cpu_f32_slice(OP, "gate")?;
                let mut out = up.cpu_f32_slice(OP, "up")?.to_vec();
                par_zip_map(&mut out, g, |o, g| *o *= Activation::Silu.apply(g));
                Ok(Tensor::cpu_f32(gate.shape.clone(), out, self.id()))
            }
            Backend::Gpu(gpu) => gpu.silu_mul(gate, up),
        }
    }

    /// Returns the gradients of `silu(gate) * up` with respect to `gate` and `up`.
    pub fn silu_mul_backward(&self, gate: &Tensor, up: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
        const OP: &str = "silu_mul_backward";
        self.check_f(OP, "gate", gate, DType::F32)?;
        self.check_f(OP, "up", up, DType::F32)?;
        self.check_f(OP, "dy", dy, DType::F32)?;
        check_same_shape(OP, gate, up)?;
        check_same_shape(OP, gate, dy)?;
        match self.backend() {
            Backend::Cpu => {
                let (g, u, d) = (gate.cpu_f32_slice(OP, "gate")?, up.cpu_f32_slice(OP, "up")?, dy.cpu_f32_slice(OP, "dy")?);
                let mut dgate = d.to_vec();
                let mut dup = d.to_vec();
                par_zip_map(&mut dup, g, |o, g| *o *= Activation::Silu.apply(g));
                let derivative: Vec<f32> = g.iter().zip(u).map(|(&g, &u)| u * Activation::Silu.derivative(g)).collect();
                par_zip_map(&mut dgate, &derivative, |o, s| *o *= s);
                let id = self.id();
                Ok((Tensor::cpu_f32(gate.shape.clone(), dgate, id), Tensor::cpu_f32(gate.shape.clone(), dup, id)))
            }
            Backend::Gpu(gpu) => gpu.silu_mul_backward(gate, up, dy),
        }
    }

    /// Returns `x + tanh(gate) * y`, the tanh-gated residual; `gate` has one element.
    pub fn tanh_gate_add(&self, x: &Tensor, y: &Tensor, gate: &Tensor) -> Result<Tensor> {
        const OP: &str = "tanh_gate_add";
        self.check_f(OP, "x", x, DType::F32)?;
        self.check_f(OP, "y", y, DType::F32)?;
        self.check_f(OP, "gate", gate, DType::F32)?;
        check_same_shape(OP, x, y)?;
        if gate.numel() != 1 {
            return Err(shape_err!(OP, "the gate must have one element, found shape {:?}", gate.shape()));
        }
        match self.backend() {
            Backend::Cpu => {
                let g = gate.cpu_f32_slice(OP, "gate")?[0].tanh();
                let mut out = x.cpu_f32_slice(OP, "x")?.to_vec();
                par_zip_map(&mut out, y.cpu_f32_slice(OP, "y")?, |o, y| *o += g * y);
                Ok(Tensor::cpu_f32(x.shape.clone(), out, self.id()))
            }
            Backend::Gpu(gpu) => gpu.tanh_gate_add(x, y, gate),
        }
    }

    /// Returns the gradients of `x + tanh(gate) * y` with respect to `y` and
    /// `gate`; the gradient with respect to `x` is `dout` itself.
    pub fn tanh_gate_add_backward(&self, y: &Tensor, gate: &Tensor, dout: &Tensor) -> Result<(Tensor, Tensor)> {
        const OP: &str = "tanh_gate_add_backward";
        self.check_f(OP, "y", y, DType::F32)?;
        self.check_f(OP, "gate", gate, DType::F32)?;
        self.check_f(OP, "dout", dout, DType::F32)?;
        check_same_shape(OP, y, dout)?;
        match self.backend() {
            Backend::Cpu => {
                let t = gate.cpu_f32_slice(OP, "gate")?[0].tanh();
                let (ys, ds) = (y.cpu_f32_slice(OP, "y")?, dout.cpu_f32_slice(OP, "dout")?);
                let mut dy = vec![0.0; ds.len()];
                par_zip_map(&mut dy, ds, |o, d| *o = t * d);
                let dot: f64 = ys.iter().zip(ds).map(|(&y, &d)| y as f64 * d as f64).sum();
                let dgate = (1.0 - t * t) * dot as f32;
                let id = self.id();
                Ok((Tensor::cpu_f32(y.shape.clone(), dy, id), Tensor::cpu_f32(gate.shape.clone(), vec![dgate], id)))
            }
            Backend::Gpu(gpu) => gpu.tanh_gate_add_backward(y, gate, dout),
        }
    }
}
