// LayerNorm and RMSNorm over the last axis, with their backward passes.
//
// x, dy, out, dx are [rows, cols]; weight and bias [cols]; mean and rstd
// [rows]. Forward and the dx pass run one workgroup per row. With
// x̂ = (x − mean) · rstd (mean = 0 for RMSNorm) and g = dy ⊙ w:
//   LayerNorm: out = x̂ w + b;  dx = rstd (g − mean(g) − x̂ mean(g ⊙ x̂))
//   RMSNorm:   out = x̂ w;      dx = rstd (g − x̂ mean(g ⊙ x̂))
// Weight gradients dw = Σ_rows dy ⊙ x̂ and db = Σ_rows dy come from
// `norm_param_partials` (thread per column, workgroup_id.y = block of
// rows) followed by reduce.wgsl's `column_final`.
//
// Bindings: layer_norm_forward   x, weight, bias -> out (4), mean (5), rstd (6)
//           rms_norm_forward     x, weight -> out (3), rstd (4)
//           norm_backward_dx     x, weight, mean, rstd, dy -> dx (6)
//           norm_param_partials  x, mean, rstd, dy -> dw partials (5), db partials (6)
// RMSNorm passes rstd in place of mean and CENTERED = false never reads it.

#include "reduce_workgroup.wgsl"

struct Params {
    rows: u32,
    cols: u32,
    eps: f32,
    // norm_param_partials: rows per block, and the first block of this chunk.
    rows_per_block: u32,
    block_offset: u32,
}

override WG: u32 = 256u;
override ONE_SUBGROUP: bool = false;
override HAS_BIAS: bool = false;
override CENTERED: bool = true;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> weight: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> ln_out: array<f32>;
@group(0) @binding(5) var<storage, read_write> ln_mean: array<f32>;
@group(0) @binding(6) var<storage, read_write> ln_rstd: array<f32>;
@group(0) @binding(3) var<storage, read_write> rms_out: array<f32>;
@group(0) @binding(4) var<storage, read_write> rms_rstd: array<f32>;
@group(0) @binding(3) var<storage, read> saved_mean: array<f32>;
@group(0) @binding(4) var<storage, read> saved_rstd: array<f32>;
@group(0) @binding(5) var<storage, read> dy: array<f32>;
@group(0) @binding(6) var<storage, read_write> dx: array<f32>;
@group(0) @binding(2) var<storage, read> partial_mean: array<f32>;
@group(0) @binding(3) var<storage, read> partial_rstd: array<f32>;
@group(0) @binding(4) var<storage, read> partial_dy: array<f32>;
@group(0) @binding(5) var<storage, read_write> dw_partials: array<f32>;
@group(0) @binding(6) var<storage, read_write> db_partials: array<f32>;

@compute @workgroup_size(WG)
fn layer_norm_forward(lane: Lane, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = wg.y * nwg.x + wg.x;
    let valid = row < params.rows;
    let base = row * params.cols;
    let cols = select(0u, params.cols, valid);
    let n = f32(params.cols);

    var total = 0.0;
    for (var c = lane.index; c < cols; c += WG) {
        total += x[base + c];
    }
    let mean = workgroup_sum(total, lane) / n;

    var squares = 0.0;
    for (var c = lane.index; c < cols; c += WG) {
        let centered = x[base + c] - mean;
        squares += centered * centered;
    }
    let rstd = 1.0 / sqrt(workgroup_sum(squares, lane) / n + params.eps);

    for (var c = lane.index; c < cols; c += WG) {
        var value = (x[base + c] - mean) * rstd * weight[c];
        if HAS_BIAS {
            value += bias[c];
        }
        ln_out[base + c] = value;
    }
    if valid && lane.index == 0u {
        ln_mean[row] = mean;
        ln_rstd[row] = rstd;
    }
}

@compute @workgroup_size(WG)
fn rms_norm_forward(lane: Lane, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = wg.y * nwg.x + wg.x;
    let valid = row < params.rows;
    let base = row * params.cols;
    let cols = select(0u, params.cols, valid);

    var squares = 0.0;
    for (var c = lane.index; c < cols; c += WG) {
        let value = x[base + c];
        squares += value * value;
    }
    let rstd = 1.0 / sqrt(workgroup_sum(squares, lane) / f32(params.cols) + params.eps);

    for (var c = lane.index; c < cols; c += WG) {
        rms_out[base + c] = x[base + c] * rstd * weight[c];
    }
    if valid && lane.index == 0u {
        rms_rstd[row] = rstd;
    }
}

@compute @workgroup_size(WG)
fn norm_backward_dx(lane: Lane, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = wg.y * nwg.x + wg.x;
    let valid = row < params.rows;
    let base = row * params.cols;
    let cols = select(0u, params.cols, valid);
    let n = f32(params.cols);
    var mean = 0.0;
    var rstd = 0.0;
    if valid {
        rstd = saved_rstd[row];
        if CENTERED {
            mean = saved_mean[row];
        }
    }

    var sum_g = 0.0;
    var sum_gx = 0.0;
    for (var c = lane.index; c < cols; c += WG) {
        let g = dy[base + c] * weight[c];
        sum_g += g;
        sum_gx += g * (x[base + c] - mean) * rstd;
    }
    var mean_g = 0.0;
    if CENTERED {
        mean_g = workgroup_sum(sum_g, lane) / n;
    }
    let mean_gx = workgroup_sum(sum_gx, lane) / n;

    for (var c = lane.index; c < cols; c += WG) {
        let g = dy[base + c] * weight[c];
        let normalized = (x[base + c] - mean) * rstd;
        dx[base + c] = rstd * (g - mean_g - normalized * mean_gx);
    }
}

const PARTIALS_WG: u32 = 64u;

@compute @workgroup_size(PARTIALS_WG)
fn norm_param_partials(@builtin(global_invocation_id) id: vec3<u32>, @builtin(workgroup_id) wg: vec3<u32>) {
    let col = id.x;
    let block = wg.y;
    if col >= params.cols {
        return;
    }
    let start = block * params.rows_per_block;
    let end = min(start + params.rows_per_block, params.rows);
    var dw = 0.0;
    var db = 0.0;
    for (var row = start; row < end; row++) {
        let grad = partial_dy[row * params.cols + col];
        var mean = 0.0;
        if CENTERED {
            mean = partial_mean[row];
        }
        dw += grad * (x[row * params.cols + col] - mean) * partial_rstd[row];
        db += grad;
    }
    let slot = (params.block_offset + block) * params.cols + col;
    dw_partials[slot] = dw;
    if CENTERED {
        db_partials[slot] = db;
    }
}
