//! Host side of the activation entry points of shaders/elementwise.wgsl:
//! activations and their backward passes, the SiLU-gated product and the
//! tanh-gated residual.

use crate::error::Result;
use crate::gpu::chunk::Operand;
use crate::gpu::context::{KernelKey, Params};
use crate::gpu::GpuBackend;
use crate::ops::activation::Activation;
use crate::tensor::{DType, Tensor};

const FILE: &str = "elementwise.wgsl";

/// The kind number activation.wgsl uses for `act`.
pub(crate) fn activation_code(act: Activation) -> f64 {
    match act {
        Activation::Identity => 0.0,
        Activation::Relu => 1.0,
        Activation::Relu6 => 2.0,
        Activation::GeluExact => 3.0,
        Activation::GeluTanh => 4.0,
        Activation::QuickGelu => 5.0,
        Activation::Silu => 6.0,
        Activation::Tanh => 7.0,
    }
}

impl GpuBackend {
    pub(crate) fn activation(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        const OP: &str = "activation";
        let input = x.gpu_buffer(OP, "x")?;
        let out = self.output(OP, x.shape(), DType::F32)?;
        let key = KernelKey::new(FILE, "activation_forward").set("ACT", activation_code(act));
        self.run_elementwise(OP, key, x.numel(), 0.0, &[Operand::rows("x", input, 4), Operand::rows_mut("out", &out, 4)])?;
        Ok(self.tensor(x.shape.clone(), DType::F32, out))
    }

    pub(crate) fn activation_backward(&self, x: &Tensor, dy: &Tensor, act: Activation) -> Result<Tensor> {
        const OP: &str = "activation_backward";
        let (input, grad) = (x.gpu_buffer(OP, "x")?, dy.gpu_buffer(OP, "dy")?);
        let out = self.output(OP, x.shape(), DType::F32)?;
        let key = KernelKey::new(FILE, "activation_backward").set("ACT", activation_code(act));
        self.run_elementwise(OP, key, x.numel(), 0.0, &[Operand::rows("x", input, 4), Operand::rows("dy", grad, 4), Operand::rows_mut("dx", &out, 4)])?;
        Ok(self.tensor(x.shape.clone(), DType::F32, out))
    }

    pub(crate) fn silu_mul(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        const OP: &str = "silu_mul";
        let (g, u) = (gate.gpu_buffer(OP, "gate")?, up.gpu_buffer(OP, "up")?);
        let out = self.output(OP, gate.shape(), DType::F32)?;
        let key = KernelKey::new(FILE, "silu_mul");
        self.run_elementwise(OP, key, gate.numel(), 0.0, &[Operand::rows("gate", g, 4), Operand::rows("up", u, 4), Operand::rows_mut("out", &out, 4)])?;
        Ok(self.tensor(gate.shape.clone(), DType::F32, out))
    }

    pub(crate) fn silu_mul_backward(&self, gate: &Tensor, up: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
        const OP: &str = "silu_mul_backward";
        let (g, u, d) = (gate.gpu_buffer(OP, "gate")?, up.gpu_buffer(OP, "up")?, dy.gpu_buffer(OP, "dy")?);
        let dgate = self.output(OP, gate.shape(), DType::F32)?;
        let dup = self.output(OP, gate.shape(), DType::F32)?;
        let key = KernelKey::new(FILE, "silu_mul_backward");
        let operands = [
            Operand::rows("gate", g, 4),
            Operand::rows("up", u, 4),
            Operand::rows("dy", d, 4),
            Operand::rows_mut("dgate", &dgate, 4),
            Operand::rows_mut("dup", &dup, 4),
        ];
        self.run_elementwise(OP, key, gate.numel(), 0.0, &operands)?;
        Ok((self.tensor(gate.shape.clone(), DType::F32, dgate), self.tensor(gate.shape.clone(), DType::F32, dup)))
    }

    pub(crate) fn tanh_gate_add(&self, x: &Tensor, y: &Tensor, gate: &Tensor) -> Result<Tensor> {
        const OP: &str = "tanh_gate_add";
        let (input, update, g) = (x.gpu_buffer(OP, "x")?, y.gpu_buffer(OP, "y")?, gate.gpu_buffer(OP, "gate")?);
        let out = self.output(OP, x.shape(), DType::F32)?;
        let key = KernelKey::new(FILE, "tanh_gate_add");
        let operands = [Operand::rows("x", input, 4), Operand::rows("y", update, 4), Operand::whole("gate", g), Operand::rows_mut("out", &out, 4)];
        self.run_elementwise(OP, key, x.numel(), 0.0, &operands)?;
        Ok(self.tensor(x.shape.clone(), DType::F32, out))
    }

    pub(crate) fn tanh_gate_add_backward(&self, y: &Tensor, gate: &Tensor, dout: &Tensor) -> Result<(Tensor, Tensor)> {
        const OP: &str = "tanh_gate_add_backward";
        let (update, g, grad) = (y.gpu_buffer(OP, "y")?, gate.gpu_buffer(OP, "gate")?, dout.gpu_buffer(OP, "dout")?);
        let dy = self.output(OP, y.shape(), DType::F32)?;
        let key = KernelKey::new(FILE, "tanh_gate_scale");
        self.run_elementwise(OP, key, y.numel(), 0.0, &[Operand::rows("dout", grad, 4), Operand::whole("gate", g), Operand::rows_mut("dy", &dy, 4)])?;

        // dgate = (1 − tanh²(gate)) · Σ y ⊙ dout.
        let dot = self.dot_product(OP, update, grad, y.numel())?;
        let dgate = self.output(OP, gate.shape(), DType::F32)?;
        let mut job = self.context.job(OP);
        let args = [
            crate::gpu::context::Arg::read(&dot),
            crate::gpu::context::Arg::read(g),
            crate::gpu::context::Arg::write(&dgate),
        ];
        job.dispatch(KernelKey::new(FILE, "tanh_gate_grad"), &Params::new(), &args, [1, 1, 1])?;
        job.submit()?;
        Ok((self.tensor(y.shape.clone(), DType::F32, dy), self.tensor(gate.shape.clone(), DType::F32, dgate)))
    }
}
