//! The training configuration, read from TOML.
//!
//! A minimal file names the output folder, the two frozen backbones and the
//! training data; every other field has a default:
//!
//! ```toml
//! output_dir = "runs/fashion"
//! steps = 800
//! batch_size = 16
//!
//! [model]
//! language_model = "SmolLM2-135M-Instruct.Q4_1.gguf"
//! vision_encoder = "mobilenetv2_nsfwjs.safetensors"
//!
//! [data.train]
//! format = "fashion_mnist"
//! limit_per_class = 1000
//!
//! [data.validation]
//! format = "fashion_mnist"
//! split = "test"
//! limit_per_class = 50
//! ```

use std::path::{Path, PathBuf};

use flamingo_kernels::DeviceRequest;
use serde::{Deserialize, Serialize};

use crate::data::{ClassTemplate, DataError, PromptTemplate};
use crate::error::{Result, TrainError};

/// Everything a training run needs, as read from a TOML file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Folder for checkpoints, metrics, plots, the evaluation report and the
    /// summary. Created if missing. Required.
    pub output_dir: PathBuf,
    /// Continue the run whose latest checkpoint is in `output_dir/checkpoints`.
    /// Default false. A fresh run fails to start in a folder that already
    /// contains checkpoints, so that it never mixes with an old run.
    #[serde(default)]
    pub resume: bool,
    /// Seed of the connector's initialisation, the data order and the
    /// validation split. Default 0.
    #[serde(default)]
    pub seed: u64,
    /// The device: `auto`, `cpu`, `vulkan`, `metal`, `dx12`, `gl`, or an
    /// adapter index from `flamingo devices`. Default `auto`.
    #[serde(default = "default_device")]
    pub device: String,
    /// Optimizer steps to run in total, counting steps done before a resume.
    /// Default 1000.
    #[serde(default = "default_steps")]
    pub steps: u64,
    /// Samples per micro-batch (one forward and backward pass). Default 8.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Micro-batches whose gradients are averaged into one optimizer step,
    /// so a step trains on `batch_size × gradient_accumulation` samples. Default 1.
    #[serde(default = "default_one")]
    pub gradient_accumulation: usize,
    /// The frozen backbones and the shape of the trainable connector.
    pub model: ModelConfig,
    /// Training and validation data.
    pub data: DataConfig,
    #[serde(default)]
    pub optimizer: OptimizerConfig,
    #[serde(default)]
    pub schedule: ScheduleConfig,
    #[serde(default)]
    pub features: FeatureConfig,
    #[serde(default)]
    pub checkpoints: CheckpointConfig,
    #[serde(default)]
    pub logging: LoggingConfig,
    #[serde(default)]
    pub eval: EvalSettings,
}

/// The frozen backbones and the connector between them.
///
/// The resampler's width is the vision encoder's token width, so it is not
/// set here. Defaults follow OpenFlamingo.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Hugging Face folder or GGUF file of the frozen language model. Required.
    pub language_model: PathBuf,
    /// Hugging Face CLIP or SigLIP folder, or timm MobileNetV2 safetensors
    /// file, of the frozen vision encoder. Required.
    pub vision_encoder: PathBuf,
    /// Apply the encoder's final LayerNorm to every visual token. Default false.
    #[serde(default)]
    pub vision_final_layer_norm: bool,
    /// Keep CLIP's class token in front of the patch tokens. Default false.
    #[serde(default)]
    pub vision_include_cls: bool,
    /// Perceiver Resampler layers. Default 6.
    #[serde(default = "default_resampler_depth")]
    pub resampler_depth: usize,
    /// Attention heads of the resampler. Default 8.
    #[serde(default = "default_heads")]
    pub resampler_heads: usize,
    /// Width of one resampler head. Default 64.
    #[serde(default = "default_dim_head")]
    pub resampler_dim_head: usize,
    /// Latents per image, the visual tokens the LM attends to. Default 64.
    #[serde(default = "default_num_latents")]
    pub num_latents: usize,
    /// Inner width of the resampler's feed-forward blocks, as a multiple of
    /// the visual width. Default 4.
    #[serde(default = "default_ff_mult")]
    pub resampler_ff_mult: usize,
    /// Images (or clips) per sample that get their own learned embedding;
    /// samples with more are skipped. Default 1.
    #[serde(default = "default_one")]
    pub max_images: usize,
    /// Video frames per clip that get their own learned embedding. Default 1.
    #[serde(default = "default_one")]
    pub max_frames: usize,
    /// A gated cross-attention block goes before LM layer i when i + 1 is a
    /// multiple of this. Default 1 (every layer).
    #[serde(default = "default_one")]
    pub cross_attn_every_n_layers: usize,
    /// Attention heads of each cross-attention block. Default 8.
    #[serde(default = "default_heads")]
    pub cross_attn_heads: usize,
    /// Width of one cross-attention head. Default 64.
    #[serde(default = "default_dim_head")]
    pub cross_attn_dim_head: usize,
    /// Inner width of each block's feed-forward part, as a multiple of the
    /// LM's width. Default 4.
    #[serde(default = "default_ff_mult")]
    pub cross_attn_ff_mult: usize,
}

