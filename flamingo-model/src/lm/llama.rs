//! The Llama family (Llama 2, TinyLlama, SmolLM2, ...), as Hugging Face
//! transformers' `LlamaForCausalLM` computes it.
//!
//! B batch, T tokens, C = hidden_size channels, Hq = num_attention_heads,
//! Hkv = num_key_value_heads, D = head_dim, F = intermediate_size,
//! V = vocab_size.
//! ids [B, T] -> embed_tokens[ids] -> num_hidden_layers blocks -> norm -> h [B, T, C],
//! and logits = h·lm_headᵀ [B, T, V] (lm_head is embed_tokens when tied).
//!
//! A block is pre-norm: x + attn(input_layernorm(x)), then plus
//! mlp(post_attention_layernorm(·)) with the SiLU-gated
//! mlp(h) = down(silu(gate(h)) · up(h)). Queries and keys are rotated by
//! half-split RoPE, and query head h reads key/value head h / (Hq / Hkv).

use std::path::Path;

use flamingo_kernels::{DType, Device, Tensor};
use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::lm::kv_cache::LayerCache;
use crate::lm::linear::{Linear, WeightLoader};
use crate::lm::norm::{Norm, NormSaved};
use crate::lm::self_attention::{SelfAttention, SelfAttentionInput, SelfAttentionSaved};
use crate::lm::{token_ids, LmSummary};
use crate::loader::WeightSource;

/// The fields of a Llama `config.json` this model reads; defaults are those
/// of transformers' `LlamaConfig` (Llama 2 7B).
///
/// Configs written by transformers 4 have a top-level `rope_theta`; those
/// written by transformers 5 have `rope_parameters.rope_theta`. Both are read.
#[derive(Debug, Clone, Deserialize)]
pub struct LlamaConfig {
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "default_hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "default_intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "default_num_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "default_num_heads")]
    pub num_attention_heads: usize,
    /// `null` or absent means num_attention_heads (no grouping).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// `null` or absent means hidden_size / num_attention_heads.
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_parameters: Option<Value>,
    #[serde(default)]
    pub rope_scaling: Option<Value>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Biases on q, k, v and o.
    #[serde(default)]
    pub attention_bias: bool,
    /// Biases on gate, up and down.
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "default_bos", deserialize_with = "token_ids::optional")]
    pub bos_token_id: Option<u32>,
    #[serde(default = "default_eos", deserialize_with = "token_ids::list")]
    pub eos_token_id: Vec<u32>,
}

fn default_vocab_size() -> usize {
    32000
}
fn default_hidden_size() -> usize {
    4096
}
fn default_intermediate_size() -> usize {
    11008
}
fn default_num_layers() -> usize {
    32
}
fn default_num_heads() -> usize {
    32
}
fn default_hidden_act() -> String {
    "silu".to_string()
}
fn default_max_positions() -> usize {
    2048
}
fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_bos() -> Option<u32> {
    Some(1)
}
fn default_eos() -> Vec<u32> {
    vec![2]
}

/// RoPE's base when the config names none, as in transformers.
const DEFAULT_ROPE_THETA: f64 = 10000.0;

