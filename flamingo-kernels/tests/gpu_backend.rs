//! Checks of the wgpu backend itself: adapter listing, buffers, errors and
//! the split path for tensors larger than one storage binding. Op results
//! are compared with the CPU backend in tests/ops.rs; these tests cover what
//! only the GPU has.

use flamingo_kernels::gpu::{self, GpuOptions};
use flamingo_kernels::{DType, Device};

fn adapters() -> Vec<usize> {
    let found: Vec<usize> = gpu::list_adapters().iter().map(|adapter| adapter.index).collect();
    if found.is_empty() {
        eprintln!("note: no wgpu adapter found; GPU backend tests skipped");
    }
    found
}

#[test]
fn adapters_are_listed_in_stable_order() {
    let first = gpu::list_adapters();
    let second = gpu::list_adapters();
    assert_eq!(first, second);
    for (position, adapter) in first.iter().enumerate() {
        assert_eq!(adapter.index, position);
        assert!(adapter.max_storage_binding > 0, "{} reports no storage binding size", adapter.name);
        eprintln!("adapter {position}: {adapter:?}");
    }
}

#[test]
fn upload_download_round_trip() {
    for index in adapters() {
        let device = Device::gpu(index).unwrap();
        let values: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5 - 7.0).collect();
        let tensor = device.from_f32([10, 100], values.clone()).unwrap();
        assert_eq!(tensor.to_vec_f32().unwrap(), values, "{}", device.description());
        let ids = device.from_u32([3], vec![1, 2, u32::MAX]).unwrap();
        assert_eq!(ids.to_vec_u32().unwrap(), vec![1, 2, u32::MAX]);
        let zeros = device.zeros([5], DType::F32).unwrap();
        assert_eq!(zeros.to_vec_f32().unwrap(), vec![0.0; 5]);
    }
}

/// Q8_0, Q4_0, Q4_1, F16, BF16 and F32 blocks with varied scales and bytes.
fn gguf_samples() -> Vec<(flamingo_kernels::quant::GgmlType, Vec<u8>, usize)> {
    use flamingo_kernels::quant::GgmlType;
    let half = |value: f32| half::f16::from_f32(value).to_le_bytes();
    let blocks = 37;
    let mut samples = Vec::new();

    let mut q8 = Vec::new();
    for block in 0..blocks {
        q8.extend(half(0.013 * (block as f32 - 18.0)));
        q8.extend((0..32).map(|i| ((i * 37 + block * 11) % 256) as u8));
    }
    samples.push((GgmlType::Q8_0, q8, blocks * 32));

    let mut q4 = Vec::new();
    let mut q41 = Vec::new();
    for block in 0..blocks {
        q4.extend(half(0.7 - 0.05 * block as f32));
        q41.extend(half(0.031 * (block as f32 + 1.0)));
        q41.extend(half(-0.37 + 0.01 * block as f32));
        let nibbles: Vec<u8> = (0..16).map(|j| ((j * 29 + block * 7) % 256) as u8).collect();
        q4.extend(&nibbles);
        q41.extend(&nibbles);
    }
    samples.push((GgmlType::Q4_0, q4, blocks * 32));
    samples.push((GgmlType::Q4_1, q41, blocks * 32));

    let values: Vec<f32> = (0..101).map(|i| (i as f32 - 50.0) * 0.173).collect();
    samples.push((GgmlType::F16, values.iter().flat_map(|&v| half(v)).collect(), values.len()));
    samples.push((GgmlType::BF16, values.iter().flat_map(|&v| ((v.to_bits() >> 16) as u16).to_le_bytes()).collect(), values.len()));
    samples.push((GgmlType::F32, values.iter().flat_map(|&v| v.to_le_bytes()).collect(), values.len()));
    samples
}

