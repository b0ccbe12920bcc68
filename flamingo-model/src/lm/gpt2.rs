//! GPT-2, as Hugging Face transformers' `GPT2LMHeadModel` computes it.
//!
//! B batch, T tokens, C = n_embd channels, H = n_head heads of D = C / H,
//! F = n_inner (4·C by default), V = vocab_size, P = n_positions.
//! ids [B, T] -> wte[ids] + wpe[positions] -> n_layer blocks -> ln_f -> h [B, T, C],
//! and logits = h·wteᵀ [B, T, V] (the head is tied to the token embedding
//! unless `tie_word_embeddings` is false).
//!
//! A block is pre-norm: x + attn(ln_1(x)), then + mlp(ln_2(·)), with
//! mlp(h) = c_proj(act(c_fc(h))). Checkpoints store every linear layer as a
//! `Conv1D`, [in, out]; the loader transposes them to [out, in] and splits
//! `c_attn` into its q, k and v columns, so the code below reads like Llama's.

use std::path::Path;

use flamingo_kernels::{Activation, DType, Device, Matmul, Tensor};
use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::lm::kv_cache::LayerCache;
use crate::lm::linear::{split_rows, transpose_host, Linear, WeightLoader};
use crate::lm::norm::{Norm, NormSaved};
use crate::lm::self_attention::{SelfAttention, SelfAttentionInput, SelfAttentionSaved};
use crate::lm::{token_ids, LmSummary};
use crate::loader::WeightSource;

/// The fields of a GPT-2 `config.json` this model reads; defaults are
/// those of transformers' `GPT2Config` (the 124M `gpt2` model).
#[derive(Debug, Clone, Deserialize)]
pub struct Gpt2Config {
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    /// Rows of the learned position table: the context length.
    #[serde(default = "default_n_positions")]
    pub n_positions: usize,
    #[serde(default = "default_n_embd")]
    pub n_embd: usize,
    #[serde(default = "default_n_layer")]
    pub n_layer: usize,
    #[serde(default = "default_n_head")]
    pub n_head: usize,
    /// MLP width; `null` means 4·n_embd.
    #[serde(default)]
    pub n_inner: Option<usize>,
    #[serde(default = "default_activation")]
    pub activation_function: String,
    #[serde(default = "default_layer_norm_epsilon")]
    pub layer_norm_epsilon: f64,
    /// Divide scores by sqrt(D).
    #[serde(default = "default_true")]
    pub scale_attn_weights: bool,
    /// Also divide the scores of layer i by i + 1.
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_special_id", deserialize_with = "token_ids::optional")]
    pub bos_token_id: Option<u32>,
    #[serde(default = "default_special_ids", deserialize_with = "token_ids::list")]
    pub eos_token_id: Vec<u32>,
}

fn default_vocab_size() -> usize {
    50257
}
fn default_n_positions() -> usize {
    1024
}
fn default_n_embd() -> usize {
    768
}
fn default_n_layer() -> usize {
    12
}
fn default_n_head() -> usize {
    12
}
fn default_activation() -> String {
    "gelu_new".to_string()
}
fn default_layer_norm_epsilon() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}
fn default_special_id() -> Option<u32> {
    Some(50256)
}
fn default_special_ids() -> Vec<u32> {
    vec![50256]
}

impl Gpt2Config {
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
            .map_err(|e| Error::Config { origin: origin.to_string(), message: format!("invalid GPT-2 config: {e}") })?;
        config.validate(origin)?;
        Ok(config)
    }

    /// The MLP width F.
    pub fn inner_size(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }

    /// The head size D.
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head.max(1)
    }

    /// The MLP activation.
    pub fn activation(&self) -> Result<Activation> {
        Activation::from_hf_name(&self.activation_function).ok_or_else(|| {
            Error::Unsupported(format!(
                "GPT-2 activation_function `{}`; supported: gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, quick_gelu, silu, relu, tanh",
                self.activation_function
            ))
        })
    }

    /// Checks that the sizes fit together; `origin` names the config in errors.
    pub fn validate(&self, origin: &str) -> Result<()> {
        let fail = |message: String| Err(Error::Config { origin: origin.to_string(), message });
        if self.n_embd == 0 || self.n_head == 0 || !self.n_embd.is_multiple_of(self.n_head) {
            return fail(format!("n_embd ({}) must be a positive multiple of n_head ({})", self.n_embd, self.n_head));
        }
        if self.vocab_size == 0 || self.n_positions == 0 {
            return fail(format!("vocab_size ({}) and n_positions ({}) must be positive", self.vocab_size, self.n_positions));
        }
        self.activation()?;
        Ok(())
    }

    /// The sizes every caller needs, in the form shared by all models.
    pub fn summary(&self) -> LmSummary {
        LmSummary {
            model_type: "gpt2".to_string(),
            hidden_size: self.n_embd,
            num_layers: self.n_layer,
            vocab_size: self.vocab_size,
            num_heads: self.n_head,
            num_kv_heads: self.n_head,
            head_dim: self.head_dim(),
            max_positions: self.n_positions,
            bos_token_id: self.bos_token_id,
            eos_token_ids: self.eos_token_id.clone(),
        }
    }
}