/// The sources of the training and validation samples and the templates of their text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// The training data. Required.
    pub train: DataSource,
    /// Held-out data for the validation loss and caption accuracy. When
    /// absent, `validation_fraction` of the training records (or shards) is
    /// held out instead.
    #[serde(default)]
    pub validation: Option<DataSource>,
    /// Fraction of the training records (WebDataset: shards) held out for
    /// validation when `validation` is absent; 0 disables validation.
    /// Default 0.05.
    #[serde(default = "default_validation_fraction")]
    pub validation_fraction: f64,
    /// Template that turns a caption into training text; it must contain
    /// `{caption}` and one `<image>`. The text before `{caption}` is the
    /// prompt: it carries no loss and starts generation in evaluation.
    /// Default `<image>Output:{caption}<|endofchunk|>`.
    #[serde(default = "default_prompt")]
    pub prompt: String,
    /// Template that turns a class into a caption, for IDX and
    /// Fashion-MNIST data; placeholders `{class}`, `{label}`, `{article}`.
    /// Default `A photo of {article} {class}.`.
    #[serde(default = "default_class_template")]
    pub class_template: String,
    /// Visit the training records in a new seeded order every epoch.
    /// Default true.
    #[serde(default = "default_true")]
    pub shuffle: bool,
}

/// The file layout of a data source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    /// Image-caption pairs, one JSON object per line (`path`).
    Jsonl,
    /// Image-caption pairs in a CSV file with a header row (`path`).
    Csv,
    /// WebDataset `.tar` shards (`shards`).
    Webdataset,
    /// Interleaved documents with several images, JSONL (`path`).
    Interleaved,
    /// Video clips with captions, JSONL (`path`).
    Video,
    /// An MNIST-style pair of IDX files (`path` for images, `labels`).
    Idx,
    /// Fashion-MNIST's IDX files in a folder (`path`, default
    /// `$FLAMINGO_CACHE/fashion-mnist`), with its class names.
    FashionMnist,
}

