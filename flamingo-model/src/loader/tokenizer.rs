//! Tokenizers: a Hugging Face `tokenizer.json`, or the tokenizer that a GGUF
//! file describes in its metadata, both as a `tokenizers::Tokenizer`.
//!
//! A GGUF file has no `tokenizer.json`. Instead, llama.cpp stores the
//! vocabulary (`tokenizer.ggml.tokens`), the BPE merges
//! (`tokenizer.ggml.merges`), a type per token (`tokenizer.ggml.token_type`),
//! the special token ids, and the name of the pre-tokenizer
//! (`tokenizer.ggml.pre`). For the byte-level BPE of GPT-2
//! (`tokenizer.ggml.model = gpt2`) these map onto the `tokenizers` BPE model.
//! The pre-tokenizer name decides how text is split before BPE runs, and a
//! wrong split changes the ids.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::AddedToken;

pub use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::loader::gguf::GgufFile;

/// The token that marks where an image goes in the text.
pub const IMAGE_TOKEN: &str = "<image>";

/// The token that ends the text that belongs to one image.
pub const END_OF_CHUNK_TOKEN: &str = "<|endofchunk|>";

/// The `tokenizer.ggml.model` values [`tokenizer_from_gguf`] can build.
pub const SUPPORTED_GGUF_TOKENIZER_MODELS: [&str; 1] = ["gpt2"];

/// The `tokenizer.ggml.pre` values [`tokenizer_from_gguf`] can build.
pub const SUPPORTED_GGUF_PRE_TOKENIZERS: [&str; 2] = ["gpt2", "smollm"];

/// llama.cpp's token types in `tokenizer.ggml.token_type`.
const TOKEN_TYPE_UNKNOWN: i64 = 2;
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Loads a Hugging Face `tokenizer.json`, given the file or its folder.
pub fn load_tokenizer_json(path: impl AsRef<Path>) -> Result<Tokenizer> {
    let path = path.as_ref();
    let file = if path.is_dir() {
        path.join("tokenizer.json")
    } else {
        path.to_path_buf()
    };
    let bytes = std::fs::read(&file).map_err(|e| Error::io(&file, e))?;
    Tokenizer::from_bytes(&bytes)
        .map_err(|e| Error::Tokenizer(format!("{}: invalid tokenizer.json: {e}", file.display())))
}

/// Builds the tokenizer that the metadata of `gguf` describes.
///
/// Supports `tokenizer.ggml.model = gpt2` (byte-level BPE) with the
/// pre-tokenizers `gpt2` (the GPT-2 split) and `smollm` (every digit on its
/// own, then the GPT-2 split, as in SmolLM's `tokenizer.json`). Tokens of type
/// control or unknown become special added tokens and user-defined tokens
/// become plain added tokens, so both are matched whole in the input text.
/// `tokenizer.ggml.add_bos_token` and `add_eos_token` (default false) decide
/// whether `encode(text, true)` adds BOS and EOS.
pub fn tokenizer_from_gguf(gguf: &GgufFile) -> Result<Tokenizer> {
    let origin = gguf.path().display().to_string();
    let model = gguf.get_str("tokenizer.ggml.model")?.ok_or_else(|| {
        Error::Tokenizer(format!(
            "{origin}: the file has no tokenizer (`tokenizer.ggml.model` is missing)"
        ))
    })?;
    if !SUPPORTED_GGUF_TOKENIZER_MODELS.contains(&model) {
        return Err(Error::Unsupported(format!(
            "{origin}: GGUF tokenizer model `{model}` is not supported; supported: {}",
            SUPPORTED_GGUF_TOKENIZER_MODELS.join(", ")
        )));
    }

    let tokens = required_string_array(gguf, "tokenizer.ggml.tokens")?;
    let merge_strings = required_string_array(gguf, "tokenizer.ggml.merges")?;
    let token_types = gguf.get_i64_array("tokenizer.ggml.token_type")?;
    if let Some(types) = &token_types {
        if types.len() != tokens.len() {
            return Err(Error::Tokenizer(format!(
                "{origin}: `tokenizer.ggml.token_type` has {} entries but `tokenizer.ggml.tokens` has {}",
                types.len(),
                tokens.len()
            )));
        }
    }

    let bpe = build_bpe(&origin, &tokens, &merge_strings)?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer(gguf)?));
    tokenizer.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())));
    tokenizer.with_post_processor(Some(post_processor(gguf, &tokens)?));

    if let Some(types) = &token_types {
        let added: Vec<AddedToken> = tokens
            .iter()
            .zip(types)
            .filter_map(|(&token, &token_type)| match token_type {
                TOKEN_TYPE_CONTROL | TOKEN_TYPE_UNKNOWN => {
                    Some(AddedToken::from(token, true).normalized(false))
                }
                TOKEN_TYPE_USER_DEFINED => Some(AddedToken::from(token, false).normalized(false)),
                _ => None,
            })
            .collect();
        let (special, plain): (Vec<AddedToken>, Vec<AddedToken>) =
            added.into_iter().partition(|token| token.special);
        tokenizer.add_special_tokens(&special);
        tokenizer.add_tokens(&plain);
    }
    Ok(tokenizer)
}

