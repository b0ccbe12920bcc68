//! MobileNetV2 (timm's `mobilenetv2_100` safetensors layout), frozen, with
//! every batch norm folded into the convolution before it at load.
//!
//! pixels [N, S, S, 3] (S = 224, channels-last) -> `conv_stem` 3x3 stride 2
//! [N, S/2, S/2, 32] -> 17 blocks -> `conv_head` 1x1 [N, S/32, S/32, 1280]
//! -> tokens [N, (S/32)², 1280]: 49 tokens of 1280 at 224x224. The output
//! is the head's batch norm followed by ReLU6, which timm's
//! `forward_features` returns and Keras names `out_relu`.
//!
//! Blocks (timm names under `blocks.{stage}.{index}`): stage 0 is one
//! depthwise-separable block, `conv_dw`/`bn1` (ReLU6) then `conv_pw`/`bn2`.
//! Stages 1-6 have 2, 3, 4, 3, 3 and 1 inverted-residual blocks with 24,
//! 32, 64, 96, 160 and 320 output channels. The first block of stages 1, 2,
//! 3 and 5 has stride 2. In each block, `conv_pw`/`bn1` expands the channels
//! 6 times (ReLU6), `conv_dw`/`bn2` is the 3x3 depthwise convolution (ReLU6),
//! and `conv_pwl`/`bn3` projects (no activation). A block adds its input
//! when its stride is 1 and its channels do not change.
//!
//! Folding: with s = γ / √(σ² + ε), a convolution followed by batch norm
//! equals the convolution with weights w·s (per output channel) and bias
//! β − μ·s.
//!
//! Two variants of the weights load the same way and differ only in
//! epsilon, padding and preprocessing:
//!
//! - a plain timm file: ε = 1e-5, PyTorch's symmetric padding, and timm's
//!   eval transform (bicubic resize of the shortest edge to 256, center
//!   crop 224, ImageNet mean and std);
//! - the file converted from nsfwjs's Keras model by
//!   [`crate::convert::convert_nsfwjs_mobilenet_v2`], whose metadata
//!   records ε = 1e-3, TensorFlow "SAME" padding and its preprocessing (see
//!   [`crate::convert::nsfwjs::keys`]).

use std::collections::BTreeMap;
use std::path::Path;

use flamingo_kernels::{Activation, Conv2d, DType, Device, HostTensor, Tensor};
use serde::Deserialize;

use super::preprocess::{
    AlphaMode, CenterCrop, CropRounding, ImagePreprocessor, Interpolation, Resize, IMAGENET_MEAN, IMAGENET_STD,
};
use super::{check_pixels, VisionOptions};
use crate::convert::nsfwjs::keys;
use crate::error::{Error, Result};
use crate::loader::{SafetensorsWeights, WeightSource};

/// The timm architecture name this loader implements.
pub const ARCHITECTURE: &str = "mobilenetv2_100";

/// Channels of the feature map, one visual token's width.
pub const NUM_FEATURES: usize = 1280;

/// Stride from input pixels to feature map cells.
const TOTAL_STRIDE: usize = 32;

const STEM_CHANNELS: usize = 32;
const FIRST_BLOCK_CHANNELS: usize = 16;
const EXPANSION: usize = 6;

/// Stages after the first: blocks, stride of the first block, output channels.
const STAGES: [(usize, usize, usize); 6] = [(2, 2, 24), (3, 2, 32), (4, 2, 64), (3, 1, 96), (3, 2, 160), (1, 1, 320)];

/// The padding convention of the convolutions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// PyTorch's (timm's default): `((stride − 1) + (kernel − 1)) / 2` on every side.
    Symmetric,
    /// TensorFlow's "SAME": total `max((⌈in / stride⌉ − 1)·stride + kernel − in, 0)`,
    /// the smaller half before. A 3x3 stride-2 convolution of an even size
    /// pads 0 before and 1 after.
    TfSame,
}

