//! AdamW over the connector's trainable tensors, with per-group learning
//! rates, weight decay on the tensors the model marks for it, and gradient
//! clipping.
//!
//! Every trainable tensor belongs to exactly one group, chosen by its
//! OpenFlamingo name; a tensor that fits no group is an error rather than
//! a tensor silently left out. The optimizer's counts per group are logged
//! at startup and stored in every checkpoint.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;

use flamingo_kernels::{AdamW, DType, Device, Tensor};
use flamingo_model::flamingo::params::write_safetensors;
use flamingo_model::flamingo::ParamStore;
use flamingo_model::loader::{SafetensorsWeights, WeightSource};
use serde::{Deserialize, Serialize};

use crate::config::OptimizerConfig;
use crate::error::{Result, TrainError};

/// Metadata key of the per-tensor step counts in the optimizer file.
const STEPS_KEY: &str = "flamingo_train.adamw_steps";

/// A set of trainable tensors that shares a learning-rate multiplier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamGroup {
    /// `perceiver.*`: latents, embeddings, attention and feed-forward layers.
    Resampler,
    /// `*.gated_cross_attn_layer.*` except the gates.
    CrossAttention,
    /// `*.attn_gate` and `*.ff_gate`, the tanh gates.
    Gates,
    /// The input and output rows of `<image>` and `<|endofchunk|>`.
    TokenRows,
}

impl ParamGroup {
    /// Every group, in the order summaries list them.
    pub const ALL: [ParamGroup; 4] = [ParamGroup::Resampler, ParamGroup::CrossAttention, ParamGroup::Gates, ParamGroup::TokenRows];

    /// Returns the group of the tensor named `name`, or `None` when no group fits.
    pub fn of(name: &str) -> Option<ParamGroup> {
        if name.ends_with(".attn_gate") || name.ends_with(".ff_gate") {
            Some(ParamGroup::Gates)
        } else if name.starts_with("perceiver.") {
            Some(ParamGroup::Resampler)
        } else if name.contains(".gated_cross_attn_layer.") {
            Some(ParamGroup::CrossAttention)
        } else if name.contains("additional_embedding") || name.contains("additional_fc") {
            Some(ParamGroup::TokenRows)
        } else {
            None
        }
    }

    /// Returns the name used in logs and configuration fields.
    pub fn name(self) -> &'static str {
        match self {
            ParamGroup::Resampler => "resampler",
            ParamGroup::CrossAttention => "cross_attention",
            ParamGroup::Gates => "gates",
            ParamGroup::TokenRows => "token_rows",
        }
    }

    fn multiplier(self, config: &OptimizerConfig) -> f32 {
        match self {
            ParamGroup::Resampler => config.resampler_lr_multiplier,
            ParamGroup::CrossAttention => config.cross_attention_lr_multiplier,
            ParamGroup::Gates => config.gate_lr_multiplier,
            ParamGroup::TokenRows => config.token_rows_lr_multiplier,
        }
    }
}

/// The contents of one optimizer group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupSummary {
    pub group: ParamGroup,
    pub tensors: usize,
    pub elements: usize,
    /// Tensors and elements with weight decay.
    pub decayed_tensors: usize,
    pub decayed_elements: usize,
    pub lr_multiplier: f32,
}

/// The contents of the optimizer, per group and in total.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptimizerSummary {
    pub groups: Vec<GroupSummary>,
    pub tensors: usize,
    pub elements: usize,
    pub decayed_tensors: usize,
    pub decayed_elements: usize,
}

impl fmt::Display for OptimizerSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "optimizer contains {} tensors, {} elements (weight decay on {} tensors, {} elements):", self.tensors, self.elements, self.decayed_tensors, self.decayed_elements)?;
        for group in &self.groups {
            write!(f, " {} {} tensors {} elements lr x{};", group.group.name(), group.tensors, group.elements, group.lr_multiplier)?;
        }
        Ok(())
    }
}

