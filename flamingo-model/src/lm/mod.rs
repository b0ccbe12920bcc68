//! Frozen causal language models: GPT-2 and the Llama family.
//!
//! B batch, T tokens, C channels, V vocabulary, L layers.
//! [`LanguageModel`] is run layer by layer, so that Flamingo can insert its
//! gated cross-attention blocks between the frozen ones:
//!
//! ```text
//! x = embed(ids, positions)                          [B, T, C]
//! for i in 0..L: (x, saved[i]) = layer_forward(i, x, input, cache, save)
//! (h, norm_saved) = final_norm(x, save)              [B, T, C]
//! logits = h·lm_head()ᵀ                              [B, T, V], only where needed
//!
//! dh = dlogits·lm_head()
//! dx = final_norm_backward(norm_saved, dh)
//! for i in (0..L).rev(): dx = layer_backward(i, saved[i], dx)
//! ```
//!
//! Backward passes return input gradients only: the weights are frozen.

mod generate;
pub mod gpt2;
pub mod kv_cache;
pub mod linear;
pub mod llama;
pub mod norm;
pub mod self_attention;
mod token_ids;

use std::path::Path;

use flamingo_kernels::{DType, Device, Matmul, Tensor};
use serde_json::Value;

pub use self::gpt2::{Gpt2, Gpt2Block, Gpt2Config, Gpt2LayerSaved};
pub use self::kv_cache::{KvCache, LayerCache};
pub use self::llama::{Llama, LlamaBlock, LlamaConfig, LlamaLayerSaved};
pub use self::norm::{Norm, NormSaved};
pub use self::self_attention::{SelfAttention, SelfAttentionInput, SelfAttentionSaved};

use crate::error::{Error, Result};
use crate::loader::{
    llama_config_from_gguf, load_tokenizer_json, starts_with_gguf_magic, tokenizer_from_gguf, GgufLlamaWeights,
    SafetensorsWeights, SpecialTokens, Tokenizer,
};

/// The `model_type` values of `config.json` that [`LanguageModel::load`] accepts.
pub const SUPPORTED_MODEL_TYPES: [&str; 2] = ["gpt2", "llama"];

/// The sizes and special tokens of a language model, whatever its family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LmSummary {
    /// `config.json`'s `model_type`: "gpt2" or "llama".
    pub model_type: String,
    /// C.
    pub hidden_size: usize,
    /// L.
    pub num_layers: usize,
    /// V: rows of the token embedding and of the LM head.
    pub vocab_size: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// The context length: positions must be below it.
    pub max_positions: usize,
    pub bos_token_id: Option<u32>,
    /// Tokens that end generation.
    pub eos_token_ids: Vec<u32>,
}

/// A frozen causal language model.
#[derive(Debug, Clone)]
pub enum LanguageModel {
    Gpt2(Gpt2),
    Llama(Llama),
}

/// Activations that one layer's backward pass needs, saved by its forward pass.
#[derive(Debug, Clone)]
pub enum LayerSaved {
    Gpt2(Gpt2LayerSaved),
    Llama(LlamaLayerSaved),
}

impl LanguageModel {
    /// Loads a model with its tokenizer and special tokens from a Hugging
    /// Face folder (`config.json`, safetensors, `tokenizer.json`) or a GGUF
    /// file.
    ///
    /// Frozen matrices are stored in [`Device::weight_dtype`], norms and
    /// biases in f32. Quantized GGUF tensors are dequantized on load.
    pub fn load(device: &Device, path: &Path) -> Result<(LanguageModel, Tokenizer, SpecialTokens)> {
        Self::load_with_weight_dtype(device, path, device.weight_dtype())
    }

