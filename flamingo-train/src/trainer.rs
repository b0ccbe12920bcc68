//! The training run: from a configuration to checkpoints, metrics, plots
//! and an evaluation report.
//!
//! ```text
//! Trainer::new   load backbones, hash them, build the connector and AdamW,
//!                open the data, and on resume load the latest checkpoint
//! Trainer::run   encode every image once into the feature cache, then per step:
//!                  zero gradients
//!                  gradient_accumulation × (next batch -> loss_and_backward)
//!                  clip the gradient norm, AdamW step at the scheduled rate
//!                  metrics line; log line, evaluation, checkpoint on their intervals
//!                  on a stop request: checkpoint and return
//!                final checkpoint, evaluation with caption accuracy, plots, summary
//! ```
//!
//! A resumed run continues the same sequence. It restores the connector,
//! the AdamW moments and step counts, and the data cursor, and the learning
//! rate is a function of the step. So on the CPU backend the loss curve
//! after a resume equals that of an uninterrupted run (a test checks this).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use flamingo_kernels::{Device, DeviceRequest};
use flamingo_model::flamingo::checkpoint::{write_atomically, MANIFEST_VERSION};
use flamingo_model::flamingo::{BackboneIdentity, ConnectorManifest, Flamingo, FlamingoConfig, ResamplerConfig};
use flamingo_model::lm::LanguageModel;
use flamingo_model::vision::{VisionEncoder, VisionOptions};
use indicatif::ProgressBar;
use serde::Serialize;

use crate::accuracy::ClassMatcher;
use crate::batch::{assemble, unfit_reason, PreparedBatch};
use crate::checkpoint::{self, CheckpointHeader, HEADER_VERSION};
use crate::config::{CacheMode, TrainConfig};
use crate::data::{IndexedDataset, Loader, LoaderConfig, PromptTemplate, Sample, SampleStream, SkipLog, SkipReason, WebDataset};
use crate::error::{Result, TrainError};
use crate::eval::{run_evaluation, EvalContext, EvalOptions, EvalReport};
use crate::extract::{precompute, ExtractionStats, FeatureExtractor};
use crate::features::{FeatureCache, FeatureIdentity};
use crate::flops::FlopModel;
use crate::metrics::{EvalRecord, GateRecord, MetricsLog, MetricsRecord, StepRecord};
use crate::optimizer::{AdamWOptimizer, OptimizerSummary};
use crate::plots::write_plots;
use crate::progress;
use crate::schedule::LrSchedule;
use crate::sources::{open_split, DataSplit, Source};
use crate::stop::StopFlag;
use crate::text::{CaptionLayout, TextEncoder};

/// Unfit samples logged one by one before only the count is kept.
const UNFIT_WARNINGS: u64 = 5;

/// Samples in a row that may be left out before a batch gives up.
const MAX_UNFIT_IN_A_ROW: u64 = 10_000;

/// Callbacks from inside a run, for front ends and tests.
pub trait TrainObserver {
    /// Called after every optimizer step, with the step's metrics. Setting
    /// `stop` here ends the run after this step, with a checkpoint.
    fn on_step(&mut self, _record: &StepRecord, _stop: &StopFlag) {}

    /// Called after every evaluation.
    fn on_eval(&mut self, _report: &EvalReport) {}

    /// Called when a checkpoint's files are written and synced under a
    /// temporary name, just before the rename that publishes it. An error
    /// ends the run and leaves the checkpoint unpublished, as a crash at
    /// that moment would.
    fn before_checkpoint_commit(&mut self, _staged: &Path, _step: u64) -> std::result::Result<(), String> {
        Ok(())
    }
}

/// An observer that does nothing.
pub struct NoObserver;

impl TrainObserver for NoObserver {}

/// The outcome of a run, also written to `output_dir/summary.json`.
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    pub output_dir: PathBuf,
    /// The step the run started from: 0, or the resumed checkpoint's step.
    pub first_step: u64,
    /// The last step completed.
    pub last_step: u64,
    /// Whether a stop request ended the run early.
    pub stopped: bool,
    /// Loss of the last step.
    pub last_loss: Option<f32>,
    /// The newest checkpoint of the run: the last one written, else the
    /// one the run resumed from.
    pub last_checkpoint: Option<PathBuf>,
    /// The final evaluation, when there is validation data and the run was not stopped.
    pub evaluation: Option<EvalReport>,
    /// The evaluation before the first step (`eval.at_start`), every gate at 0.
    pub baseline: Option<EvalReport>,
    /// Bad samples skipped, by reason, counting every visit.
    pub skipped: BTreeMap<SkipReason, u64>,
    pub skipped_summary: String,
    /// Samples left out because they do not fit a batch (too long, too many images).
    pub samples_left_out: u64,
    pub optimizer: OptimizerSummary,
    pub features: ExtractionStats,
    /// Seconds spent in training steps in this process.
    pub train_seconds: f64,
    pub mean_step_ms: Option<f64>,
    /// Seconds from `run` to its end, extraction and evaluation included.
    pub total_seconds: f64,
}

