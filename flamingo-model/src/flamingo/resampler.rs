//! The Perceiver Resampler: a fixed number of learned latents that attend to
//! the visual tokens of one media item, whatever their number.
//!
//! Shapes (M media items, F frames, N tokens per frame, D visual width,
//! L latents, H heads of Dh):
//!
//! - input  x [M, F, N, D]: the frozen encoder's tokens of each frame
//! - output   [M, L, D]
//!
//! Before the layers, frame f of every item gets `frame_embs[f]` and item m
//! gets `media_time_embs[slot(m)]`, its position among its sample's media
//! (unless `time_embeddings` is off). Each layer then runs, with the latents
//! as queries:
//!
//! ```text
//! xn, ln = norm_media(x), norm_latents(lat)
//! q = to_q(ln); k, v = split(to_kv(concat(xn, ln)))   keys: F·N tokens, then the L latents
//! q, k = q_norm(q), k_norm(k)                          optional, over each head's Dh values
//! lat = lat + to_out(softmax(q·kᵀ / √Dh)·v)
//! lat = lat + ff(lat)                                 LayerNorm, Linear, GELU (or ReLU), Linear
//! ```
//!
//! and a final LayerNorm. Items never attend to each other. Tensor names
//! follow OpenFlamingo (`perceiver.layers.{i}.0.to_q.weight`, ...); the
//! query and key norms are `perceiver.layers.{i}.0.q_norm` and `.k_norm`.
//!
//! IDEFICS's `IdeficsPerceiverResampler` is this module with `qk_norm:
//! layer_norm`, `feed_forward: relu_mlp` and `time_embeddings: false`. Its
//! separate `k_proj` and `v_proj` [H·Dh, D] are the two halves of `to_kv`
//! stacked by rows (keys first).

use flamingo_kernels::{AttentionMask, AttentionOutput, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::flamingo::layers::{FeedForward, FeedForwardKind, FeedForwardSaved, Linear, Norm, NormKind, NormSaved};
use crate::flamingo::params::{Init, ParamId, ParamStore};

/// The shape of a Perceiver Resampler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResamplerConfig {
    /// Width of the visual tokens, and of the latents.
    pub dim: usize,
    pub depth: usize,
    pub heads: usize,
    pub dim_head: usize,
    pub num_latents: usize,
    /// Inner width of the feed-forward block, as a multiple of `dim`.
    pub ff_mult: usize,
    /// Media items per sample with their own learned embedding.
    pub max_num_media: usize,
    /// Video frames per item with their own learned embedding.
    pub max_num_frames: usize,
    /// Norm of the queries and keys over each head's `dim_head` values,
    /// applied after the head split and before the 1/√Dh scaling. `None`
    /// (the default) is OpenFlamingo's layout; IDEFICS uses `layer_norm`.
    #[serde(default)]
    pub qk_norm: Option<NormKind>,
    /// The MLP after the attention: `gelu_mlp` (the default, OpenFlamingo's)
    /// or `relu_mlp` (IDEFICS's); `swiglu` is accepted too.
    #[serde(default)]
    pub feed_forward: FeedForwardKind,
    /// Whether frames and media items get the learned embeddings
    /// `frame_embs` and `media_time_embs` (OpenFlamingo, the default).
    /// IDEFICS has none.
    #[serde(default = "default_time_embeddings")]
    pub time_embeddings: bool,
}

fn default_time_embeddings() -> bool {
    true
}

impl Default for ResamplerConfig {
    fn default() -> Self {
        Self {
            dim: 1024,
            depth: 6,
            heads: 8,
            dim_head: 64,
            num_latents: 64,
            ff_mult: 4,
            max_num_media: 1,
            max_num_frames: 1,
            qk_norm: None,
            feed_forward: FeedForwardKind::GeluMlp,
            time_embeddings: true,
        }
    }
}

/// Epsilon of every norm of the resampler: PyTorch's `nn.LayerNorm` default,
/// which OpenFlamingo and IDEFICS keep.
const NORM_EPS: f32 = 1e-5;

/// One resampler layer: attention of the latents, then a feed-forward block.
#[derive(Debug, Clone)]
struct ResamplerLayer {
    norm_media: Norm,
    norm_latents: Norm,
    to_q: Linear,
    to_kv: Linear,
    to_out: Linear,
    q_norm: Option<Norm>,
    k_norm: Option<Norm>,
    ff: FeedForward,
}

