//! `--log` rejects a filter that does not parse, naming the flag, and warns
//! about a word that is neither a level nor a module of this program.

use std::process::Command;

/// Runs `flamingo --log FILTER --device cpu devices` and returns whether it succeeded, and its stderr.
fn devices_with_log(filter: &str) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_flamingo")).args(["--log", filter, "--device", "cpu", "devices"]).output().expect("the flamingo binary runs");
    (output.status.success(), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn unparsable_filter_is_an_error() {
    for filter in ["flamingo_train=loud", "info,[unclosed"] {
        let (success, stderr) = devices_with_log(filter);
        assert!(!success, "{filter:?} should be rejected");
        assert!(stderr.contains("--log"), "{filter:?}: the flag is named:\n{stderr}");
        assert!(stderr.contains("is not a log directive"), "{filter:?}:\n{stderr}");
        assert!(stderr.contains("flamingo_train=debug"), "{filter:?}: an example is given:\n{stderr}");
    }
}

#[test]
fn misspelt_level_is_warned_about() {
    let (_, stderr) = devices_with_log("debgu");
    assert!(stderr.contains("warning: --log debgu is not a level"), "{stderr}");

    for filter in ["debug", "warn,flamingo_train=debug", "flamingo_model", "WARN"] {
        let (_, stderr) = devices_with_log(filter);
        assert!(!stderr.contains("warning: --log"), "{filter:?} is a valid filter:\n{stderr}");
    }
}
