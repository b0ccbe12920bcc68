//! Captions an image with a trained connector, using flamingo-model as a
//! library (no CLI).
//!
//! ```text
//! cargo run --release -p flamingo-model --example caption -- CHECKPOINT_DIR IMAGE [PROMPT]
//! ```
//!
//! CHECKPOINT_DIR is a folder written by training (it holds
//! `connector.json`, which records the language model and vision encoder
//! paths). PROMPT defaults to the caption prompt the connector was trained
//! with; an `<image>` in it marks where the image goes.

use std::path::PathBuf;

use flamingo_kernels::{Device, DeviceRequest};
use flamingo_model::flamingo::GenerationConfig;
use flamingo_model::FlamingoPipeline;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(checkpoint), Some(image_path)) = (args.next(), args.next()) else {
        return Err("usage: caption CHECKPOINT_DIR IMAGE [PROMPT]".into());
    };
    let prompt = args.next();

    // A hardware GPU if there is one, else the CPU backend.
    let device = Device::open(DeviceRequest::Auto)?;

    // The frozen backbones and the trained connector, as the checkpoint records them.
    let model = FlamingoPipeline::load(&device, &PathBuf::from(checkpoint), None, None)?;

    // Decode the image and generate greedily, stopping at <|endofchunk|>.
    let image = FlamingoPipeline::open_image(&PathBuf::from(image_path))?;
    let config = GenerationConfig { max_new_tokens: 16, ..GenerationConfig::default() };
    let output = match prompt {
        Some(prompt) => model.generate(&prompt, &[image], &config)?,
        None => model.caption(&image, &config)?,
    };
    println!("{}", output.text.trim());
    Ok(())
}
