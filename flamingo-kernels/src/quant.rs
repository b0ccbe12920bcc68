//! GGML element types and their dequantization on the CPU.
//!
//! This is the reference for the GPU dequantization kernel, so every step is
//! written out plainly. The arithmetic is done in f32 in
//! the order shown below, with no fused multiply-add, which is also what
//! gguf-py 0.19.0's numpy dequantization computes.
//!
//! A GGML tensor is stored as a sequence of blocks. All multi-byte fields are
//! little-endian. `f16` is IEEE 754 half precision, widened to f32 before use.
//!
//! | type | elements per block | bytes per block | block layout | element `i` |
//! |------|-----|----|--------------|-------------|
//! | F32  | 1   | 4  | `f32` | the value |
//! | F16  | 1   | 2  | `f16` | the value |
//! | BF16 | 1   | 2  | the upper 16 bits of an f32 | `f32::from_bits(bits << 16)` |
//! | Q8_0 | 32  | 34 | `f16 d`, then 32 `i8 q` | `d * q[i]` |
//! | Q4_0 | 32  | 18 | `f16 d`, then 16 bytes of 4-bit `q` | `d * (q[i] - 8)` |
//! | Q4_1 | 32  | 20 | `f16 d`, `f16 m`, then 16 bytes of 4-bit `q` | `d * q[i] + m` |
//!
//! In Q4_0 and Q4_1, byte `j` of the 16 packed bytes stores element `j` in its
//! low nibble and element `j + 16` in its high nibble. So the low nibbles are
//! elements 0..16 and the high nibbles are elements 16..32, not interleaved.
//!
//! The other GGML types are known by id, name and block size, so a file that
//! contains them can be read and its errors can name the type, but
//! [`dequantize`] rejects them.

use half::f16;
use rayon::prelude::*;

use crate::error::{shape_err, value_err, Error, Result};

/// A GGML tensor element type, as stored in GGUF tensor infos.
///
/// The variant names are the ones llama.cpp and gguf-py print, so that they can
/// be searched for. Type ids that GGML has retired (4, 5, 31 to 33, 36 to 38)
/// have no variant.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
    NVFP4,
    Q1_0,
}

/// Id, name, elements per block and bytes per block of every known type, from
/// `GGML_QUANT_SIZES` and `GGMLQuantizationType` in gguf-py 0.19.0.
const TYPE_TABLE: [(GgmlType, u32, &str, usize, usize); 34] = [
    (GgmlType::F32, 0, "F32", 1, 4),
    (GgmlType::F16, 1, "F16", 1, 2),
    (GgmlType::Q4_0, 2, "Q4_0", 32, 18),
    (GgmlType::Q4_1, 3, "Q4_1", 32, 20),
    (GgmlType::Q5_0, 6, "Q5_0", 32, 22),
    (GgmlType::Q5_1, 7, "Q5_1", 32, 24),
    (GgmlType::Q8_0, 8, "Q8_0", 32, 34),
    (GgmlType::Q8_1, 9, "Q8_1", 32, 40),
    (GgmlType::Q2_K, 10, "Q2_K", 256, 84),
    (GgmlType::Q3_K, 11, "Q3_K", 256, 110),
    (GgmlType::Q4_K, 12, "Q4_K", 256, 144),
    (GgmlType::Q5_K, 13, "Q5_K", 256, 176),
    (GgmlType::Q6_K, 14, "Q6_K", 256, 210),
    (GgmlType::Q8_K, 15, "Q8_K", 256, 292),
    (GgmlType::IQ2_XXS, 16, "IQ2_XXS", 256, 66),
    (GgmlType::IQ2_XS, 17, "IQ2_XS", 256, 74),
    (GgmlType::IQ3_XXS, 18, "IQ3_XXS", 256, 98),
    (GgmlType::IQ1_S, 19, "IQ1_S", 256, 50),
    (GgmlType::IQ4_NL, 20, "IQ4_NL", 32, 18),
    (GgmlType::IQ3_S, 21, "IQ3_S", 256, 110),
    (GgmlType::IQ2_S, 22, "IQ2_S", 256, 82),
    (GgmlType::IQ4_XS, 23, "IQ4_XS", 256, 136),
    (GgmlType::I8, 24, "I8", 1, 1),
    (GgmlType::I16, 25, "I16", 1, 2),
    (GgmlType::I32, 26, "I32", 1, 4),
    (GgmlType::I64, 27, "I64", 1, 8),
    (GgmlType::F64, 28, "F64", 1, 8),
    (GgmlType::IQ1_M, 29, "IQ1_M", 256, 56),
    (GgmlType::BF16, 30, "BF16", 1, 2),
    (GgmlType::TQ1_0, 34, "TQ1_0", 256, 54),
    (GgmlType::TQ2_0, 35, "TQ2_0", 256, 66),
    (GgmlType::MXFP4, 39, "MXFP4", 32, 17),
    (GgmlType::NVFP4, 40, "NVFP4", 64, 36),
    (GgmlType::Q1_0, 41, "Q1_0", 128, 18),
];

