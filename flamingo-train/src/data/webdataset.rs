//! WebDataset `.tar` shards, streamed without unpacking.
//!
//! A shard is a tar archive (optionally gzip-compressed) in which the files
//! of one sample are adjacent and share a key: the path up to the first dot
//! of the file name, so `train/000123.jpg` and `train/000123.txt` form the
//! sample `train/000123`. A sample needs an image (`jpg`, `jpeg`, `png` or
//! `webp`) and a caption (`txt`, or a `json` object with a caption field);
//! other files are ignored.
//!
//! A background thread reads the shards of an epoch in order and sends the
//! raw files of each sample. The stream keeps them in a shuffle buffer and
//! decodes only what it yields.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;

use flate2::bufread::MultiGzDecoder;
use rayon::prelude::*;
use serde_json::Value;

use super::error::{BadSample, DataError};
use super::image_io::decode_bytes;
use super::loader::LoaderConfig;
use super::manifest::caption;
use super::order::{epoch_order, split_indices, stream_seed, Cursor, SplitMix64, BUFFER_STREAM};
use super::patterns::expand_braces;
use super::sample::{Media, Sample};
use super::skip::{SkipLog, SkipReason};
use super::template::PromptTemplate;
use super::SampleStream;

/// Image extensions, in the order of preference when a sample has several.
const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

/// Groups the reader thread may run ahead of the shuffle buffer.
const CHANNEL_CAPACITY: usize = 64;

/// Largest allocation made up front for one tar entry, so that a corrupt
/// size field cannot request an absurd amount of memory before reading.
const MAX_PREALLOCATION: u64 = 64 << 20;

/// The settings for reading and shuffling WebDataset samples.
#[derive(Clone, Debug)]
pub struct WebDatasetConfig {
    /// Fields of a `json` caption file tried in order; the first string
    /// found is the caption. A `txt` file takes precedence. Default
    /// `["caption", "text"]`.
    pub caption_keys: Vec<String>,
    /// The template that turns the caption into training text.
    pub prompt: PromptTemplate,
    /// Undecoded samples held for shuffling; 0 or 1 means samples keep
    /// their order within a shard. Memory grows with it: 1000 samples of
    /// 100 kB JPEG each are 100 MB. Default 1000.
    pub shuffle_buffer: usize,
}

impl Default for WebDatasetConfig {
    fn default() -> Self {
        WebDatasetConfig {
            caption_keys: vec!["caption".to_string(), "text".to_string()],
            prompt: PromptTemplate::default(),
            shuffle_buffer: 1000,
        }
    }
}

/// A list of WebDataset shards, checked but not read.
#[derive(Clone)]
pub struct WebDataset {
    name: String,
    shards: Arc<[PathBuf]>,
    config: Arc<WebDatasetConfig>,
    skips: Arc<SkipLog>,
}

impl WebDataset {
    /// Expands the shard patterns (see [`expand_braces`]) and checks that
    /// every shard exists and starts with a valid tar header.
    pub fn open<S: AsRef<str>>(
        patterns: &[S],
        config: WebDatasetConfig,
    ) -> Result<Self, DataError> {
        let mut shards = Vec::new();
        for pattern in patterns {
            shards.extend(
                expand_braces(pattern.as_ref())?
                    .into_iter()
                    .map(PathBuf::from),
            );
        }
        if shards.is_empty() {
            return Err(DataError::Config(
                "no WebDataset shard patterns were given".to_string(),
            ));
        }
        for shard in &shards {
            check_shard(shard)?;
        }

        let name = patterns
            .iter()
            .map(AsRef::as_ref)
            .collect::<Vec<_>>()
            .join(" ");
        Ok(WebDataset {
            name,
            shards: shards.into(),
            config: Arc::new(config),
            skips: Arc::new(SkipLog::new()),
        })
    }

    /// Returns the shard paths after expansion, in the order given.
    pub fn shards(&self) -> &[PathBuf] {
        &self.shards
    }

    /// Returns the skip counts, shared with every stream and split of this dataset.
    pub fn skips(&self) -> &Arc<SkipLog> {
        &self.skips
    }

