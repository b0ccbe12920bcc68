// 2-D convolution over channels-last images, forward only, with per-side
// zero padding, groups (depthwise when groups = Cin = Cout), bias and an
// activation.
//
// x [N, H, W, Cin]; weight [Cout, Cin/groups, kH, kW] (PyTorch's layout);
// bias [Cout]; out [N, Ho, Wo, Cout]. Output pixel (oh, ow) reads input
// rows oh·stride_h + ki − pad_top and columns ow·stride_w + kj − pad_left;
// taps outside the image read zero. One thread per output element; N is
// the number of images in this chunk.
//
// The weight is f32, or f16 with WEIGHT_F16 (native with NATIVE_F16, else
// pairs of halves in u32 words).
//
// Bindings: x, weight, bias -> out (4).

#include "activation.wgsl"

#if WEIGHT_F16
#if NATIVE_F16
enable f16;
#endif
#endif

struct Params {
    images: u32,
    height: u32,
    width: u32,
    cin: u32,
    cout: u32,
    kh: u32,
    kw: u32,
    out_height: u32,
    out_width: u32,
    stride_h: u32,
    stride_w: u32,
    pad_top: u32,
    pad_left: u32,
    cin_group: u32,
    cout_group: u32,
}

override HAS_BIAS: bool = false;
override ACT: u32 = 0u;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
#if WEIGHT_F16
#if NATIVE_F16
@group(0) @binding(2) var<storage, read> weight: array<f16>;
#else
@group(0) @binding(2) var<storage, read> weight: array<u32>;
#endif
#else
@group(0) @binding(2) var<storage, read> weight: array<f32>;
#endif
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

const WG: u32 = 256u;

fn weight_value(index: u32) -> f32 {
#if WEIGHT_F16
#if NATIVE_F16
    return f32(weight[index]);
#else
    let pair = unpack2x16float(weight[index / 2u]);
    return select(pair.x, pair.y, (index & 1u) == 1u);
#endif
#else
    return weight[index];
#endif
}

@compute @workgroup_size(WG)
fn conv2d(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = (wg.y * nwg.x + wg.x) * WG + lid;
    if i >= params.images * params.out_height * params.out_width * params.cout {
        return;
    }
    let co = i % params.cout;
    let pixel = i / params.cout;
    let ow = pixel % params.out_width;
    let oh = (pixel / params.out_width) % params.out_height;
    let image = pixel / (params.out_width * params.out_height);
    let first_channel = (co / params.cout_group) * params.cin_group;

    var total = 0.0;
    for (var ki = 0u; ki < params.kh; ki++) {
        let row = oh * params.stride_h + ki;
        if row < params.pad_top || row - params.pad_top >= params.height {
            continue;
        }
        let ih = row - params.pad_top;
        for (var kj = 0u; kj < params.kw; kj++) {
            let column = ow * params.stride_w + kj;
            if column < params.pad_left || column - params.pad_left >= params.width {
                continue;
            }
            let iw = column - params.pad_left;
            let source = ((image * params.height + ih) * params.width + iw) * params.cin + first_channel;
            for (var ci = 0u; ci < params.cin_group; ci++) {
                let tap = ((co * params.cin_group + ci) * params.kh + ki) * params.kw + kj;
                total += x[source + ci] * weight_value(tap);
            }
        }
    }
    if HAS_BIAS {
        total += bias[co];
    }
    out[i] = activate(total, ACT);
}
