//! Kernel benchmarks on the CPU backend and on every wgpu adapter found:
//! matmul (GFLOP/s), attention (GFLOP/s), softmax, LayerNorm and the AdamW
//! update (GB/s).
//!
//! Run with `cargo bench -p flamingo-benches --bench kernels`; add a filter
//! such as `-- matmul/1024` to run part of it. Criterion prints matmul and
//! attention throughput as "elem/s" where one element is one floating-point
//! operation, so Gelem/s reads as GFLOP/s. Each GPU iteration waits for the
//! device, so a measurement includes one submission and one wait.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use flamingo_kernels::{gpu, AdamW, AttentionMask, DType, Device, Matmul};

/// Opens the CPU backend and every adapter, each with a short label for benchmark ids.
fn devices() -> Vec<(String, Device)> {
    let mut devices = vec![("cpu".to_string(), Device::cpu())];
    for adapter in gpu::list_adapters() {
        match Device::gpu(adapter.index) {
            Ok(device) => {
                let api = adapter.api.map_or("other", |api| api.name());
                devices.push((format!("gpu{}-{api}", adapter.index), device));
            }
            Err(error) => eprintln!("adapter {} ({}) skipped: {error}", adapter.index, adapter.name),
        }
    }
    for (label, device) in &devices {
        eprintln!("{label}: {}", device.description());
    }
    devices
}

fn values(count: usize) -> Vec<f32> {
    (0..count).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect()
}

/// (name, M, K, N, trans_a, trans_b): the shapes of BENCHMARKS.md.
const MATMUL_SHAPES: &[(&str, usize, usize, usize, bool, bool)] = &[
    ("1024x1024x1024 A·B", 1024, 1024, 1024, false, false),
    ("1024x1024x1024 A·Bt", 1024, 1024, 1024, false, true),
    ("1024x1024x1024 At·B", 1024, 1024, 1024, true, false),
    ("512x768x3072 A·B", 512, 768, 3072, false, false),
    ("512x768x3072 A·Bt", 512, 768, 3072, false, true),
    ("4096x256x256 A·B", 4096, 256, 256, false, false),
    ("4096x256x256 At·B", 4096, 256, 256, true, false),
    ("smollm2 128x576x1536 A·Bt", 128, 576, 1536, false, true),
    ("smollm2 128x1536x576 A·Bt", 128, 1536, 576, false, true),
    ("smollm2 128x1536x576 A·B", 128, 1536, 576, false, false),
    ("smollm2 576x128x1536 At·B", 576, 128, 1536, true, false),
    ("smollm2 128x576x49152 A·Bt", 128, 576, 49152, false, true),
];

fn matmul(c: &mut Criterion) {
    let devices = devices();
    let mut group = c.benchmark_group("matmul");
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    for &(name, m, k, n, trans_a, trans_b) in MATMUL_SHAPES {
        group.throughput(Throughput::Elements((2 * m * n * k) as u64));
        for (label, device) in &devices {
            let a_shape = if trans_a { [k, m] } else { [m, k] };
            let b_shape = if trans_b { [n, k] } else { [k, n] };
            let a = device.from_f32(a_shape, values(m * k)).unwrap();
            let b = device.from_f32(b_shape, values(k * n)).unwrap();
            let spec = Matmul { trans_a, trans_b, ..Matmul::default() };
            group.bench_with_input(BenchmarkId::new(name, label), &(), |bencher, _| {
                bencher.iter(|| {
                    let product = device.matmul(&a, &b, &spec).unwrap();
                    device.synchronize().unwrap();
                    product
                })
            });
        }
    }
    group.finish();
}

fn attention(c: &mut Criterion) {
    let devices = devices();
    let mut group = c.benchmark_group("attention");
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    // SmolLM2-135M: 9 query heads, 3 key/value heads, head size 64; causal.
    for &(batch, t) in &[(1usize, 256usize), (4, 128)] {
        let (hq, hkv, d) = (9, 3, 64);
        // Causal attention computes about half of the 2·T² scores and as many weighted sums.
        let flops = 2 * batch * hq * t * t * d;
        group.throughput(Throughput::Elements(flops as u64));
        for (label, device) in &devices {
            let q = device.from_f32([batch, t, hq, d], values(batch * t * hq * d)).unwrap();
            let k = device.from_f32([batch, t, hkv, d], values(batch * t * hkv * d)).unwrap();
            let v = device.from_f32([batch, t, hkv, d], values(batch * t * hkv * d)).unwrap();
            let mask = AttentionMask { causal: true, ..AttentionMask::default() };
            group.bench_with_input(BenchmarkId::new(format!("forward B={batch} T={t}"), label), &(), |bencher, _| {
                bencher.iter(|| {
                    let out = device.attention(&q, &k, &v, &mask, 0.125).unwrap();
                    device.synchronize().unwrap();
                    out
                })
            });
        }
    }
    group.finish();
}

fn softmax_and_layernorm(c: &mut Criterion) {
    let devices = devices();
    let mut group = c.benchmark_group("rows");
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    for &(rows, cols) in &[(4096usize, 1024usize), (128, 49152)] {
        // Each op reads x once and writes y once.
        group.throughput(Throughput::Bytes((2 * rows * cols * 4) as u64));
        for (label, device) in &devices {
            let x = device.from_f32([rows, cols], values(rows * cols)).unwrap();
            let weight = device.full([cols], 1.0).unwrap();
            let bias = device.zeros([cols], DType::F32).unwrap();
            group.bench_with_input(BenchmarkId::new(format!("softmax {rows}x{cols}"), label), &(), |bencher, _| {
                bencher.iter(|| {
                    let y = device.softmax(&x).unwrap();
                    device.synchronize().unwrap();
                    y
                })
            });
            group.bench_with_input(BenchmarkId::new(format!("layer_norm {rows}x{cols}"), label), &(), |bencher, _| {
                bencher.iter(|| {
                    let y = device.layer_norm(&x, &weight, Some(&bias), 1e-5).unwrap();
                    device.synchronize().unwrap();
                    y
                })
            });
        }
    }
    group.finish();
}

fn adamw(c: &mut Criterion) {
    let devices = devices();
    let mut group = c.benchmark_group("adamw");
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    // 8 Mi parameters, the size of a small connector.
    let count = 8 << 20;
    // Each update reads the parameter, both moments and the gradient and writes the first three back.
    group.throughput(Throughput::Bytes((7 * count * 4) as u64));
    for (label, device) in &devices {
        let mut param = device.from_f32([count], values(count)).unwrap();
        let grad = device.from_f32([count], values(count)).unwrap();
        let mut m = device.zeros([count], DType::F32).unwrap();
        let mut v = device.zeros([count], DType::F32).unwrap();
        let mut hyper = AdamW { lr: 1e-4, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.01, step: 0 };
        group.bench_with_input(BenchmarkId::new(format!("step {count}"), label), &(), |bencher, _| {
            bencher.iter(|| {
                hyper.step += 1;
                device.adamw_step(&mut param, &grad, &mut m, &mut v, &hyper).unwrap();
                device.synchronize().unwrap();
            })
        });
    }
    group.finish();
}

criterion_group!(benches, matmul, attention, softmax_and_layernorm, adamw);
criterion_main!(benches);
