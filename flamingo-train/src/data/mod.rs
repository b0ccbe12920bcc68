//! Datasets: image-caption pairs, WebDataset shards, interleaved documents, IDX files and video clips.
//!
//! Every source yields decoded [`Sample`]s: RGB8 images or video frames plus a
//! text in which each `<image>` marker stands for one entry of `media`, in
//! order. Nothing here depends on tensors or the model, so resizing,
//! normalisation and tokenization happen downstream.
//!
//! Two access patterns exist:
//!
//! - Random access ([`IndexedDataset`]) for formats whose records can be
//!   listed up front: JSONL and CSV pairs, interleaved JSONL documents, video
//!   JSONL and IDX files. A [`Loader`] walks one in a seeded order.
//! - Streaming for WebDataset `.tar` shards, through [`ShardStream`], which
//!   shuffles shards and samples through a seeded buffer.
//!
//! Both implement [`SampleStream`]: batches, a [`Cursor`] that a checkpoint
//! stores, and an exact restore. Records are read when a dataset is opened,
//! but images are decoded only when a sample is requested.
//!
//! A bad sample (missing or undecodable image, empty caption, a malformed
//! line) is skipped and counted in a [`SkipLog`] by [`SkipReason`], with
//! rate-limited `tracing` warnings that name the file and line or the shard
//! and key. A dataset with no usable sample, or a file that is wrong as a
//! whole, is a [`DataError`].

mod error;
mod idx;
mod image_io;
mod interleaved;
mod loader;
mod manifest;
mod order;
mod pairs;
mod patterns;
mod sample;
mod skip;
mod template;
mod video;
mod webdataset;

use std::sync::Arc;

pub use error::{BadSample, DataError};
pub use idx::{
    default_fashion_mnist_dir, FashionMnistSplit, IdxConfig, IdxDataset,
    FASHION_MNIST_CAPTION_NAMES, FASHION_MNIST_CLASSES,
};
pub use interleaved::{InterleavedConfig, InterleavedDataset};
pub use loader::{Loader, LoaderConfig};
pub use order::{permutation, split_indices, train_validation_split, Cursor, Subset};
pub use pairs::{CsvPairsConfig, ImageTextDataset, JsonlPairsConfig};
pub use patterns::expand_braces;
pub use sample::{Media, Sample};
pub use skip::{SkipLog, SkipReason};
pub use template::{ClassTemplate, PromptTemplate};
pub use video::{sample_frame_indices, VideoConfig, VideoDataset};
pub use webdataset::{ShardStream, WebDataset, WebDatasetConfig};

/// The marker that stands for one image or video clip in a sample's text.
pub const IMAGE_MARKER: &str = "<image>";

/// The token that closes the text belonging to one image.
pub const END_OF_CHUNK: &str = "<|endofchunk|>";

/// A dataset whose records can be read in any order.
///
/// `len` counts the records that passed the checks made when the dataset was
/// opened. A record can still turn out bad when its images are decoded, so
/// [`get`](Self::get) returns a [`BadSample`] rather than failing the run.
pub trait IndexedDataset: Send + Sync {
    /// Number of records.
    fn len(&self) -> usize;

    /// Returns whether the dataset has no records.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Decodes record `index`.
    ///
    /// # Panics
    ///
    /// Panics if `index >= self.len()`, like slice indexing.
    fn get(&self, index: usize) -> Result<Sample, BadSample>;

    /// Returns the skip counts, shared with every subset and loader of this dataset.
    fn skips(&self) -> &Arc<SkipLog>;

    /// Returns the file or folder the dataset was opened from, for messages.
    fn name(&self) -> &str;
}

/// A source of samples that a training loop draws batches from and checkpoints.
///
/// As an iterator it yields the samples of the current epoch and then `None`
/// once. The call after that starts the next epoch, so `for sample in &mut
/// stream` runs one epoch. [`next_batch`](Self::next_batch) crosses epoch
/// boundaries on its own.
pub trait SampleStream: Iterator<Item = Result<Sample, DataError>> + Send {
    /// Returns the next `n` usable samples, decoded in parallel, starting the
    /// next epoch when the current one runs out.
    ///
    /// Bad samples are skipped and counted. An epoch that yields no sample
    /// at all is a [`DataError::NoSamples`].
    fn next_batch(&mut self, n: usize) -> Result<Vec<Sample>, DataError>;

    /// Returns the position to store in a checkpoint.
    fn cursor(&self) -> Cursor;

    /// Moves to a position returned by [`cursor`](Self::cursor), so that the
    /// following samples are exactly those that followed it before.
    fn restore(&mut self, cursor: &Cursor) -> Result<(), DataError>;

    /// Returns the skip counts of the underlying dataset.
    fn skips(&self) -> &Arc<SkipLog>;
}
