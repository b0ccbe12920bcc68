//! CLIP's vision tower (transformers' `CLIPVisionModel`), frozen.
//!
//! pixels [N, S, S, 3] (S = image_size, channels-last, normalised) ->
//! patches [N, P, C] (P = (S / patch_size)², C = hidden_size) ->
//! with the class token [N, 1 + P, C] -> + position embeddings ->
//! `pre_layrnorm` -> encoder layers -> tokens [N, P or 1 + P, C].
//!
//! transformers' `last_hidden_state` is the encoder output with the class
//! token and without `post_layernorm`, which it applies only to the pooled
//! class token. [`VisionOptions`] picks the tokens returned here.

use std::path::Path;

use flamingo_kernels::{Activation, Conv2d, Device, HostTensor, Tensor};
use serde::Deserialize;

use super::preprocess::{
    ImagePreprocessor, ImageProcessorConfig, Interpolation, ProcessorDefaults, Resize, OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
};
use super::vit::{load_param, Encoder, EncoderDims, LayerNorm};
use super::{check_pixels, VisionOptions};
use crate::error::{Error, Result};
use crate::loader::WeightSource;

/// The vision part of a CLIP `config.json`: the whole file of a
/// `clip_vision_model`, or the `vision_config` entry of a `clip` model.
/// Defaults are transformers' `CLIPVisionConfig` defaults (ViT-B/32).
#[derive(Debug, Clone, Deserialize)]
pub struct ClipVisionConfig {
    #[serde(default = "default_hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "default_intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "default_num_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "default_num_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "default_num_channels")]
    pub num_channels: usize,
    #[serde(default = "default_image_size")]
    pub image_size: usize,
    #[serde(default = "default_patch_size")]
    pub patch_size: usize,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
}

fn default_hidden_size() -> usize {
    768
}
fn default_intermediate_size() -> usize {
    3072
}
fn default_num_layers() -> usize {
    12
}
fn default_num_heads() -> usize {
    12
}
fn default_num_channels() -> usize {
    3
}
fn default_image_size() -> usize {
    224
}
fn default_patch_size() -> usize {
    32
}
fn default_hidden_act() -> String {
    "quick_gelu".into()
}
fn default_layer_norm_eps() -> f64 {
    1e-5
}

impl ClipVisionConfig {
    /// Reads the vision config out of a parsed `config.json` of model type
    /// `clip_vision_model` (the whole file) or `clip` (its `vision_config`).
    pub fn from_json(config: &serde_json::Value, origin: &str) -> Result<Self> {
        let vision = match config.get("model_type").and_then(|t| t.as_str()) {
            Some("clip") => config.get("vision_config").cloned().unwrap_or_else(|| serde_json::json!({})),
            _ => config.clone(),
        };
        let parsed: Self = serde_json::from_value(vision)
            .map_err(|e| Error::Config { origin: origin.to_string(), message: format!("invalid CLIP vision config: {e}") })?;
        super::check_vit_sizes(
            origin,
            parsed.hidden_size,
            parsed.num_attention_heads,
            parsed.image_size,
            parsed.patch_size,
            parsed.num_channels,
        )?;
        Ok(parsed)
    }

    /// Patches per side of the image.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Returns the image processor defaults of transformers' `CLIPImageProcessor`.
    fn processor_defaults(&self) -> ProcessorDefaults {
        ProcessorDefaults {
            int_size_is_shortest_edge: true,
            size: Resize::ShortestEdge { edge: self.image_size, filter: Interpolation::Bicubic },
            center_crop: Some(self.image_size),
            mean: OPENAI_CLIP_MEAN,
            std: OPENAI_CLIP_STD,
        }
    }
}

/// CLIP's vision tower with its preprocessing.
pub struct ClipVision {
    device: Device,
    config: ClipVisionConfig,
    options: VisionOptions,
    preprocessor: ImagePreprocessor,
    /// [C, 3, patch, patch], no bias.
    patch_embedding: Tensor,
    /// [1, C].
    class_embedding: Tensor,
    /// [1 + P, C].
    position_embedding: Tensor,
    pre_layernorm: LayerNorm,
    encoder: Encoder,
    post_layernorm: LayerNorm,
}

