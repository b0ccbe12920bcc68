//! Image-caption pairs listed in a JSONL or CSV manifest.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::error::{BadSample, DataError};
use super::image_io::{decode_file, retain_existing};
use super::manifest::{caption, manifest_dir, read_jsonl, require_records, resolve};
use super::sample::{Media, Sample};
use super::skip::{SkipLog, SkipReason};
use super::template::PromptTemplate;
use super::IndexedDataset;

/// Reading image-caption pairs from JSONL, one object per line such as
/// `{"image": "images/0001.jpg", "text": "A cat on a mat."}`.
#[derive(Clone, Debug)]
pub struct JsonlPairsConfig {
    /// The field with the image path, relative to the JSONL file's folder
    /// unless absolute. Default `image`.
    pub image_key: String,
    /// The field with the caption. Default `text`.
    pub text_key: String,
    /// The template that turns the caption into training text.
    pub prompt: PromptTemplate,
}

impl Default for JsonlPairsConfig {
    fn default() -> Self {
        JsonlPairsConfig {
            image_key: "image".to_string(),
            text_key: "text".to_string(),
            prompt: PromptTemplate::default(),
        }
    }
}

/// Reading image-caption pairs from a CSV file with a header row.
///
/// Fields may be quoted (RFC 4180), so captions can contain the delimiter,
/// quotes (doubled) and line breaks.
#[derive(Clone, Debug)]
pub struct CsvPairsConfig {
    /// The column with the image path. Default `image`.
    pub image_column: String,
    /// The column with the caption. Default `caption`.
    pub caption_column: String,
    /// The folder that relative image paths start from. Default: the CSV
    /// file's folder.
    pub image_dir: Option<PathBuf>,
    /// The field delimiter, such as `b','` or `b'\t'`. Default `b','`.
    pub delimiter: u8,
    /// The template that turns the caption into training text.
    pub prompt: PromptTemplate,
}

impl Default for CsvPairsConfig {
    fn default() -> Self {
        CsvPairsConfig {
            image_column: "image".to_string(),
            caption_column: "caption".to_string(),
            image_dir: None,
            delimiter: b',',
            prompt: PromptTemplate::default(),
        }
    }
}

/// One image-caption pair, checked but not decoded.
struct PairRecord {
    id: String,
    image: PathBuf,
    caption: String,
}

/// Image-caption pairs with random access. Each sample has one image, and
/// its text is the caption rendered through the prompt template.
pub struct ImageTextDataset {
    name: String,
    records: Vec<PairRecord>,
    prompt: PromptTemplate,
    skips: Arc<SkipLog>,
}

impl ImageTextDataset {
    /// Opens a JSONL manifest.
    ///
    /// Malformed lines, empty captions and missing image files are skipped
    /// and counted. It fails if the file cannot be read or no pair is left.
    pub fn from_jsonl(
        path: impl AsRef<Path>,
        config: &JsonlPairsConfig,
    ) -> Result<Self, DataError> {
        let path = path.as_ref();
        let skips = Arc::new(SkipLog::new());
        let base = manifest_dir(path);

        let mut records = Vec::new();
        for line in read_jsonl(path, &skips)? {
            let record = line.string(&config.image_key).and_then(|image| {
                let text = line.string(&config.text_key)?;
                Ok(PairRecord {
                    caption: caption(text, &line.id)?,
                    image: resolve(&base, image),
                    id: line.id.clone(),
                })
            });
            match record {
                Ok(record) => records.push(record),
                Err(bad) => skips.record(&bad),
            }
        }

        Self::finish(path, records, config.prompt.clone(), skips)
    }

