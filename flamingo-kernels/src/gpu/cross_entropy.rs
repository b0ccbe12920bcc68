//! Host side of shaders/cross_entropy.wgsl: fused softmax cross-entropy
//! over vocabularies of any size, without a probability tensor.

use crate::error::{value_err, Result};
use crate::gpu::chunk::Operand;
use crate::gpu::context::{KernelKey, Params};
use crate::gpu::GpuBackend;
use crate::ops::cross_entropy::{CrossEntropyOutput, IGNORE_INDEX};
use crate::tensor::{DType, Tensor};

const FILE: &str = "cross_entropy.wgsl";
const BACKWARD_WORKGROUP: u64 = 256;

impl GpuBackend {
    pub(crate) fn cross_entropy(&self, logits: &Tensor, targets: &Tensor, rows: usize, vocab: usize) -> Result<CrossEntropyOutput> {
        const OP: &str = "cross_entropy";
        // Target ids are checked on the host, like the CPU backend does; this
        // reads back rows × 4 bytes and waits for the work that wrote them.
        let ids = targets.to_vec_u32()?;
        if let Some(bad) = ids.iter().find(|&&id| id != IGNORE_INDEX && id as usize >= vocab) {
            return Err(value_err!(OP, "target id {bad} is outside the vocabulary of {vocab} logits"));
        }
        let (x, t) = (logits.gpu_buffer(OP, "logits")?, targets.gpu_buffer(OP, "targets")?);
        let losses = self.output(OP, &[rows], DType::F32)?;
        let lse = self.output(OP, &[rows], DType::F32)?;
        let mut job = self.context.job(OP);
        if vocab == 0 {
            job.clear(&losses);
            job.clear(&lse);
        } else {
            self.context.dispatch_rows(
                &mut job,
                &self.row_kernel(FILE, "cross_entropy_forward"),
                rows,
                &[
                    Operand::rows("logits", x, (vocab * 4) as u64),
                    Operand::rows("targets", t, 4),
                    Operand::rows_mut("losses", &losses, 4),
                    Operand::rows_mut("lse", &lse, 4),
                ],
                |chunk| Params::new().u(chunk.len()).u(vocab).f(0.0),
                |chunk| self.row_grid(chunk.len()),
            )?;
        }
        job.submit()?;
        Ok(CrossEntropyOutput { losses: self.tensor(vec![rows], DType::F32, losses), lse: self.tensor(vec![rows], DType::F32, lse) })
    }

    pub(crate) fn cross_entropy_backward(&self, logits: &Tensor, lse: &Tensor, targets: &Tensor, scale: f32, rows: usize, vocab: usize) -> Result<Tensor> {
        const OP: &str = "cross_entropy_backward";
        let (x, l, t) = (logits.gpu_buffer(OP, "logits")?, lse.gpu_buffer(OP, "lse")?, targets.gpu_buffer(OP, "targets")?);
        let out = self.output(OP, logits.shape(), DType::F32)?;
        let mut job = self.context.job(OP);
        if vocab > 0 {
            let row_bytes = (vocab * 4) as u64;
            self.context.dispatch_rows(
                &mut job,
                &KernelKey::new(FILE, "cross_entropy_backward"),
                rows,
                &[
                    Operand::rows("logits", x, row_bytes),
                    Operand::rows("lse", l, 4),
                    Operand::rows("targets", t, 4),
                    Operand::rows_mut("dlogits", &out, row_bytes),
                ],
                |chunk| Params::new().u(chunk.len()).u(vocab).f(scale),
                |chunk| self.context.grid(((chunk.len() * vocab) as u64).div_ceil(BACKWARD_WORKGROUP)),
            )?;
        }
        job.submit()?;
        Ok(self.tensor(logits.shape.clone(), DType::F32, out))
    }
}
