// Cross-entropy of logits against target ids, fused with the softmax.
//
// logits [rows, vocab], targets u32 [rows]; IGNORE (u32::MAX) marks a row
// with no loss. Forward (one workgroup per row) writes the loss and the
// log-sum-exp of each row and never a probability tensor:
//   lse = max + log Σ exp(x − max);  loss = lse − x[target], 0 if ignored.
// Backward (one thread per logit) rebuilds the softmax from lse:
//   dlogits = scale · exp(x − lse) − scale · [col = target], 0 if ignored.
//
// Bindings: cross_entropy_forward   logits, targets -> losses (3), lse (4)
//           cross_entropy_backward  logits, lse, targets -> dlogits (4)

#include "reduce_workgroup.wgsl"

struct Params {
    rows: u32,
    vocab: u32,
    scale: f32,
}

const IGNORE: u32 = 0xffffffffu;

override WG: u32 = 256u;
override ONE_SUBGROUP: bool = false;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> targets: array<u32>;
@group(0) @binding(3) var<storage, read_write> losses: array<f32>;
@group(0) @binding(4) var<storage, read_write> lse_out: array<f32>;
@group(0) @binding(2) var<storage, read> lse: array<f32>;
@group(0) @binding(3) var<storage, read> backward_targets: array<u32>;
@group(0) @binding(4) var<storage, read_write> dlogits: array<f32>;

@compute @workgroup_size(WG)
fn cross_entropy_forward(lane: Lane, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = wg.y * nwg.x + wg.x;
    let valid = row < params.rows;
    let base = row * params.vocab;
    let vocab = select(0u, params.vocab, valid);

    var best = -3.4028235e38;
    for (var c = lane.index; c < vocab; c += WG) {
        best = max(best, logits[base + c]);
    }
    best = workgroup_max(best, lane);

    var total = 0.0;
    for (var c = lane.index; c < vocab; c += WG) {
        total += exp(logits[base + c] - best);
    }
    total = workgroup_sum(total, lane);

    if valid && lane.index == 0u {
        let lse_row = best + log(total);
        lse_out[row] = lse_row;
        let target_id = targets[row];
        losses[row] = select(lse_row - logits[base + min(target_id, params.vocab - 1u)], 0.0, target_id == IGNORE);
    }
}

const BACKWARD_WG: u32 = 256u;

@compute @workgroup_size(BACKWARD_WG)
fn cross_entropy_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = (wg.y * nwg.x + wg.x) * BACKWARD_WG + lid;
    if i >= params.rows * params.vocab {
        return;
    }
    let row = i / params.vocab;
    let col = i % params.vocab;
    let target_id = backward_targets[row];
    if target_id == IGNORE {
        dlogits[i] = 0.0;
        return;
    }
    var value = params.scale * exp(logits[i] - lse[row]);
    if col == target_id {
        value -= params.scale;
    }
    dlogits[i] = value;
}
