//! Flamingo: a frozen language model that reads interleaved images and text
//! through a trainable Perceiver Resampler and gated cross-attention blocks.
//!
//! Shapes (B batch, T tokens, C text width, S media slots per sample, F
//! frames, N visual tokens per frame, Dv visual width, L latents, V base
//! vocabulary):
//!
//! ```text
//! visual tokens [B·S, F, N, Dv] -> resampler -> latents [B, S·L, Dv]
//! ids [B, T] -> embed (frozen rows + trainable rows of the added tokens)
//!   -> for every LM layer i: a gated cross-attention block first when
//!      (i + 1) % cross_attn_every_n_layers == 0, then frozen layer i
//!   -> final norm -> logits [.., V + 2] at the positions that need them
//! ```
//!
//! The added tokens `<image>` and `<|endofchunk|>` get ids V and V + 1, one
//! trainable input row each and one trainable output row each, so the
//! model can learn to end a caption.

use flamingo_kernels::{DType, Device, Matmul, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::flamingo::batch::{BatchLimits, TextBatch};
use crate::flamingo::cross_attention::{CrossAttentionLayout, CrossAttentionSaved, CrossAttentionShape, GatedCrossAttention, MediaKeys};
use crate::flamingo::params::{ParamId, ParamStore};
use crate::flamingo::resampler::{PerceiverResampler, ResamplerConfig};
use crate::lm::{LanguageModel, LayerSaved, SelfAttentionInput};
use crate::loader::{add_special_tokens, SpecialTokens, Tokenizer, END_OF_CHUNK_TOKEN, IMAGE_TOKEN};

/// Logit rows computed at once by the fused LM head and cross-entropy, so
/// that a long batch never holds a [tokens, vocabulary] tensor whole.
const HEAD_CHUNK_ROWS: usize = 128;

/// The shape of the trainable connector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlamingoConfig {
    pub resampler: ResamplerConfig,
    /// A cross-attention block goes before LM layer i when (i + 1) is a multiple of this.
    pub cross_attn_every_n_layers: usize,
    pub cross_attn_heads: usize,
    pub cross_attn_dim_head: usize,
    /// Inner width of the blocks' feed-forward part, as a multiple of the text width.
    pub cross_attn_ff_mult: usize,
    /// Norms and feed-forward kind of the blocks; OpenFlamingo's when absent.
    #[serde(default)]
    pub cross_attn_layout: CrossAttentionLayout,
}

/// Loss of one forward pass.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossOutput {
    /// Mean cross-entropy over the target tokens.
    pub loss: f32,
    /// How many tokens the loss covers.
    pub tokens: usize,
}

/// The tanh of each block's gates, for logs and plots.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GateValues {
    pub layer: usize,
    pub attention: f32,
    pub feed_forward: f32,
}

/// Flamingo's frozen LM with its trainable connector.
pub struct Flamingo {
    pub config: FlamingoConfig,
    pub lm: LanguageModel,
    pub tokenizer: Tokenizer,
    pub special_tokens: SpecialTokens,
    /// Id of `<image>`.
    pub image_id: u32,
    /// Id of `<|endofchunk|>`.
    pub end_of_chunk_id: u32,
    store: ParamStore,
    resampler: PerceiverResampler,
    /// One entry per LM layer: the block that runs before it, if any.
    blocks: Vec<Option<GatedCrossAttention>>,
    /// Input rows of the added tokens, [2, C].
    added_embedding: ParamId,
    /// Output rows of the added tokens, [2, C].
    added_output: ParamId,
    base_vocab: usize,
}

/// The checkpoint name prefix of LM layer blocks, as OpenFlamingo writes it.
fn layer_prefix(lm: &LanguageModel) -> &'static str {
    match lm {
        LanguageModel::Gpt2(_) => "lang_encoder.transformer.h",
        LanguageModel::Llama(_) => "lang_encoder.model.layers",
    }
}