    /// Splits the shards into a training and a validation set, as
    /// [`split_indices`](super::split_indices) splits records.
    ///
    /// Fails when either side would get no shard, such as with one shard
    /// and a positive fraction.
    pub fn split_shards(
        &self,
        seed: u64,
        validation_fraction: f64,
    ) -> Result<(WebDataset, WebDataset), DataError> {
        let (train, validation) = split_indices(self.shards.len(), seed, validation_fraction)?;
        if validation_fraction > 0.0 && validation.is_empty() {
            return Err(DataError::Config(format!(
                "cannot split {} shard(s) into training and validation shards; write the data into more shards",
                self.shards.len()
            )));
        }

        let subset = |indices: Vec<usize>, part: &str| WebDataset {
            name: format!("{} ({part} shards)", self.name),
            shards: indices
                .iter()
                .map(|&index| self.shards[index].clone())
                .collect(),
            config: self.config.clone(),
            skips: self.skips.clone(),
        };
        Ok((subset(train, "training"), subset(validation, "validation")))
    }

    /// Starts streaming epoch 0.
    pub fn stream(&self, config: LoaderConfig) -> Result<ShardStream, DataError> {
        let mut stream = ShardStream {
            dataset: self.clone(),
            shuffle: config.shuffle,
            seed: config.seed,
            epoch: 0,
            position: 0,
            receiver: None,
            buffer: VecDeque::new(),
            rng: SplitMix64::new(0),
            yielded: 0,
            full_pass: true,
            replaying: false,
        };
        stream.start_epoch(0)?;
        Ok(stream)
    }
}

/// The undecoded files of one sample.
struct RawGroup {
    shard: usize,
    key: String,
    /// (lower-case extension, bytes) of the image and caption files.
    files: Vec<(String, Vec<u8>)>,
}

/// A message from the reader thread.
enum Message {
    Group(RawGroup),
    /// A shard broke off; the rest of it is skipped.
    Truncated(BadSample),
    /// A shard that was valid at open can no longer be opened.
    Failed(DataError),
}

/// Streams samples from WebDataset shards with a seeded shuffle buffer.
///
/// With shuffling on, each epoch reads the shards in a new seeded order and
/// draws samples at random from a buffer of
/// [`shuffle_buffer`](WebDatasetConfig::shuffle_buffer) undecoded samples.
/// Restoring a [`Cursor`] replays the epoch's shards up to the saved
/// position without decoding images, which costs reading those bytes again.
pub struct ShardStream {
    dataset: WebDataset,
    shuffle: bool,
    seed: u64,
    epoch: u64,
    /// Groups taken from the buffer in this epoch, counting skipped ones.
    position: u64,
    /// `None` once the reader thread of this epoch has finished.
    receiver: Option<Receiver<Message>>,
    buffer: VecDeque<RawGroup>,
    rng: SplitMix64,
    yielded: u64,
    full_pass: bool,
    /// Set while a restore skips ahead, so that truncated shards met again
    /// are not counted twice.
    replaying: bool,
}

impl ShardStream {
    /// Returns the current epoch, counting from 0.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Resets to the start of `epoch` and starts its reader thread.
    fn start_epoch(&mut self, epoch: u64) -> Result<(), DataError> {
        let order = epoch_order(self.dataset.shards.len(), self.shuffle, self.seed, epoch);
        let (sender, receiver) = sync_channel(CHANNEL_CAPACITY);
        let shards = self.dataset.shards.clone();
        std::thread::Builder::new()
            .name("webdataset-reader".to_string())
            .spawn(move || read_shards(&shards, &order, &sender))
            .map_err(DataError::Thread)?;

        // Dropping the previous receiver ends the previous reader thread at
        // its next send.
        self.receiver = Some(receiver);
        self.buffer.clear();
        self.rng = SplitMix64::new(stream_seed(self.seed, epoch, BUFFER_STREAM));
        self.epoch = epoch;
        self.position = 0;
        self.yielded = 0;
        self.full_pass = true;
        Ok(())
    }