impl Padding {
    /// Padding [top, left, bottom, right] of a `kernel` x `kernel`
    /// convolution with `stride` over an `height` x `width` input.
    pub fn sides(self, height: usize, width: usize, kernel: usize, stride: usize) -> [usize; 4] {
        match self {
            Padding::Symmetric => {
                let pad = ((stride - 1) + (kernel - 1)) / 2;
                [pad; 4]
            }
            Padding::TfSame => {
                let split = |size: usize| {
                    let out = size.div_ceil(stride);
                    let total = ((out - 1) * stride + kernel).saturating_sub(size);
                    (total / 2, total - total / 2)
                };
                let ((top, bottom), (left, right)) = (split(height), split(width));
                [top, left, bottom, right]
            }
        }
    }
}

/// The training conventions of the weights, as the metadata of a converted
/// file or the `config.json` of a timm folder records them.
#[derive(Debug, Clone, PartialEq)]
pub struct MobileNetV2Config {
    /// Batch-norm epsilon of the running statistics.
    pub bn_eps: f64,
    pub padding: Padding,
    /// Height and width of the input.
    pub image_size: usize,
}

impl Default for MobileNetV2Config {
    /// timm's `mobilenetv2_100`.
    fn default() -> Self {
        Self { bn_eps: 1e-5, padding: Padding::Symmetric, image_size: 224 }
    }
}

/// A timm `config.json` as the Hugging Face hub serves it beside `model.safetensors`.
#[derive(Debug, Clone, Deserialize)]
pub struct TimmConfig {
    pub architecture: String,
    #[serde(default)]
    pub pretrained_cfg: TimmPretrainedConfig,
}

/// The `pretrained_cfg` entry of a timm `config.json`; defaults are those of
/// timm's `mobilenetv2_100` weights.
#[derive(Debug, Clone, Deserialize)]
pub struct TimmPretrainedConfig {
    #[serde(default = "default_input_size")]
    pub input_size: Vec<usize>,
    #[serde(default = "default_interpolation")]
    pub interpolation: String,
    #[serde(default = "default_crop_pct")]
    pub crop_pct: f64,
    #[serde(default = "default_crop_mode")]
    pub crop_mode: String,
    #[serde(default = "default_mean")]
    pub mean: Vec<f32>,
    #[serde(default = "default_std")]
    pub std: Vec<f32>,
}

fn default_input_size() -> Vec<usize> {
    vec![3, 224, 224]
}
fn default_interpolation() -> String {
    "bicubic".into()
}
fn default_crop_pct() -> f64 {
    0.875
}
fn default_crop_mode() -> String {
    "center".into()
}
fn default_mean() -> Vec<f32> {
    IMAGENET_MEAN.to_vec()
}
fn default_std() -> Vec<f32> {
    IMAGENET_STD.to_vec()
}

impl Default for TimmPretrainedConfig {
    fn default() -> Self {
        Self {
            input_size: default_input_size(),
            interpolation: default_interpolation(),
            crop_pct: default_crop_pct(),
            crop_mode: default_crop_mode(),
            mean: default_mean(),
            std: default_std(),
        }
    }
}

impl TimmPretrainedConfig {
    /// timm's eval transform: resize the shortest edge to
    /// ⌊size / crop_pct⌋, center-crop to size (torchvision rounds the
    /// offset half to even), rescale by 1/255, normalise.
    pub fn to_preprocessor(&self, origin: &str) -> Result<(usize, ImagePreprocessor)> {
        let config_error = |message: String| Error::Config { origin: origin.to_string(), message };
        let size = match self.input_size.as_slice() {
            [3, height, width] if height == width => *height,
            other => return Err(config_error(format!("input_size {other:?} is not [3, S, S]"))),
        };
        if self.crop_mode != "center" {
            return Err(Error::Unsupported(format!("{origin}: crop_mode `{}`; only `center` is supported", self.crop_mode)));
        }
        let filter = Interpolation::from_name(&self.interpolation)
            .ok_or_else(|| config_error(format!("interpolation `{}` is not a known filter", self.interpolation)))?;
        if !(self.crop_pct > 0.0 && self.crop_pct <= 1.0) {
            return Err(config_error(format!("crop_pct {} is outside (0, 1]", self.crop_pct)));
        }
        let channels = |values: &[f32], name: &str| -> Result<[f32; 3]> {
            <[f32; 3]>::try_from(values).map_err(|_| config_error(format!("`{name}` has {} values; expected 3", values.len())))
        };
        let preprocessor = ImagePreprocessor {
            alpha: AlphaMode::CompositeOnWhite,
            resize: Some(Resize::ShortestEdge { edge: (size as f64 / self.crop_pct).floor() as usize, filter }),
            center_crop: Some(CenterCrop { height: size, width: size, rounding: CropRounding::HalfEven }),
            rescale: Some(1.0 / 255.0),
            normalize: Some((channels(&self.mean, "mean")?, channels(&self.std, "std")?)),
        };
        Ok((size, preprocessor))
    }
}