impl LlamaConfig {
    /// Reads and checks a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| Error::Config { origin: path.display().to_string(), message: format!("invalid JSON: {e}") })?;
        Self::from_json(value, &path.display().to_string())
    }

    /// Parses and checks a config given as JSON; `origin` names it in errors.
    pub fn from_json(value: Value, origin: &str) -> Result<Self> {
        let config: Self = serde_json::from_value(value)
            .map_err(|e| Error::Config { origin: origin.to_string(), message: format!("invalid Llama config: {e}") })?;
        config.validate(origin)?;
        Ok(config)
    }

    /// The number of key/value heads Hkv.
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// The head size D.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// RoPE's base θ, from `rope_parameters`, else `rope_theta`, else 10000.
    pub fn rope_theta(&self) -> f64 {
        let nested = self.rope_parameters.as_ref().and_then(|p| p.get("rope_theta")).and_then(Value::as_f64);
        nested.or(self.rope_theta).unwrap_or(DEFAULT_ROPE_THETA)
    }

    /// Checks that the sizes fit together and that no unsupported feature is
    /// asked for; `origin` names the config in errors.
    pub fn validate(&self, origin: &str) -> Result<()> {
        let fail = |message: String| Err(Error::Config { origin: origin.to_string(), message });
        let (hq, hkv) = (self.num_attention_heads, self.num_kv_heads());
        if hq == 0 || hkv == 0 || !hq.is_multiple_of(hkv) {
            return fail(format!(
                "num_attention_heads ({hq}) must be a positive multiple of num_key_value_heads ({hkv})"
            ));
        }
        if self.head_dim() == 0 || !self.head_dim().is_multiple_of(2) {
            return fail(format!("head_dim ({}) must be positive and even for RoPE", self.head_dim()));
        }
        if self.hidden_size == 0 || self.vocab_size == 0 || self.max_position_embeddings == 0 {
            return fail("hidden_size, vocab_size and max_position_embeddings must be positive".to_string());
        }
        if self.hidden_act != "silu" && self.hidden_act != "swish" {
            return Err(Error::Unsupported(format!(
                "{origin}: Llama hidden_act `{}`; only silu is supported",
                self.hidden_act
            )));
        }
        for (key, parameters) in [("rope_parameters", &self.rope_parameters), ("rope_scaling", &self.rope_scaling)] {
            let Some(parameters) = parameters.as_ref().filter(|p| !p.is_null()) else {
                continue;
            };
            let kind = parameters.get("rope_type").or_else(|| parameters.get("type")).and_then(Value::as_str);
            if !matches!(kind, None | Some("default")) {
                return Err(Error::Unsupported(format!(
                    "{origin}: {key} asks for RoPE type `{}`; only the default (unscaled) RoPE is supported",
                    kind.unwrap_or_default()
                )));
            }
        }
        Ok(())
    }

    /// The sizes every caller needs, in the form shared by all models.
    pub fn summary(&self) -> LmSummary {
        LmSummary {
            model_type: "llama".to_string(),
            hidden_size: self.hidden_size,
            num_layers: self.num_hidden_layers,
            vocab_size: self.vocab_size,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_kv_heads(),
            head_dim: self.head_dim(),
            max_positions: self.max_position_embeddings,
            bos_token_id: self.bos_token_id,
            eos_token_ids: self.eos_token_id.clone(),
        }
    }
}

/// The SiLU-gated MLP: down(silu(gate(h)) · up(h)).
#[derive(Debug, Clone)]
pub struct LlamaMlp {
    /// [F, C].
    pub gate: Linear,
    /// [F, C].
    pub up: Linear,
    /// [C, F].
    pub down: Linear,
}

/// One Llama decoder block.
#[derive(Debug, Clone)]
pub struct LlamaBlock {
    pub input_layernorm: Norm,
    pub self_attn: SelfAttention,
    pub post_attention_layernorm: Norm,
    pub mlp: LlamaMlp,
}

/// Activations of one block that its backward pass needs.
#[derive(Debug, Clone)]
pub struct LlamaLayerSaved {
    /// The block input and the statistics of input_layernorm.
    pub input_layernorm: NormSaved,
    pub self_attn: SelfAttentionSaved,
    /// x + attn(input_layernorm(x)) and the statistics of post_attention_layernorm.
    pub post_attention_layernorm: NormSaved,
    /// gate(h) and up(h), [B, T, F] each.
    pub gate: Tensor,
    pub up: Tensor,
}

impl LlamaBlock {
    /// Runs the block on x [B, T, C]; see [`crate::lm::LanguageModel::layer_forward`].
    pub fn forward(
        &self,
        device: &Device,
        x: &Tensor,
        input: &SelfAttentionInput,
        cache: Option<&mut LayerCache>,
        save: bool,
    ) -> Result<(Tensor, Option<LlamaLayerSaved>)> {
        let (h, input_layernorm) = self.input_layernorm.forward_saved(device, x, save)?;
        let (mut residual, self_attn) = self.self_attn.forward(device, &h, input, cache, save)?;
        device.add_assign(&mut residual, x)?;

        let (h, post_attention_layernorm) = self.post_attention_layernorm.forward_saved(device, &residual, save)?;
        let gate = self.mlp.gate.forward(device, &h)?;
        let up = self.mlp.up.forward(device, &h)?;
        let mut y = self.mlp.down.forward(device, &device.silu_mul(&gate, &up)?)?;
        device.add_assign(&mut y, &residual)?;

        let saved = match (input_layernorm, self_attn, post_attention_layernorm) {
            (Some(input_layernorm), Some(self_attn), Some(post_attention_layernorm)) => {
                Some(LlamaLayerSaved { input_layernorm, self_attn, post_attention_layernorm, gate, up })
            }
            _ => None,
        };
        Ok((y, saved))
    }

    /// Returns dx [B, T, C] given dy [B, T, C].
    pub fn backward(&self, device: &Device, saved: &LlamaLayerSaved, dy: &Tensor) -> Result<Tensor> {
        let d_product = self.mlp.down.backward(device, dy)?;
        let (d_gate, d_up) = device.silu_mul_backward(&saved.gate, &saved.up, &d_product)?;
        let mut dh = self.mlp.gate.backward(device, &d_gate)?;
        device.add_assign(&mut dh, &self.mlp.up.backward(device, &d_up)?)?;
        let mut d_residual = self.post_attention_layernorm.backward_saved(device, &saved.post_attention_layernorm, &dh)?;
        device.add_assign(&mut d_residual, dy)?;

        let dh = self.self_attn.backward(device, &saved.self_attn, &d_residual)?;
        let mut dx = self.input_layernorm.backward_saved(device, &saved.input_layernorm, &dh)?;
        device.add_assign(&mut dx, &d_residual)?;
        Ok(dx)
    }
}

