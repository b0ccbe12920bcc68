//! `flamingo train`: train a connector from a TOML config file, from flags,
//! or from a file with some of its values replaced by flags.

use std::path::{Path, PathBuf};

use anyhow::Context;
use flamingo_train::data::VideoConfig;
use flamingo_train::{train, DataConfig, DataFormat, DataSource, ModelConfig, StopFlag, TrainConfig, TrainError};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A TOML training config; the flags below replace its values.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Folder for checkpoints, metrics.jsonl, plots and eval.json.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run whose latest checkpoint is in --out.
    #[arg(long)]
    resume: bool,
    /// The frozen language model: a Hugging Face folder or a .gguf file.
    #[arg(long)]
    lm: Option<PathBuf>,
    /// The frozen vision encoder: a Hugging Face CLIP/SigLIP folder or a
    /// MobileNetV2 safetensors file.
    #[arg(long)]
    vision: Option<PathBuf>,
    /// Layout of the training data: jsonl, csv, webdataset, interleaved,
    /// video, idx or fashion-mnist.
    #[arg(long, value_parser = parse_format)]
    data_format: Option<DataFormat>,
    /// Training data: a manifest file, an IDX image file, the Fashion-MNIST
    /// folder, or (webdataset, repeatable) shard paths and brace patterns.
    #[arg(long = "data")]
    data: Vec<String>,
    /// Validation data, in the same layout as the training data. Without
    /// it, a fraction of the training data is held out.
    #[arg(long)]
    val_data: Option<String>,
    /// Use at most this many records of each class (idx, fashion-mnist).
    #[arg(long)]
    limit_per_class: Option<usize>,
    /// Optimizer steps in total, counting those before a resume.
    #[arg(long)]
    steps: Option<u64>,
    /// Samples per micro-batch.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Peak learning rate (AdamW).
    #[arg(long, allow_negative_numbers = true)]
    lr: Option<f32>,
    /// Seed of the initialisation, data order and validation split.
    #[arg(long)]
    seed: Option<u64>,
    /// Steps between checkpoints; 0 writes one only at the end.
    #[arg(long)]
    checkpoint_every: Option<u64>,
    /// Do not draw progress bars; log lines only.
    #[arg(long)]
    no_progress: bool,
}

/// Reads a data format name; `fashion-mnist` and `fashion_mnist` both work.
pub fn parse_format(text: &str) -> Result<DataFormat, String> {
    let normalised = text.replace('-', "_");
    serde_json::from_value(serde_json::Value::String(normalised))
        .map_err(|_| format!("unknown data format {text:?}; expected jsonl, csv, webdataset, interleaved, video, idx or fashion-mnist"))
}

/// Builds a data source of `format` from a command-line path or pattern.
pub fn source_from_flag(format: DataFormat, location: Option<&str>, patterns: &[String]) -> DataSource {
    let mut source = DataSource::new(format);
    set_location(&mut source, location, patterns);
    source
}

/// Points `source` at a command-line path or pattern, keeping its other fields.
fn set_location(source: &mut DataSource, location: Option<&str>, patterns: &[String]) {
    match source.format {
        DataFormat::Webdataset => source.shards = patterns.to_vec(),
        _ => source.path = location.map(PathBuf::from),
    }
}

/// The configuration keys that `flamingo train` flags set, with their flags.
const TRAIN_FLAGS: [(&str, &str); 17] = [
    ("output_dir", "--out"),
    ("resume", "--resume"),
    ("device", "--device"),
    ("model.language_model", "--lm"),
    ("model.vision_encoder", "--vision"),
    ("data.train.format", "--data-format"),
    ("data.train.path", "--data"),
    ("data.train.shards", "--data"),
    ("data.train.limit_per_class", "--limit-per-class"),
    ("data.validation.path", "--val-data"),
    ("data.validation.shards", "--val-data"),
    ("steps", "--steps"),
    ("batch_size", "--batch-size"),
    ("optimizer.lr", "--lr"),
    ("seed", "--seed"),
    ("checkpoints.every", "--checkpoint-every"),
    ("logging.progress_bar", "--no-progress"),
];

/// Rewrites a configuration error so that it names what the user typed.
/// That is the flag when `from_flags` lists the key, else the key and the
/// `--config` file. Without a file, the message explains how to set a key
/// that no flag sets.
pub fn name_the_source(error: TrainError, from_flags: &[(&str, &str)], file: Option<&Path>) -> anyhow::Error {
    let TrainError::Field { key, problem } = error else {
        return error.into();
    };
    if let Some((_, flag)) = from_flags.iter().find(|(flagged, _)| *flagged == key) {
        return anyhow::anyhow!("{flag} {problem}");
    }
    match file {
        Some(file) => anyhow::anyhow!("{}: `{key}` {problem}", file.display()),
        None => anyhow::anyhow!("`{key}` {problem}; no flag sets `{key}`, so write it in a TOML file and pass that with --config"),
    }
}

