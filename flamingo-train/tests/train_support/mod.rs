//! Shared helpers of the training tests: fixture paths, generated image
//! sets and a small configuration around the tiny fixture models.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use flamingo_train::{DataConfig, DataFormat, DataSource, ModelConfig, StepRecord, StopFlag, TrainConfig, TrainObserver};
use image::{Rgb, RgbImage};

/// Colours of the generated images and the word each caption uses.
pub const COLOURS: [(&str, [u8; 3]); 4] = [("red", [220, 30, 30]), ("green", [30, 200, 40]), ("blue", [30, 40, 220]), ("yellow", [230, 220, 20])];

pub fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures").join(path)
}

pub fn tiny_llama() -> PathBuf {
    fixture("lm/tiny_llama")
}

pub fn tiny_clip() -> PathBuf {
    fixture("vision/tiny_clip")
}

/// Draws a 30×30 image of one colour with seeded noise, so no two are identical.
pub fn colour_image(colour: [u8; 3], seed: u64) -> RgbImage {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(7);
    RgbImage::from_fn(30, 30, |_, _| {
        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        let noise = ((state >> 59) as i16) - 16;
        Rgb(colour.map(|c| (c as i16 + noise).clamp(0, 255) as u8))
    })
}

/// Writes `count` PNGs cycling through the colours and a JSONL manifest
/// whose caption names each image's colour; returns the manifest.
pub fn write_colour_dataset(dir: &Path, count: usize) -> PathBuf {
    std::fs::create_dir_all(dir.join("images")).unwrap();
    let mut lines = String::new();
    for i in 0..count {
        let (name, colour) = COLOURS[i % COLOURS.len()];
        let file = format!("images/{i:03}.png");
        colour_image(colour, i as u64).save(dir.join(&file)).unwrap();
        lines.push_str(&format!("{{\"image\": \"{file}\", \"text\": \"a {name} square\"}}\n"));
    }
    let manifest = dir.join("pairs.jsonl");
    std::fs::write(&manifest, lines).unwrap();
    manifest
}

/// Configures a small connector around the tiny fixtures, trained on
/// `manifest` (JSONL pairs) for a few dozen steps without console output.
pub fn tiny_config(output: &Path, manifest: &Path) -> TrainConfig {
    let mut model = ModelConfig::new(tiny_llama(), tiny_clip());
    model.resampler_depth = 1;
    model.resampler_heads = 2;
    model.resampler_dim_head = 8;
    model.num_latents = 4;
    model.resampler_ff_mult = 1;
    model.cross_attn_heads = 2;
    model.cross_attn_dim_head = 8;
    model.cross_attn_ff_mult = 1;

    let mut data = DataConfig::new(DataSource::with_path(DataFormat::Jsonl, manifest));
    data.validation_fraction = 0.2;
    let mut config = TrainConfig::new(output, model, data);
    config.device = "cpu".into();
    config.steps = 30;
    config.batch_size = 4;
    config.seed = 3;
    config.optimizer.lr = 1e-2;
    config.optimizer.gate_lr_multiplier = 10.0;
    config.optimizer.weight_decay = 0.01;
    config.checkpoints.every = 10;
    config.checkpoints.keep_last = 2;
    config.logging.log_every = 5;
    config.logging.progress_bar = false;
    config.features.dir = Some(output.join("feature-cache"));
    config.eval.max_new_tokens = 4;
    config
}

/// Reads the losses of a metrics file, by step.
pub fn losses(metrics: &Path) -> Vec<(u64, f32)> {
    flamingo_train::metrics::read_metrics(metrics)
        .unwrap()
        .into_iter()
        .filter_map(|record| match record {
            flamingo_train::MetricsRecord::Step(step) => Some((step.step, step.loss)),
            flamingo_train::MetricsRecord::Eval(_) => None,
        })
        .collect()
}

/// Sends `tracing` output to the test's captured output once.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt().with_test_writer().with_env_filter("info").try_init();
}

/// An observer that sets the stop flag after step `.0`.
pub struct StopAt(pub u64);

impl TrainObserver for StopAt {
    fn on_step(&mut self, record: &StepRecord, stop: &StopFlag) {
        if record.step == self.0 {
            stop.request_stop();
        }
    }
}
