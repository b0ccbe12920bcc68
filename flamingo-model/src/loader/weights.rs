//! The interface that model code loads weights through, whatever the file format.

use std::collections::BTreeMap;
use std::sync::Arc;

use flamingo_kernels::HostTensor;

use crate::error::{Error, Result};

/// A set of named tensors: a safetensors checkpoint, a GGUF file, a renamed
/// view of one, or tensors built in memory.
///
/// Shapes are in PyTorch order: row-major, the last dimension varies fastest,
/// and a linear layer's weight is `[out_features, in_features]`.
pub trait WeightSource: Send + Sync {
    /// Returns a description of where the tensors come from (a path and the format),
    /// used as the source in error messages.
    fn origin(&self) -> String;

    /// Returns the names of all tensors, sorted.
    fn names(&self) -> Vec<String>;

    /// Returns whether a tensor named `name` exists.
    fn contains(&self, name: &str) -> bool;

    /// Returns the shape of tensor `name`, or [`Error::MissingTensor`].
    fn shape(&self, name: &str) -> Result<Vec<usize>>;

    /// Loads tensor `name` into host memory.
    ///
    /// F32 and F16 data keep their type. BF16, F64 and quantized GGUF data are
    /// converted to f32, because host tensors have no other float types.
    fn tensor(&self, name: &str) -> Result<HostTensor>;

    /// Loads tensor `name` after checking that its shape is `expected`.
    ///
    /// Fails with [`Error::MissingTensor`] or [`Error::TensorShape`] before
    /// any data is read.
    fn tensor_with_shape(&self, name: &str, expected: &[usize]) -> Result<HostTensor> {
        check_shape(self, name, expected)?;
        self.tensor(name)
    }

    /// Loads tensor `name` as f32, converting f16 data.
    fn tensor_f32(&self, name: &str) -> Result<HostTensor> {
        Ok(self.tensor(name)?.into_f32())
    }

    /// Loads tensor `name` as f16, rounding f32 data to the nearest f16.
    fn tensor_f16(&self, name: &str) -> Result<HostTensor> {
        Ok(self.tensor(name)?.into_f16())
    }

    /// Loads tensor `name` as f32 after checking that its shape is `expected`.
    fn tensor_f32_with_shape(&self, name: &str, expected: &[usize]) -> Result<HostTensor> {
        Ok(self.tensor_with_shape(name, expected)?.into_f32())
    }
}

/// Checks that tensor `name` of `source` exists and has shape `expected`.
pub fn check_shape<S: WeightSource + ?Sized>(
    source: &S,
    name: &str,
    expected: &[usize],
) -> Result<()> {
    let found = source.shape(name)?;
    if found != expected {
        return Err(Error::TensorShape {
            source_name: source.origin(),
            name: name.to_string(),
            expected: expected.to_vec(),
            found,
        });
    }
    Ok(())
}

/// Builds the [`Error::MissingTensor`] for tensor `name` of `source`.
pub fn missing_tensor<S: WeightSource + ?Sized>(source: &S, name: &str) -> Error {
    Error::MissingTensor {
        source_name: source.origin(),
        name: name.to_string(),
    }
}

impl<S: WeightSource + ?Sized> WeightSource for &S {
    fn origin(&self) -> String {
        (**self).origin()
    }
    fn names(&self) -> Vec<String> {
        (**self).names()
    }
    fn contains(&self, name: &str) -> bool {
        (**self).contains(name)
    }
    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        (**self).shape(name)
    }
    fn tensor(&self, name: &str) -> Result<HostTensor> {
        (**self).tensor(name)
    }
}

impl<S: WeightSource + ?Sized> WeightSource for Box<S> {
    fn origin(&self) -> String {
        (**self).origin()
    }
    fn names(&self) -> Vec<String> {
        (**self).names()
    }
    fn contains(&self, name: &str) -> bool {
        (**self).contains(name)
    }
    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        (**self).shape(name)
    }
    fn tensor(&self, name: &str) -> Result<HostTensor> {
        (**self).tensor(name)
    }
}

impl<S: WeightSource + ?Sized> WeightSource for Arc<S> {
    fn origin(&self) -> String {
        (**self).origin()
    }
    fn names(&self) -> Vec<String> {
        (**self).names()
    }
    fn contains(&self, name: &str) -> bool {
        (**self).contains(name)
    }
    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        (**self).shape(name)
    }
    fn tensor(&self, name: &str) -> Result<HostTensor> {
        (**self).tensor(name)
    }
}

/// The tensors of another source whose names start with a prefix, with the
/// prefix removed.
///
/// For example, `PrefixedWeights::new(clip, "vision_model.")` shows the vision
/// tower of a full CLIP checkpoint under the names a vision-only model uses.
pub struct PrefixedWeights<S> {
    inner: S,
    prefix: String,
}

impl<S: WeightSource> PrefixedWeights<S> {
    /// Wraps `inner`, exposing tensor `prefix + name` as `name`.
    pub fn new(inner: S, prefix: impl Into<String>) -> Self {
        Self {
            inner,
            prefix: prefix.into(),
        }
    }

    /// Returns the wrapped source.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    fn full_name(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }
}

impl<S: WeightSource> WeightSource for PrefixedWeights<S> {
    fn origin(&self) -> String {
        format!("{} (tensors under `{}`)", self.inner.origin(), self.prefix)
    }

    fn names(&self) -> Vec<String> {
        self.inner
            .names()
            .into_iter()
            .filter_map(|name| name.strip_prefix(&self.prefix).map(str::to_string))
            .collect()
    }

    fn contains(&self, name: &str) -> bool {
        self.inner.contains(&self.full_name(name))
    }

    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        self.inner.shape(&self.full_name(name))
    }

    fn tensor(&self, name: &str) -> Result<HostTensor> {
        self.inner.tensor(&self.full_name(name))
    }
}

/// Tensors held in memory, for converted checkpoints and for tests.
#[derive(Debug, Clone, Default)]
pub struct InMemoryWeights {
    origin: String,
    tensors: BTreeMap<String, HostTensor>,
}

impl InMemoryWeights {
    /// Creates an empty set; `origin` names it in error messages.
    pub fn new(origin: impl Into<String>) -> Self {
        Self {
            origin: origin.into(),
            tensors: BTreeMap::new(),
        }
    }

    /// Adds or replaces tensor `name`.
    pub fn insert(&mut self, name: impl Into<String>, tensor: HostTensor) {
        self.tensors.insert(name.into(), tensor);
    }

    /// Removes tensor `name` and returns it.
    pub fn remove(&mut self, name: &str) -> Option<HostTensor> {
        self.tensors.remove(name)
    }

    /// Returns the tensors, by name.
    pub fn tensors(&self) -> &BTreeMap<String, HostTensor> {
        &self.tensors
    }
}

impl WeightSource for InMemoryWeights {
    fn origin(&self) -> String {
        self.origin.clone()
    }

    fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        match self.tensors.get(name) {
            Some(tensor) => Ok(tensor.shape.clone()),
            None => Err(missing_tensor(self, name)),
        }
    }

    fn tensor(&self, name: &str) -> Result<HostTensor> {
        self.tensors
            .get(name)
            .cloned()
            .ok_or_else(|| missing_tensor(self, name))
    }
}
