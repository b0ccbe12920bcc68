// Elementwise kernels: arithmetic, broadcasting, activations and their
// backward passes, the SiLU-gated product and the tanh-gated residual.
//
// Shapes: every tensor is a flat f32 array of `params.count` elements
// (a chunk of a larger tensor when the host splits it), except
// `broadcast_add`'s y, which repeats with period `params.period`, and the
// one-element gate of the tanh-gate kernels. One thread per element; the
// host launches a 2-D grid of 256-thread workgroups when one dimension is
// not enough.
//
// Bindings: 0 is the uniform `params`; inputs come next in the order listed
// per entry point, then outputs, so a binding number names a different
// variable in different entry points:
//
//   binary               x, y          -> out3       out = x (op) y
//   scale                x             -> out2       out = alpha x
//   axpy                 x             -> inout2     inout += alpha x
//   scale_assign                          inout1     inout *= alpha
//   broadcast_add        x, y          -> out3       out = x + y[i % period]
//   activation_forward   x             -> out2       out = act(x)
//   activation_backward  x, y (dy)     -> out3       out = dy act'(x)
//   silu_mul             x (gate), y (up) -> out3    out = silu(gate) up
//   silu_mul_backward    x, y, z (dy)  -> out4 (dgate), out5 (dup)
//   tanh_gate_add        x, y, z (gate) -> out4      out = x + tanh(gate) y
//   tanh_gate_scale      x (dout), y (gate) -> out3  out = tanh(gate) dout
//   tanh_gate_grad       x (dot), y (gate) -> out3   out[0] = (1 - tanh²(gate)) dot[0]

#include "activation.wgsl"

struct Params {
    count: u32,
    alpha: f32,
    period: u32,
}

// 0 add, 1 subtract, 2 multiply: `Binary` on the host.
override BINARY_OP: u32 = 0u;
// An activation kind of activation.wgsl.
override ACT: u32 = 0u;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> y: array<f32>;
@group(0) @binding(3) var<storage, read> z: array<f32>;
@group(0) @binding(1) var<storage, read_write> inout1: array<f32>;
@group(0) @binding(2) var<storage, read_write> inout2: array<f32>;
@group(0) @binding(2) var<storage, read_write> out2: array<f32>;
@group(0) @binding(3) var<storage, read_write> out3: array<f32>;
@group(0) @binding(4) var<storage, read_write> out4: array<f32>;
@group(0) @binding(5) var<storage, read_write> out5: array<f32>;

const WG: u32 = 256u;

fn element(workgroup: vec3<u32>, groups: vec3<u32>, local: u32) -> u32 {
    return (workgroup.y * groups.x + workgroup.x) * WG + local;
}

@compute @workgroup_size(WG)
fn binary(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = element(wg, nwg, lid);
    if i >= params.count {
        return;
    }
    let a = x[i];
    let b = y[i];
    var value: f32;
    switch BINARY_OP {
        case 1u: { value = a - b; }
        case 2u: { value = a * b; }
        default: { value = a + b; }
    }
    out3[i] = value;
}

@compute @workgroup_size(WG)
fn scale(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = element(wg, nwg, lid);
    if i < params.count {
        out2[i] = params.alpha * x[i];
    }
}

@compute @workgroup_size(WG)
fn axpy(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = element(wg, nwg, lid);
    if i < params.count {
        inout2[i] += params.alpha * x[i];
    }
}

@compute @workgroup_size(WG)
fn scale_assign(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = element(wg, nwg, lid);
    if i < params.count {
        inout1[i] *= params.alpha;
    }
}

@compute @workgroup_size(WG)
fn broadcast_add(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = element(wg, nwg, lid);
    if i < params.count {
        out3[i] = x[i] + y[i % params.period];
    }
}

@compute @workgroup_size(WG)
fn activation_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = element(wg, nwg, lid);
    if i < params.count {
        out2[i] = activate(x[i], ACT);
    }
}

@compute @workgroup_size(WG)
fn activation_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = element(wg, nwg, lid);
    if i < params.count {
        out3[i] = y[i] * activate_derivative(x[i], ACT);
    }
}

@compute @workgroup_size(WG)
fn silu_mul(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = element(wg, nwg, lid);
    if i < params.count {
        out3[i] = y[i] * activate(x[i], 6u);
    }
}

@compute @workgroup_size(WG)
fn silu_mul_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = element(wg, nwg, lid);
    if i < params.count {
        let gate = x[i];
        let dy = z[i];
        out4[i] = dy * (y[i] * activate_derivative(gate, 6u));
        out5[i] = dy * activate(gate, 6u);
    }
}

@compute @workgroup_size(WG)
fn tanh_gate_add(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = element(wg, nwg, lid);
    if i < params.count {
        out4[i] = x[i] + tanh_clamped(z[0]) * y[i];
    }
}

@compute @workgroup_size(WG)
fn tanh_gate_scale(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = element(wg, nwg, lid);
    if i < params.count {
        out3[i] = tanh_clamped(y[0]) * x[i];
    }
}

@compute @workgroup_size(1)
fn tanh_gate_grad() {
    let t = tanh_clamped(y[0]);
    out3[0] = (1.0 - t * t) * x[0];
}