fn embedding_name(lm: &LanguageModel) -> &'static str {
    match lm {
        LanguageModel::Gpt2(_) => "lang_encoder.transformer.wte.additional_embedding.weight",
        LanguageModel::Llama(_) => "lang_encoder.model.embed_tokens.additional_embedding.weight",
    }
}

impl Flamingo {
    /// Adds `<image>` and `<|endofchunk|>` to the tokenizer and builds a new
    /// connector around `lm`, initialised from `seed`.
    pub fn new(lm: LanguageModel, mut tokenizer: Tokenizer, special_tokens: SpecialTokens, config: FlamingoConfig, seed: u64) -> Result<Self> {
        let device = lm.device().clone();
        let summary = lm.summary().clone();
        let (dim, base_vocab) = (summary.hidden_size, summary.vocab_size);
        validate(&config, summary.num_layers)?;

        let ids = add_special_tokens(&mut tokenizer, &[IMAGE_TOKEN, END_OF_CHUNK_TOKEN])?;
        if ids != [base_vocab as u32, base_vocab as u32 + 1] {
            return Err(Error::Unsupported(format!(
                "the tokenizer gave {IMAGE_TOKEN} and {END_OF_CHUNK_TOKEN} the ids {ids:?}, but trainable rows need the ids {} and {} right after the model's {base_vocab} embedding rows; use a tokenizer whose vocabulary matches the embedding matrix and does not define these tokens",
                base_vocab,
                base_vocab + 1
            )));
        }

        let mut store = ParamStore::new(&device, seed);
        let resampler = PerceiverResampler::new(&mut store, "perceiver", config.resampler.clone())?;
        let shape = CrossAttentionShape {
            dim,
            dim_visual: config.resampler.dim,
            heads: config.cross_attn_heads,
            dim_head: config.cross_attn_dim_head,
            ff_mult: config.cross_attn_ff_mult,
        };
        let prefix = layer_prefix(&lm);
        let mut blocks = Vec::with_capacity(summary.num_layers);
        for layer in 0..summary.num_layers {
            let block = if (layer + 1) % config.cross_attn_every_n_layers == 0 {
                Some(GatedCrossAttention::with_layout(&mut store, &format!("{prefix}.{layer}.gated_cross_attn_layer"), shape, config.cross_attn_layout)?)
            } else {
                None
            };
            blocks.push(block);
        }

        // New rows start at the mean of the existing rows, as Hugging Face's
        // resize_token_embeddings does, so they are ordinary tokens at first.
        let mean_embedding = mean_rows(lm.token_embedding())?;
        let mean_output = mean_rows(lm.lm_head())?;
        let added_embedding = store.add_value(embedding_name(&lm), repeat_row(&mean_embedding, 2)?, false)?;
        let added_output = store.add_value("lang_encoder.lm_head.additional_fc.weight", repeat_row(&mean_output, 2)?, false)?;

        Ok(Self {
            config,
            lm,
            tokenizer,
            special_tokens,
            image_id: ids[0],
            end_of_chunk_id: ids[1],
            store,
            resampler,
            blocks,
            added_embedding,
            added_output,
            base_vocab,
        })
    }

    pub fn device(&self) -> &Device {
        self.store.device()
    }

    /// Returns the trainable tensors.
    pub fn params(&self) -> &ParamStore {
        &self.store
    }

    /// Returns the trainable tensors, for the optimizer and for loading checkpoints.
    pub fn params_mut(&mut self) -> &mut ParamStore {
        &mut self.store
    }

    /// The vocabulary including the two added tokens.
    pub fn vocab_size(&self) -> usize {
        self.base_vocab + 2
    }

    /// LM layers that have a cross-attention block before them.
    pub fn cross_attention_layers(&self) -> Vec<usize> {
        self.blocks.iter().enumerate().filter_map(|(i, block)| block.as_ref().map(|_| i)).collect()
    }