fn required_string_array<'a>(gguf: &'a GgufFile, key: &str) -> Result<Vec<&'a str>> {
    gguf.get_string_array(key)?.ok_or_else(|| {
        Error::Tokenizer(format!(
            "{}: GGUF metadata key `{key}` is missing",
            gguf.path().display()
        ))
    })
}

fn build_bpe(origin: &str, tokens: &[&str], merge_strings: &[&str]) -> Result<BPE> {
    let mut vocab = Vocab::with_capacity(tokens.len());
    for (id, &token) in tokens.iter().enumerate() {
        // Keep the first id of a repeated token, so that every id up to the
        // last one still decodes; llama.cpp files occasionally repeat a token.
        if vocab.contains_key(token) {
            tracing::warn!(
                token,
                id,
                "GGUF vocabulary repeats a token; the later id is ignored when encoding"
            );
            continue;
        }
        vocab.insert(token.to_string(), id as u32);
    }

    let mut merges = Vec::with_capacity(merge_strings.len());
    for (rank, merge) in merge_strings.iter().enumerate() {
        let Some((left, right)) = merge.split_once(' ') else {
            return Err(Error::Tokenizer(format!(
                "{origin}: merge {rank} (`{merge}`) is not two tokens separated by a space"
            )));
        };
        merges.push((left.to_string(), right.to_string()));
    }

    BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| {
            Error::Tokenizer(format!(
                "{origin}: cannot build the BPE model from the GGUF vocabulary: {e}"
            ))
        })
}

/// Returns the pre-tokenizer named by `tokenizer.ggml.pre`.
fn pre_tokenizer(gguf: &GgufFile) -> Result<PreTokenizerWrapper> {
    // The GPT-2 split: contractions, letters, digits, other symbols and
    // spaces, each group taking one leading space.
    let gpt2_split = ByteLevel::new(false, true, true);

    let name = gguf.get_str("tokenizer.ggml.pre")?;
    match name {
        Some("gpt2") => Ok(PreTokenizerWrapper::ByteLevel(gpt2_split)),
        None => {
            tracing::warn!(
                file = %gguf.path().display(),
                "`tokenizer.ggml.pre` is missing; splitting text as GPT-2 does"
            );
            Ok(PreTokenizerWrapper::ByteLevel(gpt2_split))
        }
        // llama.cpp's `smollm` splits on every digit (`\p{N}`) before the GPT-2
        // split; SmolLM's tokenizer.json does the same with Digits(individual).
        Some("smollm") => Ok(PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(gpt2_split),
        ]))),
        Some(other) => Err(Error::Unsupported(format!(
            "{}: GGUF pre-tokenizer `{other}` is not supported; supported: {}",
            gguf.path().display(),
            SUPPORTED_GGUF_PRE_TOKENIZERS.join(", ")
        ))),
    }
}