#[test]
fn dequantize_matches_cpu_reference() {
    let cpu = Device::cpu();
    for index in adapters() {
        let device = Device::gpu(index).unwrap();
        for (ty, bytes, count) in gguf_samples() {
            let want = cpu.dequantize(ty, &bytes, &[count], DType::F32).unwrap().to_vec_f32().unwrap();
            let got = device.dequantize(ty, &bytes, &[count], DType::F32).unwrap().to_vec_f32().unwrap();
            // The kernel follows the reference step by step, so results are bit-identical.
            assert_eq!(got, want, "{ty} to f32 on {}", device.description());

            let want16 = cpu.dequantize(ty, &bytes, &[count], DType::F16).unwrap().to_host().unwrap();
            let got16 = device.dequantize(ty, &bytes, &[count], DType::F16).unwrap().to_host().unwrap();
            assert_eq!(got16, want16, "{ty} to f16 on {}", device.description());
        }
        let error = device.dequantize(flamingo_kernels::quant::GgmlType::Q8_0, &[0; 33], &[32], DType::F32).unwrap_err();
        assert!(error.to_string().contains("34 bytes"), "{error}");
        let error = device.dequantize(flamingo_kernels::quant::GgmlType::Q6_K, &[0; 210], &[256], DType::F32).unwrap_err();
        assert!(error.to_string().contains("Q6_K"), "{error}");
    }
}

#[test]
fn cast_rounds_like_half_crate() {
    // Ties, subnormals, overflow and values just below a rounding boundary.
    let mut values = vec![0.0, -0.0, 1.0, 65504.0, 65520.0, 70000.0, -1e-8, 6e-8, 3e-8, 2.9802322e-8, 1e-5, f32::INFINITY, f32::NEG_INFINITY];
    values.extend((0..2000).map(|i| (i as f32 * 0.61803).sin() * 10f32.powi(i % 9 - 5)));
    values.extend([1.0 + 1.0 / 2048.0, 1.0 + 3.0 / 2048.0, 1.0 + 1.0 / 4096.0]);
    let want: Vec<half::f16> = values.iter().map(|&v| half::f16::from_f32(v)).collect();
    for index in adapters() {
        let device = Device::gpu(index).unwrap();
        let x = device.from_f32([values.len()], values.clone()).unwrap();
        let halves = device.cast(&x, DType::F16).unwrap();
        let got = match halves.to_host().unwrap().data {
            flamingo_kernels::HostData::F16(got) => got,
            other => panic!("cast to f16 returned {other:?}"),
        };
        let got_bits: Vec<u16> = got.iter().map(|v| v.to_bits()).collect();
        let want_bits: Vec<u16> = want.iter().map(|v| v.to_bits()).collect();
        assert_eq!(got_bits, want_bits, "{}", device.description());
        let back = device.cast(&halves, DType::F32).unwrap().to_vec_f32().unwrap();
        let want_back: Vec<f32> = want.iter().map(|v| v.to_f32()).collect();
        assert_eq!(back.len(), want_back.len());
        for (got, want) in back.iter().zip(&want_back) {
            assert!(got == want || (got.is_nan() && want.is_nan()), "{got} vs {want}");
        }
    }
}

/// Runs `check` on every adapter opened with storage bindings of `bytes`
/// (and 256-byte offset alignment), so larger tensors are split into chunks.
fn with_small_bindings(bytes: u64, check: impl Fn(&Device, &Device)) {
    let cpu = Device::cpu();
    for index in adapters() {
        let options = GpuOptions { max_storage_binding: Some(bytes), ..GpuOptions::default() };
        let device = Device::gpu_with_options(index, &options).unwrap();
        check(&cpu, &device);
    }
}

fn values(count: usize, seed: u32) -> Vec<f32> {
    (0..count).map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 500.0 - 1.0).collect()
}

fn assert_near(what: &str, device: &Device, got: &[f32], want: &[f32], tolerance: f32) {
    assert_eq!(got.len(), want.len(), "{what} on {}", device.description());
    for (index, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tolerance * (1.0 + w.abs()), "{what} on {}: element {index} is {g}, expected {w}", device.description());
    }
}

