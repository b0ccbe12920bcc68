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
//! The CPU version computes p and ds once per query row, with dq, and keeps
//! them for the pass over the keys that sums dk and dv.

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

/// Floats of p and ds that the CPU backward pass keeps at once (64 MiB).
/// Longer sequences are processed in blocks of query positions.
const ATTENTION_SCRATCH: usize = 16 << 20;

/// The dot product of two slices of equal length, summed in eight lanes so
/// that the compiler can vectorise it (one running sum would make every
/// addition wait for the previous one).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 8;
    let (a_lanes, b_lanes) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = a_lanes.remainder().iter().zip(b_lanes.remainder()).map(|(x, y)| x * y).sum();
    let mut sums = [0.0f32; LANES];
    for (x, y) in a_lanes.zip(b_lanes) {
        for lane in 0..LANES {
            sums[lane] += x[lane] * y[lane];
        }
    }
    sums.iter().sum::<f32>() + tail
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
            Backend::Cpu => self.cpu_attention_backward(q, k, v, forward, dout, mask, scale, dims, ATTENTION_SCRATCH),
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
        scratch_floats: usize,
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

        // Query positions are taken in blocks, so that the scratch rows of a
        // block stay within `scratch_floats`. One block covers the short
        // sequences of training. A scratch row per (b, i, h) of the block
        // contains its dq, then p and ds for every key (0 where the mask forbids
        // the pair).
        let width = d + 2 * tk;
        let block = (scratch_floats / (batch * hq * width).max(1)).clamp(1, tq.max(1));
        let mut dq = vec![0.0f32; qs.len()];
        let mut dkv = vec![0.0f32; batch * tk * hkv * (d + dv)];
        for start in (0..tq).step_by(block) {
            let len = block.min(tq - start);
            let mut scratch = vec![0.0f32; batch * len * hq * width];
            par_rows(&mut scratch, width, |local, out| {
                let (b, i, h) = (local / (len * hq), start + (local / hq) % len, local % hq);
                let row = q_row(b, i, h);
                let lse = lses[(b * hq + h) * tq + i];
                if lse == f32::NEG_INFINITY {
                    return;
                }
                let (dq, weights) = out.split_at_mut(d);
                let (probabilities, score_grads) = weights.split_at_mut(tk);
                let (query, grad_out) = (&qs[row * d..][..d], &douts[row * dv..][..dv]);
                for j in (0..tk).filter(|&j| mask.allows(b, i, j)) {
                    let key = &ks[kv_row(b, j, h / group) * d..][..d];
                    let value = &vs[kv_row(b, j, h / group) * dv..][..dv];
                    let p = (scale * dot(query, key) - lse).exp();
                    let ds = p * (dot(grad_out, value) - delta[row]);
                    dq.iter_mut().zip(key).for_each(|(o, k)| *o += scale * ds * k);
                    probabilities[j] = p;
                    score_grads[j] = ds;
                }
            });
            for (local, chunk) in scratch.chunks(width).enumerate() {
                let (b, i, h) = (local / (len * hq), start + (local / hq) % len, local % hq);
                dq[q_row(b, i, h) * d..][..d].copy_from_slice(&chunk[..d]);
            }

            // Each dk and dv row, one per (b, j, kv head), sums over the query
            // heads of its group and over the block's queries allowed to see it.
            par_rows(&mut dkv, d + dv, |row, out| {
                let (b, j, g) = (row / (tk * hkv), (row / hkv) % tk, row % hkv);
                let (dk, dvalue) = out.split_at_mut(d);
                for h in g * group..(g + 1) * group {
                    for i in (start..start + len).filter(|&i| mask.allows(b, i, j)) {
                        let weights = &scratch[((b * len + i - start) * hq + h) * width + d..][..2 * tk];
                        let (p, ds) = (weights[j], weights[tk + j]);
                        let grad_out = &douts[q_row(b, i, h) * dv..][..dv];
                        dvalue.iter_mut().zip(grad_out).for_each(|(o, g)| *o += p * g);
                        let query = &qs[q_row(b, i, h) * d..][..d];
                        dk.iter_mut().zip(query).for_each(|(o, q)| *o += scale * ds * q);
                    }
                }
            });
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1).
    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n as u32).map(|i| ((i.wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(40_503)) % 2000) as f32 / 1000.0 - 1.0).collect()
    }

    #[test]
    fn blocked_backward_matches_one_block() {
        let device = Device::cpu();
        let (batch, tq, tk, hq, hkv, d) = (2, 7, 9, 4, 2, 6);
        let q = device.from_f32(vec![batch, tq, hq, d], values(batch * tq * hq * d, 1)).unwrap();
        let k = device.from_f32(vec![batch, tk, hkv, d], values(batch * tk * hkv * d, 2)).unwrap();
        let v = device.from_f32(vec![batch, tk, hkv, d], values(batch * tk * hkv * d, 3)).unwrap();
        let dout = device.from_f32(vec![batch, tq, hq, d], values(batch * tq * hq * d, 4)).unwrap();
        let padding = device.from_u32(vec![batch, tk], (0..batch * tk).map(|j| (j % 5 != 1) as u32).collect()).unwrap();
        let mask = AttentionMask { causal: true, key_padding: Some(&padding), media: None };
        let dims = attention_dims("test", &q, &k, &v, &mask).unwrap();
        let forward = device.attention(&q, &k, &v, &mask, 0.4).unwrap();

        let whole = device.cpu_attention_backward(&q, &k, &v, &forward, &dout, &mask, 0.4, dims, usize::MAX).unwrap();
        // A budget of one float gives blocks of a single query position.
        let blocks = device.cpu_attention_backward(&q, &k, &v, &forward, &dout, &mask, 0.4, dims, 1).unwrap();
        for (name, a, b) in [("dq", &whole.dq, &blocks.dq), ("dk", &whole.dk, &blocks.dk), ("dv", &whole.dv, &blocks.dv)] {
            let (a, b) = (a.to_vec_f32().unwrap(), b.to_vec_f32().unwrap());
            assert!(a.iter().any(|&x| x != 0.0), "{name} is all zero");
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 1e-6 * (1.0 + x.abs()), "{name}: {x} in one block, {y} in blocks of one query");
            }
        }
    }
}