/// A frozen Llama-family language model.
#[derive(Debug, Clone)]
pub struct Llama {
    pub config: LlamaConfig,
    device: Device,
    summary: LmSummary,
    /// [V, C].
    embed_tokens: Tensor,
    layers: Vec<LlamaBlock>,
    norm: Norm,
    /// [V, C]: `embed_tokens` itself when tied.
    lm_head: Tensor,
}

impl Llama {
    /// Loads the weights of `config` from `weights` under Hugging Face names
    /// (`model.layers.{i}.self_attn.q_proj.weight`, ...). A GGUF file reads
    /// through [`crate::loader::GgufLlamaWeights`]. Matrices are stored in
    /// `weight_dtype` (f32 or f16), norm weights and biases in f32.
    pub fn load(device: &Device, config: &LlamaConfig, weights: &dyn WeightSource, weight_dtype: DType) -> Result<Self> {
        config.validate(&weights.origin())?;
        let loader = WeightLoader::new(device, weights, weight_dtype)?;
        let (c, v) = (config.hidden_size, config.vocab_size);
        let embed_tokens = loader.matrix("model.embed_tokens.weight", &[v, c])?;
        let layers = (0..config.num_hidden_layers)
            .map(|layer| load_block(&loader, config, layer))
            .collect::<Result<Vec<_>>>()?;
        let norm = Norm::load_rms_norm(&loader, "model.norm", c, config.rms_norm_eps as f32)?;
        let lm_head = if config.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            loader.matrix("lm_head.weight", &[v, c])?
        };
        Ok(Self { config: config.clone(), device: device.clone(), summary: config.summary(), embed_tokens, layers, norm, lm_head })
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Sizes and special token ids.
    pub fn summary(&self) -> &LmSummary {
        &self.summary
    }

    pub(crate) fn summary_mut(&mut self) -> &mut LmSummary {
        &mut self.summary
    }

    /// The decoder blocks.
    pub fn layers(&self) -> &[LlamaBlock] {
        &self.layers
    }

    /// Returns embed_tokens[ids], [B, T, C]; ids ≥ V give zero rows.
    /// Positions enter through RoPE in every layer, not here.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.device.embedding(&self.embed_tokens, ids, 0)?)
    }

    /// The final RMSNorm, `model.norm`.
    pub fn final_norm(&self) -> &Norm {
        &self.norm
    }

    /// The output projection [V, C].
    pub fn lm_head(&self) -> &Tensor {
        &self.lm_head
    }

    /// The token embedding table [V, C].
    pub fn token_embedding(&self) -> &Tensor {
        &self.embed_tokens
    }
}

fn load_block(loader: &WeightLoader, config: &LlamaConfig, layer: usize) -> Result<LlamaBlock> {
    let (c, f) = (config.hidden_size, config.intermediate_size);
    let (hq, hkv, d) = (config.num_attention_heads, config.num_kv_heads(), config.head_dim());
    let eps = config.rms_norm_eps as f32;
    let prefix = format!("model.layers.{layer}");
    let linear = |name: &str, out: usize, input: usize, bias: bool| loader.linear(&format!("{prefix}.{name}"), out, input, bias);

    let self_attn = SelfAttention {
        q: linear("self_attn.q_proj", hq * d, c, config.attention_bias)?,
        k: linear("self_attn.k_proj", hkv * d, c, config.attention_bias)?,
        v: linear("self_attn.v_proj", hkv * d, c, config.attention_bias)?,
        o: linear("self_attn.o_proj", c, hq * d, config.attention_bias)?,
        num_heads: hq,
        num_kv_heads: hkv,
        head_dim: d,
        rope_theta: Some(config.rope_theta() as f32),
        scale: 1.0 / (d as f32).sqrt(),
    };
    let mlp = LlamaMlp {
        gate: linear("mlp.gate_proj", f, c, config.mlp_bias)?,
        up: linear("mlp.up_proj", f, c, config.mlp_bias)?,
        down: linear("mlp.down_proj", c, f, config.mlp_bias)?,
    };
    Ok(LlamaBlock {
        input_layernorm: Norm::load_rms_norm(loader, &format!("{prefix}.input_layernorm"), c, eps)?,
        self_attn,
        post_attention_layernorm: Norm::load_rms_norm(loader, &format!("{prefix}.post_attention_layernorm"), c, eps)?,
        mlp,
    })
}