/// The types [`dequantize`] accepts, in the order messages list them.
pub const DEQUANTIZABLE_TYPES: [GgmlType; 6] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
];

/// Tensors with at least this many elements are dequantized on the rayon pool.
const PARALLEL_MIN_ELEMENTS: usize = 1 << 16;

/// Elements per rayon task: a multiple of every block size above.
const PARALLEL_CHUNK_ELEMENTS: usize = 1 << 14;

impl GgmlType {
    fn table_row(self) -> &'static (GgmlType, u32, &'static str, usize, usize) {
        TYPE_TABLE
            .iter()
            .find(|row| row.0 == self)
            .expect("every GgmlType variant has a row in TYPE_TABLE")
    }

    /// Looks up a GGML type id; `None` for ids that are unknown or retired.
    pub fn from_id(id: u32) -> Option<Self> {
        TYPE_TABLE.iter().find(|row| row.1 == id).map(|row| row.0)
    }

    /// Looks up a type by its GGML name (`"Q4_1"`, `"q6_k"`), ignoring case.
    pub fn from_name(name: &str) -> Option<Self> {
        TYPE_TABLE
            .iter()
            .find(|row| row.2.eq_ignore_ascii_case(name))
            .map(|row| row.0)
    }

    /// Returns the numeric id stored in GGUF tensor infos.
    pub fn id(self) -> u32 {
        self.table_row().1
    }

    /// Returns the GGML name, such as `Q4_1` or `Q6_K`.
    pub fn name(self) -> &'static str {
        self.table_row().2
    }

    /// Returns the number of elements in one block (1 for plain float and integer types).
    pub fn block_size(self) -> usize {
        self.table_row().3
    }

    /// Returns the number of bytes in one block.
    pub fn type_size(self) -> usize {
        self.table_row().4
    }

    /// Returns whether [`dequantize`] accepts this type.
    pub fn can_dequantize(self) -> bool {
        DEQUANTIZABLE_TYPES.contains(&self)
    }

    /// Computes the number of bytes that `n_elements` elements occupy.
    ///
    /// Fails when `n_elements` is not a whole number of blocks, or when the
    /// size overflows `usize`.
    pub fn byte_size(self, n_elements: usize) -> Result<usize> {
        let block_size = self.block_size();
        if !n_elements.is_multiple_of(block_size) {
            return Err(value_err!(
                "GgmlType::byte_size",
                "{n_elements} elements are not a whole number of {self} blocks of {block_size} elements"
            ));
        }
        (n_elements / block_size)
            .checked_mul(self.type_size())
            .ok_or_else(|| {
                value_err!(
                    "GgmlType::byte_size",
                    "{n_elements} elements of {self} overflow usize"
                )
            })
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Returns the names of [`DEQUANTIZABLE_TYPES`] as a comma-separated list, for messages.
pub fn dequantizable_type_names() -> String {
    DEQUANTIZABLE_TYPES.map(GgmlType::name).join(", ")
}

/// Dequantizes `n_elements` elements of type `ty` from `bytes` into f32.
///
/// `bytes` must contain exactly the blocks of `n_elements` elements. The output is
/// in storage order: for a GGUF tensor with dims `ne`, element `ne[0]` varies
/// fastest, which is row-major order for the reversed dims.
pub fn dequantize(ty: GgmlType, bytes: &[u8], n_elements: usize) -> Result<Vec<f32>> {
    check_input(ty, bytes, n_elements)?;
    let mut out = vec![0.0f32; n_elements];
    dequantize_checked(ty, bytes, &mut out);
    Ok(out)
}

/// Dequantizes `bytes` of type `ty` into `out`, which fixes the element count.
pub fn dequantize_into(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    check_input(ty, bytes, out.len())?;
    dequantize_checked(ty, bytes, out);
    Ok(())
}

/// Dequantizes on the rayon pool when `out` is large; the caller has checked the sizes.
fn dequantize_checked(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    if out.len() < PARALLEL_MIN_ELEMENTS {
        dequantize_serial(ty, bytes, out);
        return;
    }

    // A chunk of PARALLEL_CHUNK_ELEMENTS elements is a whole number of blocks
    // for every supported type, so each task starts on a block boundary.
    let chunk_bytes = PARALLEL_CHUNK_ELEMENTS / ty.block_size() * ty.type_size();
    out.par_chunks_mut(PARALLEL_CHUNK_ELEMENTS)
        .zip(bytes.par_chunks(chunk_bytes))
        .for_each(|(out_chunk, byte_chunk)| dequantize_serial(ty, byte_chunk, out_chunk));
}

/// Dequantizes `n_elements` elements of type `ty` from `bytes` into f16.
///
/// F16 data is copied bit for bit. Every other type is dequantized to f32 as in
/// [`dequantize`] and then rounded to the nearest f16.
pub fn dequantize_to_f16(ty: GgmlType, bytes: &[u8], n_elements: usize) -> Result<Vec<f16>> {
    check_input(ty, bytes, n_elements)?;
    let mut out = vec![f16::ZERO; n_elements];

    let convert_chunk = |byte_chunk: &[u8], out_chunk: &mut [f16]| {
        if ty == GgmlType::F16 {
            for (value, pair) in out_chunk.iter_mut().zip(byte_chunk.chunks_exact(2)) {
                *value = f16::from_le_bytes([pair[0], pair[1]]);
            }
            return;
        }
        let mut scratch = vec![0.0f32; out_chunk.len()];
        dequantize_serial(ty, byte_chunk, &mut scratch);
        for (value, &wide) in out_chunk.iter_mut().zip(&scratch) {
            *value = f16::from_f32(wide);
        }
    };

    if n_elements < PARALLEL_MIN_ELEMENTS {
        convert_chunk(bytes, &mut out);
    } else {
        let chunk_bytes = PARALLEL_CHUNK_ELEMENTS / ty.block_size() * ty.type_size();
        out.par_chunks_mut(PARALLEL_CHUNK_ELEMENTS)
            .zip(bytes.par_chunks(chunk_bytes))
            .for_each(|(out_chunk, byte_chunk)| convert_chunk(byte_chunk, out_chunk));
    }
    Ok(out)
}

/// Checks that `ty` is supported and that `bytes` is exactly `n_elements` elements long.
fn check_input(ty: GgmlType, bytes: &[u8], n_elements: usize) -> Result<()> {
    if !ty.can_dequantize() {
        return Err(Error::Unsupported {
            op: "dequantize",
            backend: "cpu".to_string(),
            reason: format!(
                "GGML type {ty} cannot be dequantized yet; supported types: {}",
                dequantizable_type_names()
            ),
        });
    }

    let expected = ty.byte_size(n_elements).map_err(|_| {
        shape_err!(
            "dequantize",
            "{n_elements} elements are not a whole number of {ty} blocks of {} elements",
            ty.block_size()
        )
    })?;
    if bytes.len() != expected {
        return Err(shape_err!(
            "dequantize",
            "{n_elements} elements of {ty} take {expected} bytes ({} blocks of {} bytes), but {} bytes were given",
            n_elements / ty.block_size(),
            ty.type_size(),
            bytes.len()
        ));
    }
    Ok(())
}

/// Dequantizes on the calling thread; the caller has checked the sizes.
fn dequantize_serial(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    match ty {
        GgmlType::F32 => {
            for (value, word) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *value = f32::from_le_bytes([word[0], word[1], word[2], word[3]]);
            }
        }
        GgmlType::F16 => {
            for (value, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *value = f16::from_le_bytes([pair[0], pair[1]]).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (value, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                let bits = u16::from_le_bytes([pair[0], pair[1]]);
                *value = f32::from_bits(u32::from(bits) << 16);
            }
        }
        GgmlType::Q8_0 => {
            for (values, block) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(34)) {
                dequantize_block_q8_0(block, values);
            }
        }
        GgmlType::Q4_0 => {
            for (values, block) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(18)) {
                dequantize_block_q4_0(block, values);
            }
        }
        GgmlType::Q4_1 => {
            for (values, block) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(20)) {
                dequantize_block_q4_1(block, values);
            }
        }
        _ => unreachable!("check_input rejects {ty}"),
    }
}