/// Reads the training conditions from the safetensors metadata of a
/// converted file. Files without the converter's keys are plain timm files.
pub fn config_from_metadata(metadata: &BTreeMap<String, String>, origin: &str) -> Result<(MobileNetV2Config, ImagePreprocessor)> {
    let unsupported = |key: &str, value: &str, supported: &str| {
        Error::Unsupported(format!("{origin}: metadata `{key}` = `{value}`; supported: {supported}"))
    };
    let invalid = |key: &str, value: &str| Error::Format {
        path: origin.into(),
        message: format!("metadata `{key}` = `{value}` is not valid"),
    };

    if let Some(architecture) = metadata.get(keys::ARCHITECTURE) {
        if architecture != ARCHITECTURE {
            return Err(unsupported(keys::ARCHITECTURE, architecture, ARCHITECTURE));
        }
    }
    if let Some(activation) = metadata.get(keys::ACTIVATION) {
        if activation != "relu6" {
            return Err(unsupported(keys::ACTIVATION, activation, "relu6"));
        }
    }
    let mut config = MobileNetV2Config::default();
    if let Some(eps) = metadata.get(keys::BN_EPS) {
        config.bn_eps = eps.parse().ok().filter(|e: &f64| *e >= 0.0).ok_or_else(|| invalid(keys::BN_EPS, eps))?;
    }
    if let Some(padding) = metadata.get(keys::PADDING) {
        config.padding = match padding.as_str() {
            "tf_same" => Padding::TfSame,
            "symmetric" | "pytorch" => Padding::Symmetric,
            other => return Err(unsupported(keys::PADDING, other, "tf_same, symmetric")),
        };
    }
    if let Some(input_size) = metadata.get(keys::INPUT_SIZE) {
        let sizes: Vec<usize> = input_size.split(',').map(|s| s.trim().parse()).collect::<std::result::Result<_, _>>().map_err(|_| invalid(keys::INPUT_SIZE, input_size))?;
        config.image_size = match sizes.as_slice() {
            [3, height, width] if height == width && *height > 0 => *height,
            _ => return Err(unsupported(keys::INPUT_SIZE, input_size, "3,S,S (square RGB input)")),
        };
    }

    // Without a recorded preprocessing, the weights are timm's own.
    let Some(interpolation) = metadata.get(keys::INTERPOLATION) else {
        let pretrained = TimmPretrainedConfig { input_size: vec![3, config.image_size, config.image_size], ..Default::default() };
        let (_, preprocessor) = pretrained.to_preprocessor(origin)?;
        return Ok((config, preprocessor));
    };
    let preprocessor = preprocessor_from_metadata(metadata, interpolation, config.image_size, origin)?;
    Ok((config, preprocessor))
}