/// Activations of one layer that backward needs.
#[derive(Debug)]
struct ResamplerLayerSaved {
    norm_media: NormSaved,
    norm_latents: NormSaved,
    normed_latents: Tensor,
    kv_input: Tensor,
    q_norm: Option<NormSaved>,
    k_norm: Option<NormSaved>,
    /// Queries and keys as attention read them, after the optional norms.
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attention: AttentionOutput,
    ff: FeedForwardSaved,
}

/// Activations of a whole resampler pass that backward needs.
#[derive(Debug)]
pub struct ResamplerSaved {
    /// The embedding row of every visual token; `None` without time embeddings.
    embedding_ids: Option<EmbeddingIds>,
    shape: [usize; 4],
    layers: Vec<ResamplerLayerSaved>,
    norm: NormSaved,
}

/// The frame and media embedding row of every visual token, u32 [M·F·N].
#[derive(Debug)]
struct EmbeddingIds {
    frame: Tensor,
    media: Tensor,
}

/// The learned frame and media embeddings.
#[derive(Debug, Clone)]
struct TimeEmbeddings {
    /// [max_num_frames, D].
    frame_embs: ParamId,
    /// [max_num_media, 1, D].
    media_time_embs: ParamId,
}

/// The Perceiver Resampler with its trainable tensors in a [`ParamStore`].
#[derive(Debug, Clone)]
pub struct PerceiverResampler {
    pub config: ResamplerConfig,
    latents: ParamId,
    time_embeddings: Option<TimeEmbeddings>,
    layers: Vec<ResamplerLayer>,
    norm: Norm,
}

impl PerceiverResampler {
    /// Registers the tensors under `prefix` (OpenFlamingo uses `perceiver`).
    ///
    /// Latents start at N(0, 0.02²) and the frame and media embeddings at 0:
    /// latents drawn from a unit normal swamp sparse post-ReLU features, so
    /// the output barely changes between images and training collapses.
    pub fn new(store: &mut ParamStore, prefix: &str, config: ResamplerConfig) -> Result<Self> {
        let ResamplerConfig { dim, depth, heads, dim_head, num_latents, ff_mult, max_num_media, max_num_frames, qk_norm, feed_forward, time_embeddings } =
            config;
        if dim == 0 || depth == 0 || heads == 0 || dim_head == 0 || num_latents == 0 || ff_mult == 0 {
            return Err(Error::Config { origin: "resampler".into(), message: format!("every size must be positive, found {config:?}") });
        }
        let inner = heads * dim_head;
        let latents = store.add(format!("{prefix}.latents"), &[num_latents, dim], Init::Normal(0.02), false)?;
        let time_embeddings = if time_embeddings {
            Some(TimeEmbeddings {
                frame_embs: store.add(format!("{prefix}.frame_embs"), &[max_num_frames.max(1), dim], Init::Zeros, false)?,
                media_time_embs: store.add(format!("{prefix}.media_time_embs"), &[max_num_media.max(1), 1, dim], Init::Zeros, false)?,
            })
        } else {
            None
        };
        let mut layers = Vec::with_capacity(depth);
        for i in 0..depth {
            let name = format!("{prefix}.layers.{i}");
            let head_norm = |store: &mut ParamStore, which: &str| {
                qk_norm.map(|kind| Norm::new(store, &format!("{name}.0.{which}"), dim_head, kind, NORM_EPS)).transpose()
            };
            layers.push(ResamplerLayer {
                norm_media: Norm::new(store, &format!("{name}.0.norm_media"), dim, NormKind::LayerNorm, NORM_EPS)?,
                norm_latents: Norm::new(store, &format!("{name}.0.norm_latents"), dim, NormKind::LayerNorm, NORM_EPS)?,
                to_q: Linear::new(store, &format!("{name}.0.to_q"), dim, inner, false)?,
                to_kv: Linear::new(store, &format!("{name}.0.to_kv"), dim, 2 * inner, false)?,
                to_out: Linear::new(store, &format!("{name}.0.to_out"), inner, dim, false)?,
                q_norm: head_norm(store, "q_norm")?,
                k_norm: head_norm(store, "k_norm")?,
                ff: FeedForward::new(store, &format!("{name}.1"), dim, dim * ff_mult, feed_forward, NormKind::LayerNorm, NORM_EPS, false)?,
            });
        }
        let norm = Norm::new(store, &format!("{prefix}.norm"), dim, NormKind::LayerNorm, NORM_EPS)?;
        Ok(Self { config, latents, time_embeddings, layers, norm })
    }

