//! A cache of the frozen vision encoder's output, one entry per image or clip.
//!
//! Each entry contains the visual tokens of every frame of one media item as
//! f16, [frames, tokens, width], stored as consecutive rows of
//! tokens × width values. Entries are keyed by the sample id and the media
//! item's position in the sample (`file:line#0`), and carry a digest of the
//! decoded pixels, so a changed image is encoded again rather than served
//! stale.
//!
//! Two stores exist:
//!
//! - memory: one growing `Vec<f16>`;
//! - disk: a folder per encoder identity under the cache root, reused by
//!   later runs, holding `features.f16` (the rows, memory-mapped),
//!   `index.jsonl` (one line per entry) and `meta.json` (the identity).
//!   Rows are flushed to disk before the index lines that point at them are
//!   appended, so a crash can leave unreferenced rows but never an index
//!   line pointing at missing data. A torn last line is dropped on open.
//!
//! NOTE: two processes writing one disk cache at once are not coordinated;
//! give concurrent runs different `features.dir` folders.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use flamingo_model::flamingo::BackboneIdentity;
use half::f16;
use memmap2::MmapMut;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{default_cache_root, CacheMode, FeatureConfig};
use crate::data::Media;
use crate::error::{Result, TrainError};

/// Version of the disk layout; a folder of another version is not reused.
const DISK_FORMAT_VERSION: u32 = 1;

/// Rows a disk cache grows by at least, so small caches do not remap often.
const MIN_GROWTH_ROWS: u64 = 1024;

/// The inputs cached features depend on: the encoder's weights and options
/// and the shape of its output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureIdentity {
    pub format_version: u32,
    pub encoder: BackboneIdentity,
    /// The encoder options (final LayerNorm, class token).
    pub options: serde_json::Value,
    pub tokens: usize,
    pub dim: usize,
}

impl FeatureIdentity {
    /// Creates the identity of `encoder` producing [tokens, dim] per frame.
    pub fn new(encoder: BackboneIdentity, options: serde_json::Value, tokens: usize, dim: usize) -> Self {
        Self { format_version: DISK_FORMAT_VERSION, encoder, options, tokens, dim }
    }

    /// Returns the name of this identity's disk folder: 16 hex digits of a SHA-256
    /// over the encoder's hash, its options and the output shape. The
    /// encoder's path is left out, so a moved file keeps its cache.
    pub fn folder_name(&self) -> String {
        let mut hasher = Sha256::new();
        hasher.update(self.encoder.sha256.as_bytes());
        hasher.update(self.options.to_string().as_bytes());
        hasher.update(format!("{}x{}v{}", self.tokens, self.dim, self.format_version).as_bytes());
        let digest = hasher.finalize();
        digest[..8].iter().map(|byte| format!("{byte:02x}")).collect()
    }
}

/// The location of one entry's rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// First row.
    pub row: u64,
    /// Frames, one row each.
    pub frames: u32,
    /// Digest of the pixels the rows were computed from.
    pub digest: u64,
}

/// One line of `index.jsonl`.
#[derive(Serialize, Deserialize)]
struct IndexLine {
    key: String,
    row: u64,
    frames: u32,
    digest: String,
}

enum Store {
    Memory(Vec<f16>),
    Disk(DiskStore),
}

struct DiskStore {
    folder: PathBuf,
    data_path: PathBuf,
    data: File,
    /// `None` while the data file is empty: a zero-length file cannot be mapped.
    map: Option<MmapMut>,
    capacity_rows: u64,
    index_path: PathBuf,
    index: File,
    /// Index lines of entries whose rows are not yet flushed.
    pending: String,
}

/// Cached visual tokens, in memory or on disk.
pub struct FeatureCache {
    tokens: usize,
    dim: usize,
    entries: HashMap<String, Entry>,
    used_rows: u64,
    store: Store,
    /// Whether entries live only until [`clear_transient`](Self::clear_transient).
    transient: bool,
}

/// Returns the key of media item `index` of the sample `sample_id`.
pub fn media_key(sample_id: &str, index: usize) -> String {
    format!("{sample_id}#{index}")
}

