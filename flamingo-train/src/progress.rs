//! Progress bars that stay out of the way of log lines.
//!
//! A bar is redrawn in place: each redraw moves the cursor up over the
//! bar's line and clears it. A log line written to stderr in between ends
//! up on that line and is erased too. So every line goes out with the bar
//! cleared. [`log`] does that for a bar at hand, and [`above_bars`] finds
//! the bar this thread is drawing, for a log writer that has no bar at hand
//! (see the `flamingo` binary).

use std::cell::RefCell;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread::ThreadId;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle, WeakProgressBar};

/// A visible bar, with its number in creation order and the thread that created it.
struct Drawn {
    serial: u64,
    bar: WeakProgressBar,
    thread: ThreadId,
}

/// The visible bars that may still be drawn, oldest first.
static DRAWN: Mutex<Vec<Drawn>> = Mutex::new(Vec::new());

/// The serial number of the newest bar.
static NEWEST: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// For each [`suspend`] running on this thread, innermost last: the
    /// newest serial number when it began. Bars up to that number are
    /// cleared already or belong to an outer step. Newer ones are drawn
    /// inside the suspended step, such as the evaluation bar during training.
    static SUSPENDED: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
}

/// Creates a bar of `len` units on stderr. It is hidden when `enabled` is
/// false or stderr is not a terminal, so that logs written to files stay clean.
pub fn bar(len: u64, enabled: bool, template: &str) -> ProgressBar {
    if !enabled || !std::io::stderr().is_terminal() {
        return ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::hidden());
    }
    let bar = ProgressBar::new(len);
    let style = ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style.progress_chars("=> "));

    let serial = NEWEST.fetch_add(1, Ordering::Relaxed) + 1;
    if let Ok(mut drawn) = DRAWN.lock() {
        drawn.retain(|entry| entry.bar.upgrade().is_some());
        drawn.push(Drawn { serial, bar: bar.downgrade(), thread: std::thread::current().id() });
    }
    bar
}

/// Runs `f` with `bar` cleared from the screen, then draws the bar again.
/// Log lines written by `f` stay above the bar.
pub fn suspend<R>(bar: &ProgressBar, f: impl FnOnce() -> R) -> R {
    /// Pops this suspend's entry even when `f` panics.
    struct Pop;
    impl Drop for Pop {
        fn drop(&mut self) {
            SUSPENDED.with(|suspended| suspended.borrow_mut().pop());
        }
    }

    SUSPENDED.with(|suspended| suspended.borrow_mut().push(NEWEST.load(Ordering::Relaxed)));
    let _pop = Pop;
    bar.suspend(f)
}

/// Logs `line` at info level with the bar cleared meanwhile.
pub fn log(bar: &ProgressBar, line: &str) {
    suspend(bar, || tracing::info!("{line}"));
}

/// Runs `write`, which writes a log line to stderr, with the bar this thread
/// is drawing cleared, so that the bar's next redraw does not erase the line.
///
/// Only bars of the calling thread are cleared, because clearing another
/// thread's bar waits for that thread, which may be waiting for this one.
pub fn above_bars(write: impl FnOnce()) {
    let outside = SUSPENDED.with(|suspended| suspended.borrow().last().copied()).unwrap_or(0);
    let this_thread = std::thread::current().id();
    // The bars are collected first, so that no bar's own lock is taken
    // while the list is locked.
    let candidates: Vec<ProgressBar> = match DRAWN.lock() {
        Ok(drawn) => drawn.iter().rev().filter(|entry| entry.serial > outside && entry.thread == this_thread).filter_map(|entry| entry.bar.upgrade()).collect(),
        Err(_) => Vec::new(),
    };
    match candidates.into_iter().find(|bar| !bar.is_finished()) {
        Some(bar) => suspend(&bar, write),
        None => write(),
    }
}

/// The template of the training bar: step counter, then the message
/// (loss, learning rate, ms per step, samples per second).
pub const TRAIN_TEMPLATE: &str = "{bar:30} {pos}/{len} steps {msg} [{elapsed_precise}<{eta_precise}]";

/// The template of the feature extraction bar.
pub const EXTRACT_TEMPLATE: &str = "features {bar:30} {pos}/{len} records {per_sec} [{elapsed_precise}<{eta_precise}]";

/// The template of evaluation bars.
pub const EVAL_TEMPLATE: &str = "{prefix} {bar:30} {pos}/{len} samples [{elapsed_precise}]";
