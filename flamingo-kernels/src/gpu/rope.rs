//! Host side of shaders/rope.wgsl: rotary position embedding and its inverse.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::error::Result;
use crate::gpu::chunk::Operand;
use crate::gpu::context::{KernelKey, Params, ELEMENTWISE_WORKGROUP};
use crate::gpu::pool::GpuBuffer;
use crate::gpu::GpuBackend;
use crate::ops::rope::rope_inv_freq;
use crate::tensor::{DType, Tensor};

/// Inverse-frequency tables already on the device, by (base bits, head size).
#[derive(Default)]
pub(crate) struct InvFreqCache(Mutex<HashMap<(u32, usize), std::sync::Arc<GpuBuffer>>>);

impl GpuBackend {
    fn inv_freq(&self, base: f32, head_dim: usize) -> Result<std::sync::Arc<GpuBuffer>> {
        let key = (base.to_bits(), head_dim);
        if let Some(table) = self.inv_freq.0.lock().expect("inverse frequency cache lock").get(&key) {
            return Ok(table.clone());
        }
        // The same f32 formula as the CPU backend, so both rotate by equal angles.
        let values: Vec<f32> = (0..head_dim / 2).map(|i| rope_inv_freq(base, i, head_dim)).collect();
        let table = std::sync::Arc::new(self.context.upload_bytes("rope", bytemuck::cast_slice(&values))?);
        self.inv_freq.0.lock().expect("inverse frequency cache lock").insert(key, table.clone());
        Ok(table)
    }

    pub(crate) fn rope(&self, x: &Tensor, positions: &Tensor, base: f32, direction: f32) -> Result<Tensor> {
        const OP: &str = "rope";
        let (heads, head_dim) = (x.shape()[2], x.shape()[3]);
        let tokens = x.shape()[0] * x.shape()[1];
        let (input, pos) = (x.gpu_buffer(OP, "x")?, positions.gpu_buffer(OP, "positions")?);
        let out = self.output(OP, x.shape(), DType::F32)?;
        let mut job = self.context.job(OP);
        if head_dim > 0 && heads > 0 {
            let table = self.inv_freq(base, head_dim)?;
            let row_bytes = (heads * head_dim * 4) as u64;
            let pairs_per_row = heads * head_dim / 2;
            self.context.dispatch_rows(
                &mut job,
                &KernelKey::new("rope.wgsl", "rope"),
                tokens,
                &[
                    Operand::rows("x", input, row_bytes),
                    Operand::rows("positions", pos, 4),
                    Operand::whole("inv_freq", &table),
                    Operand::rows_mut("out", &out, row_bytes),
                ],
                |chunk| Params::new().u(chunk.len()).u(heads).u(head_dim).f(direction),
                |chunk| self.context.grid(((chunk.len() * pairs_per_row) as u64).div_ceil(ELEMENTWISE_WORKGROUP as u64)),
            )?;
        }
        job.submit()?;
        Ok(self.tensor(x.shape.clone(), DType::F32, out))
    }
}