fn preprocessor_from_metadata(metadata: &BTreeMap<String, String>, interpolation: &str, size: usize, origin: &str) -> Result<ImagePreprocessor> {
    let get = |key: &str| metadata.get(key).map(String::as_str);
    let unsupported = |key: &str, value: &str, supported: &str| {
        Error::Unsupported(format!("{origin}: metadata `{key}` = `{value}`; supported: {supported}"))
    };
    let invalid = |key: &str, value: &str| Error::Format {
        path: origin.into(),
        message: format!("metadata `{key}` = `{value}` is not valid"),
    };

    if let Some(color) = get(keys::INPUT_COLOR) {
        if color != "rgb" {
            return Err(unsupported(keys::INPUT_COLOR, color, "rgb"));
        }
    }
    let resize_mode = get(keys::RESIZE_MODE).unwrap_or("stretch");
    if resize_mode != "stretch" {
        return Err(unsupported(keys::RESIZE_MODE, resize_mode, "stretch"));
    }
    let align_corners = get(keys::ALIGN_CORNERS) == Some("true");
    let resize = match (interpolation, align_corners) {
        ("bilinear", true) => Resize::BilinearAlignCorners { height: size, width: size },
        (name, false) => match Interpolation::from_name(name) {
            Some(filter) => Resize::Exact { height: size, width: size, filter },
            None => return Err(unsupported(keys::INTERPOLATION, name, "bilinear, bicubic, box, hamming, lanczos, nearest")),
        },
        (name, true) => return Err(unsupported(keys::INTERPOLATION, name, "bilinear with align_corners")),
    };
    // TensorFlow.js's `fromPixels` drops alpha; Pillow pipelines composite onto white.
    let alpha = match resize {
        Resize::BilinearAlignCorners { .. } => AlphaMode::Drop,
        _ => AlphaMode::CompositeOnWhite,
    };

    let rescale = match get(keys::INPUT_DIVISOR) {
        Some(divisor) => {
            let value: f64 = divisor.parse().ok().filter(|d: &f64| *d > 0.0).ok_or_else(|| invalid(keys::INPUT_DIVISOR, divisor))?;
            Some(1.0 / value)
        }
        None => Some(1.0 / 255.0),
    };
    let channels = |key: &str, default: [f32; 3]| -> Result<[f32; 3]> {
        let Some(text) = get(key) else { return Ok(default) };
        let values: Vec<f32> = text.split(',').map(|s| s.trim().parse()).collect::<std::result::Result<_, _>>().map_err(|_| invalid(key, text))?;
        <[f32; 3]>::try_from(values.as_slice()).map_err(|_| invalid(key, text))
    };
    let (mean, std) = (channels(keys::MEAN, [0.0; 3])?, channels(keys::STD, [1.0; 3])?);
    if std.contains(&0.0) {
        return Err(invalid(keys::STD, get(keys::STD).unwrap_or_default()));
    }
    let normalize = (mean != [0.0; 3] || std != [1.0; 3]).then_some((mean, std));

    Ok(ImagePreprocessor { alpha, resize: Some(resize), center_crop: None, rescale, normalize })
}

/// A convolution with its batch norm folded in, and the activation after it.
struct ConvBn {
    /// [Cout, Cin / groups, k, k].
    weight: Tensor,
    /// [Cout].
    bias: Tensor,
    kernel: usize,
    stride: usize,
    groups: usize,
    activation: Activation,
}

/// The shape of one convolution, for loading.
struct ConvSpec<'a> {
    conv: &'a str,
    bn: &'a str,
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    depthwise: bool,
    activation: Activation,
}

impl ConvBn {
    fn load(device: &Device, weights: &dyn WeightSource, spec: ConvSpec, eps: f64, dtype: DType) -> Result<Self> {
        let per_group = if spec.depthwise { 1 } else { spec.in_channels };
        let shape = [spec.out_channels, per_group, spec.kernel, spec.kernel];
        let mut weight = weights.tensor_f32_with_shape(&format!("{}.weight", spec.conv), &shape)?.to_f32();
        let bn = |name: &str| -> Result<Vec<f32>> {
            Ok(weights.tensor_f32_with_shape(&format!("{}.{name}", spec.bn), &[spec.out_channels])?.to_f32())
        };
        let (gamma, beta, mean, var) = (bn("weight")?, bn("bias")?, bn("running_mean")?, bn("running_var")?);

        let per_channel = weight.len() / spec.out_channels;
        let mut bias = Vec::with_capacity(spec.out_channels);
        for channel in 0..spec.out_channels {
            let scale = gamma[channel] as f64 / (var[channel] as f64 + eps).sqrt();
            for value in &mut weight[channel * per_channel..(channel + 1) * per_channel] {
                *value = (*value as f64 * scale) as f32;
            }
            bias.push((beta[channel] as f64 - mean[channel] as f64 * scale) as f32);
        }

        Ok(Self {
            weight: device.upload_as(HostTensor::from_f32(shape, weight)?, dtype)?,
            bias: device.from_f32([spec.out_channels], bias)?,
            kernel: spec.kernel,
            stride: spec.stride,
            groups: if spec.depthwise { spec.in_channels } else { 1 },
            activation: spec.activation,
        })
    }

