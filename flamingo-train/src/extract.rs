//! Running the frozen vision encoder over a dataset's images, in batches,
//! into a [`FeatureCache`].
//!
//! For an indexed dataset, [`precompute`] decodes and encodes every record
//! once before training. It returns an [`EncodedDataset`] whose samples carry
//! text, label and id but no pixels, so no later epoch decodes an image or
//! runs the encoder. Streamed data is encoded on first use by
//! [`FeatureExtractor::ensure`].

use std::sync::Arc;
use std::time::Instant;

use flamingo_kernels::{DType, Device, HostData, HostTensor};
use flamingo_model::vision::VisionEncoder;
use half::f16;
use image::{DynamicImage, RgbImage};
use indicatif::ProgressBar;
use rayon::prelude::*;
use serde::Serialize;

use crate::data::{BadSample, IndexedDataset, Media, Sample, SkipLog};
use crate::error::{Result, TrainError};
use crate::features::{media_digest, media_key, FeatureCache};
use crate::progress;
use crate::stop::StopFlag;

/// Records decoded at once during [`precompute`], as a multiple of the encoder batch.
const DECODE_BATCHES: usize = 4;

/// Counts of one or more extraction passes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct ExtractionStats {
    /// Frames run through the encoder.
    pub frames_encoded: u64,
    /// Media items found in the cache.
    pub cache_hits: u64,
    /// Seconds spent decoding, preprocessing and encoding.
    pub seconds: f64,
}

impl ExtractionStats {
    /// Frames encoded per second of extraction time.
    pub fn frames_per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.frames_encoded as f64 / self.seconds
        } else {
            0.0
        }
    }

    fn add(&mut self, other: ExtractionStats) {
        self.frames_encoded += other.frames_encoded;
        self.cache_hits += other.cache_hits;
        self.seconds += other.seconds;
    }
}

/// The encoder, the device its input goes to and the batch size.
pub struct FeatureExtractor {
    pub encoder: Arc<VisionEncoder>,
    pub device: Device,
    /// Frames per encoder call.
    pub batch_size: usize,
    /// Totals of every call so far.
    pub stats: ExtractionStats,
}

/// A media item whose features are missing from the cache.
struct Pending {
    key: String,
    digest: u64,
    frames: Vec<RgbImage>,
}

impl FeatureExtractor {
    pub fn new(encoder: Arc<VisionEncoder>, device: Device, batch_size: usize) -> Self {
        Self { encoder, device, batch_size: batch_size.max(1), stats: ExtractionStats::default() }
    }

    /// Encodes every media item of `samples` that `cache` lacks (or holds
    /// for other pixels), in batches, and stores the results.
    pub fn ensure(&mut self, samples: &[Sample], cache: &mut FeatureCache) -> Result<()> {
        let started = Instant::now();
        let mut pending = Vec::new();
        let mut hits = 0;
        for sample in samples {
            for (index, media) in sample.media.iter().enumerate() {
                let key = media_key(&sample.id, index);
                let digest = media_digest(media);
                if cache.lookup(&key, Some(digest)).is_some() {
                    hits += 1;
                } else {
                    pending.push(Pending { key, digest, frames: media.frames().to_vec() });
                }
            }
        }
        let frames = self.encode_pending(pending, cache)?;
        self.stats.add(ExtractionStats { frames_encoded: frames, cache_hits: hits, seconds: started.elapsed().as_secs_f64() });
        Ok(())
    }

    /// Encodes the frames of `pending` in batches of `batch_size` and
    /// stores one entry per item; returns the frames encoded.
    fn encode_pending(&self, pending: Vec<Pending>, cache: &mut FeatureCache) -> Result<u64> {
        let total: usize = pending.iter().map(|item| item.frames.len()).sum();
        if total == 0 {
            return Ok(0);
        }
        let row_len = cache.row_len();
        let mut items = pending.into_iter().peekable();
        let mut values: Vec<f16> = Vec::new();
        let mut waiting: Vec<(String, u64, usize)> = Vec::new();
        let mut frames: Vec<DynamicImage> = Vec::with_capacity(self.batch_size);

        // Items may span batch boundaries, so rows are collected until an
        // item's last frame is encoded.
        while let Some(item) = items.next() {
            waiting.push((item.key, item.digest, item.frames.len()));
            frames.extend(item.frames.into_iter().map(DynamicImage::ImageRgb8));
            let last = items.peek().is_none();
            while frames.len() >= self.batch_size || (last && !frames.is_empty()) {
                let take = frames.len().min(self.batch_size);
                let batch: Vec<DynamicImage> = frames.drain(..take).collect();
                values.extend(self.encode_images(&batch, row_len)?);
            }
            let mut done = 0;
            let mut offset = 0;
            for (key, digest, count) in &waiting {
                let end = offset + count * row_len;
                if end > values.len() {
                    break;
                }
                cache.insert(key.clone(), *digest, &values[offset..end])?;
                offset = end;
                done += 1;
            }
            waiting.drain(..done);
            values.drain(..offset);
        }
        Ok(total as u64)
    }

