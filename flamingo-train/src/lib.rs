//! Datasets, optimizer, training loop, checkpoints and evaluation for Flamingo.
//!
//! [`train`] runs a whole training job from a [`TrainConfig`]; [`evaluate`]
//! measures a saved connector. Only the Perceiver Resampler, the gated
//! cross-attention blocks and the rows of the two added tokens learn. The
//! vision encoder and the language model stay frozen.
//!
//! ```no_run
//! use flamingo_train::{train, DataConfig, DataFormat, DataSource, ModelConfig, StopFlag, TrainConfig};
//!
//! # fn main() -> flamingo_train::Result<()> {
//! let model = ModelConfig::new("SmolLM2-135M-Instruct.Q4_1.gguf", "mobilenet_v2.safetensors");
//! let data = DataConfig::new(DataSource::with_path(DataFormat::Jsonl, "captions.jsonl"));
//! let mut config = TrainConfig::new("runs/captions", model, data);
//! config.steps = 500;
//! let summary = train(config, &StopFlag::new())?;
//! println!("last loss {:?}, checkpoint {:?}", summary.last_loss, summary.last_checkpoint);
//! # Ok(())
//! # }
//! ```

pub mod accuracy;
pub mod batch;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod error;
pub mod eval;
pub mod evaluate;
pub mod extract;
pub mod features;
pub mod flops;
pub mod metrics;
pub mod optimizer;
pub mod plots;
pub mod progress;
pub mod schedule;
pub mod sources;
pub mod stop;
pub mod text;
pub mod trainer;

pub use config::{
    CacheMode, CheckpointConfig, DataConfig, DataFormat, DataSource, DecayKind, EvalSettings, FeatureConfig, LoggingConfig,
    ModelConfig, OptimizerConfig, ScheduleConfig, TrainConfig,
};
pub use error::{Result, TrainError};
pub use eval::{AccuracyReport, EvalReport};
pub use evaluate::{evaluate, EvaluateConfig};
pub use metrics::{MetricsRecord, StepRecord};
pub use optimizer::{AdamWOptimizer, OptimizerSummary, ParamGroup};
pub use stop::StopFlag;
pub use trainer::{train, NoObserver, TrainObserver, TrainSummary, Trainer};
