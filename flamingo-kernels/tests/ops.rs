//! One test body per op, run on the CPU backend and on every wgpu adapter.
//!
//! Forward results are compared with plain f64 loops written here; every
//! backward pass is compared with central finite differences of those f64
//! loops, so neither backend is its own reference.

mod common;

use common::{assert_close, devices, erf64, numeric_grad, random, random_scaled, to_f64};
use flamingo_kernels::{
    Activation, AdamW, AttentionMask, Binary, Conv2d, DType, Device, Error, Matmul, MediaMask, Tensor, IGNORE_INDEX,
};

fn upload(device: &Device, shape: &[usize], values: &[f32]) -> Tensor {
    device.from_f32(shape.to_vec(), values.to_vec()).unwrap()
}

fn download(t: &Tensor) -> Vec<f32> {
    t.to_vec_f32().unwrap()
}

// ---------------------------------------------------------------- matmul

/// op(A)·op(B) in f64 for one batch entry.
#[allow(clippy::too_many_arguments)]
fn matmul64(a: &[f64], b: &[f64], m: usize, n: usize, k: usize, ta: bool, tb: bool) -> Vec<f64> {
    let mut c = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut total = 0.0;
            for p in 0..k {
                let x = if ta { a[p * m + i] } else { a[i * k + p] };
                let y = if tb { b[j * k + p] } else { b[p * n + j] };
                total += x * y;
            }
            c[i * n + j] = total;
        }
    }
    c
}

fn act64(act: Activation, x: f64) -> f64 {
    let sigmoid = |v: f64| 1.0 / (1.0 + (-v).exp());
    match act {
        Activation::Identity => x,
        Activation::Relu => x.max(0.0),
        Activation::Relu6 => x.clamp(0.0, 6.0),
        Activation::GeluExact => 0.5 * x * (1.0 + erf64(x / 2f64.sqrt())),
        Activation::GeluTanh => 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh()),
        Activation::QuickGelu => x * sigmoid(1.702 * x),
        Activation::Silu => x * sigmoid(x),
        Activation::Tanh => x.tanh(),
    }
}

#[test]
fn matmul_layouts_and_awkward_shapes() {
    let shapes = [(1, 1, 1), (1, 37, 300), (37, 1, 5), (65, 33, 129), (17, 70, 1), (128, 96, 64), (3, 5, 1031)];
    for device in devices() {
        for (case, &(m, n, k)) in shapes.iter().enumerate() {
            for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
                let a = random(m * k, case as u64 * 10 + 1);
                let b = random(k * n, case as u64 * 10 + 2);
                let a_shape = if ta { [k, m] } else { [m, k] };
                let b_shape = if tb { [n, k] } else { [k, n] };
                let spec = Matmul { trans_a: ta, trans_b: tb, ..Matmul::new() };
                let c = device.matmul(&upload(device, &a_shape, &a), &upload(device, &b_shape, &b), &spec).unwrap();
                assert_eq!(c.shape(), [m, n]);
                let want = matmul64(&to_f64(&a), &to_f64(&b), m, n, k, ta, tb);
                assert_close(device, &format!("matmul {m}x{n}x{k} ta={ta} tb={tb}"), &download(&c), &want, 1e-5);
            }
        }
    }
}

#[test]
fn matmul_batched_bias_activation() {
    let (batch, m, n, k) = (3, 7, 11, 13);
    for device in devices() {
        let a = random(batch * m * k, 1);
        let shared = random(n * k, 2);
        let per_batch = random(batch * k * n, 3);
        let bias = random(n, 4);
        let a_t = upload(device, &[batch, m, k], &a);

        // Shared Bᵀ (a Linear weight) with bias and GELU.
        let spec = Matmul { trans_b: true, bias: Some(&upload(device, &[n], &bias)), activation: Activation::GeluTanh, ..Matmul::new() };
        let c = device.matmul(&a_t, &upload(device, &[n, k], &shared), &spec).unwrap();
        assert_eq!(c.shape(), [batch, m, n]);
        let mut want = Vec::new();
        for index in 0..batch {
            let product = matmul64(&to_f64(&a[index * m * k..(index + 1) * m * k]), &to_f64(&shared), m, n, k, false, true);
            want.extend(product.iter().enumerate().map(|(i, v)| act64(Activation::GeluTanh, v + bias[i % n] as f64)));
        }
        assert_close(device, "shared B with bias and GELU", &download(&c), &want, 1e-5);

        // One B per batch entry.
        let c = device.matmul(&a_t, &upload(device, &[batch, k, n], &per_batch), &Matmul::new()).unwrap();
        let mut want = Vec::new();
        for index in 0..batch {
            want.extend(matmul64(
                &to_f64(&a[index * m * k..(index + 1) * m * k]),
                &to_f64(&per_batch[index * k * n..(index + 1) * k * n]),
                m, n, k, false, false,
            ));
        }
        assert_close(device, "batched B", &download(&c), &want, 1e-5);

        // f16 weights give the product of the rounded weights.
        let rounded: Vec<f32> = shared.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
        let w16 = device.cast(&upload(device, &[n, k], &shared), DType::F16).unwrap();
        let c = device.matmul(&a_t, &w16, &Matmul::linear(None)).unwrap();
        let mut want = Vec::new();
        for index in 0..batch {
            want.extend(matmul64(&to_f64(&a[index * m * k..(index + 1) * m * k]), &to_f64(&rounded), m, n, k, false, true));
        }
        assert_close(device, "f16 weights", &download(&c), &want, 1e-5);
    }
}