/// One data source. Which fields apply depends on `format`; a field that
/// does not apply is an error, so that a typo cannot go unnoticed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSource {
    pub format: DataFormat,
    /// The manifest (jsonl, csv, interleaved, video), the image file (idx)
    /// or the folder (fashion_mnist). Relative image paths in a manifest
    /// start from the manifest's folder.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// The label file (idx).
    #[serde(default)]
    pub labels: Option<PathBuf>,
    /// Shard paths or brace patterns such as `data/{000..099}.tar` (webdataset).
    #[serde(default)]
    pub shards: Vec<String>,
    /// `train` or `test` (fashion_mnist). Default `train`.
    #[serde(default)]
    pub split: Option<String>,
    /// Field with the image path (jsonl, default `image`), image list
    /// (interleaved, default `images`) or video path (video, default `video`).
    #[serde(default)]
    pub image_key: Option<String>,
    /// Field with the caption or text (jsonl, interleaved, video). Default `text`.
    #[serde(default)]
    pub text_key: Option<String>,
    /// Column with the image path (csv). Default `image`.
    #[serde(default)]
    pub image_column: Option<String>,
    /// Column with the caption (csv). Default `caption`.
    #[serde(default)]
    pub caption_column: Option<String>,
    /// Folder that relative image paths start from (csv). Default: the CSV file's folder.
    #[serde(default)]
    pub image_dir: Option<PathBuf>,
    /// Field delimiter, one ASCII character (csv). Default `,`.
    #[serde(default)]
    pub delimiter: Option<char>,
    /// Fields of a `json` caption file tried in order (webdataset). Default `["caption", "text"]`.
    #[serde(default)]
    pub caption_keys: Option<Vec<String>>,
    /// Samples held in the shuffle buffer (webdataset). Default 1000.
    #[serde(default)]
    pub shuffle_buffer: Option<usize>,
    /// Frames sampled from each clip (video). Default 8.
    #[serde(default)]
    pub frames: Option<usize>,
    /// Class names by label (idx: required; fashion_mnist: default its ten
    /// caption names, `t-shirt` ... `ankle boot`).
    #[serde(default)]
    pub class_names: Option<Vec<String>>,
    /// Use at most this many records, a seeded random subset. Default: all.
    #[serde(default)]
    pub limit: Option<usize>,
    /// Use at most this many records of each class, the first ones in a
    /// seeded order (idx, fashion_mnist). Default: all.
    #[serde(default)]
    pub limit_per_class: Option<usize>,
}

/// AdamW (decoupled weight decay) and gradient clipping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimizerConfig {
    /// Peak learning rate. Default 1e-4.
    pub lr: f32,
    /// Decay of the first moment. Default 0.9.
    pub beta1: f32,
    /// Decay of the second moment. Default 0.999.
    pub beta2: f32,
    /// Added to the second moment's square root. Default 1e-8.
    pub eps: f32,
    /// Decoupled weight decay per unit of learning rate, applied only to the
    /// tensors the model marks for it (the cross-attention matrices).
    /// Default 0.1.
    pub weight_decay: f32,
    /// Largest global L2 norm of the gradient; larger gradients are scaled
    /// down to it. 0 disables clipping. Default 1.0.
    pub max_grad_norm: f32,
    /// Learning-rate multiplier of the tanh gates (`attn_gate`, `ff_gate`).
    /// Adam moves a gate by about the learning rate per step, so with the
    /// default the gates open slowly. Default 1.0.
    pub gate_lr_multiplier: f32,
    /// Learning-rate multiplier of the Perceiver Resampler. Default 1.0.
    pub resampler_lr_multiplier: f32,
    /// Learning-rate multiplier of the cross-attention blocks without their gates. Default 1.0.
    pub cross_attention_lr_multiplier: f32,
    /// Learning-rate multiplier of the embedding and output rows of
    /// `<image>` and `<|endofchunk|>`. Default 1.0.
    pub token_rows_lr_multiplier: f32,
}

/// The shape of the learning-rate curve after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecayKind {
    /// Stay at the peak learning rate.
    Constant,
    /// Half a cosine from the peak down to `min_lr_ratio × lr` at the last step.
    Cosine,
}

/// Learning-rate schedule: linear warm-up, then constant or cosine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleConfig {
    /// Steps over which the learning rate rises linearly from lr/warmup_steps
    /// to lr. Default 0.
    pub warmup_steps: u64,
    /// The curve after the warm-up. Default `constant`.
    pub decay: DecayKind,
    /// The cosine's final learning rate as a fraction of the peak. Default 0.1.
    pub min_lr_ratio: f32,
}

/// The storage of the frozen encoder's features.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheMode {
    /// `memory` when the estimated size fits `memory_limit_mib`, else `disk`.
    Auto,
    /// f16 features in process memory.
    Memory,
    /// f16 features in a memory-mapped file under `dir`, reused by later runs.
    Disk,
    /// No cache: every batch runs the encoder.
    Off,
}

