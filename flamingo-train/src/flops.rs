//! An estimate of the floating-point operations of a training step, for
//! the achieved GFLOP/s in logs.
//!
//! Only matrix products and attention scores are counted (2 FLOPs per
//! multiply-add), so norms, activations and the optimizer are left out.
//! Backward through a frozen layer computes the input gradient only, which
//! costs as much as its forward matmuls. A trainable layer also computes
//! weight gradients, so its step costs three forwards. Attention counts the full
//! T × T score matrix even where the causal mask skips half of it, and its
//! backward counts twice its forward.

use flamingo_model::flamingo::{Flamingo, TextBatch};
use flamingo_model::lm::LanguageModel;

/// Sizes of a Flamingo model that the estimate needs.
#[derive(Debug, Clone, PartialEq)]
pub struct FlopModel {
    /// Multiply-adds of one LM layer's matmuls per token.
    lm_layer_macs_per_token: f64,
    lm_layers: f64,
    /// Width of the LM's attention (heads × head width).
    lm_attention_width: f64,
    hidden: f64,
    vocab: f64,
    blocks: f64,
    block_inner: f64,
    block_ff: f64,
    visual_dim: f64,
    resampler_depth: f64,
    resampler_inner: f64,
    resampler_ff: f64,
    latents: f64,
}

impl FlopModel {
    pub fn new(model: &Flamingo) -> Self {
        let summary = model.lm.summary();
        let c = summary.hidden_size as f64;
        let attention_width = (summary.num_heads * summary.head_dim) as f64;
        let kv_width = (summary.num_kv_heads * summary.head_dim) as f64;
        let layer_macs = match &model.lm {
            LanguageModel::Llama(llama) => {
                let inner = llama.config.intermediate_size as f64;
                c * attention_width + 2.0 * c * kv_width + attention_width * c + 3.0 * c * inner
            }
            LanguageModel::Gpt2(gpt2) => {
                let inner = gpt2.config.n_inner.unwrap_or(4 * gpt2.config.n_embd) as f64;
                3.0 * c * c + c * c + 2.0 * c * inner
            }
        };
        let config = &model.config;
        let resampler = &config.resampler;
        Self {
            lm_layer_macs_per_token: layer_macs,
            lm_layers: summary.num_layers as f64,
            lm_attention_width: attention_width,
            hidden: c,
            vocab: model.vocab_size() as f64,
            blocks: model.cross_attention_layers().len() as f64,
            block_inner: (config.cross_attn_heads * config.cross_attn_dim_head) as f64,
            block_ff: (config.cross_attn_ff_mult * summary.hidden_size) as f64,
            visual_dim: resampler.dim as f64,
            resampler_depth: resampler.depth as f64,
            resampler_inner: (resampler.heads * resampler.dim_head) as f64,
            resampler_ff: (resampler.ff_mult * resampler.dim) as f64,
            latents: resampler.num_latents as f64,
        }
    }

    /// FLOPs of one forward and backward pass over `batch` with visual
    /// tokens of shape [B·S, F, N, D].
    pub fn training_step(&self, batch: &TextBatch, visual_shape: &[usize]) -> f64 {
        let parts = self.parts(batch, visual_shape);
        2.0 * parts.frozen_matmul + 3.0 * parts.frozen_attention + 2.0 * parts.head + 3.0 * parts.trainable
    }

    /// FLOPs of one forward pass (validation loss).
    pub fn forward(&self, batch: &TextBatch, visual_shape: &[usize]) -> f64 {
        let parts = self.parts(batch, visual_shape);
        parts.frozen_matmul + parts.frozen_attention + parts.head + parts.trainable
    }

    fn parts(&self, batch: &TextBatch, visual_shape: &[usize]) -> Parts {
        let b = batch.batch as f64;
        // The loss runs the model on the leading positions it reads only.
        let t = batch.loss_tokens as f64;
        let targets = batch.num_targets as f64;
        let (items, frames, tokens) = (visual_shape[0] as f64, visual_shape[1] as f64, visual_shape[2] as f64);
        let slots = items / b.max(1.0);

        let frozen_matmul = 2.0 * self.lm_layer_macs_per_token * b * t * self.lm_layers;
        let frozen_attention = 4.0 * b * t * t * self.lm_attention_width * self.lm_layers;
        let head = 2.0 * self.hidden * self.vocab * targets;

        let latent_rows = b * slots * self.latents;
        let block = 2.0 * b * t * (2.0 * self.hidden * self.block_inner + 2.0 * self.hidden * self.block_ff)
            + 2.0 * latent_rows * self.visual_dim * 2.0 * self.block_inner
            + 4.0 * b * t * slots * self.latents * self.block_inner;

        let keys = frames * tokens + self.latents;
        let resampler_layer = 2.0 * self.latents * self.visual_dim * self.resampler_inner
            + 2.0 * keys * self.visual_dim * 2.0 * self.resampler_inner
            + 2.0 * self.latents * self.resampler_inner * self.visual_dim
            + 4.0 * self.latents * self.visual_dim * self.resampler_ff
            + 4.0 * self.latents * keys * self.resampler_inner;
        let resampler = items * self.resampler_depth * resampler_layer;

        Parts { frozen_matmul, frozen_attention, head, trainable: self.blocks * block + resampler }
    }
}

struct Parts {
    frozen_matmul: f64,
    frozen_attention: f64,
    head: f64,
    trainable: f64,
}
