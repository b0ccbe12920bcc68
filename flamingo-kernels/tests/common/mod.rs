//! Shared helpers of the kernel tests: the devices every test body runs on,
//! seeded inputs, f64 references and finite differences.

#![allow(dead_code)]

use std::sync::OnceLock;

use flamingo_kernels::{gpu, Device};

/// The CPU backend and every wgpu adapter found, opened once per test binary.
///
/// Without an adapter the GPU half of each test is skipped with a note on
/// stderr; with `FLAMINGO_REQUIRE_GPU=1` (set by CI) that is a failure.
pub fn devices() -> &'static [Device] {
    static DEVICES: OnceLock<Vec<Device>> = OnceLock::new();
    DEVICES.get_or_init(|| {
        let require = std::env::var("FLAMINGO_REQUIRE_GPU").is_ok_and(|value| value == "1");
        let mut devices = vec![Device::cpu()];
        let adapters = gpu::list_adapters();
        if adapters.is_empty() {
            assert!(!require, "FLAMINGO_REQUIRE_GPU=1 but wgpu found no adapter; install a Vulkan driver such as Mesa's mesa-vulkan-drivers");
            eprintln!("note: GPU tests skipped: wgpu found no adapter (FLAMINGO_REQUIRE_GPU=1 turns this into a failure)");
        }
        for adapter in adapters {
            match Device::gpu(adapter.index) {
                Ok(device) => devices.push(device),
                Err(error) if require => panic!("adapter {} ({}) could not be opened: {error}", adapter.index, adapter.name),
                Err(error) => eprintln!("note: adapter {} ({}) skipped: {error}", adapter.index, adapter.name),
            }
        }
        devices
    })
}

/// Deterministic values uniform in [-1, 1), from a 64-bit LCG.
pub fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// `random` scaled to [-scale, scale).
pub fn random_scaled(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    random(n, seed).into_iter().map(|v| v * scale).collect()
}

pub fn to_f64(values: &[f32]) -> Vec<f64> {
    values.iter().map(|&v| v as f64).collect()
}

/// Asserts `got` matches `want` within `tol`, relative to the larger of 1
/// and the largest reference magnitude.
#[track_caller]
pub fn assert_close(device: &Device, what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what} on {}: length {} vs reference {}", device.description(), got.len(), want.len());
    let magnitude = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    let (mut worst, mut at) = (0.0f64, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let error = (g as f64 - w).abs();
        if error.is_nan() || error > worst {
            worst = if error.is_nan() { f64::INFINITY } else { error };
            at = i;
        }
    }
    assert!(
        worst <= tol * magnitude,
        "{what} on {}: max error {worst:.3e} at index {at} (got {}, reference {}), allowed {:.3e}",
        device.description(),
        got[at],
        want[at],
        tol * magnitude
    );
}

/// The gradient of L(x) = Σ r ⊙ f(x) by central differences in f64.
pub fn numeric_grad(x: &[f64], r: &[f64], f: impl Fn(&[f64]) -> Vec<f64>) -> Vec<f64> {
    let h = 1e-5;
    let mut point = x.to_vec();
    let loss = |y: Vec<f64>| -> f64 { y.iter().zip(r).map(|(a, b)| a * b).sum() };
    (0..x.len())
        .map(|i| {
            point[i] = x[i] + h;
            let plus = loss(f(&point));
            point[i] = x[i] - h;
            let minus = loss(f(&point));
            point[i] = x[i];
            (plus - minus) / (2.0 * h)
        })
        .collect()
}

/// The error function in f64: its Taylor series below 2.5, where it is
/// accurate to about 1e-14, and the continued fraction of erfc above.
pub fn erf64(x: f64) -> f64 {
    if x.abs() >= 2.5 {
        // erfc(x) = exp(-x²)/√π · 1/(x + (1/2)/(x + 1/(x + (3/2)/(x + …)))).
        let a = x.abs();
        let mut tail = a;
        for n in (1..80).rev() {
            tail = a + (n as f64 / 2.0) / tail;
        }
        let erfc = (-a * a).exp() / std::f64::consts::PI.sqrt() / tail;
        return x.signum() * (1.0 - erfc);
    }
    let mut term = x;
    let mut total = x;
    for n in 1..200 {
        term *= -x * x / n as f64;
        let contribution = term / (2 * n + 1) as f64;
        total += contribution;
        if contribution.abs() < 1e-17 {
            break;
        }
    }
    total * 2.0 / std::f64::consts::PI.sqrt()
}
