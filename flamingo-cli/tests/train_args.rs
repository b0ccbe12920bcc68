//! `flamingo train` and `flamingo eval` report an invalid value under the
//! name the user typed: the flag when it came from the command line, the
//! key and the file when it came from --config. A run that fails before
//! its first checkpoint leaves no empty `checkpoints` folder behind.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs `flamingo ARGS` and returns whether it succeeded, and its stderr.
fn run(args: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_flamingo")).args(args).output().expect("the flamingo binary runs");
    (output.status.success(), String::from_utf8_lossy(&output.stderr).into_owned())
}

/// Runs `flamingo --device cpu ARGS`.
fn flamingo(args: &[&str]) -> (bool, String) {
    run(&[&["--device", "cpu"], args].concat())
}

fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures").join(path)
}

fn text(path: &Path) -> &str {
    path.to_str().expect("temporary paths are UTF-8")
}

/// Asserts that `flamingo ARGS` fails with `expected` in its stderr and no TOML key.
fn fails_with(args: &[&str], expected: &str) {
    let (success, stderr) = run(args);
    assert!(!success, "{args:?} should fail");
    assert!(stderr.contains(expected), "{args:?}: expected {expected:?} in stderr, got:\n{stderr}");
    for key in ["`data.", "`steps`", "`batch_size`", "`optimizer.lr`", "`output_dir`", "`device`", "data.data"] {
        assert!(!stderr.contains(key), "{args:?}: the message names the TOML key {key} instead of the flag:\n{stderr}");
    }
}

#[test]
fn invalid_train_flags_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let train_on = |device: &str, out: &str, extra: &[&'static str]| -> Vec<String> {
        let base = ["--device", device, "train", "--out", out, "--lm", "no-such-lm", "--vision", "no-such-vision", "--data-format", "jsonl"];
        base.iter().chain(extra).map(|arg| arg.to_string()).collect()
    };
    let train = |out: &str, extra: &[&'static str]| train_on("cpu", out, extra);
    let check = |args: Vec<String>, expected: &str| fails_with(&args.iter().map(String::as_str).collect::<Vec<_>>(), expected);
    let out = text(&out);

    check(train(out, &[]), "--data is required for jsonl data");
    check(train(out, &["--data", "pairs.jsonl", "--limit-per-class", "5"]), "--limit-per-class does not apply to jsonl data, only to idx and fashion_mnist data");
    check(train(out, &["--data", "pairs.jsonl", "--steps", "0"]), "--steps must be at least 1");
    check(train(out, &["--data", "pairs.jsonl", "--batch-size", "0"]), "--batch-size must be at least 1");
    check(train(out, &["--data", "pairs.jsonl", "--lr", "-1"]), "--lr is -1, but it must be a positive number");

    check(train_on("tpu", out, &["--data", "pairs.jsonl"]), "--device is invalid: unknown device `tpu`");
    assert!(!Path::new(out).exists(), "no output folder is created for an invalid configuration");
}

#[test]
fn config_errors_name_key_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("train.toml");
    let write = |extra: &str| {
        let toml = format!(
            "output_dir = {:?}\nsteps = 0\n{extra}\n[model]\nlanguage_model = \"no-such-lm\"\nvision_encoder = \"no-such-vision\"\n\n[data.train]\nformat = \"jsonl\"\npath = \"pairs.jsonl\"\n",
            text(&dir.path().join("run"))
        );
        std::fs::write(&config, toml).unwrap();
    };
    write("");

    let (success, stderr) = flamingo(&["train", "--config", text(&config)]);
    assert!(!success);
    assert!(stderr.contains(&format!("{}: `steps` must be at least 1", config.display())), "the file and the key are named:\n{stderr}");

    // A flag replaces the file's value before the check, so --steps fixes it
    // and the run gets as far as loading the missing language model.
    let (success, stderr) = flamingo(&["train", "--config", text(&config), "--steps", "3"]);
    assert!(!success);
    assert!(!stderr.contains("`steps`"), "--steps replaced the file's invalid value:\n{stderr}");
    assert!(stderr.contains("no-such-lm"), "{stderr}");

    // A value given by a flag is reported under the flag, even with a file.
    let (success, stderr) = flamingo(&["train", "--config", text(&config), "--steps", "3", "--batch-size", "0"]);
    assert!(!success);
    assert!(stderr.contains("--batch-size must be at least 1"), "{stderr}");
    assert!(!stderr.contains("train.toml"), "the flag's value is not blamed on the file:\n{stderr}");

    write("[optimizer]\nlr = -1.0\n");
    let (success, stderr) = flamingo(&["train", "--config", text(&config), "--steps", "3", "--data", "other.jsonl"]);
    assert!(!success);
    assert!(stderr.contains("train.toml: `optimizer.lr` is -1"), "{stderr}");
}

#[test]
fn invalid_eval_flags_are_named() {
    let eval = ["--device", "cpu", "eval", "--checkpoint", "no-such-checkpoint"];
    let cases: [(&[&str], &str); 4] = [
        (&["--data-format", "jsonl"], "--data is required for jsonl data"),
        (&["--data-format", "jsonl", "--data", "pairs.jsonl", "--labels", "labels.idx"], "--labels does not apply to jsonl data, only to idx data"),
        (&["--data-format", "fashion-mnist", "--split", "val"], "--split is \"val\", but it must be \"train\" or \"test\""),
        (&["--data-format", "idx", "--data", "images.idx", "--labels", "labels.idx"], "--class-names is required for idx data"),
    ];
    for (flags, expected) in cases {
        let args: Vec<&str> = eval.iter().chain(flags).copied().collect();
        fails_with(&args, expected);
    }
}

#[test]
fn failed_run_leaves_no_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let absent = dir.path().join("absent.jsonl");
    let (lm, vision) = (fixture("lm/tiny_llama"), fixture("vision/tiny_clip"));
    let train = |out: &Path| {
        flamingo(&["train", "--out", text(out), "--lm", text(&lm), "--vision", text(&vision), "--data-format", "jsonl", "--data", text(&absent), "--no-progress"])
    };

    let fresh = dir.path().join("fresh");
    let (success, stderr) = train(&fresh);
    assert!(!success);
    assert!(stderr.contains("absent.jsonl"), "{stderr}");
    assert!(!fresh.exists(), "the output folder the failed run created is removed again while empty");

    let used = dir.path().join("used");
    std::fs::create_dir_all(&used).unwrap();
    std::fs::write(used.join("notes.txt"), "kept").unwrap();
    let (success, _) = train(&used);
    assert!(!success);
    assert!(used.join("notes.txt").is_file(), "files in the output folder are kept");
    assert!(!used.join("checkpoints").exists(), "no empty checkpoints folder is left");
}