/// Computes a 64-bit digest of a media item's decoded pixels and sizes.
pub fn media_digest(media: &Media) -> u64 {
    let mut hasher = Sha256::new();
    for frame in media.frames() {
        hasher.update(frame.width().to_le_bytes());
        hasher.update(frame.height().to_le_bytes());
        hasher.update(frame.as_raw());
    }
    let digest = hasher.finalize();
    u64::from_le_bytes(digest[..8].try_into().expect("a SHA-256 digest has 32 bytes"))
}

impl FeatureCache {
    /// Creates an empty in-memory cache of [tokens, dim] rows.
    pub fn memory(tokens: usize, dim: usize) -> Self {
        Self { tokens, dim, entries: HashMap::new(), used_rows: 0, store: Store::Memory(Vec::new()), transient: false }
    }

    /// Creates an in-memory cache that [`clear_transient`](Self::clear_transient)
    /// empties, for runs without a cache.
    pub fn transient(tokens: usize, dim: usize) -> Self {
        Self { tokens, dim, entries: HashMap::new(), used_rows: 0, store: Store::Memory(Vec::new()), transient: true }
    }

    /// Opens the cache that `settings` selects. `Auto` picks memory when
    /// `estimated_bytes` is known and within the memory limit, else disk.
    pub fn open(settings: &FeatureConfig, identity: &FeatureIdentity, estimated_bytes: Option<u64>) -> Result<Self> {
        let (tokens, dim) = (identity.tokens, identity.dim);
        let limit = settings.memory_limit_mib.saturating_mul(1024 * 1024);
        let mode = match settings.cache {
            CacheMode::Auto if estimated_bytes.is_some_and(|bytes| bytes <= limit) => CacheMode::Memory,
            CacheMode::Auto => CacheMode::Disk,
            mode => mode,
        };
        let size = match estimated_bytes {
            Some(bytes) => format!("about {:.1} MiB", bytes as f64 / (1024.0 * 1024.0)),
            None => "size unknown".to_string(),
        };
        match mode {
            CacheMode::Memory => {
                tracing::info!("feature cache: memory, f16, {tokens} tokens × {dim} per frame, {size}");
                Ok(Self::memory(tokens, dim))
            }
            CacheMode::Off => {
                tracing::info!("feature cache: off; every batch runs the vision encoder");
                Ok(Self::transient(tokens, dim))
            }
            CacheMode::Disk | CacheMode::Auto => {
                let root = match &settings.dir {
                    Some(dir) => dir.clone(),
                    None => default_cache_root()
                        .ok_or_else(|| TrainError::Config("the disk feature cache needs `features.dir`, FLAMINGO_CACHE or HOME".into()))?
                        .join("features"),
                };
                let cache = Self::open_disk(&root, identity)?;
                tracing::info!("feature cache: disk at {}, {size}", cache.disk_folder().unwrap_or(&root).display());
                Ok(cache)
            }
        }
    }

    /// Opens or creates the disk cache of `identity` under `root`.
    pub fn open_disk(root: &Path, identity: &FeatureIdentity) -> Result<Self> {
        let folder = root.join(identity.folder_name());
        std::fs::create_dir_all(&folder).map_err(|e| TrainError::io(&folder, e))?;
        check_or_write_meta(&folder, identity)?;

        let data_path = folder.join("features.f16");
        let data = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&data_path).map_err(|e| TrainError::io(&data_path, e))?;
        let row_bytes = (identity.tokens * identity.dim * 2) as u64;
        let length = data.metadata().map_err(|e| TrainError::io(&data_path, e))?.len();
        let capacity_rows = length / row_bytes;
        let map = map_file(&data, &data_path, capacity_rows * row_bytes)?;

        let index_path = folder.join("index.jsonl");
        let (entries, used_rows) = read_index(&index_path, capacity_rows)?;
        let index = OpenOptions::new().append(true).create(true).open(&index_path).map_err(|e| TrainError::io(&index_path, e))?;
        if !entries.is_empty() {
            tracing::info!("feature cache {}: {} entries from earlier runs", folder.display(), entries.len());
        }

