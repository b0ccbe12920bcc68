//! Datasets, optimizer, training loop, checkpoints and evaluation for Flamingo.

pub mod data;
