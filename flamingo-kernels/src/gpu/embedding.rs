//! Host side of shaders/embedding.wgsl: embedding gather and its
//! deterministic scatter-add backward. Tables larger than one binding are
//! split into row chunks, each serving the ids of its rows.

use crate::error::Result;
use crate::gpu::context::{Arg, KernelKey, Params, ELEMENTWISE_WORKGROUP};
use crate::gpu::GpuBackend;
use crate::tensor::{DType, Tensor};

const FILE: &str = "embedding.wgsl";

impl GpuBackend {
    pub(crate) fn embedding(&self, table: &Tensor, ids: &Tensor, offset: u32, out_shape: Vec<usize>) -> Result<Tensor> {
        const OP: &str = "embedding";
        let (rows, cols) = (table.shape()[0], table.shape()[1]);
        let count = ids.numel();
        let (values, id_buffer) = (table.gpu_buffer(OP, "table")?, ids.gpu_buffer(OP, "ids")?);
        let out = self.output(OP, &out_shape, DType::F32)?;
        let mut job = self.context.job(OP);
        job.clear(&out);
        if rows > 0 && cols > 0 && count > 0 {
            let element = table.dtype().size_in_bytes() as u64;
            let table_chunks = self.context.row_chunks(OP, rows, &[("table", cols as u64 * element)])?;
            let id_chunks = self.context.row_chunks(OP, count, &[("ids", 4), ("out", cols as u64 * 4)])?;
            let key = KernelKey::new(FILE, "embedding_gather").flag("TABLE_F16", table.dtype() == DType::F16);
            for table_chunk in &table_chunks {
                for id_chunk in &id_chunks {
                    let table_bytes = cols as u64 * element;
                    let args = [
                        Arg::range(values, table_chunk.start as u64 * table_bytes, table_chunk.len() as u64 * table_bytes, true),
                        Arg::range(id_buffer, id_chunk.start as u64 * 4, id_chunk.len() as u64 * 4, true),
                        Arg::range(&out, (id_chunk.start * cols * 4) as u64, (id_chunk.len() * cols * 4) as u64, false),
                    ];
                    let params = Params::new().u(id_chunk.len()).u(cols).u(offset as usize).u(table_chunk.start).u(table_chunk.len());
                    let groups = self.context.grid(((id_chunk.len() * cols) as u64).div_ceil(ELEMENTWISE_WORKGROUP as u64));
                    job.dispatch(key.clone(), &params, &args, groups)?;
                }
            }
        }
        job.submit()?;
        Ok(self.tensor(out_shape, DType::F32, out))
    }

    pub(crate) fn embedding_backward(&self, dtable: &mut Tensor, ids: &Tensor, dy: &Tensor, offset: u32) -> Result<()> {
        const OP: &str = "embedding_backward";
        let (rows, cols) = (dtable.shape()[0], dtable.shape()[1]);
        let count = ids.numel();
        let (id_buffer, grad) = (ids.gpu_buffer(OP, "ids")?, dy.gpu_buffer(OP, "dy")?);
        let table = dtable.gpu_buffer_unique(OP, "dtable")?;
        if rows == 0 || cols == 0 || count == 0 {
            return Ok(());
        }
        let row_bytes = (cols * 4) as u64;
        let table_chunks = self.context.row_chunks(OP, rows, &[("dtable", row_bytes)])?;
        // Id chunks run one after another, so each element still sums in id order.
        let id_chunks = self.context.row_chunks(OP, count, &[("ids", 4), ("dy", row_bytes)])?;
        let key = KernelKey::new(FILE, "embedding_scatter");
        let mut job = self.context.job(OP);
        for table_chunk in &table_chunks {
            for id_chunk in &id_chunks {
                let args = [
                    Arg::range(id_buffer, id_chunk.start as u64 * 4, id_chunk.len() as u64 * 4, true),
                    Arg::range(grad, id_chunk.start as u64 * row_bytes, id_chunk.len() as u64 * row_bytes, true),
                    Arg::range(table, table_chunk.start as u64 * row_bytes, table_chunk.len() as u64 * row_bytes, false),
                ];
                let params = Params::new().u(id_chunk.len()).u(cols).u(offset as usize).u(table_chunk.start).u(table_chunk.len());
                job.dispatch(key.clone(), &params, &args, [cols.div_ceil(64) as u32, 1, 1])?;
            }
        }
        job.submit()
    }
}
