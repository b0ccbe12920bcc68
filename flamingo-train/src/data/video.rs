//! Video-text samples: clips given as frame lists, frame folders or animated GIFs.

use std::cmp::Ordering;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use image::codecs::gif::GifDecoder;
use image::{AnimationDecoder, DynamicImage, RgbImage};
use serde_json::Value;

use super::error::{BadSample, DataError};
use super::image_io::{decode_file, has_image_extension, io_failure, retain_existing, to_rgb8};
use super::manifest::{caption, manifest_dir, read_jsonl, require_records, resolve, JsonLine};
use super::sample::{Media, Sample};
use super::skip::{SkipLog, SkipReason};
use super::template::PromptTemplate;
use super::IndexedDataset;

/// Reading clips from JSONL lines such as
/// `{"video": ["f0.jpg", "f1.jpg"], "text": "A dog runs."}`.
///
/// The `video` field is one of: a list of frame image paths in playback
/// order; a folder of frame images, ordered by file name with digit runs
/// compared as numbers (`frame_2` before `frame_10`); or an animated `.gif`
/// file. Paths are relative to the JSONL file's folder unless absolute.
#[derive(Clone, Debug)]
pub struct VideoConfig {
    /// The field with the clip. Default `video`.
    pub video_key: String,
    /// The field with the caption. Default `text`.
    pub text_key: String,
    /// Frames per clip; see [`sample_frame_indices`]. Default 8.
    pub frames: usize,
    /// The template that turns the caption into training text. Its
    /// `<image>` marker stands for the whole clip.
    pub prompt: PromptTemplate,
}

impl VideoConfig {
    /// Frames per clip when the configuration does not say.
    pub const DEFAULT_FRAMES: usize = 8;
}

impl Default for VideoConfig {
    fn default() -> Self {
        VideoConfig {
            video_key: "video".to_string(),
            text_key: "text".to_string(),
            frames: Self::DEFAULT_FRAMES,
            prompt: PromptTemplate::default(),
        }
    }
}

/// Picks `count` frame indices spread uniformly over `available` frames:
/// the middle frame of each of `count` equal segments, in playback order.
///
/// A clip with fewer frames than `count` is not rejected. Its frames are
/// repeated, each about equally often and in order, as nearest-neighbour
/// resampling in time would do. For 3 frames and a count of 8 the indices
/// are `[0, 0, 0, 1, 1, 2, 2, 2]`. Returns an empty list when `available`
/// is 0.
pub fn sample_frame_indices(available: usize, count: usize) -> Vec<usize> {
    if available == 0 {
        return Vec::new();
    }
    (0..count)
        .map(|i| ((2 * i + 1) * available) / (2 * count))
        .collect()
}

/// The source of a clip's frames.
enum ClipSource {
    Frames(Vec<PathBuf>),
    Folder(PathBuf),
    Gif(PathBuf),
}

impl ClipSource {
    fn paths(&self) -> Vec<&Path> {
        match self {
            ClipSource::Frames(frames) => frames.iter().map(PathBuf::as_path).collect(),
            ClipSource::Folder(path) | ClipSource::Gif(path) => vec![path.as_path()],
        }
    }
}

/// One clip, checked but not decoded.
struct Clip {
    id: String,
    source: ClipSource,
    caption: String,
}

/// Video-text pairs with random access. A sample has one [`Media::Video`]
/// of exactly `frames` frames, and its text is the caption rendered through
/// the prompt template.
pub struct VideoDataset {
    name: String,
    clips: Vec<Clip>,
    frames: usize,
    prompt: PromptTemplate,
    skips: Arc<SkipLog>,
}

