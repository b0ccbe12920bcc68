//! `flamingo inspect` prints plain English, and distinguishes a truncated
//! or damaged safetensors file from a file of another format.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures").join(path)
}

/// Runs `flamingo inspect PATH` and returns whether it succeeded, its stdout and its stderr.
fn inspect(path: &Path) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_flamingo")).arg("inspect").arg(path).output().expect("the flamingo binary runs");
    (output.status.success(), String::from_utf8_lossy(&output.stdout).into_owned(), String::from_utf8_lossy(&output.stderr).into_owned())
}

/// Asserts that `output` contains no Rust debug text and no wrong plural.
fn assert_plain(output: &str) {
    for debug in ["Some(", "None", "String(", "U32(", "I32(", "F32(", "Array(", "Bool(", " 1 tensors", " 1 parameters"] {
        assert!(!output.contains(debug), "the output contains {debug:?}:\n{output}");
    }
}

#[test]
fn truncated_safetensors_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let whole = std::fs::read(fixture("vision/tiny_clip/model.safetensors")).unwrap();

    // By extension and by header: a file without the extension is recognised from its first bytes.
    for name in ["model.safetensors", "model.bin"] {
        let path = dir.path().join(name);
        std::fs::write(&path, &whole[..1000]).unwrap();
        let (success, _, stderr) = inspect(&path);
        assert!(!success, "{name}");
        assert!(stderr.contains(&path.display().to_string()), "{name}: the file is named:\n{stderr}");
        assert!(stderr.contains("truncated or damaged safetensors file"), "{name}:\n{stderr}");
        assert!(stderr.contains("download or convert it again"), "{name}:\n{stderr}");
        assert!(!stderr.contains("neither GGUF nor safetensors"), "{name}:\n{stderr}");
    }

    // Cut inside the tensor data rather than the header.
    let path = dir.path().join("data.safetensors");
    std::fs::write(&path, &whole[..whole.len() - 100]).unwrap();
    let (success, _, stderr) = inspect(&path);
    assert!(!success);
    assert!(stderr.contains("the file is truncated"), "{stderr}");
    assert!(stderr.contains("download or convert it again"), "{stderr}");
}

#[test]
fn other_files_are_told_apart() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "these are notes, not weights\n").unwrap();
    let (success, _, stderr) = inspect(&text);
    assert!(!success);
    assert!(stderr.contains("notes.txt is neither GGUF nor safetensors"), "{stderr}");

    let gguf = dir.path().join("model.gguf");
    std::fs::write(&gguf, "not a gguf file at all").unwrap();
    let (success, _, stderr) = inspect(&gguf);
    assert!(!success);
    assert!(stderr.contains("model.gguf is named .gguf but does not start with the GGUF magic bytes"), "{stderr}");
}

#[test]
fn summaries_are_plain_english() {
    let (success, stdout, stderr) = inspect(&fixture("gguf/tiny_llama.gguf"));
    assert!(success, "{stderr}");
    assert_plain(&stdout);
    assert!(stdout.contains("tokenizer:"), "{stdout}");
    assert!(stdout.contains("llama.block_count: 2"), "metadata values are shown as they are:\n{stdout}");

    let (success, stdout, stderr) = inspect(&fixture("vision/tiny_clip/model.safetensors"));
    assert!(success, "{stderr}");
    assert_plain(&stdout);
    assert!(stdout.contains("] F32"), "each tensor shows its dtype:\n{stdout}");
}
