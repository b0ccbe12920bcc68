//! Training checkpoints: one folder per saved step.
//!
//! ```text
//! output_dir/checkpoints/
//!   step-000100/
//!     connector.safetensors   trainable tensors (Flamingo::save_connector)
//!     connector.json          ConnectorManifest: connector shape, backbones, prompt
//!     optimizer.safetensors   AdamW moments `{name}.exp_avg`, `{name}.exp_avg_sq`
//!     trainer.json            CheckpointHeader: config, backbones, step, data cursor
//!   step-000200/
//! ```
//!
//! A checkpoint is written into `.step-000200.partial/`, every file synced,
//! and the folder is then renamed to `step-000200` and its parent synced.
//! A crash before the rename leaves only the hidden partial folder, which
//! listing ignores and the next run removes, so every `step-*` folder is
//! complete and the previous checkpoints are untouched until the new one
//! exists. Older checkpoints are pruned only after that rename.

use std::fs::File;
use std::path::{Path, PathBuf};

use flamingo_model::flamingo::checkpoint::{sync_and_rename, write_atomically, CONNECTOR_MANIFEST, CONNECTOR_WEIGHTS};
use flamingo_model::flamingo::{BackboneIdentity, ConnectorManifest, Flamingo};
use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use crate::data::Cursor;
use crate::error::{Result, TrainError};
use crate::optimizer::{AdamWOptimizer, OptimizerSummary};

/// File name of the optimizer state inside a checkpoint folder.
pub const OPTIMIZER_STATE: &str = "optimizer.safetensors";
/// File name of the header inside a checkpoint folder.
pub const TRAINER_STATE: &str = "trainer.json";
/// Version of the header layout written by this crate.
pub const HEADER_VERSION: u32 = 1;

const PARTIAL_SUFFIX: &str = ".partial";

/// The record of a checkpoint besides its tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointHeader {
    pub format_version: u32,
    /// Optimizer steps completed.
    pub step: u64,
    /// The configuration of the run.
    pub config: TrainConfig,
    pub language_model: BackboneIdentity,
    pub vision_encoder: BackboneIdentity,
    /// The training data position after the last step's samples.
    pub cursor: Cursor,
    pub optimizer: OptimizerSummary,
    /// Samples and real tokens trained on so far.
    pub samples_seen: u64,
    pub tokens_seen: u64,
    /// Seconds spent in training steps so far, over every resume.
    pub train_seconds: f64,
    /// Loss of the last step.
    pub loss: Option<f32>,
}

/// Returns the folder name of the checkpoint of `step`.
pub fn step_folder_name(step: u64) -> String {
    format!("step-{step:06}")
}

