//! The pre-LayerNorm transformer encoder that CLIP's and SigLIP's vision
//! towers share, and the weight-loading helpers of the vision encoders.
//!
//! x [N, T, C] (N images, T tokens, C hidden size), H heads of D = C / H.
//! Each layer: x += out_proj(attention(q, k, v of layer_norm1(x))), then
//! x += fc2(act(fc1(layer_norm2(x)))). Attention is bidirectional, without
//! a mask, with scale D^−½. Checkpoint names (transformers' `CLIPEncoderLayer`
//! and `SiglipEncoderLayer`) under `encoder.layers.{i}.`:
//! `layer_norm1`, `self_attn.{q,k,v,out}_proj`, `layer_norm2`, `mlp.fc1`, `mlp.fc2`.

use flamingo_kernels::{Activation, AttentionMask, DType, Device, HostTensor, Matmul, Tensor};

use crate::error::Result;
use crate::loader::WeightSource;

/// Loads an f32 parameter (norm weight, bias, embedding) of shape `shape`.
pub(crate) fn load_param(device: &Device, weights: &dyn WeightSource, name: &str, shape: &[usize]) -> Result<Tensor> {
    let host = weights.tensor_f32_with_shape(name, shape)?;
    Ok(device.upload(&host)?)
}

/// A LayerNorm's weight, bias and epsilon.
pub(crate) struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    pub(crate) fn load(device: &Device, weights: &dyn WeightSource, prefix: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: load_param(device, weights, &format!("{prefix}.weight"), &[dim])?,
            bias: load_param(device, weights, &format!("{prefix}.bias"), &[dim])?,
            eps: eps as f32,
        })
    }

    pub(crate) fn forward(&self, device: &Device, x: &Tensor) -> Result<Tensor> {
        Ok(device.layer_norm(x, &self.weight, Some(&self.bias), self.eps)?.0)
    }
}

/// A PyTorch `Linear`: weight [out, in] in the frozen-weight dtype, bias [out] in f32.
pub(crate) struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    pub(crate) fn load(
        device: &Device,
        weights: &dyn WeightSource,
        prefix: &str,
        (out_features, in_features): (usize, usize),
        dtype: DType,
    ) -> Result<Self> {
        let weight = weights.tensor_f32_with_shape(&format!("{prefix}.weight"), &[out_features, in_features])?;
        Ok(Self {
            weight: device.upload_as(weight, dtype)?,
            bias: load_param(device, weights, &format!("{prefix}.bias"), &[out_features])?,
        })
    }

    /// Stacks the rows of several linears of one input size into one, so a
    /// single matmul computes all their outputs side by side.
    fn load_stacked(
        device: &Device,
        weights: &dyn WeightSource,
        prefixes: &[String],
        (out_features, in_features): (usize, usize),
        dtype: DType,
    ) -> Result<Self> {
        let mut weight = Vec::with_capacity(prefixes.len() * out_features * in_features);
        let mut bias = Vec::with_capacity(prefixes.len() * out_features);
        for prefix in prefixes {
            weight.extend(weights.tensor_f32_with_shape(&format!("{prefix}.weight"), &[out_features, in_features])?.to_f32());
            bias.extend(weights.tensor_f32_with_shape(&format!("{prefix}.bias"), &[out_features])?.to_f32());
        }
        let rows = prefixes.len() * out_features;
        Ok(Self {
            weight: device.upload_as(HostTensor::from_f32([rows, in_features], weight)?, dtype)?,
            bias: device.from_f32([rows], bias)?,
        })
    }

    pub(crate) fn forward(&self, device: &Device, x: &Tensor, activation: Activation) -> Result<Tensor> {
        let spec = Matmul { activation, ..Matmul::linear(Some(&self.bias)) };
        Ok(device.matmul(x, &self.weight, &spec)?)
    }
}

/// The sizes of an encoder, read from the model's config.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EncoderDims {
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub layers: usize,
    pub eps: f64,
    pub activation: Activation,
}

struct EncoderLayer {
    layer_norm1: LayerNorm,
    /// q, k and v projections stacked to [3C, C].
    qkv: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// A stack of pre-LayerNorm encoder layers.
pub(crate) struct Encoder {
    dims: EncoderDims,
    layers: Vec<EncoderLayer>,
}

impl Encoder {
    /// Loads `encoder.layers.{0..layers}` under `prefix`.
    pub(crate) fn load(device: &Device, weights: &dyn WeightSource, prefix: &str, dims: EncoderDims, dtype: DType) -> Result<Self> {
        let (c, m) = (dims.hidden, dims.intermediate);
        let mut layers = Vec::with_capacity(dims.layers);
        for index in 0..dims.layers {
            let layer = format!("{prefix}encoder.layers.{index}");
            let projections: Vec<String> = ["q_proj", "k_proj", "v_proj"]
                .iter()
                .map(|name| format!("{layer}.self_attn.{name}"))
                .collect();
            layers.push(EncoderLayer {
                layer_norm1: LayerNorm::load(device, weights, &format!("{layer}.layer_norm1"), c, dims.eps)?,
                qkv: Linear::load_stacked(device, weights, &projections, (c, c), dtype)?,
                out_proj: Linear::load(device, weights, &format!("{layer}.self_attn.out_proj"), (c, c), dtype)?,
                layer_norm2: LayerNorm::load(device, weights, &format!("{layer}.layer_norm2"), c, dims.eps)?,
                fc1: Linear::load(device, weights, &format!("{layer}.mlp.fc1"), (m, c), dtype)?,
                fc2: Linear::load(device, weights, &format!("{layer}.mlp.fc2"), (c, m), dtype)?,
            });
        }
        Ok(Self { dims, layers })
    }

    /// Runs every layer on x [N, T, C].
    pub(crate) fn forward(&self, device: &Device, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for layer in &self.layers {
            x = self.layer_forward(device, layer, &x)?;
        }
        Ok(x)
    }

    fn layer_forward(&self, device: &Device, layer: &EncoderLayer, x: &Tensor) -> Result<Tensor> {
        let (n, t, c) = (x.dim(0), x.dim(1), self.dims.hidden);
        let (h, d) = (self.dims.heads, c / self.dims.heads);

        let normed = layer.layer_norm1.forward(device, x)?;
        let qkv = layer.qkv.forward(device, &normed, Activation::Identity)?;
        let qkv = qkv.reshape([n * t, 3 * c])?;
        let q = device.narrow(&qkv, 1, 0, c)?.reshape([n, t, h, d])?;
        let k = device.narrow(&qkv, 1, c, c)?.reshape([n, t, h, d])?;
        let v = device.narrow(&qkv, 1, 2 * c, c)?.reshape([n, t, h, d])?;
        let scale = (d as f32).powf(-0.5);
        let attended = device.attention(&q, &k, &v, &AttentionMask::default(), scale)?.out;
        let attended = layer.out_proj.forward(device, &attended.reshape([n, t, c])?, Activation::Identity)?;
        let x = device.add(x, &attended)?;

        let normed = layer.layer_norm2.forward(device, &x)?;
        let hidden = layer.fc1.forward(device, &normed, self.dims.activation)?;
        let mlp = layer.fc2.forward(device, &hidden, Activation::Identity)?;
        Ok(device.add(&x, &mlp)?)
    }
}