    /// Opens a CSV manifest.
    ///
    /// It fails if the file cannot be read, the header lacks a configured
    /// column, or no pair is left. Malformed rows, empty captions and
    /// missing image files are skipped and counted.
    pub fn from_csv(path: impl AsRef<Path>, config: &CsvPairsConfig) -> Result<Self, DataError> {
        let path = path.as_ref();
        let skips = Arc::new(SkipLog::new());
        let base = config
            .image_dir
            .clone()
            .unwrap_or_else(|| manifest_dir(path));

        let mut reader = csv::ReaderBuilder::new()
            .delimiter(config.delimiter)
            .from_path(path)
            .map_err(|error| csv_error(path, error))?;
        let header = reader
            .headers()
            .map_err(|error| csv_error(path, error))?
            .clone();
        let image_column = column_index(path, &header, &config.image_column)?;
        let caption_column = column_index(path, &header, &config.caption_column)?;

        let mut records = Vec::new();
        for (row, result) in reader.records().enumerate() {
            match csv_record(path, row, result, image_column, caption_column, &base) {
                Ok(record) => records.push(record),
                Err(bad) => skips.record(&bad),
            }
        }

        Self::finish(path, records, config.prompt.clone(), skips)
    }

    /// Drops records whose image is missing and checks that some are left.
    fn finish(
        path: &Path,
        records: Vec<PairRecord>,
        prompt: PromptTemplate,
        skips: Arc<SkipLog>,
    ) -> Result<Self, DataError> {
        let name = path.display().to_string();
        let records = retain_existing(
            records,
            &skips,
            |record| vec![record.image.as_path()],
            |record| &record.id,
        );
        require_records(&records, &name, &skips)?;

        Ok(ImageTextDataset {
            name,
            records,
            prompt,
            skips,
        })
    }

    /// Returns the caption of record `index`, without the prompt template.
    pub fn caption(&self, index: usize) -> &str {
        &self.records[index].caption
    }

    /// Returns the image path of record `index`.
    pub fn image_path(&self, index: usize) -> &Path {
        &self.records[index].image
    }
}

impl IndexedDataset for ImageTextDataset {
    fn len(&self) -> usize {
        self.records.len()
    }

    fn get(&self, index: usize) -> Result<Sample, BadSample> {
        let record = &self.records[index];
        let image = decode_file(&record.image, &record.id)?;
        Ok(Sample {
            media: vec![Media::Image(image)],
            text: self.prompt.render(&record.caption),
            label: None,
            id: record.id.clone(),
        })
    }

    fn skips(&self) -> &Arc<SkipLog> {
        &self.skips
    }

    fn name(&self) -> &str {
        &self.name
    }
}

fn column_index(path: &Path, header: &csv::StringRecord, column: &str) -> Result<usize, DataError> {
    header
        .iter()
        .position(|name| name.trim() == column)
        .ok_or_else(|| DataError::MissingColumn {
            path: path.to_path_buf(),
            column: column.to_string(),
            found: if header.is_empty() {
                "none, the file is empty".to_string()
            } else {
                header.iter().collect::<Vec<_>>().join(", ")
            },
        })
}

/// Turns one CSV row into a record; `row` counts data rows from 0.
fn csv_record(
    path: &Path,
    row: usize,
    result: csv::Result<csv::StringRecord>,
    image_column: usize,
    caption_column: usize,
    base: &Path,
) -> Result<PairRecord, BadSample> {
    // The csv crate reports the line where a record starts, which differs
    // from the row number when quoted fields span lines.
    let line = match &result {
        Ok(record) => record.position().map(|position| position.line()),
        Err(error) => error.position().map(|position| position.line()),
    };
    let id = match line {
        Some(line) => format!("{}:{line}", path.display()),
        None => format!("{}: row {}", path.display(), row + 1),
    };

    let record = result
        .map_err(|error| BadSample::new(SkipReason::InvalidRecord, &id, error.to_string()))?;
    let field = |column: usize| record.get(column).unwrap_or_default();
    let image = field(image_column).trim();
    if image.is_empty() {
        return Err(BadSample::new(
            SkipReason::InvalidRecord,
            &id,
            "the image path is empty",
        ));
    }

    Ok(PairRecord {
        caption: caption(field(caption_column), &id)?,
        image: resolve(base, image),
        id,
    })
}

fn csv_error(path: &Path, error: csv::Error) -> DataError {
    let message = error.to_string();
    match error.into_kind() {
        csv::ErrorKind::Io(error) => DataError::io(path, error),
        _ => DataError::format(path, format!("invalid CSV header: {message}")),
    }
}