    /// Resamples `x` [M, F, N, D] into latents [M, L, D]. `media_slots[m]`
    /// is item m's 0-based position among its sample's media, which selects
    /// its media embedding. Activations are kept only when `save` is true.
    pub fn forward(&self, store: &ParamStore, x: &Tensor, media_slots: &[u32], save: bool) -> Result<(Tensor, Option<ResamplerSaved>)> {
        let device = store.device().clone();
        let [items, frames, tokens, dim] = self.check_input(x, media_slots)?;
        let ResamplerConfig { heads, dim_head, num_latents, .. } = self.config;
        let keys = frames * tokens + num_latents;

        let (x, embedding_ids) = self.add_time_embeddings(store, x, media_slots)?;
        let x = x.reshape([items, frames * tokens, dim])?;

        let mut latents = device.broadcast_to(store.value(self.latents), &[items, num_latents, dim])?;
        let mut saved_layers = Vec::new();
        let scale = 1.0 / (dim_head as f32).sqrt();
        for layer in &self.layers {
            let (xn, norm_media) = layer.norm_media.forward(store, &x)?;
            let (ln, norm_latents) = layer.norm_latents.forward(store, &latents)?;
            let q = layer.to_q.forward(store, &ln)?.reshape([items, num_latents, heads, dim_head])?;
            let kv_input = device.concat(&[&xn, &ln], 1)?;
            let kv = layer.to_kv.forward(store, &kv_input)?;
            let inner = heads * dim_head;
            let k = device.narrow(&kv, 2, 0, inner)?.reshape([items, keys, heads, dim_head])?;
            let v = device.narrow(&kv, 2, inner, inner)?.reshape([items, keys, heads, dim_head])?;
            let (q, q_norm) = Norm::forward_optional(layer.q_norm.as_ref(), store, q)?;
            let (k, k_norm) = Norm::forward_optional(layer.k_norm.as_ref(), store, k)?;
            let attention = device.attention(&q, &k, &v, &AttentionMask::default(), scale)?;
            let attended = layer.to_out.forward(store, &attention.out.reshape([items, num_latents, inner])?)?;
            latents = device.add(&latents, &attended)?;

            let (ff_out, ff) = layer.ff.forward(store, &latents)?;
            latents = device.add(&latents, &ff_out)?;
            if save {
                saved_layers.push(ResamplerLayerSaved {
                    norm_media,
                    norm_latents,
                    normed_latents: ln,
                    kv_input,
                    q_norm,
                    k_norm,
                    q,
                    k,
                    v,
                    attention,
                    ff,
                });
            }
        }
        let (out, norm) = self.norm.forward(store, &latents)?;
        let saved = save.then_some(ResamplerSaved { embedding_ids, shape: [items, frames, tokens, dim], layers: saved_layers, norm });
        Ok((out, saved))
    }

    /// Adds the gradients of every resampler tensor into the store, given
    /// the output gradient [M, L, D]. Returns the gradient of the input
    /// tokens when `need_dx` (tests use it; training does not, because the
    /// encoder is frozen).
    pub fn backward(&self, store: &mut ParamStore, saved: &ResamplerSaved, dout: &Tensor, need_dx: bool) -> Result<Option<Tensor>> {
        let device = store.device().clone();
        let [items, frames, tokens, dim] = saved.shape;
        let ResamplerConfig { heads, dim_head, num_latents, .. } = self.config;
        let inner = heads * dim_head;
        let media_tokens = frames * tokens;
        let scale = 1.0 / (dim_head as f32).sqrt();

        let mut dlatents = self.norm.backward(store, &saved.norm, dout)?;
        let mut dx: Option<Tensor> = None;
        for (layer, s) in self.layers.iter().zip(&saved.layers).rev() {
            // latents = latents + ff(latents)
            let dff = layer.ff.backward(store, &s.ff, &dlatents)?;
            device.add_assign(&mut dlatents, &dff)?;

            // latents = latents + to_out(attention(q, k, v))
            let attention_flat = s.attention.out.reshape([items, num_latents, inner])?;
            let dattention = layer.to_out.backward(store, &attention_flat, &dlatents, true)?.expect("dx was requested");
            let dattention = dattention.reshape([items, num_latents, heads, dim_head])?;
            let grads = device.attention_backward(&s.q, &s.k, &s.v, &s.attention, &dattention, &AttentionMask::default(), scale)?;
            let dq = Norm::backward_optional(layer.q_norm.as_ref(), store, s.q_norm.as_ref(), grads.dq)?;
            let dk = Norm::backward_optional(layer.k_norm.as_ref(), store, s.k_norm.as_ref(), grads.dk)?;
            let keys = media_tokens + num_latents;
            let dkv = device.concat(&[&dk.reshape([items, keys, inner])?, &grads.dv.reshape([items, keys, inner])?], 2)?;
            let dkv_input = layer.to_kv.backward(store, &s.kv_input, &dkv, true)?.expect("dx was requested");
            let dq = dq.reshape([items, num_latents, inner])?;
            let mut dln = layer.to_q.backward(store, &s.normed_latents, &dq, true)?.expect("dx was requested");
            device.add_assign(&mut dln, &device.narrow(&dkv_input, 1, media_tokens, num_latents)?)?;
            let dxn = device.narrow(&dkv_input, 1, 0, media_tokens)?;

            let dlatents_from_norm = layer.norm_latents.backward(store, &s.norm_latents, &dln)?;
            device.add_assign(&mut dlatents, &dlatents_from_norm)?;
            let dx_layer = layer.norm_media.backward(store, &s.norm_media, &dxn)?;
            match &mut dx {
                Some(total) => device.add_assign(total, &dx_layer)?,
                None => dx = Some(dx_layer),
            }
        }

        // The latents are shared by every item; the embeddings were added per token.
        store.accumulate(self.latents, device.sum_leading(&dlatents, 2)?)?;
        let dx = dx.expect("the resampler has at least one layer").reshape([items * media_tokens, dim])?;
        if let (Some(embeddings), Some(ids)) = (&self.time_embeddings, &saved.embedding_ids) {
            device.embedding_backward(store.grad_mut(embeddings.frame_embs)?, &ids.frame, &dx, 0)?;
            let media_rows = self.config.max_num_media.max(1);
            let mut dmedia = device.zeros(vec![media_rows, dim], flamingo_kernels::DType::F32)?;
            device.embedding_backward(&mut dmedia, &ids.media, &dx, 0)?;
            store.accumulate(embeddings.media_time_embs, dmedia.reshape([media_rows, 1, dim])?)?;
        }
        Ok(need_dx.then(|| dx.reshape([items, frames, tokens, dim])).transpose()?)
    }