    /// Starts the next epoch, or fails if the one that ended was a full
    /// pass without one usable sample.
    fn finish_epoch(&mut self) -> Result<(), DataError> {
        let empty_pass = self.full_pass && self.yielded == 0;
        self.start_epoch(self.epoch + 1)?;

        if empty_pass {
            return Err(DataError::NoSamples {
                dataset: self.dataset.name.clone(),
                detail: format!(
                    "a whole pass over {} shard(s) yielded nothing; {}",
                    self.dataset.shards.len(),
                    self.dataset.skips.summary()
                ),
            });
        }
        Ok(())
    }

    /// Takes the next group out of the shuffle buffer, refilling it first;
    /// `None` at the end of the epoch.
    fn take_group(&mut self) -> Result<Option<RawGroup>, DataError> {
        let capacity = if self.shuffle {
            self.dataset.config.shuffle_buffer.max(1)
        } else {
            1
        };

        while self.buffer.len() < capacity {
            let Some(receiver) = &self.receiver else {
                break;
            };
            match receiver.recv() {
                Ok(Message::Group(group)) => self.buffer.push_back(group),
                Ok(Message::Truncated(bad)) if !self.replaying => self.dataset.skips.record(&bad),
                Ok(Message::Truncated(_)) => {}
                Ok(Message::Failed(error)) => return Err(error),
                Err(_) => self.receiver = None,
            }
        }

        if self.buffer.is_empty() {
            return Ok(None);
        }
        let index = if self.shuffle {
            self.rng.below(self.buffer.len())
        } else {
            0
        };
        self.position += 1;
        Ok(self.buffer.swap_remove_back(index))
    }

    /// Keeps a decoded sample or counts a bad one.
    fn accept(&mut self, result: Result<Sample, BadSample>) -> Option<Sample> {
        match result {
            Ok(sample) => {
                self.yielded += 1;
                Some(sample)
            }
            Err(bad) => {
                self.dataset.skips.record(&bad);
                None
            }
        }
    }

    fn decode(&self, group: &RawGroup) -> Result<Sample, BadSample> {
        decode_group(
            group,
            &self.dataset.shards[group.shard],
            &self.dataset.config,
        )
    }
}

impl Iterator for ShardStream {
    type Item = Result<Sample, DataError>;

    /// Returns the next sample of this epoch, or `None` once at its end.
    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let group = match self.take_group() {
                Ok(Some(group)) => group,
                Ok(None) => {
                    return match self.finish_epoch() {
                        Ok(()) => None,
                        Err(error) => Some(Err(error)),
                    }
                }
                Err(error) => return Some(Err(error)),
            };
            let result = self.decode(&group);
            if let Some(sample) = self.accept(result) {
                return Some(Ok(sample));
            }
        }
    }
}

impl SampleStream for ShardStream {
    fn next_batch(&mut self, n: usize) -> Result<Vec<Sample>, DataError> {
        let mut batch = Vec::with_capacity(n);
        while batch.len() < n {
            let mut groups = Vec::with_capacity(n - batch.len());
            let mut epoch_ended = false;
            while groups.len() < n - batch.len() {
                match self.take_group()? {
                    Some(group) => groups.push(group),
                    None => {
                        epoch_ended = true;
                        break;
                    }
                }
            }

            // The stream itself is not `Sync` (it contains a channel receiver),
            // so the parallel decode borrows only the shard list and config.
            let (shards, config) = (&self.dataset.shards, &self.dataset.config);
            let results: Vec<Result<Sample, BadSample>> = groups
                .par_iter()
                .map(|group| decode_group(group, &shards[group.shard], config))
                .collect();
            for result in results {
                if let Some(sample) = self.accept(result) {
                    batch.push(sample);
                }
            }

            if epoch_ended {
                self.finish_epoch()?;
            }
        }
        Ok(batch)
    }

    fn cursor(&self) -> Cursor {
        Cursor {
            epoch: self.epoch,
            position: self.position,
            seed: self.seed,
            shuffle: self.shuffle,
            order_len: self.dataset.shards.len() as u64,
        }
    }

