//! Parsing of the GGUF header: metadata, tensor infos and the checks that
//! every tensor's data lies inside the file.

use std::collections::HashMap;
use std::path::Path;

use flamingo_kernels::quant::GgmlType;

use super::{GgufTensorInfo, GgufValue, DEFAULT_ALIGNMENT, SUPPORTED_GGUF_VERSIONS};
use crate::error::{Error, Result};

const GGUF_MAGIC: &[u8; 4] = b"GGUF";

/// GGML tensors have at most 4 dimensions.
const MAX_DIMS: u32 = 4;

/// Arrays nested deeper than this are rejected as corrupt.
const MAX_ARRAY_DEPTH: usize = 16;

/// Everything [`parse`] reads before the tensor data.
pub(super) struct Header {
    pub(super) version: u32,
    pub(super) metadata: Vec<(String, GgufValue)>,
    pub(super) tensors: Vec<GgufTensorInfo>,
    pub(super) alignment: usize,
    pub(super) data_start: usize,
}

/// Parses the header of a GGUF file held in `bytes` and checks the tensor extents.
pub(super) fn parse(path: &Path, bytes: &[u8]) -> Result<Header> {
    let mut reader = Reader { bytes, pos: 0 };
    let magic = reader
        .take(4)
        .map_err(|e| e.into_error(path, "the magic number"))?;
    if magic != GGUF_MAGIC {
        return Err(Error::format(
            path,
            format!(
                "not a GGUF file: it starts with bytes {:02X?}, expected {:02X?} (\"GGUF\")",
                magic, GGUF_MAGIC
            ),
        ));
    }
    let version = reader
        .u32()
        .map_err(|e| e.into_error(path, "the version"))?;
    check_version(path, version)?;

    let tensor_count = reader
        .u64()
        .map_err(|e| e.into_error(path, "the tensor count"))?;
    let kv_count = reader
        .u64()
        .map_err(|e| e.into_error(path, "the metadata entry count"))?;

    let mut metadata = Vec::new();
    let mut seen_keys = HashMap::new();
    for entry in 0..kv_count {
        let key = reader.string().map_err(|e| {
            e.into_error(
                path,
                &format!("the key of metadata entry {entry} of {kv_count}"),
            )
        })?;
        let value = reader
            .typed_value(0)
            .map_err(|e| e.into_error(path, &format!("the value of metadata key `{key}`")))?;
        if seen_keys.insert(key.clone(), ()).is_some() {
            return Err(Error::format(
                path,
                format!("metadata key `{key}` appears more than once"),
            ));
        }
        metadata.push((key, value));
    }

    let alignment = read_alignment(path, &metadata)?;

    let mut tensors = Vec::new();
    let mut seen_names = HashMap::new();
    for index in 0..tensor_count {
        let info = read_tensor_info(path, &mut reader, index, tensor_count)?;
        if seen_names.insert(info.name.clone(), ()).is_some() {
            return Err(Error::format(
                path,
                format!("tensor `{}` is listed more than once", info.name),
            ));
        }
        tensors.push(info);
    }

    let data_start = reader.pos.next_multiple_of(alignment);
    check_tensor_extents(path, bytes.len(), data_start, alignment, &tensors)?;
    Ok(Header {
        version,
        metadata,
        tensors,
        alignment,
        data_start,
    })
}

fn check_version(path: &Path, version: u32) -> Result<()> {
    if SUPPORTED_GGUF_VERSIONS.contains(&version) {
        return Ok(());
    }
    let swapped = version.swap_bytes();
    let reason = if version == 1 {
        "GGUF version 1 is not supported; convert the model again with a current llama.cpp"
            .to_string()
    } else if SUPPORTED_GGUF_VERSIONS.contains(&swapped) || swapped == 1 {
        format!("this is a big-endian GGUF file (version {swapped}), but only little-endian files are supported")
    } else {
        format!("GGUF version {version} is not supported; supported versions: 2, 3")
    };
    Err(Error::Unsupported(format!("{}: {reason}", path.display())))
}