    /// Preprocesses and encodes one batch, returning [N, tokens, dim] as f16.
    fn encode_images(&self, images: &[DynamicImage], row_len: usize) -> Result<Vec<f16>> {
        let pixels = self.encoder.preprocess_batch(images)?;
        let pixels = self.device.upload(&pixels)?;
        let tokens = self.encoder.encode(&pixels)?;
        let expected = images.len() * row_len;
        if tokens.numel() != expected {
            return Err(TrainError::Config(format!(
                "the {} encoder returned {:?} for {} images, expected {} values per image",
                self.encoder.name(),
                tokens.shape(),
                images.len(),
                row_len
            )));
        }
        let host: HostTensor = self.device.cast(&tokens, DType::F16)?.to_host()?;
        match host.into_f16().data {
            HostData::F16(values) => Ok(values),
            _ => unreachable!("into_f16 returns f16 data"),
        }
    }
}

/// A record of an [`EncodedDataset`]: everything but the pixels.
#[derive(Debug, Clone)]
struct EncodedRecord {
    id: String,
    text: String,
    label: Option<u32>,
    media: usize,
}

/// An indexed dataset whose media were encoded into a feature cache.
///
/// [`get`](IndexedDataset::get) returns each sample with its text, label
/// and id, and with media that are empty 0×0 placeholders, one per item:
/// the features are looked up in the cache by sample id. A record that
/// failed to decode returns the same [`BadSample`] every time, so skip
/// counts grow per epoch as they do for the raw dataset.
pub struct EncodedDataset {
    name: String,
    records: Vec<Result<EncodedRecord, BadSample>>,
    skips: Arc<SkipLog>,
}

impl EncodedDataset {
    /// Records that decoded.
    pub fn usable(&self) -> usize {
        self.records.iter().filter(|record| record.is_ok()).count()
    }
}

impl IndexedDataset for EncodedDataset {
    fn len(&self) -> usize {
        self.records.len()
    }

    fn get(&self, index: usize) -> Result<Sample, BadSample> {
        let record = self.records[index].as_ref().map_err(Clone::clone)?;
        let media = (0..record.media).map(|_| Media::Image(RgbImage::new(0, 0))).collect();
        Ok(Sample { media, text: record.text.clone(), label: record.label, id: record.id.clone() })
    }

    fn skips(&self) -> &Arc<SkipLog> {
        &self.skips
    }

    fn name(&self) -> &str {
        &self.name
    }
}

/// Decodes every record of `dataset` and encodes the media the cache
/// lacks. Returns `None` when `stop` was set before it finished.
///
/// Fails when no record decodes, naming the first failure. A single bad
/// record stays an error in the result, and a loader counts it at each visit.
pub fn precompute(
    dataset: &Arc<dyn IndexedDataset>,
    extractor: &mut FeatureExtractor,
    cache: &mut FeatureCache,
    bar: &ProgressBar,
    stop: &StopFlag,
) -> Result<Option<EncodedDataset>> {
    let started = Instant::now();
    let before = extractor.stats;
    let chunk = extractor.batch_size * DECODE_BATCHES;
    let mut records = Vec::with_capacity(dataset.len());
    let mut first_bad: Option<BadSample> = None;

    for start in (0..dataset.len()).step_by(chunk) {
        if stop.is_set() {
            cache.flush()?;
            return Ok(None);
        }
        let end = (start + chunk).min(dataset.len());
        let decoded: Vec<Result<Sample, BadSample>> = (start..end).into_par_iter().map(|index| dataset.get(index)).collect();
        let mut samples = Vec::with_capacity(decoded.len());
        for result in decoded {
            match result {
                Ok(sample) => {
                    let record = EncodedRecord { id: sample.id.clone(), text: sample.text.clone(), label: sample.label, media: sample.media.len() };
                    records.push(Ok(record));
                    samples.push(sample);
                }
                Err(bad) => {
                    first_bad.get_or_insert_with(|| bad.clone());
                    records.push(Err(bad));
                }
            }
        }
        extractor.ensure(&samples, cache)?;
        bar.inc((end - start) as u64);
    }
    cache.flush()?;

    let encoded = EncodedDataset { name: dataset.name().to_string(), records, skips: dataset.skips().clone() };
    if encoded.usable() == 0 {
        let first = first_bad.map(|bad| format!("; first: {bad}")).unwrap_or_default();
        return Err(crate::data::DataError::NoSamples {
            dataset: dataset.name().to_string(),
            detail: format!("every one of {} records failed to decode{first}", dataset.len()),
        }
        .into());
    }

    let mut pass = extractor.stats;
    pass.frames_encoded -= before.frames_encoded;
    pass.cache_hits -= before.cache_hits;
    let plural = |n: u64, noun: &str| if n == 1 { format!("1 {noun}") } else { format!("{n} {noun}s") };
    let mut line = format!(
        "features of {}: {}, {} encoded, {} from the cache, {:.1} s ({:.1} images/s)",
        dataset.name(),
        plural(dataset.len() as u64, "record"),
        plural(pass.frames_encoded, "frame"),
        plural(pass.cache_hits, "media item"),
        started.elapsed().as_secs_f64(),
        pass.frames_encoded as f64 / started.elapsed().as_secs_f64().max(1e-9)
    );
    // Unusable records are counted when a loader skips them, at every
    // visit; this names them once, before the first step.
    let unusable = encoded.records.len() - encoded.usable();
    if let Some(bad) = &first_bad {
        let records = if unusable == 1 { "record is" } else { "records are" };
        line.push_str(&format!("; {unusable} {records} unusable and will be skipped, the first: {bad}"));
    }
    progress::log(bar, &line);
    Ok(Some(encoded))
}