/// Trains the connector as `config` specifies, until `config.steps` or a stop request.
pub fn train(config: TrainConfig, stop: &StopFlag) -> Result<TrainSummary> {
    Trainer::new(config)?.run(stop, &mut NoObserver)
}

/// The identities of the frozen backbones.
#[derive(Debug, Clone)]
struct Backbones {
    language_model: BackboneIdentity,
    vision_encoder: BackboneIdentity,
}

/// Validation data and whether its features are precomputed.
enum EvalSource {
    Indexed(Arc<dyn IndexedDataset>),
    Shards(WebDataset),
}

/// The opened data of a run, after feature extraction.
struct RunData {
    stream: Box<dyn SampleStream>,
    train_precomputed: bool,
    validation: Option<(EvalSource, bool)>,
    skips: Vec<Arc<SkipLog>>,
}

/// A loaded model, optimizer and data, ready to [`run`](Self::run).
pub struct Trainer {
    config: TrainConfig,
    device: Device,
    model: Flamingo,
    encoder: Arc<VisionEncoder>,
    backbones: Backbones,
    vision_options: serde_json::Value,
    optimizer: AdamWOptimizer,
    schedule: LrSchedule,
    flops: FlopModel,
    layout: CaptionLayout,
    split: Option<DataSplit>,
    matcher: Option<ClassMatcher>,
    /// The checkpoint a resumed run continues from.
    resumed: Option<(PathBuf, CheckpointHeader)>,
}

impl Trainer {
    /// Loads the backbones, builds the connector and the optimizer, opens
    /// the data and, when `config.resume` is set, restores the latest checkpoint.
    ///
    /// The output folder is created first, so that an unwritable path fails
    /// before the backbones load. When a later step fails, a folder created
    /// here is removed again if it is still empty. `checkpoints/` appears
    /// with the first checkpoint.
    pub fn new(config: TrainConfig) -> Result<Self> {
        config.validate()?;
        let output = config.output_dir.clone();
        let created = !output.exists();
        std::fs::create_dir_all(&output).map_err(|e| TrainError::io(&output, e))?;
        let trainer = Self::open(config);
        if trainer.is_err() && created {
            // remove_dir deletes only an empty folder, so nothing written is lost.
            let _ = std::fs::remove_dir(&output);
        }
        trainer
    }

    fn open(config: TrainConfig) -> Result<Self> {
        let checkpoints = config.checkpoint_dir();
        let resume_from = find_resume_point(&config, &checkpoints)?;

        let request: DeviceRequest = config.device.parse()?;
        let device = Device::open(request)?;
        let (model, encoder, backbones, vision_options) = load_models(&config, &device)?;

        let optimizer = AdamWOptimizer::new(model.params(), &config.optimizer)?;
        tracing::info!("{}", optimizer.summary());
        let split = open_split(&config.data, config.seed)?;
        let matcher = split.class_names.as_deref().map(ClassMatcher::new);
        let layout = CaptionLayout::new(&PromptTemplate::new(&config.data.prompt)?);
        let schedule = LrSchedule::new(config.optimizer.lr, &config.schedule, config.steps);
        let flops = FlopModel::new(&model);

        let mut trainer = Self {
            config,
            device,
            model,
            encoder: Arc::new(encoder),
            backbones,
            vision_options,
            optimizer,
            schedule,
            flops,
            layout,
            split: Some(split),
            matcher,
            resumed: None,
        };
        if let Some(folder) = resume_from {
            trainer.restore(&folder)?;
        }
        Ok(trainer)
    }

    /// Returns the model being trained.
    pub fn model(&self) -> &Flamingo {
        &self.model
    }

    /// Returns the frozen vision encoder.
    pub fn encoder(&self) -> &VisionEncoder {
        &self.encoder
    }

    /// Returns the contents of the optimizer.
    pub fn optimizer_summary(&self) -> OptimizerSummary {
        self.optimizer.summary()
    }

    /// Returns the step training starts after: 0, or the resumed checkpoint's step.
    pub fn start_step(&self) -> u64 {
        self.resumed.as_ref().map_or(0, |(_, header)| header.step)
    }

    /// Returns the configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// Loads the connector and optimizer state of a checkpoint folder.
    fn restore(&mut self, folder: &Path) -> Result<()> {
        let header = checkpoint::read_header(folder)?;
        for (role, saved, current) in [
            ("language model", &header.language_model, &self.backbones.language_model),
            ("vision encoder", &header.vision_encoder, &self.backbones.vision_encoder),
        ] {
            if saved.sha256 != current.sha256 {
                return Err(TrainError::checkpoint(
                    folder,
                    format!(
                        "it was trained with the {role} {} (SHA-256 {}), but this run loads {} (SHA-256 {}); resume with the same backbones or start a new run",
                        saved.path.display(),
                        saved.sha256,
                        current.path.display(),
                        current.sha256
                    ),
                ));
            }
        }
        warn_config_changes(&header.config, &self.config);

        self.model.load_connector(folder)?;
        self.optimizer.load(&folder.join(checkpoint::OPTIMIZER_STATE))?;
        tracing::info!("resuming from {} at step {}", folder.display(), header.step);
        self.resumed = Some((folder.to_path_buf(), header));
        Ok(())
    }