/// Reads `general.alignment`, which must be a power of two.
fn read_alignment(path: &Path, metadata: &[(String, GgufValue)]) -> Result<usize> {
    let Some((_, value)) = metadata.iter().find(|(key, _)| key == "general.alignment") else {
        return Ok(DEFAULT_ALIGNMENT);
    };
    match value.as_u64() {
        Some(alignment) if alignment.is_power_of_two() && alignment <= 1 << 20 => Ok(alignment as usize),
        _ => Err(Error::format(
            path,
            format!("`general.alignment` is {value:?}, but it must be a power of two no larger than 2^20"),
        )),
    }
}

fn read_tensor_info(
    path: &Path,
    reader: &mut Reader<'_>,
    index: u64,
    count: u64,
) -> Result<GgufTensorInfo> {
    let what = format!("tensor info {index} of {count}");
    let name = reader.string().map_err(|e| e.into_error(path, &what))?;
    let what = format!("tensor info {index} of {count} (`{name}`)");
    let n_dims = reader.u32().map_err(|e| e.into_error(path, &what))?;
    if n_dims == 0 || n_dims > MAX_DIMS {
        return Err(Error::format(
            path,
            format!("tensor `{name}` has {n_dims} dimensions; GGUF tensors have 1 to {MAX_DIMS}"),
        ));
    }
    let mut dims = Vec::with_capacity(n_dims as usize);
    for _ in 0..n_dims {
        dims.push(reader.u64().map_err(|e| e.into_error(path, &what))?);
    }
    let type_id = reader.u32().map_err(|e| e.into_error(path, &what))?;
    let offset = reader.u64().map_err(|e| e.into_error(path, &what))?;

    let Some(ggml_type) = GgmlType::from_id(type_id) else {
        return Err(Error::Unsupported(format!(
            "{}: tensor `{name}` has GGML type id {type_id}, which this reader does not know \
             (a type newer than gguf-py 0.19.0, or a retired one)",
            path.display()
        )));
    };

    let n_elements = dims.iter().try_fold(1usize, |acc, &dim| {
        usize::try_from(dim)
            .ok()
            .and_then(|dim| acc.checked_mul(dim))
    });
    let Some(n_elements) = n_elements else {
        return Err(Error::format(
            path,
            format!("tensor `{name}` has dims {dims:?}, too many elements to address"),
        ));
    };
    if dims[0] % ggml_type.block_size() as u64 != 0 {
        return Err(Error::format(
            path,
            format!(
                "tensor `{name}` has rows of {} elements, which is not a multiple of the {ggml_type} block size {}",
                dims[0],
                ggml_type.block_size()
            ),
        ));
    }
    let n_bytes = ggml_type.byte_size(n_elements)?;
    Ok(GgufTensorInfo {
        name,
        dims,
        ggml_type,
        offset,
        n_elements,
        n_bytes,
    })
}

/// Checks that every tensor is aligned and that its data ends inside the file.
fn check_tensor_extents(
    path: &Path,
    file_len: usize,
    data_start: usize,
    alignment: usize,
    tensors: &[GgufTensorInfo],
) -> Result<()> {
    for info in tensors {
        if info.offset % alignment as u64 != 0 {
            return Err(Error::format(
                path,
                format!(
                    "tensor `{}` starts at offset {} of the data section, which is not a multiple of the alignment {alignment}",
                    info.name, info.offset
                ),
            ));
        }
        let end = (data_start as u64)
            .checked_add(info.offset)
            .and_then(|start| start.checked_add(info.n_bytes as u64));
        if end.is_none_or(|end| end > file_len as u64) {
            return Err(Error::format(
                path,
                format!(
                    "the file is truncated: tensor `{}` ({}, {} bytes at file offset {}) ends past the end of the file ({file_len} bytes); download the file again",
                    info.name,
                    info.ggml_type,
                    info.n_bytes,
                    data_start as u64 + info.offset
                ),
            ));
        }
    }
    Ok(())
}