/// The frozen vision encoder's feature cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FeatureConfig {
    /// Default `auto`.
    pub cache: CacheMode,
    /// Folder of disk caches, one subfolder per encoder identity.
    /// Default `$FLAMINGO_CACHE/features` (`~/.cache/flamingo/features`).
    pub dir: Option<PathBuf>,
    /// Largest in-memory cache `auto` chooses, in MiB. Default 2048.
    pub memory_limit_mib: u64,
    /// Images per encoder batch during extraction. Default 16.
    pub batch_size: usize,
    /// Encode every image of an indexed dataset before the first step, so
    /// no step decodes an image or runs the encoder. WebDataset shards are
    /// always encoded on first use. Default true.
    pub precompute: bool,
}

/// When checkpoints are written and how many are kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Steps between checkpoints; 0 writes one only at the end (and on a
    /// stop request). Default 500.
    pub every: u64,
    /// Checkpoints kept, the most recent ones; 0 keeps all. Default 3.
    pub keep_last: usize,
}

/// Console output, metrics and plots.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// Steps between log lines (and gate values in the metrics). Default 10.
    pub log_every: u64,
    /// Show a progress bar on a terminal. Default true.
    pub progress_bar: bool,
    /// Write PNG plots of the loss, learning rate and gates at each
    /// checkpoint. Default true.
    pub plots: bool,
}

/// Validation and caption accuracy during and after training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSettings {
    /// Steps between validation-loss evaluations; 0 evaluates only at the
    /// end. Default 0.
    pub every: u64,
    /// Also measure caption accuracy at each evaluation, not only at the
    /// end. Default false.
    pub accuracy_every_eval: bool,
    /// Measure caption accuracy at the end, for data with class labels. Default true.
    pub accuracy: bool,
    /// Evaluate once before the first step of a fresh run, with every gate
    /// still 0: the frozen language model alone, which cannot see the
    /// image. Because the images cannot change the output, each distinct
    /// text is evaluated once. Written to `eval-start.json`. Default false.
    pub at_start: bool,
    /// Validation samples used per evaluation, the first ones in file
    /// order; default all.
    pub max_samples: Option<usize>,
    /// Samples per validation or generation batch; default `batch_size`.
    pub batch_size: Option<usize>,
    /// Tokens generated per caption for accuracy. Default 8.
    pub max_new_tokens: usize,
    /// Predictions listed in the report. Default 20.
    pub max_examples: usize,
}

fn default_device() -> String {
    "auto".to_string()
}
fn default_steps() -> u64 {
    1000
}
fn default_batch_size() -> usize {
    8
}
fn default_one() -> usize {
    1
}
fn default_true() -> bool {
    true
}
fn default_resampler_depth() -> usize {
    6
}
fn default_heads() -> usize {
    8
}
fn default_dim_head() -> usize {
    64
}
fn default_num_latents() -> usize {
    64
}
fn default_ff_mult() -> usize {
    4
}
fn default_validation_fraction() -> f64 {
    0.05
}
fn default_prompt() -> String {
    PromptTemplate::DEFAULT.to_string()
}
fn default_class_template() -> String {
    ClassTemplate::DEFAULT.to_string()
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
            max_grad_norm: 1.0,
            gate_lr_multiplier: 1.0,
            resampler_lr_multiplier: 1.0,
            cross_attention_lr_multiplier: 1.0,
            token_rows_lr_multiplier: 1.0,
        }
    }
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self { warmup_steps: 0, decay: DecayKind::Constant, min_lr_ratio: 0.1 }
    }
}

impl Default for FeatureConfig {
    fn default() -> Self {
        Self { cache: CacheMode::Auto, dir: None, memory_limit_mib: 2048, batch_size: 16, precompute: true }
    }
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self { every: 500, keep_last: 3 }
    }
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self { log_every: 10, progress_bar: true, plots: true }
    }
}

