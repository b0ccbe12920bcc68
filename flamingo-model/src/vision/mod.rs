//! Frozen vision encoders: CLIP, SigLIP and MobileNetV2, with their image preprocessing.
//!
//! An encoder turns images into visual tokens for the Perceiver Resampler:
//!
//! ```text
//! image file -> load_image -> DynamicImage
//!   -> VisionEncoder::preprocess -> [S, S, 3] f32 (channels-last, normalised)
//!   -> stack and upload -> [N, S, S, 3]
//!   -> VisionEncoder::encode -> [N, num_tokens, output_dim]
//! ```
//!
//! | encoder | tokens | width | from |
//! |---|---|---|---|
//! | CLIP | (S/patch)², + 1 with the class token | hidden_size | Hugging Face folder, `clip_vision_model` or `clip` |
//! | SigLIP | (S/patch)² | hidden_size | Hugging Face folder, `siglip_vision_model` or `siglip` |
//! | MobileNetV2 | (S/32)², 49 at 224 | 1280 | timm `mobilenetv2_100` safetensors file or folder |

pub mod clip;
pub mod mobilenet_v2;
pub mod preprocess;
mod resample;
pub mod siglip;
mod vit;

use std::path::Path;

use flamingo_kernels::{DType, Device, HostTensor, Tensor};
use image::DynamicImage;

pub use self::clip::{ClipVision, ClipVisionConfig};
pub use self::mobilenet_v2::{MobileNetV2, MobileNetV2Config, Padding};
pub use self::preprocess::{load_image, ImagePreprocessor};
pub use self::siglip::{SiglipVision, SiglipVisionConfig};

use crate::error::{Error, Result};
use crate::loader::{SafetensorsWeights, WeightSource};

/// The `model_type` values of `config.json` that [`VisionEncoder::load`] reads.
pub const SUPPORTED_MODEL_TYPES: [&str; 4] = ["clip_vision_model", "clip", "siglip_vision_model", "siglip"];

/// The choice of tokens a transformer encoder returns, and the weights' element type.
///
/// The default returns the last layer's patch tokens with neither the final
/// LayerNorm nor CLIP's class token: the tokens OpenFlamingo's resampler
/// reads from CLIP. transformers' `last_hidden_state` is
/// `{ include_cls: true, final_layer_norm: false }` for CLIP and
/// `{ final_layer_norm: true, .. }` for SigLIP. MobileNetV2 has neither a
/// class token nor a final LayerNorm, so it requires both to be false.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VisionOptions {
    /// Apply the tower's final LayerNorm (`post_layernorm`) to every returned token.
    pub final_layer_norm: bool,
    /// Return CLIP's class token first, before the patch tokens. SigLIP
    /// has no class token, so it rejects `true`.
    pub include_cls: bool,
    /// Element type of the frozen matrices (linear and convolution
    /// weights); `None` takes [`Device::weight_dtype`]. Norms, biases and
    /// embeddings stay f32.
    pub weight_dtype: Option<DType>,
}

/// A frozen vision encoder with its image preprocessing.
pub enum VisionEncoder {
    Clip(ClipVision),
    Siglip(SiglipVision),
    MobileNetV2(MobileNetV2),
}

