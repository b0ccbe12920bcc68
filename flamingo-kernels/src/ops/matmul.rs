//! Matrix products in the three layouts backward passes need.
//!
//! `matmul` computes C = op(A)·op(B) (+ bias, then an activation), where op
//! transposes when asked. A is [batch…, M, K] ([batch…, K, M] when
//! transposed); B is a shared [K, N] matrix ([N, K] when transposed, the
//! layout of a PyTorch `Linear` weight) or has A's batch axes. C is
//! [batch…, M, N]. For a linear layer y = x·Wᵀ:
//!
//! - forward:          `matmul(x, w, trans_b)`          (A·Bᵀ)
//! - input gradient:   `matmul(dy, w)`                  (A·B)
//! - weight gradient:  `matmul_accumulate(dw, dy, x, trans_a)` (Aᵀ·B)
//!
//! B may be stored as f16 (frozen weights); A, bias and C are f32.

use crate::device::{Backend, Device};
use crate::error::{shape_err, Result};
use crate::ops::activation::Activation;
use crate::ops::par_rows;
use crate::tensor::{DType, Tensor};

/// Options of [`Device::matmul`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Matmul<'a> {
    /// Use Aᵀ: A is stored [batch…, K, M].
    pub trans_a: bool,
    /// Use Bᵀ: B is stored [N, K] (or [batch…, N, K]).
    pub trans_b: bool,
    /// Added to every row of the product, shape [N].
    pub bias: Option<&'a Tensor>,
    /// Applied after the bias.
    pub activation: Activation,
}

impl<'a> Matmul<'a> {
    /// A·B.
    pub fn new() -> Self {
        Self::default()
    }

    /// A·Bᵀ with a bias, the forward pass of a PyTorch `Linear`.
    pub fn linear(bias: Option<&'a Tensor>) -> Self {
        Self { trans_b: true, bias, ..Self::default() }
    }
}

/// The sizes of one product, resolved from the operand shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MatmulDims {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// Whether B is one matrix shared by every batch entry.
    pub shared_b: bool,
}

pub(crate) fn matmul_dims(op: &'static str, a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool) -> Result<(MatmulDims, Vec<usize>)> {
    if a.rank() < 2 || b.rank() < 2 {
        return Err(shape_err!(op, "operands need two or more axes, found {:?} and {:?}", a.shape(), b.shape()));
    }
    let (ra, rb) = (a.rank(), b.rank());
    let (m, ka) = if trans_a { (a.shape[ra - 1], a.shape[ra - 2]) } else { (a.shape[ra - 2], a.shape[ra - 1]) };
    let (kb, n) = if trans_b { (b.shape[rb - 1], b.shape[rb - 2]) } else { (b.shape[rb - 2], b.shape[rb - 1]) };
    if ka != kb {
        return Err(shape_err!(
            op,
            "inner sizes differ: A {:?}{} has K = {ka}, B {:?}{} has K = {kb}",
            a.shape(),
            if trans_a { "ᵀ" } else { "" },
            b.shape(),
            if trans_b { "ᵀ" } else { "" }
        ));
    }
    let batch_axes = &a.shape[..ra - 2];
    let shared_b = rb == 2;
    if !shared_b && b.shape[..rb - 2] != *batch_axes {
        return Err(shape_err!(op, "batch axes differ: A {:?}, B {:?}", a.shape(), b.shape()));
    }
    let mut out_shape = batch_axes.to_vec();
    out_shape.extend([m, n]);
    let batch = batch_axes.iter().product();
    Ok((MatmulDims { batch, m, n, k: ka, shared_b }, out_shape))
}

/// C = beta·C + alpha·op(A)·op(B) on row-major slices, through the `gemm` crate.
#[allow(clippy::too_many_arguments)]
pub(crate) fn cpu_gemm(
    c: &mut [f32],
    a: &[f32],
    b: &[f32],
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
    alpha: f32,
    beta: f32,
) {
    assert!(c.len() >= m * n && a.len() >= m * k && b.len() >= k * n, "gemm operands are too small");
    if m == 0 || n == 0 {
        return;
    }
    // Strides of op(A)[i, p] and op(B)[p, j] in the row-major storage.
    let (a_rs, a_cs) = if trans_a { (1, m as isize) } else { (k as isize, 1) };
    let (b_rs, b_cs) = if trans_b { (1, k as isize) } else { (n as isize, 1) };
    let flops = m * n * k;
    let parallelism = if flops < 48 * 48 * 48 {
        gemm::Parallelism::None
    } else {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    };
    // SAFETY: the assertion above bounds every index the strides reach:
    // op(A) spans m·k elements, op(B) k·n and C m·n, all within the slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            beta != 0.0,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            beta,
            alpha,
            false,
            false,
            false,
            parallelism,
        );
    }
}

