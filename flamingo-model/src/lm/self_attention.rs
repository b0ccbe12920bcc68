//! Causal multi-head self-attention, shared by GPT-2 and Llama.
//!
//! B batch, T new tokens, Tc cached tokens, Tk = Tc + T keys, C channels,
//! Hq query heads, Hkv key/value heads, D head size.
//! x [B, T, C] -> q [B, T, Hq, D], k and v [B, T, Hkv, D] (each a view of
//! its projection [B, T, H·D]) -> attention over the cache and the new
//! tokens -> [B, T, Hq·D] -> output projection -> y [B, T, C].
//!
//! Llama rotates q and k with RoPE before attention; GPT-2 has learned
//! position embeddings instead and no rotation here.

use flamingo_kernels::{AttentionMask, AttentionOutput, Device, Tensor};

use crate::error::{Error, Result};
use crate::lm::kv_cache::LayerCache;
use crate::lm::linear::Linear;

/// Token positions and padding of one self-attention call.
#[derive(Debug, Clone, Copy)]
pub struct SelfAttentionInput<'a> {
    /// u32 [B, T]: the position of each new token (RoPE angle, GPT-2 position row).
    pub positions: &'a Tensor,
    /// u32 [B, Tk] over the cached and the new tokens: 0 marks a padding key
    /// that no query attends.
    pub key_padding: Option<&'a Tensor>,
}

/// A frozen self-attention block.
#[derive(Debug, Clone)]
pub struct SelfAttention {
    /// [Hq·D, C].
    pub q: Linear,
    /// [Hkv·D, C].
    pub k: Linear,
    /// [Hkv·D, C].
    pub v: Linear,
    /// [C, Hq·D].
    pub o: Linear,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// The RoPE base θ, or `None` for no rotation.
    pub rope_theta: Option<f32>,
    /// Multiplies every score q·k before the softmax.
    pub scale: f32,
}

/// Activations that [`SelfAttention::backward`] needs from the forward pass.
#[derive(Debug, Clone)]
pub struct SelfAttentionSaved {
    /// u32 [B, T].
    pub positions: Tensor,
    /// u32 [B, Tk].
    pub key_padding: Option<Tensor>,
    /// [B, T, Hq, D], after RoPE.
    pub q: Tensor,
    /// [B, Tk, Hkv, D], the cache followed by the new tokens, after RoPE.
    pub k: Tensor,
    /// [B, Tk, Hkv, D].
    pub v: Tensor,
    /// out [B, T, Hq, D] and the log-sum-exp of each score row.
    pub attention: AttentionOutput,
}

impl SelfAttention {
    /// Attends from the new tokens `x` [B, T, C] to the cache (if any) and
    /// themselves, appending their keys and values to `cache`.
    pub fn forward(
        &self,
        device: &Device,
        x: &Tensor,
        input: &SelfAttentionInput,
        cache: Option<&mut LayerCache>,
        save: bool,
    ) -> Result<(Tensor, Option<SelfAttentionSaved>)> {
        let (batch, time) = batch_and_time(x)?;
        let (hq, hkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);

        let mut q = self.q.forward(device, x)?.reshape([batch, time, hq, d])?;
        let mut k = self.k.forward(device, x)?.reshape([batch, time, hkv, d])?;
        let v = self.v.forward(device, x)?.reshape([batch, time, hkv, d])?;
        if let Some(theta) = self.rope_theta {
            q = device.rope(&q, input.positions, theta)?;
            k = device.rope(&k, input.positions, theta)?;
        }

        let (k, v) = match cache {
            Some(cache) => cache.append(device, &k, &v)?,
            None => (k, v),
        };
        let mask = AttentionMask { causal: true, key_padding: input.key_padding, media: None };
        let attention = device.attention(&q, &k, &v, &mask, self.scale)?;
        let y = self.o.forward(device, &attention.out.reshape([batch, time, hq * d])?)?;

        let saved = save.then(|| SelfAttentionSaved {
            positions: input.positions.clone(),
            key_padding: input.key_padding.cloned(),
            q,
            k,
            v,
            attention,
        });
        Ok((y, saved))
    }

    /// Returns dx [B, T, C] given dy [B, T, C].
    ///
    /// Cached keys and values are constants here: only the new tokens'
    /// share of dk and dv flows back into x.
    pub fn backward(&self, device: &Device, saved: &SelfAttentionSaved, dy: &Tensor) -> Result<Tensor> {
        let (batch, time) = batch_and_time(dy)?;
        let (hq, hkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let keys = saved.k.dim(1);

        let dout = self.o.backward(device, dy)?.reshape([batch, time, hq, d])?;
        let mask = AttentionMask { causal: true, key_padding: saved.key_padding.as_ref(), media: None };
        let grads = device.attention_backward(&saved.q, &saved.k, &saved.v, &saved.attention, &dout, &mask, self.scale)?;

        let (mut dq, mut dk, mut dv) = (grads.dq, grads.dk, grads.dv);
        if keys > time {
            dk = device.narrow(&dk, 1, keys - time, time)?;
            dv = device.narrow(&dv, 1, keys - time, time)?;
        }
        if let Some(theta) = self.rope_theta {
            dq = device.rope_backward(&dq, &saved.positions, theta)?;
            dk = device.rope_backward(&dk, &saved.positions, theta)?;
        }

        let mut dx = self.q.backward(device, &dq.reshape([batch, time, hq * d])?)?;
        device.add_assign(&mut dx, &self.k.backward(device, &dk.reshape([batch, time, hkv * d])?)?)?;
        device.add_assign(&mut dx, &self.v.backward(device, &dv.reshape([batch, time, hkv * d])?)?)?;
        Ok(dx)
    }
}

/// Reads B and T from a [B, T, C] activation.
pub(crate) fn batch_and_time(x: &Tensor) -> Result<(usize, usize)> {
    match x.shape() {
        &[batch, time, _] => Ok((batch, time)),
        other => Err(Error::InvalidInput(format!("expected hidden states of shape [B, T, C], found {other:?}"))),
    }
}
