//! The op API: every op's forward and backward, as methods on [`crate::Device`].
//!
//! Each file holds one op family: the public methods with their shape
//! checks, and the CPU reference implementation they dispatch to on the CPU
//! backend. The wgpu implementation of the same family lives in
//! `crate::gpu` and the WGSL it runs in the workspace's `shaders/` folder;
//! both must agree with the CPU version, which the tests check.

pub mod activation;
pub mod adamw;
pub mod attention;
pub mod conv;
pub mod cross_entropy;
pub mod dequantize;
pub mod elementwise;
pub mod embedding;
pub mod matmul;
pub mod norm;
pub mod reduce;
pub mod rope;
pub mod shape;
pub mod softmax;

use rayon::prelude::*;

/// Elements per rayon task in elementwise CPU loops: small enough to spread
/// big tensors over all threads, big enough that tiny tensors stay on one.
pub(crate) const CPU_CHUNK: usize = 16 * 1024;

/// Applies `f` to matching chunks of `out` and `input` in parallel.
pub(crate) fn par_zip_map(out: &mut [f32], input: &[f32], f: impl Fn(&mut f32, f32) + Sync) {
    out.par_chunks_mut(CPU_CHUNK)
        .zip(input.par_chunks(CPU_CHUNK))
        .for_each(|(out, input)| {
            for (o, &x) in out.iter_mut().zip(input) {
                f(o, x);
            }
        });
}

/// Runs `f` on each row of `out` (of `cols` elements) with its index, in parallel.
pub(crate) fn par_rows(out: &mut [f32], cols: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    if cols == 0 {
        return;
    }
    let rows_per_task = (CPU_CHUNK / cols).max(1);
    out.par_chunks_mut(rows_per_task * cols)
        .enumerate()
        .for_each(|(task, chunk)| {
            for (offset, row) in chunk.chunks_mut(cols).enumerate() {
                f(task * rows_per_task + offset, row);
            }
        });
}

/// Sums `rows` rows of `cols` columns into one row, in parallel over row blocks.
pub(crate) fn par_column_sums(rows: usize, cols: usize, row_value: impl Fn(usize, &mut [f64]) + Sync) -> Vec<f32> {
    let rows_per_task = (CPU_CHUNK / cols.max(1)).max(1);
    let tasks = rows.div_ceil(rows_per_task);
    let total = (0..tasks)
        .into_par_iter()
        .map(|task| {
            let mut sums = vec![0.0f64; cols];
            let end = ((task + 1) * rows_per_task).min(rows);
            for row in task * rows_per_task..end {
                row_value(row, &mut sums);
            }
            sums
        })
        .reduce(
            || vec![0.0f64; cols],
            |mut a, b| {
                for (x, y) in a.iter_mut().zip(b) {
                    *x += y;
                }
                a
            },
        );
    total.into_iter().map(|value| value as f32).collect()
}