    /// Extracts features, trains until `config.steps` or a stop request,
    /// and evaluates; can run once per trainer.
    pub fn run(&mut self, stop: &StopFlag, observer: &mut dyn TrainObserver) -> Result<TrainSummary> {
        let started = Instant::now();
        let split = self.split.take().ok_or_else(|| TrainError::Config("this trainer has already run; build a new one to train again".into()))?;
        let output = self.config.output_dir.clone();
        let checkpoints = self.config.checkpoint_dir();
        checkpoint::remove_partials(&checkpoints)?;
        write_atomically(&output.join("config.toml"), self.config.to_toml_string()?.as_bytes())?;

        let first_step = self.start_step();
        let mut cache = self.open_cache(&split)?;
        let mut extractor = FeatureExtractor::new(self.encoder.clone(), self.device.clone(), self.config.features.batch_size);
        let Some(mut data) = self.prepare_data(split, &mut cache, &mut extractor, stop)? else {
            tracing::info!("stopped during feature extraction; no step was trained");
            let summary = self.summary(SummaryParts { first_step, last_step: first_step, stopped: true, started, ..SummaryParts::new(&extractor) });
            return Ok(summary);
        };
        if let Some((_, header)) = &self.resumed {
            data.stream.restore(&header.cursor)?;
        }

        let metrics_path = output.join("metrics.jsonl");
        let metrics = match first_step {
            0 => MetricsLog::create(&metrics_path)?,
            step => MetricsLog::resume(&metrics_path, step)?,
        };
        let mut run = RunState::new(self, metrics, first_step);
        let mut baseline = None;
        if first_step == 0 && self.config.eval.at_start && data.validation.is_some() && !stop.is_set() {
            let report = self.evaluate(&mut run, &mut data, &mut cache, &mut extractor, true, stop)?;
            observer.on_eval(&report);
            let json = serde_json::to_string_pretty(&report).expect("the report is plain data");
            write_atomically(&output.join("eval-start.json"), json.as_bytes())?;
            baseline = Some(report);
        }
        let outcome = self.train_loop(&mut run, &mut data, &mut cache, &mut extractor, stop, observer);
        run.bar.finish_and_clear();
        if let Err(error) = outcome {
            self.write_plots(&run);
            return Err(error);
        }

        let mut evaluation = None;
        if !run.stopped && !stop.is_set() && data.validation.is_some() {
            let report = self.evaluate(&mut run, &mut data, &mut cache, &mut extractor, true, stop)?;
            observer.on_eval(&report);
            let json = serde_json::to_string_pretty(&report).expect("the report is plain data");
            write_atomically(&output.join("eval.json"), json.as_bytes())?;
            evaluation = Some(report);
        }
        self.write_plots(&run);

        let mut parts = SummaryParts::new(&extractor);
        parts.first_step = first_step;
        parts.last_step = run.step;
        parts.stopped = run.stopped;
        parts.last_loss = run.last_loss;
        parts.last_checkpoint = run.last_good_checkpoint();
        parts.evaluation = evaluation;
        parts.baseline = baseline;
        parts.skips = data.skips.clone();
        parts.left_out = run.unfit;
        parts.train_seconds = run.train_seconds;
        parts.steps_timed = run.steps_timed;
        parts.started = started;
        let summary = self.summary(parts);
        let json = serde_json::to_string_pretty(&summary).expect("the summary is plain data");
        write_atomically(&output.join("summary.json"), json.as_bytes())?;
        tracing::info!(
            "finished at step {} in {:.1} s; bad samples: {}; samples left out for not fitting: {}",
            summary.last_step,
            summary.total_seconds,
            summary.skipped_summary,
            summary.samples_left_out
        );
        Ok(summary)
    }

