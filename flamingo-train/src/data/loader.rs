//! Walking an indexed dataset epoch by epoch in a seeded order.

use std::sync::Arc;

use rayon::prelude::*;

use super::error::{BadSample, DataError};
use super::order::{epoch_order, Cursor};
use super::sample::Sample;
use super::skip::SkipLog;
use super::{IndexedDataset, SampleStream};

/// The order settings of a loader or stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoaderConfig {
    /// Visit the records in a new seeded order every epoch; otherwise in file order.
    pub shuffle: bool,
    /// The seed of every random choice: record order, shard order, shuffle buffer.
    pub seed: u64,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            shuffle: true,
            seed: 0,
        }
    }
}

/// Draws samples from an [`IndexedDataset`] in a seeded order, epoch after epoch.
///
/// The order of an epoch depends only on the seed, the epoch number and the
/// dataset length, so a [`Cursor`] restores it exactly.
pub struct Loader {
    dataset: Arc<dyn IndexedDataset>,
    shuffle: bool,
    seed: u64,
    epoch: u64,
    order: Vec<usize>,
    /// Entries of `order` consumed, counting skipped records.
    position: usize,
    /// Samples yielded in this epoch.
    yielded: u64,
    /// Whether this epoch started at position 0 in this process, so that an
    /// epoch without a single good sample can be distinguished from a
    /// restore near the end of an epoch.
    full_pass: bool,
}

impl Loader {
    /// Creates a loader at the start of epoch 0.
    pub fn new(dataset: Arc<dyn IndexedDataset>, config: LoaderConfig) -> Result<Self, DataError> {
        if dataset.is_empty() {
            return Err(DataError::NoSamples {
                dataset: dataset.name().to_string(),
                detail: format!("the dataset has no records; {}", dataset.skips().summary()),
            });
        }

        let order = epoch_order(dataset.len(), config.shuffle, config.seed, 0);
        Ok(Loader {
            dataset,
            shuffle: config.shuffle,
            seed: config.seed,
            epoch: 0,
            order,
            position: 0,
            yielded: 0,
            full_pass: true,
        })
    }

    /// Returns the dataset this loader draws from.
    pub fn dataset(&self) -> &Arc<dyn IndexedDataset> {
        &self.dataset
    }

    /// Returns the current epoch, counting from 0.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Moves to the start of the next epoch, or fails if the epoch that just
    /// ended was a full pass without one usable sample.
    fn finish_epoch(&mut self) -> Result<(), DataError> {
        let empty_pass = self.full_pass && self.yielded == 0;

        self.epoch += 1;
        self.order = epoch_order(self.dataset.len(), self.shuffle, self.seed, self.epoch);
        self.position = 0;
        self.yielded = 0;
        self.full_pass = true;

        if empty_pass {
            return Err(DataError::NoSamples {
                dataset: self.dataset.name().to_string(),
                detail: format!(
                    "every one of {} records failed to decode; {}",
                    self.dataset.len(),
                    self.dataset.skips().summary()
                ),
            });
        }
        Ok(())
    }

    /// Keeps a decoded sample or counts a bad one.
    fn accept(&mut self, result: Result<Sample, BadSample>) -> Option<Sample> {
        match result {
            Ok(sample) => {
                self.yielded += 1;
                Some(sample)
            }
            Err(bad) => {
                self.dataset.skips().record(&bad);
                None
            }
        }
    }
}

impl Iterator for Loader {
    type Item = Result<Sample, DataError>;

    /// Returns the next sample of this epoch, or `None` once at its end.
    fn next(&mut self) -> Option<Self::Item> {
        while self.position < self.order.len() {
            let index = self.order[self.position];
            self.position += 1;
            let result = self.dataset.get(index);
            if let Some(sample) = self.accept(result) {
                return Some(Ok(sample));
            }
        }

        match self.finish_epoch() {
            Ok(()) => None,
            Err(error) => Some(Err(error)),
        }
    }
}

impl SampleStream for Loader {
    fn next_batch(&mut self, n: usize) -> Result<Vec<Sample>, DataError> {
        let mut batch = Vec::with_capacity(n);
        while batch.len() < n {
            if self.position == self.order.len() {
                self.finish_epoch()?;
            }

            // Decode as many records as are still missing, in parallel; the
            // results come back in order, so the batch does not depend on
            // thread timing.
            let end = (self.position + n - batch.len()).min(self.order.len());
            let dataset = &self.dataset;
            let results: Vec<Result<Sample, BadSample>> = self.order[self.position..end]
                .par_iter()
                .map(|&index| dataset.get(index))
                .collect();
            self.position = end;

            for result in results {
                if let Some(sample) = self.accept(result) {
                    batch.push(sample);
                }
            }
        }
        Ok(batch)
    }

    fn cursor(&self) -> Cursor {
        Cursor {
            epoch: self.epoch,
            position: self.position as u64,
            seed: self.seed,
            shuffle: self.shuffle,
            order_len: self.order.len() as u64,
        }
    }

    /// Adopts the cursor's seed and shuffle setting along with its position,
    /// because the order depends on them.
    fn restore(&mut self, cursor: &Cursor) -> Result<(), DataError> {
        let len = self.dataset.len();
        if cursor.order_len != len as u64 {
            return Err(DataError::Cursor(format!(
                "it was saved for {} records, but {} has {len}; resume with the same data or start a new run",
                cursor.order_len,
                self.dataset.name()
            )));
        }
        if cursor.position > len as u64 {
            return Err(DataError::Cursor(format!(
                "its position {} is past the end of an epoch of {len} records",
                cursor.position
            )));
        }

        self.shuffle = cursor.shuffle;
        self.seed = cursor.seed;
        self.epoch = cursor.epoch;
        self.order = epoch_order(len, self.shuffle, self.seed, self.epoch);
        self.position = cursor.position as usize;
        self.yielded = 0;
        self.full_pass = cursor.position == 0;
        Ok(())
    }

    fn skips(&self) -> &Arc<SkipLog> {
        self.dataset.skips()
    }
}