    /// Returns the tanh of every block's gates.
    pub fn gate_values(&self) -> Result<Vec<GateValues>> {
        let mut values = Vec::new();
        for (layer, block) in self.blocks.iter().enumerate() {
            if let Some(block) = block {
                let (attention, feed_forward) = block.gate_values(&self.store)?;
                values.push(GateValues { layer, attention, feed_forward });
            }
        }
        Ok(values)
    }

    /// The limits a batch for this model must respect.
    pub fn batch_limits(&self) -> BatchLimits {
        let pad = self.special_tokens.pad.or(self.special_tokens.eos).unwrap_or(0);
        BatchLimits {
            max_tokens: self.lm.summary().max_positions,
            max_images: self.config.resampler.max_num_media,
            num_latents: self.config.resampler.num_latents,
            image_id: self.image_id,
            pad_id: pad,
        }
    }

    /// Resamples visual tokens [B·S, F, N, Dv] into latents [B, S·L, Dv].
    pub fn resample(&self, batch: usize, visual: &Tensor) -> Result<Tensor> {
        let slots = self.media_slots(batch, visual)?;
        let (latents, _) = self.resampler.forward(&self.store, visual, &slots, false)?;
        self.group_latents(batch, latents)
    }

    /// The keys and values every block reads from `latents` [B, S·L, Dv].
    pub fn media_keys(&self, latents: &Tensor) -> Result<Vec<Option<MediaKeys>>> {
        self.blocks.iter().map(|block| block.as_ref().map(|b| b.media_keys(&self.store, latents)).transpose()).collect()
    }

    /// Token embeddings [B, T, C]: frozen rows for the base vocabulary and
    /// trainable rows for the added tokens.
    pub fn embed(&self, ids: &Tensor, positions: &Tensor) -> Result<Tensor> {
        let device = self.device();
        let base = self.lm.embed(ids, positions)?;
        let added = device.embedding(self.store.value(self.added_embedding), ids, self.base_vocab as u32)?;
        Ok(device.add(&base, &added)?)
    }

    /// Runs block `layer` (if any) and LM layer `layer` on `x`; `keys` are
    /// the block's media keys. Used by generation with a KV cache.
    pub fn layer_step(
        &self,
        layer: usize,
        x: &Tensor,
        keys: Option<&MediaKeys>,
        query_media: &Tensor,
        key_media: &Tensor,
        input: &SelfAttentionInput,
        cache: Option<&mut crate::lm::KvCache>,
    ) -> Result<Tensor> {
        let x = match (&self.blocks[layer], keys) {
            (Some(block), Some(keys)) => block.forward_with_keys(&self.store, x, keys, query_media, key_media)?,
            _ => x.clone(),
        };
        Ok(self.lm.layer_forward(layer, &x, input, cache, false)?.0)
    }