    fn train_loop(
        &mut self,
        run: &mut RunState,
        data: &mut RunData,
        cache: &mut FeatureCache,
        extractor: &mut FeatureExtractor,
        stop: &StopFlag,
        observer: &mut dyn TrainObserver,
    ) -> Result<()> {
        let steps = self.config.steps;
        if run.step >= steps {
            tracing::info!("the run already reached step {} of {steps}; nothing to train", run.step);
            return Ok(());
        }
        for step in run.step + 1..=steps {
            let record = self.train_step(step, run, data, cache, extractor)?;
            run.metrics.append(MetricsRecord::Step(record.clone()))?;
            observer.on_step(&record, stop);
            run.bar.inc(1);
            run.bar.set_message(format!(
                "loss {:.4} lr {:.2e} {:.0} ms/step {:.1} samples/s",
                record.loss,
                record.lr,
                record.ms,
                record.samples as f64 / (record.ms / 1000.0).max(1e-9)
            ));
            if step.is_multiple_of(self.config.logging.log_every) || step == steps {
                run.log_interval(step, steps);
            }

            let eval_every = self.config.eval.every;
            if eval_every > 0 && step.is_multiple_of(eval_every) && step != steps && data.validation.is_some() {
                let accuracy = self.config.eval.accuracy_every_eval;
                let report = self.evaluate(run, data, cache, extractor, accuracy, stop)?;
                observer.on_eval(&report);
            }

            let every = self.config.checkpoints.every;
            let last = step == steps || stop.is_set();
            if (every > 0 && step.is_multiple_of(every)) || last {
                self.save_checkpoint(run, data, observer)?;
            }
            if stop.is_set() && step != steps {
                tracing::info!("stop requested: stopped after step {step} with a checkpoint");
                run.stopped = true;
                break;
            }
        }
        Ok(())
    }

    /// Runs one optimizer step over `gradient_accumulation` micro-batches.
    fn train_step(&mut self, step: u64, run: &mut RunState, data: &mut RunData, cache: &mut FeatureCache, extractor: &mut FeatureExtractor) -> Result<StepRecord> {
        let started = Instant::now();
        let accumulation = self.config.gradient_accumulation;
        let scale = 1.0 / accumulation as f32;
        self.model.params_mut().zero_grads();

        let (mut loss, mut samples, mut tokens, mut targets, mut flops) = (0.0f32, 0, 0, 0, 0.0);
        let mut data_seconds = 0.0;
        for _ in 0..accumulation {
            let fetch = Instant::now();
            let batch = self.next_batch(run, data, cache, extractor)?;
            data_seconds += fetch.elapsed().as_secs_f64();
            let output = self.model.loss_and_backward(&batch.text, &batch.visual, scale)?;
            cache.clear_transient();
            if !output.loss.is_finite() {
                return Err(TrainError::NonFiniteLoss { step, loss: output.loss, last_checkpoint: run.last_good_checkpoint() });
            }
            loss += output.loss * scale;
            samples += batch.samples;
            tokens += batch.tokens;
            targets += output.tokens;
            flops += self.flops.training_step(&batch.text, batch.visual.shape());
        }

        let grad_norm = AdamWOptimizer::clip_grad_norm(self.model.params_mut(), self.config.optimizer.max_grad_norm)?;
        if !grad_norm.is_finite() {
            return Err(TrainError::NonFiniteGradient { step, norm: grad_norm, last_checkpoint: run.last_good_checkpoint() });
        }
        let lr = self.schedule.lr(step);
        self.optimizer.step(self.model.params_mut(), lr)?;

        let ms = started.elapsed().as_secs_f64() * 1000.0;
        let gates = if step.is_multiple_of(self.config.logging.log_every) || step == self.config.steps { Some(self.gate_records()?) } else { None };
        let record = StepRecord { step, loss, lr, grad_norm, ms, data_ms: data_seconds * 1000.0, samples, tokens, targets, flops, gates };
        run.record_step(&record);
        Ok(record)
    }

    /// Assembles the next `batch_size` samples that fit the model.
    fn next_batch(&mut self, run: &mut RunState, data: &mut RunData, cache: &mut FeatureCache, extractor: &mut FeatureExtractor) -> Result<PreparedBatch> {
        let size = self.config.batch_size;
        let limits = self.model.batch_limits();
        let mut kept: Vec<Sample> = Vec::with_capacity(size);
        let mut tokens = Vec::with_capacity(size);
        let mut unfit_in_a_row = 0u64;
        while kept.len() < size {
            let samples = data.stream.next_batch(size - kept.len())?;
            if !data.train_precomputed {
                extractor.ensure(&samples, cache)?;
            }
            for sample in samples {
                let encoded = run.text.encode(&self.model, &sample.text)?;
                match unfit_reason(&encoded, sample.media.len(), &limits) {
                    Some(reason) => {
                        run.note_unfit(&sample.id, &reason);
                        unfit_in_a_row += 1;
                    }
                    None => {
                        kept.push(sample);
                        tokens.push(encoded);
                        unfit_in_a_row = 0;
                    }
                }
            }
            if unfit_in_a_row >= MAX_UNFIT_IN_A_ROW {
                return Err(TrainError::Config(format!(
                    "{MAX_UNFIT_IN_A_ROW} samples in a row do not fit the model; the first was left out because {}",
                    run.first_unfit.as_deref().unwrap_or("of an unknown reason")
                )));
            }
        }
        let refs: Vec<&Sample> = kept.iter().collect();
        assemble(&self.model, cache, &refs, tokens)
    }

    fn gate_records(&self) -> Result<Vec<GateRecord>> {
        Ok(self.model.gate_values()?.into_iter().map(|g| GateRecord { layer: g.layer, attention: g.attention, feed_forward: g.feed_forward }).collect())
    }

