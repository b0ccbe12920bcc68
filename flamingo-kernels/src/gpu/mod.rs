//! The wgpu backend: adapters, buffers, pipelines and the host side of
//! every WGSL kernel.
//!
//! NOTE: this is the interface the rest of the crate calls. Until the
//! kernels land, every op returns `Error::Unsupported`, adapters are not
//! enumerated, and automatic device choice falls back to the CPU backend.

use crate::device::GraphicsApi;
use crate::error::{Error, Result};
use crate::host::HostData;
use crate::ops::activation::Activation;
use crate::ops::adamw::AdamW;
use crate::ops::attention::{AttentionDims, AttentionGrads, AttentionMask, AttentionOutput};
use crate::ops::conv::{Conv2d, ConvDims};
use crate::ops::cross_entropy::CrossEntropyOutput;
use crate::ops::elementwise::Binary;
use crate::ops::matmul::{Matmul, MatmulDims};
use crate::ops::norm::{NormGrads, NormStats};
use crate::tensor::{DType, Tensor};

/// What kind of processor an adapter drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterKind {
    DiscreteGpu,
    IntegratedGpu,
    VirtualGpu,
    /// A software rasterizer such as Mesa's lavapipe.
    Cpu,
    Other,
}

impl AdapterKind {
    /// Whether the adapter is a real GPU rather than software emulation.
    pub fn is_hardware(self) -> bool {
        matches!(self, AdapterKind::DiscreteGpu | AdapterKind::IntegratedGpu | AdapterKind::VirtualGpu)
    }
}

/// A description of one adapter, for listing and for device choice.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterSummary {
    /// Position in [`list_adapters`], usable as `--device INDEX`.
    pub index: usize,
    pub name: String,
    pub api: Option<GraphicsApi>,
    pub kind: AdapterKind,
    pub driver: String,
    /// Largest storage buffer binding, in bytes.
    pub max_storage_binding: u64,
    /// Largest buffer, in bytes.
    pub max_buffer: u64,
    pub shader_f16: bool,
    pub subgroups: bool,
}

/// Lists every adapter wgpu finds, in a stable order.
pub fn list_adapters() -> Vec<AdapterSummary> {
    Vec::new()
}

/// Device memory holding a tensor's elements.
#[derive(Debug)]
pub struct GpuBuffer {
    _private: (),
}

impl GpuBuffer {
    pub(crate) fn download(&self, _dtype: DType, _numel: usize) -> Result<HostData> {
        Err(unsupported("download"))
    }
}

/// An opened wgpu adapter with its queue, buffer pool and pipeline cache.
pub struct GpuBackend {
    _private: (),
}

fn unsupported(op: &'static str) -> Error {
    Error::Unsupported { op, backend: "wgpu".into(), reason: "the WGSL kernels are not built yet".into() }
}