    fn forward(&self, device: &Device, x: &Tensor, padding: Padding) -> Result<Tensor> {
        let spec = Conv2d {
            stride: (self.stride, self.stride),
            padding: padding.sides(x.dim(1), x.dim(2), self.kernel, self.stride),
            groups: self.groups,
            activation: self.activation,
        };
        Ok(device.conv2d(x, &self.weight, Some(&self.bias), &spec)?)
    }
}

/// An inverted-residual block, or the first block without expansion.
struct Block {
    expand: Option<ConvBn>,
    depthwise: ConvBn,
    project: ConvBn,
    residual: bool,
}

/// MobileNetV2 with its preprocessing.
pub struct MobileNetV2 {
    device: Device,
    config: MobileNetV2Config,
    preprocessor: ImagePreprocessor,
    stem: ConvBn,
    blocks: Vec<Block>,
    head: ConvBn,
}

impl MobileNetV2 {
    /// Loads a timm-layout safetensors file, reading how it was trained
    /// from its metadata (see the module documentation).
    pub fn load_file(device: &Device, path: &Path, options: VisionOptions) -> Result<Self> {
        let weights = SafetensorsWeights::open(path)?;
        let (config, preprocessor) = config_from_metadata(weights.metadata(), &path.display().to_string())?;
        Self::from_weights(device, &weights, config, preprocessor, options)
    }

    /// Loads a timm folder: `config.json` (architecture `mobilenetv2_100`)
    /// and `model.safetensors`.
    pub fn load_timm_folder(device: &Device, folder: &Path, config: &serde_json::Value, options: VisionOptions) -> Result<Self> {
        let origin = folder.join("config.json").display().to_string();
        let timm: TimmConfig = serde_json::from_value(config.clone())
            .map_err(|e| Error::Config { origin: origin.clone(), message: format!("invalid timm config: {e}") })?;
        if timm.architecture != ARCHITECTURE {
            return Err(Error::Unsupported(format!(
                "{origin}: timm architecture `{}`; supported: {ARCHITECTURE}",
                timm.architecture
            )));
        }
        let (image_size, preprocessor) = timm.pretrained_cfg.to_preprocessor(&origin)?;
        let weights = SafetensorsWeights::open(folder)?;
        // A converted file keeps its recorded epsilon and padding even in a folder.
        let (mut config, _) = config_from_metadata(weights.metadata(), &origin)?;
        config.image_size = image_size;
        Self::from_weights(device, &weights, config, preprocessor, options)
    }

    /// Builds the network from timm-named weights, folding each batch norm.
    pub fn from_weights(
        device: &Device,
        weights: &dyn WeightSource,
        config: MobileNetV2Config,
        preprocessor: ImagePreprocessor,
        options: VisionOptions,
    ) -> Result<Self> {
        if options.include_cls || options.final_layer_norm {
            return Err(Error::InvalidInput(
                "MobileNetV2 has no class token and no final LayerNorm; set VisionOptions::include_cls and final_layer_norm to false".into(),
            ));
        }
        if config.image_size == 0 || !config.image_size.is_multiple_of(TOTAL_STRIDE) {
            return Err(Error::Unsupported(format!(
                "MobileNetV2 input size {}; it must be a positive multiple of {TOTAL_STRIDE}",
                config.image_size
            )));
        }
        preprocessor.check_output_size(config.image_size, &weights.origin())?;
        let dtype = options.weight_dtype.unwrap_or_else(|| device.weight_dtype());
        let eps = config.bn_eps;
        let load = |spec: ConvSpec| ConvBn::load(device, weights, spec, eps, dtype);
        let relu6 = Activation::Relu6;

        let stem = load(ConvSpec { conv: "conv_stem", bn: "bn1", in_channels: 3, out_channels: STEM_CHANNELS, kernel: 3, stride: 2, depthwise: false, activation: relu6 })?;

        let mut blocks = vec![Block {
            expand: None,
            depthwise: load(ConvSpec { conv: "blocks.0.0.conv_dw", bn: "blocks.0.0.bn1", in_channels: STEM_CHANNELS, out_channels: STEM_CHANNELS, kernel: 3, stride: 1, depthwise: true, activation: relu6 })?,
            project: load(ConvSpec { conv: "blocks.0.0.conv_pw", bn: "blocks.0.0.bn2", in_channels: STEM_CHANNELS, out_channels: FIRST_BLOCK_CHANNELS, kernel: 1, stride: 1, depthwise: false, activation: Activation::Identity })?,
            residual: false,
        }];
        let mut in_channels = FIRST_BLOCK_CHANNELS;
        for (stage_index, &(count, first_stride, out_channels)) in STAGES.iter().enumerate() {
            for index in 0..count {
                let stride = if index == 0 { first_stride } else { 1 };
                let mid = in_channels * EXPANSION;
                let name = |part: &str| format!("blocks.{}.{index}.{part}", stage_index + 1);
                let (conv_pw, bn1, conv_dw, bn2, conv_pwl, bn3) = (name("conv_pw"), name("bn1"), name("conv_dw"), name("bn2"), name("conv_pwl"), name("bn3"));
                blocks.push(Block {
                    expand: Some(load(ConvSpec { conv: &conv_pw, bn: &bn1, in_channels, out_channels: mid, kernel: 1, stride: 1, depthwise: false, activation: relu6 })?),
                    depthwise: load(ConvSpec { conv: &conv_dw, bn: &bn2, in_channels: mid, out_channels: mid, kernel: 3, stride, depthwise: true, activation: relu6 })?,
                    project: load(ConvSpec { conv: &conv_pwl, bn: &bn3, in_channels: mid, out_channels, kernel: 1, stride: 1, depthwise: false, activation: Activation::Identity })?,
                    residual: stride == 1 && in_channels == out_channels,
                });
                in_channels = out_channels;
            }
        }
        let head = load(ConvSpec { conv: "conv_head", bn: "bn2", in_channels, out_channels: NUM_FEATURES, kernel: 1, stride: 1, depthwise: false, activation: relu6 })?;

        Ok(Self { device: device.clone(), config, preprocessor, stem, blocks, head })
    }

