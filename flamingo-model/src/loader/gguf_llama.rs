//! A GGUF Llama file seen as a Hugging Face Llama checkpoint.
//!
//! llama.cpp's converter renames every tensor, reverses the dimension order
//! and permutes the rows of the Q and K projections. [`GgufLlamaWeights`]
//! undoes all three, so the Llama model code that reads `config.json` plus
//! safetensors reads a GGUF file through the same names, shapes and values,
//! and [`llama_config_from_gguf`] writes the matching `config.json`.
//!
//! The Q/K permutation: Hugging Face Llama applies RoPE to the two halves of
//! each head (dimension `i` pairs with `i + head_dim/2`), while GGML pairs
//! adjacent dimensions (`2i` with `2i + 1`). The converter therefore reorders
//! the rows of each head so that HF row `j * head_dim/2 + i` becomes GGUF row
//! `2i + j`, for `i < head_dim/2` and `j` in {0, 1}. Viewing the GGUF weight as
//! `[heads, head_dim/2, 2, in]` and swapping the two middle axes restores the
//! HF order. V, the output projection and the MLP are stored unpermuted.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

use flamingo_kernels::{HostData, HostTensor};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::loader::gguf::{GgufFile, GgufValue, RawTensor};
use crate::loader::weights::{missing_tensor, WeightSource};

/// The `general.architecture` values that have a Hugging Face mapping.
pub const SUPPORTED_GGUF_ARCHITECTURES: [&str; 1] = ["llama"];

/// Per-layer tensors: GGUF name after `blk.{i}.`, HF name after `model.layers.{i}.`.
const LAYER_TENSORS: [(&str, &str); 13] = [
    ("attn_norm.weight", "input_layernorm.weight"),
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("attn_q.bias", "self_attn.q_proj.bias"),
    ("attn_k.bias", "self_attn.k_proj.bias"),
    ("attn_v.bias", "self_attn.v_proj.bias"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
    ("attn_output.bias", "self_attn.o_proj.bias"),
];

/// Tensors outside the layers: GGUF name, HF name.
const GLOBAL_TENSORS: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// The GGUF source of one HF tensor.
#[derive(Debug, Clone)]
struct Mapping {
    gguf_name: String,
    /// The number of heads whose rows are un-permuted (Q and K only).
    unpermute_heads: Option<usize>,
}

/// A GGUF file with `general.architecture = llama`, exposed under Hugging Face
/// Llama tensor names and shapes with the Q/K rows in HF order.
///
/// `lm_head.weight` exists only when the file has `output.weight`. Otherwise
/// the model ties the head to the embedding, and the config sets
/// `tie_word_embeddings`.
pub struct GgufLlamaWeights {
    gguf: GgufFile,
    mappings: BTreeMap<String, Mapping>,
}

impl GgufLlamaWeights {
    /// Opens a GGUF file and maps it; see [`GgufLlamaWeights::new`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::new(GgufFile::open(path)?)
    }

    /// Maps the tensors of `gguf` to Hugging Face Llama names.
    ///
    /// Fails for another architecture, for mixture-of-experts files, and when
    /// the head counts are missing.
    pub fn new(gguf: GgufFile) -> Result<Self> {
        check_architecture(&gguf)?;
        let dims = LlamaDims::read(&gguf)?;
        if gguf.get_u64("llama.expert_count")?.unwrap_or(0) > 0 {
            return Err(Error::Unsupported(format!(
                "{}: mixture-of-experts Llama GGUF files (llama.expert_count > 0) are not supported",
                gguf.path().display()
            )));
        }

        let mut mappings = BTreeMap::new();
        for info in gguf.tensor_infos() {
            let gguf_name = info.name();
            let Some((hf_name, unpermute_heads)) = hf_name_for(gguf_name, &dims) else {
                tracing::debug!(
                    tensor = gguf_name,
                    "GGUF tensor has no Hugging Face Llama name; it is not exposed"
                );
                continue;
            };
            mappings.insert(
                hf_name,
                Mapping {
                    gguf_name: gguf_name.to_string(),
                    unpermute_heads,
                },
            );
        }
        Ok(Self { gguf, mappings })
    }

    /// Returns the underlying file, for its metadata (and tokenizer) and GGUF names.
    pub fn gguf(&self) -> &GgufFile {
        &self.gguf
    }

    /// Returns the underlying file.
    pub fn into_gguf(self) -> GgufFile {
        self.gguf
    }

    /// Returns the GGUF name of HF tensor `hf_name`.
    pub fn gguf_name(&self, hf_name: &str) -> Option<&str> {
        self.mappings
            .get(hf_name)
            .map(|mapping| mapping.gguf_name.as_str())
    }

    /// Builds the Hugging Face `config.json` of this model; see [`llama_config_from_gguf`].
    pub fn config_json(&self) -> Result<Value> {
        llama_config_from_gguf(&self.gguf)
    }

    /// Returns the stored blocks of HF tensor `hf_name`, with Q/K rows moved into
    /// HF order, for dequantization on the GPU.
    ///
    /// Rows are whole blocks, so un-permuting rows moves whole blocks. Tensors
    /// that need no change are borrowed from the file mapping.
    pub fn raw_tensor(&self, hf_name: &str) -> Result<RawTensor<'_>> {
        let mapping = self.mapping(hf_name)?;
        let raw = self.gguf.raw_tensor(&mapping.gguf_name)?;
        let Some(heads) = mapping.unpermute_heads else {
            return Ok(raw);
        };

        let (rows, row_len) = rows_and_row_len(&raw.shape);
        let row_bytes = raw.ggml_type.byte_size(row_len)?;
        let bytes = unpermute_rows(
            &raw.bytes,
            rows,
            row_bytes,
            heads,
            &self.gguf,
            &mapping.gguf_name,
        )?;
        Ok(RawTensor {
            ggml_type: raw.ggml_type,
            shape: raw.shape,
            bytes: Cow::Owned(bytes),
        })
    }

    fn mapping(&self, hf_name: &str) -> Result<&Mapping> {
        self.mappings
            .get(hf_name)
            .ok_or_else(|| missing_tensor(self, hf_name))
    }
}

