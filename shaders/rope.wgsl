// Rotary position embedding in the half-split layout of Hugging Face Llama.
//
// x, out are [B·T, H, D]; positions u32 [B·T]; inv_freq [D/2] holds
// base^(−2i/D), computed on the host exactly as the CPU backend does. For
// i < D/2 with θ = position · inv_freq[i] (an f32 product, as on the CPU):
//   out[i]       = x[i] cos θ − x[i + D/2] sin θ
//   out[i + D/2] = x[i + D/2] cos θ + x[i] sin θ
// `direction` is 1 for the forward pass and −1 for the backward pass (the
// inverse rotation). One thread per rotated pair.
//
// θ reaches thousands of radians; it is reduced to [−π, π] with 2π split
// into three parts (Cody and Waite) before sin and cos, whose accuracy on
// GPUs is only promised near zero.
//
// Bindings: x, positions, inv_freq -> out (4).

struct Params {
    // Rows of H·D elements (tokens) in this chunk.
    rows: u32,
    heads: u32,
    head_dim: u32,
    direction: f32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> positions: array<u32>;
@group(0) @binding(3) var<storage, read> inv_freq: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

const WG: u32 = 256u;
// 2π = TWO_PI_A + TWO_PI_B + TWO_PI_C to about 1e-15; A has 8 and B 12
// significant bits, so k · A and k · B are exact for |k| < 2^12, that is
// for angles up to about 25 000 radians.
const TWO_PI_A: f32 = 6.28125;
const TWO_PI_B: f32 = 0.0019354820251464844;
const TWO_PI_C: f32 = -1.7484555314695172e-7;
const INV_TWO_PI: f32 = 0.15915494;

fn reduce_angle(theta: f32) -> f32 {
    let k = round(theta * INV_TWO_PI);
    return ((theta - k * TWO_PI_A) - k * TWO_PI_B) - k * TWO_PI_C;
}

@compute @workgroup_size(WG)
fn rope(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let half = params.head_dim / 2u;
    let pair = (wg.y * nwg.x + wg.x) * WG + lid;
    if pair >= params.rows * params.heads * half {
        return;
    }
    let i = pair % half;
    let head_row = pair / half;
    let token = head_row / params.heads;
    let base = head_row * params.head_dim;

    let theta = reduce_angle(f32(positions[token]) * inv_freq[i]);
    let sin_theta = params.direction * sin(theta);
    let cos_theta = cos(theta);
    let a = x[base + i];
    let b = x[base + i + half];
    out[base + i] = a * cos_theta - b * sin_theta;
    out[base + i + half] = b * cos_theta + a * sin_theta;
}