        let store = Store::Disk(DiskStore { folder, data_path, data, map, capacity_rows, index_path, index, pending: String::new() });
        Ok(Self { tokens: identity.tokens, dim: identity.dim, entries, used_rows, store, transient: false })
    }

    /// Returns the visual tokens per frame.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Returns the width of one visual token.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Returns the values per frame row.
    pub fn row_len(&self) -> usize {
        self.tokens * self.dim
    }

    /// Returns the number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Returns whether the cache has no entry.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Returns the bytes of feature rows in use.
    pub fn bytes(&self) -> u64 {
        self.used_rows * self.row_len() as u64 * 2
    }

    /// Returns the folder of a disk cache.
    pub fn disk_folder(&self) -> Option<&Path> {
        match &self.store {
            Store::Disk(disk) => Some(&disk.folder),
            Store::Memory(_) => None,
        }
    }

    /// Looks up the entry under `key`, if its digest is `digest` (any digest when `None`).
    pub fn lookup(&self, key: &str, digest: Option<u64>) -> Option<Entry> {
        let entry = self.entries.get(key)?;
        match digest {
            Some(digest) if digest != entry.digest => None,
            _ => Some(*entry),
        }
    }

    /// Returns the rows of `entry`: frames × tokens × dim values.
    pub fn rows(&self, entry: Entry) -> &[f16] {
        let start = entry.row as usize * self.row_len();
        let end = start + entry.frames as usize * self.row_len();
        match &self.store {
            Store::Memory(values) => &values[start..end],
            Store::Disk(disk) => {
                let map = disk.map.as_ref().expect("an entry exists, so the file is mapped");
                bytemuck::cast_slice(&map[start * 2..end * 2])
            }
        }
    }

    /// Makes room for `rows` more rows in memory, so that a large
    /// extraction does not copy the store as it grows. A disk store grows by
    /// doubling instead, because a reused cache may need no room at all.
    pub fn reserve(&mut self, rows: u64) {
        let needed = (self.used_rows + rows) as usize * self.row_len();
        if let Store::Memory(values) = &mut self.store {
            values.reserve(needed.saturating_sub(values.len()));
        }
    }

    /// Stores the features of one media item, [frames, tokens, dim] as f16,
    /// under `key`, replacing an older entry.
    pub fn insert(&mut self, key: String, digest: u64, features: &[f16]) -> Result<Entry> {
        let row_len = self.row_len();
        if features.is_empty() || !features.len().is_multiple_of(row_len) {
            return Err(TrainError::Config(format!(
                "features of {key} have {} values, not a positive multiple of {} tokens × {} wide",
                features.len(),
                self.tokens,
                self.dim
            )));
        }
        let frames = (features.len() / row_len) as u64;
        let entry = Entry { row: self.used_rows, frames: frames as u32, digest };
        match &mut self.store {
            Store::Memory(values) => values.extend_from_slice(features),
            Store::Disk(disk) => {
                let end = entry.row + frames;
                if end > disk.capacity_rows {
                    let grown = (disk.capacity_rows * 2).max(end).max(MIN_GROWTH_ROWS);
                    disk.grow_to(grown, row_len)?;
                }
                let map = disk.map.as_mut().expect("the file was grown, so it is mapped");
                let start = entry.row as usize * row_len * 2;
                map[start..start + features.len() * 2].copy_from_slice(bytemuck::cast_slice(features));
                let line = IndexLine { key: key.clone(), row: entry.row, frames: entry.frames, digest: format!("{digest:016x}") };
                disk.pending.push_str(&serde_json::to_string(&line).expect("an index line is plain data"));
                disk.pending.push('\n');
            }
        }
        self.used_rows += frames;
        self.entries.insert(key, entry);
        Ok(entry)
    }

    /// Writes a disk cache's new rows and then their index lines to disk.
    pub fn flush(&mut self) -> Result<()> {
        let Store::Disk(disk) = &mut self.store else {
            return Ok(());
        };
        if disk.pending.is_empty() {
            return Ok(());
        }
        if let Some(map) = &disk.map {
            map.flush().map_err(|e| TrainError::io(&disk.data_path, e))?;
        }
        disk.index.write_all(disk.pending.as_bytes()).map_err(|e| TrainError::io(&disk.index_path, e))?;
        disk.index.sync_data().map_err(|e| TrainError::io(&disk.index_path, e))?;
        disk.pending.clear();
        Ok(())
    }

    /// Drops every entry of a transient cache; does nothing otherwise.
    pub fn clear_transient(&mut self) {
        if !self.transient {
            return;
        }
        self.entries.clear();
        self.used_rows = 0;
        if let Store::Memory(values) = &mut self.store {
            values.clear();
        }
    }
}