#[test]
fn split_bindings_elementwise_and_reductions() {
    // Row chunks start at multiples of 256 bytes, and the per-row rstd of
    // RMSNorm has 4-byte rows, so chunks hold multiples of 64 rows.
    with_small_bindings(16384, |cpu, gpu| {
        let x = values(32000, 1);
        let y = values(32000, 2);
        let on = |device: &Device, data: &Vec<f32>, shape: &[usize]| device.from_f32(shape.to_vec(), data.clone()).unwrap();

        let want = cpu.add(&on(cpu, &x, &[500, 64]), &on(cpu, &y, &[500, 64])).unwrap().to_vec_f32().unwrap();
        let got = gpu.add(&on(gpu, &x, &[500, 64]), &on(gpu, &y, &[500, 64])).unwrap().to_vec_f32().unwrap();
        assert_near("add", gpu, &got, &want, 0.0);

        let want = cpu.sum(&on(cpu, &x, &[32000])).unwrap().to_scalar().unwrap();
        let got = gpu.sum(&on(gpu, &x, &[32000])).unwrap().to_scalar().unwrap();
        assert_near("sum", gpu, &[got], &[want], 1e-4);

        let want = cpu.sum_leading(&on(cpu, &x, &[500, 64]), 1).unwrap().to_vec_f32().unwrap();
        let got = gpu.sum_leading(&on(gpu, &x, &[500, 64]), 1).unwrap().to_vec_f32().unwrap();
        assert_near("sum_leading", gpu, &got, &want, 1e-4);

        let want = cpu.softmax(&on(cpu, &x, &[500, 64])).unwrap().to_vec_f32().unwrap();
        let got = gpu.softmax(&on(gpu, &x, &[500, 64])).unwrap().to_vec_f32().unwrap();
        assert_near("softmax", gpu, &got, &want, 1e-5);

        let w = values(64, 3);
        let (want, _) = cpu.rms_norm(&on(cpu, &x, &[500, 64]), &on(cpu, &w, &[64]), 1e-5).unwrap();
        let (got, _) = gpu.rms_norm(&on(gpu, &x, &[500, 64]), &on(gpu, &w, &[64]), 1e-5).unwrap();
        assert_near("rms_norm", gpu, &got.to_vec_f32().unwrap(), &want.to_vec_f32().unwrap(), 1e-5);

        let want = cpu.broadcast_add(&on(cpu, &x, &[500, 64]), &on(cpu, &w, &[64])).unwrap().to_vec_f32().unwrap();
        let got = gpu.broadcast_add(&on(gpu, &x, &[500, 64]), &on(gpu, &w, &[64])).unwrap().to_vec_f32().unwrap();
        assert_near("broadcast_add", gpu, &got, &want, 0.0);
    });
}

#[test]
fn split_bindings_matmul_layouts() {
    use flamingo_kernels::Matmul;
    with_small_bindings(4096, |cpu, gpu| {
        // A 37 × 300 by 300 × 45 product: every operand is larger than 4 KiB.
        let (m, k, n) = (37, 300, 45);
        let a = values(m * k, 4);
        let b = values(k * n, 5);
        let bias = values(n, 6);
        for (trans_a, trans_b) in [(false, false), (false, true), (true, false), (true, true)] {
            let a_shape = if trans_a { [k, m] } else { [m, k] };
            let b_shape = if trans_b { [n, k] } else { [k, n] };
            let run = |device: &Device| {
                let x = device.from_f32(a_shape, a.clone()).unwrap();
                let y = device.from_f32(b_shape, b.clone()).unwrap();
                let bias = device.from_f32([n], bias.clone()).unwrap();
                let spec = Matmul { trans_a, trans_b, bias: Some(&bias), activation: flamingo_kernels::Activation::GeluTanh };
                device.matmul(&x, &y, &spec).unwrap().to_vec_f32().unwrap()
            };
            assert_near(&format!("matmul trans_a={trans_a} trans_b={trans_b}"), gpu, &run(gpu), &run(cpu), 1e-4);
        }
    });
}

