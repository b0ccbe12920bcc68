//! Decoding images from files and bytes into RGB8, with failures as [`BadSample`]s.

use std::io;
use std::path::Path;

use image::{DynamicImage, ImageReader, RgbImage};
use rayon::prelude::*;

use super::error::BadSample;
use super::skip::{SkipLog, SkipReason};

/// Extensions of the image files that frame folders are filtered by.
pub(crate) const IMAGE_EXTENSIONS: [&str; 6] = ["png", "jpg", "jpeg", "webp", "bmp", "gif"];

/// Decodes the image at `path`; the format comes from the file's content,
/// not its extension.
pub(crate) fn decode_file(path: &Path, id: &str) -> Result<RgbImage, BadSample> {
    let reader = ImageReader::open(path)
        .map_err(|error| io_failure(path, id, &error))?
        .with_guessed_format()
        .map_err(|error| io_failure(path, id, &error))?;

    let image = reader.decode().map_err(|error| {
        BadSample::new(
            SkipReason::UndecodableImage,
            id,
            format!("{}: {error}", path.display()),
        )
    })?;
    Ok(to_rgb8(image))
}

/// Decodes an image held in memory, such as a tar entry.
pub(crate) fn decode_bytes(bytes: &[u8], id: &str, name: &str) -> Result<RgbImage, BadSample> {
    let image = image::load_from_memory(bytes).map_err(|error| {
        BadSample::new(SkipReason::UndecodableImage, id, format!("{name}: {error}"))
    })?;
    Ok(to_rgb8(image))
}

/// Converts any pixel format to RGB8, dropping alpha the way
/// `PIL.Image.convert("RGB")` does.
pub(crate) fn to_rgb8(image: DynamicImage) -> RgbImage {
    match image {
        DynamicImage::ImageRgb8(rgb) => rgb,
        other => other.to_rgb8(),
    }
}

/// Classifies an I/O error on `path` as a missing or unreadable file.
pub(crate) fn io_failure(path: &Path, id: &str, error: &io::Error) -> BadSample {
    let reason = if error.kind() == io::ErrorKind::NotFound {
        SkipReason::MissingFile
    } else {
        SkipReason::UnreadableFile
    };
    BadSample::new(reason, id, format!("{}: {error}", path.display()))
}

/// Keeps the records whose files all exist, checking in parallel without
/// decoding anything, and records the others in `skips`.
///
/// Checking when the dataset is opened turns a wrong image folder into an
/// immediate, clear error instead of a run that skips everything.
pub(crate) fn retain_existing<R, P, I>(records: Vec<R>, skips: &SkipLog, paths: P, id: I) -> Vec<R>
where
    R: Send + Sync,
    P: Fn(&R) -> Vec<&Path> + Sync,
    I: Fn(&R) -> &str + Sync,
{
    let failures: Vec<Option<BadSample>> = records
        .par_iter()
        .map(|record| {
            paths(record).into_iter().find_map(|path| {
                let error = std::fs::metadata(path).err()?;
                Some(io_failure(path, id(record), &error))
            })
        })
        .collect();

    // Record in file order, so that the first skip reported is the first in the file.
    records
        .into_iter()
        .zip(failures)
        .filter_map(|(record, failure)| match failure {
            Some(bad) => {
                skips.record(&bad);
                None
            }
            None => Some(record),
        })
        .collect()
}

/// Returns whether `path` has one of [`IMAGE_EXTENSIONS`], ignoring case.
pub(crate) fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|extension| extension.to_str())
        .is_some_and(|extension| {
            IMAGE_EXTENSIONS
                .iter()
                .any(|known| extension.eq_ignore_ascii_case(known))
        })
}