impl VisionEncoder {
    /// Loads an encoder from `path`:
    ///
    /// - a Hugging Face folder whose `config.json` has `model_type`
    ///   `clip_vision_model`, `clip` (its `vision_config` is used),
    ///   `siglip_vision_model` or `siglip`, with safetensors weights and
    ///   optionally `preprocessor_config.json`;
    /// - a timm folder whose `config.json` has `architecture`
    ///   `mobilenetv2_100`;
    /// - a MobileNetV2 safetensors file in timm's layout, or a folder with
    ///   one and no `config.json`: a plain timm file, or one converted from
    ///   nsfwjs, which its metadata identifies.
    pub fn load(device: &Device, path: impl AsRef<Path>, options: VisionOptions) -> Result<Self> {
        let path = path.as_ref();
        if path.is_file() && path.file_name().is_some_and(|name| name == "config.json") {
            let folder = path.parent().unwrap_or(Path::new("."));
            return Self::load(device, folder, options);
        }
        if path.is_dir() {
            let config_file = path.join("config.json");
            if config_file.is_file() {
                return Self::load_config_folder(device, path, &config_file, options);
            }
            if path.join("model.min.js").is_file() {
                return Err(Error::Unsupported(format!(
                    "{} contains a TensorFlow.js model; convert it to a timm safetensors file first (flamingo_model::convert::convert_nsfwjs_mobilenet_v2)",
                    path.display()
                )));
            }
        } else if !path.exists() {
            return Err(Error::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder")));
        }

        // A safetensors file, or a folder of one without config.json.
        let weights = SafetensorsWeights::open(path)?;
        if is_mobilenet_v2(&weights) {
            return MobileNetV2::load_file(device, path, options).map(VisionEncoder::MobileNetV2);
        }
        Err(Error::Unsupported(format!(
            "{}: the weights are not a timm {} checkpoint (no `conv_stem.weight`), and there is no config.json naming a model type; supported: a Hugging Face folder with model_type {}, or a timm {} file",
            path.display(),
            mobilenet_v2::ARCHITECTURE,
            SUPPORTED_MODEL_TYPES.join(", "),
            mobilenet_v2::ARCHITECTURE,
        )))
    }

    fn load_config_folder(device: &Device, folder: &Path, config_file: &Path, options: VisionOptions) -> Result<Self> {
        let text = std::fs::read_to_string(config_file).map_err(|e| Error::io(config_file, e))?;
        let config: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::format(config_file, format!("invalid JSON: {e}")))?;
        let origin = config_file.display().to_string();

        if let Some(model_type) = config.get("model_type").and_then(|t| t.as_str()) {
            return match model_type {
                "clip_vision_model" | "clip" => ClipVision::load(device, folder, &config, options).map(VisionEncoder::Clip),
                "siglip_vision_model" | "siglip" => {
                    SiglipVision::load(device, folder, &config, options).map(VisionEncoder::Siglip)
                }
                other => Err(Error::Config {
                    origin,
                    message: format!(
                        "model_type `{other}` is not a supported vision encoder; supported: {}, and timm {} folders or files",
                        SUPPORTED_MODEL_TYPES.join(", "),
                        mobilenet_v2::ARCHITECTURE
                    ),
                }),
            };
        }
        if config.get("architecture").is_some() {
            return MobileNetV2::load_timm_folder(device, folder, &config, options).map(VisionEncoder::MobileNetV2);
        }
        Err(Error::Config {
            origin,
            message: format!(
                "neither `model_type` (Hugging Face) nor `architecture` (timm) is set; supported model types: {}",
                SUPPORTED_MODEL_TYPES.join(", ")
            ),
        })
    }

    /// Preprocesses one image into [S, S, 3] f32, channels-last and
    /// normalised as the encoder was trained. Greyscale images are
    /// expanded to RGB; alpha is composited onto white (CLIP, SigLIP, timm)
    /// or dropped (nsfwjs's TensorFlow.js pipeline).
    pub fn preprocess(&self, image: &DynamicImage) -> Result<HostTensor> {
        self.preprocessor().apply(image)
    }

    /// Preprocesses several images in parallel into [N, S, S, 3].
    pub fn preprocess_batch(&self, images: &[DynamicImage]) -> Result<HostTensor> {
        self.preprocessor().apply_batch(images)
    }

    /// Runs the encoder on pixels [N, S, S, 3] (f32, on the encoder's
    /// device), returning visual tokens [N, num_tokens, output_dim].
    pub fn encode(&self, pixels: &Tensor) -> Result<Tensor> {
        match self {
            VisionEncoder::Clip(model) => model.encode(pixels),
            VisionEncoder::Siglip(model) => model.encode(pixels),
            VisionEncoder::MobileNetV2(model) => model.encode(pixels),
        }
    }