impl ClipVision {
    /// Loads a Hugging Face folder: `config.json`, safetensors weights and,
    /// if present, `preprocessor_config.json` (otherwise CLIP's defaults).
    pub fn load(device: &Device, folder: &Path, config: &serde_json::Value, options: VisionOptions) -> Result<Self> {
        let origin = folder.join("config.json").display().to_string();
        let config = ClipVisionConfig::from_json(config, &origin)?;
        let processor_file = folder.join("preprocessor_config.json");
        let processor = if processor_file.is_file() {
            ImageProcessorConfig::read(&processor_file)?
        } else {
            ImageProcessorConfig::default()
        };
        let preprocessor = processor.to_preprocessor(&config.processor_defaults(), &processor_file.display().to_string())?;
        preprocessor.check_output_size(config.image_size, &processor_file.display().to_string())?;
        let weights = crate::loader::open_weights(folder)?;
        Self::from_weights(device, &*weights, config, preprocessor, options)
    }

    /// Builds the tower from weights named as in transformers' checkpoints,
    /// with or without the `vision_model.` prefix.
    pub fn from_weights(
        device: &Device,
        weights: &dyn WeightSource,
        config: ClipVisionConfig,
        preprocessor: ImagePreprocessor,
        options: VisionOptions,
    ) -> Result<Self> {
        let prefix = super::tensor_prefix(weights, "embeddings.patch_embedding.weight");
        let dtype = options.weight_dtype.unwrap_or_else(|| device.weight_dtype());
        let (c, p) = (config.hidden_size, config.patch_size);
        let tokens = config.grid() * config.grid() + 1;
        let activation = Activation::from_hf_name(&config.hidden_act).ok_or_else(|| {
            Error::Unsupported(format!("CLIP hidden_act `{}`; supported: quick_gelu, gelu, gelu_new, gelu_pytorch_tanh, relu, silu", config.hidden_act))
        })?;

        let patch_name = format!("{prefix}embeddings.patch_embedding.weight");
        let patch_embedding = weights.tensor_f32_with_shape(&patch_name, &[c, config.num_channels, p, p])?;
        let class_embedding = load_param(device, weights, &format!("{prefix}embeddings.class_embedding"), &[c])?;
        let dims = EncoderDims {
            hidden: c,
            intermediate: config.intermediate_size,
            heads: config.num_attention_heads,
            layers: config.num_hidden_layers,
            eps: config.layer_norm_eps,
            activation,
        };
        Ok(Self {
            device: device.clone(),
            patch_embedding: device.upload_as(patch_embedding, dtype)?,
            class_embedding: class_embedding.reshape([1, c])?,
            position_embedding: load_param(device, weights, &format!("{prefix}embeddings.position_embedding.weight"), &[tokens, c])?,
            pre_layernorm: LayerNorm::load(device, weights, &format!("{prefix}pre_layrnorm"), c, config.layer_norm_eps)?,
            encoder: Encoder::load(device, weights, &prefix, dims, dtype)?,
            post_layernorm: LayerNorm::load(device, weights, &format!("{prefix}post_layernorm"), c, config.layer_norm_eps)?,
            config,
            options,
            preprocessor,
        })
    }

    /// Runs the tower on pixels [N, S, S, 3], returning [N, tokens, C].
    pub fn encode(&self, pixels: &Tensor) -> Result<Tensor> {
        let device = &self.device;
        let n = check_pixels(pixels, self.config.image_size, self.config.num_channels)?;
        let (c, p, grid) = (self.config.hidden_size, self.config.patch_size, self.config.grid());

        let conv = Conv2d { stride: (p, p), ..Conv2d::default() };
        let patches = device.conv2d(pixels, &self.patch_embedding, None, &conv)?;
        let patches = patches.reshape([n, grid * grid, c])?;
        let class = device.broadcast_to(&self.class_embedding, &[n, 1, c])?;
        let x = device.concat(&[&class, &patches], 1)?;
        let x = device.broadcast_add(&x, &self.position_embedding)?;
        let x = self.pre_layernorm.forward(device, &x)?;

        let x = self.encoder.forward(device, &x)?;

        let x = if self.options.include_cls { x } else { device.narrow(&x, 1, 1, grid * grid)? };
        if self.options.final_layer_norm {
            return self.post_layernorm.forward(device, &x);
        }
        Ok(x)
    }

    /// Preprocesses one image into [S, S, 3].
    pub fn preprocess(&self, image: &image::DynamicImage) -> Result<HostTensor> {
        self.preprocessor.apply(image)
    }

    pub fn config(&self) -> &ClipVisionConfig {
        &self.config
    }

    pub fn options(&self) -> VisionOptions {
        self.options
    }

    pub fn preprocessor(&self) -> &ImagePreprocessor {
        &self.preprocessor
    }

    /// Tokens per image: the patches, plus one with the class token.
    pub fn num_tokens(&self) -> usize {
        self.config.grid() * self.config.grid() + usize::from(self.options.include_cls)
    }
}