#[allow(unused_variables, clippy::too_many_arguments)]
impl GpuBackend {
    pub(crate) fn open(index: usize, device_id: u64) -> Result<Self> {
        Err(Error::Device(format!("adapter {index} cannot be opened: the wgpu backend is not built yet")))
    }
    pub(crate) fn description(&self) -> String {
        String::new()
    }
    pub(crate) fn supports_f16(&self) -> bool {
        false
    }
    pub(crate) fn synchronize(&self) -> Result<()> {
        Err(unsupported("synchronize"))
    }
    pub(crate) fn upload(&self, data: &HostData) -> Result<GpuBuffer> {
        Err(unsupported("upload"))
    }
    pub(crate) fn zeros(&self, bytes: usize) -> Result<GpuBuffer> {
        Err(unsupported("zeros"))
    }
    pub(crate) fn copy_buffer(&self, source: &GpuBuffer, bytes: usize) -> Result<GpuBuffer> {
        Err(unsupported("copy"))
    }
    pub(crate) fn binary(&self, a: &Tensor, b: &Tensor, op: Binary) -> Result<Tensor> {
        Err(unsupported("binary"))
    }
    pub(crate) fn scale(&self, x: &Tensor, alpha: f32) -> Result<Tensor> {
        Err(unsupported("scale"))
    }
    pub(crate) fn axpy(&self, dst: &mut Tensor, alpha: f32, src: &Tensor) -> Result<()> {
        Err(unsupported("axpy"))
    }
    pub(crate) fn scale_assign(&self, dst: &mut Tensor, alpha: f32) -> Result<()> {
        Err(unsupported("scale_assign"))
    }
    pub(crate) fn broadcast_add(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        Err(unsupported("broadcast_add"))
    }
    pub(crate) fn activation(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        Err(unsupported("activation"))
    }
    pub(crate) fn activation_backward(&self, x: &Tensor, dy: &Tensor, act: Activation) -> Result<Tensor> {
        Err(unsupported("activation_backward"))
    }
    pub(crate) fn silu_mul(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        Err(unsupported("silu_mul"))
    }
    pub(crate) fn silu_mul_backward(&self, gate: &Tensor, up: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
        Err(unsupported("silu_mul_backward"))
    }
    pub(crate) fn tanh_gate_add(&self, x: &Tensor, y: &Tensor, gate: &Tensor) -> Result<Tensor> {
        Err(unsupported("tanh_gate_add"))
    }
    pub(crate) fn tanh_gate_add_backward(&self, y: &Tensor, gate: &Tensor, dout: &Tensor) -> Result<(Tensor, Tensor)> {
        Err(unsupported("tanh_gate_add_backward"))
    }
    pub(crate) fn matmul(&self, a: &Tensor, b: &Tensor, spec: &Matmul, dims: MatmulDims, out_shape: Vec<usize>) -> Result<Tensor> {
        Err(unsupported("matmul"))
    }
    pub(crate) fn matmul_accumulate(&self, c: &mut Tensor, a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool, alpha: f32, dims: MatmulDims) -> Result<()> {
        Err(unsupported("matmul_accumulate"))
    }
    pub(crate) fn sum(&self, x: &Tensor, squares: bool) -> Result<Tensor> {
        Err(unsupported("sum"))
    }
    pub(crate) fn sum_leading(&self, x: &Tensor, rows: usize, cols: usize, out_shape: Vec<usize>) -> Result<Tensor> {
        Err(unsupported("sum_leading"))
    }
    pub(crate) fn softmax(&self, x: &Tensor) -> Result<Tensor> {
        Err(unsupported("softmax"))
    }
    pub(crate) fn softmax_backward(&self, y: &Tensor, dy: &Tensor) -> Result<Tensor> {
        Err(unsupported("softmax_backward"))
    }
    pub(crate) fn layer_norm(&self, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, eps: f32, rows: usize, cols: usize) -> Result<(Tensor, NormStats)> {
        Err(unsupported("layer_norm"))
    }
    pub(crate) fn rms_norm(&self, x: &Tensor, weight: &Tensor, eps: f32, rows: usize, cols: usize) -> Result<(Tensor, NormStats)> {
        Err(unsupported("rms_norm"))
    }
    pub(crate) fn norm_backward(&self, x: &Tensor, weight: &Tensor, stats: &NormStats, dy: &Tensor, param_grads: bool, centered: bool, rows: usize, cols: usize) -> Result<NormGrads> {
        Err(unsupported("norm_backward"))
    }
    pub(crate) fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttentionMask, scale: f32, dims: AttentionDims) -> Result<AttentionOutput> {
        Err(unsupported("attention"))
    }
    pub(crate) fn attention_backward(&self, q: &Tensor, k: &Tensor, v: &Tensor, forward: &AttentionOutput, dout: &Tensor, mask: &AttentionMask, scale: f32, dims: AttentionDims) -> Result<AttentionGrads> {
        Err(unsupported("attention_backward"))
    }
    pub(crate) fn embedding(&self, table: &Tensor, ids: &Tensor, offset: u32, out_shape: Vec<usize>) -> Result<Tensor> {
        Err(unsupported("embedding"))
    }
    pub(crate) fn embedding_backward(&self, dtable: &mut Tensor, ids: &Tensor, dy: &Tensor, offset: u32) -> Result<()> {
        Err(unsupported("embedding_backward"))
    }
    pub(crate) fn rope(&self, x: &Tensor, positions: &Tensor, base: f32, direction: f32) -> Result<Tensor> {
        Err(unsupported("rope"))
    }
    pub(crate) fn cross_entropy(&self, logits: &Tensor, targets: &Tensor, rows: usize, vocab: usize) -> Result<CrossEntropyOutput> {
        Err(unsupported("cross_entropy"))
    }
    pub(crate) fn cross_entropy_backward(&self, logits: &Tensor, lse: &Tensor, targets: &Tensor, scale: f32, rows: usize, vocab: usize) -> Result<Tensor> {
        Err(unsupported("cross_entropy_backward"))
    }
    pub(crate) fn adamw_step(&self, param: &mut Tensor, grad: &Tensor, m: &mut Tensor, v: &mut Tensor, hyper: &AdamW) -> Result<()> {
        Err(unsupported("adamw_step"))
    }
    pub(crate) fn conv2d(&self, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, spec: &Conv2d, dims: ConvDims) -> Result<Tensor> {
        Err(unsupported("conv2d"))
    }
    pub(crate) fn concat(&self, tensors: &[&Tensor], outer: usize, inner: usize, axis: usize, out_shape: Vec<usize>) -> Result<Tensor> {
        Err(unsupported("concat"))
    }
    pub(crate) fn narrow(&self, x: &Tensor, outer: usize, inner: usize, axis_len: usize, start: usize, len: usize, out_shape: Vec<usize>) -> Result<Tensor> {
        Err(unsupported("narrow"))
    }
    pub(crate) fn permute(&self, x: &Tensor, perm: &[usize], out_shape: Vec<usize>) -> Result<Tensor> {
        Err(unsupported("permute"))
    }
    pub(crate) fn cast(&self, x: &Tensor, dtype: DType) -> Result<Tensor> {
        Err(unsupported("cast"))
    }
}
