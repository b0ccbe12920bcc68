//! Fused scaled-dot-product attention with causal, padding and media masks.
//!
//! Shapes (B batch, Tq queries, Tk keys, Hq query heads, Hkv key/value
//! heads, D head size, Dv value head size):
//!
//! - q [B, Tq, Hq, D], k [B, Tk, Hkv, D], v [B, Tk, Hkv, Dv]
//! - out [B, Tq, Hq, Dv], lse [B, Hq, Tq] (log-sum-exp of each score row)
//!
//! These are the layouts a projection produces ([B, T, H·D] viewed as
//! [B, T, H, D]), so no transposes are needed around the op. Query head h
//! reads key/value head h / (Hq / Hkv): grouped-query attention.
//!
//! Query i may attend key j when every mask present allows it:
//!
//! - causal: j ≤ i + (Tk − Tq), so a query block appended after a cache of
//!   Tk − Tq keys sees the cache;
//! - key padding: `key_padding[b, j] != 0`;
//! - media: `query_media[b, i] != 0` and `key_media[b, j] == query_media[b, i]`.
//!   This is Flamingo's mask: a text token sees only the latents of the
//!   latest image before it, and a token with media index 0 sees nothing.
//!
//! A query that may attend no key gets exactly zero output and zero
//! gradients, never NaN; its lse is −∞.
//!
//! Backward uses the saved lse to rebuild the probabilities p, then with
//! Δᵢ = Σ dout ⊙ out over the row: dv_j = Σᵢ p dout_i,
//! ds = p (dout_i·v_j − Δᵢ), dq_i = scale Σⱼ ds k_j, dk_j = scale Σᵢ ds q_i.

use crate::device::{Backend, Device};
use crate::error::{shape_err, Result};
use crate::ops::par_rows;
use crate::tensor::{DType, Tensor};

/// Which keys each query may attend.
#[derive(Debug, Clone, Copy, Default)]
pub struct AttentionMask<'a> {
    /// Query i attends keys j ≤ i + (Tk − Tq).
    pub causal: bool,
    /// u32 [B, Tk]: 0 marks a padding key that no query attends.
    pub key_padding: Option<&'a Tensor>,
    /// Flamingo's media mask.
    pub media: Option<MediaMask<'a>>,
}

/// Flamingo's media mask: each token attends only the latents of its image.
#[derive(Debug, Clone, Copy)]
pub struct MediaMask<'a> {
    /// u32 [B, Tq]: the 1-based index of the latest image at or before each
    /// text token, 0 for none.
    pub query_media: &'a Tensor,
    /// u32 [B, Tk]: the 1-based index of the image each key belongs to.
    pub key_media: &'a Tensor,
}

/// What the attention forward pass returns.
#[derive(Debug, Clone)]
pub struct AttentionOutput {
    /// [B, Tq, Hq, Dv].
    pub out: Tensor,
    /// Log-sum-exp of each row of scaled scores, [B, Hq, Tq]; −∞ where no key is allowed.
    pub lse: Tensor,
}

/// Gradients of the attention inputs.
#[derive(Debug)]
pub struct AttentionGrads {
    pub dq: Tensor,
    pub dk: Tensor,
    pub dv: Tensor,
}

/// The sizes of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AttentionDims {
    pub batch: usize,
    pub tq: usize,
    pub tk: usize,
    pub hq: usize,
    pub hkv: usize,
    pub d: usize,
    pub dv: usize,
}

impl AttentionDims {
    fn group(&self) -> usize {
        self.hq / self.hkv
    }
}

