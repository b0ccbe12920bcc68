// Softmax over the last axis and its backward.
//
// x, y, dy, dx are [rows, cols]; one workgroup per row, its threads
// striding over the columns. y = exp(x − max) / Σ exp(x − max);
// dx = y ⊙ (dy − Σ dy ⊙ y). Rows are counted in this chunk of the tensor.
//
// Bindings: softmax_forward  x -> y (2); softmax_backward  y, dy -> dx (3).

#include "reduce_workgroup.wgsl"

struct Params {
    rows: u32,
    cols: u32,
}

override WG: u32 = 256u;
override ONE_SUBGROUP: bool = false;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y_out: array<f32>;
@group(0) @binding(2) var<storage, read> dy: array<f32>;
@group(0) @binding(3) var<storage, read_write> dx: array<f32>;

@compute @workgroup_size(WG)
fn softmax_forward(lane: Lane, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = wg.y * nwg.x + wg.x;
    // Rows past the end still take part in the reductions' barriers.
    let valid = row < params.rows;
    let base = row * params.cols;
    let cols = select(0u, params.cols, valid);

    var best = -3.4028235e38;
    for (var c = lane.index; c < cols; c += WG) {
        best = max(best, x[base + c]);
    }
    best = workgroup_max(best, lane);

    var total = 0.0;
    for (var c = lane.index; c < cols; c += WG) {
        total += exp(x[base + c] - best);
    }
    total = workgroup_sum(total, lane);

    for (var c = lane.index; c < cols; c += WG) {
        y_out[base + c] = exp(x[base + c] - best) / total;
    }
}

@compute @workgroup_size(WG)
fn softmax_backward(lane: Lane, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = wg.y * nwg.x + wg.x;
    let valid = row < params.rows;
    let base = row * params.cols;
    let cols = select(0u, params.cols, valid);

    var dot = 0.0;
    for (var c = lane.index; c < cols; c += WG) {
        dot += dy[base + c] * x[base + c];
    }
    dot = workgroup_sum(dot, lane);

    for (var c = lane.index; c < cols; c += WG) {
        dx[base + c] = x[base + c] * (dy[base + c] - dot);
    }
}
