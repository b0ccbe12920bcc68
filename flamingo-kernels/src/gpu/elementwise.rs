//! Host side of shaders/elementwise.wgsl: arithmetic and broadcasting.
//!
//! Every kernel runs one thread per element over flat f32 tensors; tensors
//! larger than one storage binding are processed in element chunks.

use crate::error::Result;
use crate::gpu::chunk::Operand;
use crate::gpu::context::{KernelKey, Params, ELEMENTWISE_WORKGROUP};
use crate::gpu::pool::GpuBuffer;
use crate::gpu::GpuBackend;
use crate::ops::elementwise::Binary;
use crate::tensor::{DType, Storage, Tensor};

const FILE: &str = "elementwise.wgsl";

impl GpuBackend {
    /// Allocates the buffer of a new tensor of `shape` and `dtype`.
    pub(super) fn output(&self, op: &'static str, shape: &[usize], dtype: DType) -> Result<GpuBuffer> {
        let numel: usize = shape.iter().product();
        self.context.allocate(op, (numel * dtype.size_in_bytes()) as u64)
    }

    /// Wraps a buffer of this device as a tensor.
    pub(super) fn tensor(&self, shape: Vec<usize>, dtype: DType, buffer: GpuBuffer) -> Tensor {
        Tensor::from_storage(shape, dtype, Storage::Gpu(buffer), self.device_id)
    }

    /// Runs an elementwise kernel of `file` over `count` elements of the
    /// split operands, with `alpha` and `period` as parameters.
    pub(super) fn run_elementwise(&self, op: &'static str, key: KernelKey, count: usize, alpha: f32, operands: &[Operand]) -> Result<()> {
        let mut job = self.context.job(op);
        self.context.dispatch_rows(
            &mut job,
            &key,
            count,
            operands,
            |chunk| Params::new().u(chunk.len()).f(alpha).u(1),
            |chunk| self.context.grid((chunk.len() as u64).div_ceil(ELEMENTWISE_WORKGROUP as u64)),
        )?;
        job.submit()
    }

    pub(crate) fn binary(&self, a: &Tensor, b: &Tensor, op: Binary) -> Result<Tensor> {
        const OP: &str = "binary";
        let (x, y) = (a.gpu_buffer(OP, "a")?, b.gpu_buffer(OP, "b")?);
        let out = self.output(OP, a.shape(), DType::F32)?;
        let code = match op {
            Binary::Add => 0.0,
            Binary::Sub => 1.0,
            Binary::Mul => 2.0,
        };
        let key = KernelKey::new(FILE, "binary").set("BINARY_OP", code);
        self.run_elementwise(OP, key, a.numel(), 0.0, &[Operand::rows("a", x, 4), Operand::rows("b", y, 4), Operand::rows_mut("out", &out, 4)])?;
        Ok(self.tensor(a.shape.clone(), DType::F32, out))
    }

    pub(crate) fn scale(&self, x: &Tensor, alpha: f32) -> Result<Tensor> {
        const OP: &str = "scale";
        let input = x.gpu_buffer(OP, "x")?;
        let out = self.output(OP, x.shape(), DType::F32)?;
        let key = KernelKey::new(FILE, "scale");
        self.run_elementwise(OP, key, x.numel(), alpha, &[Operand::rows("x", input, 4), Operand::rows_mut("out", &out, 4)])?;
        Ok(self.tensor(x.shape.clone(), DType::F32, out))
    }

    pub(crate) fn axpy(&self, dst: &mut Tensor, alpha: f32, src: &Tensor) -> Result<()> {
        const OP: &str = "axpy";
        let count = dst.numel();
        let source = src.gpu_buffer(OP, "src")?;
        let target = dst.gpu_buffer_unique(OP, "dst")?;
        let key = KernelKey::new(FILE, "axpy");
        self.run_elementwise(OP, key, count, alpha, &[Operand::rows("src", source, 4), Operand::rows_mut("dst", target, 4)])
    }

    pub(crate) fn scale_assign(&self, dst: &mut Tensor, alpha: f32) -> Result<()> {
        const OP: &str = "scale_assign";
        let count = dst.numel();
        let target = dst.gpu_buffer_unique(OP, "dst")?;
        let key = KernelKey::new(FILE, "scale_assign");
        self.run_elementwise(OP, key, count, alpha, &[Operand::rows_mut("dst", target, 4)])
    }

    pub(crate) fn broadcast_add(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        const OP: &str = "broadcast_add";
        let (input, row) = (x.gpu_buffer(OP, "x")?, y.gpu_buffer(OP, "y")?);
        let out = self.output(OP, x.shape(), DType::F32)?;
        let period = y.numel();
        if period == 0 || x.numel() == 0 {
            return Ok(self.tensor(x.shape.clone(), DType::F32, out));
        }
        // Chunks hold whole repetitions of y, so `i % period` stays aligned.
        let blocks = x.numel() / period;
        let block_bytes = (period * 4) as u64;
        let key = KernelKey::new(FILE, "broadcast_add");
        let mut job = self.context.job(OP);
        self.context.dispatch_rows(
            &mut job,
            &key,
            blocks,
            &[Operand::rows("x", input, block_bytes), Operand::whole("y", row), Operand::rows_mut("out", &out, block_bytes)],
            |chunk| Params::new().u(chunk.len() * period).f(0.0).u(period),
            |chunk| self.context.grid(((chunk.len() * period) as u64).div_ceil(ELEMENTWISE_WORKGROUP as u64)),
        )?;
        job.submit()?;
        Ok(self.tensor(x.shape.clone(), DType::F32, out))
    }
}