    /// Validation loss (and caption accuracy when asked) on the validation data.
    fn evaluate(
        &mut self,
        run: &mut RunState,
        data: &mut RunData,
        cache: &mut FeatureCache,
        extractor: &mut FeatureExtractor,
        accuracy: bool,
        stop: &StopFlag,
    ) -> Result<EvalReport> {
        let Some((source, precomputed)) = &data.validation else {
            return Err(TrainError::Config("there is no validation data to evaluate".into()));
        };
        let settings = &self.config.eval;
        let options = EvalOptions {
            batch_size: settings.batch_size.unwrap_or(self.config.batch_size),
            max_samples: settings.max_samples,
            accuracy: accuracy && settings.accuracy,
            max_new_tokens: settings.max_new_tokens,
            max_examples: settings.max_examples,
            progress_bar: self.config.logging.progress_bar,
        };
        type Samples = Box<dyn Iterator<Item = std::result::Result<Sample, crate::data::DataError>>>;
        let (mut samples, expected): (Samples, Option<usize>) = match source {
            EvalSource::Indexed(dataset) => {
                (Box::new(Loader::new(dataset.clone(), LoaderConfig { shuffle: false, seed: self.config.seed })?), Some(dataset.len()))
            }
            EvalSource::Shards(shards) => (Box::new(shards.stream(LoaderConfig { shuffle: false, seed: self.config.seed })?), None),
        };
        let mut context = EvalContext {
            model: &self.model,
            cache,
            extractor,
            text: &mut run.text,
            matcher: self.matcher.as_ref(),
            precomputed: *precomputed,
        };
        let report = progress::suspend(&run.bar, || run_evaluation(&mut context, &mut *samples, expected, &options, run.step, stop))?;

        let accuracy = report.accuracy.as_ref().map(|a| a.accuracy);
        let mut line = format!("eval step {}: {} samples", run.step, report.samples);
        if let Some(loss) = report.validation_loss {
            line.push_str(&format!(", validation loss {loss:.4}"));
        }
        if let Some(a) = &report.accuracy {
            line.push_str(&format!(", caption accuracy {:.1} % ({} of {})", 100.0 * a.accuracy, a.correct, a.total));
        }
        line.push_str(&format!(" in {:.1} s", report.seconds));
        progress::log(&run.bar, &line);
        run.metrics.append(MetricsRecord::Eval(EvalRecord { step: run.step, validation_loss: report.validation_loss, accuracy }))?;
        Ok(report)
    }

    /// Writes, publishes and prunes checkpoints after step `run.step`.
    fn save_checkpoint(&mut self, run: &mut RunState, data: &RunData, observer: &mut dyn TrainObserver) -> Result<()> {
        let started = Instant::now();
        let step = run.step;
        let header = CheckpointHeader {
            format_version: HEADER_VERSION,
            step,
            config: self.config.clone(),
            language_model: self.backbones.language_model.clone(),
            vision_encoder: self.backbones.vision_encoder.clone(),
            cursor: data.stream.cursor(),
            optimizer: self.optimizer.summary(),
            samples_seen: run.samples_seen,
            tokens_seen: run.tokens_seen,
            train_seconds: run.train_seconds_total,
            loss: run.last_loss,
        };

        let manifest = ConnectorManifest {
            format_version: MANIFEST_VERSION,
            flamingo: self.model.config.clone(),
            language_model: self.backbones.language_model.clone(),
            vision_encoder: Some(self.backbones.vision_encoder.clone()),
            vision_options: self.vision_options.clone(),
            caption_prompt: Some(self.layout.prefix.clone()),
            step,
        };

        let checkpoints = self.config.checkpoint_dir();
        let staged = checkpoint::stage(&checkpoints, &self.model, &manifest, &self.optimizer, &header)?;
        observer.before_checkpoint_commit(staged.path(), step).map_err(TrainError::Observer)?;
        let path = staged.commit()?;

        for removed in checkpoint::prune(&checkpoints, self.config.checkpoints.keep_last)? {
            tracing::debug!("removed old checkpoint {}", removed.display());
        }
        progress::log(&run.bar, &format!("checkpoint {} written in {:.0} ms", path.display(), started.elapsed().as_secs_f64() * 1000.0));
        run.last_checkpoint = Some(path);
        self.write_plots(run);
        Ok(())
    }

    fn write_plots(&self, run: &RunState) {
        if !self.config.logging.plots {
            return;
        }
        if let Err(error) = write_plots(&self.config.output_dir, run.metrics.history()) {
            tracing::warn!("plots were not written: {error}");
        }
    }

