//! Opening the configured data sources, limiting them and splitting off validation data.

use std::sync::Arc;

use crate::config::{DataConfig, DataFormat, DataSource};
use crate::data::{
    default_fashion_mnist_dir, permutation, train_validation_split, ClassTemplate, CsvPairsConfig, DataError,
    FashionMnistSplit, IdxConfig, IdxDataset, ImageTextDataset, IndexedDataset, InterleavedConfig, InterleavedDataset,
    JsonlPairsConfig, PromptTemplate, Subset, VideoConfig, VideoDataset, WebDataset, WebDatasetConfig,
    FASHION_MNIST_CAPTION_NAMES,
};
use crate::error::{Result, TrainError};

/// Mixed into the seed of `limit` subsets, so that they do not reuse the
/// numbers of the data order or the validation split.
const LIMIT_SEED: u64 = 0x6C69_6D69_7473_6565;

/// An opened data source.
#[derive(Clone)]
pub enum Source {
    /// Records with random access.
    Indexed(Arc<dyn IndexedDataset>),
    /// WebDataset shards, streamed.
    Shards(WebDataset),
}

impl Source {
    /// Returns the name used in messages.
    pub fn name(&self) -> String {
        match self {
            Source::Indexed(dataset) => dataset.name().to_string(),
            Source::Shards(shards) => format!("{} shard(s)", shards.shards().len()),
        }
    }

    /// Returns the number of records, when known without reading the data.
    pub fn records(&self) -> Option<usize> {
        match self {
            Source::Indexed(dataset) => Some(dataset.len()),
            Source::Shards(_) => None,
        }
    }
}

/// The training source, the optional validation source and the class names
/// that caption accuracy matches against.
pub struct DataSplit {
    pub train: Source,
    pub validation: Option<Source>,
    /// Class names by label, for sources with labels (idx, fashion_mnist).
    pub class_names: Option<Vec<String>>,
}

/// Opens the training data and holds out validation data as configured.
pub fn open_split(data: &DataConfig, seed: u64) -> Result<DataSplit> {
    let prompt = PromptTemplate::new(&data.prompt)?;
    let class_template = ClassTemplate::new(&data.class_template)?;
    let (train, train_classes) = open_limited(&data.train, &prompt, &class_template, seed)?;

    let (train, validation, class_names) = match &data.validation {
        Some(source) => {
            let (validation, classes) = open_limited(source, &prompt, &class_template, seed)?;
            (train, Some(validation), classes.or(train_classes))
        }
        None if data.validation_fraction > 0.0 => {
            let (train, validation) = split(train, seed, data.validation_fraction)?;
            (train, Some(validation), train_classes)
        }
        None => (train, None, train_classes),
    };
    Ok(DataSplit { train, validation, class_names })
}

/// Opens one source for evaluation, with its limits applied.
pub fn open_evaluation_source(source: &DataSource, prompt: &str, class_template: &str, seed: u64) -> Result<(Source, Option<Vec<String>>)> {
    source.validate("evaluation")?;
    open_limited(source, &PromptTemplate::new(prompt)?, &ClassTemplate::new(class_template)?, seed)
}

fn split(train: Source, seed: u64, fraction: f64) -> Result<(Source, Source)> {
    match train {
        Source::Indexed(dataset) => {
            let (train, validation) = train_validation_split(dataset, seed, fraction)?;
            Ok((Source::Indexed(Arc::new(train)), Source::Indexed(Arc::new(validation))))
        }
        Source::Shards(shards) => {
            let (train, validation) = shards.split_shards(seed, fraction)?;
            Ok((Source::Shards(train), Source::Shards(validation)))
        }
    }
}

/// Opens a source and applies `limit` and `limit_per_class`.
fn open_limited(source: &DataSource, prompt: &PromptTemplate, class_template: &ClassTemplate, seed: u64) -> Result<(Source, Option<Vec<String>>)> {
    let (opened, labels, class_names) = open(source, prompt, class_template)?;
    let Source::Indexed(dataset) = opened else {
        return Ok((opened, None));
    };

    let mut indices: Option<Vec<usize>> = None;
    if let Some(per_class) = source.limit_per_class {
        let labels = labels.as_ref().expect("limit_per_class is only accepted for labelled formats");
        indices = Some(first_per_class(labels, per_class, seed));
    }
    if let Some(limit) = source.limit {
        let candidates = indices.unwrap_or_else(|| (0..dataset.len()).collect());
        let order = permutation(candidates.len(), seed ^ LIMIT_SEED);
        let mut chosen: Vec<usize> = order.into_iter().take(limit).map(|i| candidates[i]).collect();
        chosen.sort_unstable();
        indices = Some(chosen);
    }
    let dataset: Arc<dyn IndexedDataset> = match indices {
        Some(indices) => Arc::new(Subset::new(dataset, indices)?),
        None => dataset,
    };
    Ok((Source::Indexed(dataset), class_names))
}

