//! Host side of shaders/shape.wgsl: concatenation, slicing, permutation
//! and f32 ↔ f16 conversion.
//!
//! Concatenation and slicing copy row blocks and split along the outer
//! rows when a tensor exceeds one binding. A permutation that keeps the
//! leading axes in place splits along them; any other permutation needs its
//! input in one binding.

use crate::error::{Error, Result};
use crate::gpu::chunk::Operand;
use crate::gpu::context::{KernelKey, Params, ELEMENTWISE_WORKGROUP};
use crate::gpu::GpuBackend;
use crate::tensor::{DType, Tensor};

const FILE: &str = "shape.wgsl";

impl GpuBackend {
    /// Copies `width` elements per row from column `src_col` of rows of
    /// `src_stride` to column `dst_col` of rows of `dst_stride`.
    #[allow(clippy::too_many_arguments)]
    fn copy_rows(
        &self,
        op: &'static str,
        source: &crate::gpu::GpuBuffer,
        target: &crate::gpu::GpuBuffer,
        rows: usize,
        width: usize,
        (src_stride, src_col): (usize, usize),
        (dst_stride, dst_col): (usize, usize),
    ) -> Result<()> {
        if rows == 0 || width == 0 {
            return Ok(());
        }
        let key = KernelKey::new(FILE, "copy_rows");
        let mut job = self.context.job(op);
        self.context.dispatch_rows(
            &mut job,
            &key,
            rows,
            &[Operand::rows("src", source, (src_stride * 4) as u64), Operand::rows_mut("dst", target, (dst_stride * 4) as u64)],
            |chunk| Params::new().u(chunk.len() * width).u(width).u(src_stride).u(src_col).u(dst_stride).u(dst_col),
            |chunk| self.context.grid(((chunk.len() * width) as u64).div_ceil(ELEMENTWISE_WORKGROUP as u64)),
        )?;
        job.submit()
    }

    pub(crate) fn concat(&self, tensors: &[&Tensor], outer: usize, inner: usize, axis: usize, out_shape: Vec<usize>) -> Result<Tensor> {
        const OP: &str = "concat";
        let out = self.output(OP, &out_shape, DType::F32)?;
        let total = out_shape[axis] * inner;
        let mut column = 0;
        for tensor in tensors {
            let width = tensor.shape()[axis] * inner;
            let source = tensor.gpu_buffer(OP, "tensors")?;
            self.copy_rows(OP, source, &out, outer, width, (width, 0), (total, column))?;
            column += width;
        }
        Ok(self.tensor(out_shape, DType::F32, out))
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn narrow(&self, x: &Tensor, outer: usize, inner: usize, axis_len: usize, start: usize, len: usize, out_shape: Vec<usize>) -> Result<Tensor> {
        const OP: &str = "narrow";
        let source = x.gpu_buffer(OP, "x")?;
        let out = self.output(OP, &out_shape, DType::F32)?;
        let width = len * inner;
        self.copy_rows(OP, source, &out, outer, width, (axis_len * inner, start * inner), (width, 0))?;
        Ok(self.tensor(out_shape, DType::F32, out))
    }

    pub(crate) fn permute(&self, x: &Tensor, perm: &[usize], out_shape: Vec<usize>) -> Result<Tensor> {
        const OP: &str = "permute";
        let source = x.gpu_buffer(OP, "x")?;
        let out = self.output(OP, &out_shape, DType::F32)?;
        let rank = x.rank();
        if rank > 7 {
            return Err(Error::Unsupported {
                op: OP,
                backend: "wgpu".into(),
                reason: format!("permutations of more than 7 axes (found {rank}) are not implemented"),
            });
        }
        if x.numel() == 0 {
            return Ok(self.tensor(out_shape, DType::F32, out));
        }

        // Axes that stay in place at the front split the work into independent blocks.
        let kept = perm.iter().enumerate().take_while(|&(position, &axis)| position == axis).count();
        let kept = kept.min(rank.saturating_sub(1));
        let blocks: usize = x.shape()[..kept].iter().product();
        let block_elements = x.numel() / blocks;

        let mut in_strides = vec![1usize; rank];
        for axis in (0..rank.saturating_sub(1)).rev() {
            in_strides[axis] = in_strides[axis + 1] * x.shape()[axis + 1];
        }
        let inner_rank = rank - kept;
        let mut words = [0u32; 16];
        for position in 0..inner_rank {
            words[position] = out_shape[kept + position] as u32;
            words[8 + position] = in_strides[perm[kept + position]] as u32;
        }
        let key = KernelKey::new(FILE, "permute");
        let mut job = self.context.job(OP);
        let row_bytes = (block_elements * 4) as u64;
        self.context.dispatch_rows(
            &mut job,
            &key,
            blocks,
            &[Operand::rows("x", source, row_bytes), Operand::rows_mut("out", &out, row_bytes)],
            |chunk| {
                let mut params = Params::new().u(chunk.len() * block_elements).u(inner_rank + 1);
                // With several blocks per chunk, an extra outer axis walks the blocks.
                params.0.extend([0, 0]);
                params.0.extend_from_slice(&words[..8]);
                params.0.extend_from_slice(&words[8..]);
                prepend_block_axis(&mut params, chunk.len(), block_elements, inner_rank);
                params
            },
            |chunk| self.context.grid(((chunk.len() * block_elements) as u64).div_ceil(ELEMENTWISE_WORKGROUP as u64)),
        )?;
        job.submit()?;
        Ok(self.tensor(out_shape, DType::F32, out))
    }

    pub(crate) fn cast(&self, x: &Tensor, dtype: DType) -> Result<Tensor> {
        const OP: &str = "cast";
        let source = x.gpu_buffer(OP, "x")?;
        let out = self.output(OP, x.shape(), dtype)?;
        let (entry, in_pair, out_pair) = match dtype {
            DType::F16 => ("cast_to_f16", 8, 4),
            _ => ("cast_to_f32", 4, 8),
        };
        let count = x.numel();
        let pairs = count.div_ceil(2);
        let key = KernelKey::new(FILE, entry);
        let mut job = self.context.job(OP);
        self.context.dispatch_rows(
            &mut job,
            &key,
            pairs,
            &[Operand::rows("x", source, in_pair), Operand::rows_mut("out", &out, out_pair)],
            |chunk| Params::new().u((chunk.len() * 2).min(count - chunk.start * 2)),
            |chunk| self.context.grid((chunk.len() as u64).div_ceil(ELEMENTWISE_WORKGROUP as u64)),
        )?;
        job.submit()?;
        Ok(self.tensor(x.shape.clone(), dtype, out))
    }
}

/// Turns the permutation parameters of one block into those of `blocks`
/// consecutive blocks by adding an outer axis of stride `block_elements`.
fn prepend_block_axis(params: &mut crate::gpu::context::Params, blocks: usize, block_elements: usize, inner_rank: usize) {
    // Layout: count, rank, pad, pad, dims[8], strides[8].
    let dims = &mut params.0[4..12];
    dims.copy_within(0..inner_rank, 1);
    dims[0] = blocks as u32;
    let strides = &mut params.0[12..20];
    strides.copy_within(0..inner_rank, 1);
    strides[0] = block_elements as u32;
}
