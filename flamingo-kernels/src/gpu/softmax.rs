//! Host side of shaders/softmax.wgsl, and the workgroup shape every
//! row-reduction kernel (softmax, norms, cross-entropy) uses.

use crate::error::Result;
use crate::gpu::chunk::Operand;
use crate::gpu::context::{KernelKey, Params};
use crate::gpu::GpuBackend;
use crate::tensor::{DType, Tensor};

const FILE: &str = "softmax.wgsl";

impl GpuBackend {
    /// A row kernel of `file` with the workgroup size that suits the adapter.
    ///
    /// A software rasterizer runs a workgroup's threads as the SIMD lanes of
    /// one CPU thread, where a barrier costs a switch between lanes; with
    /// subgroups, a workgroup of exactly one subgroup reduces a row without
    /// any barrier. A GPU gets 256 threads per row.
    pub(super) fn row_kernel(&self, file: &'static str, entry: &'static str) -> KernelKey {
        let summary = &self.context.summary;
        let software = summary.kind == crate::gpu::AdapterKind::Cpu;
        let min_subgroup = summary.subgroup_sizes.0;
        let (workgroup, one_subgroup) = if software && self.context.subgroups && min_subgroup.is_power_of_two() && min_subgroup <= 256 {
            (min_subgroup, true)
        } else if software {
            (32, false)
        } else {
            (256, false)
        };
        KernelKey::new(file, entry).set("WG", workgroup as f64).set("ONE_SUBGROUP", one_subgroup as u8 as f64)
    }

    /// The grid of one workgroup per row.
    pub(super) fn row_grid(&self, rows: usize) -> [u32; 3] {
        self.context.grid(rows as u64)
    }

    pub(crate) fn softmax(&self, x: &Tensor) -> Result<Tensor> {
        const OP: &str = "softmax";
        let (rows, cols) = x.rows_cols();
        let input = x.gpu_buffer(OP, "x")?;
        let out = self.output(OP, x.shape(), DType::F32)?;
        let row_bytes = (cols * 4) as u64;
        let mut job = self.context.job(OP);
        if cols > 0 {
            self.context.dispatch_rows(
                &mut job,
                &self.row_kernel(FILE, "softmax_forward"),
                rows,
                &[Operand::rows("x", input, row_bytes), Operand::rows_mut("y", &out, row_bytes)],
                |chunk| Params::new().u(chunk.len()).u(cols),
                |chunk| self.row_grid(chunk.len()),
            )?;
        }
        job.submit()?;
        Ok(self.tensor(x.shape.clone(), DType::F32, out))
    }

    pub(crate) fn softmax_backward(&self, y: &Tensor, dy: &Tensor) -> Result<Tensor> {
        const OP: &str = "softmax_backward";
        let (rows, cols) = y.rows_cols();
        let (output, grad) = (y.gpu_buffer(OP, "y")?, dy.gpu_buffer(OP, "dy")?);
        let out = self.output(OP, y.shape(), DType::F32)?;
        let row_bytes = (cols * 4) as u64;
        let mut job = self.context.job(OP);
        if cols > 0 {
            self.context.dispatch_rows(
                &mut job,
                &self.row_kernel(FILE, "softmax_backward"),
                rows,
                &[Operand::rows("y", output, row_bytes), Operand::rows("dy", grad, row_bytes), Operand::rows_mut("dx", &out, row_bytes)],
                |chunk| Params::new().u(chunk.len()).u(cols),
                |chunk| self.row_grid(chunk.len()),
            )?;
        }
        job.submit()?;
        Ok(self.tensor(y.shape.clone(), DType::F32, out))
    }
}
