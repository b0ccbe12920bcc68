// One AdamW step, in place, in PyTorch's order of operations:
//   p ← p (1 − lr λ); m ← β₁ m + (1 − β₁) g; v ← β₂ v + (1 − β₂) g²;
//   p ← p − lr (m / c₁) / (√(v / c₂) + ε)
// with the bias corrections c₁ = 1 − β₁ᵗ and c₂ = 1 − β₂ᵗ computed on the
// host in f32, as the CPU backend does. One thread per element.
//
// Bindings: grad (1, read), param (2), m (3), v (4), all read_write but grad.

struct Params {
    count: u32,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    correction1: f32,
    correction2: f32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> grad: array<f32>;
@group(0) @binding(2) var<storage, read_write> param: array<f32>;
@group(0) @binding(3) var<storage, read_write> m: array<f32>;
@group(0) @binding(4) var<storage, read_write> v: array<f32>;

const WG: u32 = 256u;

@compute @workgroup_size(WG)
fn adamw_step(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = (wg.y * nwg.x + wg.x) * WG + lid;
    if i >= params.count {
        return;
    }
    let g = grad[i];
    var p = param[i] * (1.0 - params.lr * params.weight_decay);
    let first = params.beta1 * m[i] + (1.0 - params.beta1) * g;
    let second = params.beta2 * v[i] + (1.0 - params.beta2) * g * g;
    p -= params.lr * (first / params.correction1) / (sqrt(second / params.correction2) + params.eps);
    param[i] = p;
    m[i] = first;
    v[i] = second;
}
