//! The `flamingo` command: list devices, train a connector, generate text
//! from images, evaluate, inspect checkpoints, convert weights, and run the
//! demo on real data.

mod convert;
mod demo;
mod devices;
mod eval;
mod generate;
mod inspect;
mod train;

use std::ffi::{c_int, c_long};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use flamingo_kernels::{Device, DeviceRequest};

// The CPU backend allocates a fresh buffer for every op's output. glibc's
// allocator hands large blocks back to the kernel on free, so each step
// paid for page faults again; mimalloc keeps freed memory for reuse.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

// mimalloc's C API, compiled into the binary by the `mimalloc` crate.
extern "C" {
    fn mi_option_set(option: c_int, value: c_long);
}

/// `mi_option_purge_decommits` in the `mi_option_t` enum of mimalloc.h, in
/// both the mimalloc 2 and 3 sources of libmimalloc-sys 0.1.49.
/// NOTE: check this index when libmimalloc-sys is updated.
const MI_OPTION_PURGE_DECOMMITS: c_int = 5;

/// Makes mimalloc reset freed memory (MADV_FREE on Linux) instead of
/// decommitting it. By default mimalloc decommits memory that stays free
/// for a few milliseconds. A CPU training step frees and reallocates its
/// buffers, so each step paid again for page faults and for the kernel
/// zeroing fresh pages, 4 to 6 % of a step of the demo recipe on 2 cores.
/// The kernel still reclaims reset pages when memory runs short.
fn keep_freed_pages_mapped() {
    // SAFETY: mi_option_set only stores an option value, and mimalloc
    // ignores an index outside its option table.
    unsafe { mi_option_set(MI_OPTION_PURGE_DECOMMITS, 0) };
}

/// Flamingo in Rust: a frozen vision encoder and a frozen language model,
/// connected by a trainable Perceiver Resampler and gated cross-attention.
#[derive(Debug, Parser)]
#[command(name = "flamingo", version, about, long_about = None)]
struct Cli {
    /// Device to run on: auto (a hardware GPU if any, else the CPU), cpu,
    /// vulkan, metal, dx12, gl, or an adapter index from `flamingo devices`.
    #[arg(long, global = true, default_value = "auto")]
    device: String,

    /// Log filter for stderr, e.g. info, debug, or flamingo_train=debug.
    #[arg(long, global = true, default_value = "info", value_name = "FILTER", value_parser = parse_log_filter)]
    log: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List every GPU adapter and the device that would be chosen.
    Devices,
    /// Continue a prompt, with images for its <image> markers; prints only the text on stdout.
    Generate(generate::Args),
    /// Train a connector from flags or a TOML config file.
    Train(train::Args),
    /// Evaluate a connector checkpoint: validation loss and caption accuracy.
    Eval(eval::Args),
    /// Summarise a safetensors file, a GGUF file or a checkpoint folder.
    Inspect(inspect::Args),
    /// Convert weights from another framework's layout.
    Convert(convert::Args),
    /// Train and evaluate on Fashion-MNIST with SmolLM2 and MobileNetV2, fetching them first.
    Demo(demo::Args),
}

fn main() -> ExitCode {
    keep_freed_pages_mapped();
    let cli = Cli::parse();
    for target in unknown_log_targets(&cli.log) {
        // A tracing warning could be hidden by this very filter, so it goes to stderr directly.
        eprintln!(
            "warning: --log {target} is not a level ({LOG_LEVELS}), so only events of a module named {target} are shown; \
             write a level such as debug, or MODULE=LEVEL such as flamingo_train=debug"
        );
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(|| LogWriter).with_target(false).with_ansi(ansi).init();

    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", one_line(&error));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Devices => devices::run(&cli.device),
        Command::Generate(args) => generate::run(open_device(&cli.device)?, args),
        Command::Train(args) => train::run(&cli.device, args),
        Command::Eval(args) => eval::run(&cli.device, args),
        Command::Inspect(args) => inspect::run(args),
        Command::Convert(args) => convert::run(args),
        Command::Demo(args) => demo::run(&cli.device, args),
    }
}

/// Stderr for log lines. Each line is written with this thread's progress
/// bar cleared, so that the bar's next redraw does not erase it.
struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut result = Ok(());
        flamingo_train::progress::above_bars(|| result = std::io::stderr().write_all(buf));
        result.map(|()| buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// The levels a `--log` directive can name.
const LOG_LEVELS: &str = "trace, debug, info, warn, error or off";

/// Checks a `--log` filter. The error names the directive that does not
/// parse and shows how to write one.
fn parse_log_filter(text: &str) -> Result<String, String> {
    let advice = format!("write a level ({LOG_LEVELS}), or MODULE=LEVEL such as flamingo_train=debug, several joined by commas");
    for directive in text.split(',').map(str::trim).filter(|directive| !directive.is_empty()) {
        if let Err(error) = directive.parse::<tracing_subscriber::filter::Directive>() {
            return Err(format!("`{directive}` is not a log directive ({error}); {advice}"));
        }
    }
    match tracing_subscriber::EnvFilter::builder().parse(text) {
        Ok(_) => Ok(text.to_string()),
        Err(error) => Err(format!("{error}; {advice}")),
    }
}

/// Returns the bare words of a `--log` filter that are neither a level nor
/// a module of this program or of wgpu. The filter reads such a word as a
/// module name, so a misspelt level would hide every log line.
fn unknown_log_targets(filter: &str) -> Vec<&str> {
    const MODULES: [&str; 3] = ["flamingo", "wgpu", "naga"];
    filter
        .split(',')
        .map(str::trim)
        .filter(|directive| !directive.is_empty() && !directive.contains(['=', '[']))
        .filter(|word| word.parse::<tracing_subscriber::filter::LevelFilter>().is_err())
        .filter(|word| !MODULES.iter().any(|module| word.starts_with(module)))
        .collect()
}

/// Opens the device named by `--device`.
pub fn open_device(request: &str) -> anyhow::Result<Device> {
    let request: DeviceRequest = request.parse()?;
    Ok(Device::open(request)?)
}

/// The error and its causes joined into one line.
fn one_line(error: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if !parts.iter().any(|part| part.contains(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ").replace('\n', " ")
}
