//! GGUF files, versions 2 and 3: metadata, tensor infos and memory-mapped tensor data.
//!
//! Layout, all little-endian:
//!
//! ```text
//! magic        4 bytes "GGUF"
//! version      u32                 2 or 3 (1 used u32 counts and is not read here)
//! tensor_count u64
//! kv_count     u64
//! metadata     kv_count × (key: string, value type: u32, value)
//! tensor infos tensor_count × (name: string, n_dims: u32, dims: n_dims × u64,
//!                               ggml type: u32, offset: u64)
//! padding      to a multiple of `general.alignment` (32 when absent)
//! tensor data  each tensor at data start + its offset
//! ```
//!
//! A string is a u64 byte length followed by UTF-8 bytes with no terminator.
//! An array is a u32 element type, a u64 count, then the elements, and arrays
//! may nest. `dims` lists the fastest-varying dimension first (`ne[0]` is the
//! row length), so the PyTorch shape is `dims` reversed. Versions 2 and 3 share
//! this layout, and gguf-py 0.19.0 reads the same two. A big-endian file shows
//! up as a byte-swapped version number and is rejected.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use flamingo_kernels::quant::{self, GgmlType};
use flamingo_kernels::{HostData, HostTensor};
use memmap2::Mmap;

use crate::error::{Error, Result};
use crate::loader::weights::{missing_tensor, WeightSource};

mod parse;

/// The GGUF versions this reader accepts.
pub const SUPPORTED_GGUF_VERSIONS: [u32; 2] = [2, 3];

/// The alignment of the data section and of each tensor when the file does
/// not set `general.alignment`.
pub const DEFAULT_ALIGNMENT: usize = 32;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    /// Returns the GGUF name of the value's type, for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            GgufValue::U8(_) => "uint8",
            GgufValue::I8(_) => "int8",
            GgufValue::U16(_) => "uint16",
            GgufValue::I16(_) => "int16",
            GgufValue::U32(_) => "uint32",
            GgufValue::I32(_) => "int32",
            GgufValue::F32(_) => "float32",
            GgufValue::Bool(_) => "bool",
            GgufValue::String(_) => "string",
            GgufValue::Array(_) => "array",
            GgufValue::U64(_) => "uint64",
            GgufValue::I64(_) => "int64",
            GgufValue::F64(_) => "float64",
        }
    }

    /// Returns the value as u64, if it is an integer of any width that is not negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Returns the value as i64, if it is an integer that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::I8(v) => Some(v.into()),
            GgufValue::I16(v) => Some(v.into()),
            GgufValue::I32(v) => Some(v.into()),
            GgufValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// Returns the value as f64, if it is a float or an integer.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// Returns the value as bool, if it is one.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// Returns the value as a string slice, if it is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(v) => Some(v),
            _ => None,
        }
    }

    /// Returns the elements, if the value is an array.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(v) => Some(v),
            _ => None,
        }
    }
}

/// The description of one tensor in a GGUF file.
#[derive(Debug, Clone)]
pub struct GgufTensorInfo {
    name: String,
    dims: Vec<u64>,
    ggml_type: GgmlType,
    offset: u64,
    n_elements: usize,
    n_bytes: usize,
}

impl GgufTensorInfo {
    /// Returns the tensor name, such as `blk.0.attn_q.weight`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Returns the dimensions as stored: `dims[0]` is the row length (GGML's `ne[0]`).
    pub fn dims(&self) -> &[u64] {
        &self.dims
    }

    /// Returns the shape in PyTorch order: the stored dims reversed.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&dim| dim as usize).collect()
    }

    /// Returns the element type.
    pub fn ggml_type(&self) -> GgmlType {
        self.ggml_type
    }

    /// Returns the byte offset of the data from the start of the data section.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Returns the number of elements.
    pub fn n_elements(&self) -> usize {
        self.n_elements
    }

    /// Returns the number of bytes of stored data.
    pub fn n_bytes(&self) -> usize {
        self.n_bytes
    }
}

/// The stored bytes of a tensor before dequantization, for a GPU kernel.
#[derive(Debug, Clone)]
pub struct RawTensor<'a> {
    /// The element type of `bytes`.
    pub ggml_type: GgmlType,
    /// The shape in PyTorch order; the last dimension is a whole number of blocks.
    pub shape: Vec<usize>,
    /// The blocks, row by row; borrowed from the file mapping when unchanged.
    pub bytes: Cow<'a, [u8]>,
}

/// A GGUF file whose tensor data is memory-mapped.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    version: u32,
    metadata: Vec<(String, GgufValue)>,
    metadata_index: HashMap<String, usize>,
    tensors: Vec<GgufTensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: usize,
    data_start: usize,
}

