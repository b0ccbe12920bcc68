//! A flag that requests a running training loop to save a checkpoint and return.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A shared request to stop, set from another thread or a Ctrl-C handler.
///
/// Clones share one flag. The training loop checks it after every optimizer
/// step and during feature extraction. A run that finds it set writes a
/// checkpoint of the last completed step and returns normally.
#[derive(Debug, Clone, Default)]
pub struct StopFlag(Arc<AtomicBool>);

impl StopFlag {
    /// Creates a flag that is not set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks every holder of this flag to stop.
    pub fn request_stop(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Returns whether a stop was requested.
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}
