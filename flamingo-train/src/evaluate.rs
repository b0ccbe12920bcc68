//! Evaluating a saved connector on a dataset: validation loss and caption
//! accuracy, as `flamingo eval` runs it.

use std::path::PathBuf;
use std::sync::Arc;

use flamingo_kernels::{Device, DeviceRequest};
use flamingo_model::flamingo::checkpoint::write_atomically;
use flamingo_model::flamingo::{BackboneIdentity, ConnectorManifest, Flamingo};
use flamingo_model::lm::LanguageModel;
use flamingo_model::vision::{VisionEncoder, VisionOptions};
use serde::{Deserialize, Serialize};

use crate::accuracy::ClassMatcher;
use crate::checkpoint::{read_header, TRAINER_STATE};
use crate::config::{DataSource, EvalSettings, FeatureConfig};
use crate::data::{ClassTemplate, DataError, IndexedDataset, Loader, LoaderConfig, PromptTemplate, Sample};
use crate::error::{Result, TrainError};
use crate::eval::{run_evaluation, EvalContext, EvalOptions, EvalReport};
use crate::extract::{precompute, FeatureExtractor};
use crate::features::{FeatureCache, FeatureIdentity};
use crate::progress;
use crate::sources::{open_evaluation_source, Source};
use crate::stop::StopFlag;
use crate::text::{CaptionLayout, TextEncoder};

/// The connector, data and report path of an evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluateConfig {
    /// Folder with `connector.json` and `connector.safetensors`: a training
    /// checkpoint such as `runs/x/checkpoints/step-000800`. Required.
    pub checkpoint: PathBuf,
    /// The data to evaluate on. Required.
    pub data: DataSource,
    /// The frozen language model; default: the path the checkpoint records.
    #[serde(default)]
    pub language_model: Option<PathBuf>,
    /// The frozen vision encoder; default: the path the checkpoint records.
    #[serde(default)]
    pub vision_encoder: Option<PathBuf>,
    /// The prompt template; default: the training run's (from
    /// `trainer.json`), else `<image>Output:{caption}<|endofchunk|>`.
    #[serde(default)]
    pub prompt: Option<String>,
    /// The class caption template; default: the training run's, else
    /// `A photo of {article} {class}.`.
    #[serde(default)]
    pub class_template: Option<String>,
    /// `auto`, `cpu`, `vulkan`, `metal`, `dx12`, `gl` or an adapter index. Default `auto`.
    #[serde(default = "default_device")]
    pub device: String,
    #[serde(default)]
    pub features: FeatureConfig,
    /// Batch sizes, sample limit, generated tokens and examples.
    #[serde(default)]
    pub eval: EvalSettings,
    /// Path of the JSON report. Default: none, so no report file is written.
    #[serde(default)]
    pub report: Option<PathBuf>,
    /// Seed of the data's `limit` subsets. Default 0.
    #[serde(default)]
    pub seed: u64,
    /// Show progress bars on a terminal. Default true.
    #[serde(default = "default_true")]
    pub progress_bar: bool,
}

fn default_device() -> String {
    "auto".to_string()
}

fn default_true() -> bool {
    true
}

impl EvaluateConfig {
    /// Creates an evaluation of `checkpoint` on `data` with every other field at its default.
    pub fn new(checkpoint: impl Into<PathBuf>, data: DataSource) -> Self {
        Self {
            checkpoint: checkpoint.into(),
            data,
            language_model: None,
            vision_encoder: None,
            prompt: None,
            class_template: None,
            device: default_device(),
            features: FeatureConfig::default(),
            eval: EvalSettings::default(),
            report: None,
            seed: 0,
            progress_bar: true,
        }
    }
}

