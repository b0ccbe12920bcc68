//! Memory-mapped safetensors checkpoints, single-file or sharded.
//!
//! A safetensors file is an 8-byte little-endian header length `n`, `n` bytes
//! of JSON that map each tensor name to `{dtype, shape, data_offsets}` (plus an
//! optional `__metadata__` map of strings), then the data section. Offsets are
//! relative to the start of the data section, and the data is little-endian
//! and row-major. A sharded checkpoint adds `model.safetensors.index.json`,
//! whose `weight_map` names the shard file of every tensor.
//!
//! The header is parsed here rather than by `safetensors::SafeTensors` so that
//! a truncated file or an inconsistent entry is reported with the tensor and
//! byte counts involved.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use flamingo_kernels::quant::{self, GgmlType};
use flamingo_kernels::{HostData, HostTensor};
use memmap2::Mmap;
use safetensors::tensor::TensorInfo;
use safetensors::Dtype;
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::loader::weights::{missing_tensor, WeightSource};

/// The file name of a single-file checkpoint in a Hugging Face folder.
pub const SAFETENSORS_FILE: &str = "model.safetensors";

/// The file name of the index of a sharded checkpoint in a Hugging Face folder.
pub const SAFETENSORS_INDEX_FILE: &str = "model.safetensors.index.json";

/// Headers larger than this are rejected as corrupt; the safetensors crate
/// 0.8 uses the same 100 MB limit.
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// A safetensors checkpoint whose files are memory-mapped.
///
/// Tensors are read from the mapping on demand, so opening a checkpoint costs
/// only the header parsing.
pub struct SafetensorsWeights {
    origin: PathBuf,
    shards: Vec<Shard>,
    tensors: HashMap<String, TensorEntry>,
    metadata: BTreeMap<String, String>,
}

struct Shard {
    path: PathBuf,
    mmap: Mmap,
}

/// The location of one tensor: a shard and a byte range of its mapping.
struct TensorEntry {
    shard: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// A parsed shard header: tensors with absolute byte ranges, and `__metadata__`.
struct ShardHeader {
    tensors: Vec<(String, Dtype, Vec<usize>, usize, usize)>,
    metadata: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct ShardIndex {
    #[serde(default)]
    metadata: Option<serde_json::Value>,
    weight_map: BTreeMap<String, String>,
}

impl SafetensorsWeights {
    /// Opens a checkpoint from a `.safetensors` file, an index file, or a folder.
    ///
    /// In a folder, `model.safetensors.index.json` is used if present, then
    /// `model.safetensors`, then the only `*.safetensors` file if there is
    /// exactly one.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if path.is_dir() {
            return Self::open_folder(path);
        }
        if path.to_string_lossy().ends_with(".index.json") {
            return Self::open_sharded(path);
        }
        Self::open_file(path)
    }

