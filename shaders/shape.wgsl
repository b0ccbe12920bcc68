// Copies that rearrange elements: row blocks (concat, narrow), axis
// permutation, and conversion between f32 and f16.
//
// copy_rows: for r < rows and c < width,
//   dst[r · dst_stride + dst_col + c] = src[r · src_stride + src_col + c]
//   (count = rows · width; one thread per element).
// permute: out is the input with axes reordered; `dims` are the output's
//   sizes and `strides` the input strides of the axis each output axis
//   reads (count = output elements, rank ≤ 8; one thread per element).
// cast_to_f16 / cast_to_f32: f16 tensors are stored as pairs of halves in
//   u32 words (element 2i in the low half), whichever the adapter's f16
//   support, so one thread converts one pair; count is in elements and an
//   odd last pair leaves its high half 0. f32 → f16 rounds to nearest, ties
//   to even, in integer arithmetic so every adapter rounds like the `half`
//   crate on the CPU.
//
// Bindings: src (1, read), dst (2, read_write).

struct CopyParams {
    count: u32,
    width: u32,
    src_stride: u32,
    src_col: u32,
    dst_stride: u32,
    dst_col: u32,
}

struct PermuteParams {
    count: u32,
    rank: u32,
    dims: array<vec4<u32>, 2>,
    strides: array<vec4<u32>, 2>,
}

@group(0) @binding(0) var<uniform> copy_params: CopyParams;
@group(0) @binding(0) var<uniform> permute_params: PermuteParams;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;
@group(0) @binding(1) var<storage, read> src_words: array<u32>;
@group(0) @binding(2) var<storage, read_write> dst_words: array<u32>;

#include "f16_bits.wgsl"

const WG: u32 = 256u;

fn element(workgroup: vec3<u32>, groups: vec3<u32>, local: u32) -> u32 {
    return (workgroup.y * groups.x + workgroup.x) * WG + local;
}

@compute @workgroup_size(WG)
fn copy_rows(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = element(wg, nwg, lid);
    if i >= copy_params.count {
        return;
    }
    let row = i / copy_params.width;
    let col = i % copy_params.width;
    dst[row * copy_params.dst_stride + copy_params.dst_col + col] = src[row * copy_params.src_stride + copy_params.src_col + col];
}

@compute @workgroup_size(WG)
fn permute(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = element(wg, nwg, lid);
    if i >= permute_params.count {
        return;
    }
    var rest = i;
    var source = 0u;
    for (var axis = permute_params.rank; axis > 0u; axis--) {
        let a = axis - 1u;
        let size = permute_params.dims[a / 4u][a % 4u];
        source += (rest % size) * permute_params.strides[a / 4u][a % 4u];
        rest /= size;
    }
    dst[i] = src[source];
}

@compute @workgroup_size(WG)
fn cast_to_f16(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let pair = element(wg, nwg, lid);
    let first = pair * 2u;
    if first >= copy_params.count {
        return;
    }
    let low = f16_bits(src[first]);
    var high = 0u;
    if first + 1u < copy_params.count {
        high = f16_bits(src[first + 1u]);
    }
    dst_words[pair] = low | (high << 16u);
}

@compute @workgroup_size(WG)
fn cast_to_f32(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let pair = element(wg, nwg, lid);
    let first = pair * 2u;
    if first >= copy_params.count {
        return;
    }
    let values = unpack2x16float(src_words[pair]);
    dst[first] = values.x;
    if first + 1u < copy_params.count {
        dst[first + 1u] = values.y;
    }
}