    /// Logits [R, V + 2] of hidden states [R, C] after the final norm.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let device = self.device();
        let base = device.matmul(hidden, self.lm.lm_head(), &Matmul::linear(None))?;
        let added = device.matmul(hidden, self.store.value(self.added_output), &Matmul::linear(None))?;
        Ok(device.concat(&[&base, &added], base.rank() - 1)?)
    }

    /// Logits of every position, [B, T, V + 2], keeping nothing for backward.
    pub fn forward_logits(&self, batch: &TextBatch, visual: &Tensor) -> Result<Tensor> {
        let latents = self.resample(batch.batch, visual)?;
        let hidden = self.run_layers(batch, &latents, None)?;
        let (normed, _) = self.lm.final_norm(&hidden, false)?;
        self.logits(&normed)
    }

    /// Mean loss of `batch` with its visual tokens, keeping nothing for backward.
    pub fn loss(&self, batch: &TextBatch, visual: &Tensor) -> Result<LossOutput> {
        let batch = &*batch.for_loss(self.device())?;
        let latents = self.resample(batch.batch, visual)?;
        let hidden = self.run_layers(batch, &latents, None)?;
        let (normed, _) = self.lm.final_norm(&hidden, false)?;
        let selected = self.select_rows(batch, &normed)?;
        let (loss_sum, _) = self.head_loss(&selected, batch, 0.0, false, None)?;
        Ok(LossOutput { loss: loss_sum / batch.num_targets.max(1) as f32, tokens: batch.num_targets })
    }

    /// Mean loss of each sample of `batch` with its visual tokens, keeping
    /// nothing for backward. A sample without targets gets loss 0 and 0 tokens.
    pub fn loss_per_sample(&self, batch: &TextBatch, visual: &Tensor) -> Result<Vec<LossOutput>> {
        let batch = &*batch.for_loss(self.device())?;
        let latents = self.resample(batch.batch, visual)?;
        let hidden = self.run_layers(batch, &latents, None)?;
        let (normed, _) = self.lm.final_norm(&hidden, false)?;
        let selected = self.select_rows(batch, &normed)?;
        let mut losses = Vec::with_capacity(batch.num_targets);
        self.head_loss(&selected, batch, 0.0, false, Some(&mut losses))?;

        let mut sums = vec![(0.0f64, 0usize); batch.batch];
        if batch.num_targets > 0 {
            // Target rows index the flattened [B·T] positions, so row / T is the sample.
            for (&row, loss) in batch.host_target_rows.iter().zip(losses) {
                let sum = &mut sums[row as usize / batch.tokens];
                sum.0 += loss as f64;
                sum.1 += 1;
            }
        }
        Ok(sums.into_iter().map(|(sum, tokens)| LossOutput { loss: (sum / tokens.max(1) as f64) as f32, tokens }).collect())
    }

    /// Runs forward and backward on `batch`, adding the gradients of the
    /// mean loss times `loss_scale` into the trainable tensors (a scale
    /// below 1 averages gradient accumulation steps).
    pub fn loss_and_backward(&mut self, batch: &TextBatch, visual: &Tensor, loss_scale: f32) -> Result<LossOutput> {
        let device = self.device().clone();
        let batch = &*batch.for_loss(&device)?;
        let slots = self.media_slots(batch.batch, visual)?;
        let (latents, resampler_saved) = self.resampler.forward(&self.store, visual, &slots, true)?;
        let latents = self.group_latents(batch.batch, latents)?;

        let mut saved = ForwardSaved { blocks: Vec::new(), layers: Vec::new() };
        let hidden = self.run_layers(batch, &latents, Some(&mut saved))?;
        let (normed, norm_saved) = self.lm.final_norm(&hidden, true)?;
        let selected = self.select_rows(batch, &normed)?;
        let tokens = batch.num_targets.max(1);
        let (loss_sum, head_grads) = self.head_loss(&selected, batch, loss_scale / tokens as f32, true, None)?;
        let head_grads = head_grads.expect("backward was requested");
        self.store.accumulate(self.added_output, head_grads.dadded_output)?;

        // Scatter the selected rows' gradients back into [B, T, C].
        let width = self.lm.summary().hidden_size;
        let mut dnormed = device.zeros(vec![batch.batch * batch.tokens, width], DType::F32)?;
        device.embedding_backward(&mut dnormed, &batch.target_rows, &head_grads.dselected, 0)?;
        let dnormed = dnormed.reshape([batch.batch, batch.tokens, width])?;
        let mut dx = self.lm.final_norm_backward(norm_saved.as_ref().expect("saved"), &dnormed)?;

        let mut dlatents: Option<Tensor> = None;
        for layer in (0..self.blocks.len()).rev() {
            dx = self.lm.layer_backward(layer, &saved.layers[layer], &dx)?;
            if let Some(block) = &self.blocks[layer] {
                let block_saved = saved.blocks.iter().find(|(l, _)| *l == layer).map(|(_, s)| s).expect("saved");
                let (dx_block, dlat) = block.backward(&mut self.store, block_saved, &dx, &batch.query_media, &batch.key_media)?;
                dx = dx_block;
                match &mut dlatents {
                    Some(total) => device.add_assign(total, &dlat)?,
                    None => dlatents = Some(dlat),
                }
            }
        }

        // Only the rows of the added tokens learn from the embedding gradient.
        let grad = self.store.grad_mut(self.added_embedding)?;
        device.embedding_backward(grad, &batch.ids, &dx, self.base_vocab as u32)?;

        let dlatents = dlatents.expect("there is at least one cross-attention block");
        let [items, _, _, dim] = [visual.dim(0), visual.dim(1), visual.dim(2), visual.dim(3)];
        let dlatents = dlatents.reshape([items, self.config.resampler.num_latents, dim])?;
        self.resampler.backward(&mut self.store, resampler_saved.as_ref().expect("saved"), &dlatents, false)?;
        Ok(LossOutput { loss: loss_sum / tokens as f32, tokens: batch.num_targets })
    }

    /// Runs every block and LM layer on the batch's embeddings; saves what
    /// backward needs when `saved` is given.
    fn run_layers(&self, batch: &TextBatch, latents: &Tensor, mut saved: Option<&mut ForwardSaved>) -> Result<Tensor> {
        let input = SelfAttentionInput { positions: &batch.positions, key_padding: None };
        let mut x = self.embed(&batch.ids, &batch.positions)?;
        for (layer, block) in self.blocks.iter().enumerate() {
            if let Some(block) = block {
                let (out, block_saved) = block.forward(&self.store, &x, latents, &batch.query_media, &batch.key_media, saved.is_some())?;
                x = out;
                if let (Some(saved), Some(block_saved)) = (saved.as_deref_mut(), block_saved) {
                    saved.blocks.push((layer, block_saved));
                }
            }
            let (out, layer_saved) = self.lm.layer_forward(layer, &x, &input, None, saved.is_some())?;
            x = out;
            if let (Some(saved), Some(layer_saved)) = (saved.as_deref_mut(), layer_saved) {
                saved.layers.push(layer_saved);
            }
        }
        Ok(x)
    }

    /// The rows of `normed` [B, T, C] whose next token is a target, [N, C].
    fn select_rows(&self, batch: &TextBatch, normed: &Tensor) -> Result<Tensor> {
        let width = self.lm.summary().hidden_size;
        let flat = normed.reshape([batch.batch * batch.tokens, width])?;
        Ok(self.device().embedding(&flat, &batch.target_rows, 0)?)
    }

    /// Sums the cross-entropy of the selected rows in chunks; with
    /// `backward`, also returns the gradients of `scale` times that sum.
    /// `per_row`, when given, receives the cross-entropy of every row.
    fn head_loss(&self, selected: &Tensor, batch: &TextBatch, scale: f32, backward: bool, mut per_row: Option<&mut Vec<f32>>) -> Result<(f32, Option<HeadGrads>)> {
        let device = self.device();
        let targets = batch.targets.to_vec_u32()?;
        let rows = targets.len();
        let mut loss_sum = 0.0f64;
        let mut dchunks = Vec::new();
        let mut dadded: Option<Tensor> = None;
        for start in (0..rows).step_by(HEAD_CHUNK_ROWS) {
            let len = HEAD_CHUNK_ROWS.min(rows - start);
            let hidden = device.narrow(selected, 0, start, len)?;
            let chunk_targets = device.from_u32(vec![len], targets[start..start + len].to_vec())?;
            let logits = self.logits(&hidden)?;
            let ce = device.cross_entropy(&logits, &chunk_targets)?;
            loss_sum += device.sum(&ce.losses)?.to_scalar()? as f64;
            if let Some(per_row) = per_row.as_deref_mut() {
                per_row.extend(ce.losses.to_vec_f32()?);
            }
            if !backward {
                continue;
            }
            let dlogits = device.cross_entropy_backward(&logits, &ce.lse, &chunk_targets, scale)?;
            let dbase = device.narrow(&dlogits, 1, 0, self.base_vocab)?;
            let dnew = device.narrow(&dlogits, 1, self.base_vocab, 2)?;
            let mut dhidden = device.matmul(&dbase, self.lm.lm_head(), &Matmul::new())?;
            let from_added = device.matmul(&dnew, self.store.value(self.added_output), &Matmul::new())?;
            device.add_assign(&mut dhidden, &from_added)?;
            let mut grad = device.zeros(vec![2, hidden.dim(1)], DType::F32)?;
            device.matmul_accumulate(&mut grad, &dnew, &hidden, true, false, 1.0)?;
            match &mut dadded {
                Some(total) => device.add_assign(total, &grad)?,
                None => dadded = Some(grad),
            }
            dchunks.push(dhidden);
        }
        if !backward {
            return Ok((loss_sum as f32, None));
        }
        let refs: Vec<&Tensor> = dchunks.iter().collect();
        let dselected = device.concat(&refs, 0)?;
        Ok((loss_sum as f32, Some(HeadGrads { dselected, dadded_output: dadded.expect("there is at least one row") })))
    }

    fn media_slots(&self, batch: usize, visual: &Tensor) -> Result<Vec<u32>> {
        if visual.rank() != 4 || batch == 0 || visual.dim(0) % batch != 0 {
            return Err(Error::InvalidInput(format!(
                "visual tokens must be [batch · media slots, frames, tokens, width] for a batch of {batch}, found {:?}",
                visual.shape()
            )));
        }
        let slots = visual.dim(0) / batch;
        Ok((0..visual.dim(0)).map(|item| (item % slots) as u32).collect())
    }

    fn group_latents(&self, batch: usize, latents: Tensor) -> Result<Tensor> {
        let (items, per_item, dim) = (latents.dim(0), latents.dim(1), latents.dim(2));
        Ok(latents.reshape([batch, items / batch * per_item, dim])?)
    }
}

