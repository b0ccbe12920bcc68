// Pointwise activations, pasted into the elementwise, matmul and conv kernels.
//
// Contract: `activate(x, kind)` and `activate_derivative(x, kind)` compute
// what `Activation::apply` and `Activation::derivative` compute on the CPU
// (flamingo-kernels/src/ops/activation.rs), with the same formulas and
// constants so both backends round alike. Kind numbers:
// 0 identity, 1 relu, 2 relu6, 3 exact GELU, 4 tanh GELU, 5 quick GELU,
// 6 SiLU, 7 tanh.

const SQRT_2_OVER_PI: f32 = 0.7978846;
const GELU_TANH_COEFF: f32 = 0.044715;
const FRAC_1_SQRT_2: f32 = 0.70710678;
const INV_SQRT_2PI: f32 = 0.3989423;

// The error function by Abramowitz and Stegun, formula 7.1.26 (absolute
// error below 1.5e-7), written in the CPU's order of operations.
fn erf_approx(x: f32) -> f32 {
    let sign = select(1.0, -1.0, x < 0.0);
    let a = abs(x);
    let t = 1.0 / (1.0 + 0.3275911 * a);
    let poly = t * (0.2548296 + t * (-0.28449674 + t * (1.4214137 + t * (-1.453152 + t * 1.0614054))));
    return sign * (1.0 - poly * exp(-a * a));
}

// tanh saturates to ±1 in f32 beyond |x| = 9; clamping first keeps drivers
// that compute tanh through exp from overflowing to NaN.
fn tanh_clamped(x: f32) -> f32 {
    return tanh(clamp(x, -15.0, 15.0));
}

// 1 / (1 + e^-x), in a form whose exp never overflows.
fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        return 1.0 / (1.0 + exp(-x));
    }
    let e = exp(x);
    return e / (1.0 + e);
}

fn activate(x: f32, kind: u32) -> f32 {
    switch kind {
        case 1u: { return max(x, 0.0); }
        case 2u: { return clamp(x, 0.0, 6.0); }
        case 3u: { return 0.5 * x * (1.0 + erf_approx(x * FRAC_1_SQRT_2)); }
        case 4u: { return 0.5 * x * (1.0 + tanh_clamped(SQRT_2_OVER_PI * (x + GELU_TANH_COEFF * x * x * x))); }
        case 5u: { return x * sigmoid(1.702 * x); }
        case 6u: { return x * sigmoid(x); }
        case 7u: { return tanh_clamped(x); }
        default: { return x; }
    }
}

fn activate_derivative(x: f32, kind: u32) -> f32 {
    switch kind {
        case 1u: { return select(0.0, 1.0, x > 0.0); }
        case 2u: { return select(0.0, 1.0, x > 0.0 && x < 6.0); }
        case 3u: {
            let cdf = 0.5 * (1.0 + erf_approx(x * FRAC_1_SQRT_2));
            let pdf = exp(-0.5 * x * x) * INV_SQRT_2PI;
            return cdf + x * pdf;
        }
        case 4u: {
            let t = tanh_clamped(SQRT_2_OVER_PI * (x + GELU_TANH_COEFF * x * x * x));
            let inner_derivative = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_TANH_COEFF * x * x);
            return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * inner_derivative;
        }
        case 5u: {
            let s = sigmoid(1.702 * x);
            return s + 1.702 * x * s * (1.0 - s);
        }
        case 6u: {
            let s = sigmoid(x);
            return s * (1.0 + x * (1.0 - s));
        }
        case 7u: {
            let t = tanh_clamped(x);
            return 1.0 - t * t;
        }
        default: { return 1.0; }
    }
}