impl Drop for FeatureCache {
    fn drop(&mut self) {
        if let Err(error) = self.flush() {
            tracing::warn!("feature cache: {error}; entries added in this run will be encoded again next time");
        }
    }
}

impl DiskStore {
    /// Grows the data file to `rows` rows and maps it again.
    fn grow_to(&mut self, rows: u64, row_len: usize) -> Result<()> {
        if rows <= self.capacity_rows {
            return Ok(());
        }
        // Rows written through the old map must reach the file before it is
        // unmapped; the index lines stay pending until `flush`.
        if let Some(map) = self.map.take() {
            map.flush().map_err(|e| TrainError::io(&self.data_path, e))?;
        }
        let bytes = rows * row_len as u64 * 2;
        self.data.set_len(bytes).map_err(|e| TrainError::io(&self.data_path, e))?;
        self.map = map_file(&self.data, &self.data_path, bytes)?;
        self.capacity_rows = rows;
        Ok(())
    }
}

fn map_file(file: &File, path: &Path, bytes: u64) -> Result<Option<MmapMut>> {
    if bytes == 0 {
        return Ok(None);
    }
    // SAFETY: the file is private to this cache folder, and only this
    // process writes it while the map lives (see the module note on
    // concurrent runs). This module never shrinks the file below the
    // mapped length.
    let map = unsafe { memmap2::MmapOptions::new().len(bytes as usize).map_mut(file) }.map_err(|e| TrainError::io(path, e))?;
    Ok(Some(map))
}

fn check_or_write_meta(folder: &Path, identity: &FeatureIdentity) -> Result<()> {
    let path = folder.join("meta.json");
    if path.is_file() {
        let text = std::fs::read_to_string(&path).map_err(|e| TrainError::io(&path, e))?;
        let found: FeatureIdentity = serde_json::from_str(&text)
            .map_err(|e| TrainError::Config(format!("{}: invalid feature cache metadata ({e}); delete the folder to rebuild it", path.display())))?;
        if found.tokens != identity.tokens || found.dim != identity.dim || found.encoder.sha256 != identity.encoder.sha256 {
            return Err(TrainError::Config(format!(
                "{} belongs to another encoder ({} tokens × {} from {}); delete the folder to rebuild it",
                folder.display(),
                found.tokens,
                found.dim,
                found.encoder.path.display()
            )));
        }
        return Ok(());
    }
    let json = serde_json::to_string_pretty(identity).expect("the identity is plain data");
    flamingo_model::flamingo::checkpoint::write_atomically(&path, json.as_bytes())?;
    Ok(())
}

/// Reads the index, dropping a torn last line and entries past the data
/// file's end; returns the entries and the rows in use.
fn read_index(path: &Path, capacity_rows: u64) -> Result<(HashMap<String, Entry>, u64)> {
    let mut entries = HashMap::new();
    let mut used_rows = 0;
    let mut file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((entries, 0)),
        Err(e) => return Err(TrainError::io(path, e)),
    };
    let mut text = Vec::new();
    file.read_to_end(&mut text).map_err(|e| TrainError::io(path, e))?;

    let complete = text.iter().rposition(|&byte| byte == b'\n').map_or(0, |i| i + 1);
    if complete < text.len() {
        tracing::warn!("feature cache index {}: dropping a torn last line left by an interrupted run", path.display());
        file.set_len(complete as u64).map_err(|e| TrainError::io(path, e))?;
        file.seek(SeekFrom::End(0)).map_err(|e| TrainError::io(path, e))?;
    }

    let mut dropped = 0usize;
    for line in text[..complete].split(|&byte| byte == b'\n').filter(|line| !line.is_empty()) {
        let parsed: Option<(String, Entry)> = serde_json::from_slice::<IndexLine>(line).ok().and_then(|line| {
            let digest = u64::from_str_radix(&line.digest, 16).ok()?;
            Some((line.key, Entry { row: line.row, frames: line.frames, digest }))
        });
        match parsed {
            Some((key, entry)) if entry.frames > 0 && entry.row + entry.frames as u64 <= capacity_rows => {
                used_rows = used_rows.max(entry.row + entry.frames as u64);
                entries.insert(key, entry);
            }
            _ => dropped += 1,
        }
    }
    if dropped > 0 {
        tracing::warn!("feature cache index {}: ignored {dropped} invalid or out-of-range line(s)", path.display());
    }
    Ok((entries, used_rows))
}