impl VideoDataset {
    /// Opens a JSONL manifest of clips.
    ///
    /// Malformed lines, empty captions, empty frame lists and missing files
    /// or folders are skipped and counted. It fails if `frames` is 0, the
    /// file cannot be read, or no clip is left.
    pub fn from_jsonl(path: impl AsRef<Path>, config: &VideoConfig) -> Result<Self, DataError> {
        let path = path.as_ref();
        if config.frames == 0 {
            return Err(DataError::Config(
                "the number of frames per clip is 0".to_string(),
            ));
        }
        let skips = Arc::new(SkipLog::new());
        let base = manifest_dir(path);

        let mut clips = Vec::new();
        for line in read_jsonl(path, &skips)? {
            match clip(&line, config, &base) {
                Ok(clip) => clips.push(clip),
                Err(bad) => skips.record(&bad),
            }
        }

        let name = path.display().to_string();
        let clips = retain_existing(clips, &skips, |clip| clip.source.paths(), |clip| &clip.id);
        require_records(&clips, &name, &skips)?;

        Ok(VideoDataset {
            name,
            clips,
            frames: config.frames,
            prompt: config.prompt.clone(),
            skips,
        })
    }
}

fn clip(line: &JsonLine, config: &VideoConfig, base: &Path) -> Result<Clip, BadSample> {
    let caption = caption(line.string(&config.text_key)?, &line.id)?;
    let source = match line.field(&config.video_key)? {
        Value::String(path) => clip_path(resolve(base, path), line)?,
        Value::Array(_) => {
            let frames = line.strings(&config.video_key)?;
            if frames.is_empty() {
                return Err(BadSample::new(
                    SkipReason::NoMedia,
                    &line.id,
                    "the frame list is empty",
                ));
            }
            ClipSource::Frames(frames.iter().map(|frame| resolve(base, frame)).collect())
        }
        _ => {
            return Err(line.invalid(format!(
                "field `{}` must be a list of frame paths, a folder or a .gif file",
                config.video_key
            )))
        }
    };

    Ok(Clip {
        id: line.id.clone(),
        source,
        caption,
    })
}

/// Classifies a single clip path as a GIF or a frame folder.
fn clip_path(path: PathBuf, line: &JsonLine) -> Result<ClipSource, BadSample> {
    let is_gif = path
        .extension()
        .is_some_and(|extension| extension.eq_ignore_ascii_case("gif"));
    if is_gif || path.is_dir() || !path.exists() {
        // A missing path is reported by the existence check that follows.
        return Ok(if is_gif {
            ClipSource::Gif(path)
        } else {
            ClipSource::Folder(path)
        });
    }

    Err(line.invalid(format!(
        "{} is neither a folder of frames nor a .gif file; other video formats are not supported, \
         so extract the frames into a folder (for example with ffmpeg) and name the folder",
        path.display()
    )))
}

impl IndexedDataset for VideoDataset {
    fn len(&self) -> usize {
        self.clips.len()
    }

    fn get(&self, index: usize) -> Result<Sample, BadSample> {
        let clip = &self.clips[index];
        let frames = match &clip.source {
            ClipSource::Frames(paths) => decode_sampled(paths, self.frames, &clip.id)?,
            ClipSource::Folder(folder) => {
                decode_sampled(&list_frames(folder, &clip.id)?, self.frames, &clip.id)?
            }
            ClipSource::Gif(path) => decode_gif(path, self.frames, &clip.id)?,
        };

        Ok(Sample {
            media: vec![Media::Video(frames)],
            text: self.prompt.render(&clip.caption),
            label: None,
            id: clip.id.clone(),
        })
    }

    fn skips(&self) -> &Arc<SkipLog> {
        &self.skips
    }

    fn name(&self) -> &str {
        &self.name
    }
}

/// Decodes only the sampled frames; a repeated index reuses the frame
/// decoded just before it.
fn decode_sampled(paths: &[PathBuf], count: usize, id: &str) -> Result<Vec<RgbImage>, BadSample> {
    let mut frames: Vec<RgbImage> = Vec::with_capacity(count);
    let mut previous = None;
    for index in sample_frame_indices(paths.len(), count) {
        let frame = match (previous, frames.last()) {
            (Some(last), Some(frame)) if last == index => frame.clone(),
            _ => decode_file(&paths[index], id)?,
        };
        frames.push(frame);
        previous = Some(index);
    }
    Ok(frames)
}