/// Loads the backbones and the connector of `config.checkpoint`, measures
/// validation loss and (for labelled data) caption accuracy, and writes
/// the report when `config.report` is set.
pub fn evaluate(config: &EvaluateConfig, stop: &StopFlag) -> Result<EvalReport> {
    let folder = &config.checkpoint;
    let manifest = ConnectorManifest::read(folder)?;
    let training = match folder.join(TRAINER_STATE).is_file() {
        true => Some(read_header(folder)?.config),
        false => None,
    };
    let prompt = config.prompt.clone().or_else(|| training.as_ref().map(|c| c.data.prompt.clone())).unwrap_or_else(|| PromptTemplate::DEFAULT.into());
    let class_template =
        config.class_template.clone().or_else(|| training.as_ref().map(|c| c.data.class_template.clone())).unwrap_or_else(|| ClassTemplate::DEFAULT.into());

    let device = Device::open(config.device.parse::<DeviceRequest>()?)?;
    let lm_path = config.language_model.clone().unwrap_or_else(|| manifest.language_model.path.clone());
    let vision_path = match (&config.vision_encoder, &manifest.vision_encoder) {
        (Some(path), _) => path.clone(),
        (None, Some(identity)) => identity.path.clone(),
        (None, None) => return Err(TrainError::checkpoint(folder, "the manifest names no vision encoder; set `vision_encoder`")),
    };
    check_identity("language model", &lm_path, Some(&manifest.language_model))?;
    let vision_identity = check_identity("vision encoder", &vision_path, manifest.vision_encoder.as_ref())?;

    let (lm, tokenizer, special) = LanguageModel::load(&device, &lm_path)?;
    let options = VisionOptions {
        final_layer_norm: manifest.vision_options.get("final_layer_norm").and_then(|v| v.as_bool()).unwrap_or(false),
        include_cls: manifest.vision_options.get("include_cls").and_then(|v| v.as_bool()).unwrap_or(false),
        weight_dtype: None,
    };
    let encoder = Arc::new(VisionEncoder::load(&device, &vision_path, options)?);
    let mut model = Flamingo::new(lm, tokenizer, special, manifest.flamingo.clone(), config.seed)?;
    model.load_connector(folder)?;

    let (source, class_names) = open_evaluation_source(&config.data, &prompt, &class_template, config.seed)?;
    let (tokens, dim) = (encoder.num_tokens(), encoder.output_dim());
    let identity = FeatureIdentity::new(vision_identity, manifest.vision_options.clone(), tokens, dim);
    let resampler = &manifest.flamingo.resampler;
    let frames_per_record = config.data.max_frames_per_record(resampler.max_num_media, resampler.max_num_frames) as u64;
    let per_record = frames_per_record * (tokens * dim * 2) as u64;
    let mut cache = FeatureCache::open(&config.features, &identity, source.records().map(|n| n as u64 * per_record))?;
    let mut extractor = FeatureExtractor::new(encoder.clone(), device.clone(), config.features.batch_size);

    let encode_first = config.features.precompute && config.features.cache != crate::config::CacheMode::Off;
    type Samples = Box<dyn Iterator<Item = std::result::Result<Sample, DataError>>>;
    let (mut samples, expected, precomputed): (Samples, Option<usize>, bool) = match &source {
        Source::Indexed(dataset) if encode_first => {
            let bar = progress::bar(dataset.len() as u64, config.progress_bar, progress::EXTRACT_TEMPLATE);
            let encoded = precompute(dataset, &mut extractor, &mut cache, &bar, stop)?;
            bar.finish_and_clear();
            let Some(encoded) = encoded else {
                return Err(TrainError::Config("evaluation stopped during feature extraction".into()));
            };
            let len = encoded.len();
            (Box::new(Loader::new(Arc::new(encoded), LoaderConfig { shuffle: false, seed: config.seed })?), Some(len), true)
        }
        Source::Indexed(dataset) => {
            (Box::new(Loader::new(dataset.clone(), LoaderConfig { shuffle: false, seed: config.seed })?), Some(dataset.len()), false)
        }
        Source::Shards(shards) => (Box::new(shards.stream(LoaderConfig { shuffle: false, seed: config.seed })?), None, false),
    };

    let matcher = class_names.as_deref().map(ClassMatcher::new);
    let mut text = TextEncoder::new(CaptionLayout::new(&PromptTemplate::new(&prompt)?));
    let options = EvalOptions {
        batch_size: config.eval.batch_size.unwrap_or(16),
        max_samples: config.eval.max_samples,
        accuracy: config.eval.accuracy,
        max_new_tokens: config.eval.max_new_tokens,
        max_examples: config.eval.max_examples,
        progress_bar: config.progress_bar,
    };
    let mut context = EvalContext { model: &model, cache: &mut cache, extractor: &mut extractor, text: &mut text, matcher: matcher.as_ref(), precomputed };
    let report = run_evaluation(&mut context, &mut *samples, expected, &options, manifest.step, stop)?;

    if let Some(path) = &config.report {
        let json = serde_json::to_string_pretty(&report).expect("the report is plain data");
        write_atomically(path, json.as_bytes())?;
    }
    Ok(report)
}

/// Hashes a backbone and warns when it differs from the one the connector
/// was trained with.
fn check_identity(role: &str, path: &std::path::Path, trained: Option<&BackboneIdentity>) -> Result<BackboneIdentity> {
    let identity = BackboneIdentity::of(path)?;
    if let Some(trained) = trained {
        if trained.sha256 != identity.sha256 {
            tracing::warn!(
                "the {role} {} (SHA-256 {}) is not the one the connector was trained with ({}, SHA-256 {}); results may be meaningless",
                path.display(),
                identity.sha256,
                trained.path.display(),
                trained.sha256
            );
        }
    }
    Ok(identity)
}