    fn open_folder(folder: &Path) -> Result<Self> {
        let index = folder.join(SAFETENSORS_INDEX_FILE);
        if index.is_file() {
            return Self::open_sharded(&index);
        }
        let single = folder.join(SAFETENSORS_FILE);
        if single.is_file() {
            return Self::open_file(&single);
        }

        let entries = std::fs::read_dir(folder).map_err(|e| Error::io(folder, e))?;
        let mut candidates = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(folder, e))?;
            let candidate = entry.path();
            if candidate
                .extension()
                .is_some_and(|ext| ext == "safetensors")
                && candidate.is_file()
            {
                candidates.push(candidate);
            }
        }
        match candidates.len() {
            1 => Self::open_file(&candidates[0]),
            0 => Err(Error::format(
                folder,
                format!("no {SAFETENSORS_INDEX_FILE}, {SAFETENSORS_FILE} or other *.safetensors file in this folder"),
            )),
            n => Err(Error::format(
                folder,
                format!(
                    "{n} *.safetensors files but no {SAFETENSORS_INDEX_FILE} that says how they fit together; \
                     pass the path of one file instead"
                ),
            )),
        }
    }

    /// Opens a single `.safetensors` file.
    pub fn open_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let shard = map_shard(path)?;
        let header = parse_header(&shard.path, &shard.mmap)?;

        let mut tensors = HashMap::with_capacity(header.tensors.len());
        for (name, dtype, shape, start, end) in header.tensors {
            tensors.insert(
                name,
                TensorEntry {
                    shard: 0,
                    dtype,
                    shape,
                    start,
                    end,
                },
            );
        }
        Ok(Self {
            origin: path.to_path_buf(),
            shards: vec![shard],
            tensors,
            metadata: header.metadata,
        })
    }

    /// Opens a sharded checkpoint from its `model.safetensors.index.json`.
    ///
    /// Every shard named in `weight_map` must exist beside the index and hold
    /// the tensors the index assigns to it. Only tensors listed in `weight_map`
    /// are exposed.
    pub fn open_sharded(index_path: impl AsRef<Path>) -> Result<Self> {
        let index_path = index_path.as_ref();
        let text = std::fs::read_to_string(index_path).map_err(|e| Error::io(index_path, e))?;
        let index: ShardIndex = serde_json::from_str(&text).map_err(|e| {
            Error::format(
                index_path,
                format!("invalid shard index (expected a JSON object with `weight_map`): {e}"),
            )
        })?;
        let folder = index_path.parent().unwrap_or(Path::new("."));

        // Tensor names per shard file, in the order the shards first appear.
        let mut shard_files: Vec<&str> = Vec::new();
        let mut names_per_shard: HashMap<&str, Vec<&str>> = HashMap::new();
        for (name, file) in &index.weight_map {
            if !names_per_shard.contains_key(file.as_str()) {
                shard_files.push(file);
            }
            names_per_shard.entry(file).or_default().push(name);
        }

        let mut shards = Vec::with_capacity(shard_files.len());
        let mut tensors = HashMap::with_capacity(index.weight_map.len());
        let mut metadata = BTreeMap::new();
        for (shard_number, file) in shard_files.iter().enumerate() {
            let shard_path = folder.join(file);
            let names = &names_per_shard[file];
            if !shard_path.is_file() {
                return Err(Error::format(
                    index_path,
                    format!(
                        "shard `{file}`, listed for {} tensors such as `{}`, is missing from {}",
                        names.len(),
                        names[0],
                        folder.display()
                    ),
                ));
            }

            let shard = map_shard(&shard_path)?;
            let header = parse_header(&shard.path, &shard.mmap)?;
            let mut by_name: HashMap<String, (Dtype, Vec<usize>, usize, usize)> = header
                .tensors
                .into_iter()
                .map(|(name, dtype, shape, start, end)| (name, (dtype, shape, start, end)))
                .collect();
            for &name in names {
                let Some((dtype, shape, start, end)) = by_name.remove(name) else {
                    return Err(Error::format(
                        &shard_path,
                        format!(
                            "{SAFETENSORS_INDEX_FILE} places tensor `{name}` in this shard, but the shard has no such tensor"
                        ),
                    ));
                };
                tensors.insert(
                    name.to_string(),
                    TensorEntry {
                        shard: shard_number,
                        dtype,
                        shape,
                        start,
                        end,
                    },
                );
            }
            if metadata.is_empty() {
                metadata = header.metadata;
            }
            shards.push(shard);
        }

        // The index's own metadata (usually `total_size`) is kept as strings too.
        if let Some(serde_json::Value::Object(map)) = index.metadata {
            for (key, value) in map {
                let text = match value {
                    serde_json::Value::String(text) => text,
                    other => other.to_string(),
                };
                metadata.entry(key).or_insert(text);
            }
        }
        Ok(Self {
            origin: index_path.to_path_buf(),
            shards,
            tensors,
            metadata,
        })
    }

    /// Returns the files this checkpoint is read from.
    pub fn shard_paths(&self) -> Vec<&Path> {
        self.shards
            .iter()
            .map(|shard| shard.path.as_path())
            .collect()
    }

    /// Returns the `__metadata__` strings of the (first) shard header, plus the
    /// `metadata` of the shard index if there is one.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Returns the stored element type of tensor `name`.
    pub fn dtype(&self, name: &str) -> Result<Dtype> {
        Ok(self.entry(name)?.dtype)
    }

    /// Returns the stored little-endian bytes of tensor `name`, straight from the mapping.
    pub fn raw_bytes(&self, name: &str) -> Result<&[u8]> {
        let entry = self.entry(name)?;
        Ok(&self.shards[entry.shard].mmap[entry.start..entry.end])
    }

    fn entry(&self, name: &str) -> Result<&TensorEntry> {
        self.tensors
            .get(name)
            .ok_or_else(|| missing_tensor(self, name))
    }
}

