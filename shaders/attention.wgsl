// Fused scaled-dot-product attention, forward and backward, with causal,
// key-padding and Flamingo media masks and grouped-query heads.
//
// Shapes (B batch entries in this chunk, Tq queries, Tk keys, Hq query
// heads, Hkv key/value heads, D = HEAD_DIM, Dv = VALUE_DIM):
//   q, dq [B, Tq, Hq, D]; k, dk [B, Tk, Hkv, D]; v, dv [B, Tk, Hkv, Dv];
//   out, dout [B, Tq, Hq, Dv]; lse [B, Hq, Tq];
//   stats [B, Hq, Tq, 2] = (lse, Δ = dout · out) for the backward kernels.
// Query head h reads key/value head h / (Hq / Hkv).
//
// Query i may attend key j when every mask present allows it: causal:
// j ≤ i + (Tk − Tq); key padding: padding[b, j] ≠ 0; media:
// query_media[b, i] ≠ 0 and key_media[b, j] = query_media[b, i]. The masks
// are u32 arrays packed into one binding at the offsets in `params`,
// indexed by the batch entry of the whole tensor (first_batch + b).
//
// Forward: one thread per query row, walking every key with an online
// softmax (a running max and sum), so Tk has no limit. Keys and values are
// read by all threads of a workgroup at once (same b, head and key), which
// GPUs serve from cache and software rasterizers as one uniform load.
// A row with no allowed key gets exactly zero output and lse = −∞.
//
// Backward, with p = exp(scale q·k − lse) and ds = p (dout·v − Δ):
//   attention_delta: stats from lse, dout and out (one thread per row);
//   attention_dq:    dq_i = scale Σ_j ds k_j (one thread per query row);
//   attention_dkdv:  dv_j = Σ p dout_i, dk_j = scale Σ ds q_i over the
//                    queries of every head in j's group (one thread per key).
//
// Bindings: attention_forward  q, k, v, masks -> out (5), lse (6)
//           attention_delta    out, dout, lse -> stats (4)
//           attention_dq       q, k, v, dout, stats, masks -> dq (7)
//           attention_dkdv     q, k, v, dout, stats, masks -> dk (7), dv (8)

struct Params {
    batch: u32,
    tq: u32,
    tk: u32,
    hq: u32,
    hkv: u32,
    scale: f32,
    causal: u32,
    has_padding: u32,
    has_media: u32,
    padding_offset: u32,
    query_media_offset: u32,
    key_media_offset: u32,
    first_batch: u32,
}

const WG: u32 = 32u;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
@group(0) @binding(4) var<storage, read> masks: array<u32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;
@group(0) @binding(6) var<storage, read_write> lse_out: array<f32>;
// attention_delta
@group(0) @binding(1) var<storage, read> delta_out: array<f32>;
@group(0) @binding(2) var<storage, read> delta_dout: array<f32>;
@group(0) @binding(3) var<storage, read> delta_lse: array<f32>;
@group(0) @binding(4) var<storage, read_write> stats_out: array<f32>;
// attention_dq and attention_dkdv
@group(0) @binding(4) var<storage, read> dout: array<f32>;
@group(0) @binding(5) var<storage, read> stats: array<f32>;
@group(0) @binding(6) var<storage, read> grad_masks: array<u32>;
@group(0) @binding(7) var<storage, read_write> dq_or_dk: array<f32>;
@group(0) @binding(8) var<storage, read_write> dv_out: array<f32>;

fn negative_infinity() -> f32 {
    return bitcast<f32>(0xff800000u);
}

// Whether query i of batch entry b may attend key j. The forward and the
// backward kernels bind the packed masks at different slots, hence two copies.
fn allowed_forward(b: u32, i: u32, j: u32) -> bool {
    if params.causal != 0u && j > i + (params.tk - params.tq) {
        return false;
    }
    let global_b = params.first_batch + b;
    if params.has_padding != 0u && masks[params.padding_offset + global_b * params.tk + j] == 0u {
        return false;
    }
    if params.has_media != 0u {
        let image = masks[params.query_media_offset + global_b * params.tq + i];
        if image == 0u || masks[params.key_media_offset + global_b * params.tk + j] != image {
            return false;
        }
    }
    return true;
}

fn allowed_backward(b: u32, i: u32, j: u32) -> bool {
    if params.causal != 0u && j > i + (params.tk - params.tq) {
        return false;
    }
    let global_b = params.first_batch + b;
    if params.has_padding != 0u && grad_masks[params.padding_offset + global_b * params.tk + j] == 0u {
        return false;
    }
    if params.has_media != 0u {
        let image = grad_masks[params.query_media_offset + global_b * params.tq + i];
        if image == 0u || grad_masks[params.key_media_offset + global_b * params.tk + j] != image {
            return false;
        }
    }
    return true;
}

