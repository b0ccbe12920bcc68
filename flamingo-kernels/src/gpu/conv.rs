//! Host side of shaders/conv.wgsl: 2-D convolution, channels last.
//!
//! A pointwise convolution (1×1, stride 1, no padding, one group) is a
//! matmul over all pixels and runs as one; everything else runs the direct
//! kernel, split by images when the tensors exceed one binding.

use crate::error::Result;
use crate::gpu::activation::activation_code;
use crate::gpu::chunk::Operand;
use crate::gpu::context::{KernelKey, Params, ELEMENTWISE_WORKGROUP};
use crate::gpu::GpuBackend;
use crate::ops::conv::{Conv2d, ConvDims};
use crate::ops::matmul::{Matmul, MatmulDims};
use crate::tensor::{DType, Tensor};

impl GpuBackend {
    pub(crate) fn conv2d(&self, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, spec: &Conv2d, dims: ConvDims) -> Result<Tensor> {
        const OP: &str = "conv2d";
        let ConvDims { n, h, w, cin, cout, kh, kw, ho, wo } = dims;
        let out_shape = vec![n, ho, wo, cout];

        if kh == 1 && kw == 1 && spec.stride == (1, 1) && spec.padding == [0; 4] && spec.groups == 1 {
            let pixels = x.reshape([n * h * w, cin])?;
            let matrix = weight.reshape([cout, cin])?;
            let matmul_spec = Matmul { trans_a: false, trans_b: true, bias, activation: spec.activation };
            let matmul_dims = MatmulDims { batch: 1, m: n * h * w, n: cout, k: cin, shared_b: true };
            return self.matmul(&pixels, &matrix, &matmul_spec, matmul_dims, out_shape);
        }

        let (input, taps) = (x.gpu_buffer(OP, "x")?, weight.gpu_buffer(OP, "weight")?);
        let b = match bias {
            Some(bias) => bias.gpu_buffer(OP, "bias")?,
            None => input,
        };
        let out = self.output(OP, &out_shape, DType::F32)?;
        let key = KernelKey::new("conv.wgsl", "conv2d")
            .flag("WEIGHT_F16", weight.dtype() == DType::F16)
            .set("HAS_BIAS", bias.is_some() as u8 as f64)
            .set("ACT", activation_code(spec.activation));
        let out_image = ho * wo * cout;
        let mut job = self.context.job(OP);
        let bias_operand = if bias.is_some() { Operand::whole("bias", b) } else { Operand::whole("weight", taps) };
        self.context.dispatch_rows(
            &mut job,
            &key,
            n,
            &[Operand::rows("x", input, (h * w * cin * 4) as u64), Operand::whole("weight", taps), bias_operand, Operand::rows_mut("out", &out, (out_image * 4) as u64)],
            |chunk| {
                Params::new()
                    .u(chunk.len())
                    .u(h)
                    .u(w)
                    .u(cin)
                    .u(cout)
                    .u(kh)
                    .u(kw)
                    .u(ho)
                    .u(wo)
                    .u(spec.stride.0)
                    .u(spec.stride.1)
                    .u(spec.padding[0])
                    .u(spec.padding[1])
                    .u(cin / spec.groups)
                    .u(cout / spec.groups)
            },
            |chunk| self.context.grid(((chunk.len() * out_image) as u64).div_ceil(ELEMENTWISE_WORKGROUP as u64)),
        )?;
        job.submit()?;
        Ok(self.tensor(out_shape, DType::F32, out))
    }
}