impl WeightSource for SafetensorsWeights {
    fn origin(&self) -> String {
        format!("{} (safetensors)", self.origin.display())
    }

    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.tensors.keys().cloned().collect();
        names.sort();
        names
    }

    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.entry(name)?.shape.clone())
    }

    fn tensor(&self, name: &str) -> Result<HostTensor> {
        let entry = self.entry(name)?;
        let bytes = &self.shards[entry.shard].mmap[entry.start..entry.end];
        let n_elements: usize = entry.shape.iter().product();

        // The float conversions are the GGML ones: F32, F16 and BF16 have the
        // same little-endian layout in both formats.
        let data = match entry.dtype {
            Dtype::F32 => HostData::F32(quant::dequantize(GgmlType::F32, bytes, n_elements)?),
            Dtype::F16 => HostData::F16(quant::dequantize_to_f16(GgmlType::F16, bytes, n_elements)?),
            Dtype::BF16 => HostData::F32(quant::dequantize(GgmlType::BF16, bytes, n_elements)?),
            Dtype::F64 => HostData::F32(
                bytes
                    .chunks_exact(8)
                    .map(|word| f64::from_le_bytes(word.try_into().expect("chunks of 8 bytes")) as f32)
                    .collect(),
            ),
            other => {
                return Err(Error::Unsupported(format!(
                    "{}: tensor `{name}` has dtype {other:?}; supported dtypes are F32, F16, BF16 and F64",
                    self.shards[entry.shard].path.display()
                )))
            }
        };
        Ok(HostTensor::new(entry.shape.clone(), data)?)
    }
}

/// Opens and memory-maps one safetensors file.
fn map_shard(path: &Path) -> Result<Shard> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the mapping is read-only. If another process truncates or
    // rewrites the file while it is mapped, reads may see the new bytes or
    // fault. Every memory-mapped checkpoint loader shares this risk, and
    // checkpoint files are not expected to change while a model loads.
    let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    Ok(Shard {
        path: path.to_path_buf(),
        mmap,
    })
}

/// The advice for a safetensors file that is cut short or damaged.
const FETCH_AGAIN: &str = "download or convert it again";

/// Returns whether `bytes` begin as a safetensors file does: an 8-byte
/// header length, then the `{` that opens the JSON header.
pub fn looks_like_safetensors(bytes: &[u8]) -> bool {
    bytes.get(8) == Some(&b'{')
}

/// Returns the end of a message about an unreadable header. A file that
/// starts as safetensors does is damaged, and any other file is probably
/// not safetensors at all.
fn damaged_hint(looks_like: bool) -> String {
    match looks_like {
        true => format!("the safetensors file is damaged, so {FETCH_AGAIN}"),
        false => "this is not a safetensors file, or it is a damaged one".to_string(),
    }
}

