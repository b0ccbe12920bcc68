//! Row gather from a table (token embeddings) and its backward, a scatter-add.
//!
//! A table of V rows covers ids `offset .. offset + V`. Ids outside that
//! range gather a row of zeros and scatter nothing. This lets a model keep
//! a frozen base vocabulary and a small trainable table of added tokens
//! (`<image>`, `<|endofchunk|>`) side by side: each table serves its own
//! id range and the two results are added.

use crate::device::{Backend, Device};
use crate::error::{shape_err, Result};
use crate::ops::par_rows;
use crate::tensor::{DType, Tensor};

impl Device {
    /// Returns `table[ids - offset]` for every id, shape [ids…, C]; ids
    /// outside the table's range give zero rows.
    pub fn embedding(&self, table: &Tensor, ids: &Tensor, offset: u32) -> Result<Tensor> {
        const OP: &str = "embedding";
        self.check(OP, "table", table)?;
        self.check_f(OP, "ids", ids, DType::U32)?;
        if table.rank() != 2 || table.dtype() == DType::U32 {
            return Err(shape_err!(OP, "table must be an f32 or f16 matrix [V, C], found {:?} {:?}", table.dtype(), table.shape()));
        }
        let (rows, cols) = (table.shape[0], table.shape[1]);
        let mut out_shape = ids.shape.clone();
        out_shape.push(cols);
        match self.backend() {
            Backend::Cpu => {
                let ids = ids.cpu_u32_slice(OP, "ids")?;
                let values = table.cpu_f32_cow(OP, "table")?;
                let mut out = vec![0.0f32; ids.len() * cols];
                par_rows(&mut out, cols, |n, row| {
                    let id = ids[n].wrapping_sub(offset) as usize;
                    if ids[n] >= offset && id < rows {
                        row.copy_from_slice(&values[id * cols..(id + 1) * cols]);
                    }
                });
                Ok(Tensor::cpu_f32(out_shape, out, self.id()))
            }
            Backend::Gpu(gpu) => gpu.embedding(table, ids, offset, out_shape),
        }
    }

    /// Adds each row of `dy` ([ids…, C]) into `dtable[ids - offset]`; ids
    /// outside the table's range are skipped.
    pub fn embedding_backward(&self, dtable: &mut Tensor, ids: &Tensor, dy: &Tensor, offset: u32) -> Result<()> {
        const OP: &str = "embedding_backward";
        self.check_f(OP, "dtable", dtable, DType::F32)?;
        self.check_f(OP, "ids", ids, DType::U32)?;
        self.check_f(OP, "dy", dy, DType::F32)?;
        if dtable.rank() != 2 {
            return Err(shape_err!(OP, "dtable must be a matrix [V, C], found {:?}", dtable.shape()));
        }
        let (rows, cols) = (dtable.shape[0], dtable.shape[1]);
        if dy.numel() != ids.numel() * cols {
            return Err(shape_err!(OP, "dy has shape {:?}, expected {:?} + [{cols}]", dy.shape(), ids.shape()));
        }
        match self.backend() {
            Backend::Cpu => {
                let ids = ids.cpu_u32_slice(OP, "ids")?;
                let grad = dy.cpu_f32_slice(OP, "dy")?;
                let table = dtable.cpu_f32_mut(OP, "dtable")?;
                // Sequential over ids: repeated ids must add up in a fixed order.
                for (n, &id) in ids.iter().enumerate() {
                    let row = id.wrapping_sub(offset) as usize;
                    if id >= offset && row < rows {
                        let target = &mut table[row * cols..(row + 1) * cols];
                        target.iter_mut().zip(&grad[n * cols..(n + 1) * cols]).for_each(|(t, g)| *t += g);
                    }
                }
                Ok(())
            }
            Backend::Gpu(gpu) => gpu.embedding_backward(dtable, ids, dy, offset),
        }
    }
}