impl WeightSource for GgufLlamaWeights {
    fn origin(&self) -> String {
        format!(
            "{} (GGUF, Hugging Face Llama names)",
            self.gguf.path().display()
        )
    }

    fn names(&self) -> Vec<String> {
        self.mappings.keys().cloned().collect()
    }

    fn contains(&self, name: &str) -> bool {
        self.mappings.contains_key(name)
    }

    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        self.gguf.shape(&self.mapping(name)?.gguf_name)
    }

    fn tensor(&self, name: &str) -> Result<HostTensor> {
        let mapping = self.mapping(name)?;
        let tensor = self.gguf.tensor(&mapping.gguf_name)?;
        let Some(heads) = mapping.unpermute_heads else {
            return Ok(tensor);
        };

        let (rows, row_len) = rows_and_row_len(&tensor.shape);
        let gguf = &self.gguf;
        let gguf_name = &mapping.gguf_name;
        let data = match tensor.data {
            HostData::F32(values) => HostData::F32(unpermute_rows(
                &values, rows, row_len, heads, gguf, gguf_name,
            )?),
            HostData::F16(values) => HostData::F16(unpermute_rows(
                &values, rows, row_len, heads, gguf, gguf_name,
            )?),
            HostData::U32(values) => HostData::U32(unpermute_rows(
                &values, rows, row_len, heads, gguf, gguf_name,
            )?),
        };
        Ok(HostTensor::new(tensor.shape, data)?)
    }
}

/// Head counts from the metadata, used to un-permute Q and K.
struct LlamaDims {
    n_head: usize,
    n_head_kv: usize,
}

impl LlamaDims {
    fn read(gguf: &GgufFile) -> Result<Self> {
        let n_head = required_usize(gguf, "llama.attention.head_count")?;
        let n_head_kv = gguf
            .get_u64("llama.attention.head_count_kv")?
            .map_or(n_head, |v| v as usize);
        if n_head == 0 || n_head_kv == 0 {
            return Err(config_error(
                gguf,
                "the attention head counts must be positive",
            ));
        }
        Ok(Self { n_head, n_head_kv })
    }
}

