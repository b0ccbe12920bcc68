//! A connector checkpoint: the trainable tensors and the manifest that says
//! which backbones and which connector shape they belong to.
//!
//! A checkpoint is a folder with two files:
//!
//! - `connector.safetensors`: every trainable tensor under OpenFlamingo's
//!   names (`perceiver.latents`, `...gated_cross_attn_layer.attn_gate`, ...);
//! - `connector.json`: a [`ConnectorManifest`].
//!
//! Both are written to temporary names, synced and renamed, so a crash
//! while saving never leaves a half-written file under the final name.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::flamingo::model::{Flamingo, FlamingoConfig};
use crate::loader::{SafetensorsWeights, WeightSource};

/// File name of the trainable tensors inside a checkpoint folder.
pub const CONNECTOR_WEIGHTS: &str = "connector.safetensors";
/// File name of the manifest inside a checkpoint folder.
pub const CONNECTOR_MANIFEST: &str = "connector.json";
/// Version of the manifest layout written by this crate.
pub const MANIFEST_VERSION: u32 = 1;

/// Where a frozen backbone came from, to check that a checkpoint is used
/// with the backbones it was trained on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackboneIdentity {
    pub path: PathBuf,
    /// SHA-256 of the file, or of every file of a folder in name order.
    pub sha256: String,
}

impl BackboneIdentity {
    /// Hashes the file or folder at `path`.
    pub fn of(path: &Path) -> Result<Self> {
        Ok(Self { path: path.to_path_buf(), sha256: sha256_path(path)? })
    }
}

/// What a connector checkpoint was trained with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectorManifest {
    pub format_version: u32,
    pub flamingo: FlamingoConfig,
    pub language_model: BackboneIdentity,
    pub vision_encoder: Option<BackboneIdentity>,
    /// Encoder options (which tokens, which layer) as the vision loader reads them.
    #[serde(default)]
    pub vision_options: serde_json::Value,
    /// The text before each caption in training, e.g. `<image>Output:`; a
    /// caption prompt for generation.
    #[serde(default)]
    pub caption_prompt: Option<String>,
    /// Optimizer steps the tensors were trained for.
    #[serde(default)]
    pub step: u64,
}

impl ConnectorManifest {
    /// Reads `connector.json` from a checkpoint folder.
    pub fn read(folder: &Path) -> Result<Self> {
        let path = folder.join(CONNECTOR_MANIFEST);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let problem = "not found, so this is not a connector checkpoint; pass a checkpoint folder such as runs/demo-1/checkpoints/step-000500";
                return Err(Error::format(&path, problem));
            }
            Err(e) => return Err(Error::io(&path, e)),
        };
        let manifest: ConnectorManifest =
            serde_json::from_str(&text).map_err(|e| Error::format(&path, format!("invalid connector manifest: {e}")))?;
        if manifest.format_version != MANIFEST_VERSION {
            return Err(Error::format(
                &path,
                format!("manifest version {} is not supported; this build reads version {MANIFEST_VERSION}", manifest.format_version),
            ));
        }
        Ok(manifest)
    }
}

impl Flamingo {
    /// Writes the trainable tensors and `manifest` into `folder`, creating it.
    pub fn save_connector(&self, folder: &Path, manifest: &ConnectorManifest) -> Result<()> {
        std::fs::create_dir_all(folder).map_err(|e| Error::io(folder, e))?;
        let weights = folder.join(CONNECTOR_WEIGHTS);
        let temporary = folder.join(format!(".{CONNECTOR_WEIGHTS}.partial"));
        self.params().save_safetensors(&temporary, None)?;
        sync_and_rename(&temporary, &weights)?;

        let json = serde_json::to_string_pretty(manifest).map_err(|e| Error::InvalidInput(format!("cannot encode the manifest: {e}")))?;
        write_atomically(&folder.join(CONNECTOR_MANIFEST), json.as_bytes())
    }

    /// Loads the trainable tensors of the checkpoint in `folder`; fails
    /// naming the tensor when the checkpoint's shapes do not match this model.
    pub fn load_connector(&mut self, folder: &Path) -> Result<ConnectorManifest> {
        let manifest = ConnectorManifest::read(folder)?;
        if manifest.flamingo != self.config {
            return Err(Error::Config {
                origin: folder.join(CONNECTOR_MANIFEST).display().to_string(),
                message: format!(
                    "the checkpoint's connector shape {:?} differs from this model's {:?}",
                    manifest.flamingo, self.config
                ),
            });
        }
        let path = folder.join(CONNECTOR_WEIGHTS);
        let weights = SafetensorsWeights::open(&path)?;
        let tensors: BTreeMap<_, _> = weights.names().into_iter().map(|name| Ok((name.clone(), weights.tensor_f32(&name)?))).collect::<Result<_>>()?;
        self.params_mut().load_from(&tensors, &path.display().to_string())?;
        Ok(manifest)
    }
}

/// Writes `bytes` to `path` through a synced temporary file and a rename.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let temporary = path.with_file_name(format!(".{name}.partial"));
    let mut file = File::create(&temporary).map_err(|e| Error::io(&temporary, e))?;
    file.write_all(bytes).map_err(|e| Error::io(&temporary, e))?;
    drop(file);
    sync_and_rename(&temporary, path)
}

/// Syncs `temporary` to disk, renames it to `path` and syncs the folder.
pub fn sync_and_rename(temporary: &Path, path: &Path) -> Result<()> {
    File::open(temporary).and_then(|f| f.sync_all()).map_err(|e| Error::io(temporary, e))?;
    std::fs::rename(temporary, path).map_err(|e| Error::io(path, e))?;
    if let Some(parent) = path.parent() {
        // Syncing the folder makes the rename itself durable; some file
        // systems refuse to open folders for syncing, which is harmless.
        if let Ok(folder) = File::open(parent) {
            let _ = folder.sync_all();
        }
    }
    Ok(())
}

/// SHA-256 of a file, or of every file of a folder in name order.
pub fn sha256_path(path: &Path) -> Result<String> {
    let mut hasher = Sha256::new();
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| Error::io(path, e))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        entries.sort();
        for entry in entries {
            hasher.update(entry.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default().as_bytes());
            hash_file(&entry, &mut hasher)?;
        }
    } else {
        hash_file(path, &mut hasher)?;
    }
    Ok(format!("{:x}", hasher.finalize()))
}

fn hash_file(path: &Path, hasher: &mut Sha256) -> Result<()> {
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read = file.read(&mut buffer).map_err(|e| Error::io(path, e))?;
        if read == 0 {
            return Ok(());
        }
        hasher.update(&buffer[..read]);
    }
}