    /// Like [`LanguageModel::load`], with frozen matrices stored in
    /// `weight_dtype` (f32 or f16) whatever the device prefers.
    pub fn load_with_weight_dtype(
        device: &Device,
        path: &Path,
        weight_dtype: DType,
    ) -> Result<(LanguageModel, Tokenizer, SpecialTokens)> {
        if path.is_dir() {
            return Self::load_hf_folder(device, path, weight_dtype);
        }
        if path.is_file() && starts_with_gguf_magic(path)? {
            return Self::load_gguf(device, path, weight_dtype);
        }
        if !path.exists() {
            return Err(Error::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder")));
        }
        Err(Error::format(
            path,
            "expected a Hugging Face model folder (with config.json) or a GGUF file; this file is not GGUF",
        ))
    }

    /// Loads a Hugging Face folder; `config.json`'s `model_type` picks the model.
    pub fn load_hf_folder(
        device: &Device,
        folder: &Path,
        weight_dtype: DType,
    ) -> Result<(LanguageModel, Tokenizer, SpecialTokens)> {
        let config_path = folder.join("config.json");
        let origin = config_path.display().to_string();
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let config: Value = serde_json::from_str(&text)
            .map_err(|e| Error::Config { origin: origin.clone(), message: format!("invalid JSON: {e}") })?;
        let model_type = config.get("model_type").and_then(Value::as_str).ok_or_else(|| Error::Config {
            origin: origin.clone(),
            message: format!("`model_type` is missing; supported model types: {}", SUPPORTED_MODEL_TYPES.join(", ")),
        })?;

        let model = match model_type {
            "gpt2" => {
                let config = Gpt2Config::from_json(config, &origin)?;
                LanguageModel::Gpt2(Gpt2::load(device, &config, &SafetensorsWeights::open(folder)?, weight_dtype)?)
            }
            "llama" => {
                let config = LlamaConfig::from_json(config, &origin)?;
                LanguageModel::Llama(Llama::load(device, &config, &SafetensorsWeights::open(folder)?, weight_dtype)?)
            }
            other => {
                return Err(Error::Unsupported(format!(
                    "{origin}: model_type `{other}` is not supported; supported model types: {}",
                    SUPPORTED_MODEL_TYPES.join(", ")
                )))
            }
        };

        let tokenizer = load_tokenizer_json(folder)?;
        let special = SpecialTokens::from_hf_folder(folder, &tokenizer)?;
        Ok((model.with_eos_fallback(&special), tokenizer, special))
    }

    /// Loads a GGUF Llama file with the tokenizer its metadata describes.
    pub fn load_gguf(
        device: &Device,
        path: &Path,
        weight_dtype: DType,
    ) -> Result<(LanguageModel, Tokenizer, SpecialTokens)> {
        let weights = GgufLlamaWeights::open(path)?;
        let config = LlamaConfig::from_json(llama_config_from_gguf(weights.gguf())?, &path.display().to_string())?;
        let model = LanguageModel::Llama(Llama::load(device, &config, &weights, weight_dtype)?);
        let tokenizer = tokenizer_from_gguf(weights.gguf())?;
        let special = SpecialTokens::from_gguf(weights.gguf(), &tokenizer)?;
        Ok((model.with_eos_fallback(&special), tokenizer, special))
    }

    /// Takes the tokenizer's EOS when the config names none.
    fn with_eos_fallback(mut self, special: &SpecialTokens) -> Self {
        let summary = match &mut self {
            LanguageModel::Gpt2(model) => &mut model.summary_mut().eos_token_ids,
            LanguageModel::Llama(model) => &mut model.summary_mut().eos_token_ids,
        };
        if summary.is_empty() {
            summary.extend(special.eos);
        }
        self
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        match self {
            LanguageModel::Gpt2(model) => model.device(),
            LanguageModel::Llama(model) => model.device(),
        }
    }

    /// Sizes and special token ids.
    pub fn summary(&self) -> &LmSummary {
        match self {
            LanguageModel::Gpt2(model) => model.summary(),
            LanguageModel::Llama(model) => model.summary(),
        }
    }

    /// The number of decoder layers L.
    pub fn num_layers(&self) -> usize {
        self.summary().num_layers
    }

    /// An empty cache with one entry per layer.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.num_layers())
    }

    /// Returns the input of layer 0, [B, T, C], for u32 `ids` and `positions`
    /// [B, T]: token rows (zero for ids ≥ V), plus GPT-2's learned position
    /// rows.
    ///
    /// NOTE: positions are not checked here, to avoid reading them back from
    /// a GPU; GPT-2 gives a zero position row for positions ≥ max_positions.
    /// [`LanguageModel::forward`] checks them.
    pub fn embed(&self, ids: &Tensor, positions: &Tensor) -> Result<Tensor> {
        check_ids_and_positions(ids, positions)?;
        match self {
            LanguageModel::Gpt2(model) => model.embed(ids, positions),
            LanguageModel::Llama(model) => model.embed(ids),
        }
    }

    /// Runs decoder layer `index` on x [B, T, C] and returns its output
    /// [B, T, C].
    ///
    /// With a cache, the layer appends the new tokens' keys and values and
    /// attends over the cache followed by the new tokens, so `key_padding`
    /// must then cover all of them, [B, Tc + T]. With `save`, the layer
    /// returns the activations its backward pass needs. Without, it keeps
    /// nothing.
    pub fn layer_forward(
        &self,
        index: usize,
        x: &Tensor,
        input: &SelfAttentionInput,
        cache: Option<&mut KvCache>,
        save: bool,
    ) -> Result<(Tensor, Option<LayerSaved>)> {
        let cache = match cache {
            Some(cache) => Some(cache.layer_mut(index)?),
            None => None,
        };
        match self {
            LanguageModel::Gpt2(model) => {
                let block = model.blocks().get(index).ok_or_else(|| self.layer_out_of_range(index))?;
                let (y, saved) = block.forward(model.device(), x, input, cache, save)?;
                Ok((y, saved.map(LayerSaved::Gpt2)))
            }
            LanguageModel::Llama(model) => {
                let block = model.layers().get(index).ok_or_else(|| self.layer_out_of_range(index))?;
                let (y, saved) = block.forward(model.device(), x, input, cache, save)?;
                Ok((y, saved.map(LayerSaved::Llama)))
            }
        }
    }