/// The configuration the file and the flags describe together.
fn build_config(device: &str, args: &Args) -> anyhow::Result<TrainConfig> {
    let mut config = match &args.config {
        Some(path) => TrainConfig::parse_toml_file(path)?,
        None => {
            let missing: Vec<&str> = [
                ("--out", args.out.is_none()),
                ("--lm", args.lm.is_none()),
                ("--vision", args.vision.is_none()),
                ("--data-format", args.data_format.is_none()),
            ]
            .into_iter()
            .filter_map(|(flag, absent)| absent.then_some(flag))
            .collect();
            if !missing.is_empty() {
                anyhow::bail!("without --config, train needs {}; see `flamingo train --help`", missing.join(", "));
            }
            let format = args.data_format.expect("checked above");
            let train = source_from_flag(format, args.data.first().map(String::as_str), &args.data);
            let mut model = ModelConfig::new(args.lm.clone().expect("checked above"), args.vision.clone().expect("checked above"));
            // Each frame position has its own learned embedding, so the model
            // takes as many frames per clip as the video source samples.
            if format == DataFormat::Video {
                model.max_frames = train.frames.unwrap_or(VideoConfig::DEFAULT_FRAMES);
            }
            TrainConfig::new(args.out.clone().expect("checked above"), model, DataConfig::new(train))
        }
    };

    // Without a file, each value a flag can set came from that flag or is a
    // default that is valid on its own, so an invalid one is the flag's.
    let mut from_flags: Vec<(&str, &str)> = Vec::new();
    let mut mark_from_flag = |key: &str| {
        if let Some(entry) = TRAIN_FLAGS.iter().find(|(flagged, _)| *flagged == key) {
            from_flags.push(*entry);
        }
    };
    if args.config.is_none() {
        TRAIN_FLAGS.iter().for_each(|(key, _)| mark_from_flag(*key));
    }

    if let Some(out) = &args.out {
        config.output_dir = out.clone();
        mark_from_flag("output_dir");
    }
    if let Some(lm) = &args.lm {
        config.model.language_model = lm.clone();
        mark_from_flag("model.language_model");
    }
    if let Some(vision) = &args.vision {
        config.model.vision_encoder = vision.clone();
        mark_from_flag("model.vision_encoder");
    }
    if args.config.is_some() {
        let location = args.data.first().map(String::as_str);
        match args.data_format {
            // Another format reads other fields, so the file's source is replaced whole.
            Some(format) if format != config.data.train.format => {
                config.data.train = source_from_flag(format, location, &args.data);
                ["data.train.format", "data.train.path", "data.train.shards"].into_iter().for_each(&mut mark_from_flag);
            }
            _ if !args.data.is_empty() => {
                set_location(&mut config.data.train, location, &args.data);
                ["data.train.path", "data.train.shards"].into_iter().for_each(&mut mark_from_flag);
            }
            _ => {}
        }
    }
    if args.data.len() > 1 && config.data.train.format != DataFormat::Webdataset {
        anyhow::bail!("--data is given {} times, but only webdataset takes several paths", args.data.len());
    }
    if let Some(val) = &args.val_data {
        let format = config.data.train.format;
        config.data.validation = Some(source_from_flag(format, Some(val), std::slice::from_ref(val)));
        ["data.validation.path", "data.validation.shards"].into_iter().for_each(&mut mark_from_flag);
    }
    if let Some(limit) = args.limit_per_class {
        config.data.train.limit_per_class = Some(limit);
        mark_from_flag("data.train.limit_per_class");
    }
    if args.resume {
        config.resume = true;
    }
    if device != "auto" {
        config.device = device.to_string();
        mark_from_flag("device");
    }
    if let Some(steps) = args.steps {
        config.steps = steps;
        mark_from_flag("steps");
    }
    if let Some(batch_size) = args.batch_size {
        config.batch_size = batch_size;
        mark_from_flag("batch_size");
    }
    if let Some(lr) = args.lr {
        config.optimizer.lr = lr;
        mark_from_flag("optimizer.lr");
    }
    if let Some(seed) = args.seed {
        config.seed = seed;
    }
    if let Some(every) = args.checkpoint_every {
        config.checkpoints.every = every;
    }
    if args.no_progress {
        config.logging.progress_bar = false;
    }
    config.validate().map_err(|error| name_the_source(error, &from_flags, args.config.as_deref()))?;
    Ok(config)
}

/// Sets `stop` on the first Ctrl-C, so the run saves a checkpoint and
/// returns; a second Ctrl-C ends the process at once.
pub fn stop_on_ctrl_c(stop: &StopFlag) -> anyhow::Result<()> {
    let stop = stop.clone();
    ctrlc::set_handler(move || {
        if stop.is_set() {
            eprintln!("second interrupt: exiting without a checkpoint");
            std::process::exit(130);
        }
        eprintln!("interrupt: finishing the current step and writing a checkpoint (Ctrl-C again to quit at once)");
        stop.request_stop();
    })
    .context("cannot install the Ctrl-C handler")
}

pub fn run(device: &str, args: Args) -> anyhow::Result<()> {
    let config = build_config(device, &args)?;
    let stop = StopFlag::new();
    stop_on_ctrl_c(&stop)?;

    let summary = train(config, &stop)?;
    let mut line = format!("trained to step {} in {:.1} s", summary.last_step, summary.total_seconds);
    if let Some(loss) = summary.last_loss {
        line.push_str(&format!("; last loss {loss:.4}"));
    }
    if let Some(report) = &summary.evaluation {
        if let Some(loss) = report.validation_loss {
            line.push_str(&format!("; validation loss {loss:.4}"));
        }
        if let Some(accuracy) = &report.accuracy {
            line.push_str(&format!("; caption accuracy {:.1} % ({} of {})", 100.0 * accuracy.accuracy, accuracy.correct, accuracy.total));
        }
    }
    if let Some(checkpoint) = &summary.last_checkpoint {
        line.push_str(&format!("; checkpoint {}", checkpoint.display()));
    }
    if summary.stopped {
        line.push_str("; stopped early, continue with --resume");
    }
    eprintln!("{line}");
    Ok(())
}
