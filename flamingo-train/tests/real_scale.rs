//! The demo's setup at a small size: SmolLM2-135M (GGUF) and the nsfwjs
//! MobileNetV2 on Fashion-MNIST, on the CPU backend. It measures feature
//! extraction and step times rather than checking accuracy.
//!
//! It needs `scripts/fetch-assets.sh --only smollm2 --only nsfwjs --only
//! fashion-mnist` and is ignored by default because it takes minutes:
//!
//! ```sh
//! cargo test -p flamingo-train --test real_scale -- --ignored --nocapture
//! ```
//!
//! `FLAMINGO_REAL_PER_CLASS` (default 20 training images per class) and
//! `FLAMINGO_REAL_STEPS` (default 4) size the run.

use std::path::PathBuf;

use flamingo_model::convert::nsfwjs::convert_nsfwjs_mobilenet_v2;
use flamingo_train::config::default_cache_root;
use flamingo_train::{train, DataConfig, DataFormat, DataSource, ModelConfig, StopFlag, TrainConfig};

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Returns the cached asset at `relative`, or `None` with a message when absent.
fn asset(relative: &str) -> Option<PathBuf> {
    let path = default_cache_root()?.join(relative);
    if path.exists() {
        return Some(path);
    }
    eprintln!("skipped: {} is missing; run scripts/fetch-assets.sh", path.display());
    None
}

#[test]
#[ignore = "needs the fetched SmolLM2, nsfwjs and Fashion-MNIST assets and takes minutes"]
fn fashion_mnist_with_smollm2_and_mobilenet() {
    let _ = tracing_subscriber::fmt().with_env_filter("info").try_init();
    let (Some(lm), Some(nsfwjs), Some(_)) =
        (asset("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"), asset("nsfwjs/mobilenet_v2"), asset("fashion-mnist/train-images-idx3-ubyte.gz"))
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let encoder = dir.path().join("mobilenetv2_nsfwjs.safetensors");
    convert_nsfwjs_mobilenet_v2(&nsfwjs, &encoder, false).unwrap();

    // The reference setup: resampler depth 1, FF multiplier 1, a block
    // before every third LM layer, 64 latents, 8 heads of 64.
    let mut model = ModelConfig::new(lm, encoder);
    model.resampler_depth = 1;
    model.resampler_ff_mult = 1;
    model.cross_attn_every_n_layers = 3;
    model.cross_attn_ff_mult = 1;

    let mut train_source = DataSource::new(DataFormat::FashionMnist);
    train_source.limit_per_class = Some(env_number("FLAMINGO_REAL_PER_CLASS", 20));
    let mut test_source = DataSource::new(DataFormat::FashionMnist);
    test_source.split = Some("test".into());
    test_source.limit_per_class = Some(2);
    let mut data = DataConfig::new(train_source);
    data.validation = Some(test_source);
    data.prompt = "<image>{caption}<|endofchunk|>".into();

    let mut config = TrainConfig::new(dir.path().join("run"), model, data);
    config.device = "cpu".into();
    config.steps = env_number("FLAMINGO_REAL_STEPS", 4) as u64;
    config.batch_size = 16;
    config.optimizer.lr = 3e-4;
    config.optimizer.weight_decay = 0.01;
    config.schedule.warmup_steps = 20;
    config.logging.log_every = 1;
    config.logging.progress_bar = false;
    config.features.cache = flamingo_train::CacheMode::Memory;
    config.eval.max_new_tokens = 8;
    config.eval.batch_size = Some(20);

    let summary = train(config, &StopFlag::new()).unwrap();
    let evaluation = summary.evaluation.as_ref().unwrap();
    eprintln!(
        "features: {} images in {:.1} s ({:.1} images/s); steps: {} at {:.0} ms mean; evaluation of {} images: {:.1} s, {:.1} s of it generating; total {:.1} s",
        summary.features.frames_encoded,
        summary.features.seconds,
        summary.features.frames_per_second(),
        summary.last_step,
        summary.mean_step_ms.unwrap_or(0.0),
        evaluation.samples,
        evaluation.seconds,
        evaluation.accuracy.as_ref().map_or(0.0, |a| a.generation_seconds),
        summary.total_seconds
    );
    assert_eq!(evaluation.accuracy.as_ref().unwrap().total, 20);
}