/// Lists the image files in `folder` in natural name order.
fn list_frames(folder: &Path, id: &str) -> Result<Vec<PathBuf>, BadSample> {
    let entries = std::fs::read_dir(folder).map_err(|error| io_failure(folder, id, &error))?;
    let mut frames = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|error| io_failure(folder, id, &error))?
            .path();
        if path.is_file() && has_image_extension(&path) {
            frames.push(path);
        }
    }

    if frames.is_empty() {
        return Err(BadSample::new(
            SkipReason::NoMedia,
            id,
            format!(
                "{} contains no PNG, JPEG, WebP, BMP or GIF frames",
                folder.display()
            ),
        ));
    }
    frames.sort_by(|a, b| natural_cmp(&a.to_string_lossy(), &b.to_string_lossy()));
    Ok(frames)
}

/// Decodes every frame of an animated GIF (composited onto the full canvas)
/// and keeps the sampled ones.
///
/// NOTE: all frames are held in memory while decoding, because a GIF does
/// not state its frame count up front. Very long GIFs need a lot of memory.
fn decode_gif(path: &Path, count: usize, id: &str) -> Result<Vec<RgbImage>, BadSample> {
    let file = File::open(path).map_err(|error| io_failure(path, id, &error))?;
    let undecodable = |error: image::ImageError| {
        BadSample::new(
            SkipReason::UndecodableImage,
            id,
            format!("{}: {error}", path.display()),
        )
    };

    let decoder = GifDecoder::new(BufReader::new(file)).map_err(undecodable)?;
    let frames = decoder
        .into_frames()
        .collect_frames()
        .map_err(undecodable)?;
    if frames.is_empty() {
        return Err(BadSample::new(
            SkipReason::NoMedia,
            id,
            format!("{} has no frames", path.display()),
        ));
    }

    let indices = sample_frame_indices(frames.len(), count);
    let frames: Vec<RgbImage> = frames
        .into_iter()
        .map(|frame| to_rgb8(DynamicImage::ImageRgba8(frame.into_buffer())))
        .collect();
    Ok(indices
        .into_iter()
        .map(|index| frames[index].clone())
        .collect())
}

/// Compares names so that runs of digits compare as numbers: `f2 < f10`.
/// Names equal as numbers (`f01`, `f1`) fall back to plain string order.
fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut a_rest, mut b_rest) = (a, b);
    loop {
        match (a_rest.chars().next(), b_rest.chars().next()) {
            (None, None) => return a.cmp(b),
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let (x_number, x_tail) = split_number(a_rest);
                let (y_number, y_tail) = split_number(b_rest);
                let order = x_number
                    .len()
                    .cmp(&y_number.len())
                    .then_with(|| x_number.cmp(y_number));
                if order != Ordering::Equal {
                    return order;
                }
                (a_rest, b_rest) = (x_tail, y_tail);
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(&y);
                }
                (a_rest, b_rest) = (&a_rest[x.len_utf8()..], &b_rest[y.len_utf8()..]);
            }
        }
    }
}

/// Splits leading ASCII digits off `text`; the number comes without leading zeros.
fn split_number(text: &str) -> (&str, &str) {
    let end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, tail) = text.split_at(end);
    (number.trim_start_matches('0'), tail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_downsample_uniformly() {
        assert_eq!(sample_frame_indices(10, 4), vec![1, 3, 6, 8]);
        assert_eq!(sample_frame_indices(4, 4), vec![0, 1, 2, 3]);
        assert_eq!(sample_frame_indices(100, 1), vec![50]);
    }

    #[test]
    fn indices_repeat_short_clips() {
        assert_eq!(sample_frame_indices(3, 8), vec![0, 0, 0, 1, 1, 2, 2, 2]);
        assert_eq!(sample_frame_indices(1, 3), vec![0, 0, 0]);
        assert!(sample_frame_indices(0, 3).is_empty());
    }

    #[test]
    fn natural_order_of_names() {
        let mut names = vec!["f10.png", "f2.png", "f1.png", "f01.png", "e9.png", "f.png"];
        names.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            names,
            vec!["e9.png", "f.png", "f01.png", "f1.png", "f2.png", "f10.png"]
        );
    }
}