/// The cause of a failed header read, which the caller turns into an [`Error`] with context.
enum ReadError {
    Truncated {
        at: usize,
        needed: u64,
        file_len: usize,
    },
    InvalidUtf8 {
        at: usize,
    },
    Invalid(String),
}

impl ReadError {
    fn into_error(self, path: &Path, what: &str) -> Error {
        let message = match self {
            ReadError::Truncated { at, needed, file_len } => format!(
                "the file is truncated: reading {what} at byte {at} needs {needed} bytes, but the file ends at byte {file_len}; download the file again"
            ),
            ReadError::InvalidUtf8 { at } => format!("{what}: the string at byte {at} is not valid UTF-8"),
            ReadError::Invalid(reason) => format!("{what}: {reason}"),
        };
        Error::format(path, message)
    }
}

/// A little-endian cursor over the file's bytes.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64) -> Result<&'a [u8], ReadError> {
        let remaining = (self.bytes.len() - self.pos) as u64;
        if n > remaining {
            return Err(ReadError::Truncated {
                at: self.pos,
                needed: n,
                file_len: self.bytes.len(),
            });
        }
        let slice = &self.bytes[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ReadError> {
        Ok(self
            .take(N as u64)?
            .try_into()
            .expect("take returns N bytes"))
    }

    fn u32(&mut self) -> Result<u32, ReadError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, ReadError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn string(&mut self) -> Result<String, ReadError> {
        let len = self.u64()?;
        let at = self.pos;
        let bytes = self.take(len)?;
        match std::str::from_utf8(bytes) {
            Ok(text) => Ok(text.to_string()),
            Err(_) => Err(ReadError::InvalidUtf8 { at }),
        }
    }

    /// Reads a u32 value type and then a value of that type.
    fn typed_value(&mut self, depth: usize) -> Result<GgufValue, ReadError> {
        let value_type = self.u32()?;
        self.value(value_type, depth)
    }

    fn value(&mut self, value_type: u32, depth: usize) -> Result<GgufValue, ReadError> {
        let value = match value_type {
            0 => GgufValue::U8(self.array::<1>()?[0]),
            1 => GgufValue::I8(i8::from_le_bytes(self.array()?)),
            2 => GgufValue::U16(u16::from_le_bytes(self.array()?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array()?)),
            4 => GgufValue::U32(self.u32()?),
            5 => GgufValue::I32(i32::from_le_bytes(self.array()?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array()?)),
            7 => match self.array::<1>()?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                other => {
                    return Err(ReadError::Invalid(format!(
                        "bool byte is {other}, expected 0 or 1"
                    )))
                }
            },
            8 => GgufValue::String(self.string()?),
            9 => self.array_value(depth)?,
            10 => GgufValue::U64(self.u64()?),
            11 => GgufValue::I64(i64::from_le_bytes(self.array()?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array()?)),
            other => {
                return Err(ReadError::Invalid(format!(
                    "unknown metadata value type {other}; GGUF defines types 0 to 12"
                )))
            }
        };
        Ok(value)
    }

    fn array_value(&mut self, depth: usize) -> Result<GgufValue, ReadError> {
        if depth >= MAX_ARRAY_DEPTH {
            return Err(ReadError::Invalid(format!(
                "arrays are nested more than {MAX_ARRAY_DEPTH} deep"
            )));
        }
        let element_type = self.u32()?;
        let count = self.u64()?;

        // Every element takes at least one byte, so a count larger than the
        // rest of the file means truncation. Checking this first avoids a huge
        // allocation for a corrupt count.
        let remaining = (self.bytes.len() - self.pos) as u64;
        if count > remaining {
            return Err(ReadError::Truncated {
                at: self.pos,
                needed: count,
                file_len: self.bytes.len(),
            });
        }
        let mut elements = Vec::with_capacity(count as usize);
        for _ in 0..count {
            elements.push(self.value(element_type, depth + 1)?);
        }
        Ok(GgufValue::Array(elements))
    }
}
