//! Metrics of a run as JSON lines, one per optimizer step and one per
//! evaluation, kept in memory too for plots.
//!
//! On resume the file is cut back to the checkpoint's step, so that steps
//! the interrupted run did after its last checkpoint, and which the resumed
//! run repeats, appear once.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// The tanh of one block's gates.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GateRecord {
    /// The LM layer the block runs before.
    pub layer: usize,
    pub attention: f32,
    pub feed_forward: f32,
}

/// One optimizer step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: u64,
    /// Mean cross-entropy over the step's caption tokens (the mean of the
    /// micro-batch means).
    pub loss: f32,
    /// Base learning rate of the step, before group multipliers.
    pub lr: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
    /// Wall-clock milliseconds of the step, data included.
    pub ms: f64,
    /// Milliseconds of the step spent preparing batches (reading samples,
    /// tokenizing, gathering cached features, encoding uncached images).
    #[serde(default)]
    pub data_ms: f64,
    pub samples: usize,
    /// Real (unpadded) tokens.
    pub tokens: usize,
    /// Tokens the loss covers.
    pub targets: usize,
    /// Estimated floating-point operations (see the `flops` module).
    pub flops: f64,
    /// tanh of every gate; present every `logging.log_every` steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gates: Option<Vec<GateRecord>>,
}

/// One evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    pub step: u64,
    pub validation_loss: Option<f32>,
    pub accuracy: Option<f64>,
}

/// A line of the metrics file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MetricsRecord {
    Step(StepRecord),
    Eval(EvalRecord),
}

impl MetricsRecord {
    pub fn step(&self) -> u64 {
        match self {
            MetricsRecord::Step(record) => record.step,
            MetricsRecord::Eval(record) => record.step,
        }
    }
}

/// The metrics file and its records so far.
pub struct MetricsLog {
    path: PathBuf,
    file: BufWriter<File>,
    history: Vec<MetricsRecord>,
}

impl MetricsLog {
    /// Starts a new file at `path`, replacing an old one.
    pub fn create(path: &Path) -> Result<Self> {
        let file = File::create(path).map_err(|e| TrainError::io(path, e))?;
        Ok(Self { path: path.to_path_buf(), file: BufWriter::new(file), history: Vec::new() })
    }

    /// Reopens the file of a resumed run, keeping the records up to `step`.
    pub fn resume(path: &Path, step: u64) -> Result<Self> {
        let history = match File::open(path) {
            Ok(file) => read_records(BufReader::new(file), path)?.into_iter().filter(|record| record.step() <= step).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(TrainError::io(path, e)),
        };
        let mut text = String::new();
        for record in &history {
            text.push_str(&serde_json::to_string(record).expect("metrics are plain data"));
            text.push('\n');
        }
        flamingo_model::flamingo::checkpoint::write_atomically(path, text.as_bytes())?;
        let file = OpenOptions::new().append(true).open(path).map_err(|e| TrainError::io(path, e))?;
        Ok(Self { path: path.to_path_buf(), file: BufWriter::new(file), history })
    }

    /// Appends a record and flushes it, so that a crash loses none.
    pub fn append(&mut self, record: MetricsRecord) -> Result<()> {
        let line = serde_json::to_string(&record).expect("metrics are plain data");
        writeln!(self.file, "{line}").and_then(|_| self.file.flush()).map_err(|e| TrainError::io(&self.path, e))?;
        self.history.push(record);
        Ok(())
    }

    /// Returns every record so far, oldest first.
    pub fn history(&self) -> &[MetricsRecord] {
        &self.history
    }

    /// Returns the file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads a metrics file, skipping a torn last line.
pub fn read_metrics(path: &Path) -> Result<Vec<MetricsRecord>> {
    let file = File::open(path).map_err(|e| TrainError::io(path, e))?;
    read_records(BufReader::new(file), path)
}

fn read_records(reader: impl BufRead, path: &Path) -> Result<Vec<MetricsRecord>> {
    let mut records = Vec::new();
    let lines: Vec<String> = reader.lines().collect::<std::io::Result<_>>().map_err(|e| TrainError::io(path, e))?;
    let count = lines.len();
    for (number, line) in lines.into_iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(&line) {
            Ok(record) => records.push(record),
            // A crash can cut the last line short; any other bad line is an error.
            Err(_) if number + 1 == count => tracing::warn!("{}: ignoring a torn last line", path.display()),
            Err(e) => return Err(TrainError::Config(format!("{}:{}: invalid metrics line: {e}", path.display(), number + 1))),
        }
    }
    Ok(records)
}