impl GgufFile {
    /// Opens a GGUF file and parses its header, metadata and tensor infos.
    ///
    /// Checks the magic, the version, the alignment and that every tensor's
    /// data lies inside the file; tensor data is read only when requested.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the mapping is read-only. If another process truncates or
        // rewrites the file while it is mapped, reads may see the new bytes or
        // fault. Every memory-mapped checkpoint loader shares this risk, and
        // checkpoint files are not expected to change while a model loads.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let header = parse::parse(path, &mmap)?;
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            version: header.version,
            metadata_index: index_by_name(header.metadata.iter().map(|(key, _)| key.as_str())),
            metadata: header.metadata,
            tensor_index: index_by_name(header.tensors.iter().map(|info| info.name.as_str())),
            tensors: header.tensors,
            alignment: header.alignment,
            data_start: header.data_start,
        })
    }

    /// Returns the path the file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Returns the GGUF version, 2 or 3.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Returns the alignment of the data section and of each tensor's data.
    pub fn alignment(&self) -> usize {
        self.alignment
    }

    /// Returns the byte offset of the data section from the start of the file.
    pub fn data_start(&self) -> usize {
        self.data_start
    }

    /// Returns all metadata entries, in file order.
    pub fn metadata(&self) -> impl Iterator<Item = (&str, &GgufValue)> {
        self.metadata
            .iter()
            .map(|(key, value)| (key.as_str(), value))
    }

    /// Returns the metadata value stored under `key`.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata_index
            .get(key)
            .map(|&index| &self.metadata[index].1)
    }

    /// Returns the metadata value stored under `key`, or a [`Error::Config`] that names the key.
    pub fn require(&self, key: &str) -> Result<&GgufValue> {
        self.get(key).ok_or_else(|| Error::Config {
            origin: self.path.display().to_string(),
            message: format!("GGUF metadata key `{key}` is missing"),
        })
    }

    /// Returns the unsigned integer under `key`, `None` when the key is absent, or an error when
    /// the value has another type.
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>> {
        self.get_as(key, "a non-negative integer", GgufValue::as_u64)
    }

    /// Returns the number under `key` as f64, `None` when the key is absent, or an
    /// error when the value is not a number.
    pub fn get_f64(&self, key: &str) -> Result<Option<f64>> {
        self.get_as(key, "a number", GgufValue::as_f64)
    }

    /// Returns the bool under `key`, `None` when the key is absent, or an error when
    /// the value has another type.
    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        self.get_as(key, "a bool", GgufValue::as_bool)
    }

    /// Returns the string under `key`, `None` when the key is absent, or an error when
    /// the value has another type.
    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        self.get_as(key, "a string", GgufValue::as_str)
    }

    /// Returns the array of strings under `key`, `None` when the key is absent, or an error when
    /// the value has another type.
    pub fn get_string_array(&self, key: &str) -> Result<Option<Vec<&str>>> {
        self.get_as(key, "an array of strings", |value| {
            value.as_array()?.iter().map(GgufValue::as_str).collect()
        })
    }

    /// Returns the array of integers under `key`, `None` when the key is absent, or an error when
    /// the value has another type.
    pub fn get_i64_array(&self, key: &str) -> Result<Option<Vec<i64>>> {
        self.get_as(key, "an array of integers", |value| {
            value.as_array()?.iter().map(GgufValue::as_i64).collect()
        })
    }

    fn get_as<'a, T>(
        &'a self,
        key: &str,
        expected: &str,
        convert: impl FnOnce(&'a GgufValue) -> Option<T>,
    ) -> Result<Option<T>> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        match convert(value) {
            Some(converted) => Ok(Some(converted)),
            None => Err(Error::format(
                &self.path,
                format!(
                    "GGUF metadata key `{key}` holds a {} value, expected {expected}",
                    value.type_name()
                ),
            )),
        }
    }

    /// Returns the model architecture from `general.architecture`, such as `llama`.
    pub fn architecture(&self) -> Result<&str> {
        match self.get_str("general.architecture")? {
            Some(architecture) => Ok(architecture),
            None => Err(Error::Config {
                origin: self.path.display().to_string(),
                message: "GGUF metadata key `general.architecture` is missing".to_string(),
            }),
        }
    }

    /// Returns all tensor infos, in file order.
    pub fn tensor_infos(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    /// Returns the info of tensor `name`.
    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensor_index
            .get(name)
            .map(|&index| &self.tensors[index])
    }

    fn info_or_missing(&self, name: &str) -> Result<&GgufTensorInfo> {
        self.tensor_info(name)
            .ok_or_else(|| missing_tensor(self, name))
    }

    /// Returns the stored bytes of tensor `name`, borrowed from the mapping.
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let info = self.info_or_missing(name)?;
        // `parse` checked that this range lies inside the file.
        let start = self.data_start + info.offset as usize;
        Ok(&self.mmap[start..start + info.n_bytes])
    }

    /// Returns the stored type, shape and bytes of tensor `name`, without dequantizing.
    pub fn raw_tensor(&self, name: &str) -> Result<RawTensor<'_>> {
        let info = self.info_or_missing(name)?;
        Ok(RawTensor {
            ggml_type: info.ggml_type,
            shape: info.shape(),
            bytes: Cow::Borrowed(self.tensor_bytes(name)?),
        })
    }
}

impl WeightSource for GgufFile {
    fn origin(&self) -> String {
        format!("{} (GGUF)", self.path.display())
    }

    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.tensors.iter().map(|info| info.name.clone()).collect();
        names.sort();
        names
    }

    fn contains(&self, name: &str) -> bool {
        self.tensor_index.contains_key(name)
    }

    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.info_or_missing(name)?.shape())
    }

    /// Loads tensor `name`: F32 and F16 as stored, BF16 and the quantized
    /// types Q8_0, Q4_0 and Q4_1 dequantized to f32.
    fn tensor(&self, name: &str) -> Result<HostTensor> {
        let info = self.info_or_missing(name)?;
        let ty = info.ggml_type;
        if !ty.can_dequantize() {
            return Err(Error::Unsupported(format!(
                "{}: tensor `{name}` has GGML type {ty}, which is not supported; supported: {}",
                self.path.display(),
                quant::dequantizable_type_names()
            )));
        }

        let bytes = self.tensor_bytes(name)?;
        let data = if ty == GgmlType::F16 {
            HostData::F16(quant::dequantize_to_f16(ty, bytes, info.n_elements)?)
        } else {
            HostData::F32(quant::dequantize(ty, bytes, info.n_elements)?)
        };
        Ok(HostTensor::new(info.shape(), data)?)
    }
}

fn index_by_name<'a>(names: impl Iterator<Item = &'a str>) -> HashMap<String, usize> {
    names
        .enumerate()
        .map(|(index, name)| (name.to_string(), index))
        .collect()
}
