// Conversion of f32 to the bit pattern of the nearest f16, pasted into the
// kernels that write f16 tensors (shape.wgsl, dequantize.wgsl).
//
// Contract: `f16_bits(x)` rounds to nearest with ties to even, overflows to
// infinity, produces subnormals below 2^-14 and keeps NaN a NaN: the
// conversion of the `half` crate that the CPU backend uses. It works in
// integer arithmetic, so it needs no f16 support and rounds alike on every
// adapter (WGSL leaves the rounding of its own conversions to the driver).

// The f16 bit pattern nearest to x (ties to even), with overflow to
// infinity, subnormals, and NaN kept a NaN.
fn f16_bits(x: f32) -> u32 {
    let bits = bitcast<u32>(x);
    let sign = (bits >> 16u) & 0x8000u;
    let exponent = i32((bits >> 23u) & 0xffu);
    var mantissa = bits & 0x7fffffu;
    if exponent == 255 {
        // Infinity, or NaN with a quiet bit set.
        return sign | 0x7c00u | select(0u, 0x200u | (mantissa >> 13u), mantissa != 0u);
    }
    let unbiased = exponent - 127;
    if unbiased > 15 {
        return sign | 0x7c00u;
    }
    if unbiased >= -14 {
        // Normal half: keep 10 mantissa bits, round the 13 dropped ones.
        let half = (u32(unbiased + 15) << 10u) | (mantissa >> 13u);
        let dropped = mantissa & 0x1fffu;
        let round_up = dropped > 0x1000u || (dropped == 0x1000u && (half & 1u) == 1u);
        // A carry out of the mantissa correctly bumps the exponent (to infinity at the top).
        return sign | (half + select(0u, 1u, round_up));
    }
    if unbiased < -25 {
        return sign;
    }
    // Subnormal half: shift the full significand right and round.
    mantissa |= 0x800000u;
    let shift = u32(-14 - unbiased) + 13u;
    let half = mantissa >> shift;
    let dropped = mantissa & ((1u << shift) - 1u);
    let midpoint = 1u << (shift - 1u);
    let round_up = dropped > midpoint || (dropped == midpoint && (half & 1u) == 1u);
    return sign | (half + select(0u, 1u, round_up));
}