impl Device {
    /// Returns act(op(A)·op(B) + bias); see the module documentation for shapes.
    pub fn matmul(&self, a: &Tensor, b: &Tensor, spec: &Matmul) -> Result<Tensor> {
        const OP: &str = "matmul";
        self.check_f(OP, "a", a, DType::F32)?;
        self.check(OP, "b", b)?;
        if b.dtype == DType::U32 {
            return Err(b.dtype_error(OP, "b", "f32 or f16"));
        }
        let (dims, out_shape) = matmul_dims(OP, a, b, spec.trans_a, spec.trans_b)?;
        if let Some(bias) = spec.bias {
            self.check_f(OP, "bias", bias, DType::F32)?;
            if bias.shape() != [dims.n] {
                return Err(shape_err!(OP, "bias has shape {:?}, expected [{}]", bias.shape(), dims.n));
            }
        }
        match self.backend() {
            Backend::Cpu => {
                let out = cpu_matmul(a, b, spec, dims)?;
                Ok(Tensor::cpu_f32(out_shape, out, self.id()))
            }
            Backend::Gpu(gpu) => gpu.matmul(a, b, spec, dims, out_shape),
        }
    }

    /// Adds alpha·op(A)·op(B) to `c` in place, where A and B are read as
    /// matrices with all leading axes folded into rows. With `trans_a` this
    /// sums a weight gradient over every row of a batch: dW += dYᵀ·X.
    pub fn matmul_accumulate(&self, c: &mut Tensor, a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool, alpha: f32) -> Result<()> {
        const OP: &str = "matmul_accumulate";
        self.check_f(OP, "c", c, DType::F32)?;
        self.check_f(OP, "a", a, DType::F32)?;
        self.check_f(OP, "b", b, DType::F32)?;
        let a2 = a.reshape(matrix_shape(a))?;
        let b2 = b.reshape(matrix_shape(b))?;
        let (dims, out_shape) = matmul_dims(OP, &a2, &b2, trans_a, trans_b)?;
        if c.numel() != out_shape.iter().product::<usize>() || c.rank() < 1 || *c.shape.last().unwrap() != dims.n {
            return Err(shape_err!(OP, "C has shape {:?}, but the product has shape {:?}", c.shape(), out_shape));
        }
        match self.backend() {
            Backend::Cpu => {
                let (x, y) = (a2.cpu_f32_slice(OP, "a")?, b2.cpu_f32_slice(OP, "b")?);
                let out = c.cpu_f32_mut(OP, "c")?;
                cpu_gemm(out, x, y, dims.m, dims.n, dims.k, trans_a, trans_b, alpha, 1.0);
                Ok(())
            }
            Backend::Gpu(gpu) => gpu.matmul_accumulate(c, &a2, &b2, trans_a, trans_b, alpha, dims),
        }
    }
}

/// The shape of `t` with all leading axes folded into rows.
fn matrix_shape(t: &Tensor) -> Vec<usize> {
    let (rows, cols) = t.rows_cols();
    vec![rows, cols]
}

fn cpu_matmul(a: &Tensor, b: &Tensor, spec: &Matmul, dims: MatmulDims) -> Result<Vec<f32>> {
    const OP: &str = "matmul";
    let x = a.cpu_f32_slice(OP, "a")?;
    let y = b.cpu_f32_cow(OP, "b")?;
    let MatmulDims { batch, m, n, k, shared_b } = dims;
    let mut out = vec![0.0f32; batch * m * n];

    if shared_b && !spec.trans_a {
        // Every batch entry multiplies the same B, so fold the batch into rows.
        cpu_gemm(&mut out, x, &y, batch * m, n, k, false, spec.trans_b, 1.0, 0.0);
    } else {
        for index in 0..batch {
            let b_offset = if shared_b { 0 } else { index * k * n };
            cpu_gemm(
                &mut out[index * m * n..(index + 1) * m * n],
                &x[index * m * k..(index + 1) * m * k],
                &y[b_offset..b_offset + k * n],
                m,
                n,
                k,
                spec.trans_a,
                spec.trans_b,
                1.0,
                0.0,
            );
        }
    }

    let bias = match spec.bias {
        Some(bias) => Some(bias.cpu_f32_slice(OP, "bias")?),
        None => None,
    };
    if bias.is_some() || spec.activation != Activation::Identity {
        let act = spec.activation;
        par_rows(&mut out, n, |_, row| {
            if let Some(bias) = bias {
                row.iter_mut().zip(bias).for_each(|(value, b)| *value += b);
            }
            act.apply_in_place(row);
        });
    }
    Ok(out)
}