fn attention_dims(op: &'static str, q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttentionMask) -> Result<AttentionDims> {
    if q.rank() != 4 || k.rank() != 4 || v.rank() != 4 {
        return Err(shape_err!(op, "q, k and v must be [B, T, H, D]; found {:?}, {:?}, {:?}", q.shape(), k.shape(), v.shape()));
    }
    let (batch, tq, hq, d) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3]);
    let (tk, hkv) = (k.shape[1], k.shape[2]);
    let dims = AttentionDims { batch, tq, tk, hq, hkv, d, dv: v.shape[3] };
    if k.shape[0] != batch || k.shape[3] != d {
        return Err(shape_err!(op, "k has shape {:?}, expected [{batch}, Tk, Hkv, {d}] to match q {:?}", k.shape(), q.shape()));
    }
    if v.shape[..3] != k.shape[..3] {
        return Err(shape_err!(op, "v has shape {:?}, expected [{batch}, {tk}, {hkv}, Dv] to match k", v.shape()));
    }
    if hkv == 0 || hq % hkv != 0 {
        return Err(shape_err!(op, "{hq} query heads cannot be grouped over {hkv} key/value heads"));
    }
    if mask.causal && tk < tq {
        return Err(shape_err!(op, "a causal mask needs at least as many keys ({tk}) as queries ({tq})"));
    }
    if let Some(padding) = mask.key_padding {
        if padding.shape() != [batch, tk] || padding.dtype() != DType::U32 {
            return Err(shape_err!(op, "key_padding must be u32 [{batch}, {tk}], found {:?} {:?}", padding.dtype(), padding.shape()));
        }
    }
    if let Some(media) = mask.media {
        if media.query_media.shape() != [batch, tq] || media.query_media.dtype() != DType::U32 {
            return Err(shape_err!(op, "query_media must be u32 [{batch}, {tq}], found {:?} {:?}", media.query_media.dtype(), media.query_media.shape()));
        }
        if media.key_media.shape() != [batch, tk] || media.key_media.dtype() != DType::U32 {
            return Err(shape_err!(op, "key_media must be u32 [{batch}, {tk}], found {:?} {:?}", media.key_media.dtype(), media.key_media.shape()));
        }
    }
    Ok(dims)
}

/// The masks as host slices, answering "may query i of batch b attend key j?".
struct CpuMask<'a> {
    causal: bool,
    offset: usize,
    tq: usize,
    tk: usize,
    key_padding: Option<&'a [u32]>,
    media: Option<(&'a [u32], &'a [u32])>,
}

impl<'a> CpuMask<'a> {
    fn new(op: &'static str, mask: &AttentionMask<'a>, dims: AttentionDims) -> Result<Self> {
        let key_padding = match mask.key_padding {
            Some(t) => Some(t.cpu_u32_slice(op, "key_padding")?),
            None => None,
        };
        let media = match mask.media {
            Some(m) => Some((m.query_media.cpu_u32_slice(op, "query_media")?, m.key_media.cpu_u32_slice(op, "key_media")?)),
            None => None,
        };
        Ok(Self { causal: mask.causal, offset: dims.tk.saturating_sub(dims.tq), tq: dims.tq, tk: dims.tk, key_padding, media })
    }

    fn allows(&self, b: usize, i: usize, j: usize) -> bool {
        if self.causal && j > i + self.offset {
            return false;
        }
        if let Some(padding) = self.key_padding {
            if padding[b * self.tk + j] == 0 {
                return false;
            }
        }
        if let Some((query_media, key_media)) = self.media {
            let image = query_media[b * self.tq + i];
            if image == 0 || key_media[b * self.tk + j] != image {
                return false;
            }
        }
        true
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

impl Device {
    /// Runs masked scaled-dot-product attention; see the module documentation.
    pub fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttentionMask, scale: f32) -> Result<AttentionOutput> {
        const OP: &str = "attention";
        for (name, t) in [("q", q), ("k", k), ("v", v)] {
            self.check_f(OP, name, t, DType::F32)?;
        }
        self.check_mask(OP, mask)?;
        let dims = attention_dims(OP, q, k, v, mask)?;
        match self.backend() {
            Backend::Cpu => self.cpu_attention(q, k, v, mask, scale, dims),
            Backend::Gpu(gpu) => gpu.attention(q, k, v, mask, scale, dims),
        }
    }

    /// Returns the gradients of q, k and v given the forward inputs and outputs.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        forward: &AttentionOutput,
        dout: &Tensor,
        mask: &AttentionMask,
        scale: f32,
    ) -> Result<AttentionGrads> {
        const OP: &str = "attention_backward";
        for (name, t) in [("q", q), ("k", k), ("v", v), ("out", &forward.out), ("lse", &forward.lse), ("dout", dout)] {
            self.check_f(OP, name, t, DType::F32)?;
        }
        self.check_mask(OP, mask)?;
        let dims = attention_dims(OP, q, k, v, mask)?;
        if dout.shape() != forward.out.shape() || forward.lse.shape() != [dims.batch, dims.hq, dims.tq] {
            return Err(shape_err!(OP, "dout {:?} or lse {:?} does not match the forward pass", dout.shape(), forward.lse.shape()));
        }
        match self.backend() {
            Backend::Cpu => self.cpu_attention_backward(q, k, v, forward, dout, mask, scale, dims),
            Backend::Gpu(gpu) => gpu.attention_backward(q, k, v, forward, dout, mask, scale, dims),
        }
    }

