//! `flamingo convert`: weights from other frameworks into the layouts the loaders read.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use flamingo_model::convert::nsfwjs::convert_nsfwjs_mobilenet_v2;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    conversion: Conversion,
}

#[derive(Debug, Subcommand)]
enum Conversion {
    /// The nsfwjs npm package's Keras MobileNetV2 (TensorFlow.js files) into a
    /// timm `mobilenetv2_100` safetensors file.
    NsfwjsMobilenetV2 {
        /// Folder with model.min.js and group1-shard*.min.js (the package's
        /// dist/models/mobilenet_v2).
        #[arg(long)]
        input: PathBuf,
        /// The safetensors file to write.
        #[arg(long)]
        output: PathBuf,
        /// Replace the output file if it exists.
        #[arg(long)]
        overwrite: bool,
    },
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.conversion {
        Conversion::NsfwjsMobilenetV2 { input, output, overwrite } => {
            let report = convert_nsfwjs_mobilenet_v2(&input, &output, overwrite).with_context(|| {
                if output.exists() && !overwrite {
                    format!("{} exists; pass --overwrite to replace it", output.display())
                } else {
                    format!("converting {}", input.display())
                }
            })?;
            eprintln!(
                "wrote {} tensors ({} values) to {}; dropped {}",
                report.tensors,
                report.values,
                report.output.display(),
                if report.dropped.is_empty() { "nothing".to_string() } else { report.dropped.join(", ") }
            );
            Ok(())
        }
    }
}
