//! Host side of shaders/attention.wgsl: fused attention forward and backward.
//!
//! The masks (key padding, query and key media indices) are packed into one
//! u32 buffer so a kernel needs at most eight storage bindings, the minimum
//! every adapter offers. Work is split by batch entries when tensors exceed
//! one binding; one entry must fit.

use crate::error::Result;
use crate::gpu::chunk::Operand;
use crate::gpu::context::{KernelKey, Params};
use crate::gpu::pool::GpuBuffer;
use crate::gpu::GpuBackend;
use crate::ops::attention::{AttentionDims, AttentionGrads, AttentionMask, AttentionOutput};
use crate::tensor::{DType, Tensor};

const FILE: &str = "attention.wgsl";
const WORKGROUP: usize = 32;

/// The masks of one call packed into one buffer, with the word offset of each.
struct PackedMasks {
    buffer: Option<GpuBuffer>,
    causal: bool,
    padding: Option<usize>,
    media: Option<(usize, usize)>,
}

/// The kernels keep one head in private arrays, which cannot have length 0.
fn zero_head(op: &'static str) -> crate::error::Error {
    crate::error::Error::Unsupported { op, backend: "wgpu".into(), reason: "heads of size 0 are not supported".into() }
}

impl GpuBackend {
    fn pack_masks(&self, op: &'static str, mask: &AttentionMask, dims: AttentionDims) -> Result<PackedMasks> {
        let padding_words = if mask.key_padding.is_some() { dims.batch * dims.tk } else { 0 };
        let media_words = if mask.media.is_some() { dims.batch * (dims.tq + dims.tk) } else { 0 };
        let total = padding_words + media_words;
        if total == 0 {
            return Ok(PackedMasks { buffer: None, causal: mask.causal, padding: None, media: None });
        }
        let buffer = self.context.allocate(op, (total * 4) as u64)?;
        let mut job = self.context.job(op);
        let mut padding = None;
        if let Some(key_padding) = mask.key_padding {
            job.copy(key_padding.gpu_buffer(op, "key_padding")?, 0, &buffer, 0, (padding_words * 4) as u64);
            padding = Some(0);
        }
        let mut media = None;
        if let Some(m) = mask.media {
            let query_offset = padding_words;
            let key_offset = padding_words + dims.batch * dims.tq;
            job.copy(m.query_media.gpu_buffer(op, "query_media")?, 0, &buffer, (query_offset * 4) as u64, (dims.batch * dims.tq * 4) as u64);
            job.copy(m.key_media.gpu_buffer(op, "key_media")?, 0, &buffer, (key_offset * 4) as u64, (dims.batch * dims.tk * 4) as u64);
            media = Some((query_offset, key_offset));
        }
        job.submit()?;
        self.context.check_binding(op, "masks", (total * 4) as u64)?;
        Ok(PackedMasks { buffer: Some(buffer), causal: mask.causal, padding, media })
    }

    fn attention_params(dims: AttentionDims, scale: f32, masks: &PackedMasks, batch: usize, first_batch: usize) -> Params {
        Params::new()
            .u(batch)
            .u(dims.tq)
            .u(dims.tk)
            .u(dims.hq)
            .u(dims.hkv)
            .f(scale)
            .u(masks.causal as usize)
            .u(masks.padding.is_some() as usize)
            .u(masks.media.is_some() as usize)
            .u(masks.padding.unwrap_or(0))
            .u(masks.media.map_or(0, |(query, _)| query))
            .u(masks.media.map_or(0, |(_, key)| key))
            .u(first_batch)
    }

    fn attention_key(entry: &'static str, dims: AttentionDims) -> KernelKey {
        KernelKey::new(FILE, entry).constant("HEAD_DIM", dims.d as u32).constant("VALUE_DIM", dims.dv as u32)
    }