    /// Opens the feature cache the configuration selects.
    fn open_cache(&self, split: &DataSplit) -> Result<FeatureCache> {
        let (tokens, dim) = (self.encoder.num_tokens(), self.encoder.output_dim());
        let (max_images, max_frames) = (self.config.model.max_images, self.config.model.max_frames);
        let frames_of = |source: &crate::config::DataSource, records: Option<usize>| {
            records.map(|n| (n * source.max_frames_per_record(max_images, max_frames)) as u64)
        };
        let train_frames = frames_of(&self.config.data.train, split.train.records());
        let frames = match (&split.validation, &self.config.data.validation) {
            (Some(validation), Some(source)) => train_frames.zip(frames_of(source, validation.records())).map(|(a, b)| a + b),
            (Some(validation), None) => train_frames.zip(frames_of(&self.config.data.train, validation.records())).map(|(a, b)| a + b),
            (None, _) => train_frames,
        };
        let per_frame = (tokens * dim * 2) as u64;
        let identity = FeatureIdentity::new(self.backbones.vision_encoder.clone(), self.vision_options.clone(), tokens, dim);
        FeatureCache::open(&self.config.features, &identity, frames.map(|n| n * per_frame))
    }

    /// Encodes indexed data up front and builds the training stream and
    /// validation source; `None` when a stop request interrupted it.
    fn prepare_data(&self, split: DataSplit, cache: &mut FeatureCache, extractor: &mut FeatureExtractor, stop: &StopFlag) -> Result<Option<RunData>> {
        let precompute = self.config.features.precompute && self.config.features.cache != CacheMode::Off;
        let mut to_encode: Vec<Arc<dyn IndexedDataset>> = Vec::new();
        for source in std::iter::once(&split.train).chain(&split.validation) {
            if let (Source::Indexed(dataset), true) = (source, precompute) {
                to_encode.push(dataset.clone());
            }
        }
        let records: usize = to_encode.iter().map(|d| d.len()).sum();
        if records > 0 {
            let rows = records as u64 * self.config.model.max_frames as u64;
            cache.reserve(rows);
        }
        let bar = progress::bar(records as u64, self.config.logging.progress_bar, progress::EXTRACT_TEMPLATE);
        let mut encoded = Vec::new();
        for dataset in &to_encode {
            match precompute_dataset(dataset, extractor, cache, &bar, stop)? {
                Some(dataset) => encoded.push(dataset),
                None => {
                    bar.finish_and_clear();
                    return Ok(None);
                }
            }
        }
        bar.finish_and_clear();
        let mut encoded = encoded.into_iter();

        let mut skips = Vec::new();
        let loader_config = LoaderConfig { shuffle: self.config.data.shuffle, seed: self.config.seed };
        let (stream, train_precomputed): (Box<dyn SampleStream>, bool) = match split.train {
            Source::Indexed(dataset) => {
                skips.push(dataset.skips().clone());
                let (dataset, precomputed) = match precompute {
                    true => (encoded.next().expect("the training set was encoded first"), true),
                    false => (dataset, false),
                };
                (Box::new(Loader::new(dataset, loader_config)?), precomputed)
            }
            Source::Shards(shards) => {
                skips.push(shards.skips().clone());
                (Box::new(shards.stream(loader_config)?), false)
            }
        };
        let validation = match split.validation {
            Some(Source::Indexed(dataset)) => {
                skips.push(dataset.skips().clone());
                match precompute {
                    true => Some((EvalSource::Indexed(encoded.next().expect("the validation set was encoded second")), true)),
                    false => Some((EvalSource::Indexed(dataset), false)),
                }
            }
            Some(Source::Shards(shards)) => {
                skips.push(shards.skips().clone());
                Some((EvalSource::Shards(shards), false))
            }
            None => None,
        };
        skips.dedup_by(|a, b| Arc::ptr_eq(a, b));
        Ok(Some(RunData { stream, train_precomputed, validation, skips }))
    }

    fn summary(&self, parts: SummaryParts) -> TrainSummary {
        let mut skipped: BTreeMap<SkipReason, u64> = BTreeMap::new();
        let mut summaries = Vec::new();
        for log in &parts.skips {
            for (reason, count) in log.counts() {
                *skipped.entry(reason).or_default() += count;
            }
            if log.total() > 0 {
                summaries.push(log.summary());
            }
        }
        TrainSummary {
            output_dir: self.config.output_dir.clone(),
            first_step: parts.first_step,
            last_step: parts.last_step,
            stopped: parts.stopped,
            last_loss: parts.last_loss,
            last_checkpoint: parts.last_checkpoint,
            evaluation: parts.evaluation,
            baseline: parts.baseline,
            skipped,
            skipped_summary: if summaries.is_empty() { "0 skipped".into() } else { summaries.join("; ") },
            samples_left_out: parts.left_out,
            optimizer: self.optimizer.summary(),
            features: parts.features,
            train_seconds: parts.train_seconds,
            mean_step_ms: (parts.steps_timed > 0).then(|| parts.train_seconds * 1000.0 / parts.steps_timed as f64),
            total_seconds: parts.started.elapsed().as_secs_f64(),
        }
    }
}

