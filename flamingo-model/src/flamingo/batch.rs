//! Interleaved image-text sequences: tokens, the media index of every token,
//! loss targets, and their assembly into padded batches.
//!
//! The media index of token t is the number of `<image>` tokens at or before
//! t: the 1-based index of the image the token is attached to, 0 for text
//! before the first image. Cross-attention lets each token see only the
//! latents of that image.

use std::borrow::Cow;

use flamingo_kernels::{Device, Tensor, IGNORE_INDEX};

use crate::error::{Error, Result};
use crate::loader::Tokenizer;

/// One piece of a sample's text: prompt text (no loss) or target text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment<'a> {
    pub text: &'a str,
    /// Whether the loss is computed on this piece's tokens.
    pub target: bool,
}

/// A tokenized sample and the tokens its loss covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedText {
    pub ids: Vec<u32>,
    /// Whether token t is a target: predicted from the tokens before it.
    pub loss_mask: Vec<bool>,
}

impl TokenizedText {
    /// The number of `<image>` markers.
    pub fn count_images(&self, image_id: u32) -> usize {
        self.ids.iter().filter(|&&id| id == image_id).count()
    }
}

/// Tokenizes `segments` in order. `<image>` tokens and every token before
/// the first `<image>` are never targets: the first carry no text, the
/// others are tied to no image.
pub fn tokenize_segments(tokenizer: &Tokenizer, segments: &[Segment], image_id: u32) -> Result<TokenizedText> {
    let mut ids = Vec::new();
    let mut loss_mask = Vec::new();
    for segment in segments {
        let encoding = tokenizer
            .encode(segment.text, false)
            .map_err(|e| Error::Tokenizer(format!("cannot tokenize {:?}: {e}", segment.text)))?;
        for &id in encoding.get_ids() {
            ids.push(id);
            loss_mask.push(segment.target);
        }
    }
    let mut seen_image = false;
    for (id, target) in ids.iter().zip(loss_mask.iter_mut()) {
        if *id == image_id {
            seen_image = true;
            *target = false;
        } else if !seen_image {
            *target = false;
        }
    }
    Ok(TokenizedText { ids, loss_mask })
}

/// The media index of every token: how many `<image>` tokens are at or before it.
pub fn media_index(ids: &[u32], image_id: u32) -> Vec<u32> {
    let mut count = 0;
    ids.iter()
        .map(|&id| {
            count += (id == image_id) as u32;
            count
        })
        .collect()
}

/// Limits a batch must respect.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// The LM's context length.
    pub max_tokens: usize,
    /// Media items per sample the model has embeddings for.
    pub max_images: usize,
    /// Latents the resampler produces per media item.
    pub num_latents: usize,
    pub image_id: u32,
    pub pad_id: u32,
}

/// A padded batch of tokenized samples, on a device.
#[derive(Debug, Clone)]
pub struct TextBatch {
    pub batch: usize,
    /// Tokens per row after right padding.
    pub tokens: usize,
    /// Media slots per sample after padding (the most any sample has, at least 1).
    pub media_slots: usize,
    /// Media items each sample really has.
    pub media_counts: Vec<usize>,
    /// u32 [B, T].
    pub ids: Tensor,
    /// u32 [B, T]: 0, 1, 2, … in every row.
    pub positions: Tensor,
    /// u32 [B, T]: the media index of every token.
    pub query_media: Tensor,
    /// u32 [B, S·L]: the media index of every latent, 0 for padding slots.
    pub key_media: Tensor,
    /// u32 [N]: rows of the flattened [B·T] hidden states whose next token is a target.
    pub target_rows: Tensor,
    /// u32 [N]: the target token of each of those rows.
    pub targets: Tensor,
    pub num_targets: usize,
    /// The ids on the host, [B·T].
    pub host_ids: Vec<u32>,
    /// `query_media` on the host.
    pub host_query_media: Vec<u32>,
    /// `target_rows` on the host.
    pub host_target_rows: Vec<u32>,
    /// Leading positions of every row that the loss depends on, one past the
    /// last position whose next token is a target (at least 1).
    pub loss_tokens: usize,
}

