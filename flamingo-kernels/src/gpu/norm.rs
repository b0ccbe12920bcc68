//! Host side of shaders/norm.wgsl: LayerNorm and RMSNorm, forward and backward.

use crate::error::Result;
use crate::gpu::chunk::Operand;
use crate::gpu::context::{Arg, KernelKey, Params};
use crate::gpu::GpuBackend;
use crate::ops::norm::{NormGrads, NormStats};
use crate::tensor::{DType, Tensor};

const FILE: &str = "norm.wgsl";
const PARTIALS_WORKGROUP: usize = 64;
/// Rows each block of the weight-gradient partial sums covers.
const ROWS_PER_BLOCK: usize = 64;

impl GpuBackend {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn layer_norm(&self, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, eps: f32, rows: usize, cols: usize) -> Result<(Tensor, NormStats)> {
        const OP: &str = "layer_norm";
        let (input, w) = (x.gpu_buffer(OP, "x")?, weight.gpu_buffer(OP, "weight")?);
        let b = match bias {
            Some(bias) => bias.gpu_buffer(OP, "bias")?,
            None => w,
        };
        let out = self.output(OP, x.shape(), DType::F32)?;
        let mean = self.output(OP, &[rows], DType::F32)?;
        let rstd = self.output(OP, &[rows], DType::F32)?;
        let row_bytes = (cols * 4) as u64;
        let key = self.row_kernel(FILE, "layer_norm_forward").set("HAS_BIAS", bias.is_some() as u8 as f64);
        let mut job = self.context.job(OP);
        if cols > 0 {
            self.context.dispatch_rows(
                &mut job,
                &key,
                rows,
                &[
                    Operand::rows("x", input, row_bytes),
                    Operand::whole("weight", w),
                    Operand::whole("bias", b),
                    Operand::rows_mut("out", &out, row_bytes),
                    Operand::rows_mut("mean", &mean, 4),
                    Operand::rows_mut("rstd", &rstd, 4),
                ],
                |chunk| Params::new().u(chunk.len()).u(cols).f(eps),
                |chunk| self.row_grid(chunk.len()),
            )?;
        }
        job.submit()?;
        let stats = NormStats { mean: Some(self.tensor(vec![rows], DType::F32, mean)), rstd: self.tensor(vec![rows], DType::F32, rstd) };
        Ok((self.tensor(x.shape.clone(), DType::F32, out), stats))
    }