    pub(crate) fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttentionMask, scale: f32, dims: AttentionDims) -> Result<AttentionOutput> {
        const OP: &str = "attention";
        let AttentionDims { batch, tq, tk, hq, hkv, d, dv } = dims;
        let (query, key, value) = (q.gpu_buffer(OP, "q")?, k.gpu_buffer(OP, "k")?, v.gpu_buffer(OP, "v")?);
        if d == 0 || dv == 0 {
            return Err(zero_head(OP));
        }
        let out = self.output(OP, &[batch, tq, hq, dv], DType::F32)?;
        let mut job = self.context.job(OP);
        if tk == 0 {
            // No key at all: every row is empty, with zero output and lse = −∞.
            job.clear(&out);
            job.submit()?;
            let lse = self.context.upload_bytes(OP, bytemuck::cast_slice(&vec![f32::NEG_INFINITY; batch * hq * tq]))?;
            return Ok(AttentionOutput { out: self.tensor(vec![batch, tq, hq, dv], DType::F32, out), lse: self.tensor(vec![batch, hq, tq], DType::F32, lse) });
        }
        let lse = self.output(OP, &[batch, hq, tq], DType::F32)?;
        let masks = self.pack_masks(OP, mask, dims)?;
        let mask_buffer = masks.buffer.as_ref().unwrap_or(query);
        self.context.dispatch_rows(
            &mut job,
            &Self::attention_key("attention_forward", dims),
            batch,
            &[
                Operand::rows("q", query, (tq * hq * d * 4) as u64),
                Operand::rows("k", key, (tk * hkv * d * 4) as u64),
                Operand::rows("v", value, (tk * hkv * dv * 4) as u64),
                Operand::whole("masks", mask_buffer),
                Operand::rows_mut("out", &out, (tq * hq * dv * 4) as u64),
                Operand::rows_mut("lse", &lse, (hq * tq * 4) as u64),
            ],
            |chunk| Self::attention_params(dims, scale, &masks, chunk.len(), chunk.start),
            |chunk| [tq.div_ceil(WORKGROUP) as u32, hq as u32, chunk.len() as u32],
        )?;
        job.submit()?;
        Ok(AttentionOutput { out: self.tensor(vec![batch, tq, hq, dv], DType::F32, out), lse: self.tensor(vec![batch, hq, tq], DType::F32, lse) })
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attention_backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        forward: &AttentionOutput,
        dout: &Tensor,
        mask: &AttentionMask,
        scale: f32,
        dims: AttentionDims,
    ) -> Result<AttentionGrads> {
        const OP: &str = "attention_backward";
        let AttentionDims { batch, tq, tk, hq, hkv, d, dv } = dims;
        let (query, key, value) = (q.gpu_buffer(OP, "q")?, k.gpu_buffer(OP, "k")?, v.gpu_buffer(OP, "v")?);
        let (out, lse, grad) = (forward.out.gpu_buffer(OP, "out")?, forward.lse.gpu_buffer(OP, "lse")?, dout.gpu_buffer(OP, "dout")?);
        let dq = self.output(OP, q.shape(), DType::F32)?;
        let dk = self.output(OP, k.shape(), DType::F32)?;
        let dvalue = self.output(OP, v.shape(), DType::F32)?;
        let grads = |dq, dk, dvalue| AttentionGrads {
            dq: self.tensor(q.shape.clone(), DType::F32, dq),
            dk: self.tensor(k.shape.clone(), DType::F32, dk),
            dv: self.tensor(v.shape.clone(), DType::F32, dvalue),
        };
        if d == 0 || dv == 0 {
            return Err(zero_head(OP));
        }
        let mut job = self.context.job(OP);
        job.clear(&dq);
        job.clear(&dk);
        job.clear(&dvalue);
        if tk == 0 || tq == 0 {
            job.submit()?;
            return Ok(grads(dq, dk, dvalue));
        }
        let masks = self.pack_masks(OP, mask, dims)?;
        let mask_buffer = masks.buffer.as_ref().unwrap_or(query);
        let stats = self.output(OP, &[batch, hq, tq, 2], DType::F32)?;

        let q_bytes = (tq * hq * d * 4) as u64;
        let k_bytes = (tk * hkv * d * 4) as u64;
        let v_bytes = (tk * hkv * dv * 4) as u64;
        let out_bytes = (tq * hq * dv * 4) as u64;
        let stats_bytes = (hq * tq * 8) as u64;
        let params = |chunk: &std::ops::Range<usize>| Self::attention_params(dims, scale, &masks, chunk.len(), chunk.start);

        self.context.dispatch_rows(
            &mut job,
            &Self::attention_key("attention_delta", dims),
            batch,
            &[
                Operand::rows("out", out, out_bytes),
                Operand::rows("dout", grad, out_bytes),
                Operand::rows("lse", lse, (hq * tq * 4) as u64),
                Operand::rows_mut("stats", &stats, stats_bytes),
            ],
            params,
            |chunk| [tq.div_ceil(WORKGROUP) as u32, hq as u32, chunk.len() as u32],
        )?;
        self.context.dispatch_rows(
            &mut job,
            &Self::attention_key("attention_dq", dims),
            batch,
            &[
                Operand::rows("q", query, q_bytes),
                Operand::rows("k", key, k_bytes),
                Operand::rows("v", value, v_bytes),
                Operand::rows("dout", grad, out_bytes),
                Operand::rows("stats", &stats, stats_bytes),
                Operand::whole("masks", mask_buffer),
                Operand::rows_mut("dq", &dq, q_bytes),
            ],
            params,
            |chunk| [tq.div_ceil(WORKGROUP) as u32, hq as u32, chunk.len() as u32],
        )?;
        self.context.dispatch_rows(
            &mut job,
            &Self::attention_key("attention_dkdv", dims),
            batch,
            &[
                Operand::rows("q", query, q_bytes),
                Operand::rows("k", key, k_bytes),
                Operand::rows("v", value, v_bytes),
                Operand::rows("dout", grad, out_bytes),
                Operand::rows("stats", &stats, stats_bytes),
                Operand::whole("masks", mask_buffer),
                Operand::rows_mut("dk", &dk, k_bytes),
                Operand::rows_mut("dv", &dvalue, v_bytes),
            ],
            params,
            |chunk| [tk.div_ceil(WORKGROUP) as u32, hkv as u32, chunk.len() as u32],
        )?;
        job.submit()?;
        Ok(grads(dq, dk, dvalue))
    }
}