/// Encodes one dataset, wrapping the result for the loader.
fn precompute_dataset(
    dataset: &Arc<dyn IndexedDataset>,
    extractor: &mut FeatureExtractor,
    cache: &mut FeatureCache,
    bar: &ProgressBar,
    stop: &StopFlag,
) -> Result<Option<Arc<dyn IndexedDataset>>> {
    Ok(precompute(dataset, extractor, cache, bar, stop)?.map(|encoded| Arc::new(encoded) as Arc<dyn IndexedDataset>))
}

/// The inputs of [`Trainer::summary`].
struct SummaryParts {
    first_step: u64,
    last_step: u64,
    stopped: bool,
    last_loss: Option<f32>,
    last_checkpoint: Option<PathBuf>,
    evaluation: Option<EvalReport>,
    baseline: Option<EvalReport>,
    skips: Vec<Arc<SkipLog>>,
    left_out: u64,
    features: ExtractionStats,
    train_seconds: f64,
    steps_timed: u64,
    started: Instant,
}

impl SummaryParts {
    fn new(extractor: &FeatureExtractor) -> Self {
        Self {
            first_step: 0,
            last_step: 0,
            stopped: false,
            last_loss: None,
            last_checkpoint: None,
            evaluation: None,
            baseline: None,
            skips: Vec::new(),
            left_out: 0,
            features: extractor.stats,
            train_seconds: 0.0,
            steps_timed: 0,
            started: Instant::now(),
        }
    }
}

/// Sums over the steps since the last log line.
#[derive(Default)]
struct Interval {
    steps: u64,
    loss: f64,
    /// Learning rate of the last step.
    lr: f32,
    ms: f64,
    data_ms: f64,
    samples: usize,
    tokens: usize,
    flops: f64,
}

/// The mutable state of a run's loop.
struct RunState {
    /// The last completed step.
    step: u64,
    text: TextEncoder,
    metrics: MetricsLog,
    bar: ProgressBar,
    interval: Interval,
    last_loss: Option<f32>,
    last_checkpoint: Option<PathBuf>,
    /// The checkpoint the run resumed from, until a newer one is written.
    resumed_from: Option<PathBuf>,
    stopped: bool,
    samples_seen: u64,
    tokens_seen: u64,
    train_seconds: f64,
    /// Training seconds including earlier processes of a resumed run.
    train_seconds_total: f64,
    steps_timed: u64,
    unfit: u64,
    first_unfit: Option<String>,
}

impl RunState {
    fn new(trainer: &Trainer, metrics: MetricsLog, first_step: u64) -> Self {
        let config = &trainer.config;
        let bar = progress::bar(config.steps, config.logging.progress_bar, progress::TRAIN_TEMPLATE);
        bar.set_position(first_step.min(config.steps));
        let header = trainer.resumed.as_ref().map(|(_, header)| header);
        Self {
            step: first_step,
            text: TextEncoder::new(trainer.layout.clone()),
            metrics,
            bar,
            interval: Interval::default(),
            last_loss: header.and_then(|h| h.loss),
            last_checkpoint: None,
            resumed_from: trainer.resumed.as_ref().map(|(path, _)| path.clone()),
            stopped: false,
            samples_seen: header.map_or(0, |h| h.samples_seen),
            tokens_seen: header.map_or(0, |h| h.tokens_seen),
            train_seconds: 0.0,
            train_seconds_total: header.map_or(0.0, |h| h.train_seconds),
            steps_timed: 0,
            unfit: 0,
            first_unfit: None,
        }
    }

    fn record_step(&mut self, record: &StepRecord) {
        self.step = record.step;
        self.last_loss = Some(record.loss);
        self.samples_seen += record.samples as u64;
        self.tokens_seen += record.tokens as u64;
        self.train_seconds += record.ms / 1000.0;
        self.train_seconds_total += record.ms / 1000.0;
        self.steps_timed += 1;
        let interval = &mut self.interval;
        interval.steps += 1;
        interval.loss += record.loss as f64;
        interval.ms += record.ms;
        interval.data_ms += record.data_ms;
        interval.samples += record.samples;
        interval.tokens += record.tokens;
        interval.flops += record.flops;
        interval.lr = record.lr;
    }

    /// Logs one line for the steps since the last one.
    fn log_interval(&mut self, step: u64, steps: u64) {
        let interval = std::mem::take(&mut self.interval);
        if interval.steps == 0 {
            return;
        }
        let seconds = (interval.ms / 1000.0).max(1e-9);
        let line = format!(
            "step {step}/{steps} | loss {:.4} | lr {:.2e} | {:.0} ms/step ({:.0} ms data) | {:.1} samples/s | {:.0} tokens/s | {:.1} GFLOP/s",
            interval.loss / interval.steps as f64,
            interval.lr,
            interval.ms / interval.steps as f64,
            interval.data_ms / interval.steps as f64,
            interval.samples as f64 / seconds,
            interval.tokens as f64 / seconds,
            interval.flops / seconds / 1e9,
        );
        progress::log(&self.bar, &line);
    }

