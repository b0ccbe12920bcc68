//! Host side of shaders/dequantize.wgsl: GGML blocks to f32 or f16.
//!
//! The raw blocks are uploaded as they are and expanded on the device;
//! data larger than one binding is processed in chunks of whole blocks.

use crate::error::Result;
use crate::gpu::chunk::Operand;
use crate::gpu::context::{KernelKey, Params, ELEMENTWISE_WORKGROUP};
use crate::gpu::GpuBackend;
use crate::quant::GgmlType;
use crate::tensor::{DType, Tensor};

impl GpuBackend {
    pub(crate) fn dequantize(&self, ty: GgmlType, bytes: &[u8], shape: Vec<usize>, dtype: DType) -> Result<Tensor> {
        const OP: &str = "dequantize";
        let numel: usize = shape.iter().product();

        // Data already in the requested type needs no kernel.
        if (ty == GgmlType::F32 && dtype == DType::F32) || (ty == GgmlType::F16 && dtype == DType::F16) {
            let buffer = self.context.upload_bytes(OP, bytes)?;
            return Ok(self.tensor(shape, dtype, buffer));
        }

        let raw = self.context.upload_bytes(OP, bytes)?;
        let out = self.output(OP, &shape, dtype)?;
        let (block, type_size) = (ty.block_size(), ty.type_size());
        let blocks = numel / block;
        let (entry, out_bytes) = match dtype {
            DType::F16 => ("dequantize_f16", 2),
            _ => ("dequantize_f32", 4),
        };
        let key = KernelKey::new("dequantize.wgsl", entry)
            .set("TYPE", ty.id() as f64)
            .set("BLOCK", block as f64)
            .set("TYPE_SIZE", type_size as f64);

        // f16 output is written in whole words. With one-element blocks, a
        // chunk holds an even number of them because chunk offsets are aligned.
        let mut job = self.context.job(OP);
        self.context.dispatch_rows(
            &mut job,
            &key,
            blocks,
            &[Operand::rows("blocks", &raw, type_size as u64), Operand::rows_mut("out", &out, (block * out_bytes) as u64)],
            |chunk| Params::new().u(chunk.len() * block).f(0.0),
            |chunk| {
                let threads = if dtype == DType::F16 { (chunk.len() * block).div_ceil(2) } else { chunk.len() * block };
                self.context.grid((threads as u64).div_ceil(ELEMENTWISE_WORKGROUP as u64))
            },
        )?;
        job.submit()?;
        Ok(self.tensor(shape, dtype, out))
    }
}