/// Shapes whose sizes are multiples of 4, which software adapters read
/// through staging textures: operands over one texture row of 4096 texels,
/// edge tiles, batches, a bias and activation, f16 weights and accumulation.
#[test]
fn matmul_quad_shapes() {
    for device in devices() {
        // 36 × 260 × 132: B has 34,320 values, two texture rows and a part.
        let (m, n, k) = (36, 260, 132);
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let a = random(m * k, 31);
            let b = random(k * n, 32);
            let a_shape = if ta { [k, m] } else { [m, k] };
            let b_shape = if tb { [n, k] } else { [k, n] };
            let spec = Matmul { trans_a: ta, trans_b: tb, ..Matmul::new() };
            let c = device.matmul(&upload(device, &a_shape, &a), &upload(device, &b_shape, &b), &spec).unwrap();
            let want = matmul64(&to_f64(&a), &to_f64(&b), m, n, k, ta, tb);
            assert_close(device, &format!("matmul {m}x{n}x{k} ta={ta} tb={tb}"), &download(&c), &want, 1e-5);
        }

        // A batch of 3 with one B per entry, and with a shared f16 Bᵀ plus bias and GELU.
        let (batch, m, n, k) = (3, 20, 36, 44);
        let a = random(batch * m * k, 33);
        let per_batch = random(batch * k * n, 34);
        let shared = random(n * k, 35);
        let bias = random(n, 36);
        let a_t = upload(device, &[batch, m, k], &a);
        let c = device.matmul(&a_t, &upload(device, &[batch, k, n], &per_batch), &Matmul::new()).unwrap();
        let mut want = Vec::new();
        for index in 0..batch {
            let entry = &per_batch[index * k * n..(index + 1) * k * n];
            want.extend(matmul64(&to_f64(&a[index * m * k..(index + 1) * m * k]), &to_f64(entry), m, n, k, false, false));
        }
        assert_close(device, "batched B, quad shapes", &download(&c), &want, 1e-5);

        let rounded: Vec<f32> = shared.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
        let w16 = device.cast(&upload(device, &[n, k], &shared), DType::F16).unwrap();
        let bias_t = upload(device, &[n], &bias);
        let spec = Matmul { trans_b: true, bias: Some(&bias_t), activation: Activation::GeluTanh, ..Matmul::new() };
        let c = device.matmul(&a_t, &w16, &spec).unwrap();
        let mut want = Vec::new();
        for index in 0..batch {
            let product = matmul64(&to_f64(&a[index * m * k..(index + 1) * m * k]), &to_f64(&rounded), m, n, k, false, true);
            want.extend(product.iter().enumerate().map(|(i, v)| act64(Activation::GeluTanh, v + bias[i % n] as f64)));
        }
        assert_close(device, "f16 Bᵀ with bias and GELU, quad shapes", &download(&c), &want, 1e-5);

        // C += 0.5 · Aᵀ·B, the weight-gradient form.
        let (rows, n, k) = (24, 16, 28);
        let x = random(rows * k, 37);
        let dy = random(rows * n, 38);
        let start = random(n * k, 39);
        let mut dw = upload(device, &[n, k], &start);
        device.matmul_accumulate(&mut dw, &upload(device, &[rows, n], &dy), &upload(device, &[rows, k], &x), true, false, 0.5).unwrap();
        let product = matmul64(&to_f64(&dy), &to_f64(&x), n, k, rows, true, false);
        let want: Vec<f64> = product.iter().zip(&start).map(|(p, &s)| s as f64 + 0.5 * p).collect();
        assert_close(device, "accumulate, quad shapes", &download(&dw), &want, 1e-5);
    }
}

#[test]
fn linear_backward_matches_finite_differences() {
    // y = x·Wᵀ + b; dx = dy·W, dW = dyᵀ·x, db = Σ dy over rows.
    let (rows, n, k) = (9, 6, 5);
    for device in devices() {
        let x = random(rows * k, 11);
        let w = random(n * k, 12);
        let r = random(rows * n, 13);
        let dy = upload(device, &[rows, n], &r);
        let dx = device.matmul(&dy, &upload(device, &[n, k], &w), &Matmul::new()).unwrap();
        let mut dw = device.zeros(vec![n, k], DType::F32).unwrap();
        device.matmul_accumulate(&mut dw, &dy, &upload(device, &[rows, k], &x), true, false, 1.0).unwrap();
        let db = device.sum_leading(&dy, 1).unwrap();

        let (x64, w64, r64) = (to_f64(&x), to_f64(&w), to_f64(&r));
        let want_dx = numeric_grad(&x64, &r64, |x| matmul64(x, &w64, rows, n, k, false, true));
        let want_dw = numeric_grad(&w64, &r64, |w| matmul64(&x64, w, rows, n, k, false, true));
        let want_db: Vec<f64> = (0..n).map(|j| (0..rows).map(|i| r64[i * n + j]).sum()).collect();
        assert_close(device, "linear dx", &download(&dx), &want_dx, 1e-5);
        assert_close(device, "linear dW", &download(&dw), &want_dw, 1e-5);
        assert_close(device, "linear db", &download(&db), &want_db, 1e-5);

        // Accumulation adds alpha times the product to what is there.
        device.matmul_accumulate(&mut dw, &dy, &upload(device, &[rows, k], &x), true, false, -0.5).unwrap();
        let half: Vec<f64> = want_dw.iter().map(|v| v * 0.5).collect();
        assert_close(device, "accumulate with alpha", &download(&dw), &half, 1e-5);
    }
}

#[test]
fn matmul_rejects_mismatched_shapes() {
    for device in devices() {
        let a = device.zeros(vec![2, 3], DType::F32).unwrap();
        let b = device.zeros(vec![4, 5], DType::F32).unwrap();
        let error = device.matmul(&a, &b, &Matmul::new()).unwrap_err();
        assert!(matches!(error, Error::Shape { .. }), "{error}");
        assert!(error.to_string().contains("K = 3"), "{error}");
    }
}

// ----------------------------------------------------------- activations