/// Gradients of the fused LM head and cross-entropy.
struct HeadGrads {
    /// With respect to the selected hidden rows, [N, C].
    dselected: Tensor,
    /// With respect to the added tokens' output rows, [2, C].
    dadded_output: Tensor,
}

/// Activations a training step keeps for backward.
struct ForwardSaved {
    blocks: Vec<(usize, CrossAttentionSaved)>,
    layers: Vec<LayerSaved>,
}

fn validate(config: &FlamingoConfig, num_layers: usize) -> Result<()> {
    let origin = "flamingo config".to_string();
    if config.cross_attn_every_n_layers == 0 || config.cross_attn_every_n_layers > num_layers {
        return Err(Error::Config {
            origin,
            message: format!(
                "cross_attn_every_n_layers is {}, but it must be between 1 and the LM's {num_layers} layers",
                config.cross_attn_every_n_layers
            ),
        });
    }
    if config.cross_attn_heads == 0 || config.cross_attn_dim_head == 0 || config.cross_attn_ff_mult == 0 {
        return Err(Error::Config { origin, message: "cross-attention heads, dim_head and ff_mult must be positive".into() });
    }
    Ok(())
}

/// The mean of the rows of a [V, C] matrix.
fn mean_rows(matrix: &Tensor) -> Result<Vec<f32>> {
    let host = matrix.to_host()?.to_f32();
    let cols = matrix.dim(1);
    let mut mean = vec![0.0f64; cols];
    for row in host.chunks(cols) {
        mean.iter_mut().zip(row).for_each(|(m, &v)| *m += v as f64);
    }
    let rows = matrix.dim(0).max(1) as f64;
    Ok(mean.into_iter().map(|m| (m / rows) as f32).collect())
}

fn repeat_row(row: &[f32], times: usize) -> Result<flamingo_kernels::HostTensor> {
    Ok(flamingo_kernels::HostTensor::from_f32(vec![times, row.len()], row.repeat(times))?)
}