fn check_architecture(gguf: &GgufFile) -> Result<()> {
    let architecture = gguf.architecture()?;
    if SUPPORTED_GGUF_ARCHITECTURES.contains(&architecture) {
        return Ok(());
    }
    Err(Error::Unsupported(format!(
        "{}: GGUF architecture `{architecture}` has no Hugging Face mapping; supported architectures: {}",
        gguf.path().display(),
        SUPPORTED_GGUF_ARCHITECTURES.join(", ")
    )))
}

/// Returns the HF name of GGUF tensor `gguf_name` and, for Q and K, the head
/// count to un-permute with. Returns `None` for tensors with no HF counterpart.
fn hf_name_for(gguf_name: &str, dims: &LlamaDims) -> Option<(String, Option<usize>)> {
    if let Some(&(_, hf_name)) = GLOBAL_TENSORS.iter().find(|(gguf, _)| *gguf == gguf_name) {
        return Some((hf_name.to_string(), None));
    }

    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let &(_, hf_suffix) = LAYER_TENSORS.iter().find(|(gguf, _)| *gguf == suffix)?;
    let unpermute_heads = if suffix.starts_with("attn_q.") {
        Some(dims.n_head)
    } else if suffix.starts_with("attn_k.") {
        Some(dims.n_head_kv)
    } else {
        None
    };
    Some((format!("model.layers.{layer}.{hf_suffix}"), unpermute_heads))
}

/// Splits a PyTorch shape into (rows, row length); a 1-D tensor (a bias) is
/// one element per row.
fn rows_and_row_len(shape: &[usize]) -> (usize, usize) {
    match shape {
        [len] => (*len, 1),
        [rows, rest @ ..] => (*rows, rest.iter().product()),
        [] => (1, 1),
    }
}

/// Moves rows from the GGUF (interleaved RoPE) order to the HF (half-split)
/// order: HF row `h*head_dim + j*half + i` is GGUF row `h*head_dim + 2*i + j`.
///
/// `row_len` is the number of `T` items per row (elements, or bytes of blocks).
fn unpermute_rows<T: Copy>(
    data: &[T],
    rows: usize,
    row_len: usize,
    heads: usize,
    gguf: &GgufFile,
    gguf_name: &str,
) -> Result<Vec<T>> {
    if !rows.is_multiple_of(heads)
        || !(rows / heads).is_multiple_of(2)
        || data.len() != rows * row_len
    {
        return Err(Error::format(
            gguf.path(),
            format!("tensor `{gguf_name}` has {rows} rows, which do not split into {heads} heads of an even size"),
        ));
    }

    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut out = Vec::with_capacity(data.len());
    for head in 0..heads {
        for j in 0..2 {
            for i in 0..half {
                let gguf_row = head * head_dim + 2 * i + j;
                out.extend_from_slice(&data[gguf_row * row_len..(gguf_row + 1) * row_len]);
            }
        }
    }
    Ok(out)
}