@compute @workgroup_size(WG)
fn attention_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = wg.x * WG + lid;
    let h = wg.y;
    let b = wg.z;
    if i >= params.tq {
        return;
    }
    let group = h / (params.hq / params.hkv);
    let q_base = ((b * params.tq + i) * params.hq + h) * HEAD_DIM;

    var query: array<f32, HEAD_DIM>;
    for (var d = 0u; d < HEAD_DIM; d++) {
        query[d] = q[q_base + d];
    }
    var acc: array<f32, VALUE_DIM>;
    var best = negative_infinity();
    var total = 0.0;

    for (var j = 0u; j < params.tk; j++) {
        if !allowed_forward(b, i, j) {
            continue;
        }
        let kv_row = (b * params.tk + j) * params.hkv + group;
        var score = 0.0;
        for (var d = 0u; d < HEAD_DIM; d++) {
            score += query[d] * k[kv_row * HEAD_DIM + d];
        }
        score *= params.scale;
        if score > best {
            // Rescale what was summed against the old max; exp(−∞) = 0 the first time.
            let correction = exp(best - score);
            total *= correction;
            for (var d = 0u; d < VALUE_DIM; d++) {
                acc[d] *= correction;
            }
            best = score;
        }
        let p = exp(score - best);
        total += p;
        for (var d = 0u; d < VALUE_DIM; d++) {
            acc[d] += p * v[kv_row * VALUE_DIM + d];
        }
    }

    let out_base = ((b * params.tq + i) * params.hq + h) * VALUE_DIM;
    let inverse = select(0.0, 1.0 / total, total > 0.0);
    for (var d = 0u; d < VALUE_DIM; d++) {
        out[out_base + d] = acc[d] * inverse;
    }
    lse_out[(b * params.hq + h) * params.tq + i] = select(negative_infinity(), best + log(total), total > 0.0);
}

@compute @workgroup_size(WG)
fn attention_delta(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = wg.x * WG + lid;
    let h = wg.y;
    let b = wg.z;
    if i >= params.tq {
        return;
    }
    let row = ((b * params.tq + i) * params.hq + h) * VALUE_DIM;
    var delta = 0.0;
    for (var d = 0u; d < VALUE_DIM; d++) {
        delta += delta_dout[row + d] * delta_out[row + d];
    }
    let slot = (b * params.hq + h) * params.tq + i;
    stats_out[slot * 2u] = delta_lse[slot];
    stats_out[slot * 2u + 1u] = delta;
}

@compute @workgroup_size(WG)
fn attention_dq(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = wg.x * WG + lid;
    let h = wg.y;
    let b = wg.z;
    if i >= params.tq {
        return;
    }
    let group = h / (params.hq / params.hkv);
    let row = (b * params.tq + i) * params.hq + h;
    let slot = (b * params.hq + h) * params.tq + i;
    let lse = stats[slot * 2u];
    let delta = stats[slot * 2u + 1u];

    var query: array<f32, HEAD_DIM>;
    for (var d = 0u; d < HEAD_DIM; d++) {
        query[d] = q[row * HEAD_DIM + d];
    }
    var grad_out: array<f32, VALUE_DIM>;
    for (var d = 0u; d < VALUE_DIM; d++) {
        grad_out[d] = dout[row * VALUE_DIM + d];
    }
    var dq: array<f32, HEAD_DIM>;

    // A row that attended nothing has lse = −∞ and zero gradient.
    let keys = select(0u, params.tk, lse > negative_infinity());
    for (var j = 0u; j < keys; j++) {
        if !allowed_backward(b, i, j) {
            continue;
        }
        let kv_row = (b * params.tk + j) * params.hkv + group;
        var score = 0.0;
        for (var d = 0u; d < HEAD_DIM; d++) {
            score += query[d] * k[kv_row * HEAD_DIM + d];
        }
        let p = exp(params.scale * score - lse);
        var dp = 0.0;
        for (var d = 0u; d < VALUE_DIM; d++) {
            dp += grad_out[d] * v[kv_row * VALUE_DIM + d];
        }
        let ds = p * (dp - delta);
        for (var d = 0u; d < HEAD_DIM; d++) {
            dq[d] += params.scale * ds * k[kv_row * HEAD_DIM + d];
        }
    }
    for (var d = 0u; d < HEAD_DIM; d++) {
        dq_or_dk[row * HEAD_DIM + d] = dq[d];
    }
}

@compute @workgroup_size(WG)
fn attention_dkdv(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let j = wg.x * WG + lid;
    let group = wg.y;
    let b = wg.z;
    if j >= params.tk {
        return;
    }
    let heads_per_group = params.hq / params.hkv;
    let kv_row = (b * params.tk + j) * params.hkv + group;

    var key: array<f32, HEAD_DIM>;
    for (var d = 0u; d < HEAD_DIM; d++) {
        key[d] = k[kv_row * HEAD_DIM + d];
    }
    var value: array<f32, VALUE_DIM>;
    for (var d = 0u; d < VALUE_DIM; d++) {
        value[d] = v[kv_row * VALUE_DIM + d];
    }
    var dk: array<f32, HEAD_DIM>;
    var dv: array<f32, VALUE_DIM>;

    for (var h = group * heads_per_group; h < (group + 1u) * heads_per_group; h++) {
        for (var i = 0u; i < params.tq; i++) {
            if !allowed_backward(b, i, j) {
                continue;
            }
            let slot = (b * params.hq + h) * params.tq + i;
            let lse = stats[slot * 2u];
            if !(lse > negative_infinity()) {
                continue;
            }
            let delta = stats[slot * 2u + 1u];
            let row = (b * params.tq + i) * params.hq + h;
            var score = 0.0;
            for (var d = 0u; d < HEAD_DIM; d++) {
                score += q[row * HEAD_DIM + d] * key[d];
            }
            let p = exp(params.scale * score - lse);
            var dp = 0.0;
            for (var d = 0u; d < VALUE_DIM; d++) {
                let g = dout[row * VALUE_DIM + d];
                dv[d] += p * g;
                dp += g * value[d];
            }
            let ds = p * (dp - delta);
            for (var d = 0u; d < HEAD_DIM; d++) {
                dk[d] += params.scale * ds * q[row * HEAD_DIM + d];
            }
        }
    }
    for (var d = 0u; d < HEAD_DIM; d++) {
        dq_or_dk[kv_row * HEAD_DIM + d] = dk[d];
    }
    for (var d = 0u; d < VALUE_DIM; d++) {
        dv_out[kv_row * VALUE_DIM + d] = dv[d];
    }
}