#[test]
fn split_bindings_rows_ops() {
    // Per-row scalars (targets, lse) of 4 bytes make row chunks multiples of
    // 64 rows, so the rows here are at most 256 bytes.
    with_small_bindings(16384, |cpu, gpu| {
        // Logits of 200 rows × 64 and an embedding table of 900 × 24.
        let logits = values(200 * 64, 7);
        let targets: Vec<u32> = (0..200).map(|i| if i % 7 == 3 { u32::MAX } else { (i * 37) % 64 }).collect();
        let run_ce = |device: &Device| {
            let x = device.from_f32([200, 64], logits.clone()).unwrap();
            let t = device.from_u32([200], targets.clone()).unwrap();
            let forward = device.cross_entropy(&x, &t).unwrap();
            let grad = device.cross_entropy_backward(&x, &forward.lse, &t, 0.5).unwrap();
            (forward.losses.to_vec_f32().unwrap(), grad.to_vec_f32().unwrap())
        };
        let ((want_loss, want_grad), (got_loss, got_grad)) = (run_ce(cpu), run_ce(gpu));
        assert_near("cross_entropy", gpu, &got_loss, &want_loss, 1e-5);
        assert_near("cross_entropy_backward", gpu, &got_grad, &want_grad, 1e-5);

        let table = values(900 * 24, 8);
        let ids: Vec<u32> = (0..700).map(|i| (i * 13 + 5) % 1000).collect();
        let run_embedding = |device: &Device| {
            let t = device.from_f32([900, 24], table.clone()).unwrap();
            let i = device.from_u32([700], ids.clone()).unwrap();
            let out = device.embedding(&t, &i, 3).unwrap();
            let mut dtable = device.zeros([900, 24], DType::F32).unwrap();
            device.embedding_backward(&mut dtable, &i, &out, 3).unwrap();
            (out.to_vec_f32().unwrap(), dtable.to_vec_f32().unwrap())
        };
        let ((want_out, want_dtable), (got_out, got_dtable)) = (run_embedding(cpu), run_embedding(gpu));
        assert_near("embedding", gpu, &got_out, &want_out, 0.0);
        assert_near("embedding_backward", gpu, &got_dtable, &want_dtable, 0.0);
    });
}

#[test]
fn too_large_row_is_an_error() {
    with_small_bindings(4096, |_, gpu| {
        // One softmax row of 2000 f32 is 8000 bytes, larger than the 4096-byte binding.
        let x = gpu.from_f32([2, 2000], values(4000, 9)).unwrap();
        let error = gpu.softmax(&x).unwrap_err().to_string();
        assert!(error.contains("4096"), "the message names the limit: {error}");
        assert!(error.contains("8000"), "the message names the row size: {error}");
    });
}

#[test]
fn fallbacks_without_f16_and_subgroups() {
    let cpu = Device::cpu();
    for index in adapters() {
        let options = GpuOptions { disable_f16: true, disable_subgroups: true, ..GpuOptions::default() };
        let gpu = Device::gpu_with_options(index, &options).unwrap();
        assert_eq!(gpu.weight_dtype(), DType::F32);
        let x = values(64 * 77, 10);
        let run = |device: &Device| {
            let t = device.from_f32([64, 77], x.clone()).unwrap();
            let w = device.cast(&device.from_f32([77, 77], values(77 * 77, 11)).unwrap(), DType::F16).unwrap();
            let product = device.matmul(&t, &w, &flamingo_kernels::Matmul::linear(None)).unwrap();
            device.softmax(&product).unwrap().to_vec_f32().unwrap()
        };
        assert_near("f16 weights and softmax without features", &gpu, &run(&gpu), &run(&cpu), 1e-4);
    }
}

#[test]
fn buffers_are_reused_after_drop() {
    for index in adapters() {
        let device = Device::gpu(index).unwrap();
        // The same shapes again and again must not fail or grow without bound;
        // the pool hands the freed buffers back.
        for round in 0..50 {
            let a = device.from_f32([64, 64], values(4096, round)).unwrap();
            let b = device.scale(&a, 2.0).unwrap();
            let c = device.add(&a, &b).unwrap();
            assert_eq!(c.to_vec_f32().unwrap()[1], 3.0 * values(4096, round)[1]);
        }
    }
}