    /// Returns dx [B, T, C] of layer `index` given dy [B, T, C] and what its
    /// forward pass saved.
    pub fn layer_backward(&self, index: usize, saved: &LayerSaved, dy: &Tensor) -> Result<Tensor> {
        match (self, saved) {
            (LanguageModel::Gpt2(model), LayerSaved::Gpt2(saved)) => {
                let block = model.blocks().get(index).ok_or_else(|| self.layer_out_of_range(index))?;
                block.backward(model.device(), saved, dy)
            }
            (LanguageModel::Llama(model), LayerSaved::Llama(saved)) => {
                let block = model.layers().get(index).ok_or_else(|| self.layer_out_of_range(index))?;
                block.backward(model.device(), saved, dy)
            }
            _ => Err(Error::InvalidInput(format!(
                "layer_backward: the saved activations come from another model family than this {} model",
                self.summary().model_type
            ))),
        }
    }

    /// The final norm (GPT-2's `ln_f`, Llama's `model.norm`).
    pub fn final_norm_layer(&self) -> &Norm {
        match self {
            LanguageModel::Gpt2(model) => model.final_norm(),
            LanguageModel::Llama(model) => model.final_norm(),
        }
    }

    /// Applies the final norm to x [B, T, C], keeping what its backward pass
    /// needs when `save` is set.
    pub fn final_norm(&self, x: &Tensor, save: bool) -> Result<(Tensor, Option<NormSaved>)> {
        self.final_norm_layer().forward_saved(self.device(), x, save)
    }

    /// Returns dx of the final norm given dy.
    pub fn final_norm_backward(&self, saved: &NormSaved, dy: &Tensor) -> Result<Tensor> {
        self.final_norm_layer().backward_saved(self.device(), saved, dy)
    }

    /// The LM head [V, C] (the token embedding when tied): logits =
    /// `matmul(h, lm_head, Matmul::linear(None))` and dh = `matmul(dlogits, lm_head, Matmul::new())`.
    pub fn lm_head(&self) -> &Tensor {
        match self {
            LanguageModel::Gpt2(model) => model.lm_head(),
            LanguageModel::Llama(model) => model.lm_head(),
        }
    }

    /// The token embedding table [V, C].
    pub fn token_embedding(&self) -> &Tensor {
        match self {
            LanguageModel::Gpt2(model) => model.token_embedding(),
            LanguageModel::Llama(model) => model.token_embedding(),
        }
    }

    /// Returns the logits [B, T, V] of u32 `ids` at u32 `positions` [B, T],
    /// with an optional u32 key padding mask [B, T] (0 marks padding).
    ///
    /// Fails when a position is at or beyond the context length.
    pub fn forward(&self, ids: &Tensor, positions: &Tensor, key_padding: Option<&Tensor>) -> Result<Tensor> {
        self.forward_with_cache(ids, positions, key_padding, None)
    }

    /// Like [`LanguageModel::forward`], but with a cache: the new tokens
    /// attend over the cached ones too and are appended to the cache.
    /// `key_padding` then covers the cached and the new tokens, [B, Tc + T].
    pub fn forward_with_cache(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        key_padding: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        self.check_positions(positions)?;
        let mut x = self.embed(ids, positions)?;
        let input = SelfAttentionInput { positions, key_padding };
        for index in 0..self.num_layers() {
            x = self.layer_forward(index, &x, &input, cache.as_deref_mut(), false)?.0;
        }
        let (h, _) = self.final_norm(&x, false)?;
        self.logits(&h)
    }

    /// Returns h·lm_headᵀ, [..., V], for final hidden states h [..., C].
    pub fn logits(&self, h: &Tensor) -> Result<Tensor> {
        Ok(self.device().matmul(h, self.lm_head(), &Matmul::linear(None))?)
    }

    /// Checks on the host that every position is below the context length.
    pub fn check_positions(&self, positions: &Tensor) -> Result<()> {
        let max_positions = self.summary().max_positions;
        if positions.dtype() != DType::U32 {
            return Err(Error::InvalidInput(format!("positions must be u32, found {}", positions.dtype().name())));
        }
        let largest = positions.to_vec_u32()?.into_iter().max();
        match largest {
            Some(position) if position as usize >= max_positions => Err(Error::InvalidInput(format!(
                "position {position} is beyond the model's context of {max_positions} tokens; \
                 shorten the input to at most {max_positions} tokens"
            ))),
            _ => Ok(()),
        }
    }

    fn layer_out_of_range(&self, index: usize) -> Error {
        Error::InvalidInput(format!("layer {index} is out of range: the model has {} layers", self.num_layers()))
    }
}

fn check_ids_and_positions(ids: &Tensor, positions: &Tensor) -> Result<()> {
    if ids.rank() != 2 || ids.dtype() != DType::U32 {
        return Err(Error::InvalidInput(format!(
            "token ids must be u32 [B, T], found {} {:?}",
            ids.dtype().name(),
            ids.shape()
        )));
    }
    if positions.shape() != ids.shape() || positions.dtype() != DType::U32 {
        return Err(Error::InvalidInput(format!(
            "positions must be u32 with the shape of the ids {:?}, found {} {:?}",
            ids.shape(),
            positions.dtype().name(),
            positions.shape()
        )));
    }
    Ok(())
}
