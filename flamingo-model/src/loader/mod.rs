//! Checkpoint and tokenizer loading.
//!
//! Model code reads tensors through [`WeightSource`], so the same code loads a
//! Hugging Face safetensors checkpoint ([`SafetensorsWeights`]), a GGUF file
//! under its own names ([`GgufFile`]), or a GGUF Llama under Hugging Face
//! names ([`GgufLlamaWeights`], whose [`llama_config_from_gguf`] writes the
//! matching `config.json`). Tokenizers come from `tokenizer.json` or from GGUF
//! metadata ([`tokenizer`]).

pub mod gguf;
pub mod gguf_llama;
pub mod safetensors;
pub mod tokenizer;
pub mod weights;

use std::io::Read;
use std::path::Path;

pub use self::gguf::{GgufFile, GgufTensorInfo, GgufValue, RawTensor};
pub use self::gguf_llama::{
    llama_config_from_gguf, GgufLlamaWeights, SUPPORTED_GGUF_ARCHITECTURES,
};
pub use self::safetensors::SafetensorsWeights;
pub use self::tokenizer::{
    add_special_tokens, load_tokenizer_json, tokenizer_from_gguf, SpecialTokens, Tokenizer,
    END_OF_CHUNK_TOKEN, IMAGE_TOKEN,
};
pub use self::weights::{
    check_shape, missing_tensor, InMemoryWeights, PrefixedWeights, WeightSource,
};

use crate::error::{Error, Result};

/// Opens the tensors at `path` under their stored names: a GGUF file, a
/// `.safetensors` file, a shard index, or a folder holding a safetensors
/// checkpoint.
///
/// The file's first bytes decide the format, not its extension. A GGUF
/// Llama is returned under GGUF names; wrap it in [`GgufLlamaWeights`] for
/// Hugging Face names.
pub fn open_weights(path: impl AsRef<Path>) -> Result<Box<dyn WeightSource>> {
    let path = path.as_ref();
    if path.is_file() && starts_with_gguf_magic(path)? {
        return Ok(Box::new(GgufFile::open(path)?));
    }
    Ok(Box::new(SafetensorsWeights::open(path)?))
}

/// Returns whether the file at `path` begins as a safetensors file does:
/// an 8-byte header length, then the `{` that opens the JSON header.
pub fn starts_like_safetensors(path: &Path) -> Result<bool> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut start = [0u8; 9];
    match file.read_exact(&mut start) {
        Ok(()) => Ok(self::safetensors::looks_like_safetensors(&start)),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Returns whether the file at `path` begins with the GGUF magic bytes.
pub fn starts_with_gguf_magic(path: &Path) -> Result<bool> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut magic = [0u8; 4];
    match file.read_exact(&mut magic) {
        Ok(()) => Ok(&magic == b"GGUF"),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(Error::io(path, e)),
    }
}