    pub(crate) fn rms_norm(&self, x: &Tensor, weight: &Tensor, eps: f32, rows: usize, cols: usize) -> Result<(Tensor, NormStats)> {
        const OP: &str = "rms_norm";
        let (input, w) = (x.gpu_buffer(OP, "x")?, weight.gpu_buffer(OP, "weight")?);
        let out = self.output(OP, x.shape(), DType::F32)?;
        let rstd = self.output(OP, &[rows], DType::F32)?;
        let row_bytes = (cols * 4) as u64;
        let mut job = self.context.job(OP);
        if cols > 0 {
            self.context.dispatch_rows(
                &mut job,
                &self.row_kernel(FILE, "rms_norm_forward"),
                rows,
                &[
                    Operand::rows("x", input, row_bytes),
                    Operand::whole("weight", w),
                    Operand::rows_mut("out", &out, row_bytes),
                    Operand::rows_mut("rstd", &rstd, 4),
                ],
                |chunk| Params::new().u(chunk.len()).u(cols).f(eps),
                |chunk| self.row_grid(chunk.len()),
            )?;
        }
        job.submit()?;
        Ok((self.tensor(x.shape.clone(), DType::F32, out), NormStats { mean: None, rstd: self.tensor(vec![rows], DType::F32, rstd) }))
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn norm_backward(&self, x: &Tensor, weight: &Tensor, stats: &NormStats, dy: &Tensor, param_grads: bool, centered: bool, rows: usize, cols: usize) -> Result<NormGrads> {
        const OP: &str = "norm_backward";
        let (input, w, grad) = (x.gpu_buffer(OP, "x")?, weight.gpu_buffer(OP, "weight")?, dy.gpu_buffer(OP, "dy")?);
        let rstd = stats.rstd.gpu_buffer(OP, "rstd")?;
        // RMSNorm has no mean; its rstd stands in and is never read.
        let mean = match (&stats.mean, centered) {
            (Some(mean), true) => mean.gpu_buffer(OP, "mean")?,
            _ => rstd,
        };
        let dx = self.output(OP, x.shape(), DType::F32)?;
        let row_bytes = (cols * 4) as u64;
        let mut job = self.context.job(OP);
        if cols > 0 {
            self.context.dispatch_rows(
                &mut job,
                &self.row_kernel(FILE, "norm_backward_dx").set("CENTERED", centered as u8 as f64),
                rows,
                &[
                    Operand::rows("x", input, row_bytes),
                    Operand::whole("weight", w),
                    Operand::rows("mean", mean, 4),
                    Operand::rows("rstd", rstd, 4),
                    Operand::rows("dy", grad, row_bytes),
                    Operand::rows_mut("dx", &dx, row_bytes),
                ],
                |chunk| Params::new().u(chunk.len()).u(cols).f(0.0),
                |chunk| self.row_grid(chunk.len()),
            )?;
        }

        let (mut dweight, mut dbias) = (None, None);
        if param_grads {
            let dw = self.output(OP, &[cols], DType::F32)?;
            let db = self.output(OP, &[cols], DType::F32)?;
            if rows == 0 || cols == 0 {
                job.clear(&dw);
                job.clear(&db);
            } else {
                let chunks = self.context.row_chunks(OP, rows, &[("x", row_bytes), ("dy", row_bytes)])?;
                let blocks: usize = chunks.iter().map(|chunk| chunk.len().div_ceil(ROWS_PER_BLOCK)).sum();
                let partial_bytes = (blocks * cols * 4) as u64;
                self.context.check_binding(OP, "weight-gradient partial sums", partial_bytes)?;
                let dw_partials = self.context.allocate(OP, partial_bytes)?;
                let db_partials = self.context.allocate(OP, partial_bytes)?;
                let key = KernelKey::new(FILE, "norm_param_partials").set("CENTERED", centered as u8 as f64).set("WG", 64.0).set("ONE_SUBGROUP", 0.0);
                let mut offset = 0;
                for chunk in chunks {
                    let chunk_blocks = chunk.len().div_ceil(ROWS_PER_BLOCK);
                    let rows_range = |buffer, bytes: u64| Arg::range(buffer, chunk.start as u64 * bytes, chunk.len() as u64 * bytes, true);
                    let args = [
                        rows_range(input, row_bytes),
                        rows_range(mean, 4),
                        rows_range(rstd, 4),
                        rows_range(grad, row_bytes),
                        Arg::write(&dw_partials),
                        Arg::write(&db_partials),
                    ];
                    let params = Params::new().u(chunk.len()).u(cols).f(0.0).u(ROWS_PER_BLOCK).u(offset);
                    let groups = [cols.div_ceil(PARTIALS_WORKGROUP) as u32, chunk_blocks as u32, 1];
                    job.dispatch(key.clone(), &params, &args, groups)?;
                    offset += chunk_blocks;
                }
                self.column_final(&mut job, &dw_partials, blocks, cols, &dw)?;
                if centered {
                    self.column_final(&mut job, &db_partials, blocks, cols, &db)?;
                }
            }
            dweight = Some(self.tensor(vec![cols], DType::F32, dw));
            if centered {
                dbias = Some(self.tensor(vec![cols], DType::F32, db));
            }
        }
        job.submit()?;
        Ok(NormGrads { dx: self.tensor(x.shape.clone(), DType::F32, dx), dweight, dbias })
    }
}
