// Dequantization of GGML blocks (GGUF tensors) into f32 or f16.
//
// `words` holds the raw little-endian bytes of whole blocks (four per u32,
// the first in the low byte). Element e lies in block e / BLOCK at byte
// (e / BLOCK) · TYPE_SIZE; within a block, per TYPE (the GGML type id):
//   0 F32: the value;  1 F16: the value;  30 BF16: bits << 16;
//   8 Q8_0 (34 bytes): f16 d, 32 × i8 q;         x = d · q[i]
//   2 Q4_0 (18 bytes): f16 d, 16 bytes of nibbles; x = d · (q[i] − 8)
//   3 Q4_1 (20 bytes): f16 d, f16 m, 16 bytes;     x = d · q[i] + m
// where byte j of the nibbles holds element j in its low and element j + 16
// in its high nibble. This is flamingo-kernels/src/quant.rs, the CPU
// reference, step for step, in f32 with one rounding per operation.
//
// dequantize_f32 writes one element per thread; dequantize_f16 writes one
// pair of halves (one u32 word) per thread, copying F16 data bit for bit
// and rounding everything else like the `half` crate. `count` is the
// number of elements in this chunk of whole blocks.
//
// Bindings: words -> out (2).

#include "f16_bits.wgsl"

struct Params {
    count: u32,
    // Always 0.0; see `scale_and_shift`.
    zero: f32,
}

override TYPE: u32 = 0u;
override BLOCK: u32 = 1u;
override TYPE_SIZE: u32 = 4u;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> words: array<u32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read_write> out_words: array<u32>;

const WG: u32 = 256u;

fn byte_at(offset: u32) -> u32 {
    return (words[offset / 4u] >> ((offset % 4u) * 8u)) & 0xffu;
}

// The 16 bits at an even byte offset.
fn half_bits_at(offset: u32) -> u32 {
    return (words[offset / 4u] >> ((offset % 4u) * 8u)) & 0xffffu;
}

fn half_at(offset: u32) -> f32 {
    return unpack2x16float(half_bits_at(offset)).x;
}

// d · q + m with the product rounded before the sum, as on the CPU. Without
// care a compiler may fuse the two into one FMA, which rounds once; the
// product passes through a select on a uniform it cannot see through.
fn scale_and_shift(d: f32, q: f32, m: f32) -> f32 {
    let product = select(d * q, params.zero, params.zero != 0.0);
    return product + m;
}

fn element(e: u32) -> f32 {
    let start = (e / BLOCK) * TYPE_SIZE;
    let j = e % BLOCK;
    switch TYPE {
        case 1u: { return half_at(start); }
        case 30u: { return bitcast<f32>(half_bits_at(start) << 16u); }
        case 8u: {
            let q = i32(byte_at(start + 2u + j) << 24u) >> 24u;
            return half_at(start) * f32(q);
        }
        case 2u: {
            let packed = byte_at(start + 2u + j % 16u);
            let q = select(packed & 0xfu, packed >> 4u, j >= 16u);
            return half_at(start) * f32(i32(q) - 8);
        }
        case 3u: {
            let packed = byte_at(start + 4u + j % 16u);
            let q = select(packed & 0xfu, packed >> 4u, j >= 16u);
            return scale_and_shift(half_at(start), f32(q), half_at(start + 2u));
        }
        default: { return bitcast<f32>(words[e]); }
    }
}

fn element_f16_bits(e: u32) -> u32 {
    if TYPE == 1u {
        return half_bits_at(e * 2u);
    }
    return f16_bits(element(e));
}

@compute @workgroup_size(WG)
fn dequantize_f32(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let e = (wg.y * nwg.x + wg.x) * WG + lid;
    if e < params.count {
        out[e] = element(e);
    }
}

@compute @workgroup_size(WG)
fn dequantize_f16(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let pair = (wg.y * nwg.x + wg.x) * WG + lid;
    let first = pair * 2u;
    if first >= params.count {
        return;
    }
    var word = element_f16_bits(first);
    if first + 1u < params.count {
        word |= element_f16_bits(first + 1u) << 16u;
    }
    out_words[pair] = word;
}