impl TextBatch {
    /// Pads `samples` on the right to one length and computes media indices
    /// and targets. `media_counts[b]` is the number of media items given for
    /// sample b, which must equal its number of `<image>` markers.
    pub fn new(device: &Device, samples: &[TokenizedText], media_counts: &[usize], limits: &BatchLimits) -> Result<TextBatch> {
        if samples.is_empty() {
            return Err(Error::InvalidInput("a batch needs at least one sample".into()));
        }
        if samples.len() != media_counts.len() {
            return Err(Error::InvalidInput(format!("{} samples but {} media counts", samples.len(), media_counts.len())));
        }
        for (index, (sample, &count)) in samples.iter().zip(media_counts).enumerate() {
            check_sample(index, sample, count, limits)?;
        }

        let batch = samples.len();
        let tokens = samples.iter().map(|s| s.ids.len()).max().unwrap_or(0).max(1);
        let slots = media_counts.iter().copied().max().unwrap_or(0).max(1);
        let mut ids = vec![limits.pad_id; batch * tokens];
        let mut query_media = vec![0u32; batch * tokens];
        let mut target_rows = Vec::new();
        let mut targets = Vec::new();
        for (b, sample) in samples.iter().enumerate() {
            let row = b * tokens;
            ids[row..row + sample.ids.len()].copy_from_slice(&sample.ids);
            query_media[row..row + sample.ids.len()].copy_from_slice(&media_index(&sample.ids, limits.image_id));
            // Position t predicts token t + 1.
            for t in 0..sample.ids.len().saturating_sub(1) {
                if sample.loss_mask[t + 1] {
                    target_rows.push((row + t) as u32);
                    targets.push(sample.ids[t + 1]);
                }
            }
        }
        let key_media: Vec<u32> = (0..batch * slots * limits.num_latents)
            .map(|i| {
                let (b, slot) = (i / (slots * limits.num_latents), (i / limits.num_latents) % slots);
                if slot < media_counts[b] { slot as u32 + 1 } else { 0 }
            })
            .collect();
        let positions: Vec<u32> = (0..batch * tokens).map(|i| (i % tokens) as u32).collect();

        let num_targets = targets.len();
        let (target_rows, targets) = if num_targets == 0 { (vec![0], vec![IGNORE_INDEX]) } else { (target_rows, targets) };
        let loss_tokens = target_rows.iter().map(|&row| row as usize % tokens + 1).max().unwrap_or(1);
        Ok(TextBatch {
            batch,
            tokens,
            media_slots: slots,
            media_counts: media_counts.to_vec(),
            ids: device.from_u32(vec![batch, tokens], ids.clone())?,
            positions: device.from_u32(vec![batch, tokens], positions)?,
            query_media: device.from_u32(vec![batch, tokens], query_media.clone())?,
            key_media: device.from_u32(vec![batch, slots * limits.num_latents], key_media)?,
            target_rows: device.from_u32(vec![target_rows.len()], target_rows.clone())?,
            targets: device.from_u32(vec![targets.len()], targets)?,
            num_targets,
            host_ids: ids,
            host_query_media: query_media,
            host_target_rows: target_rows,
            loss_tokens,
        })
    }

    /// Returns the batch cut to its first `loss_tokens` positions, all that
    /// the loss reads. The LM is causal and cross-attention works token by
    /// token, so the state at position t depends only on positions up to t.
    /// The positions after the last one that predicts a target (a sample's
    /// final token, then padding) change neither the loss nor its gradients.
    pub fn for_loss(&self, device: &Device) -> Result<Cow<'_, TextBatch>> {
        let (batch, tokens, kept) = (self.batch, self.tokens, self.loss_tokens);
        if kept >= tokens {
            return Ok(Cow::Borrowed(self));
        }
        let rows: Vec<u32> = self.host_target_rows.iter().map(|&row| (row as usize / tokens * kept + row as usize % tokens) as u32).collect();
        let cut = |values: &[u32]| -> Vec<u32> { values.chunks(tokens).flat_map(|row| row[..kept].iter().copied()).collect() };
        let (ids, query_media) = (cut(&self.host_ids), cut(&self.host_query_media));
        let positions: Vec<u32> = (0..batch * kept).map(|i| (i % kept) as u32).collect();
        Ok(Cow::Owned(TextBatch {
            batch,
            tokens: kept,
            media_slots: self.media_slots,
            media_counts: self.media_counts.clone(),
            ids: device.from_u32(vec![batch, kept], ids.clone())?,
            positions: device.from_u32(vec![batch, kept], positions)?,
            query_media: device.from_u32(vec![batch, kept], query_media.clone())?,
            key_media: self.key_media.clone(),
            target_rows: device.from_u32(vec![rows.len()], rows.clone())?,
            targets: self.targets.clone(),
            num_targets: self.num_targets,
            host_ids: ids,
            host_query_media: query_media,
            host_target_rows: rows,
            loss_tokens: kept,
        }))
    }
}

fn check_sample(index: usize, sample: &TokenizedText, media_count: usize, limits: &BatchLimits) -> Result<()> {
    let markers = sample.count_images(limits.image_id);
    if markers != media_count {
        return Err(Error::InvalidInput(format!(
            "sample {index} has {markers} <image> marker(s) but {media_count} image(s); give one image per marker"
        )));
    }
    if media_count > limits.max_images {
        return Err(Error::InvalidInput(format!(
            "sample {index} has {media_count} images, more than the configured maximum of {} (max_images)",
            limits.max_images
        )));
    }
    if sample.ids.len() > limits.max_tokens {
        return Err(Error::InvalidInput(format!(
            "sample {index} is {} tokens long, longer than the language model's context of {} tokens; shorten the text",
            sample.ids.len(),
            limits.max_tokens
        )));
    }
    if sample.ids.len() != sample.loss_mask.len() {
        return Err(Error::InvalidInput(format!("sample {index} has {} ids but {} loss flags", sample.ids.len(), sample.loss_mask.len())));
    }
    Ok(())
}
