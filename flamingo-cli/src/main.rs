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
    #[arg(long, global = true, default_value = "info")]
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
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).with_ansi(ansi).init();

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
