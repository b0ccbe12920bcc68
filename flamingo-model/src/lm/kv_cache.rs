//! The self-attention key/value cache of incremental decoding.
//!
//! Per layer, keys and values are [B, Tc, Hkv, D] (B sequences, Tc cached
//! tokens, Hkv key/value heads, D head size), the layout the attention op
//! reads, so a decoding step attends over the cache without any permute.
//! Llama keys are stored after RoPE, so cached tokens keep their positions.

use flamingo_kernels::{Device, Tensor};

use crate::error::{Error, Result};

/// The cached keys and values of one layer.
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    keys: Option<Tensor>,
    values: Option<Tensor>,
}

impl LayerCache {
    /// The number of cached tokens, Tc.
    pub fn len(&self) -> usize {
        self.keys.as_ref().map_or(0, |keys| keys.dim(1))
    }

    /// Whether no token is cached.
    pub fn is_empty(&self) -> bool {
        self.keys.is_none()
    }

    /// Keys [B, Tc, Hkv, D], if any token is cached.
    pub fn keys(&self) -> Option<&Tensor> {
        self.keys.as_ref()
    }

    /// Values [B, Tc, Hkv, D], if any token is cached.
    pub fn values(&self) -> Option<&Tensor> {
        self.values.as_ref()
    }

    /// Appends the keys and values of new tokens ([B, T, Hkv, D]) and returns
    /// the whole cache, [B, Tc + T, Hkv, D] each.
    pub fn append(&mut self, device: &Device, keys: &Tensor, values: &Tensor) -> Result<(Tensor, Tensor)> {
        // NOTE: each step copies the whole cache into a new tensor, so decoding
        // N tokens copies O(N²) elements. Tensors have no views or in-place
        // slice writes that would let a preallocated buffer grow instead.
        let (all_keys, all_values) = match (&self.keys, &self.values) {
            (Some(old_keys), Some(old_values)) => {
                (device.concat(&[old_keys, keys], 1)?, device.concat(&[old_values, values], 1)?)
            }
            _ => (keys.clone(), values.clone()),
        };
        self.keys = Some(all_keys.clone());
        self.values = Some(all_values.clone());
        Ok((all_keys, all_values))
    }
}

/// Cached keys and values for every layer of a language model.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerCache>,
}

impl KvCache {
    /// Creates an empty cache for a model of `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        Self { layers: vec![LayerCache::default(); num_layers] }
    }

    /// The number of tokens cached, Tc.
    ///
    /// Every layer contains the same number after a complete forward step.
    /// In the middle of one, this is the count of layer 0.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, LayerCache::len)
    }

    /// Whether no token is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The number of layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The number of cached sequences B, or `None` while the cache is empty.
    pub fn batch_size(&self) -> Option<usize> {
        self.layers.first()?.keys().map(|keys| keys.dim(0))
    }

    /// The cache of layer `index`.
    pub fn layer(&self, index: usize) -> Result<&LayerCache> {
        let count = self.layers.len();
        self.layers.get(index).ok_or_else(|| layer_out_of_range(index, count))
    }

    /// The cache of layer `index`, for appending.
    pub fn layer_mut(&mut self, index: usize) -> Result<&mut LayerCache> {
        let count = self.layers.len();
        self.layers.get_mut(index).ok_or_else(|| layer_out_of_range(index, count))
    }

    /// Empties every layer.
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|layer| *layer = LayerCache::default());
    }

    /// Replaces the cached sequences by `indices` of them: row b of the new
    /// cache is row `indices[b]` of the old one. Beam search calls this after
    /// choosing which hypotheses continue; an index may repeat.
    pub fn reorder(&mut self, device: &Device, indices: &[u32]) -> Result<()> {
        let Some(batch) = self.batch_size() else {
            return Ok(());
        };
        if let Some(&bad) = indices.iter().find(|&&index| index as usize >= batch) {
            return Err(Error::InvalidInput(format!(
                "KvCache::reorder: index {bad} is out of range for a cache of {batch} sequences"
            )));
        }
        let index_tensor = device.from_u32([indices.len()], indices.to_vec())?;
        for layer in &mut self.layers {
            if let (Some(keys), Some(values)) = (&layer.keys, &layer.values) {
                layer.keys = Some(gather_rows(device, keys, &index_tensor)?);
                layer.values = Some(gather_rows(device, values, &index_tensor)?);
            }
        }
        Ok(())
    }
}

/// Gathers rows of the first axis: the embedding op on a [B, rest] view of
/// `tensor` picks whole sequences.
fn gather_rows(device: &Device, tensor: &Tensor, indices: &Tensor) -> Result<Tensor> {
    let mut shape = tensor.shape().to_vec();
    let rest = tensor.numel() / shape[0].max(1);
    let table = tensor.reshape([shape[0], rest])?;
    let rows = device.embedding(&table, indices, 0)?;
    shape[0] = indices.numel();
    Ok(rows.reshape(shape)?)
}

fn layer_out_of_range(index: usize, count: usize) -> Error {
    Error::InvalidInput(format!("layer {index} is out of range: the cache has {count} layers"))
}
