//! Reading `TrainConfig` from TOML: defaults, every section, and errors
//! that name the field.

use flamingo_train::{CacheMode, DataFormat, DecayKind, TrainConfig, TrainError};

const MINIMAL: &str = r#"
output_dir = "runs/fashion"

[model]
language_model = "SmolLM2-135M-Instruct.Q4_1.gguf"
vision_encoder = "mobilenetv2.safetensors"

[data.train]
format = "fashion_mnist"
limit_per_class = 1000
"#;

#[test]
fn minimal_file_gets_defaults() {
    let config = TrainConfig::from_toml_str(MINIMAL).unwrap();
    assert_eq!(config.steps, 1000);
    assert_eq!(config.batch_size, 8);
    assert_eq!(config.gradient_accumulation, 1);
    assert_eq!(config.device, "auto");
    assert!(!config.resume);
    assert_eq!(config.model.num_latents, 64);
    assert_eq!(config.model.cross_attn_every_n_layers, 1);
    assert_eq!(config.data.train.format, DataFormat::FashionMnist);
    assert_eq!(config.data.train.limit_per_class, Some(1000));
    assert_eq!(config.data.validation_fraction, 0.05);
    assert_eq!(config.data.prompt, "<image>Output:{caption}<|endofchunk|>");
    assert_eq!(config.data.class_template, "A photo of {article} {class}.");
    assert_eq!(config.optimizer.lr, 1e-4);
    assert_eq!(config.optimizer.weight_decay, 0.1);
    assert_eq!(config.optimizer.max_grad_norm, 1.0);
    assert_eq!(config.optimizer.gate_lr_multiplier, 1.0);
    assert_eq!(config.schedule.decay, DecayKind::Constant);
    assert_eq!(config.features.cache, CacheMode::Auto);
    assert_eq!(config.checkpoints.every, 500);
    assert_eq!(config.checkpoints.keep_last, 3);
    assert_eq!(config.logging.log_every, 10);
    assert_eq!(config.eval.max_new_tokens, 8);
}

#[test]
fn full_file_round_trips() {
    let text = r#"
output_dir = "out"
seed = 7
device = "cpu"
steps = 800
batch_size = 16
gradient_accumulation = 2

[model]
language_model = "lm.gguf"
vision_encoder = "mobilenet.safetensors"
resampler_depth = 1
resampler_ff_mult = 1
cross_attn_every_n_layers = 3
cross_attn_ff_mult = 1

[data]
validation_fraction = 0.0
prompt = "<image>{caption}<|endofchunk|>"

[data.train]
format = "fashion_mnist"
limit_per_class = 1000

[data.validation]
format = "fashion_mnist"
split = "test"
limit_per_class = 50

[optimizer]
lr = 3e-4
weight_decay = 0.01
gate_lr_multiplier = 30.0

[schedule]
warmup_steps = 20
decay = "cosine"
min_lr_ratio = 0.0

[features]
cache = "disk"
dir = "/tmp/features"

[checkpoints]
every = 100
keep_last = 0

[logging]
progress_bar = false

[eval]
every = 100
accuracy_every_eval = true
"#;
    let config = TrainConfig::from_toml_str(text).unwrap();
    assert_eq!(config.model.cross_attn_every_n_layers, 3);
    assert_eq!(config.data.validation.as_ref().unwrap().split.as_deref(), Some("test"));
    assert_eq!(config.optimizer.gate_lr_multiplier, 30.0);
    assert_eq!(config.schedule.decay, DecayKind::Cosine);
    assert_eq!(config.features.cache, CacheMode::Disk);
    assert_eq!(config.samples_per_step(), 32);

    let written = config.to_toml_string().unwrap();
    assert_eq!(TrainConfig::from_toml_str(&written).unwrap(), config, "a written configuration reads back the same");
}

fn error_of(text: &str) -> String {
    TrainConfig::from_toml_str(text).unwrap_err().to_string()
}

#[test]
fn typo_is_rejected() {
    let message = error_of(&MINIMAL.replace("[model]", "[model]\nnum_latent = 32"));
    assert!(message.contains("num_latent"), "{message}");
}

#[test]
fn field_of_another_format_is_rejected() {
    let message = error_of(&MINIMAL.replace("limit_per_class = 1000", "shards = [\"a.tar\"]"));
    assert!(message.contains("`data.train.shards` does not apply to fashion_mnist data, only to webdataset data"), "{message}");
}

#[test]
fn missing_path_is_rejected() {
    let message = error_of(&MINIMAL.replace("format = \"fashion_mnist\"\nlimit_per_class = 1000", "format = \"jsonl\""));
    assert!(message.contains("`data.train.path` is required for jsonl data"), "{message}");
}

#[test]
fn out_of_range_values_name_the_field() {
    let cases = [
        ("batch_size = 0\n", "batch_size"),
        ("steps = 0\n", "steps"),
        ("device = \"tpu\"\n", "device"),
    ];
    for (line, field) in cases {
        let message = error_of(&format!("{line}{MINIMAL}"));
        assert!(message.contains(field), "{line:?}: {message}");
    }
    let message = error_of(&format!("{MINIMAL}\n[optimizer]\nlr = -1.0\n"));
    assert!(message.contains("optimizer.lr"), "{message}");
    let message = error_of(&format!("{MINIMAL}\n[optimizer]\ngate_lr_multiplier = -2.0\n"));
    assert!(message.contains("gate_lr_multiplier"), "{message}");
    let message = error_of(&MINIMAL.replace("[model]", "[model]\nresampler_heads = 0"));
    assert!(message.contains("model.resampler_heads"), "{message}");
    let message = error_of(&format!("{MINIMAL}\n[data]\nprompt = \"Output:{{caption}}\"\n"));
    assert!(message.contains("template"), "{message}");
}

#[test]
fn video_frames_must_fit_the_resampler() {
    let text = MINIMAL.replace("format = \"fashion_mnist\"\nlimit_per_class = 1000", "format = \"video\"\npath = \"clips.jsonl\"\nframes = 4");
    let message = error_of(&text);
    assert!(message.contains("model.max_frames"), "{message}");
}

#[test]
fn file_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("train.toml");
    std::fs::write(&path, "output_dir = 3\n").unwrap();
    let message = TrainConfig::from_toml_file(&path).unwrap_err().to_string();
    assert!(message.contains("train.toml"), "{message}");
    let message = TrainConfig::from_toml_file(dir.path().join("absent.toml")).unwrap_err().to_string();
    assert!(message.contains("absent.toml"), "{message}");

    std::fs::write(&path, format!("steps = 0\n{MINIMAL}")).unwrap();
    let message = TrainConfig::from_toml_file(&path).unwrap_err().to_string();
    assert!(message.contains("train.toml: `steps` must be at least 1"), "an invalid value names the file and the key: {message}");
}

#[test]
fn invalid_values_carry_their_key() {
    let config = TrainConfig::from_toml_str(MINIMAL).unwrap();
    let mut invalid = config.clone();
    invalid.optimizer.lr = -1.0;
    match invalid.validate().unwrap_err() {
        TrainError::Field { key, problem } => {
            assert_eq!(key, "optimizer.lr");
            assert!(problem.starts_with("is -1"), "{problem}");
        }
        other => panic!("expected a field error, got {other}"),
    }
    let mut invalid = config;
    invalid.data.train.limit_per_class = Some(0);
    match invalid.validate().unwrap_err() {
        TrainError::Field { key, .. } => assert_eq!(key, "data.train.limit_per_class"),
        other => panic!("expected a field error, got {other}"),
    }
}
