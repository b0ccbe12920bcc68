//! Interleaved image-text documents listed in a JSONL manifest.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::error::{BadSample, DataError};
use super::image_io::{decode_file, retain_existing};
use super::manifest::{manifest_dir, read_jsonl, require_records, resolve, JsonLine};
use super::sample::{Media, Sample};
use super::skip::{SkipLog, SkipReason};
use super::{IndexedDataset, IMAGE_MARKER};

/// Reading documents such as
/// `{"images": ["a.jpg", "b.jpg"], "text": "<image>A cat.<|endofchunk|><image>A dog.<|endofchunk|>"}`.
///
/// The text is used as written: it must hold one `<image>` marker per
/// image, and any `<|endofchunk|>` tokens are the author's to place.
#[derive(Clone, Debug)]
pub struct InterleavedConfig {
    /// The field with the list of image paths, relative to the JSONL file's
    /// folder unless absolute. Default `images`.
    pub images_key: String,
    /// The field with the text. Default `text`.
    pub text_key: String,
}

impl Default for InterleavedConfig {
    fn default() -> Self {
        InterleavedConfig {
            images_key: "images".to_string(),
            text_key: "text".to_string(),
        }
    }
}

/// One document, checked but not decoded.
struct Document {
    id: String,
    images: Vec<PathBuf>,
    text: String,
}

/// Interleaved documents with random access; a sample has several images.
///
/// If any image of a document fails to decode, the whole document is
/// skipped, because dropping one image would leave its text without the
/// image it describes.
pub struct InterleavedDataset {
    name: String,
    documents: Vec<Document>,
    skips: Arc<SkipLog>,
}

impl InterleavedDataset {
    /// Opens a JSONL manifest of documents.
    ///
    /// Malformed lines, empty texts, documents without images, marker
    /// counts that differ from image counts and missing image files are
    /// skipped and counted. It fails if the file cannot be read or no
    /// document is left.
    pub fn from_jsonl(
        path: impl AsRef<Path>,
        config: &InterleavedConfig,
    ) -> Result<Self, DataError> {
        let path = path.as_ref();
        let skips = Arc::new(SkipLog::new());
        let base = manifest_dir(path);

        let mut documents = Vec::new();
        for line in read_jsonl(path, &skips)? {
            match document(&line, config, &base) {
                Ok(document) => documents.push(document),
                Err(bad) => skips.record(&bad),
            }
        }

        let name = path.display().to_string();
        let documents = retain_existing(
            documents,
            &skips,
            |document| document.images.iter().map(PathBuf::as_path).collect(),
            |document| &document.id,
        );
        require_records(&documents, &name, &skips)?;

        Ok(InterleavedDataset {
            name,
            documents,
            skips,
        })
    }
}

fn document(
    line: &JsonLine,
    config: &InterleavedConfig,
    base: &Path,
) -> Result<Document, BadSample> {
    let images = line.strings(&config.images_key)?;
    let text = line.string(&config.text_key)?;

    if text.trim().is_empty() {
        return Err(BadSample::new(
            SkipReason::EmptyCaption,
            &line.id,
            "the text is empty",
        ));
    }
    if images.is_empty() {
        return Err(BadSample::new(
            SkipReason::NoMedia,
            &line.id,
            format!("the list `{}` is empty", config.images_key),
        ));
    }
    let markers = text.matches(IMAGE_MARKER).count();
    if markers != images.len() {
        return Err(BadSample::new(
            SkipReason::MarkerMismatch,
            &line.id,
            format!(
                "the text has {markers} `{IMAGE_MARKER}` markers but `{}` lists {} images",
                config.images_key,
                images.len()
            ),
        ));
    }

    Ok(Document {
        id: line.id.clone(),
        images: images.iter().map(|image| resolve(base, image)).collect(),
        text: text.to_string(),
    })
}

impl IndexedDataset for InterleavedDataset {
    fn len(&self) -> usize {
        self.documents.len()
    }

    fn get(&self, index: usize) -> Result<Sample, BadSample> {
        let document = &self.documents[index];
        let media = document
            .images
            .iter()
            .map(|path| decode_file(path, &document.id).map(Media::Image))
            .collect::<Result<Vec<_>, _>>()?;

        Ok(Sample {
            media,
            text: document.text.clone(),
            label: None,
            id: document.id.clone(),
        })
    }

    fn skips(&self) -> &Arc<SkipLog> {
        &self.skips
    }

    fn name(&self) -> &str {
        &self.name
    }
}