/// The moments of one tensor.
struct ParamState {
    name: String,
    group: ParamGroup,
    decay: bool,
    /// First moment (`exp_avg`).
    m: Tensor,
    /// Second moment (`exp_avg_sq`).
    v: Tensor,
    /// Updates applied to this tensor, for bias correction. A tensor that
    /// got no gradient in a step is skipped and its count stays, as in
    /// PyTorch's AdamW.
    steps: u64,
}

/// AdamW with decoupled weight decay (Loshchilov and Hutter), one state per
/// trainable tensor, in the model's registration order.
pub struct AdamWOptimizer {
    device: Device,
    config: OptimizerConfig,
    states: Vec<ParamState>,
}

impl AdamWOptimizer {
    /// Creates zero moments for every tensor of `store`.
    ///
    /// Fails when a tensor fits no group, or when the groups together do
    /// not hold exactly the store's elements.
    pub fn new(store: &ParamStore, config: &OptimizerConfig) -> Result<Self> {
        let device = store.device();
        let mut states = Vec::with_capacity(store.params().len());
        for param in store.params() {
            let group = ParamGroup::of(&param.name).ok_or_else(|| {
                TrainError::Config(format!(
                    "trainable tensor `{}` belongs to no optimizer group (resampler, cross_attention, gates, token_rows); the optimizer would leave it untrained",
                    param.name
                ))
            })?;
            let shape = param.value.shape().to_vec();
            states.push(ParamState {
                name: param.name.clone(),
                group,
                decay: param.weight_decay,
                m: device.zeros(shape.clone(), DType::F32)?,
                v: device.zeros(shape, DType::F32)?,
                steps: 0,
            });
        }
        let optimizer = Self { device: device.clone(), config: config.clone(), states };

        let summary = optimizer.summary();
        if summary.elements != store.num_elements() || summary.tensors != store.params().len() {
            return Err(TrainError::Config(format!(
                "the optimizer contains {} tensors with {} elements, but the model has {} trainable tensors with {} elements",
                summary.tensors,
                summary.elements,
                store.params().len(),
                store.num_elements()
            )));
        }
        Ok(optimizer)
    }

    /// Counts per group and in total.
    pub fn summary(&self) -> OptimizerSummary {
        let mut groups: Vec<GroupSummary> = ParamGroup::ALL
            .iter()
            .map(|&group| GroupSummary { group, tensors: 0, elements: 0, decayed_tensors: 0, decayed_elements: 0, lr_multiplier: group.multiplier(&self.config) })
            .collect();
        for state in &self.states {
            let summary = &mut groups[ParamGroup::ALL.iter().position(|&g| g == state.group).expect("every group is listed")];
            summary.tensors += 1;
            summary.elements += state.m.numel();
            if state.decay {
                summary.decayed_tensors += 1;
                summary.decayed_elements += state.m.numel();
            }
        }
        OptimizerSummary {
            tensors: groups.iter().map(|g| g.tensors).sum(),
            elements: groups.iter().map(|g| g.elements).sum(),
            decayed_tensors: groups.iter().map(|g| g.decayed_tensors).sum(),
            decayed_elements: groups.iter().map(|g| g.decayed_elements).sum(),
            groups,
        }
    }

    /// Computes the global L2 norm of every gradient in `store`, summed on
    /// the device and read back once.
    pub fn grad_norm(store: &ParamStore) -> Result<f32> {
        let device = store.device();
        let mut total: Option<Tensor> = None;
        for grad in store.params().iter().filter_map(|param| param.grad.as_ref()) {
            let squares = device.sum_squares(grad)?;
            total = Some(match total {
                Some(sum) => device.add(&sum, &squares)?,
                None => squares,
            });
        }
        let sum = match total {
            Some(sum) => sum.to_scalar()? as f64,
            None => 0.0,
        };
        Ok(sum.sqrt() as f32)
    }