    /// Adds the frame and media embeddings to every token of `x` [M, F, N, D].
    /// Returns the tokens as [M·F·N, D] and the embedding rows used, or the
    /// unchanged tokens and `None` without time embeddings.
    fn add_time_embeddings(&self, store: &ParamStore, x: &Tensor, media_slots: &[u32]) -> Result<(Tensor, Option<EmbeddingIds>)> {
        let device = store.device();
        let [items, frames, tokens, dim] = [x.dim(0), x.dim(1), x.dim(2), x.dim(3)];
        let rows = items * frames * tokens;
        let x = x.reshape([rows, dim])?;
        let Some(embeddings) = &self.time_embeddings else {
            return Ok((x, None));
        };

        let frame_ids: Vec<u32> = (0..rows).map(|i| ((i / tokens) % frames) as u32).collect();
        let media_ids: Vec<u32> = (0..rows).map(|i| media_slots[i / (frames * tokens)]).collect();
        let ids = EmbeddingIds { frame: device.from_u32(vec![rows], frame_ids)?, media: device.from_u32(vec![rows], media_ids)? };
        let media_table = store.value(embeddings.media_time_embs).reshape([self.config.max_num_media.max(1), dim])?;
        let x = device.add(&x, &device.embedding(store.value(embeddings.frame_embs), &ids.frame, 0)?)?;
        let x = device.add(&x, &device.embedding(&media_table, &ids.media, 0)?)?;
        Ok((x, Some(ids)))
    }

    fn check_input(&self, x: &Tensor, media_slots: &[u32]) -> Result<[usize; 4]> {
        let ResamplerConfig { dim, max_num_media, max_num_frames, .. } = self.config;
        if x.rank() != 4 || x.dim(3) != dim {
            return Err(Error::InvalidInput(format!(
                "the resampler expects visual tokens [media, frames, tokens, {dim}], found {:?}; the vision encoder's width must equal the resampler's dim",
                x.shape()
            )));
        }
        let [items, frames, tokens, dim] = [x.dim(0), x.dim(1), x.dim(2), x.dim(3)];
        if self.time_embeddings.is_some() && frames > max_num_frames.max(1) {
            return Err(Error::InvalidInput(format!("a clip has {frames} frames, but the resampler has frame embeddings for {max_num_frames}")));
        }
        if media_slots.len() != items {
            return Err(Error::InvalidInput(format!("{} media slots given for {items} media items", media_slots.len())));
        }
        if let Some(&slot) = media_slots.iter().find(|&&slot| slot as usize >= max_num_media.max(1)) {
            return Err(Error::InvalidInput(format!("media slot {slot} is beyond the {max_num_media} media per sample the resampler has embeddings for")));
        }
        Ok([items, frames, tokens, dim])
    }
}