impl Default for EvalSettings {
    fn default() -> Self {
        Self {
            every: 0,
            accuracy_every_eval: false,
            accuracy: true,
            at_start: false,
            max_samples: None,
            batch_size: None,
            max_new_tokens: 8,
            max_examples: 20,
        }
    }
}

impl ModelConfig {
    /// Creates the default connector around two backbones.
    pub fn new(language_model: impl Into<PathBuf>, vision_encoder: impl Into<PathBuf>) -> Self {
        Self {
            language_model: language_model.into(),
            vision_encoder: vision_encoder.into(),
            vision_final_layer_norm: false,
            vision_include_cls: false,
            resampler_depth: default_resampler_depth(),
            resampler_heads: default_heads(),
            resampler_dim_head: default_dim_head(),
            num_latents: default_num_latents(),
            resampler_ff_mult: default_ff_mult(),
            max_images: 1,
            max_frames: 1,
            cross_attn_every_n_layers: 1,
            cross_attn_heads: default_heads(),
            cross_attn_dim_head: default_dim_head(),
            cross_attn_ff_mult: default_ff_mult(),
        }
    }
}

impl DataConfig {
    /// Training data with the default templates and a 5 % validation split.
    pub fn new(train: DataSource) -> Self {
        Self {
            train,
            validation: None,
            validation_fraction: default_validation_fraction(),
            prompt: default_prompt(),
            class_template: default_class_template(),
            shuffle: true,
        }
    }
}

impl DataSource {
    /// Returns the most frames one record of this source can hold: one
    /// image for pairs and class data, `max_images` images for interleaved
    /// documents and `max_frames` frames for a clip. Used to size the
    /// feature cache.
    pub fn max_frames_per_record(&self, max_images: usize, max_frames: usize) -> usize {
        match self.format {
            DataFormat::Interleaved => max_images,
            DataFormat::Video => max_frames,
            _ => 1,
        }
    }

    /// Creates a source of `format` with every optional field unset.
    pub fn new(format: DataFormat) -> Self {
        Self {
            format,
            path: None,
            labels: None,
            shards: Vec::new(),
            split: None,
            image_key: None,
            text_key: None,
            image_column: None,
            caption_column: None,
            image_dir: None,
            delimiter: None,
            caption_keys: None,
            shuffle_buffer: None,
            frames: None,
            class_names: None,
            limit: None,
            limit_per_class: None,
        }
    }

    /// Creates a source of `format` that reads `path`.
    pub fn with_path(format: DataFormat, path: impl Into<PathBuf>) -> Self {
        Self { path: Some(path.into()), ..Self::new(format) }
    }

