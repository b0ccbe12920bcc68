//! Bad samples through `train`: single bad samples are skipped and
//! counted, a dataset without one usable sample fails with a clear message.

mod train_support;

use std::path::Path;

use flamingo_train::data::SkipReason;
use flamingo_train::{train, StopFlag};
use train_support::*;

/// Appends JSONL lines to a manifest.
fn append(manifest: &Path, lines: &str) {
    let mut text = std::fs::read_to_string(manifest).unwrap();
    text.push_str(lines);
    std::fs::write(manifest, text).unwrap();
}

#[test]
fn bad_samples_are_counted_not_fatal() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let manifest = write_colour_dataset(&data, 10);
    std::fs::write(data.join("images/broken.png"), b"this is not a PNG file").unwrap();
    append(
        &manifest,
        concat!(
            "{\"image\": \"images/missing.png\", \"text\": \"a red square\"}\n",
            "{\"image\": \"images/broken.png\", \"text\": \"a blue square\"}\n",
            "{\"image\": \"images/000.png\", \"text\": \"   \"}\n",
        ),
    );

    let mut config = tiny_config(&dir.path().join("run"), &manifest);
    config.steps = 8;
    config.data.validation_fraction = 0.0;
    let summary = train(config, &StopFlag::new()).unwrap();

    assert_eq!(summary.last_step, 8, "bad samples must not stop the run");
    assert_eq!(summary.skipped.get(&SkipReason::MissingFile), Some(&1), "{}", summary.skipped_summary);
    assert_eq!(summary.skipped.get(&SkipReason::EmptyCaption), Some(&1), "{}", summary.skipped_summary);
    // The broken image is counted at every visit: 8 steps × 4 samples cross
    // the 11 usable records about three times.
    let undecodable = summary.skipped.get(&SkipReason::UndecodableImage).copied().unwrap_or(0);
    assert!(undecodable >= 2, "the undecodable image is skipped once per epoch: {}", summary.skipped_summary);
    assert!(summary.skipped_summary.contains("undecodable image"), "{}", summary.skipped_summary);

    let written: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("run/summary.json")).unwrap()).unwrap();
    assert_eq!(written["skipped"]["missing_file"], 1, "summary.json reports the counts by reason");
}

#[test]
fn dataset_of_broken_images_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut lines = String::new();
    for i in 0..3 {
        std::fs::write(data.join(format!("{i}.png")), b"garbage").unwrap();
        lines.push_str(&format!("{{\"image\": \"{i}.png\", \"text\": \"a square\"}}\n"));
    }
    let manifest = data.join("pairs.jsonl");
    std::fs::write(&manifest, lines).unwrap();

    let mut config = tiny_config(&dir.path().join("run"), &manifest);
    config.data.validation_fraction = 0.0;
    let error = train(config, &StopFlag::new()).unwrap_err();
    let message = error.to_string();
    assert!(message.contains("no usable samples"), "{message}");
    assert!(message.contains("every one of 3 records failed to decode"), "{message}");
    assert!(message.contains("undecodable image"), "the message names the first failure: {message}");
    assert!(dir.path().join("run/config.toml").is_file(), "the run got as far as writing its configuration");
    assert!(!dir.path().join("run/checkpoints").exists(), "a run that fails before its first checkpoint leaves no checkpoints folder");
}

#[test]
fn dataset_of_missing_files_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("pairs.jsonl");
    std::fs::write(&manifest, "{\"image\": \"nowhere.png\", \"text\": \"a square\"}\n{\"image\": \"gone.png\", \"text\": \"a dot\"}\n").unwrap();

    let config = tiny_config(&dir.path().join("run"), &manifest);
    let message = train(config, &StopFlag::new()).unwrap_err().to_string();
    assert!(message.contains("no usable samples"), "{message}");
    assert!(message.contains("missing file"), "{message}");
}

#[test]
fn missing_manifest_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("absent.jsonl");
    let config = tiny_config(&dir.path().join("run"), &manifest);
    let message = train(config, &StopFlag::new()).unwrap_err().to_string();
    assert!(message.contains("absent.jsonl"), "{message}");
    assert!(!dir.path().join("run").exists(), "the output folder the failed run created is removed again while empty");
}