/// Builds the post-processor: a template that adds BOS and EOS when the file
/// requests them, else the byte-level post-processor, which adds nothing.
fn post_processor(gguf: &GgufFile, tokens: &[&str]) -> Result<PostProcessorWrapper> {
    let add_bos = gguf
        .get_bool("tokenizer.ggml.add_bos_token")?
        .unwrap_or(false);
    let add_eos = gguf
        .get_bool("tokenizer.ggml.add_eos_token")?
        .unwrap_or(false);
    if !add_bos && !add_eos {
        return Ok(PostProcessorWrapper::ByteLevel(ByteLevel::new(
            false, false, true,
        )));
    }

    let special = |key: &str| -> Result<(String, u32)> {
        let id = gguf.get_u64(key)?.ok_or_else(|| {
            Error::Tokenizer(format!(
                "{}: `{key}` is missing, but the file requests adding that token",
                gguf.path().display()
            ))
        })?;
        let token = tokens.get(id as usize).ok_or_else(|| {
            Error::Tokenizer(format!(
                "{}: `{key}` is {id}, outside the vocabulary of {} tokens",
                gguf.path().display(),
                tokens.len()
            ))
        })?;
        Ok((token.to_string(), id as u32))
    };

    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut special_tokens = Vec::new();
    if add_bos {
        let bos = special("tokenizer.ggml.bos_token_id")?;
        single.push(bos.0.clone());
        pair.push(bos.0.clone());
        special_tokens.push(bos);
    }
    single.push("$A".to_string());
    pair.push("$A".to_string());
    let eos = if add_eos {
        Some(special("tokenizer.ggml.eos_token_id")?)
    } else {
        None
    };
    if let Some(eos) = &eos {
        single.push(eos.0.clone());
        pair.push(eos.0.clone());
    }
    if let Some(bos) = special_tokens.first() {
        pair.push(format!("{}:1", bos.0));
    }
    pair.push("$B:1".to_string());
    if let Some(eos) = eos {
        pair.push(format!("{}:1", eos.0));
        special_tokens.push(eos);
    }

    let template_error = |e: String| {
        Error::Tokenizer(format!(
            "{}: cannot build the BOS/EOS template: {e}",
            gguf.path().display()
        ))
    };
    let template = TemplateProcessing::builder()
        .try_single(single)
        .map_err(template_error)?
        .try_pair(pair)
        .map_err(template_error)?
        .special_tokens(special_tokens)
        .build()
        .map_err(|e| template_error(e.to_string()))?;
    Ok(PostProcessorWrapper::Template(template))
}

/// The ids of the special tokens a model was trained with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    /// Beginning of sequence.
    pub bos: Option<u32>,
    /// End of sequence; generation stops here.
    pub eos: Option<u32>,
    /// Padding.
    pub pad: Option<u32>,
    /// Unknown token.
    pub unk: Option<u32>,
    /// Every special added token (`<|im_start|>`, `<|endoftext|>`, ...) by content.
    pub named: BTreeMap<String, u32>,
}

impl SpecialTokens {
    /// Returns the id of special token `content`, such as `<|im_start|>`.
    pub fn id(&self, content: &str) -> Option<u32> {
        self.named.get(content).copied()
    }

    /// Reads the special token ids from `tokenizer.ggml.*_token_id`; `named`
    /// lists the special added tokens of `tokenizer`.
    pub fn from_gguf(gguf: &GgufFile, tokenizer: &Tokenizer) -> Result<Self> {
        let vocab_size = tokenizer.get_vocab_size(true);
        let id_of = |key: &str| -> Result<Option<u32>> {
            match gguf.get_u64(key)? {
                Some(id) if (id as usize) < vocab_size => Ok(Some(id as u32)),
                Some(id) => Err(Error::Tokenizer(format!(
                    "{}: `{key}` is {id}, outside the vocabulary of {vocab_size} tokens",
                    gguf.path().display()
                ))),
                None => Ok(None),
            }
        };
        Ok(Self {
            bos: id_of("tokenizer.ggml.bos_token_id")?,
            eos: id_of("tokenizer.ggml.eos_token_id")?,
            pad: id_of("tokenizer.ggml.padding_token_id")?,
            unk: id_of("tokenizer.ggml.unknown_token_id")?,
            named: special_added_tokens(tokenizer),
        })
    }

