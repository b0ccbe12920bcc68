//! The whole model ready to use: frozen LM and vision encoder, a trained
//! connector, and image-to-text generation in one call.
//!
//! ```no_run
//! use flamingo_kernels::{Device, DeviceRequest};
//! use flamingo_model::flamingo::GenerationConfig;
//! use flamingo_model::FlamingoPipeline;
//!
//! # fn main() -> flamingo_model::Result<()> {
//! let device = Device::open(DeviceRequest::Auto)?;
//! let model = FlamingoPipeline::load(&device, "runs/demo/checkpoints/final".as_ref(), None, None)?;
//! let image = FlamingoPipeline::open_image("photo.png".as_ref())?;
//! let caption = model.caption(&image, &GenerationConfig::default())?;
//! println!("{}", caption.text);
//! # Ok(())
//! # }
//! ```

use std::path::{Path, PathBuf};

use flamingo_kernels::{Device, Tensor};
use image::DynamicImage;

use crate::error::{Error, Result};
use crate::flamingo::{ConnectorManifest, Flamingo, Generation, GenerationConfig};
use crate::lm::LanguageModel;
use crate::vision::{VisionEncoder, VisionOptions};

/// The caption prompt used when a checkpoint does not name one.
pub const DEFAULT_CAPTION_PROMPT: &str = "<image>Output:";

/// A Flamingo model with its vision encoder.
pub struct FlamingoPipeline {
    pub flamingo: Flamingo,
    pub vision: VisionEncoder,
    /// What the connector was trained with.
    pub manifest: ConnectorManifest,
}

/// Reads the vision options a manifest recorded; absent fields take the defaults.
pub fn vision_options_from_json(value: &serde_json::Value) -> VisionOptions {
    let flag = |key: &str| value.get(key).and_then(|v| v.as_bool()).unwrap_or(false);
    VisionOptions { final_layer_norm: flag("final_layer_norm"), include_cls: flag("include_cls"), weight_dtype: None }
}

/// Writes vision options as a manifest records them.
pub fn vision_options_to_json(options: &VisionOptions) -> serde_json::Value {
    serde_json::json!({ "final_layer_norm": options.final_layer_norm, "include_cls": options.include_cls })
}

impl FlamingoPipeline {
    /// Loads the connector checkpoint in `checkpoint` and the backbones it
    /// was trained with; `lm` and `vision` override the paths the manifest
    /// records (for a checkpoint moved to another machine).
    pub fn load(device: &Device, checkpoint: &Path, lm: Option<&Path>, vision: Option<&Path>) -> Result<Self> {
        let manifest = ConnectorManifest::read(checkpoint)?;
        let lm_path: PathBuf = lm.map(Path::to_path_buf).unwrap_or_else(|| manifest.language_model.path.clone());
        let vision_path = match (vision, &manifest.vision_encoder) {
            (Some(path), _) => path.to_path_buf(),
            (None, Some(identity)) => identity.path.clone(),
            (None, None) => {
                return Err(Error::InvalidInput(format!(
                    "{} names no vision encoder; pass one with --vision",
                    checkpoint.display()
                )))
            }
        };
        let (language_model, tokenizer, special) = LanguageModel::load(device, &lm_path)?;
        let vision = VisionEncoder::load(device, &vision_path, vision_options_from_json(&manifest.vision_options))?;
        let mut flamingo = Flamingo::new(language_model, tokenizer, special, manifest.flamingo.clone(), 0)?;
        flamingo.load_connector(checkpoint)?;
        if vision.output_dim() != flamingo.config.resampler.dim {
            return Err(Error::Config {
                origin: vision_path.display().to_string(),
                message: format!(
                    "the vision encoder gives tokens of width {}, but the connector was trained on width {}",
                    vision.output_dim(),
                    flamingo.config.resampler.dim
                ),
            });
        }
        Ok(Self { flamingo, vision, manifest })
    }

    /// Decodes an image file with the `image` crate.
    pub fn open_image(path: &Path) -> Result<DynamicImage> {
        let message = match image::open(path) {
            Ok(image) => return Ok(image),
            Err(image::ImageError::IoError(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                "image file not found; check the path".to_string()
            }
            Err(e) => format!("cannot decode the image: {e}"),
        };
        Err(Error::Image { origin: path.display().to_string(), message })
    }

    /// Visual tokens of `images`, [N, 1, tokens, width], ready for the resampler.
    pub fn visual_tokens(&self, images: &[DynamicImage]) -> Result<Tensor> {
        encode_images(self.flamingo.device(), &self.vision, images)
    }

    /// Continues `prompt`, whose `<image>` markers take `images` in order.
    pub fn generate(&self, prompt: &str, images: &[DynamicImage], config: &GenerationConfig) -> Result<Generation> {
        let ids = self.flamingo.encode_prompt(prompt)?;
        let visual = if images.is_empty() { None } else { Some(self.visual_tokens(images)?) };
        let mut outputs = self.flamingo.generate(&[ids], visual.as_ref(), config)?;
        Ok(outputs.remove(0))
    }

    /// Captions one image with the prompt the connector was trained with.
    pub fn caption(&self, image: &DynamicImage, config: &GenerationConfig) -> Result<Generation> {
        let prompt = self.manifest.caption_prompt.clone().unwrap_or_else(|| DEFAULT_CAPTION_PROMPT.to_string());
        self.generate(&prompt, std::slice::from_ref(image), config)
    }
}

/// Runs `vision`, loaded on `device`, on `images`; returns [N, 1, tokens, width].
pub fn encode_images(device: &Device, vision: &VisionEncoder, images: &[DynamicImage]) -> Result<Tensor> {
    let pixels = vision.preprocess_batch(images)?;
    let tokens = vision.encode(&device.upload(&pixels)?)?;
    let (count, per_image, width) = (tokens.dim(0), tokens.dim(1), tokens.dim(2));
    Ok(tokens.reshape([count, 1, per_image, width])?)
}
