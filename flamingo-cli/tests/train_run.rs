//! Short `flamingo train` runs from flags on generated images. The log
//! names an image that cannot be decoded, `flamingo inspect` describes the
//! checkpoint in plain English with each gate's LM layer, and video clips
//! train without a config file.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use image::{Rgb, RgbImage};

fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures").join(path)
}

/// Writes eight small PNGs, one file that is not an image, and a JSONL
/// manifest of all nine; returns the manifest.
fn write_data(dir: &Path) -> PathBuf {
    let mut lines = String::new();
    for i in 0..8u8 {
        let name = format!("{i}.png");
        RgbImage::from_pixel(16, 16, Rgb([30 * i, 200 - 20 * i, 90])).save(dir.join(&name)).unwrap();
        lines.push_str(&format!("{{\"image\": \"{name}\", \"text\": \"a square of colour {i}\"}}\n"));
    }
    std::fs::write(dir.join("broken.png"), b"these bytes are not a PNG image").unwrap();
    lines.push_str("{\"image\": \"broken.png\", \"text\": \"a broken square\"}\n");
    let manifest = dir.join("pairs.jsonl");
    std::fs::write(&manifest, lines).unwrap();
    manifest
}

/// Runs `flamingo train` from flags alone on the tiny fixture backbones,
/// with batches of 2 and one checkpoint at the end, writing to `dir/run`.
fn train_from_flags(dir: &Path, format: &str, manifest: &Path, steps: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flamingo"))
        .args(["--device", "cpu", "train", "--data-format", format, "--steps", steps, "--batch-size", "2", "--checkpoint-every", "0", "--no-progress"])
        .arg("--out")
        .arg(dir.join("run"))
        .arg("--data")
        .arg(manifest)
        .arg("--lm")
        .arg(fixture("lm/tiny_llama"))
        .arg("--vision")
        .arg(fixture("vision/tiny_clip"))
        .env("FLAMINGO_CACHE", dir.join("cache"))
        .output()
        .expect("the flamingo binary runs")
}

#[test]
fn run_names_bad_image_and_gates() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_data(dir.path());
    let out = dir.path().join("run");
    let output = train_from_flags(dir.path(), "jsonl", &manifest, "2");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");

    let named: Vec<&str> = stderr.lines().filter(|line| line.contains("broken.png") && line.contains("undecodable image")).collect();
    assert!(!named.is_empty(), "a warning names the broken image and why it was skipped:\n{stderr}");
    assert!(named.iter().any(|line| line.contains("pairs.jsonl:9")), "the warning names the manifest line:\n{stderr}");

    let checkpoint = out.join("checkpoints/step-000002");
    let output = Command::new(env!("CARGO_BIN_EXE_flamingo")).arg("inspect").arg(&checkpoint).output().expect("the flamingo binary runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("Flamingo connector checkpoint, step 2"), "{stdout}");
    assert!(stdout.contains("cross-attention: a block before every LM layer"), "{stdout}");
    for layer in [0, 1] {
        assert!(stdout.contains(&format!("    layer {layer}: attention ")), "the gates of LM layer {layer} are listed:\n{stdout}");
    }
    assert!(stdout.contains(", feed-forward "), "{stdout}");
    for debug in ["Some(", "None", "{\"", " 1 tensors", " 1 parameters"] {
        assert!(!stdout.contains(debug), "the output contains {debug:?}:\n{stdout}");
    }
}

/// Writes four clips of three frames each and their JSONL manifest.
fn write_clips(dir: &Path) -> PathBuf {
    let mut lines = String::new();
    for clip in 0..4u8 {
        let frames: Vec<String> = (0..3u8)
            .map(|frame| {
                let name = format!("clip{clip}-{frame}.png");
                RgbImage::from_pixel(16, 16, Rgb([60 * clip, 40 * frame, 120])).save(dir.join(&name)).unwrap();
                format!("\"{name}\"")
            })
            .collect();
        lines.push_str(&format!("{{\"video\": [{}], \"text\": \"clip {clip}\"}}\n", frames.join(", ")));
    }
    let manifest = dir.join("clips.jsonl");
    std::fs::write(&manifest, lines).unwrap();
    manifest
}

#[test]
fn video_trains_from_flags_alone() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_clips(dir.path());
    let out = dir.path().join("run");
    let output = train_from_flags(dir.path(), "video", &manifest, "1");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "video data needs no config file:\n{stderr}");

    let config = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(config.contains("max_frames = 8"), "the model takes the clips' default 8 frames:\n{config}");
    assert!(out.join("checkpoints/step-000001").is_dir(), "the run writes its final checkpoint");
}
