//! Progress bars that stay out of the way of log lines.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Creates a bar of `len` units on stderr. It is hidden when `enabled` is
/// false or stderr is not a terminal, so that logs written to files stay clean.
pub fn bar(len: u64, enabled: bool, template: &str) -> ProgressBar {
    if !enabled || !std::io::stderr().is_terminal() {
        return ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::hidden());
    }
    let bar = ProgressBar::new(len);
    let style = ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style.progress_chars("=> "));
    bar
}

/// Logs `line` at info level with the bar cleared meanwhile.
pub fn log(bar: &ProgressBar, line: &str) {
    bar.suspend(|| tracing::info!("{line}"));
}

/// The template of the training bar: step counter, then the message
/// (loss, learning rate, ms per step, samples per second).
pub const TRAIN_TEMPLATE: &str = "{bar:30} {pos}/{len} steps {msg} [{elapsed_precise}<{eta_precise}]";

/// The template of the feature extraction bar.
pub const EXTRACT_TEMPLATE: &str = "features {bar:30} {pos}/{len} records {per_sec} [{elapsed_precise}<{eta_precise}]";

/// The template of evaluation bars.
pub const EVAL_TEMPLATE: &str = "{prefix} {bar:30} {pos}/{len} samples [{elapsed_precise}]";