/// Builds a Hugging Face `config.json` for the Llama model in `gguf`.
///
/// The keys are those of `transformers.LlamaConfig`: `model_type`,
/// `architectures`, `hidden_size`, `intermediate_size`, `num_hidden_layers`,
/// `num_attention_heads`, `num_key_value_heads`, `head_dim`, `rms_norm_eps`,
/// `rope_theta`, `max_position_embeddings`, `vocab_size`,
/// `tie_word_embeddings`, `hidden_act`, `attention_bias`, `mlp_bias`, and
/// `bos_token_id`, `eos_token_id`, `pad_token_id` when the file sets them.
/// Float values stored as float32 are written as their shortest decimal, so
/// an epsilon of 1e-5 reads back as 1e-5 rather than 9.99999974e-6.
pub fn llama_config_from_gguf(gguf: &GgufFile) -> Result<Value> {
    check_architecture(gguf)?;
    let dims = LlamaDims::read(gguf)?;

    let hidden_size = required_usize(gguf, "llama.embedding_length")?;
    let intermediate_size = required_usize(gguf, "llama.feed_forward_length")?;
    let num_hidden_layers = required_usize(gguf, "llama.block_count")?;
    let max_position_embeddings = required_usize(gguf, "llama.context_length")?;
    let rms_norm_eps = float_as_written(gguf, "llama.attention.layer_norm_rms_epsilon")?
        .ok_or_else(|| {
            config_error(
                gguf,
                "GGUF metadata key `llama.attention.layer_norm_rms_epsilon` is missing",
            )
        })?;
    // llama.cpp uses 10000 when the file has no RoPE base.
    let rope_theta = float_as_written(gguf, "llama.rope.freq_base")?.unwrap_or(10000.0);
    let head_dim = match gguf.get_u64("llama.attention.key_length")? {
        Some(key_length) => key_length as usize,
        None => hidden_size / dims.n_head,
    };

    let vocab_size = match gguf.tensor_info("token_embd.weight") {
        Some(info) => info.shape()[0],
        None => match gguf.get_u64("llama.vocab_size")? {
            Some(size) => size as usize,
            None => gguf
                .get_string_array("tokenizer.ggml.tokens")?
                .map_or(0, |tokens| tokens.len()),
        },
    };
    if vocab_size == 0 {
        return Err(config_error(gguf, "cannot tell the vocabulary size: no token_embd.weight, llama.vocab_size or tokenizer.ggml.tokens"));
    }

    if gguf.tensor_info("rope_freqs.weight").is_some() {
        return Err(Error::Unsupported(format!(
            "{}: the file has `rope_freqs.weight` (per-dimension RoPE frequency factors, as in Llama 3.1), \
             which has no equivalent in this config yet",
            gguf.path().display()
        )));
    }

    let mut config = json!({
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": dims.n_head,
        "num_key_value_heads": dims.n_head_kv,
        "head_dim": head_dim,
        "rms_norm_eps": rms_norm_eps,
        "rope_theta": rope_theta,
        "max_position_embeddings": max_position_embeddings,
        "vocab_size": vocab_size,
        "tie_word_embeddings": gguf.tensor_info("output.weight").is_none(),
        "hidden_act": "silu",
        "attention_bias": gguf.tensor_info("blk.0.attn_q.bias").is_some(),
        "mlp_bias": false,
    });

    let object = config.as_object_mut().expect("built as an object");
    if let Some(rope_scaling) = rope_scaling(gguf)? {
        object.insert("rope_scaling".to_string(), rope_scaling);
    }
    for (key, hf_key) in [
        ("tokenizer.ggml.bos_token_id", "bos_token_id"),
        ("tokenizer.ggml.eos_token_id", "eos_token_id"),
        ("tokenizer.ggml.padding_token_id", "pad_token_id"),
    ] {
        if let Some(id) = gguf.get_u64(key)? {
            object.insert(hf_key.to_string(), json!(id));
        }
    }
    Ok(config)
}

/// Reads `llama.rope.scaling.*`: none or linear scaling are supported.
fn rope_scaling(gguf: &GgufFile) -> Result<Option<Value>> {
    let kind = gguf.get_str("llama.rope.scaling.type")?;
    let factor = float_as_written(gguf, "llama.rope.scaling.factor")?;
    match (kind, factor) {
        (None | Some("none"), _) => Ok(None),
        (Some("linear"), Some(factor)) => {
            Ok(Some(json!({ "rope_type": "linear", "factor": factor })))
        }
        (Some("linear"), None) => Err(config_error(
            gguf,
            "`llama.rope.scaling.type` is linear but `llama.rope.scaling.factor` is missing",
        )),
        (Some(other), _) => Err(Error::Unsupported(format!(
            "{}: RoPE scaling `{other}` is not supported; supported: none, linear",
            gguf.path().display()
        ))),
    }
}

fn required_usize(gguf: &GgufFile, key: &str) -> Result<usize> {
    match gguf.get_u64(key)? {
        Some(value) => Ok(value as usize),
        None => Err(config_error(
            gguf,
            &format!("GGUF metadata key `{key}` is missing"),
        )),
    }
}

/// Reads a number; a float32 becomes the f64 of its shortest decimal form.
fn float_as_written(gguf: &GgufFile, key: &str) -> Result<Option<f64>> {
    if let Some(GgufValue::F32(value)) = gguf.get(key) {
        // The shortest decimal that round-trips to this f32 is what the model
        // author wrote (1e-5, not 9.999999747378752e-6).
        return Ok(Some(
            value
                .to_string()
                .parse()
                .expect("f32 Display output parses as f64"),
        ));
    }
    gguf.get_f64(key)
}

fn config_error(gguf: &GgufFile, message: &str) -> Error {
    Error::Config {
        origin: gguf.path().display().to_string(),
        message: message.to_string(),
    }
}