const ACTIVATIONS: [Activation; 8] = [
    Activation::Identity,
    Activation::Relu,
    Activation::Relu6,
    Activation::GeluExact,
    Activation::GeluTanh,
    Activation::QuickGelu,
    Activation::Silu,
    Activation::Tanh,
];

#[test]
fn activations_forward_and_backward() {
    let n = 1000;
    for device in devices() {
        let x = random_scaled(n, 21, 8.0);
        let r = random(n, 22);
        for act in ACTIVATIONS {
            let xt = upload(device, &[10, 100], &x);
            let y = device.activation(&xt, act).unwrap();
            let want: Vec<f64> = x.iter().map(|&v| act64(act, v as f64)).collect();
            assert_close(device, &format!("{act:?} forward"), &download(&y), &want, 1e-5);

            let dx = device.activation_backward(&xt, &upload(device, &[10, 100], &r), act).unwrap();
            let want = numeric_grad(&to_f64(&x), &to_f64(&r), |x| x.iter().map(|&v| act64(act, v)).collect());
            assert_close(device, &format!("{act:?} backward"), &download(&dx), &want, 1e-4);
        }
    }
}

#[test]
fn silu_mul_forward_and_backward() {
    let n = 257;
    for device in devices() {
        let (g, u, r) = (random_scaled(n, 31, 4.0), random(n, 32), random(n, 33));
        let (gt, ut) = (upload(device, &[n], &g), upload(device, &[n], &u));
        let y = device.silu_mul(&gt, &ut).unwrap();
        let want: Vec<f64> = g.iter().zip(&u).map(|(&g, &u)| act64(Activation::Silu, g as f64) * u as f64).collect();
        assert_close(device, "silu_mul forward", &download(&y), &want, 1e-5);

        let (dg, du) = device.silu_mul_backward(&gt, &ut, &upload(device, &[n], &r)).unwrap();
        let u64s = to_f64(&u);
        let g64s = to_f64(&g);
        let want_dg = numeric_grad(&g64s, &to_f64(&r), |g| g.iter().zip(&u64s).map(|(&g, &u)| act64(Activation::Silu, g) * u).collect());
        let want_du = numeric_grad(&u64s, &to_f64(&r), |u| g64s.iter().zip(u).map(|(&g, &u)| act64(Activation::Silu, g) * u).collect());
        assert_close(device, "silu_mul dgate", &download(&dg), &want_dg, 1e-4);
        assert_close(device, "silu_mul dup", &download(&du), &want_du, 1e-4);
    }
}

#[test]
fn tanh_gate_forward_and_backward() {
    let n = 300;
    for device in devices() {
        let (x, y, r) = (random(n, 41), random(n, 42), random(n, 43));
        let gate = [0.37f32];
        let (yt, gt) = (upload(device, &[3, 100], &y), upload(device, &[1], &gate));
        let out = device.tanh_gate_add(&upload(device, &[3, 100], &x), &yt, &gt).unwrap();
        let t = (gate[0] as f64).tanh();
        let want: Vec<f64> = x.iter().zip(&y).map(|(&x, &y)| x as f64 + t * y as f64).collect();
        assert_close(device, "tanh gate forward", &download(&out), &want, 1e-6);

        let (dy, dgate) = device.tanh_gate_add_backward(&yt, &gt, &upload(device, &[3, 100], &r)).unwrap();
        let y64 = to_f64(&y);
        let want_dy = numeric_grad(&y64, &to_f64(&r), |y| y.iter().map(|v| t * v).collect());
        let want_dgate = numeric_grad(&[gate[0] as f64], &to_f64(&r), |g| y64.iter().map(|v| g[0].tanh() * v).collect());
        assert_close(device, "tanh gate dy", &download(&dy), &want_dy, 1e-5);
        assert_close(device, "tanh gate dgate", &download(&dgate), &want_dgate, 1e-4);

        // A zero gate passes x through unchanged, bit for bit.
        let zero = upload(device, &[1], &[0.0]);
        let out = device.tanh_gate_add(&upload(device, &[3, 100], &x), &yt, &zero).unwrap();
        assert_eq!(download(&out), x, "a zero gate must leave x unchanged on {}", device.description());
    }
}

// ------------------------------------------------- elementwise and sums

#[test]
fn elementwise_and_broadcast() {
    for device in devices() {
        let (a, b) = (random(60, 51), random(60, 52));
        let (at, bt) = (upload(device, &[3, 4, 5], &a), upload(device, &[3, 4, 5], &b));
        type Reference = fn(f64, f64) -> f64;
        let cases: [(Binary, Reference); 3] = [(Binary::Add, |x, y| x + y), (Binary::Sub, |x, y| x - y), (Binary::Mul, |x, y| x * y)];
        for (op, f) in cases {
            let c = device.binary(&at, &bt, op).unwrap();
            let want: Vec<f64> = a.iter().zip(&b).map(|(&x, &y)| f(x as f64, y as f64)).collect();
            assert_close(device, &format!("{op:?}"), &download(&c), &want, 1e-6);
        }
        let scaled = device.scale(&at, -2.5).unwrap();
        assert_close(device, "scale", &download(&scaled), &a.iter().map(|&v| v as f64 * -2.5).collect::<Vec<_>>(), 1e-6);

        let mut acc = device.copy(&at).unwrap();
        device.axpy(&mut acc, 0.5, &bt).unwrap();
        device.scale_assign(&mut acc, 2.0).unwrap();
        let want: Vec<f64> = a.iter().zip(&b).map(|(&x, &y)| 2.0 * (x as f64 + 0.5 * y as f64)).collect();
        assert_close(device, "axpy then scale_assign", &download(&acc), &want, 1e-6);

        let row = random(20, 53);
        let c = device.broadcast_add(&at, &upload(device, &[4, 5], &row)).unwrap();
        let want: Vec<f64> = a.iter().enumerate().map(|(i, &x)| x as f64 + row[i % 20] as f64).collect();
        assert_close(device, "broadcast_add", &download(&c), &want, 1e-6);

        let expanded = device.broadcast_to(&upload(device, &[5], &row[..5]), &[2, 3, 5]).unwrap();
        let want: Vec<f64> = (0..30).map(|i| row[i % 5] as f64).collect();
        assert_close(device, "broadcast_to", &download(&expanded), &want, 0.0);
    }
}