    /// Checks that the fields `format` needs are set and that no other
    /// field is. `role` names the source in errors: a field `path` of the
    /// role `train` is reported as `data.train.path`.
    pub fn validate(&self, role: &str) -> Result<()> {
        let format = self.format;
        let fail = |field: &str, problem: String| Err(TrainError::field(format!("data.{role}.{field}"), problem));
        let needs_path = !matches!(format, DataFormat::Webdataset | DataFormat::FashionMnist);
        if needs_path && self.path.is_none() {
            let expected_file = match format {
                DataFormat::Csv => "the CSV file",
                DataFormat::Idx => "the IDX image file",
                _ => "the JSONL manifest",
            };
            return fail("path", format!("is required for {format} data; give {expected_file}"));
        }
        if format == DataFormat::Webdataset && self.shards.is_empty() {
            return fail("shards", "is required for webdataset data; list shard files or brace patterns".into());
        }
        if format == DataFormat::Idx && self.labels.is_none() {
            return fail("labels", "is required for idx data; give the IDX label file".into());
        }
        if format == DataFormat::Idx && self.class_names.is_none() {
            return fail("class_names", "is required for idx data; list one class name per label".into());
        }

        let set = [
            ("path", self.path.is_some()),
            ("labels", self.labels.is_some()),
            ("shards", !self.shards.is_empty()),
            ("split", self.split.is_some()),
            ("image_key", self.image_key.is_some()),
            ("text_key", self.text_key.is_some()),
            ("image_column", self.image_column.is_some()),
            ("caption_column", self.caption_column.is_some()),
            ("image_dir", self.image_dir.is_some()),
            ("delimiter", self.delimiter.is_some()),
            ("caption_keys", self.caption_keys.is_some()),
            ("shuffle_buffer", self.shuffle_buffer.is_some()),
            ("frames", self.frames.is_some()),
            ("class_names", self.class_names.is_some()),
            ("limit", self.limit.is_some()),
            ("limit_per_class", self.limit_per_class.is_some()),
        ];
        for (field, is_set) in set {
            if is_set && !format.fields().contains(&field) {
                let formats: Vec<&str> = DataFormat::ALL.iter().filter(|other| other.fields().contains(&field)).map(|other| other.name()).collect();
                return fail(field, format!("does not apply to {format} data, only to {} data; remove it", join_and(&formats)));
            }
        }

        if let Some(split) = &self.split {
            if split != "train" && split != "test" {
                return fail("split", format!("is {split:?}, but it must be \"train\" or \"test\""));
            }
        }
        if let Some(delimiter) = self.delimiter {
            if !delimiter.is_ascii() {
                return fail("delimiter", format!("is {delimiter:?}, but it must be one ASCII character"));
            }
        }
        if self.frames == Some(0) {
            return fail("frames", "must be at least 1".into());
        }
        if self.limit == Some(0) {
            return fail("limit", "must be at least 1; leave it out to use every record".into());
        }
        if self.limit_per_class == Some(0) {
            return fail("limit_per_class", "must be at least 1; leave it out to use every record of each class".into());
        }
        if let Some(names) = &self.class_names {
            if names.is_empty() || names.iter().any(|name| name.trim().is_empty()) {
                return fail("class_names", "must list non-empty names".into());
            }
        }
        Ok(())
    }
}

impl DataFormat {
    /// Every format, in the order of the documentation.
    pub const ALL: [DataFormat; 7] = [
        DataFormat::Jsonl,
        DataFormat::Csv,
        DataFormat::Webdataset,
        DataFormat::Interleaved,
        DataFormat::Video,
        DataFormat::Idx,
        DataFormat::FashionMnist,
    ];

    /// Returns the name a TOML file gives the format, such as `fashion_mnist`.
    pub fn name(self) -> &'static str {
        match self {
            DataFormat::Jsonl => "jsonl",
            DataFormat::Csv => "csv",
            DataFormat::Webdataset => "webdataset",
            DataFormat::Interleaved => "interleaved",
            DataFormat::Video => "video",
            DataFormat::Idx => "idx",
            DataFormat::FashionMnist => "fashion_mnist",
        }
    }

    /// Returns the [`DataSource`] fields this format reads, besides `format`.
    pub fn fields(self) -> &'static [&'static str] {
        match self {
            DataFormat::Jsonl => &["path", "image_key", "text_key", "limit"],
            DataFormat::Csv => &["path", "image_column", "caption_column", "image_dir", "delimiter", "limit"],
            DataFormat::Webdataset => &["shards", "caption_keys", "shuffle_buffer"],
            DataFormat::Interleaved => &["path", "image_key", "text_key", "limit"],
            DataFormat::Video => &["path", "image_key", "text_key", "frames", "limit"],
            DataFormat::Idx => &["path", "labels", "class_names", "limit", "limit_per_class"],
            DataFormat::FashionMnist => &["path", "split", "class_names", "limit", "limit_per_class"],
        }
    }
}

impl std::fmt::Display for DataFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Joins words as English lists them: `a`, `a and b`, `a, b and c`.
fn join_and(words: &[&str]) -> String {
    match words {
        [] => String::new(),
        [only] => only.to_string(),
        [rest @ .., last] => format!("{} and {last}", rest.join(", ")),
    }
}

