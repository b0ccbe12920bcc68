// Sums: of all elements, of squares, of a product (a dot product), and of
// the rows of a matrix (sum over leading axes).
//
// Whole-tensor sums run in two passes so that the result does not depend
// on timing: `partial_sums` lets workgroup g sum its contiguous range of
// `per_group` elements into partials[offset + g]; `final_sum` adds the
// partials in one workgroup. Column sums of x [rows, cols] likewise:
// `column_partials` writes partials [blocks, cols], where block b sums rows
// b·rows_per_block onwards, and `column_final` adds the blocks of each
// column. Every addition happens in an order fixed by the sizes alone.
//
// Bindings: partial_sums   x, y (= x unless MODE is 2) -> partials (3)
//           final_sum      partials -> out (2)
//           column_partials x -> partials (2)
//           column_final   partials -> out (2)

#include "reduce_workgroup.wgsl"

struct Params {
    // partial_sums: elements in this chunk; final_sum: partials.
    count: u32,
    // partial_sums: elements per workgroup; column kernels: rows per block.
    per_group: u32,
    // partial_sums: first partial this chunk writes; column_partials: first block.
    offset: u32,
    // Column kernels: rows (or blocks) and columns.
    rows: u32,
    cols: u32,
}

override WG: u32 = 256u;
override ONE_SUBGROUP: bool = false;
// 0 sum, 1 sum of squares, 2 sum of x ⊙ y.
override MODE: u32 = 0u;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> y: array<f32>;
@group(0) @binding(3) var<storage, read_write> partials: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

fn term(i: u32) -> f32 {
    let value = x[i];
    switch MODE {
        case 1u: { return value * value; }
        case 2u: { return value * y[i]; }
        default: { return value; }
    }
}

@compute @workgroup_size(WG)
fn partial_sums(lane: Lane, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let group = wg.y * nwg.x + wg.x;
    let start = group * params.per_group;
    let end = min(start + params.per_group, params.count);
    var total = 0.0;
    for (var i = start + lane.index; i < end; i += WG) {
        total += term(i);
    }
    total = workgroup_sum(total, lane);
    if lane.index == 0u && start < params.count {
        partials[params.offset + group] = total;
    }
}

@compute @workgroup_size(WG)
fn final_sum(lane: Lane) {
    var total = 0.0;
    for (var i = lane.index; i < params.count; i += WG) {
        total += x[i];
    }
    total = workgroup_sum(total, lane);
    if lane.index == 0u {
        out[0] = total;
    }
}

@compute @workgroup_size(WG)
fn column_partials(@builtin(global_invocation_id) id: vec3<u32>, @builtin(workgroup_id) wg: vec3<u32>) {
    let col = id.x;
    let block = wg.y;
    if col >= params.cols {
        return;
    }
    let start = block * params.per_group;
    let end = min(start + params.per_group, params.rows);
    var total = 0.0;
    for (var row = start; row < end; row++) {
        total += x[row * params.cols + col];
    }
    out[(params.offset + block) * params.cols + col] = total;
}

@compute @workgroup_size(WG)
fn column_final(@builtin(global_invocation_id) id: vec3<u32>) {
    let col = id.x;
    if col >= params.cols {
        return;
    }
    var total = 0.0;
    for (var block = 0u; block < params.rows; block++) {
        total += x[block * params.cols + col];
    }
    out[col] = total;
}