/// The MLP of a block: c_proj(act(c_fc(h))).
#[derive(Debug, Clone)]
pub struct Gpt2Mlp {
    /// [F, C].
    pub c_fc: Linear,
    /// [C, F].
    pub c_proj: Linear,
    pub activation: Activation,
}

/// One GPT-2 decoder block.
#[derive(Debug, Clone)]
pub struct Gpt2Block {
    pub ln_1: Norm,
    pub attn: SelfAttention,
    pub ln_2: Norm,
    pub mlp: Gpt2Mlp,
}

/// Activations of one block that its backward pass needs.
#[derive(Debug, Clone)]
pub struct Gpt2LayerSaved {
    /// The block input and the statistics of ln_1.
    pub ln_1: NormSaved,
    pub attn: SelfAttentionSaved,
    /// x + attn(ln_1(x)) and the statistics of ln_2.
    pub ln_2: NormSaved,
    /// c_fc output before the activation, [B, T, F].
    pub fc: Tensor,
}

impl Gpt2Block {
    /// Runs the block on x [B, T, C]; see [`crate::lm::LanguageModel::layer_forward`].
    pub fn forward(
        &self,
        device: &Device,
        x: &Tensor,
        input: &SelfAttentionInput,
        cache: Option<&mut LayerCache>,
        save: bool,
    ) -> Result<(Tensor, Option<Gpt2LayerSaved>)> {
        let (h, ln_1) = self.ln_1.forward_saved(device, x, save)?;
        let (mut residual, attn) = self.attn.forward(device, &h, input, cache, save)?;
        device.add_assign(&mut residual, x)?;

        let (h, ln_2) = self.ln_2.forward_saved(device, &residual, save)?;
        let mlp = &self.mlp;
        let (mut y, fc) = if save {
            let fc = mlp.c_fc.forward(device, &h)?;
            let activated = device.activation(&fc, mlp.activation)?;
            (mlp.c_proj.forward(device, &activated)?, Some(fc))
        } else {
            // Without a backward pass the activation can be fused into the matmul.
            let spec = Matmul { activation: mlp.activation, ..Matmul::linear(mlp.c_fc.bias.as_ref()) };
            let activated = device.matmul(&h, &mlp.c_fc.weight, &spec)?;
            (mlp.c_proj.forward(device, &activated)?, None)
        };
        device.add_assign(&mut y, &residual)?;

        let saved = match (ln_1, attn, ln_2, fc) {
            (Some(ln_1), Some(attn), Some(ln_2), Some(fc)) => Some(Gpt2LayerSaved { ln_1, attn, ln_2, fc }),
            _ => None,
        };
        Ok((y, saved))
    }

    /// Returns dx [B, T, C] given dy [B, T, C].
    pub fn backward(&self, device: &Device, saved: &Gpt2LayerSaved, dy: &Tensor) -> Result<Tensor> {
        let mlp = &self.mlp;
        let d_activated = mlp.c_proj.backward(device, dy)?;
        let d_fc = device.activation_backward(&saved.fc, &d_activated, mlp.activation)?;
        let dh = mlp.c_fc.backward(device, &d_fc)?;
        let mut d_residual = self.ln_2.backward_saved(device, &saved.ln_2, &dh)?;
        device.add_assign(&mut d_residual, dy)?;

        let dh = self.attn.backward(device, &saved.attn, &d_residual)?;
        let mut dx = self.ln_1.backward_saved(device, &saved.ln_1, &dh)?;
        device.add_assign(&mut dx, &d_residual)?;
        Ok(dx)
    }
}

/// A frozen GPT-2 language model.
#[derive(Debug, Clone)]
pub struct Gpt2 {
    pub config: Gpt2Config,
    device: Device,
    summary: LmSummary,
    /// [V, C].
    wte: Tensor,
    /// [P, C].
    wpe: Tensor,
    blocks: Vec<Gpt2Block>,
    ln_f: Norm,
    /// [V, C]: `wte` itself when tied.
    lm_head: Tensor,
}