    /// Adopts the cursor's seed and shuffle setting, restarts its epoch and
    /// skips `position` groups without decoding them.
    fn restore(&mut self, cursor: &Cursor) -> Result<(), DataError> {
        let shards = self.dataset.shards.len() as u64;
        if cursor.order_len != shards {
            return Err(DataError::Cursor(format!(
                "it was saved for {} shards, but {} has {shards}; resume with the same shards or start a new run",
                cursor.order_len, self.dataset.name
            )));
        }

        self.shuffle = cursor.shuffle;
        self.seed = cursor.seed;
        self.start_epoch(cursor.epoch)?;

        self.replaying = true;
        let replay = self.skip_groups(cursor.position);
        self.replaying = false;
        replay?;

        self.full_pass = cursor.position == 0;
        Ok(())
    }

    fn skips(&self) -> &Arc<SkipLog> {
        &self.dataset.skips
    }
}

impl ShardStream {
    /// Takes `count` groups from the stream without decoding them.
    fn skip_groups(&mut self, count: u64) -> Result<(), DataError> {
        for _ in 0..count {
            if self.take_group()?.is_none() {
                return Err(DataError::Cursor(format!(
                    "its position {count} is past the end of epoch {} of {}, which has {} samples; \
                     the shards changed since the cursor was saved",
                    self.epoch, self.dataset.name, self.position
                )));
            }
        }
        Ok(())
    }
}

/// Turns one group into a sample: caption first, because it is cheap, then the image.
fn decode_group(
    group: &RawGroup,
    shard: &Path,
    config: &WebDatasetConfig,
) -> Result<Sample, BadSample> {
    let id = format!("{}:{}", shard.display(), group.key);
    let file = |extension: &str| {
        group
            .files
            .iter()
            .find(|(found, _)| found == extension)
            .map(|(_, bytes)| bytes.as_slice())
    };
    let incomplete = |missing: &str| {
        let found: Vec<&str> = group
            .files
            .iter()
            .map(|(extension, _)| extension.as_str())
            .collect();
        BadSample::new(
            SkipReason::IncompleteGroup,
            &id,
            format!("no {missing} file (found: {})", found.join(", ")),
        )
    };

    let text = match (file("txt"), file("json")) {
        (Some(bytes), _) => std::str::from_utf8(bytes)
            .map_err(|error| {
                BadSample::new(
                    SkipReason::InvalidRecord,
                    &id,
                    format!("the txt file is not UTF-8: {error}"),
                )
            })?
            .to_string(),
        (None, Some(bytes)) => json_caption(bytes, &config.caption_keys, &id)?,
        (None, None) => return Err(incomplete("txt or json caption")),
    };
    let caption = caption(&text, &id)?;

    let (extension, bytes) = IMAGE_EXTENSIONS
        .iter()
        .find_map(|&extension| file(extension).map(|bytes| (extension, bytes)))
        .ok_or_else(|| incomplete("jpg, jpeg, png or webp image"))?;
    let image = decode_bytes(bytes, &id, &format!("{}.{extension}", group.key))?;

    Ok(Sample {
        media: vec![Media::Image(image)],
        text: config.prompt.render(&caption),
        label: None,
        id,
    })
}