impl TrainConfig {
    /// Creates a configuration with every optional field at its default.
    pub fn new(output_dir: impl Into<PathBuf>, model: ModelConfig, data: DataConfig) -> Self {
        Self {
            output_dir: output_dir.into(),
            resume: false,
            seed: 0,
            device: default_device(),
            steps: default_steps(),
            batch_size: default_batch_size(),
            gradient_accumulation: 1,
            model,
            data,
            optimizer: OptimizerConfig::default(),
            schedule: ScheduleConfig::default(),
            features: FeatureConfig::default(),
            checkpoints: CheckpointConfig::default(),
            logging: LoggingConfig::default(),
            eval: EvalSettings::default(),
        }
    }

    /// Parses a TOML document and checks every value.
    pub fn from_toml_str(text: &str) -> Result<Self> {
        let config: TrainConfig = toml::from_str(text).map_err(|e| TrainError::Config(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Reads and checks a TOML file. An invalid value is reported with the
    /// file and the key. Relative paths in it stay relative to the working
    /// folder, as on a command line.
    pub fn from_toml_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let config = Self::parse_toml_file(path)?;
        config.validate().map_err(|error| match error {
            TrainError::Field { key, problem } => TrainError::ConfigFile { path: path.to_path_buf(), message: format!("`{key}` {problem}") },
            other => other,
        })?;
        Ok(config)
    }

    /// Reads a TOML file without checking its values, for a caller that
    /// replaces some of them before it calls [`validate`](Self::validate).
    pub fn parse_toml_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
        toml::from_str(&text).map_err(|e| TrainError::ConfigFile { path: path.to_path_buf(), message: e.to_string() })
    }

    /// Writes the configuration as TOML.
    pub fn to_toml_string(&self) -> Result<String> {
        toml::to_string_pretty(self).map_err(|e| TrainError::Config(format!("cannot encode the configuration as TOML: {e}")))
    }

    /// Samples per optimizer step.
    pub fn samples_per_step(&self) -> usize {
        self.batch_size * self.gradient_accumulation
    }

    /// Checks ranges and cross-field consistency. Each error is a
    /// [`TrainError::Field`] that names the field at fault.
    pub fn validate(&self) -> Result<()> {
        let fail = |key: &str, problem: String| Err(TrainError::field(key, problem));
        if self.output_dir.as_os_str().is_empty() {
            return fail("output_dir", "is empty; give the folder for checkpoints and metrics".into());
        }
        if let Err(error) = self.device.parse::<DeviceRequest>() {
            let reason = match error {
                flamingo_kernels::Error::Device(reason) => reason,
                other => other.to_string(),
            };
            return fail("device", format!("is invalid: {reason}"));
        }
        if self.steps == 0 {
            return fail("steps", "must be at least 1".into());
        }
        if self.batch_size == 0 {
            return fail("batch_size", "must be at least 1".into());
        }
        if self.gradient_accumulation == 0 {
            return fail("gradient_accumulation", "must be at least 1".into());
        }

        let m = &self.model;
        let sizes = [
            ("model.resampler_depth", m.resampler_depth),
            ("model.resampler_heads", m.resampler_heads),
            ("model.resampler_dim_head", m.resampler_dim_head),
            ("model.num_latents", m.num_latents),
            ("model.resampler_ff_mult", m.resampler_ff_mult),
            ("model.max_images", m.max_images),
            ("model.max_frames", m.max_frames),
            ("model.cross_attn_every_n_layers", m.cross_attn_every_n_layers),
            ("model.cross_attn_heads", m.cross_attn_heads),
            ("model.cross_attn_dim_head", m.cross_attn_dim_head),
            ("model.cross_attn_ff_mult", m.cross_attn_ff_mult),
        ];
        if let Some((name, _)) = sizes.iter().find(|(_, value)| *value == 0) {
            return fail(name, "must be at least 1".into());
        }

        self.data.train.validate("train")?;
        if let Some(validation) = &self.data.validation {
            validation.validate("validation")?;
        }
        if !(0.0..1.0).contains(&self.data.validation_fraction) {
            return fail("data.validation_fraction", format!("is {}, but it must be at least 0 and below 1", self.data.validation_fraction));
        }
        for (key, check) in [
            ("data.prompt", PromptTemplate::new(&self.data.prompt).err()),
            ("data.class_template", ClassTemplate::new(&self.data.class_template).err()),
        ] {
            match check {
                Some(DataError::Template { template, reason }) => return fail(key, format!("is {template:?}, which is not a valid template: {reason}")),
                Some(other) => return Err(other.into()),
                None => {}
            }
        }
        for (role, source) in std::iter::once(("train", &self.data.train)).chain(self.data.validation.as_ref().map(|source| ("validation", source))) {
            let frames = match source.format {
                DataFormat::Video => Some(source.frames.unwrap_or(crate::data::VideoConfig::DEFAULT_FRAMES)),
                _ => source.frames,
            };
            if let Some(frames) = frames {
                if frames > m.max_frames {
                    return fail(
                        "model.max_frames",
                        format!("is {}, but data.{role} samples {frames} frames per clip; raise it to at least {frames}", m.max_frames),
                    );
                }
            }
        }

        let o = &self.optimizer;
        if !(o.lr.is_finite() && o.lr > 0.0) {
            return fail("optimizer.lr", format!("is {}, but it must be a positive number such as 1e-4", o.lr));
        }
        for (key, beta) in [("optimizer.beta1", o.beta1), ("optimizer.beta2", o.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                return fail(key, format!("is {beta}, but it must be at least 0 and below 1"));
            }
        }
        if !(o.eps.is_finite() && o.eps > 0.0) {
            return fail("optimizer.eps", format!("is {}, but it must be positive", o.eps));
        }
        if !(o.weight_decay.is_finite() && o.weight_decay >= 0.0) {
            return fail("optimizer.weight_decay", format!("is {}, but it must be 0 or positive", o.weight_decay));
        }
        if !(o.max_grad_norm.is_finite() && o.max_grad_norm >= 0.0) {
            return fail("optimizer.max_grad_norm", format!("is {}, but it must be 0 (no clipping) or positive", o.max_grad_norm));
        }
        let multipliers = [
            ("optimizer.gate_lr_multiplier", o.gate_lr_multiplier),
            ("optimizer.resampler_lr_multiplier", o.resampler_lr_multiplier),
            ("optimizer.cross_attention_lr_multiplier", o.cross_attention_lr_multiplier),
            ("optimizer.token_rows_lr_multiplier", o.token_rows_lr_multiplier),
        ];
        if let Some((name, value)) = multipliers.iter().find(|(_, value)| !(value.is_finite() && *value >= 0.0)) {
            return fail(name, format!("is {value}, but it must be 0 or positive (0 freezes the group)"));
        }
        if !(0.0..=1.0).contains(&self.schedule.min_lr_ratio) {
            return fail("schedule.min_lr_ratio", format!("is {}, but it must be between 0 and 1", self.schedule.min_lr_ratio));
        }
        if self.features.batch_size == 0 {
            return fail("features.batch_size", "must be at least 1".into());
        }
        if self.logging.log_every == 0 {
            return fail("logging.log_every", "must be at least 1".into());
        }
        if self.eval.batch_size == Some(0) {
            return fail("eval.batch_size", "must be at least 1; leave it out to use `batch_size`".into());
        }
        if self.eval.max_samples == Some(0) {
            return fail("eval.max_samples", "must be at least 1; leave it out to use every validation sample".into());
        }
        Ok(())
    }

    /// Returns the folder of the checkpoints, `output_dir/checkpoints`.
    pub fn checkpoint_dir(&self) -> PathBuf {
        self.output_dir.join("checkpoints")
    }
}

/// Returns the root folder of asset and feature caches: `$FLAMINGO_CACHE`, else
/// `$XDG_CACHE_HOME/flamingo`, else `$HOME/.cache/flamingo`.
pub fn default_cache_root() -> Option<PathBuf> {
    if let Some(cache) = std::env::var_os("FLAMINGO_CACHE") {
        return Some(PathBuf::from(cache));
    }
    if let Some(xdg) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(xdg).join("flamingo"));
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache/flamingo"))
}
