//! The trainable tensors of the Flamingo connector and their gradients.
//!
//! Every trainable tensor is registered once, under its OpenFlamingo
//! checkpoint name, in one [`ParamStore`]. Modules keep [`ParamId`]s, read
//! values during forward and add into gradients during backward; the
//! optimizer, gradient clipping and checkpoints walk the store. Holding
//! every trainable tensor in one list is what lets the trainer count
//! exactly what the optimizer updates.

use std::collections::BTreeMap;
use std::path::Path;

use flamingo_kernels::{DType, Device, HostData, HostTensor, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};

/// A handle to one tensor of a [`ParamStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ParamId(usize);

/// One trainable tensor.
#[derive(Debug)]
pub struct Param {
    /// The OpenFlamingo checkpoint name, e.g. `perceiver.latents`.
    pub name: String,
    pub value: Tensor,
    /// The accumulated gradient; `None` until backward first touches it.
    pub grad: Option<Tensor>,
    /// Whether AdamW applies weight decay (cross-attention matrices only).
    pub weight_decay: bool,
}

/// How a new tensor is initialised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    Zeros,
    Ones,
    /// Normal with mean 0 and this standard deviation.
    Normal(f32),
    /// PyTorch's `nn.Linear` default: uniform in ±1/√fan_in.
    LinearDefault { fan_in: usize },
}

/// Every trainable tensor of a model, in registration order.
pub struct ParamStore {
    device: Device,
    params: Vec<Param>,
    by_name: BTreeMap<String, ParamId>,
    rng: StdRng,
}

impl ParamStore {
    /// Creates an empty store whose random initialisations draw from `seed`.
    pub fn new(device: &Device, seed: u64) -> Self {
        Self { device: device.clone(), params: Vec::new(), by_name: BTreeMap::new(), rng: StdRng::seed_from_u64(seed) }
    }

    /// Returns the device the tensors live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Registers a tensor of `shape` named `name`, initialised by `init`.
    pub fn add(&mut self, name: impl Into<String>, shape: &[usize], init: Init, weight_decay: bool) -> Result<ParamId> {
        let numel: usize = shape.iter().product();
        let values: Vec<f32> = match init {
            Init::Zeros => vec![0.0; numel],
            Init::Ones => vec![1.0; numel],
            Init::Normal(std) => (0..numel).map(|_| std * standard_normal(&mut self.rng)).collect(),
            Init::LinearDefault { fan_in } => {
                let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
                (0..numel).map(|_| self.rng.random_range(-bound..bound)).collect()
            }
        };
        self.add_value(name, HostTensor::from_f32(shape.to_vec(), values)?, weight_decay)
    }

    /// Registers a tensor named `name` with the given value.
    pub fn add_value(&mut self, name: impl Into<String>, value: HostTensor, weight_decay: bool) -> Result<ParamId> {
        let name = name.into();
        if self.by_name.contains_key(&name) {
            return Err(Error::InvalidInput(format!("trainable tensor `{name}` is registered twice")));
        }
        let value = self.device.upload(&value.into_f32())?;
        let id = ParamId(self.params.len());
        self.params.push(Param { name: name.clone(), value, grad: None, weight_decay });
        self.by_name.insert(name, id);
        Ok(id)
    }

    /// Returns the current value of a tensor.
    pub fn value(&self, id: ParamId) -> &Tensor {
        &self.params[id.0].value
    }

    /// Returns the tensor registered as `name`.
    pub fn id(&self, name: &str) -> Option<ParamId> {
        self.by_name.get(name).copied()
    }

    /// Returns the gradient of a tensor, created as zeros on first use.
    pub fn grad_mut(&mut self, id: ParamId) -> Result<&mut Tensor> {
        let param = &mut self.params[id.0];
        if param.grad.is_none() {
            param.grad = Some(self.device.zeros(param.value.shape().to_vec(), DType::F32)?);
        }
        Ok(param.grad.as_mut().expect("the gradient was just created"))
    }

