//! The gated cross-attention dense block that lets a frozen LM layer see images.
//!
//! Shapes (B batch, T text tokens, C text width, I media per sample,
//! L latents per media item, Dv latent width, H heads of Dh):
//!
//! - x [B, T, C] text hidden states; latents [B, I·L, Dv]
//! - query_media u32 [B, T]: the 1-based index of the latest `<image>` at or
//!   before each token, 0 for none; key_media u32 [B, I·L]: the media index
//!   of each latent (0 for padding media slots, which nothing attends)
//!
//! ```text
//! q = to_q(norm(x)); k, v = split(to_kv(latents))
//! q, k = q_norm(q), k_norm(k)                      optional, over each head's Dh values
//! x = x + tanh(attn_gate) · to_out(attention(q, k, v, media mask))
//! x = x + tanh(ff_gate)   · ff(x)                  by default LayerNorm, Linear, GELU, Linear
//! ```
//!
//! A token attends only to the latents of its own media item; one with index
//! 0 gets exactly zero attention output. Both gates start at 0, so a new
//! block is the identity and step 0 is the frozen LM. Tensor names follow
//! OpenFlamingo (`gated_cross_attn_layer.attn.to_q.weight`, ...); the query
//! and key norms are `attn.q_norm` and `attn.k_norm`.
//!
//! [`CrossAttentionLayout`] selects the norms and the feed-forward block.
//! IDEFICS's `IdeficsGatedCrossAttentionLayer` with "float" gates is the
//! layout with RMSNorm everywhere (epsilon `rms_norm_eps`), `qk_norm:
//! rms_norm` and a SwiGLU feed-forward block: its `input_layernorm` is
//! `attn.norm`, `post_attention_layernorm` is `ff.norm`, `alpha_cross_attn`
//! and `alpha_dense` are the gates, and its `k_proj` and `v_proj` are the two
//! halves of `to_kv` stacked by rows (keys first). IDEFICS's explicit
//! [B, T, images] mask and its zeroing of tokens that see no image are the
//! media mask here when each token may attend only its latest image.

use flamingo_kernels::{AttentionMask, AttentionOutput, MediaMask, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::flamingo::layers::{FeedForward, FeedForwardKind, FeedForwardSaved, Linear, Norm, NormKind, NormSaved};
use crate::flamingo::params::{Init, ParamId, ParamStore};

/// Sizes of one gated cross-attention block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrossAttentionShape {
    /// Text width C.
    pub dim: usize,
    /// Latent width Dv.
    pub dim_visual: usize,
    pub heads: usize,
    pub dim_head: usize,
    pub ff_mult: usize,
}

/// The norms and feed-forward block of a gated cross-attention block;
/// the default is OpenFlamingo's layout.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CrossAttentionLayout {
    /// The norm before the attention and the one that starts the
    /// feed-forward block. Default `layer_norm`.
    pub norm: NormKind,
    /// Epsilon of every norm of the block. Default 1e-5, PyTorch's
    /// `nn.LayerNorm` default; IDEFICS uses its `rms_norm_eps` (1e-6).
    pub norm_eps: f32,
    /// Norm of the queries and keys over each head's `dim_head` values,
    /// applied after the head split and before the 1/√Dh scaling. Default
    /// `None`; IDEFICS's `qk_layer_norms` is `rms_norm`.
    pub qk_norm: Option<NormKind>,
    /// Default `gelu_mlp`; IDEFICS uses `swiglu`.
    pub feed_forward: FeedForwardKind,
}

impl Default for CrossAttentionLayout {
    fn default() -> Self {
        Self { norm: NormKind::LayerNorm, norm_eps: 1e-5, qk_norm: None, feed_forward: FeedForwardKind::GeluMlp }
    }
}

/// Keys and values of one block computed from a batch of latents; generation
/// computes them once per prompt and reuses them for every new token.
#[derive(Debug, Clone)]
pub struct MediaKeys {
    /// [B, I·L, H, Dh], after the key norm when the layout has one.
    pub k: Tensor,
    /// [B, I·L, H, Dh].
    pub v: Tensor,
}

/// Activations of one block that backward needs.
#[derive(Debug)]
pub struct CrossAttentionSaved {
    norm: NormSaved,
    normed: Tensor,
    latents: Tensor,
    q_norm: Option<NormSaved>,
    k_norm: Option<NormSaved>,
    /// Queries as attention read them, after the optional norm.
    q: Tensor,
    keys: MediaKeys,
    attention: AttentionOutput,
    attended: Tensor,
    ff: FeedForwardSaved,
    ff_out: Tensor,
}

/// One gated cross-attention dense block.
#[derive(Debug, Clone)]
pub struct GatedCrossAttention {
    pub shape: CrossAttentionShape,
    pub layout: CrossAttentionLayout,
    norm: Norm,
    to_q: Linear,
    to_kv: Linear,
    to_out: Linear,
    q_norm: Option<Norm>,
    k_norm: Option<Norm>,
    attn_gate: ParamId,
    ff: FeedForward,
    ff_gate: ParamId,
}