/// Parses and checks the header of one safetensors file.
///
/// The returned byte ranges are absolute offsets into `bytes`, checked to lie
/// inside it and to match each tensor's shape and dtype.
fn parse_header(path: &Path, bytes: &[u8]) -> Result<ShardHeader> {
    let file_len = bytes.len();
    if file_len < 8 {
        return Err(Error::format(
            path,
            format!(
                "the file is {file_len} bytes long, too short for the 8-byte safetensors header length; \
                 if it is a safetensors file, it is truncated, so {FETCH_AGAIN}"
            ),
        ));
    }

    let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    let looks_like = looks_like_safetensors(bytes);
    if header_len > MAX_HEADER_BYTES {
        let message = match looks_like {
            true => format!(
                "this is a damaged safetensors file: its header length field says {header_len} bytes, \
                 more than the {MAX_HEADER_BYTES}-byte limit; {FETCH_AGAIN}"
            ),
            false => format!(
                "the header length field says {header_len} bytes, more than the {MAX_HEADER_BYTES}-byte limit; \
                 this is not a safetensors file or it is corrupt"
            ),
        };
        return Err(Error::format(path, message));
    }
    let header_end = 8 + header_len as usize;
    if header_end > file_len {
        let message = match looks_like {
            true => format!(
                "this is a truncated or damaged safetensors file: its header needs bytes 8..{header_end}, \
                 but the file is {file_len} bytes long; {FETCH_AGAIN}"
            ),
            false => format!(
                "the first 8 bytes give a header length of {header_len}, so the header needs bytes 8..{header_end}, \
                 but the file is {file_len} bytes long and no JSON header follows; this is not a safetensors file, \
                 or it is a damaged one"
            ),
        };
        return Err(Error::format(path, message));
    }

    let header_text = std::str::from_utf8(&bytes[8..header_end])
        .map_err(|e| Error::format(path, format!("the header is not valid UTF-8 ({e}); {}", damaged_hint(looks_like))))?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_str(header_text)
        .map_err(|e| Error::format(path, format!("the header is not a valid JSON object ({e}); {}", damaged_hint(looks_like))))?;

    let mut tensors = Vec::with_capacity(header.len());
    let mut metadata = BTreeMap::new();
    for (name, value) in header {
        if name == "__metadata__" {
            metadata = serde_json::from_value(value).map_err(|e| {
                Error::format(
                    path,
                    format!("`__metadata__` in the header is not a map of strings: {e}"),
                )
            })?;
            continue;
        }

        let info: TensorInfo = serde_json::from_value(value).map_err(|e| {
            Error::format(
                path,
                format!("invalid header entry for tensor `{name}`: {e}"),
            )
        })?;
        let (start, end) = info.data_offsets;
        let expected_len = info
            .shape
            .iter()
            .try_fold(info.dtype.bitsize(), |acc, &dim| acc.checked_mul(dim))
            .map(|bits| bits.div_ceil(8));
        if end < start || Some(end - start) != expected_len {
            return Err(Error::format(
                path,
                format!(
                    "tensor `{name}` has dtype {:?} and shape {:?}, which take {} bytes, \
                     but its data_offsets [{start}, {end}] span {} bytes",
                    info.dtype,
                    info.shape,
                    expected_len.map_or("too many".to_string(), |len| len.to_string()),
                    end as i128 - start as i128
                ),
            ));
        }
        tensors.push((
            name,
            info.dtype,
            info.shape,
            header_end + start,
            header_end + end,
        ));
    }

    // Report the first tensor, in file order, that the end of the file cuts off.
    let cut_off = tensors
        .iter()
        .filter(|tensor| tensor.4 > file_len)
        .min_by_key(|tensor| tensor.3);
    if let Some((name, _, _, start, end)) = cut_off {
        let needed = tensors
            .iter()
            .map(|tensor| tensor.4)
            .max()
            .unwrap_or(header_end);
        return Err(Error::format(
            path,
            format!(
                "the file is truncated: it is {file_len} bytes long, but its header places tensor data up to \
                 byte {needed}; tensor `{name}` needs bytes {start}..{end}; {FETCH_AGAIN}"
            ),
        ));
    }
    Ok(ShardHeader { tensors, metadata })
}
