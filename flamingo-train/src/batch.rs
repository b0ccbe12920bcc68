//! Assembling a batch for the model: padded token ids and loss targets on
//! the device, and the cached visual tokens of every sample's media.
//!
//! Shapes (B samples, S media slots per sample, F frames, N visual tokens,
//! D visual width): visual tokens are [B·S, F, N, D] f32, with zeros in the
//! slots of samples that have fewer than S items.

use flamingo_kernels::Tensor;
use flamingo_model::flamingo::{BatchLimits, Flamingo, TextBatch, TokenizedText};
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use crate::data::Sample;
use crate::error::{Result, TrainError};
use crate::features::{media_key, Entry, FeatureCache};

/// A batch ready for [`Flamingo::loss_and_backward`].
pub struct PreparedBatch {
    pub text: TextBatch,
    /// [B·S, F, N, D].
    pub visual: Tensor,
    pub samples: usize,
    /// Real (unpadded) tokens of all samples.
    pub tokens: usize,
}

/// Returns why a sample cannot be batched, or `None` when it can.
pub fn unfit_reason(tokens: &TokenizedText, media: usize, limits: &BatchLimits) -> Option<String> {
    let markers = tokens.count_images(limits.image_id);
    if markers != media {
        return Some(format!("its text has {markers} <image> token(s) for {media} media item(s)"));
    }
    if media > limits.max_images {
        return Some(format!("it has {media} images, more than `model.max_images` = {}", limits.max_images));
    }
    if tokens.ids.len() > limits.max_tokens {
        return Some(format!("it is {} tokens long, longer than the language model's context of {}", tokens.ids.len(), limits.max_tokens));
    }
    None
}

/// Builds a batch from samples and their tokens; every media item's
/// features must be in `cache`.
pub fn assemble(model: &Flamingo, cache: &FeatureCache, samples: &[&Sample], tokens: Vec<TokenizedText>) -> Result<PreparedBatch> {
    let visual = visual_tokens(model, cache, samples)?;
    let media_counts: Vec<usize> = samples.iter().map(|sample| sample.media.len()).collect();
    let real_tokens = tokens.iter().map(|t| t.ids.len()).sum();
    let text = TextBatch::new(model.device(), &tokens, &media_counts, &model.batch_limits())?;
    Ok(PreparedBatch { text, visual, samples: samples.len(), tokens: real_tokens })
}

/// Gathers the visual tokens of `samples` from the cache into
/// [B·S, F, N, D], with S the max media count of a sample (at least 1).
pub fn visual_tokens(model: &Flamingo, cache: &FeatureCache, samples: &[&Sample]) -> Result<Tensor> {
    let batch = samples.len();
    let slots = samples.iter().map(|sample| sample.media.len()).max().unwrap_or(0).max(1);

    // The entry of every slot, in [B, S] order; `None` for padding slots.
    let mut entries: Vec<Option<Entry>> = Vec::with_capacity(batch * slots);
    let mut frames: Option<u32> = None;
    for sample in samples {
        for slot in 0..slots {
            if slot >= sample.media.len() {
                entries.push(None);
                continue;
            }
            let key = media_key(&sample.id, slot);
            let entry = cache.lookup(&key, None).ok_or_else(|| {
                TrainError::Config(format!("the features of {key} are missing from the cache; this is a bug in flamingo-train"))
            })?;
            if frames.is_some_and(|f| f != entry.frames) {
                return Err(TrainError::Config(format!(
                    "{key} has {} frames but an earlier item of the batch has {}; a batch needs one frame count, so do not mix images and clips in one dataset",
                    entry.frames,
                    frames.unwrap_or(0)
                )));
            }
            frames = Some(entry.frames);
            entries.push(Some(entry));
        }
    }

    let frames = frames.unwrap_or(1) as usize;
    let item_len = frames * cache.row_len();
    let mut values = vec![0.0f32; batch * slots * item_len];
    values.par_chunks_mut(item_len).zip(entries.par_iter()).for_each(|(item, entry)| {
        if let Some(entry) = entry {
            cache.rows(*entry).convert_to_f32_slice(item);
        }
    });
    Ok(model.device().from_f32(vec![batch * slots, frames, cache.tokens(), cache.dim()], values)?)
}
