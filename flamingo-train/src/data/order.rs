//! Seeded orders, the train/validation split and the saved data position.
//!
//! The random numbers come from SplitMix64 with a Fisher-Yates shuffle,
//! both written here rather than taken from `rand`, whose generators and
//! shuffles may change output between versions. A cursor saved in a
//! checkpoint must replay the same order after a dependency upgrade.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::error::{BadSample, DataError};
use super::sample::Sample;
use super::skip::SkipLog;
use super::IndexedDataset;

/// Streams of random numbers derived from one seed, kept apart so that, for
/// example, the shard order and the shuffle buffer never share numbers.
pub(crate) const ORDER_STREAM: u64 = 1;
pub(crate) const BUFFER_STREAM: u64 = 2;
pub(crate) const SPLIT_STREAM: u64 = 3;

/// The SplitMix64 generator: a 64-bit counter passed through a mixing function.
#[derive(Clone, Debug)]
pub(crate) struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Draws a number in `0..bound` by the multiply-shift reduction, whose
    /// bias (below `bound / 2^64`) does not matter for shuffling.
    pub(crate) fn below(&mut self, bound: usize) -> usize {
        ((self.next_u64() as u128 * bound as u128) >> 64) as usize
    }
}

/// Derives the seed of one random stream for one epoch.
pub(crate) fn stream_seed(seed: u64, epoch: u64, stream: u64) -> u64 {
    let mut mixer = SplitMix64::new(seed);
    let base = mixer.next_u64();
    let mut mixer = SplitMix64::new(base ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03));
    mixer.next_u64() ^ stream.wrapping_mul(0x8CB9_2BA7_2F3D_8DD7)
}

/// A permutation of `0..n`, the same for the same `n` and `seed` on every
/// platform and in every version of this crate.
pub fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = SplitMix64::new(seed);
    for i in (1..n).rev() {
        let j = rng.below(i + 1);
        order.swap(i, j);
    }
    order
}

/// Returns the visiting order of one epoch.
pub(crate) fn epoch_order(len: usize, shuffle: bool, seed: u64, epoch: u64) -> Vec<usize> {
    if shuffle {
        permutation(len, stream_seed(seed, epoch, ORDER_STREAM))
    } else {
        (0..len).collect()
    }
}

/// A position in a dataset's sequence of epochs, stored in checkpoints.
///
/// Restoring it into a loader or stream built over the same data replays
/// exactly the samples that followed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// Epochs completed before the current one.
    pub epoch: u64,
    /// Records consumed in the current epoch, counting skipped ones. For a
    /// WebDataset stream these are groups taken from the shuffle buffer.
    pub position: u64,
    /// The seed the order was drawn with.
    pub seed: u64,
    /// Whether the order is shuffled.
    pub shuffle: bool,
    /// The number of items the order permutes: records of an indexed
    /// dataset, or shards of a WebDataset. A restore into data of another
    /// size is rejected.
    pub order_len: u64,
}

/// Splits `0..len` into training and validation indices, both sorted.
///
/// The validation set has `round(len * validation_fraction)` indices drawn
/// with `seed`, but at least one when the fraction is positive and at most
/// `len - 1`, so that neither side is empty when `len >= 2`. The same
/// arguments give the same split on every run.
pub fn split_indices(
    len: usize,
    seed: u64,
    validation_fraction: f64,
) -> Result<(Vec<usize>, Vec<usize>), DataError> {
    if !(0.0..1.0).contains(&validation_fraction) {
        return Err(DataError::Config(format!(
            "the validation fraction is {validation_fraction}, but it must be at least 0 and below 1"
        )));
    }

    let mut validation_len = (len as f64 * validation_fraction).round() as usize;
    if validation_fraction > 0.0 {
        validation_len = validation_len.max(1);
    }
    validation_len = validation_len.min(len.saturating_sub(1));

    let order = permutation(len, stream_seed(seed, 0, SPLIT_STREAM));
    let mut validation = order[..validation_len].to_vec();
    let mut train = order[validation_len..].to_vec();
    validation.sort_unstable();
    train.sort_unstable();
    Ok((train, validation))
}