impl Gpt2 {
    /// Loads the weights of `config` from `weights`, with or without the
    /// `transformer.` prefix that `GPT2LMHeadModel` checkpoints have. Other
    /// tensors (such as the `attn.bias` mask buffers of old checkpoints) are
    /// ignored. Matrices are stored in `weight_dtype` (f32 or f16), norm
    /// weights and biases in f32.
    pub fn load(device: &Device, config: &Gpt2Config, weights: &dyn WeightSource, weight_dtype: DType) -> Result<Self> {
        config.validate(&weights.origin())?;
        let loader = WeightLoader::new(device, weights, weight_dtype)?;
        // Names keep their prefix, so an error names the tensor as the file stores it.
        let prefix = if weights.contains("transformer.wte.weight") { "transformer." } else { "" };
        let (c, v, p) = (config.n_embd, config.vocab_size, config.n_positions);
        let eps = config.layer_norm_epsilon as f32;

        let wte = loader.matrix(&format!("{prefix}wte.weight"), &[v, c])?;
        let wpe = loader.matrix(&format!("{prefix}wpe.weight"), &[p, c])?;
        let blocks = (0..config.n_layer)
            .map(|layer| load_block(&loader, config, &format!("{prefix}h.{layer}"), layer))
            .collect::<Result<Vec<_>>>()?;
        let ln_f = Norm::load_layer_norm(&loader, &format!("{prefix}ln_f"), c, eps)?;
        let lm_head = if config.tie_word_embeddings {
            wte.clone()
        } else {
            loader.matrix("lm_head.weight", &[v, c])?
        };

        Ok(Self { config: config.clone(), device: device.clone(), summary: config.summary(), wte, wpe, blocks, ln_f, lm_head })
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
    pub fn blocks(&self) -> &[Gpt2Block] {
        &self.blocks
    }

    /// Returns wte[ids] + wpe[positions], [B, T, C]. Ids ≥ V give zero token
    /// rows and positions ≥ P zero position rows.
    pub fn embed(&self, ids: &Tensor, positions: &Tensor) -> Result<Tensor> {
        let mut x = self.device.embedding(&self.wte, ids, 0)?;
        let position_rows = self.device.embedding(&self.wpe, positions, 0)?;
        self.device.add_assign(&mut x, &position_rows)?;
        Ok(x)
    }

    /// The final LayerNorm, `ln_f`.
    pub fn final_norm(&self) -> &Norm {
        &self.ln_f
    }

    /// The output projection [V, C].
    pub fn lm_head(&self) -> &Tensor {
        &self.lm_head
    }

    /// The token embedding table [V, C].
    pub fn token_embedding(&self) -> &Tensor {
        &self.wte
    }
}

/// Loads block `layer`, whose tensors are named `{prefix}.ln_1.weight` and so on.
fn load_block(loader: &WeightLoader, config: &Gpt2Config, prefix: &str, layer: usize) -> Result<Gpt2Block> {
    let (device, weights) = (loader.device, loader.weights);
    let (c, f) = (config.n_embd, config.inner_size());
    let eps = config.layer_norm_epsilon as f32;

    // c_attn is one Conv1D [C, 3C] whose output columns are q, k, v in that order.
    let c_attn = transpose_host(weights.tensor_with_shape(&format!("{prefix}.attn.c_attn.weight"), &[c, 3 * c])?)?;
    let c_attn_bias = weights.tensor_f32_with_shape(&format!("{prefix}.attn.c_attn.bias"), &[3 * c])?;
    let mut projections = Vec::with_capacity(3);
    for (weight, bias) in split_rows(&c_attn, &[c, c, c])?.into_iter().zip(split_rows(&c_attn_bias, &[c, c, c])?) {
        projections.push(Linear::new(loader.upload_matrix(weight)?, Some(device.upload(&bias)?)));
    }
    let [q, k, v]: [Linear; 3] = projections.try_into().expect("c_attn splits into three projections");

    let head_dim = config.head_dim();
    let mut scale = if config.scale_attn_weights { 1.0 / (head_dim as f32).sqrt() } else { 1.0 };
    if config.scale_attn_by_inverse_layer_idx {
        scale /= (layer + 1) as f32;
    }
    let attn = SelfAttention {
        q,
        k,
        v,
        o: load_conv1d(loader, &format!("{prefix}.attn.c_proj"), c, c)?,
        num_heads: config.n_head,
        num_kv_heads: config.n_head,
        head_dim,
        rope_theta: None,
        scale,
    };
    let mlp = Gpt2Mlp {
        c_fc: load_conv1d(loader, &format!("{prefix}.mlp.c_fc"), c, f)?,
        c_proj: load_conv1d(loader, &format!("{prefix}.mlp.c_proj"), f, c)?,
        activation: config.activation()?,
    };
    Ok(Gpt2Block {
        ln_1: Norm::load_layer_norm(loader, &format!("{prefix}.ln_1"), c, eps)?,
        attn,
        ln_2: Norm::load_layer_norm(loader, &format!("{prefix}.ln_2"), c, eps)?,
        mlp,
    })
}

/// Loads a `Conv1D` (weight [in, out], bias [out]) as a [`Linear`] with the weight transposed to [out, in].
fn load_conv1d(loader: &WeightLoader, prefix: &str, input: usize, out: usize) -> Result<Linear> {
    let weight = transpose_host(loader.weights.tensor_with_shape(&format!("{prefix}.weight"), &[input, out])?)?;
    let bias = loader.vector(&format!("{prefix}.bias"), out)?;
    Ok(Linear::new(loader.upload_matrix(weight)?, Some(bias)))
}