    /// Scales the gradients down so that their global norm is at most
    /// `max_norm`, by the factor max_norm / (norm + 1e-6) that PyTorch's
    /// `clip_grad_norm_` uses. Returns the norm before clipping. A
    /// `max_norm` of 0 only measures.
    pub fn clip_grad_norm(store: &mut ParamStore, max_norm: f32) -> Result<f32> {
        let norm = Self::grad_norm(store)?;
        if max_norm <= 0.0 || !norm.is_finite() {
            return Ok(norm);
        }
        let factor = max_norm / (norm + 1e-6);
        if factor < 1.0 {
            let device = store.device().clone();
            for grad in store.params_mut().iter_mut().filter_map(|param| param.grad.as_mut()) {
                device.scale_assign(grad, factor)?;
            }
        }
        Ok(norm)
    }

    /// Applies one AdamW update with base learning rate `lr` to every
    /// tensor that has a gradient; returns how many were updated.
    pub fn step(&mut self, store: &mut ParamStore, lr: f32) -> Result<usize> {
        let device = store.device().clone();
        let params = store.params_mut();
        if params.len() != self.states.len() {
            return Err(TrainError::Config(format!("the optimizer contains {} tensors but the model has {}", self.states.len(), params.len())));
        }
        let mut updated = 0;
        for (param, state) in params.iter_mut().zip(&mut self.states) {
            if param.name != state.name {
                return Err(TrainError::Config(format!("optimizer state `{}` is paired with tensor `{}`; the model's tensors changed order", state.name, param.name)));
            }
            let Some(grad) = param.grad.as_ref() else { continue };
            state.steps += 1;
            let hyper = AdamW {
                lr: lr * state.group.multiplier(&self.config),
                beta1: self.config.beta1,
                beta2: self.config.beta2,
                eps: self.config.eps,
                weight_decay: if state.decay { self.config.weight_decay } else { 0.0 },
                step: state.steps,
            };
            device.adamw_step(&mut param.value, grad, &mut state.m, &mut state.v, &hyper)?;
            updated += 1;
        }
        Ok(updated)
    }

    /// Writes the moments to a safetensors file (`{name}.exp_avg`,
    /// `{name}.exp_avg_sq`) with the per-tensor step counts as metadata.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = BTreeMap::new();
        let mut steps = BTreeMap::new();
        for state in &self.states {
            tensors.insert(format!("{}.exp_avg", state.name), state.m.to_host()?);
            tensors.insert(format!("{}.exp_avg_sq", state.name), state.v.to_host()?);
            steps.insert(state.name.clone(), state.steps);
        }
        let metadata = HashMap::from([(STEPS_KEY.to_string(), serde_json::to_string(&steps).expect("step counts are plain data"))]);
        write_safetensors(path, &tensors, Some(metadata))?;
        Ok(())
    }

    /// Replaces the moments and step counts with those saved at `path`;
    /// fails naming the first missing or misshapen tensor.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let weights = SafetensorsWeights::open(path)?;
        let steps: BTreeMap<String, u64> = weights
            .metadata()
            .get(STEPS_KEY)
            .and_then(|text| serde_json::from_str(text).ok())
            .ok_or_else(|| TrainError::checkpoint(path, format!("the metadata entry `{STEPS_KEY}` is missing or invalid")))?;
        let mut loaded = Vec::with_capacity(self.states.len());
        for state in &self.states {
            let shape = state.m.shape().to_vec();
            let m = weights.tensor_f32_with_shape(&format!("{}.exp_avg", state.name), &shape)?;
            let v = weights.tensor_f32_with_shape(&format!("{}.exp_avg_sq", state.name), &shape)?;
            let count = *steps.get(&state.name).ok_or_else(|| TrainError::checkpoint(path, format!("no step count for `{}`", state.name)))?;
            loaded.push((m, v, count));
        }
        for (state, (m, v, count)) in self.states.iter_mut().zip(loaded) {
            state.m = self.device.upload(&m)?;
            state.v = self.device.upload(&v)?;
            state.steps = count;
        }
        Ok(())
    }
}