/// A view of some records of another dataset, such as one side of a split.
///
/// It shares the parent's [`SkipLog`], so skips in training and validation
/// are counted together.
#[derive(Clone)]
pub struct Subset {
    parent: Arc<dyn IndexedDataset>,
    indices: Vec<usize>,
    name: String,
}

impl Subset {
    /// Creates a view of `parent` that contains the records at `indices`, in that order.
    pub fn new(parent: Arc<dyn IndexedDataset>, indices: Vec<usize>) -> Result<Self, DataError> {
        let len = parent.len();
        if let Some(&bad) = indices.iter().find(|&&index| index >= len) {
            return Err(DataError::Config(format!(
                "subset index {bad} is out of range for {}, which has {len} records",
                parent.name()
            )));
        }

        let name = format!("{} ({} of its records)", parent.name(), indices.len());
        Ok(Subset {
            parent,
            indices,
            name,
        })
    }

    /// Returns the parent indices of this subset's records.
    pub fn indices(&self) -> &[usize] {
        &self.indices
    }
}

impl IndexedDataset for Subset {
    fn len(&self) -> usize {
        self.indices.len()
    }

    fn get(&self, index: usize) -> Result<Sample, BadSample> {
        self.parent.get(self.indices[index])
    }

    fn skips(&self) -> &Arc<SkipLog> {
        self.parent.skips()
    }

    fn name(&self) -> &str {
        &self.name
    }
}

/// Splits a dataset into training and validation subsets; see [`split_indices`].
pub fn train_validation_split(
    dataset: Arc<dyn IndexedDataset>,
    seed: u64,
    validation_fraction: f64,
) -> Result<(Subset, Subset), DataError> {
    let (train, validation) = split_indices(dataset.len(), seed, validation_fraction)?;
    let train = Subset::new(dataset.clone(), train)?;
    let validation = Subset::new(dataset, validation)?;
    Ok((train, validation))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_matches_reference() {
        // The published first outputs of SplitMix64 for the seed 1234567.
        let mut rng = SplitMix64::new(1234567);
        assert_eq!(rng.next_u64(), 6457827717110365317);
        assert_eq!(rng.next_u64(), 3203168211198807973);
        assert_eq!(rng.next_u64(), 9817491932198370423);
    }

    #[test]
    fn permutation_is_a_permutation() {
        let mut order = permutation(1000, 7);
        assert_ne!(order, (0..1000).collect::<Vec<_>>());
        order.sort_unstable();
        assert_eq!(order, (0..1000).collect::<Vec<_>>());
    }

    #[test]
    fn permutation_is_stable() {
        // Pinned values: a change here breaks the resume of saved checkpoints.
        assert_eq!(permutation(8, 42), vec![4, 3, 2, 0, 7, 6, 1, 5]);
    }

    #[test]
    fn permutation_depends_on_seed() {
        assert_ne!(permutation(100, 1), permutation(100, 2));
    }

    #[test]
    fn split_sizes_and_disjointness() {
        let (train, validation) = split_indices(100, 3, 0.1).unwrap();
        assert_eq!(validation.len(), 10);
        assert_eq!(train.len(), 90);

        let mut all: Vec<usize> = train.iter().chain(&validation).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn split_is_deterministic() {
        assert_eq!(
            split_indices(50, 9, 0.2).unwrap(),
            split_indices(50, 9, 0.2).unwrap()
        );
        assert_ne!(
            split_indices(50, 9, 0.2).unwrap(),
            split_indices(50, 10, 0.2).unwrap()
        );
    }

    #[test]
    fn split_edge_fractions() {
        let (train, validation) = split_indices(10, 0, 0.0).unwrap();
        assert_eq!((train.len(), validation.len()), (10, 0));

        let (train, validation) = split_indices(10, 0, 0.001).unwrap();
        assert_eq!((train.len(), validation.len()), (9, 1));

        let (train, validation) = split_indices(2, 0, 0.99).unwrap();
        assert_eq!((train.len(), validation.len()), (1, 1));

        assert!(split_indices(10, 0, 1.0).is_err());
        assert!(split_indices(10, 0, -0.1).is_err());
        assert!(split_indices(10, 0, f64::NAN).is_err());
    }
}