    fn check_mask(&self, op: &'static str, mask: &AttentionMask) -> Result<()> {
        if let Some(padding) = mask.key_padding {
            self.check(op, "key_padding", padding)?;
        }
        if let Some(media) = mask.media {
            self.check(op, "query_media", media.query_media)?;
            self.check(op, "key_media", media.key_media)?;
        }
        Ok(())
    }

    fn cpu_attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttentionMask, scale: f32, dims: AttentionDims) -> Result<AttentionOutput> {
        const OP: &str = "attention";
        let (qs, ks, vs) = (q.cpu_f32_slice(OP, "q")?, k.cpu_f32_slice(OP, "k")?, v.cpu_f32_slice(OP, "v")?);
        let mask = CpuMask::new(OP, mask, dims)?;
        let AttentionDims { batch, tq, tk, hq, hkv, d, dv } = dims;
        let group = dims.group();

        // One output row per (b, i, h), in the [B, Tq, Hq, Dv] order of `out`;
        // the lse of the row is stored in the last column of a wider scratch row.
        let mut rows = vec![0.0f32; batch * tq * hq * (dv + 1)];
        par_rows(&mut rows, dv + 1, |row, out| {
            let (b, i, h) = (row / (tq * hq), (row / hq) % tq, row % hq);
            let q_row = &qs[row * d..(row + 1) * d];
            let kv_head = h / group;
            let mut scores = Vec::with_capacity(tk);
            let mut max = f32::NEG_INFINITY;
            for j in 0..tk {
                if mask.allows(b, i, j) {
                    let key = &ks[((b * tk + j) * hkv + kv_head) * d..][..d];
                    let score = scale * dot(q_row, key);
                    max = max.max(score);
                    scores.push((j, score));
                }
            }
            if scores.is_empty() {
                out[dv] = f32::NEG_INFINITY;
                return;
            }
            let mut total = 0.0f32;
            for (j, score) in scores.iter_mut() {
                let p = (*score - max).exp();
                total += p;
                *score = p;
                let value = &vs[((b * tk + *j) * hkv + kv_head) * dv..][..dv];
                out[..dv].iter_mut().zip(value).for_each(|(o, v)| *o += p * v);
            }
            out[..dv].iter_mut().for_each(|o| *o /= total);
            out[dv] = max + total.ln();
        });

        let mut out = Vec::with_capacity(batch * tq * hq * dv);
        let mut lse = vec![0.0f32; batch * hq * tq];
        for (row, chunk) in rows.chunks(dv + 1).enumerate() {
            out.extend_from_slice(&chunk[..dv]);
            let (b, i, h) = (row / (tq * hq), (row / hq) % tq, row % hq);
            lse[(b * hq + h) * tq + i] = chunk[dv];
        }
        let id = self.id();
        Ok(AttentionOutput {
            out: Tensor::cpu_f32(vec![batch, tq, hq, dv], out, id),
            lse: Tensor::cpu_f32(vec![batch, hq, tq], lse, id),
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn cpu_attention_backward(
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
        let (qs, ks, vs) = (q.cpu_f32_slice(OP, "q")?, k.cpu_f32_slice(OP, "k")?, v.cpu_f32_slice(OP, "v")?);
        let (outs, lses, douts) = (forward.out.cpu_f32_slice(OP, "out")?, forward.lse.cpu_f32_slice(OP, "lse")?, dout.cpu_f32_slice(OP, "dout")?);
        let mask = CpuMask::new(OP, mask, dims)?;
        let AttentionDims { batch, tq, tk, hq, hkv, d, dv } = dims;
        let group = dims.group();

        // Δᵢ = dout_i · out_i for every (b, i, h) row.
        let delta: Vec<f32> = douts.chunks(dv.max(1)).zip(outs.chunks(dv.max(1))).map(|(g, o)| dot(g, o)).collect();
        let q_row = |b: usize, i: usize, h: usize| (b * tq + i) * hq + h;
        let kv_row = |b: usize, j: usize, g: usize| (b * tk + j) * hkv + g;
        let probability = |b: usize, i: usize, h: usize, j: usize| -> f32 {
            let lse = lses[(b * hq + h) * tq + i];
            if lse == f32::NEG_INFINITY {
                return 0.0;
            }
            let score = scale * dot(&qs[q_row(b, i, h) * d..][..d], &ks[kv_row(b, j, h / group) * d..][..d]);
            (score - lse).exp()
        };

        let mut dq = vec![0.0f32; qs.len()];
        par_rows(&mut dq, d, |row, out| {
            let (b, i, h) = (row / (tq * hq), (row / hq) % tq, row % hq);
            for j in (0..tk).filter(|&j| mask.allows(b, i, j)) {
                let p = probability(b, i, h, j);
                let value = &vs[kv_row(b, j, h / group) * dv..][..dv];
                let ds = p * (dot(&douts[row * dv..][..dv], value) - delta[row]);
                let key = &ks[kv_row(b, j, h / group) * d..][..d];
                out.iter_mut().zip(key).for_each(|(o, k)| *o += scale * ds * k);
            }
        });

        // dk and dv rows are independent per (b, j, kv head): each sums over
        // the query heads of its group and over the queries allowed to see it.
        let mut dkv = vec![0.0f32; batch * tk * hkv * (d + dv)];
        par_rows(&mut dkv, d + dv, |row, out| {
            let (b, j, g) = (row / (tk * hkv), (row / hkv) % tk, row % hkv);
            let value = &vs[row * dv..][..dv];
            let (dk, dvalue) = out.split_at_mut(d);
            for h in g * group..(g + 1) * group {
                for i in (0..tq).filter(|&i| mask.allows(b, i, j)) {
                    let p = probability(b, i, h, j);
                    let grad_out = &douts[q_row(b, i, h) * dv..][..dv];
                    dvalue.iter_mut().zip(grad_out).for_each(|(o, g)| *o += p * g);
                    let ds = p * (dot(grad_out, value) - delta[q_row(b, i, h)]);
                    let query = &qs[q_row(b, i, h) * d..][..d];
                    dk.iter_mut().zip(query).for_each(|(o, q)| *o += scale * ds * q);
                }
            }
        });
        let mut dk = Vec::with_capacity(ks.len());
        let mut dvs = Vec::with_capacity(vs.len());
        for chunk in dkv.chunks(d + dv) {
            dk.extend_from_slice(&chunk[..d]);
            dvs.extend_from_slice(&chunk[d..]);
        }

        let id = self.id();
        Ok(AttentionGrads {
            dq: Tensor::cpu_f32(q.shape.clone(), dq, id),
            dk: Tensor::cpu_f32(k.shape.clone(), dk, id),
            dv: Tensor::cpu_f32(v.shape.clone(), dvs, id),
        })
    }
}
