//! Host side of shaders/adamw.wgsl: one AdamW step in place.

use crate::error::Result;
use crate::gpu::chunk::Operand;
use crate::gpu::context::{KernelKey, Params, ELEMENTWISE_WORKGROUP};
use crate::gpu::GpuBackend;
use crate::ops::adamw::AdamW;
use crate::tensor::Tensor;

impl GpuBackend {
    pub(crate) fn adamw_step(&self, param: &mut Tensor, grad: &Tensor, m: &mut Tensor, v: &mut Tensor, hyper: &AdamW) -> Result<()> {
        const OP: &str = "adamw_step";
        let count = param.numel();
        let (c1, c2) = hyper.bias_corrections();
        let g = grad.gpu_buffer(OP, "grad")?;
        let p = param.gpu_buffer_unique(OP, "param")?;
        let first = m.gpu_buffer_unique(OP, "m")?;
        let second = v.gpu_buffer_unique(OP, "v")?;
        let mut job = self.context.job(OP);
        self.context.dispatch_rows(
            &mut job,
            &KernelKey::new("adamw.wgsl", "adamw_step"),
            count,
            &[Operand::rows("grad", g, 4), Operand::rows_mut("param", p, 4), Operand::rows_mut("m", first, 4), Operand::rows_mut("v", second, 4)],
            |chunk| {
                Params::new()
                    .u(chunk.len())
                    .f(hyper.lr)
                    .f(hyper.beta1)
                    .f(hyper.beta2)
                    .f(hyper.eps)
                    .f(hyper.weight_decay)
                    .f(c1)
                    .f(c2)
            },
            |chunk| self.context.grid((chunk.len() as u64).div_ceil(ELEMENTWISE_WORKGROUP as u64)),
        )?;
        job.submit()
    }
}