fn read_f16(bytes: &[u8], offset: usize) -> f32 {
    f16::from_le_bytes([bytes[offset], bytes[offset + 1]]).to_f32()
}

/// Q8_0: `f16 d`, 32 × `i8 q`; element i is `d * q[i]`.
fn dequantize_block_q8_0(block: &[u8], out: &mut [f32]) {
    let d = read_f16(block, 0);
    for (value, &q) in out.iter_mut().zip(&block[2..34]) {
        *value = d * f32::from(q as i8);
    }
}

/// Q4_0: `f16 d`, 16 bytes of nibbles; element i is `d * (q[i] - 8)`.
fn dequantize_block_q4_0(block: &[u8], out: &mut [f32]) {
    let d = read_f16(block, 0);
    let packed = &block[2..18];
    for j in 0..16 {
        let low = i32::from(packed[j] & 0x0F) - 8;
        let high = i32::from(packed[j] >> 4) - 8;
        out[j] = d * low as f32;
        out[j + 16] = d * high as f32;
    }
}

/// Q4_1: `f16 d`, `f16 m`, 16 bytes of nibbles; element i is `d * q[i] + m`.
fn dequantize_block_q4_1(block: &[u8], out: &mut [f32]) {
    let d = read_f16(block, 0);
    let m = read_f16(block, 2);
    let packed = &block[4..20];
    for j in 0..16 {
        let low = f32::from(packed[j] & 0x0F);
        let high = f32::from(packed[j] >> 4);
        out[j] = d * low + m;
        out[j + 16] = d * high + m;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16_bytes(value: f32) -> [u8; 2] {
        f16::from_f32(value).to_le_bytes()
    }

    #[test]
    fn type_ids_round_trip() {
        for &(ty, id, name, _, _) in &TYPE_TABLE {
            assert_eq!(GgmlType::from_id(id), Some(ty));
            assert_eq!(ty.id(), id);
            assert_eq!(ty.name(), name);
            assert_eq!(GgmlType::from_name(name), Some(ty));
        }
        assert_eq!(GgmlType::from_id(4), None, "Q4_2 was retired");
        assert_eq!(GgmlType::from_id(1000), None);
    }

    #[test]
    fn q8_0_block_by_hand() {
        let mut block = Vec::new();
        block.extend_from_slice(&f16_bytes(0.5));
        for i in 0..32i8 {
            block.push((i - 16) as u8);
        }
        let values = dequantize(GgmlType::Q8_0, &block, 32).unwrap();
        for (i, &value) in values.iter().enumerate() {
            assert_eq!(value, 0.5 * (i as f32 - 16.0), "element {i}");
        }
    }

    #[test]
    fn q4_0_nibble_order() {
        // Byte j stores q = j in the low nibble and q = 15 - j in the high one.
        let mut block = Vec::new();
        block.extend_from_slice(&f16_bytes(2.0));
        for j in 0..16u8 {
            block.push(j | ((15 - j) << 4));
        }
        let values = dequantize(GgmlType::Q4_0, &block, 32).unwrap();
        for j in 0..16 {
            assert_eq!(values[j], 2.0 * (j as f32 - 8.0), "low nibble, element {j}");
            assert_eq!(
                values[j + 16],
                2.0 * (7.0 - j as f32),
                "high nibble, element {}",
                j + 16
            );
        }
    }

    #[test]
    fn q4_1_scale_and_min() {
        let mut block = Vec::new();
        block.extend_from_slice(&f16_bytes(0.25));
        block.extend_from_slice(&f16_bytes(-1.0));
        for j in 0..16u8 {
            block.push(j | ((15 - j) << 4));
        }
        let values = dequantize(GgmlType::Q4_1, &block, 32).unwrap();
        for j in 0..16 {
            assert_eq!(values[j], 0.25 * j as f32 - 1.0, "element {j}");
            assert_eq!(
                values[j + 16],
                0.25 * (15 - j) as f32 - 1.0,
                "element {}",
                j + 16
            );
        }
    }

    #[test]
    fn bf16_is_upper_half_of_f32() {
        let value = -3.140625f32;
        let bits = (value.to_bits() >> 16) as u16;
        let values = dequantize(GgmlType::BF16, &bits.to_le_bytes(), 1).unwrap();
        assert_eq!(values, vec![value]);
    }

    #[test]
    fn parallel_matches_serial() {
        // Several rayon chunks plus a partial one.
        let n_blocks = 3 * PARALLEL_CHUNK_ELEMENTS / 32 + 7;
        let bytes: Vec<u8> = (0..n_blocks * 20)
            .map(|i| {
                if i % 20 == 1 || i % 20 == 3 {
                    0x3C
                } else {
                    (i * 37 % 251) as u8
                }
            })
            .collect();
        let n_elements = n_blocks * 32;
        let parallel = dequantize(GgmlType::Q4_1, &bytes, n_elements).unwrap();
        let mut serial = vec![0.0; n_elements];
        dequantize_serial(GgmlType::Q4_1, &bytes, &mut serial);
        assert_eq!(parallel, serial);

        let halves = dequantize_to_f16(GgmlType::Q4_1, &bytes, n_elements).unwrap();
        let rounded: Vec<f16> = serial.iter().map(|&v| f16::from_f32(v)).collect();
        assert_eq!(halves, rounded);
    }

    #[test]
    fn wrong_byte_count_is_rejected() {
        let error = dequantize(GgmlType::Q4_1, &[0u8; 38], 64)
            .unwrap_err()
            .to_string();
        assert!(error.contains("40 bytes"), "{error}");
        assert!(error.contains("38 bytes were given"), "{error}");
    }

    #[test]
    fn partial_block_is_rejected() {
        let error = dequantize(GgmlType::Q8_0, &[0u8; 34], 31)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("not a whole number of Q8_0 blocks"),
            "{error}"
        );
    }

    #[test]
    fn unsupported_type_is_named() {
        let error = dequantize(GgmlType::Q6_K, &[0u8; 210], 256)
            .unwrap_err()
            .to_string();
        assert!(error.contains("Q6_K"), "{error}");
        assert!(
            error.contains("F32, F16, BF16, Q8_0, Q4_0, Q4_1"),
            "{error}"
        );
    }
}