#[test]
fn sums_over_all_and_leading_axes() {
    for device in devices() {
        for &n in &[1usize, 7, 1000, 70_001] {
            let x = random(n, 61 + n as u64);
            let t = upload(device, &[n], &x);
            let want_sum: f64 = x.iter().map(|&v| v as f64).sum();
            let want_squares: f64 = x.iter().map(|&v| (v as f64).powi(2)).sum();
            assert_close(device, &format!("sum of {n}"), &download(&device.sum(&t).unwrap()), &[want_sum], 1e-5);
            assert_close(device, &format!("sum of squares of {n}"), &download(&device.sum_squares(&t).unwrap()), &[want_squares], 1e-5);
        }
        let x = random(4 * 3 * 129, 64);
        let t = upload(device, &[4, 3, 129], &x);
        let sums = device.sum_leading(&t, 1).unwrap();
        assert_eq!(sums.shape(), [129]);
        let want: Vec<f64> = (0..129).map(|c| (0..12).map(|r| x[r * 129 + c] as f64).sum()).collect();
        assert_close(device, "sum_leading", &download(&sums), &want, 1e-5);
        let sums = device.sum_leading(&t, 2).unwrap();
        assert_eq!(sums.shape(), [3, 129]);
    }
}

// --------------------------------------------------------------- softmax

