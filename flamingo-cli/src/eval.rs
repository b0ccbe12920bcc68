//! `flamingo eval`: validation loss and caption accuracy of a connector
//! checkpoint, printed and written as a JSON report.

use std::path::PathBuf;

use flamingo_train::accuracy::Verdict;
use flamingo_train::{evaluate, DataFormat, EvalReport, EvaluateConfig, StopFlag};

use crate::train::{name_the_source, parse_format, source_from_flag, stop_on_ctrl_c};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The checkpoint folder, with connector.json and connector.safetensors.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Layout of the data: jsonl, csv, webdataset, interleaved, video, idx
    /// or fashion-mnist.
    #[arg(long, value_parser = parse_format)]
    data_format: DataFormat,
    /// The data: a manifest file, an IDX image file, the Fashion-MNIST
    /// folder (default: the fetched one), or (webdataset, repeatable) shards.
    #[arg(long = "data")]
    data: Vec<String>,
    /// IDX label file (idx).
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Class names by label, comma-separated (idx; fashion-mnist has its own).
    #[arg(long, value_delimiter = ',')]
    class_names: Vec<String>,
    /// train or test (fashion-mnist).
    #[arg(long, default_value = "test")]
    split: String,
    /// Use at most this many records of each class (idx, fashion-mnist).
    #[arg(long)]
    limit_per_class: Option<usize>,
    /// The frozen language model; default: the one the checkpoint records.
    #[arg(long)]
    lm: Option<PathBuf>,
    /// The frozen vision encoder; default: the one the checkpoint records.
    #[arg(long)]
    vision: Option<PathBuf>,
    /// Tokens generated per caption when measuring accuracy.
    #[arg(long, default_value_t = 8)]
    max_new_tokens: usize,
    /// Samples per batch (at least 1).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
    batch_size: u64,
    /// Measure only the validation loss, not caption accuracy.
    #[arg(long)]
    no_accuracy: bool,
    /// Where to write the JSON report.
    #[arg(long, default_value = "eval.json")]
    report: PathBuf,
    /// Do not draw progress bars.
    #[arg(long)]
    no_progress: bool,
}

/// The data source keys that `flamingo eval` flags set, with their flags.
const EVAL_FLAGS: [(&str, &str); 7] = [
    ("data.evaluation.format", "--data-format"),
    ("data.evaluation.path", "--data"),
    ("data.evaluation.shards", "--data"),
    ("data.evaluation.labels", "--labels"),
    ("data.evaluation.class_names", "--class-names"),
    ("data.evaluation.split", "--split"),
    ("data.evaluation.limit_per_class", "--limit-per-class"),
];

pub fn run(device: &str, args: Args) -> anyhow::Result<()> {
    if args.data.len() > 1 && args.data_format != DataFormat::Webdataset {
        anyhow::bail!("--data is given {} times, but only webdataset takes several paths", args.data.len());
    }
    let mut data = source_from_flag(args.data_format, args.data.first().map(String::as_str), &args.data);
    data.labels = args.labels.clone();
    if !args.class_names.is_empty() {
        data.class_names = Some(args.class_names.clone());
    }
    if args.data_format == DataFormat::FashionMnist {
        data.split = Some(args.split.clone());
    }
    data.limit_per_class = args.limit_per_class;
    data.validate("evaluation").map_err(|error| name_the_source(error, &EVAL_FLAGS, None))?;

    let mut config = EvaluateConfig::new(&args.checkpoint, data);
    config.language_model = args.lm.clone();
    config.vision_encoder = args.vision.clone();
    config.device = device.to_string();
    config.eval.max_new_tokens = args.max_new_tokens;
    config.eval.batch_size = Some(args.batch_size as usize);
    config.eval.accuracy = !args.no_accuracy;
    config.report = Some(args.report.clone());
    config.progress_bar = !args.no_progress;

    let stop = StopFlag::new();
    stop_on_ctrl_c(&stop)?;
    let report = evaluate(&config, &stop)?;
    print_report(&report);
    eprintln!("report written to {}", args.report.display());
    Ok(())
}

/// Prints the report's figures and a few predictions.
fn print_report(report: &EvalReport) {
    println!("checkpoint step {}: {} samples in {:.1} s", report.step, report.samples, report.seconds);
    if let Some(loss) = report.validation_loss {
        println!("validation loss {loss:.4} over {} caption tokens", report.validation_tokens);
    }
    if let Some(accuracy) = &report.accuracy {
        println!(
            "caption accuracy {:.1} % ({} of {}); wrong class {}, no class {}, several classes {}",
            100.0 * accuracy.accuracy,
            accuracy.correct,
            accuracy.total,
            accuracy.wrong_class,
            accuracy.no_class,
            accuracy.several_classes
        );
        for example in accuracy.examples.iter().take(5) {
            let verdict = if example.verdict == Verdict::Correct { "right" } else { "wrong" };
            println!("  {} ({}): {:?} [{verdict}]", example.id, example.class, example.text);
        }
    }
}
