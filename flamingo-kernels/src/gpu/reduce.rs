//! Host side of shaders/reduce.wgsl: whole-tensor sums (plain, of squares,
//! dot products) and sums over leading axes.

use crate::error::Result;
use crate::gpu::context::{Arg, Job, KernelKey, Params};
use crate::gpu::pool::GpuBuffer;
use crate::gpu::GpuBackend;
use crate::tensor::{DType, Tensor};

const FILE: &str = "reduce.wgsl";
const WORKGROUP: u32 = 256;
/// Elements each workgroup of the first pass sums.
const PER_GROUP: usize = 4096;
/// Rows each block of a column sum adds before the final pass.
const ROWS_PER_BLOCK: usize = 64;

fn key(entry: &'static str) -> KernelKey {
    KernelKey::new(FILE, entry).set("WG", WORKGROUP as f64).set("ONE_SUBGROUP", 0.0)
}

impl GpuBackend {
    pub(crate) fn sum(&self, x: &Tensor, squares: bool) -> Result<Tensor> {
        let op = if squares { "sum_squares" } else { "sum" };
        let input = x.gpu_buffer(op, "x")?;
        let out = self.whole_sum(op, input, None, x.numel(), if squares { 1.0 } else { 0.0 })?;
        Ok(self.tensor(vec![1], DType::F32, out))
    }

    /// Σ x ⊙ y over `count` elements, as a one-element buffer.
    pub(super) fn dot_product(&self, op: &'static str, x: &GpuBuffer, y: &GpuBuffer, count: usize) -> Result<GpuBuffer> {
        self.whole_sum(op, x, Some(y), count, 2.0)
    }

    fn whole_sum(&self, op: &'static str, x: &GpuBuffer, y: Option<&GpuBuffer>, count: usize, mode: f64) -> Result<GpuBuffer> {
        let out = self.context.allocate(op, 4)?;
        let mut job = self.context.job(op);
        if count == 0 {
            job.clear(&out);
            job.submit()?;
            return Ok(out);
        }
        let chunks = self.context.row_chunks(op, count, &[("x", 4)])?;
        let partial_count: usize = chunks.iter().map(|chunk| chunk.len().div_ceil(PER_GROUP)).sum();
        let partials = self.context.allocate(op, (partial_count * 4) as u64)?;
        self.context.check_binding(op, "partial sums", (partial_count * 4) as u64)?;

        let mut offset = 0;
        for chunk in chunks {
            let groups = chunk.len().div_ceil(PER_GROUP);
            let (start, size) = (chunk.start as u64 * 4, chunk.len() as u64 * 4);
            let args = [
                Arg::range(x, start, size, true),
                Arg::range(y.unwrap_or(x), start, size, true),
                Arg::write(&partials),
            ];
            let params = Params::new().u(chunk.len()).u(PER_GROUP).u(offset);
            job.dispatch(key("partial_sums").set("MODE", mode), &params, &args, self.context.grid(groups as u64))?;
            offset += groups;
        }
        let params = Params::new().u(partial_count);
        job.dispatch(key("final_sum"), &params, &[Arg::read(&partials), Arg::write(&out)], [1, 1, 1])?;
        job.submit()?;
        Ok(out)
    }

    pub(crate) fn sum_leading(&self, x: &Tensor, rows: usize, cols: usize, out_shape: Vec<usize>) -> Result<Tensor> {
        const OP: &str = "sum_leading";
        let input = x.gpu_buffer(OP, "x")?;
        let out = self.output(OP, &out_shape, DType::F32)?;
        let mut job = self.context.job(OP);
        if rows == 0 || cols == 0 {
            job.clear(&out);
        } else {
            self.column_sums(&mut job, input, rows, cols, &out)?;
        }
        job.submit()?;
        Ok(self.tensor(out_shape, DType::F32, out))
    }

    /// Records out[c] = Σ_r x[r, c] for x of `rows` × `cols`, in two passes.
    pub(super) fn column_sums(&self, job: &mut Job, x: &GpuBuffer, rows: usize, cols: usize, out: &GpuBuffer) -> Result<()> {
        let op = job.op();
        let row_bytes = (cols * 4) as u64;
        let chunks = self.context.row_chunks(op, rows, &[("x", row_bytes)])?;
        // Blocks of at least ROWS_PER_BLOCK rows, and at most 4096 blocks per chunk.
        let per_block = |rows: usize| ROWS_PER_BLOCK.max(rows.div_ceil(4096));
        let blocks: usize = chunks.iter().map(|chunk| chunk.len().div_ceil(per_block(chunk.len()))).sum();
        let partials = self.context.allocate(op, (blocks * cols * 4) as u64)?;
        self.context.check_binding(op, "column partial sums", (blocks * cols * 4) as u64)?;
        let column_groups = cols.div_ceil(WORKGROUP as usize) as u32;

        let mut offset = 0;
        for chunk in chunks {
            let rows_per_block = per_block(chunk.len());
            let chunk_blocks = chunk.len().div_ceil(rows_per_block);
            let args = [Arg::range(x, chunk.start as u64 * row_bytes, chunk.len() as u64 * row_bytes, true), Arg::write(&partials)];
            let params = Params::new().u(0).u(rows_per_block).u(offset).u(chunk.len()).u(cols);
            job.dispatch(key("column_partials"), &params, &args, [column_groups, chunk_blocks as u32, 1])?;
            offset += chunk_blocks;
        }
        self.column_final(job, &partials, blocks, cols, out)
    }

    /// Records out[c] = Σ_b partials[b, c] over `blocks` rows of partial sums.
    pub(super) fn column_final(&self, job: &mut Job, partials: &GpuBuffer, blocks: usize, cols: usize, out: &GpuBuffer) -> Result<()> {
        let column_groups = cols.div_ceil(WORKGROUP as usize) as u32;
        let params = Params::new().u(0).u(0).u(0).u(blocks).u(cols);
        job.dispatch(key("column_final"), &params, &[Arg::read(partials), Arg::write(out)], [column_groups, 1, 1])
    }
}