    /// Runs the network on pixels [N, S, S, 3], returning the feature map
    /// as tokens [N, (S/32)², 1280] in row-major order of the map.
    pub fn encode(&self, pixels: &Tensor) -> Result<Tensor> {
        let device = &self.device;
        let n = check_pixels(pixels, self.config.image_size, 3)?;
        let padding = self.config.padding;

        let mut x = self.stem.forward(device, pixels, padding)?;
        for block in &self.blocks {
            let input = x.clone();
            if let Some(expand) = &block.expand {
                x = expand.forward(device, &x, padding)?;
            }
            x = block.depthwise.forward(device, &x, padding)?;
            x = block.project.forward(device, &x, padding)?;
            if block.residual {
                x = device.add(&x, &input)?;
            }
        }
        let x = self.head.forward(device, &x, padding)?;

        Ok(x.reshape([n, self.num_tokens(), NUM_FEATURES])?)
    }

    /// Preprocesses one image into [S, S, 3].
    pub fn preprocess(&self, image: &image::DynamicImage) -> Result<HostTensor> {
        self.preprocessor.apply(image)
    }

    pub fn config(&self) -> &MobileNetV2Config {
        &self.config
    }

    pub fn preprocessor(&self) -> &ImagePreprocessor {
        &self.preprocessor
    }

    /// Returns the number of feature map cells, one token each: 49 at 224x224.
    pub fn num_tokens(&self) -> usize {
        let side = self.config.image_size / TOTAL_STRIDE;
        side * side
    }
}

#[cfg(test)]
mod tests {
    use super::Padding;

    #[test]
    fn tf_same_pads_after_for_even_stride_two() {
        assert_eq!(Padding::TfSame.sides(224, 224, 3, 2), [0, 0, 1, 1]);
        assert_eq!(Padding::TfSame.sides(7, 7, 3, 2), [1, 1, 1, 1]);
        assert_eq!(Padding::TfSame.sides(112, 112, 3, 1), [1, 1, 1, 1]);
        assert_eq!(Padding::TfSame.sides(56, 56, 1, 1), [0; 4]);
    }

    #[test]
    fn symmetric_matches_timm() {
        assert_eq!(Padding::Symmetric.sides(224, 224, 3, 2), [1; 4]);
        assert_eq!(Padding::Symmetric.sides(112, 112, 3, 1), [1; 4]);
        assert_eq!(Padding::Symmetric.sides(56, 56, 1, 1), [0; 4]);
    }
}