impl GatedCrossAttention {
    /// Registers the tensors of a block in OpenFlamingo's layout under
    /// `prefix`, e.g. `lang_encoder.model.layers.2.gated_cross_attn_layer`.
    pub fn new(store: &mut ParamStore, prefix: &str, shape: CrossAttentionShape) -> Result<Self> {
        Self::with_layout(store, prefix, shape, CrossAttentionLayout::default())
    }

    /// Registers the tensors of a block in `layout` under `prefix`.
    pub fn with_layout(store: &mut ParamStore, prefix: &str, shape: CrossAttentionShape, layout: CrossAttentionLayout) -> Result<Self> {
        let CrossAttentionShape { dim, dim_visual, heads, dim_head, ff_mult } = shape;
        let CrossAttentionLayout { norm, norm_eps, qk_norm, feed_forward } = layout;
        if !(norm_eps.is_finite() && norm_eps > 0.0) {
            return Err(Error::Config {
                origin: "cross-attention layout".into(),
                message: format!("norm_eps must be a positive number, found {norm_eps}"),
            });
        }
        let inner = heads * dim_head;
        let head_norm = |store: &mut ParamStore, which: &str| {
            qk_norm.map(|kind| Norm::new(store, &format!("{prefix}.attn.{which}"), dim_head, kind, norm_eps)).transpose()
        };
        Ok(Self {
            shape,
            layout,
            norm: Norm::new(store, &format!("{prefix}.attn.norm"), dim, norm, norm_eps)?,
            to_q: Linear::new(store, &format!("{prefix}.attn.to_q"), dim, inner, true)?,
            to_kv: Linear::new(store, &format!("{prefix}.attn.to_kv"), dim_visual, 2 * inner, true)?,
            to_out: Linear::new(store, &format!("{prefix}.attn.to_out"), inner, dim, true)?,
            q_norm: head_norm(store, "q_norm")?,
            k_norm: head_norm(store, "k_norm")?,
            attn_gate: store.add(format!("{prefix}.attn_gate"), &[1], Init::Zeros, false)?,
            ff: FeedForward::new(store, &format!("{prefix}.ff"), dim, dim * ff_mult, feed_forward, norm, norm_eps, true)?,
            ff_gate: store.add(format!("{prefix}.ff_gate"), &[1], Init::Zeros, false)?,
        })
    }

    /// The block's attention and feed-forward gates, tanh applied.
    pub fn gate_values(&self, store: &ParamStore) -> Result<(f32, f32)> {
        Ok((store.value(self.attn_gate).to_scalar()?.tanh(), store.value(self.ff_gate).to_scalar()?.tanh()))
    }

    /// Projects latents [B, I·L, Dv] to this block's keys and values.
    pub fn media_keys(&self, store: &ParamStore, latents: &Tensor) -> Result<MediaKeys> {
        Ok(self.project_keys(store, latents)?.0)
    }

    /// Projects latents to keys and values; also returns what the key
    /// norm's backward needs.
    fn project_keys(&self, store: &ParamStore, latents: &Tensor) -> Result<(MediaKeys, Option<NormSaved>)> {
        let device = store.device();
        let CrossAttentionShape { dim_visual, heads, dim_head, .. } = self.shape;
        if latents.rank() != 3 || latents.dim(2) != dim_visual {
            return Err(Error::InvalidInput(format!(
                "cross-attention expects latents [batch, media·latents, {dim_visual}], found {:?}; the resampler width must match the checkpoint",
                latents.shape()
            )));
        }
        let (batch, keys) = (latents.dim(0), latents.dim(1));
        let inner = heads * dim_head;
        let kv = self.to_kv.forward(store, latents)?;
        let k = device.narrow(&kv, 2, 0, inner)?.reshape([batch, keys, heads, dim_head])?;
        let (k, k_norm) = Norm::forward_optional(self.k_norm.as_ref(), store, k)?;
        let v = device.narrow(&kv, 2, inner, inner)?.reshape([batch, keys, heads, dim_head])?;
        Ok((MediaKeys { k, v }, k_norm))
    }

    /// Runs the block on x [B, T, C] against precomputed media keys.
    pub fn forward_with_keys(
        &self,
        store: &ParamStore,
        x: &Tensor,
        keys: &MediaKeys,
        query_media: &Tensor,
        key_media: &Tensor,
    ) -> Result<Tensor> {
        Ok(self.run(store, x, keys, None, query_media, key_media)?.0)
    }

    /// Runs the block on x [B, T, C] attending to `latents` [B, I·L, Dv];
    /// keeps what backward needs when `save` is true.
    pub fn forward(
        &self,
        store: &ParamStore,
        x: &Tensor,
        latents: &Tensor,
        query_media: &Tensor,
        key_media: &Tensor,
        save: bool,
    ) -> Result<(Tensor, Option<CrossAttentionSaved>)> {
        let (keys, k_norm) = self.project_keys(store, latents)?;
        let inputs = save.then(|| KeyInputs { latents: latents.clone(), k_norm });
        self.run(store, x, &keys, inputs, query_media, key_media)
    }

