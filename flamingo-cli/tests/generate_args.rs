//! `flamingo generate` rejects sampling settings that are out of range or
//! contradict each other, and image files it cannot open, with one line
//! naming the flag, before it loads any model.

use std::process::Command;

fn generate(extra: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_flamingo"))
        .args(["--device", "cpu", "generate", "--lm", "no-such-model.gguf", "--prompt", "Hello"])
        .args(extra)
        .output()
        .expect("the flamingo binary runs");
    (output.status.success(), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn bad_sampling_settings_name_their_flag() {
    let cases: [(&[&str], &str); 7] = [
        (&["--temperature", "-1"], "--temperature -1 is invalid"),
        (&["--temperature", "nan"], "--temperature NaN is invalid"),
        (&["--top-p", "2"], "--top-p 2 is invalid"),
        (&["--top-k", "0"], "--top-k 0 keeps no token"),
        (&["--beams", "0"], "--beams 0 is invalid"),
        (&["--beams", "100000"], "--beams 100000 is invalid"),
        (&["--beams", "3", "--temperature", "0.8"], "do not apply"),
    ];
    for (flags, expected) in cases {
        let (success, stderr) = generate(flags);
        assert!(!success, "{flags:?} should fail");
        assert!(stderr.contains(expected), "{flags:?}: expected {expected:?} in stderr, got:\n{stderr}");
        assert!(!stderr.contains("no-such-model"), "{flags:?} was checked only after loading the model:\n{stderr}");
    }
}

#[test]
fn valid_settings_reach_model_loader() {
    // Valid settings pass the checks, so the missing model file is what fails.
    let (success, stderr) = generate(&["--temperature", "0.8", "--top-k", "40", "--top-p", "0.9"]);
    assert!(!success);
    assert!(stderr.contains("no-such-model.gguf"), "expected the missing file to be named, got:\n{stderr}");
}

#[test]
fn missing_image_names_its_flag() {
    let output = Command::new(env!("CARGO_BIN_EXE_flamingo"))
        .args(["--device", "cpu", "generate", "--checkpoint", "no-such-checkpoint", "--image", "no-such-image.png", "--prompt", "<image>Output:"])
        .output()
        .expect("the flamingo binary runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("--image no-such-image.png: image file not found"), "the flag and the file are named:\n{stderr}");
    assert!(!stderr.contains("no-such-checkpoint"), "the image is checked before the checkpoint loads:\n{stderr}");
}

#[test]
fn missing_checkpoint_says_what_to_pass() {
    let output = Command::new(env!("CARGO_BIN_EXE_flamingo"))
        .args(["--device", "cpu", "generate", "--checkpoint", "no-such-checkpoint", "--prompt", "Hello"])
        .output()
        .expect("the flamingo binary runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("no-such-checkpoint/connector.json: not found"), "the missing manifest is named:\n{stderr}");
    assert!(stderr.contains("pass a checkpoint folder"), "the message says what to pass:\n{stderr}");
}