    fn note_unfit(&mut self, id: &str, reason: &str) {
        self.unfit += 1;
        self.first_unfit.get_or_insert_with(|| format!("{id}: {reason}"));
        if self.unfit <= UNFIT_WARNINGS {
            progress::log(&self.bar, &format!("left out sample {id}: {reason}"));
        }
        if self.unfit == UNFIT_WARNINGS {
            progress::log(&self.bar, "further samples that do not fit are only counted (see summary.json)");
        }
    }

    fn last_good_checkpoint(&self) -> Option<PathBuf> {
        self.last_checkpoint.clone().or_else(|| self.resumed_from.clone())
    }
}

/// Loads the LM and the vision encoder, hashes both and builds the connector.
fn load_models(config: &TrainConfig, device: &Device) -> Result<(Flamingo, VisionEncoder, Backbones, serde_json::Value)> {
    let model_config = &config.model;
    let started = Instant::now();
    let (lm, tokenizer, special) = LanguageModel::load(device, &model_config.language_model)?;
    let summary = lm.summary().clone();
    tracing::info!(
        "language model {}: {} layers, width {}, vocabulary {}",
        model_config.language_model.display(),
        summary.num_layers,
        summary.hidden_size,
        summary.vocab_size
    );

    let options = VisionOptions { final_layer_norm: model_config.vision_final_layer_norm, include_cls: model_config.vision_include_cls, weight_dtype: None };
    let encoder = VisionEncoder::load(device, &model_config.vision_encoder, options)?;
    tracing::info!(
        "vision encoder {} ({}): {} tokens × {} per image at {}×{}",
        model_config.vision_encoder.display(),
        encoder.name(),
        encoder.num_tokens(),
        encoder.output_dim(),
        encoder.image_size(),
        encoder.image_size()
    );
    let vision_options = serde_json::json!({ "final_layer_norm": options.final_layer_norm, "include_cls": options.include_cls });

    let backbones = Backbones {
        language_model: BackboneIdentity::of(&model_config.language_model)?,
        vision_encoder: BackboneIdentity::of(&model_config.vision_encoder)?,
    };
    let flamingo_config = FlamingoConfig {
        resampler: ResamplerConfig {
            dim: encoder.output_dim(),
            depth: model_config.resampler_depth,
            heads: model_config.resampler_heads,
            dim_head: model_config.resampler_dim_head,
            num_latents: model_config.num_latents,
            ff_mult: model_config.resampler_ff_mult,
            max_num_media: model_config.max_images,
            max_num_frames: model_config.max_frames,
            ..ResamplerConfig::default()
        },
        cross_attn_every_n_layers: model_config.cross_attn_every_n_layers,
        cross_attn_heads: model_config.cross_attn_heads,
        cross_attn_dim_head: model_config.cross_attn_dim_head,
        cross_attn_ff_mult: model_config.cross_attn_ff_mult,
        cross_attn_layout: Default::default(),
    };
    let model = Flamingo::new(lm, tokenizer, special, flamingo_config, config.seed)?;
    tracing::info!(
        "connector: {} trainable elements, cross-attention before LM layers {:?}; backbones loaded and hashed in {:.1} s",
        model.params().num_elements(),
        model.cross_attention_layers(),
        started.elapsed().as_secs_f64()
    );
    Ok((model, encoder, backbones, vision_options))
}

/// Finds the checkpoint to resume from, or `None` for a fresh run. Rejects
/// a fresh run in a folder with checkpoints and a resume without one.
fn find_resume_point(config: &TrainConfig, checkpoints: &Path) -> Result<Option<PathBuf>> {
    let latest = checkpoint::latest(checkpoints)?;
    match (config.resume, latest) {
        (true, Some((_, path))) => Ok(Some(path)),
        (true, None) => Err(TrainError::checkpoint(checkpoints, "there is no checkpoint to resume from; start without --resume, or with `resume = false` in the file")),
        (false, Some((step, _))) => Err(TrainError::checkpoint(
            checkpoints,
            format!(
                "the folder already holds checkpoints up to step {step}; resume that run (--resume, or `resume = true` in the file) or choose another output folder (--out, or `output_dir`)"
            ),
        )),
        (false, None) => Ok(None),
    }
}

/// Warns about configuration fields that differ from the checkpoint's,
/// other than those a resume may change freely.
fn warn_config_changes(saved: &TrainConfig, current: &TrainConfig) {
    const FREE: [&str; 7] = ["resume", "steps", "device", "checkpoints", "logging", "eval", "features"];
    let (Ok(serde_json::Value::Object(saved)), Ok(serde_json::Value::Object(current))) = (serde_json::to_value(saved), serde_json::to_value(current)) else {
        return;
    };
    let changed: Vec<&String> = current.iter().filter(|(key, value)| !FREE.contains(&key.as_str()) && saved.get(*key) != Some(*value)).map(|(key, _)| key).collect();
    if !changed.is_empty() {
        tracing::warn!(
            "the configuration differs from the checkpoint's in {:?}; the resumed run will not match an uninterrupted one",
            changed
        );
    }
}