    /// Reads the special tokens of a Hugging Face model folder.
    ///
    /// Each of `bos_token`, `eos_token`, `pad_token` and `unk_token` comes
    /// from `tokenizer_config.json`, else `special_tokens_map.json` (as a
    /// string or as `{"content": ...}`), else the matching `*_token_id` of
    /// `generation_config.json` or `config.json` (the first id when it is a
    /// list). Missing files are skipped.
    pub fn from_hf_folder(folder: impl AsRef<Path>, tokenizer: &Tokenizer) -> Result<Self> {
        let folder = folder.as_ref();
        let token_files = [
            read_json_if_present(&folder.join("tokenizer_config.json"))?,
            read_json_if_present(&folder.join("special_tokens_map.json"))?,
        ];
        let id_files = [
            read_json_if_present(&folder.join("generation_config.json"))?,
            read_json_if_present(&folder.join("config.json"))?,
        ];

        let find = |role: &str| -> Result<Option<u32>> {
            for (path, json) in token_files.iter().flatten() {
                let Some(content) = token_content(json.get(format!("{role}_token").as_str()))
                else {
                    continue;
                };
                return match tokenizer.token_to_id(content) {
                    Some(id) => Ok(Some(id)),
                    None => Err(Error::Tokenizer(format!(
                        "{}: {role}_token `{content}` is not in the tokenizer's vocabulary",
                        path.display()
                    ))),
                };
            }
            for (_, json) in id_files.iter().flatten() {
                let id = match json.get(format!("{role}_token_id").as_str()) {
                    Some(Value::Number(id)) => id.as_u64(),
                    Some(Value::Array(ids)) => ids.first().and_then(Value::as_u64),
                    _ => None,
                };
                if let Some(id) = id {
                    return Ok(Some(id as u32));
                }
            }
            Ok(None)
        };

        Ok(Self {
            bos: find("bos")?,
            eos: find("eos")?,
            pad: find("pad")?,
            unk: find("unk")?,
            named: special_added_tokens(tokenizer),
        })
    }
}

/// Returns the special added tokens of `tokenizer`, by content.
fn special_added_tokens(tokenizer: &Tokenizer) -> BTreeMap<String, u32> {
    tokenizer
        .get_added_tokens_decoder()
        .into_iter()
        .filter(|(_, token)| token.special)
        .map(|(id, token)| (token.content, id))
        .collect()
}

/// Returns the content of a `*_token` entry: a string, or an object with `content`.
fn token_content(value: Option<&Value>) -> Option<&str> {
    match value? {
        Value::String(content) => Some(content),
        Value::Object(map) => map.get("content")?.as_str(),
        _ => None,
    }
}

fn read_json_if_present(path: &Path) -> Result<Option<(PathBuf, Value)>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let json = serde_json::from_str(&text)
        .map_err(|e| Error::format(path, format!("invalid JSON: {e}")))?;
    Ok(Some((path.to_path_buf(), json)))
}

/// Adds `tokens` as special tokens unless the tokenizer already has them as
/// added tokens, and returns their ids in the same order.
///
/// A token that is new gets the next id after the whole existing vocabulary
/// (added tokens included), so its id is at least the number of rows of the
/// model's embedding matrix: the caller must grow the embedding for it. A
/// token that is already in the vocabulary keeps its id, and adding it makes
/// sure it is matched whole in input text.
pub fn add_special_tokens(tokenizer: &mut Tokenizer, tokens: &[&str]) -> Result<Vec<u32>> {
    let added: Vec<AddedToken> = tokens
        .iter()
        .map(|&token| AddedToken::from(token, true).normalized(false))
        .collect();
    tokenizer.add_special_tokens(&added);

    tokens
        .iter()
        .map(|&token| {
            tokenizer.token_to_id(token).ok_or_else(|| {
                Error::Tokenizer(format!(
                    "special token `{token}` has no id after being added"
                ))
            })
        })
        .collect()
}
