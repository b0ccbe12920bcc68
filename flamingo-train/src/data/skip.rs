//! Counting and reporting skipped samples.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::Serialize;

use super::error::BadSample;

/// The reason a sample was skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipReason {
    /// An image, frame, folder or GIF the record names does not exist.
    MissingFile,
    /// A file exists but could not be read (permissions, I/O error).
    UnreadableFile,
    /// The image bytes are not a valid PNG, JPEG, GIF, WebP or BMP image.
    UndecodableImage,
    /// The caption or text is empty or only whitespace.
    EmptyCaption,
    /// A JSONL line or CSV row is malformed, or a field is missing or has the wrong type.
    InvalidRecord,
    /// The number of `<image>` markers differs from the number of images.
    MarkerMismatch,
    /// The record has no image, or the clip has no frames.
    NoMedia,
    /// A WebDataset group lacks an image or a caption file.
    IncompleteGroup,
    /// A WebDataset shard ended in the middle of an entry or has a corrupt
    /// header; the rest of that shard is skipped.
    TruncatedShard,
}

impl SkipReason {
    /// Every reason, in the order of [`SkipLog::counts`].
    pub const ALL: [SkipReason; 9] = [
        SkipReason::MissingFile,
        SkipReason::UnreadableFile,
        SkipReason::UndecodableImage,
        SkipReason::EmptyCaption,
        SkipReason::InvalidRecord,
        SkipReason::MarkerMismatch,
        SkipReason::NoMedia,
        SkipReason::IncompleteGroup,
        SkipReason::TruncatedShard,
    ];

    /// Returns the reason in plain words, as used in messages.
    pub fn description(self) -> &'static str {
        match self {
            SkipReason::MissingFile => "missing file",
            SkipReason::UnreadableFile => "unreadable file",
            SkipReason::UndecodableImage => "undecodable image",
            SkipReason::EmptyCaption => "empty caption",
            SkipReason::InvalidRecord => "invalid record",
            SkipReason::MarkerMismatch => "image marker count mismatch",
            SkipReason::NoMedia => "no media",
            SkipReason::IncompleteGroup => "incomplete WebDataset group",
            SkipReason::TruncatedShard => "truncated shard",
        }
    }
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.description())
    }
}

/// Number of skips per reason that are logged one by one. After that, only
/// the totals at 10, 100, 1000 and so on are logged.
const WARNINGS_PER_REASON: u64 = 5;

/// Counts of skipped samples per reason, shared by a dataset and its loaders.
///
/// A sample is counted each time it is skipped, so a bad image seen in three
/// epochs counts three times. Skips found while a dataset is opened (a
/// malformed line, a missing file) are counted once.
#[derive(Debug, Default)]
pub struct SkipLog {
    counts: [AtomicU64; SkipReason::ALL.len()],
    first: Mutex<Option<BadSample>>,
}

impl SkipLog {
    /// Creates a log with every count at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts `bad` and logs a warning, rate-limited per reason.
    pub fn record(&self, bad: &BadSample) {
        let count = self.counts[bad.reason as usize].fetch_add(1, Ordering::Relaxed) + 1;

        if let Ok(mut first) = self.first.lock() {
            first.get_or_insert_with(|| bad.clone());
        }

        if count < WARNINGS_PER_REASON {
            tracing::warn!("skipped sample {bad}");
        } else if count == WARNINGS_PER_REASON {
            tracing::warn!(
                "skipped sample {bad} (further skips for {} are logged only at 10, 100, 1000, ...)",
                bad.reason
            );
        } else if count >= 10 && is_power_of_ten(count) {
            tracing::warn!(
                "{count} samples skipped so far for {}; latest: {bad}",
                bad.reason
            );
        }
    }

    /// Number of samples skipped for `reason`.
    pub fn count(&self, reason: SkipReason) -> u64 {
        self.counts[reason as usize].load(Ordering::Relaxed)
    }

    /// Number of samples skipped for any reason.
    pub fn total(&self) -> u64 {
        SkipReason::ALL
            .iter()
            .map(|&reason| self.count(reason))
            .sum()
    }

    /// Returns the non-zero counts by reason.
    pub fn counts(&self) -> BTreeMap<SkipReason, u64> {
        SkipReason::ALL
            .iter()
            .map(|&reason| (reason, self.count(reason)))
            .filter(|&(_, count)| count > 0)
            .collect()
    }

    /// Returns the first sample skipped, if any.
    pub fn first(&self) -> Option<BadSample> {
        self.first.lock().ok().and_then(|first| first.clone())
    }

    /// Formats a one-line report such as `3 skipped (missing file: 2, empty caption: 1)`.
    pub fn summary(&self) -> String {
        let counts = self.counts();
        if counts.is_empty() {
            return "0 skipped".to_string();
        }

        let parts: Vec<String> = counts
            .iter()
            .map(|(reason, count)| format!("{reason}: {count}"))
            .collect();
        let mut summary = format!("{} skipped ({})", self.total(), parts.join(", "));
        if let Some(first) = self.first() {
            summary.push_str(&format!("; first: {first}"));
        }
        summary
    }
}

fn is_power_of_ten(mut n: u64) -> bool {
    while n >= 10 && n.is_multiple_of(10) {
        n /= 10;
    }
    n == 1
}