    /// Adds `grad` into the gradient of a tensor.
    pub fn accumulate(&mut self, id: ParamId, grad: Tensor) -> Result<()> {
        let param = &mut self.params[id.0];
        if grad.shape() != param.value.shape() {
            return Err(Error::InvalidInput(format!(
                "gradient of `{}` has shape {:?}, the tensor has {:?}",
                param.name,
                grad.shape(),
                param.value.shape()
            )));
        }
        match &mut param.grad {
            Some(existing) => self.device.add_assign(existing, &grad)?,
            // A gradient still shared with a saved activation is copied, so
            // that later accumulation can update it in place.
            None if grad.is_unique() => param.grad = Some(grad),
            None => param.grad = Some(self.device.copy(&grad)?),
        }
        Ok(())
    }

    /// Replaces the value of tensor `name`, keeping its shape.
    pub fn set(&mut self, name: &str, value: &HostTensor) -> Result<()> {
        let id = self.id(name).ok_or_else(|| Error::InvalidInput(format!("there is no trainable tensor `{name}`")))?;
        let param = &mut self.params[id.0];
        if value.shape != param.value.shape() {
            return Err(Error::TensorShape {
                source_name: "ParamStore::set".into(),
                name: name.to_string(),
                expected: param.value.shape().to_vec(),
                found: value.shape.clone(),
            });
        }
        param.value = self.device.upload(&value.clone().into_f32())?;
        Ok(())
    }

    /// Drops every gradient, so the next backward starts from zero.
    pub fn zero_grads(&mut self) {
        for param in &mut self.params {
            param.grad = None;
        }
    }

    /// Returns all tensors in registration order.
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// Returns all tensors in registration order, for the optimizer.
    pub fn params_mut(&mut self) -> &mut [Param] {
        &mut self.params
    }

    /// Returns the total number of trainable elements.
    pub fn num_elements(&self) -> usize {
        self.params.iter().map(|param| param.value.numel()).sum()
    }

    /// Copies every tensor to host memory, keyed by name.
    pub fn to_host(&self) -> Result<BTreeMap<String, HostTensor>> {
        self.params.iter().map(|param| Ok((param.name.clone(), param.value.to_host()?))).collect()
    }

    /// Replaces every tensor's value with the one of the same name in
    /// `tensors`; fails naming the first missing or misshapen tensor.
    pub fn load_from(&mut self, tensors: &BTreeMap<String, HostTensor>, origin: &str) -> Result<()> {
        for param in &self.params {
            let found = tensors.get(&param.name).ok_or_else(|| Error::MissingTensor {
                source_name: origin.to_string(),
                name: param.name.clone(),
            })?;
            if found.shape != param.value.shape() {
                return Err(Error::TensorShape {
                    source_name: origin.to_string(),
                    name: param.name.clone(),
                    expected: param.value.shape().to_vec(),
                    found: found.shape.clone(),
                });
            }
        }
        for param in &mut self.params {
            param.value = self.device.upload(&tensors[&param.name].clone().into_f32())?;
            param.grad = None;
        }
        Ok(())
    }

    /// Writes every tensor to a safetensors file at `path` with `metadata`.
    pub fn save_safetensors(&self, path: &Path, metadata: Option<std::collections::HashMap<String, String>>) -> Result<()> {
        write_safetensors(path, &self.to_host()?, metadata)
    }
}

/// Writes f32 host tensors to a safetensors file.
pub fn write_safetensors(
    path: &Path,
    tensors: &BTreeMap<String, HostTensor>,
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<()> {
    let mut buffers = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        let bytes: Vec<u8> = match &tensor.data {
            HostData::F32(values) => bytemuck::cast_slice(values).to_vec(),
            other => bytemuck::cast_slice(&HostTensor::new(tensor.shape.clone(), other.clone())?.to_f32()).to_vec(),
        };
        buffers.push((name.clone(), tensor.shape.clone(), bytes));
    }
    let views = buffers
        .iter()
        .map(|(name, shape, bytes)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map_err(|e| Error::format(path, format!("tensor `{name}`: {e}")))?;
            Ok((name.as_str(), view))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, metadata, path).map_err(|e| Error::format(path, format!("cannot write safetensors: {e}")))
}

/// A sample of the standard normal distribution (Box-Muller).
fn standard_normal(rng: &mut StdRng) -> f32 {
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}