    /// Returns the width of one visual token.
    pub fn output_dim(&self) -> usize {
        match self {
            VisionEncoder::Clip(model) => model.config().hidden_size,
            VisionEncoder::Siglip(model) => model.config().hidden_size,
            VisionEncoder::MobileNetV2(_) => mobilenet_v2::NUM_FEATURES,
        }
    }

    /// Returns the number of visual tokens per image.
    pub fn num_tokens(&self) -> usize {
        match self {
            VisionEncoder::Clip(model) => model.num_tokens(),
            VisionEncoder::Siglip(model) => model.num_tokens(),
            VisionEncoder::MobileNetV2(model) => model.num_tokens(),
        }
    }

    /// Returns the height and width S of the input images.
    pub fn image_size(&self) -> usize {
        match self {
            VisionEncoder::Clip(model) => model.config().image_size,
            VisionEncoder::Siglip(model) => model.config().image_size,
            VisionEncoder::MobileNetV2(model) => model.config().image_size,
        }
    }

    /// Returns the preprocessing pipeline.
    pub fn preprocessor(&self) -> &ImagePreprocessor {
        match self {
            VisionEncoder::Clip(model) => model.preprocessor(),
            VisionEncoder::Siglip(model) => model.preprocessor(),
            VisionEncoder::MobileNetV2(model) => model.preprocessor(),
        }
    }

    /// Returns a short name of the architecture, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            VisionEncoder::Clip(_) => "CLIP",
            VisionEncoder::Siglip(_) => "SigLIP",
            VisionEncoder::MobileNetV2(_) => "MobileNetV2",
        }
    }
}

/// Tells whether a checkpoint is a timm MobileNetV2, by its metadata or by its stem.
fn is_mobilenet_v2(weights: &SafetensorsWeights) -> bool {
    let metadata = weights.metadata().get(crate::convert::nsfwjs::keys::ARCHITECTURE);
    metadata.is_some_and(|a| a.starts_with("mobilenetv2")) || weights.contains("conv_stem.weight")
}

/// Returns `vision_model.` when the checkpoint stores `name` under that
/// prefix (transformers 4 and full CLIP/SigLIP checkpoints), else "".
fn tensor_prefix(weights: &dyn WeightSource, name: &str) -> String {
    const PREFIX: &str = "vision_model.";
    if weights.contains(&format!("{PREFIX}{name}")) {
        PREFIX.to_string()
    } else {
        String::new()
    }
}

/// Checks the sizes of a ViT config before any tensor is read.
fn check_vit_sizes(origin: &str, hidden: usize, heads: usize, image_size: usize, patch_size: usize, channels: usize) -> Result<()> {
    let problem = if heads == 0 || !hidden.is_multiple_of(heads) {
        Some(format!("hidden_size {hidden} is not divisible by num_attention_heads {heads}"))
    } else if patch_size == 0 || image_size < patch_size {
        Some(format!("patch_size {patch_size} does not fit image_size {image_size}"))
    } else if channels != 3 {
        Some(format!("num_channels {channels}; only RGB (3) images are supported"))
    } else {
        None
    };
    match problem {
        Some(message) => Err(Error::Config { origin: origin.to_string(), message }),
        None => Ok(()),
    }
}

/// Checks that `pixels` is f32 [N, size, size, channels] with N ≥ 1 and returns N.
fn check_pixels(pixels: &Tensor, size: usize, channels: usize) -> Result<usize> {
    let shape = pixels.shape();
    let fits = shape.len() == 4 && shape[0] > 0 && shape[1] == size && shape[2] == size && shape[3] == channels;
    if !fits {
        return Err(Error::InvalidInput(format!(
            "pixels must be [N, {size}, {size}, {channels}] (channels-last, as preprocess returns them stacked), found {shape:?}"
        )));
    }
    if pixels.dtype() != DType::F32 {
        return Err(Error::InvalidInput(format!("pixels must be f32, found {}", pixels.dtype().name())));
    }
    Ok(shape[0])
}