/// Parses the step out of a checkpoint folder name; `None` for other names.
pub fn parse_step_folder(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// A checkpoint whose files are written and synced under a temporary
/// folder name; [`commit`](Self::commit) publishes it.
#[derive(Debug)]
pub struct StagedCheckpoint {
    staging: PathBuf,
    target: PathBuf,
}

impl StagedCheckpoint {
    /// Returns the temporary folder.
    pub fn path(&self) -> &Path {
        &self.staging
    }

    /// Renames the folder to its final name and syncs the parent; returns
    /// the final path. A checkpoint of the same step is replaced.
    pub fn commit(self) -> Result<PathBuf> {
        let parent = self.target.parent().expect("a checkpoint folder has a parent").to_path_buf();
        let replaced = if self.target.exists() {
            let name = self.target.file_name().expect("named").to_string_lossy().into_owned();
            let aside = parent.join(format!(".{name}.replaced"));
            remove_dir_if_exists(&aside)?;
            std::fs::rename(&self.target, &aside).map_err(|e| TrainError::io(&self.target, e))?;
            Some(aside)
        } else {
            None
        };
        std::fs::rename(&self.staging, &self.target).map_err(|e| TrainError::io(&self.target, e))?;
        sync_folder(&parent);
        if let Some(aside) = replaced {
            remove_dir_if_exists(&aside)?;
        }
        Ok(self.target)
    }
}

/// Writes a checkpoint of `step` into a temporary folder under `checkpoints`.
pub fn stage(
    checkpoints: &Path,
    model: &Flamingo,
    manifest: &ConnectorManifest,
    optimizer: &AdamWOptimizer,
    header: &CheckpointHeader,
) -> Result<StagedCheckpoint> {
    let name = step_folder_name(header.step);
    let staging = checkpoints.join(format!(".{name}{PARTIAL_SUFFIX}"));
    remove_dir_if_exists(&staging)?;
    std::fs::create_dir_all(&staging).map_err(|e| TrainError::io(&staging, e))?;

    model.save_connector(&staging, manifest)?;
    let optimizer_path = staging.join(OPTIMIZER_STATE);
    let temporary = staging.join(format!(".{OPTIMIZER_STATE}{PARTIAL_SUFFIX}"));
    optimizer.save(&temporary)?;
    sync_and_rename(&temporary, &optimizer_path)?;
    let json = serde_json::to_string_pretty(header).expect("the header is plain data");
    write_atomically(&staging.join(TRAINER_STATE), json.as_bytes())?;
    sync_folder(&staging);

    Ok(StagedCheckpoint { staging, target: checkpoints.join(name) })
}

/// Lists the complete checkpoints under `checkpoints`, oldest first.
pub fn list(checkpoints: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let entries = match std::fs::read_dir(checkpoints) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(TrainError::io(checkpoints, e)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| TrainError::io(checkpoints, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(step) = parse_step_folder(&name) else { continue };
        let path = entry.path();
        let complete = [CONNECTOR_WEIGHTS, CONNECTOR_MANIFEST, OPTIMIZER_STATE, TRAINER_STATE].iter().all(|file| path.join(file).is_file());
        if complete {
            found.push((step, path));
        } else {
            tracing::warn!("{} lacks checkpoint files and is ignored", path.display());
        }
    }
    found.sort();
    Ok(found)
}

/// Returns the most recent complete checkpoint.
pub fn latest(checkpoints: &Path) -> Result<Option<(u64, PathBuf)>> {
    Ok(list(checkpoints)?.pop())
}

/// Removes temporary folders that interrupted writes left behind.
pub fn remove_partials(checkpoints: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(checkpoints) else { return Ok(()) };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(".step-") && (name.ends_with(PARTIAL_SUFFIX) || name.ends_with(".replaced")) {
            tracing::info!("removing {}, left by an interrupted checkpoint write", entry.path().display());
            remove_dir_if_exists(&entry.path())?;
        }
    }
    Ok(())
}

/// Deletes all but the `keep` most recent checkpoints (none when `keep` is
/// 0); returns the folders deleted.
pub fn prune(checkpoints: &Path, keep: usize) -> Result<Vec<PathBuf>> {
    if keep == 0 {
        return Ok(Vec::new());
    }
    let all = list(checkpoints)?;
    let excess = all.len().saturating_sub(keep);
    let mut removed = Vec::new();
    for (_, path) in all.into_iter().take(excess) {
        remove_dir_if_exists(&path)?;
        removed.push(path);
    }
    Ok(removed)
}

/// Reads `trainer.json` of a checkpoint folder.
pub fn read_header(folder: &Path) -> Result<CheckpointHeader> {
    let path = folder.join(TRAINER_STATE);
    let text = std::fs::read_to_string(&path).map_err(|e| TrainError::io(&path, e))?;
    let header: CheckpointHeader = serde_json::from_str(&text).map_err(|e| TrainError::checkpoint(folder, format!("invalid {TRAINER_STATE}: {e}")))?;
    if header.format_version != HEADER_VERSION {
        return Err(TrainError::checkpoint(
            folder,
            format!("{TRAINER_STATE} has format version {}, but this build reads version {HEADER_VERSION}", header.format_version),
        ));
    }
    Ok(header)
}

fn remove_dir_if_exists(path: &Path) -> Result<()> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(TrainError::io(path, e)),
    }
}

/// Makes renames and new entries in `folder` durable. Some file systems
/// cannot open folders for syncing; that only weakens durability, so it is
/// ignored.
fn sync_folder(folder: &Path) {
    if let Ok(handle) = File::open(folder) {
        let _ = handle.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_folder_names_round_trip() {
        assert_eq!(step_folder_name(100), "step-000100");
        assert_eq!(step_folder_name(12_345_678), "step-12345678");
        assert_eq!(parse_step_folder("step-000100"), Some(100));
        assert_eq!(parse_step_folder("step-12345678"), Some(12_345_678));
        assert_eq!(parse_step_folder(".step-000100.partial"), None);
        assert_eq!(parse_step_folder("step-"), None);
        assert_eq!(parse_step_folder("step-1a"), None);
    }
}
