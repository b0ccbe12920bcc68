//! Helpers shared by the loader tests: fixture paths, optional assets, and a
//! GGUF writer that lays files out byte by byte.

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};

use flamingo_model::loader::GgufValue;

/// Returns the repository's `fixtures/` folder.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

/// Returns the path of a fetched asset, or `None` after printing why the
/// calling test is skipped.
///
/// With `FLAMINGO_REQUIRE_ASSETS=1` a missing asset fails the test instead.
pub fn optional_asset(relative: &str, test: &str) -> Option<PathBuf> {
    let cache = match std::env::var_os("FLAMINGO_CACHE") {
        Some(cache) => PathBuf::from(cache),
        None => match std::env::var_os("XDG_CACHE_HOME") {
            Some(base) => PathBuf::from(base).join("flamingo"),
            None => {
                PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/flamingo")
            }
        },
    };
    let path = cache.join(relative);
    if path.is_file() {
        return Some(path);
    }

    let message = format!(
        "{test}: {} is missing; run scripts/fetch-assets.sh --only smollm2 to fetch it",
        path.display()
    );
    if std::env::var("FLAMINGO_REQUIRE_ASSETS").as_deref() == Ok("1") {
        panic!("{message} (FLAMINGO_REQUIRE_ASSETS=1 makes this a failure)");
    }
    // libtest captures `eprintln!` output of passing tests, but not direct
    // writes to the stderr handle, so the skip is visible in a normal run.
    let _ = writeln!(std::io::stderr(), "SKIPPED {message}");
    None
}

/// Returns the path of the real SmolLM2 GGUF, or `None` when it is not fetched.
pub fn smollm2_gguf(test: &str) -> Option<PathBuf> {
    optional_asset("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", test)
}

/// Encodes an f32 slice as little-endian bytes.
pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|value| value.to_le_bytes())
        .collect()
}

/// A tensor to write: name, GGUF dims (`ne[0]` first), GGML type id, data.
pub struct GgufTensor {
    pub name: String,
    pub dims: Vec<u64>,
    pub type_id: u32,
    pub data: Vec<u8>,
}

/// Writes GGUF files from metadata values and raw tensor bytes.
pub struct GgufBuilder {
    pub magic: [u8; 4],
    pub version: u32,
    pub metadata: Vec<(String, GgufValue)>,
    pub tensors: Vec<GgufTensor>,
}

impl Default for GgufBuilder {
    fn default() -> Self {
        Self {
            magic: *b"GGUF",
            version: 3,
            metadata: Vec::new(),
            tensors: Vec::new(),
        }
    }
}

impl GgufBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn metadata(mut self, key: &str, value: GgufValue) -> Self {
        self.metadata.push((key.to_string(), value));
        self
    }

    /// Adds a tensor given its GGUF dims (row length first).
    pub fn tensor(mut self, name: &str, dims: &[u64], type_id: u32, data: Vec<u8>) -> Self {
        self.tensors.push(GgufTensor {
            name: name.to_string(),
            dims: dims.to_vec(),
            type_id,
            data,
        });
        self
    }

    /// Adds an F32 tensor given its PyTorch shape.
    pub fn f32_tensor(self, name: &str, shape: &[usize], values: &[f32]) -> Self {
        let dims: Vec<u64> = shape.iter().rev().map(|&dim| dim as u64).collect();
        self.tensor(name, &dims, 0, f32_bytes(values))
    }

    fn alignment(&self) -> usize {
        self.metadata
            .iter()
            .find(|(key, _)| key == "general.alignment")
            .and_then(|(_, value)| value.as_u64())
            .map_or(32, |alignment| alignment as usize)
    }

    /// Lays out the file: header, metadata, tensor infos, padding, aligned data.
    pub fn to_bytes(&self) -> Vec<u8> {
        let alignment = self.alignment();
        let mut out = Vec::new();
        out.extend_from_slice(&self.magic);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            write_string(&mut out, key);
            out.extend_from_slice(&value_type(value).to_le_bytes());
            write_value(&mut out, value);
        }

        let mut offset = 0usize;
        let mut offsets = Vec::new();
        for tensor in &self.tensors {
            write_string(&mut out, &tensor.name);
            out.extend_from_slice(&(tensor.dims.len() as u32).to_le_bytes());
            for dim in &tensor.dims {
                out.extend_from_slice(&dim.to_le_bytes());
            }
            out.extend_from_slice(&tensor.type_id.to_le_bytes());
            out.extend_from_slice(&(offset as u64).to_le_bytes());
            offsets.push(offset);
            offset = (offset + tensor.data.len()).next_multiple_of(alignment);
        }

        let data_start = out.len().next_multiple_of(alignment);
        out.resize(data_start, 0);
        for (tensor, offset) in self.tensors.iter().zip(offsets) {
            out.resize(data_start + offset, 0);
            out.extend_from_slice(&tensor.data);
        }
        out
    }

    /// Writes the file to `dir/name` and returns its path.
    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, self.to_bytes()).unwrap();
        path
    }
}

fn write_string(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
}

/// Returns the GGUF value type id. An empty array is written as an array of strings.
fn value_type(value: &GgufValue) -> u32 {
    match value {
        GgufValue::U8(_) => 0,
        GgufValue::I8(_) => 1,
        GgufValue::U16(_) => 2,
        GgufValue::I16(_) => 3,
        GgufValue::U32(_) => 4,
        GgufValue::I32(_) => 5,
        GgufValue::F32(_) => 6,
        GgufValue::Bool(_) => 7,
        GgufValue::String(_) => 8,
        GgufValue::Array(_) => 9,
        GgufValue::U64(_) => 10,
        GgufValue::I64(_) => 11,
        GgufValue::F64(_) => 12,
    }
}

fn write_value(out: &mut Vec<u8>, value: &GgufValue) {
    match value {
        GgufValue::U8(v) => out.push(*v),
        GgufValue::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::Bool(v) => out.push(u8::from(*v)),
        GgufValue::String(v) => write_string(out, v),
        GgufValue::Array(items) => {
            let item_type = items.first().map_or(8, value_type);
            out.extend_from_slice(&item_type.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                write_value(out, item);
            }
        }
        GgufValue::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
    }
}

/// Metadata of a minimal Llama: the keys the Hugging Face mapping and the
/// config builder read.
pub fn llama_metadata(builder: GgufBuilder, architecture: &str) -> GgufBuilder {
    builder
        .metadata(
            "general.architecture",
            GgufValue::String(architecture.to_string()),
        )
        .metadata(&format!("{architecture}.block_count"), GgufValue::U32(1))
        .metadata(
            &format!("{architecture}.context_length"),
            GgufValue::U32(64),
        )
        .metadata(
            &format!("{architecture}.embedding_length"),
            GgufValue::U32(8),
        )
        .metadata(
            &format!("{architecture}.feed_forward_length"),
            GgufValue::U32(16),
        )
        .metadata(
            &format!("{architecture}.attention.head_count"),
            GgufValue::U32(2),
        )
        .metadata(
            &format!("{architecture}.attention.head_count_kv"),
            GgufValue::U32(1),
        )
        .metadata(
            &format!("{architecture}.attention.layer_norm_rms_epsilon"),
            GgufValue::F32(1e-6),
        )
}

/// Asserts that `error`'s message contains every one of `parts`.
pub fn assert_message_contains(error: &impl std::fmt::Display, parts: &[&str]) {
    let message = error.to_string();
    for part in parts {
        assert!(
            message.contains(part),
            "expected `{part}` in the message: {message}"
        );
    }
}