/// Picks the first `per_class` records of each label in a seeded order, sorted.
fn first_per_class(labels: &[u8], per_class: usize, seed: u64) -> Vec<usize> {
    let mut taken = vec![0usize; 256];
    let mut chosen: Vec<usize> = permutation(labels.len(), seed ^ LIMIT_SEED)
        .into_iter()
        .filter(|&index| {
            let count = &mut taken[labels[index] as usize];
            *count += 1;
            *count <= per_class
        })
        .collect();
    chosen.sort_unstable();
    chosen
}

type Opened = (Source, Option<Vec<u8>>, Option<Vec<String>>);

fn open(source: &DataSource, prompt: &PromptTemplate, class_template: &ClassTemplate) -> Result<Opened> {
    let path = || source.path.clone().expect("validated: the format needs `path`");
    let indexed = |dataset: Arc<dyn IndexedDataset>| -> Result<Opened> { Ok((Source::Indexed(dataset), None, None)) };
    match source.format {
        DataFormat::Jsonl => {
            let mut config = JsonlPairsConfig { prompt: prompt.clone(), ..Default::default() };
            if let Some(key) = &source.image_key {
                config.image_key = key.clone();
            }
            if let Some(key) = &source.text_key {
                config.text_key = key.clone();
            }
            indexed(Arc::new(ImageTextDataset::from_jsonl(path(), &config)?))
        }
        DataFormat::Csv => {
            let mut config = CsvPairsConfig { prompt: prompt.clone(), image_dir: source.image_dir.clone(), ..Default::default() };
            if let Some(column) = &source.image_column {
                config.image_column = column.clone();
            }
            if let Some(column) = &source.caption_column {
                config.caption_column = column.clone();
            }
            if let Some(delimiter) = source.delimiter {
                config.delimiter = delimiter as u8;
            }
            indexed(Arc::new(ImageTextDataset::from_csv(path(), &config)?))
        }
        DataFormat::Interleaved => {
            let mut config = InterleavedConfig::default();
            if let Some(key) = &source.image_key {
                config.images_key = key.clone();
            }
            if let Some(key) = &source.text_key {
                config.text_key = key.clone();
            }
            indexed(Arc::new(InterleavedDataset::from_jsonl(path(), &config)?))
        }
        DataFormat::Video => {
            let mut config = VideoConfig { prompt: prompt.clone(), ..Default::default() };
            if let Some(key) = &source.image_key {
                config.video_key = key.clone();
            }
            if let Some(key) = &source.text_key {
                config.text_key = key.clone();
            }
            if let Some(frames) = source.frames {
                config.frames = frames;
            }
            indexed(Arc::new(VideoDataset::from_jsonl(path(), &config)?))
        }
        DataFormat::Webdataset => {
            let mut config = WebDatasetConfig { prompt: prompt.clone(), ..Default::default() };
            if let Some(keys) = &source.caption_keys {
                config.caption_keys = keys.clone();
            }
            if let Some(buffer) = source.shuffle_buffer {
                config.shuffle_buffer = buffer;
            }
            Ok((Source::Shards(WebDataset::open(&source.shards, config)?), None, None))
        }
        DataFormat::Idx => {
            let names = source.class_names.clone().expect("validated: idx needs class_names");
            let config = IdxConfig { class_names: names.clone(), class_template: class_template.clone(), prompt: prompt.clone() };
            let labels = source.labels.clone().expect("validated: idx needs labels");
            let dataset = IdxDataset::open(path(), labels, config)?;
            let labels = dataset.labels().to_vec();
            Ok((Source::Indexed(Arc::new(dataset)), Some(labels), Some(names)))
        }
        DataFormat::FashionMnist => {
            let names = source
                .class_names
                .clone()
                .unwrap_or_else(|| FASHION_MNIST_CAPTION_NAMES.iter().map(|name| name.to_string()).collect());
            let dir = match &source.path {
                Some(dir) => dir.clone(),
                None => default_fashion_mnist_dir().ok_or_else(|| {
                    TrainError::Config("data: fashion_mnist has no `path`, and neither FLAMINGO_CACHE nor HOME is set".into())
                })?,
            };
            let split = match source.split.as_deref() {
                Some("test") => FashionMnistSplit::Test,
                _ => FashionMnistSplit::Train,
            };
            let config = IdxConfig { class_names: names.clone(), class_template: class_template.clone(), prompt: prompt.clone() };
            let dataset = IdxDataset::fashion_mnist(&dir, split, config).map_err(|error| fashion_mnist_hint(error, &dir))?;
            let labels = dataset.labels().to_vec();
            Ok((Source::Indexed(Arc::new(dataset)), Some(labels), Some(names)))
        }
    }
}

/// Adds the project's fetch script to a missing-file error.
fn fashion_mnist_hint(error: DataError, dir: &std::path::Path) -> TrainError {
    match error {
        DataError::NotFound { path, hint } => TrainError::Data(DataError::NotFound {
            path,
            hint: format!("{hint}; or run `scripts/fetch-assets.sh --only fashion-mnist`, which fills {}", dir.display()),
        }),
        other => other.into(),
    }
}