fn softmax64(x: &[f64], cols: usize) -> Vec<f64> {
    x.chunks(cols)
        .flat_map(|row| {
            let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let total: f64 = row.iter().map(|v| (v - max).exp()).sum();
            row.iter().map(move |v| (v - max).exp() / total).collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn softmax_forward_and_backward() {
    for device in devices() {
        for &(rows, cols) in &[(1usize, 1usize), (3, 7), (5, 1000), (2, 4099)] {
            let x = random_scaled(rows * cols, 71, 5.0);
            let r = random(rows * cols, 72);
            let y = device.softmax(&upload(device, &[rows, cols], &x)).unwrap();
            assert_close(device, &format!("softmax {rows}x{cols}"), &download(&y), &softmax64(&to_f64(&x), cols), 1e-5);
            let dx = device.softmax_backward(&y, &upload(device, &[rows, cols], &r)).unwrap();
            let want = numeric_grad(&to_f64(&x), &to_f64(&r), |x| softmax64(x, cols));
            assert_close(device, &format!("softmax backward {rows}x{cols}"), &download(&dx), &want, 1e-4);
        }
    }
}

// ----------------------------------------------------------------- norms

fn layer_norm64(x: &[f64], w: &[f64], b: &[f64], cols: usize, eps: f64) -> Vec<f64> {
    x.chunks(cols)
        .flat_map(|row| {
            let mean = row.iter().sum::<f64>() / cols as f64;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / cols as f64;
            let rstd = 1.0 / (var + eps).sqrt();
            row.iter().enumerate().map(move |(c, v)| (v - mean) * rstd * w[c] + b[c]).collect::<Vec<_>>()
        })
        .collect()
}

fn rms_norm64(x: &[f64], w: &[f64], cols: usize, eps: f64) -> Vec<f64> {
    x.chunks(cols)
        .flat_map(|row| {
            let rstd = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / cols as f64 + eps).sqrt();
            row.iter().enumerate().map(move |(c, v)| v * rstd * w[c]).collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn layer_norm_forward_and_backward() {
    let eps = 1e-5;
    for device in devices() {
        for &(rows, cols) in &[(1usize, 1usize), (4, 7), (3, 576), (2, 1280)] {
            let x = random_scaled(rows * cols, 81, 3.0);
            let w = random(cols, 82);
            let b = random(cols, 83);
            let r = random(rows * cols, 84);
            let (xt, wt) = (upload(device, &[rows, cols], &x), upload(device, &[cols], &w));
            let (y, stats) = device.layer_norm(&xt, &wt, Some(&upload(device, &[cols], &b)), eps as f32).unwrap();
            let (x64, w64, b64) = (to_f64(&x), to_f64(&w), to_f64(&b));
            let tol = if cols == 1 { 1e-3 } else { 1e-5 };
            assert_close(device, &format!("layer_norm {rows}x{cols}"), &download(&y), &layer_norm64(&x64, &w64, &b64, cols, eps), tol);
            if cols == 1 {
                continue;
            }
            let grads = device.layer_norm_backward(&xt, &wt, &stats, &upload(device, &[rows, cols], &r), true).unwrap();
            let r64 = to_f64(&r);
            let want_dx = numeric_grad(&x64, &r64, |x| layer_norm64(x, &w64, &b64, cols, eps));
            let want_dw = numeric_grad(&w64, &r64, |w| layer_norm64(&x64, w, &b64, cols, eps));
            let want_db = numeric_grad(&b64, &r64, |b| layer_norm64(&x64, &w64, b, cols, eps));
            assert_close(device, "layer_norm dx", &download(&grads.dx), &want_dx, 1e-4);
            assert_close(device, "layer_norm dw", &download(grads.dweight.as_ref().unwrap()), &want_dw, 1e-4);
            assert_close(device, "layer_norm db", &download(grads.dbias.as_ref().unwrap()), &want_db, 1e-4);

            let frozen = device.layer_norm_backward(&xt, &wt, &stats, &upload(device, &[rows, cols], &r), false).unwrap();
            assert!(frozen.dweight.is_none() && frozen.dbias.is_none());
            assert_close(device, "layer_norm dx without weight grads", &download(&frozen.dx), &want_dx, 1e-4);
        }
    }
}

#[test]
fn rms_norm_forward_and_backward() {
    let eps = 1e-5;
    for device in devices() {
        for &(rows, cols) in &[(4usize, 7usize), (3, 576)] {
            let x = random_scaled(rows * cols, 91, 3.0);
            let w = random(cols, 92);
            let r = random(rows * cols, 93);
            let (xt, wt) = (upload(device, &[rows, cols], &x), upload(device, &[cols], &w));
            let (y, stats) = device.rms_norm(&xt, &wt, eps as f32).unwrap();
            let (x64, w64) = (to_f64(&x), to_f64(&w));
            assert_close(device, "rms_norm", &download(&y), &rms_norm64(&x64, &w64, cols, eps), 1e-5);
            let grads = device.rms_norm_backward(&xt, &wt, &stats, &upload(device, &[rows, cols], &r), true).unwrap();
            let r64 = to_f64(&r);
            let want_dx = numeric_grad(&x64, &r64, |x| rms_norm64(x, &w64, cols, eps));
            let want_dw = numeric_grad(&w64, &r64, |w| rms_norm64(&x64, w, cols, eps));
            assert_close(device, "rms_norm dx", &download(&grads.dx), &want_dx, 1e-4);
            assert_close(device, "rms_norm dw", &download(grads.dweight.as_ref().unwrap()), &want_dw, 1e-4);
        }
    }
}

// ------------------------------------------------------------- attention

/// One attention case: sizes and host-side masks.
struct AttentionCase {
    name: &'static str,
    batch: usize,
    tq: usize,
    tk: usize,
    hq: usize,
    hkv: usize,
    d: usize,
    dv: usize,
    causal: bool,
    key_padding: Option<Vec<u32>>,
    media: Option<(Vec<u32>, Vec<u32>)>,
}

impl AttentionCase {
    fn allows(&self, b: usize, i: usize, j: usize) -> bool {
        if self.causal && j > i + (self.tk - self.tq) {
            return false;
        }
        if let Some(padding) = &self.key_padding {
            if padding[b * self.tk + j] == 0 {
                return false;
            }
        }
        if let Some((query_media, key_media)) = &self.media {
            let image = query_media[b * self.tq + i];
            if image == 0 || key_media[b * self.tk + j] != image {
                return false;
            }
        }
        true
    }

    /// Attention output in f64, [B, Tq, Hq, Dv].
    fn reference(&self, q: &[f64], k: &[f64], v: &[f64], scale: f64) -> Vec<f64> {
        let mut out = vec![0.0; self.batch * self.tq * self.hq * self.dv];
        let group = self.hq / self.hkv;
        for b in 0..self.batch {
            for i in 0..self.tq {
                for h in 0..self.hq {
                    let g = h / group;
                    let query = &q[((b * self.tq + i) * self.hq + h) * self.d..][..self.d];
                    let allowed: Vec<usize> = (0..self.tk).filter(|&j| self.allows(b, i, j)).collect();
                    let scores: Vec<f64> = allowed
                        .iter()
                        .map(|&j| scale * query.iter().zip(&k[((b * self.tk + j) * self.hkv + g) * self.d..][..self.d]).map(|(x, y)| x * y).sum::<f64>())
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let total: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                    let row = &mut out[((b * self.tq + i) * self.hq + h) * self.dv..][..self.dv];
                    for (&j, s) in allowed.iter().zip(&scores) {
                        let p = (s - max).exp() / total;
                        for (o, value) in row.iter_mut().zip(&v[((b * self.tk + j) * self.hkv + g) * self.dv..][..self.dv]) {
                            *o += p * value;
                        }
                    }
                }
            }
        }
        out
    }
}

fn attention_cases() -> Vec<AttentionCase> {
    let base = AttentionCase { name: "plain", batch: 2, tq: 5, tk: 7, hq: 2, hkv: 2, d: 8, dv: 8, causal: false, key_padding: None, media: None };
    vec![
        base,
        AttentionCase { name: "causal grouped-query", batch: 2, tq: 6, tk: 6, hq: 4, hkv: 2, d: 8, dv: 8, causal: true, key_padding: None, media: None },
        AttentionCase { name: "causal after a cache", batch: 1, tq: 3, tk: 8, hq: 3, hkv: 1, d: 4, dv: 4, causal: true, key_padding: None, media: None },
        AttentionCase {
            name: "key padding",
            batch: 2, tq: 4, tk: 5, hq: 2, hkv: 1, d: 6, dv: 6, causal: true,
            key_padding: Some(vec![0, 0, 1, 1, 1, 1, 1, 1, 1, 1]),
            media: None,
        },
        AttentionCase {
            name: "media",
            batch: 2, tq: 6, tk: 6, hq: 2, hkv: 2, d: 4, dv: 5, causal: false,
            key_padding: None,
            // Latents of image 1 then image 2 (three each); tokens before the first image see nothing.
            media: Some((vec![0, 1, 1, 2, 2, 2, 0, 0, 1, 1, 1, 1], vec![1, 1, 1, 2, 2, 2, 1, 1, 1, 2, 2, 2])),
        },
        AttentionCase { name: "long keys", batch: 1, tq: 3, tk: 300, hq: 2, hkv: 1, d: 16, dv: 16, causal: false, key_padding: None, media: None },
    ]
}

#[test]
fn attention_forward_and_backward() {
    for device in devices() {
        for (index, case) in attention_cases().into_iter().enumerate() {
            let seed = 100 + index as u64 * 10;
            let q = random(case.batch * case.tq * case.hq * case.d, seed);
            let k = random(case.batch * case.tk * case.hkv * case.d, seed + 1);
            let v = random(case.batch * case.tk * case.hkv * case.dv, seed + 2);
            let r = random(case.batch * case.tq * case.hq * case.dv, seed + 3);
            let scale = 1.0 / (case.d as f32).sqrt();
            let qt = upload(device, &[case.batch, case.tq, case.hq, case.d], &q);
            let kt = upload(device, &[case.batch, case.tk, case.hkv, case.d], &k);
            let vt = upload(device, &[case.batch, case.tk, case.hkv, case.dv], &v);
            let padding = case.key_padding.as_ref().map(|p| device.from_u32(vec![case.batch, case.tk], p.clone()).unwrap());
            let media = case.media.as_ref().map(|(qm, km)| {
                (device.from_u32(vec![case.batch, case.tq], qm.clone()).unwrap(), device.from_u32(vec![case.batch, case.tk], km.clone()).unwrap())
            });
            let mask = AttentionMask {
                causal: case.causal,
                key_padding: padding.as_ref(),
                media: media.as_ref().map(|(qm, km)| MediaMask { query_media: qm, key_media: km }),
            };

            let forward = device.attention(&qt, &kt, &vt, &mask, scale).unwrap();
            let (q64, k64, v64, r64) = (to_f64(&q), to_f64(&k), to_f64(&v), to_f64(&r));
            let want = case.reference(&q64, &k64, &v64, scale as f64);
            let out = download(&forward.out);
            assert_close(device, &format!("attention {}", case.name), &out, &want, 1e-5);

            let grads = device.attention_backward(&qt, &kt, &vt, &forward, &upload(device, &[case.batch, case.tq, case.hq, case.dv], &r), &mask, scale).unwrap();
            let want_dq = numeric_grad(&q64, &r64, |q| case.reference(q, &k64, &v64, scale as f64));
            let want_dk = numeric_grad(&k64, &r64, |k| case.reference(&q64, k, &v64, scale as f64));
            let want_dv = numeric_grad(&v64, &r64, |v| case.reference(&q64, &k64, v, scale as f64));
            assert_close(device, &format!("attention {} dq", case.name), &download(&grads.dq), &want_dq, 1e-4);
            assert_close(device, &format!("attention {} dk", case.name), &download(&grads.dk), &want_dk, 1e-4);
            assert_close(device, &format!("attention {} dv", case.name), &download(&grads.dv), &want_dv, 1e-4);

            // Rows that may attend no key are exactly zero, and so are their gradients.
            let dq = download(&grads.dq);
            let lse = download(&forward.lse);
            for b in 0..case.batch {
                for i in 0..case.tq {
                    if (0..case.tk).any(|j| case.allows(b, i, j)) {
                        continue;
                    }
                    for h in 0..case.hq {
                        let row = ((b * case.tq + i) * case.hq + h) * case.dv;
                        assert!(out[row..row + case.dv].iter().all(|&v| v == 0.0), "{}: masked row not zero on {}", case.name, device.description());
                        let qrow = ((b * case.tq + i) * case.hq + h) * case.d;
                        assert!(dq[qrow..qrow + case.d].iter().all(|&v| v == 0.0), "{}: masked dq not zero", case.name);
                        assert_eq!(lse[(b * case.hq + h) * case.tq + i], f32::NEG_INFINITY, "{}: masked lse", case.name);
                    }
                }
            }
        }
    }
}

// ------------------------------------------------- embedding and RoPE

#[test]
fn embedding_gather_and_scatter() {
    let (vocab, cols) = (10, 6);
    for device in devices() {
        let table = random(vocab * cols, 201);
        let ids = vec![3u32, 12, 12, 0, 11, 9, 12];
        let offset = 2;
        let tt = upload(device, &[vocab, cols], &table);
        let it = device.from_u32(vec![7], ids.clone()).unwrap();
        let rows = device.embedding(&tt, &it, offset).unwrap();
        assert_eq!(rows.shape(), [7, cols]);
        let want = expected_rows(&table, &ids, offset, cols, vocab, |v| v as f64);
        assert_close(device, "embedding gather with offset", &download(&rows), &want, 0.0);

        let dy = random(7 * cols, 202);
        let mut dtable = device.zeros(vec![vocab, cols], DType::F32).unwrap();
        device.embedding_backward(&mut dtable, &it, &upload(device, &[7, cols], &dy), offset).unwrap();
        let mut want = vec![0.0f64; vocab * cols];
        for (n, &id) in ids.iter().enumerate() {
            if id >= offset && ((id - offset) as usize) < vocab {
                for c in 0..cols {
                    want[(id - offset) as usize * cols + c] += dy[n * cols + c] as f64;
                }
            }
        }
        assert_close(device, "embedding scatter-add with repeated ids", &download(&dtable), &want, 1e-6);

        let t16 = device.cast(&tt, DType::F16).unwrap();
        let rows = device.embedding(&t16, &it, offset).unwrap();
        assert_close(device, "embedding from f16", &download(&rows), &expected_rows(&table, &ids, offset, cols, vocab, |v| half::f16::from_f32(v).to_f64()), 0.0);
    }
}

/// The rows an embedding lookup should return, each value passed through `round`.
fn expected_rows(table: &[f32], ids: &[u32], offset: u32, cols: usize, vocab: usize, round: impl Fn(f32) -> f64) -> Vec<f64> {
    let mut rows = Vec::new();
    for &id in ids {
        let inside = id >= offset && ((id - offset) as usize) < vocab;
        for c in 0..cols {
            rows.push(if inside { round(table[(id - offset) as usize * cols + c]) } else { 0.0 });
        }
    }
    rows
}

fn rope64(x: &[f64], positions: &[u32], heads: usize, d: usize, base: f64) -> Vec<f64> {
    let half = d / 2;
    let mut out = x.to_vec();
    for (row, values) in out.chunks_mut(d).enumerate() {
        let position = positions[row / heads] as f64;
        for i in 0..half {
            let angle = position / base.powf((2 * i) as f64 / d as f64);
            let (a, b) = (values[i], values[i + half]);
            values[i] = a * angle.cos() - b * angle.sin();
            values[i + half] = b * angle.cos() + a * angle.sin();
        }
    }
    out
}

#[test]
fn rope_forward_and_backward() {
    let (batch, time, heads, d) = (2, 5, 3, 8);
    for device in devices() {
        let x = random(batch * time * heads * d, 211);
        let r = random(x.len(), 212);
        let positions: Vec<u32> = vec![0, 1, 2, 3, 4, 7, 8, 9, 10, 300];
        let pt = device.from_u32(vec![batch, time], positions.clone()).unwrap();
        let y = device.rope(&upload(device, &[batch, time, heads, d], &x), &pt, 10000.0).unwrap();
        assert_close(device, "rope", &download(&y), &rope64(&to_f64(&x), &positions, heads, d, 10000.0), 1e-5);
        let dx = device.rope_backward(&upload(device, &[batch, time, heads, d], &r), &pt, 10000.0).unwrap();
        let want = numeric_grad(&to_f64(&x), &to_f64(&r), |x| rope64(x, &positions, heads, d, 10000.0));
        assert_close(device, "rope backward", &download(&dx), &want, 1e-4);
    }
}

// --------------------------------------------------------- cross-entropy

fn cross_entropy64(x: &[f64], targets: &[u32], vocab: usize) -> Vec<f64> {
    x.chunks(vocab)
        .zip(targets)
        .map(|(row, &t)| {
            if t == IGNORE_INDEX {
                return 0.0;
            }
            let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
            lse - row[t as usize]
        })
        .collect()
}

#[test]
fn cross_entropy_forward_and_backward() {
    for device in devices() {
        // A small vocabulary checked by finite differences.
        let (rows, vocab) = (4, 11);
        let x = random_scaled(rows * vocab, 221, 4.0);
        let targets = vec![3, IGNORE_INDEX, 0, 10];
        let lt = upload(device, &[rows, vocab], &x);
        let tt = device.from_u32(vec![rows], targets.clone()).unwrap();
        let out = device.cross_entropy(&lt, &tt).unwrap();
        assert_close(device, "cross-entropy losses", &download(&out.losses), &cross_entropy64(&to_f64(&x), &targets, vocab), 1e-5);
        let scale = 0.25;
        let dlogits = device.cross_entropy_backward(&lt, &out.lse, &tt, scale).unwrap();
        let weights = vec![scale as f64; rows];
        let want = numeric_grad(&to_f64(&x), &weights, |x| cross_entropy64(x, &targets, vocab));
        assert_close(device, "cross-entropy backward", &download(&dlogits), &want, 1e-4);

        // SmolLM2's vocabulary: the loss still matches the f64 reference.
        let (rows, vocab) = (3, 49152);
        let x = random_scaled(rows * vocab, 222, 10.0);
        let targets = vec![0, 49151, 12345];
        let out = device.cross_entropy(&upload(device, &[rows, vocab], &x), &device.from_u32(vec![rows], targets.clone()).unwrap()).unwrap();
        assert_close(device, "cross-entropy over 49152 logits", &download(&out.losses), &cross_entropy64(&to_f64(&x), &targets, vocab), 1e-5);
    }
}

#[test]
fn cross_entropy_rejects_target_outside_vocabulary() {
    let device = Device::cpu();
    let logits = device.zeros(vec![2, 5], DType::F32).unwrap();
    let targets = device.from_u32(vec![2], vec![1, 5]).unwrap();
    let error = device.cross_entropy(&logits, &targets).unwrap_err();
    assert!(error.to_string().contains("target id 5"), "{error}");
}

// ----------------------------------------------------------------- AdamW

#[test]
fn adamw_matches_reference() {
    let n = 1001;
    for device in devices() {
        let p0 = random(n, 231);
        let mut param = upload(device, &[n], &p0);
        let mut m = device.zeros(vec![n], DType::F32).unwrap();
        let mut v = device.zeros(vec![n], DType::F32).unwrap();
        let (mut p64, mut m64, mut v64) = (to_f64(&p0), vec![0.0f64; n], vec![0.0f64; n]);
        for step in 1..=3u64 {
            let g = random(n, 231 + step);
            let hyper = AdamW { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1, step };
            device.adamw_step(&mut param, &upload(device, &[n], &g), &mut m, &mut v, &hyper).unwrap();
            for i in 0..n {
                let g = g[i] as f64;
                p64[i] *= 1.0 - 1e-2 * 0.1;
                m64[i] = 0.9 * m64[i] + 0.1 * g;
                v64[i] = 0.999 * v64[i] + 0.001 * g * g;
                let m_hat = m64[i] / (1.0 - 0.9f64.powi(step as i32));
                let v_hat = v64[i] / (1.0 - 0.999f64.powi(step as i32));
                p64[i] -= 1e-2 * m_hat / (v_hat.sqrt() + 1e-8);
            }
        }
        assert_close(device, "AdamW parameters after 3 steps", &download(&param), &p64, 1e-5);
        assert_close(device, "AdamW first moment", &download(&m), &m64, 1e-5);
    }
}

#[test]
fn in_place_ops_reject_shared_tensors() {
    for device in devices() {
        let mut a = device.zeros(vec![4], DType::F32).unwrap();
        let _alias = a.clone();
        let b = device.zeros(vec![4], DType::F32).unwrap();
        let error = device.add_assign(&mut a, &b).unwrap_err();
        assert!(matches!(error, Error::Shared { .. }), "{error}");
    }
}

#[test]
fn ops_reject_tensors_of_another_device() {
    let (first, second) = (Device::cpu(), Device::cpu());
    let a = first.zeros(vec![2, 2], DType::F32).unwrap();
    let b = second.zeros(vec![2, 2], DType::F32).unwrap();
    let error = first.add(&a, &b).unwrap_err();
    assert!(matches!(error, Error::DeviceMismatch { .. }), "{error}");
}

// ------------------------------------------------------------------ conv

/// Convolution in f64: x [N, H, W, Cin], w [Cout, Cin/g, kH, kW] -> [N, Ho, Wo, Cout].
fn conv64(x: &[f64], w: &[f64], bias: &[f64], xs: [usize; 4], ws: [usize; 4], spec: &Conv2d) -> Vec<f64> {
    let [n, h, wd, cin] = xs;
    let [cout, cin_g, kh, kw] = ws;
    let cout_g = cout / spec.groups;
    let [top, left, bottom, right] = spec.padding;
    let ho = (h + top + bottom - kh) / spec.stride.0 + 1;
    let wo = (wd + left + right - kw) / spec.stride.1 + 1;
    let mut out = vec![0.0; n * ho * wo * cout];
    for b in 0..n {
        for oh in 0..ho {
            for ow in 0..wo {
                for o in 0..cout {
                    let group = o / cout_g;
                    let mut total = bias[o];
                    for c in 0..cin_g {
                        for ki in 0..kh {
                            for kj in 0..kw {
                                let ih = (oh * spec.stride.0 + ki) as isize - top as isize;
                                let iw = (ow * spec.stride.1 + kj) as isize - left as isize;
                                if ih < 0 || iw < 0 || ih >= h as isize || iw >= wd as isize {
                                    continue;
                                }
                                let input = x[((b * h + ih as usize) * wd + iw as usize) * cin + group * cin_g + c];
                                total += input * w[((o * cin_g + c) * kh + ki) * kw + kj];
                            }
                        }
                    }
                    out[((b * ho + oh) * wo + ow) * cout + o] = act64(spec.activation, total);
                }
            }
        }
    }
    out
}

#[test]
fn conv2d_variants() {
    let cases: Vec<(&str, [usize; 4], [usize; 4], Conv2d)> = vec![
        ("stem 3x3 stride 2, TensorFlow padding", [2, 9, 8, 3], [5, 3, 3, 3], Conv2d { stride: (2, 2), padding: [0, 0, 1, 1], groups: 1, activation: Activation::Relu6 }),
        ("depthwise 3x3", [1, 7, 6, 8], [8, 1, 3, 3], Conv2d { stride: (1, 1), padding: [1, 1, 1, 1], groups: 8, activation: Activation::Relu6 }),
        ("depthwise 3x3 stride 2", [2, 8, 8, 4], [4, 1, 3, 3], Conv2d { stride: (2, 2), padding: [0, 0, 1, 1], groups: 4, activation: Activation::Identity }),
        ("pointwise", [2, 5, 4, 16], [24, 16, 1, 1], Conv2d::default()),
        ("grouped 2x3", [1, 6, 7, 6], [4, 3, 2, 3], Conv2d { stride: (1, 2), padding: [1, 0, 0, 2], groups: 2, activation: Activation::Identity }),
    ];
    for device in devices() {
        for (index, (name, xs, ws, spec)) in cases.iter().enumerate() {
            let x = random(xs.iter().product(), 300 + index as u64);
            let w = random(ws.iter().product(), 310 + index as u64);
            let bias = random(ws[0], 320 + index as u64);
            let out = device
                .conv2d(&upload(device, xs, &x), &upload(device, ws, &w), Some(&upload(device, &[ws[0]], &bias)), spec)
                .unwrap();
            let want = conv64(&to_f64(&x), &to_f64(&w), &to_f64(&bias), *xs, *ws, spec);
            assert_close(device, &format!("conv2d {name}"), &download(&out), &want, 1e-5);
        }
    }
}

// ---------------------------------------------------------- shape ops

#[test]
fn concat_narrow_permute_cast() {
    for device in devices() {
        let a = random(2 * 3 * 4, 401);
        let b = random(2 * 5 * 4, 402);
        let (at, bt) = (upload(device, &[2, 3, 4], &a), upload(device, &[2, 5, 4], &b));
        let joined = device.concat(&[&at, &bt], 1).unwrap();
        assert_eq!(joined.shape(), [2, 8, 4]);
        let mut want = Vec::new();
        for o in 0..2 {
            want.extend(to_f64(&a[o * 12..(o + 1) * 12]));
            want.extend(to_f64(&b[o * 20..(o + 1) * 20]));
        }
        assert_close(device, "concat", &download(&joined), &want, 0.0);

        let back = device.narrow(&joined, 1, 3, 5).unwrap();
        assert_close(device, "narrow", &download(&back), &to_f64(&b), 0.0);

        let permuted = device.permute(&at, &[2, 0, 1]).unwrap();
        assert_eq!(permuted.shape(), [4, 2, 3]);
        let got = download(&permuted);
        for i in 0..4 {
            for j in 0..2 {
                for k in 0..3 {
                    assert_eq!(got[(i * 2 + j) * 3 + k], a[(j * 3 + k) * 4 + i], "permute at {i},{j},{k} on {}", device.description());
                }
            }
        }

        let halved = device.cast(&at, DType::F16).unwrap();
        assert_eq!(halved.dtype(), DType::F16);
        let restored = device.cast(&halved, DType::F32).unwrap();
        let want: Vec<f64> = a.iter().map(|&v| half::f16::from_f32(v).to_f64()).collect();
        assert_close(device, "cast round trip", &download(&restored), &want, 0.0);
    }
}