    /// Runs the block against `keys`; keeps what backward needs when the
    /// inputs of the keys are given.
    fn run(
        &self,
        store: &ParamStore,
        x: &Tensor,
        keys: &MediaKeys,
        key_inputs: Option<KeyInputs>,
        query_media: &Tensor,
        key_media: &Tensor,
    ) -> Result<(Tensor, Option<CrossAttentionSaved>)> {
        let device = store.device();
        let CrossAttentionShape { dim, heads, dim_head, .. } = self.shape;
        if x.rank() != 3 || x.dim(2) != dim {
            return Err(Error::InvalidInput(format!("cross-attention expects text states [batch, tokens, {dim}], found {:?}", x.shape())));
        }
        let (batch, tokens) = (x.dim(0), x.dim(1));
        let inner = heads * dim_head;

        let (normed, norm) = self.norm.forward(store, x)?;
        let q = self.to_q.forward(store, &normed)?.reshape([batch, tokens, heads, dim_head])?;
        let (q, q_norm) = Norm::forward_optional(self.q_norm.as_ref(), store, q)?;
        let mask = AttentionMask { media: Some(MediaMask { query_media, key_media }), ..AttentionMask::default() };
        let attention = device.attention(&q, &keys.k, &keys.v, &mask, 1.0 / (dim_head as f32).sqrt())?;
        let attended = self.to_out.forward(store, &attention.out.reshape([batch, tokens, inner])?)?;
        let after_attention = device.tanh_gate_add(x, &attended, store.value(self.attn_gate))?;

        let (ff_out, ff) = self.ff.forward(store, &after_attention)?;
        let out = device.tanh_gate_add(&after_attention, &ff_out, store.value(self.ff_gate))?;

        let saved = key_inputs.map(|inputs| CrossAttentionSaved {
            norm,
            normed,
            latents: inputs.latents,
            q_norm,
            k_norm: inputs.k_norm,
            q,
            keys: keys.clone(),
            attention,
            attended,
            ff,
            ff_out,
        });
        Ok((out, saved))
    }

    /// Adds the block's gradients into the store; returns the gradients of
    /// the text states and of the latents.
    pub fn backward(
        &self,
        store: &mut ParamStore,
        saved: &CrossAttentionSaved,
        dout: &Tensor,
        query_media: &Tensor,
        key_media: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let device = store.device().clone();
        let CrossAttentionShape { heads, dim_head, .. } = self.shape;
        let inner = heads * dim_head;
        let (batch, tokens) = (dout.dim(0), dout.dim(1));
        let num_keys = saved.keys.k.dim(1);

        // out = after_attention + tanh(ff_gate) · ff(after_attention)
        let (dff_out, dff_gate) = device.tanh_gate_add_backward(&saved.ff_out, store.value(self.ff_gate), dout)?;
        store.accumulate(self.ff_gate, dff_gate)?;
        let mut dafter = self.ff.backward(store, &saved.ff, &dff_out)?;
        device.add_assign(&mut dafter, dout)?;

        // after_attention = x + tanh(attn_gate) · to_out(attention)
        let (dattended, dattn_gate) = device.tanh_gate_add_backward(&saved.attended, store.value(self.attn_gate), &dafter)?;
        store.accumulate(self.attn_gate, dattn_gate)?;
        let attention_flat = saved.attention.out.reshape([batch, tokens, inner])?;
        let dattention = self.to_out.backward(store, &attention_flat, &dattended, true)?.expect("dx was requested");
        let mask = AttentionMask { media: Some(MediaMask { query_media, key_media }), ..AttentionMask::default() };
        let grads = device.attention_backward(
            &saved.q,
            &saved.keys.k,
            &saved.keys.v,
            &saved.attention,
            &dattention.reshape([batch, tokens, heads, dim_head])?,
            &mask,
            1.0 / (dim_head as f32).sqrt(),
        )?;

        let dq = Norm::backward_optional(self.q_norm.as_ref(), store, saved.q_norm.as_ref(), grads.dq)?;
        let dnormed = self.to_q.backward(store, &saved.normed, &dq.reshape([batch, tokens, inner])?, true)?.expect("dx was requested");
        let mut dx = self.norm.backward(store, &saved.norm, &dnormed)?;
        device.add_assign(&mut dx, &dafter)?;

        let dk = Norm::backward_optional(self.k_norm.as_ref(), store, saved.k_norm.as_ref(), grads.dk)?;
        let dkv = device.concat(&[&dk.reshape([batch, num_keys, inner])?, &grads.dv.reshape([batch, num_keys, inner])?], 2)?;
        let dlatents = self.to_kv.backward(store, &saved.latents, &dkv, true)?.expect("dx was requested");
        Ok((dx, dlatents))
    }
}

/// The latents a block's keys came from and the key norm's saved input,
/// kept for backward.
struct KeyInputs {
    latents: Tensor,
    k_norm: Option<NormSaved>,
}