/// Returns the first string among the `keys` fields of a `json` caption file.
fn json_caption(bytes: &[u8], keys: &[String], id: &str) -> Result<String, BadSample> {
    let invalid = |detail: String| BadSample::new(SkipReason::InvalidRecord, id, detail);
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|error| invalid(format!("invalid JSON in the json file: {error}")))?;

    keys.iter()
        .find_map(|key| value.get(key).and_then(Value::as_str))
        .map(str::to_string)
        .ok_or_else(|| {
            invalid(format!(
                "the json file has no string field among {}",
                keys.iter()
                    .map(|key| format!("`{key}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
}

/// Opens a shard for reading, decompressing it if it is gzip data.
fn open_shard(path: &Path) -> std::io::Result<Box<dyn Read + Send>> {
    let mut reader = BufReader::new(File::open(path)?);
    let gzip = reader.fill_buf()?.starts_with(&[0x1f, 0x8b]);
    Ok(if gzip {
        Box::new(MultiGzDecoder::new(reader))
    } else {
        Box::new(reader)
    })
}

/// Fails unless `path` opens and its first tar header is valid.
fn check_shard(path: &Path) -> Result<(), DataError> {
    let shard_error = |reason: String| DataError::Shard {
        path: path.to_path_buf(),
        reason,
    };

    let reader =
        open_shard(path).map_err(|error| shard_error(format!("cannot be opened: {error}")))?;
    let mut archive = tar::Archive::new(reader);
    let mut entries = archive
        .entries()
        .map_err(|error| shard_error(format!("is not a tar archive: {error}")))?;
    match entries.next() {
        Some(Err(error)) => Err(shard_error(format!("is not a valid tar archive: {error}"))),
        Some(Ok(_)) => Ok(()),
        None => {
            tracing::warn!("WebDataset shard {} contains no files", path.display());
            Ok(())
        }
    }
}

/// Sends the groups of each shard in `order`; this runs on the reader
/// thread. It stops early when the stream has been dropped or has moved to
/// another epoch.
fn read_shards(shards: &[PathBuf], order: &[usize], sender: &SyncSender<Message>) {
    for &shard in order {
        if read_shard(&shards[shard], shard, sender).is_err() {
            return;
        }
    }
}

/// The receiver is gone, so reading can stop.
struct Disconnected;

fn read_shard(path: &Path, shard: usize, sender: &SyncSender<Message>) -> Result<(), Disconnected> {
    let send = |message| sender.send(message).map_err(|_| Disconnected);
    let truncated = |entry: usize, error: std::io::Error| {
        Message::Truncated(BadSample::new(
            SkipReason::TruncatedShard,
            path.display().to_string(),
            format!("reading stopped at file {entry}: {error}; the rest of the shard is skipped"),
        ))
    };

    let reader = match open_shard(path) {
        Ok(reader) => reader,
        Err(error) => {
            let reason = format!("cannot be opened: {error}");
            return send(Message::Failed(DataError::Shard {
                path: path.to_path_buf(),
                reason,
            }));
        }
    };
    let mut archive = tar::Archive::new(reader);
    let entries = match archive.entries() {
        Ok(entries) => entries,
        Err(error) => return send(truncated(0, error)),
    };

    let mut group: Option<RawGroup> = None;
    for (index, entry) in entries.enumerate() {
        let mut entry = match entry {
            Ok(entry) => entry,
            Err(error) => return send(truncated(index, error)),
        };
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let Some((key, extension)) = split_key(&name) else {
            continue;
        };

        if group.as_ref().is_some_and(|group| group.key != key) {
            send(Message::Group(group.take().expect("checked above")))?;
        }
        let current = group.get_or_insert_with(|| RawGroup {
            shard,
            key: key.to_string(),
            files: Vec::new(),
        });

        let extension = extension.to_ascii_lowercase();
        if is_sample_file(&extension) {
            let mut bytes = Vec::with_capacity(entry.size().min(MAX_PREALLOCATION) as usize);
            if let Err(error) = entry.read_to_end(&mut bytes) {
                return send(truncated(index, error));
            }
            current.files.push((extension, bytes));
        }
    }

    match group {
        Some(group) => send(Message::Group(group)),
        None => Ok(()),
    }
}

/// Splits a tar path into the sample key and the extension at the first dot
/// of the file name. Returns `None` for hidden files and names without a dot.
fn split_key(path: &str) -> Option<(&str, &str)> {
    let name_start = path.rfind('/').map_or(0, |slash| slash + 1);
    let name = &path[name_start..];
    if name.starts_with('.') {
        return None;
    }
    let dot = name.find('.')?;
    Some((&path[..name_start + dot], &name[dot + 1..]))
}

fn is_sample_file(extension: &str) -> bool {
    extension == "txt" || extension == "json" || IMAGE_EXTENSIONS.contains(&extension)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_splits_at_first_dot() {
        assert_eq!(split_key("a/000123.jpg"), Some(("a/000123", "jpg")));
        assert_eq!(
            split_key("a.b/000123.seg.png"),
            Some(("a.b/000123", "seg.png"))
        );
        assert_eq!(split_key("a/._000123.jpg"), None);
        assert_eq!(split_key("README"), None);
    }
}
