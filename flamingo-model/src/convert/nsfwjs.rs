//! Conversion of the Keras MobileNetV2 in the npm package nsfwjs into timm's
//! `mobilenetv2_100` safetensors layout.
//!
//! Input: the folder `dist/models/mobilenet_v2/` of nsfwjs (4.3.0 is the
//! release this was written and tested against), holding `model.min.js` and
//! `group1-shard1of1.min.js`. It is a Keras 2.2.4 MobileNetV2 (alpha 1.0,
//! 224x224 input) whose weights are uint8-quantized per tensor.
//!
//! Output: the 260 tensors of timm's `mobilenetv2_100` feature extractor in
//! f32, with PyTorch layouts (convolutions `[out, in, kh, kw]`, depthwise
//! convolutions `[channels, 1, kh, kw]`):
//!
//! | Keras layers                                   | timm keys                          |
//! |------------------------------------------------|------------------------------------|
//! | `Conv1`, `bn_Conv1`                            | `conv_stem`, `bn1`                 |
//! | `expanded_conv_depthwise`, `..._BN`            | `blocks.0.0.conv_dw`, `.bn1`       |
//! | `expanded_conv_project`, `..._BN`              | `blocks.0.0.conv_pw`, `.bn2`       |
//! | `block_{n}_expand`, `..._BN`                   | `blocks.{s}.{i}.conv_pw`, `.bn1`   |
//! | `block_{n}_depthwise`, `..._BN`                | `blocks.{s}.{i}.conv_dw`, `.bn2`   |
//! | `block_{n}_project`, `..._BN`                  | `blocks.{s}.{i}.conv_pwl`, `.bn3`  |
//! | `Conv_1`, `Conv_1_bn`                          | `conv_head`, `bn2`                 |
//!
//! Batch norms map `gamma`, `beta`, `moving_mean`, `moving_variance` to
//! `weight`, `bias`, `running_mean`, `running_var`; `num_batches_tracked` is
//! not written. Keras blocks 1-16 fill timm's stages 1-6 in order, with 2, 3,
//! 4, 3, 3 and 1 blocks.
//!
//! The nsfwjs classifier head (average pooling, then dense layers of 256, 128
//! and 5 units) has no counterpart in timm's single `classifier` linear
//! layer, so the converter leaves it out. The file has no `classifier.*`
//! keys, and timm loads it with `num_classes=0`.
//!
//! The weights keep two behaviours of the Keras model that differ from timm's
//! defaults, and the safetensors metadata records both (see [`keys`]): batch
//! norm epsilon 1e-3 (timm: 1e-5) and TensorFlow "SAME" padding, which pads
//! the stride-2 3x3 convolutions by 0 before and 1 after in each spatial
//! dimension at the 224x224 input (timm: 1 on both sides). In timm,
//! `timm.create_model("mobilenetv2_100", num_classes=0, pad_type="same",
//! bn_eps=1e-3)` builds the matching model.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use flamingo_kernels::HostTensor;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::tfjs::{KerasLayer, LayersModel, MODEL_FILE};
use crate::error::{Error, Result};

/// Names of the metadata entries written into the safetensors header. All
/// values are strings, as the format requires.
pub mod keys {
    /// `"pt"`, the value PyTorch-saved safetensors files carry.
    pub const FORMAT: &str = "format";
    /// `"mobilenetv2_100"`, the timm model whose key layout the file uses.
    pub const ARCHITECTURE: &str = "architecture";
    /// A readable origin, e.g. `"nsfwjs 4.3.0 (npm), dist/models/mobilenet_v2"`.
    pub const SOURCE: &str = "source";
    /// `"nsfwjs"`.
    pub const SOURCE_PACKAGE: &str = "source_package";
    /// The nsfwjs release whose files the input matched by SHA-256, or `"unknown"`.
    pub const SOURCE_VERSION: &str = "source_version";
    /// `"<file>=<sha256 hex>"` for every input file, comma-separated.
    pub const SOURCE_SHA256: &str = "source_sha256";
    /// The Keras version recorded in the model topology, e.g. `"2.2.4"`.
    pub const SOURCE_KERAS_VERSION: &str = "source_keras_version";
    /// The crate and version that wrote the file.
    pub const CONVERTER: &str = "converter";
    /// Batch-norm epsilon to use with these running statistics: `"0.001"`.
    pub const BN_EPS: &str = "bn_eps";
    /// `"tf_same"`: TensorFlow "SAME" padding. The total padding of a
    /// dimension is `max((ceil(in / stride) - 1) * stride + kernel - in, 0)`,
    /// and the smaller half goes before. A 3x3 kernel with stride 1 gets 1 on
    /// both sides. With stride 2, the even sizes of a 224x224 input get 0
    /// before and 1 after.
    pub const PADDING: &str = "padding";
    /// `"relu6"`, the activation after every batch norm except the projections.
    pub const ACTIVATION: &str = "activation";
    /// `"none"`: the file has no `classifier.*` tensors.
    pub const CLASSIFIER: &str = "classifier";
    /// `"out_relu"`, the Keras layer whose output the features are.
    pub const FEATURE_LAYER: &str = "feature_layer";
    /// `"bn2"`, the timm module whose output (after its ReLU6) equals the
    /// Keras feature layer; timm's `forward_features` returns it.
    pub const FEATURE_MODULE: &str = "feature_module";
    /// `"1280"`, channels of the feature map.
    pub const NUM_FEATURES: &str = "num_features";
    /// `"7,7"`, height and width of the feature map for a 224x224 input.
    pub const FEATURE_SIZE: &str = "feature_size";
    /// `"3,224,224"`: channels, height and width of the input, as in timm's pretrained configs.
    pub const INPUT_SIZE: &str = "input_size";
    /// `"rgb"`, the channel order of the input.
    pub const INPUT_COLOR: &str = "input_color";
    /// `"255"`: 8-bit pixel values are divided by this.
    pub const INPUT_DIVISOR: &str = "input_divisor";
    /// `"0,0,0"` and `"1,1,1"`: per-channel mean and standard deviation
    /// applied after the division. Identity here, so nothing else is subtracted.
    pub const MEAN: &str = "mean";
    pub const STD: &str = "std";
    /// `"bilinear"`, the resize filter.
    pub const INTERPOLATION: &str = "interpolation";
    /// `"true"`: the resize maps corner pixel centres onto corner pixel
    /// centres (TF's `align_corners=True`, PyTorch's `align_corners=True`).
    pub const ALIGN_CORNERS: &str = "align_corners";
    /// `"stretch"`: the whole image is resized to the input size, without
    /// cropping and without keeping the aspect ratio.
    pub const RESIZE_MODE: &str = "resize_mode";
    /// The preprocessing above in one sentence, for people reading the header.
    pub const PREPROCESSING: &str = "preprocessing";
}

/// SHA-256 of the files of nsfwjs 4.3.0's `dist/models/mobilenet_v2/`, which
/// identify the release because the folder carries no version.
const NSFWJS_4_3_0_SHA256: [(&str, &str); 2] = [
    (
        "model.min.js",
        "c32f104fd562b08cdff5ed69dfe1209643afa47e792fb12751d2949aa61a397a",
    ),
    (
        "group1-shard1of1.min.js",
        "ef2e0a63f7d2c4960b37b024b669313f65d3c45cd59e9042636c55b39de53517",
    ),
];

/// The Keras layer whose output is the feature map.
const FEATURE_LAYER: &str = "out_relu";

/// timm's `mobilenetv2_100` stages after the first (depthwise-separable)
/// block: blocks, stride of the first block, output channels. Every block
/// expands its input channels 6 times.
const INVERTED_RESIDUAL_STAGES: [(usize, usize, usize); 6] = [
    (2, 2, 24),
    (3, 2, 32),
    (4, 2, 64),
    (3, 1, 96),
    (3, 2, 160),
    (1, 1, 320),
];
const EXPANSION: usize = 6;
const STEM_CHANNELS: usize = 32;
const FIRST_BLOCK_CHANNELS: usize = 16;
const NUM_FEATURES: usize = 1280;

/// The result of [`convert_nsfwjs_mobilenet_v2`].
#[derive(Debug, Clone)]
pub struct ConversionReport {
    /// The safetensors file written.
    pub output: PathBuf,
    /// Number of tensors written (260).
    pub tensors: usize,
    /// Number of f32 values written, batch-norm statistics included.
    pub values: usize,
    /// Size of the written file in bytes.
    pub bytes: u64,
    /// Names of the source weights that were not converted: the classifier head.
    pub dropped: Vec<String>,
    /// The nsfwjs release the input files matched by SHA-256, if any.
    pub source_version: Option<String>,
    /// The metadata written into the safetensors header.
    pub metadata: BTreeMap<String, String>,
}

/// The converted weights in memory, before or instead of writing them.
#[derive(Debug, Clone)]
pub struct ConvertedModel {
    /// timm key and tensor, in network order.
    pub tensors: Vec<(String, HostTensor)>,
    /// The metadata entries described in [`keys`].
    pub metadata: BTreeMap<String, String>,
    /// Names of the source weights that were not converted: the classifier head.
    pub dropped: Vec<String>,
    /// The nsfwjs release the input files matched by SHA-256, if any.
    pub source_version: Option<String>,
}

/// Converts the nsfwjs MobileNetV2 in `input_dir` into a timm
/// `mobilenetv2_100` safetensors file at `output_file`.
///
/// The file is written under a temporary name in the output folder, synced,
/// then renamed into place, so a failed run never leaves a partial file.
/// An existing `output_file` is replaced only when `overwrite` is true;
/// otherwise the call fails with an [`Error::Io`] of kind
/// [`io::ErrorKind::AlreadyExists`] before reading the input.
pub fn convert_nsfwjs_mobilenet_v2(
    input_dir: impl AsRef<Path>,
    output_file: impl AsRef<Path>,
    overwrite: bool,
) -> Result<ConversionReport> {
    let output = output_file.as_ref();
    if !overwrite && output.exists() {
        return Err(already_exists(output));
    }

    let converted = read_nsfwjs_mobilenet_v2(input_dir.as_ref())?;
    let bytes = serialize(&converted, output)?;
    write_atomically(output, &bytes, overwrite)?;

    let report = ConversionReport {
        output: output.to_path_buf(),
        tensors: converted.tensors.len(),
        values: converted
            .tensors
            .iter()
            .map(|(_, tensor)| tensor.numel())
            .sum(),
        bytes: bytes.len() as u64,
        dropped: converted.dropped,
        source_version: converted.source_version,
        metadata: converted.metadata,
    };
    tracing::info!(
        output = %report.output.display(),
        tensors = report.tensors,
        values = report.values,
        dropped = report.dropped.len(),
        "wrote timm mobilenetv2_100 weights converted from nsfwjs"
    );
    Ok(report)
}

/// Reads the nsfwjs MobileNetV2 in `input_dir`, checks that its Keras
/// topology is the MobileNetV2 that timm's `mobilenetv2_100` describes, and
/// returns its weights dequantized and renamed into timm's layout.
pub fn read_nsfwjs_mobilenet_v2(input_dir: &Path) -> Result<ConvertedModel> {
    let model = LayersModel::read(input_dir)?;
    let convs = mobilenet_v2_convs();

    let bn_eps = check_topology(&model, &convs)?;
    check_manifest(&model, &convs)?;
    let dropped = unconverted_weights(&model, &convs)?;

    let weights = model.read_weights(input_dir)?;
    let mut tensors = Vec::with_capacity(convs.len() * 5);
    for conv in &convs {
        convert_conv(conv, &weights, &mut tensors)?;
    }

    let (source_sha256, source_version) = identify_source(input_dir, &model)?;
    if source_version.is_none() {
        tracing::warn!(
            input = %input_dir.display(),
            "the input files differ from nsfwjs 4.3.0; converting anyway, with source_version \"unknown\""
        );
    }
    let metadata = metadata(&model, bn_eps, &source_sha256, source_version.as_deref());
    Ok(ConvertedModel {
        tensors,
        metadata,
        dropped,
        source_version,
    })
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum ConvKind {
    /// Keras `Conv2D`, kernel `[kh, kw, in, out]`.
    Full,
    /// Keras `DepthwiseConv2D` with depth multiplier 1, kernel `[kh, kw, channels, 1]`.
    Depthwise,
}

/// One Keras convolution with the batch norm after it, and their timm names.
#[derive(Debug, Clone)]
struct ConvMapping {
    keras_conv: String,
    keras_bn: String,
    timm_conv: String,
    timm_bn: String,
    kind: ConvKind,
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
}

impl ConvMapping {
    fn kernel_weight(&self) -> String {
        match self.kind {
            ConvKind::Full => format!("{}/kernel", self.keras_conv),
            ConvKind::Depthwise => format!("{}/depthwise_kernel", self.keras_conv),
        }
    }

    fn keras_kernel_shape(&self) -> Vec<usize> {
        match self.kind {
            ConvKind::Full => vec![
                self.kernel,
                self.kernel,
                self.in_channels,
                self.out_channels,
            ],
            ConvKind::Depthwise => vec![self.kernel, self.kernel, self.in_channels, 1],
        }
    }

    fn keras_class(&self) -> &'static str {
        match self.kind {
            ConvKind::Full => "Conv2D",
            ConvKind::Depthwise => "DepthwiseConv2D",
        }
    }
}

/// Keras batch-norm weight suffixes and the timm names they map to.
const BN_PARAMETERS: [(&str, &str); 4] = [
    ("gamma", "weight"),
    ("beta", "bias"),
    ("moving_mean", "running_mean"),
    ("moving_variance", "running_var"),
];

/// Builds a mapping from (Keras conv, Keras batch norm) to (timm conv, timm batch norm).
fn conv(
    keras: (&str, &str),
    timm: (&str, &str),
    kind: ConvKind,
    channels: (usize, usize),
    kernel: usize,
    stride: usize,
) -> ConvMapping {
    ConvMapping {
        keras_conv: keras.0.to_string(),
        keras_bn: keras.1.to_string(),
        timm_conv: timm.0.to_string(),
        timm_bn: timm.1.to_string(),
        kind,
        in_channels: channels.0,
        out_channels: channels.1,
        kernel,
        stride,
    }
}

/// Lists every convolution of MobileNetV2 (alpha 1.0) in network order.
fn mobilenet_v2_convs() -> Vec<ConvMapping> {
    use ConvKind::{Depthwise, Full};

    let mut convs = vec![
        conv(
            ("Conv1", "bn_Conv1"),
            ("conv_stem", "bn1"),
            Full,
            (3, STEM_CHANNELS),
            3,
            2,
        ),
        conv(
            ("expanded_conv_depthwise", "expanded_conv_depthwise_BN"),
            ("blocks.0.0.conv_dw", "blocks.0.0.bn1"),
            Depthwise,
            (STEM_CHANNELS, STEM_CHANNELS),
            3,
            1,
        ),
        conv(
            ("expanded_conv_project", "expanded_conv_project_BN"),
            ("blocks.0.0.conv_pw", "blocks.0.0.bn2"),
            Full,
            (STEM_CHANNELS, FIRST_BLOCK_CHANNELS),
            1,
            1,
        ),
    ];

    let mut keras_block = 1;
    let mut in_channels = FIRST_BLOCK_CHANNELS;
    for (stage_index, &(blocks, first_stride, out_channels)) in
        INVERTED_RESIDUAL_STAGES.iter().enumerate()
    {
        let stage = stage_index + 1;
        for index in 0..blocks {
            let stride = if index == 0 { first_stride } else { 1 };
            let mid = in_channels * EXPANSION;
            let k = format!("block_{keras_block}");
            let t = format!("blocks.{stage}.{index}");
            let (expand, expand_bn) = (format!("{k}_expand"), format!("{k}_expand_BN"));
            let (depthwise, depthwise_bn) = (format!("{k}_depthwise"), format!("{k}_depthwise_BN"));
            let (project, project_bn) = (format!("{k}_project"), format!("{k}_project_BN"));
            let (conv_pw, bn1) = (format!("{t}.conv_pw"), format!("{t}.bn1"));
            let (conv_dw, bn2) = (format!("{t}.conv_dw"), format!("{t}.bn2"));
            let (conv_pwl, bn3) = (format!("{t}.conv_pwl"), format!("{t}.bn3"));
            convs.push(conv(
                (&expand, &expand_bn),
                (&conv_pw, &bn1),
                Full,
                (in_channels, mid),
                1,
                1,
            ));
            convs.push(conv(
                (&depthwise, &depthwise_bn),
                (&conv_dw, &bn2),
                Depthwise,
                (mid, mid),
                3,
                stride,
            ));
            convs.push(conv(
                (&project, &project_bn),
                (&conv_pwl, &bn3),
                Full,
                (mid, out_channels),
                1,
                1,
            ));
            in_channels = out_channels;
            keras_block += 1;
        }
    }

    convs.push(conv(
        ("Conv_1", "Conv_1_bn"),
        ("conv_head", "bn2"),
        Full,
        (in_channels, NUM_FEATURES),
        1,
        1,
    ));
    convs
}

/// Checks the Keras topology against timm's `mobilenetv2_100`: layer classes,
/// kernel sizes, strides, padding, residual connections and the feature
/// layer. Returns the batch-norm epsilon, which must be the same everywhere.
fn check_topology(model: &LayersModel, convs: &[ConvMapping]) -> Result<f64> {
    let mismatch = |message: String| {
        Error::format(
            &model.model_file,
            format!("{message}; this converter handles only the Keras MobileNetV2 (alpha 1.0, 224x224 input) of nsfwjs's mobilenet_v2 folder"),
        )
    };

    let mut bn_eps: Option<f64> = None;
    for conv in convs {
        check_conv_layer(model, conv).map_err(mismatch)?;
        let eps = check_bn_layer(model, conv).map_err(mismatch)?;
        match bn_eps {
            None => bn_eps = Some(eps),
            Some(first) if first != eps => {
                return Err(Error::Unsupported(format!(
                    "{}: batch norm `{}` has epsilon {eps}, but earlier ones have {first}; one epsilon per model is supported",
                    model.model_file.display(),
                    conv.keras_bn
                )))
            }
            Some(_) => {}
        }
    }

    check_residuals(model, convs).map_err(mismatch)?;
    check_feature_layer(model).map_err(mismatch)?;
    Ok(bn_eps.unwrap_or(1e-3))
}

fn find_layer<'a>(
    model: &'a LayersModel,
    name: &str,
    class: &str,
) -> std::result::Result<&'a KerasLayer, String> {
    let layer = model
        .layer(name)
        .ok_or_else(|| format!("layer `{name}` ({class}) is missing from the model config"))?;
    if layer.class_name != class {
        return Err(format!(
            "layer `{name}` is a {}, expected a {class}",
            layer.class_name
        ));
    }
    Ok(layer)
}

fn check_config(layer: &KerasLayer, key: &str, expected: Value) -> std::result::Result<(), String> {
    match layer.config.get(key) {
        Some(found) if values_equal(found, &expected) => Ok(()),
        Some(found) => Err(format!(
            "layer `{}` has {key} {found}, expected {expected}",
            layer.name
        )),
        None => Err(format!(
            "layer `{}` has no {key} in its config, expected {expected}",
            layer.name
        )),
    }
}

/// Compares config values, treating numbers by value so that `1` and `1.0`
/// (as a minifier may write them) are equal.
fn values_equal(left: &Value, right: &Value) -> bool {
    match (left, right) {
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (Value::Array(a), Value::Array(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| values_equal(x, y))
        }
        _ => left == right,
    }
}

fn check_conv_layer(model: &LayersModel, conv: &ConvMapping) -> std::result::Result<(), String> {
    let layer = find_layer(model, &conv.keras_conv, conv.keras_class())?;
    check_config(layer, "kernel_size", json!([conv.kernel, conv.kernel]))?;
    check_config(layer, "strides", json!([conv.stride, conv.stride]))?;
    check_config(layer, "use_bias", json!(false))?;
    if layer.config.get("dilation_rate").is_some() {
        check_config(layer, "dilation_rate", json!([1, 1]))?;
    }
    match conv.kind {
        ConvKind::Full => check_config(layer, "filters", json!(conv.out_channels))?,
        ConvKind::Depthwise => check_config(layer, "depth_multiplier", json!(1))?,
    }

    // Stride 2: Keras pads explicitly with ZeroPadding2D ((0, 1), (0, 1)) and
    // convolves with "valid", which equals TF "SAME" at the even sizes of a
    // 224x224 input. Stride 1 with a 3x3 kernel: "same", symmetric. A 1x1
    // kernel needs no padding, so its padding setting does not matter.
    if conv.stride == 2 {
        check_config(layer, "padding", json!("valid"))?;
        let pad_name = layer
            .inbound
            .first()
            .ok_or_else(|| format!("layer `{}` has no input", layer.name))?;
        let pad = find_layer(model, pad_name, "ZeroPadding2D")?;
        check_config(pad, "padding", json!([[0, 1], [0, 1]]))?;
    } else if conv.kernel > 1 {
        check_config(layer, "padding", json!("same"))?;
    }
    Ok(())
}

fn check_bn_layer(model: &LayersModel, conv: &ConvMapping) -> std::result::Result<f64, String> {
    let layer = find_layer(model, &conv.keras_bn, "BatchNormalization")?;
    if layer.inbound.first() != Some(&conv.keras_conv) {
        return Err(format!(
            "batch norm `{}` does not follow layer `{}`",
            conv.keras_bn, conv.keras_conv
        ));
    }
    for key in ["center", "scale"] {
        if layer.config.get(key).is_some() {
            check_config(layer, key, json!(true))?;
        }
    }
    layer
        .config
        .get("epsilon")
        .and_then(Value::as_f64)
        .ok_or_else(|| format!("batch norm `{}` has no numeric epsilon", conv.keras_bn))
}

/// timm adds the block input to its output when the stride is 1 and the
/// channels do not change; Keras marks those blocks with `block_{n}_add`.
fn check_residuals(model: &LayersModel, convs: &[ConvMapping]) -> std::result::Result<(), String> {
    for depthwise in convs
        .iter()
        .filter(|conv| conv.kind == ConvKind::Depthwise && conv.keras_conv.starts_with("block_"))
    {
        let block = depthwise.keras_conv.trim_end_matches("_depthwise");
        let project = convs
            .iter()
            .find(|conv| conv.keras_conv == format!("{block}_project"))
            .expect("every block has a projection");
        let expand = convs
            .iter()
            .find(|conv| conv.keras_conv == format!("{block}_expand"))
            .expect("every block has an expansion");
        let has_skip = depthwise.stride == 1 && expand.in_channels == project.out_channels;

        let add = format!("{block}_add");
        match (has_skip, model.layer(&add)) {
            (true, None) => {
                return Err(format!(
                    "layer `{add}` (the residual connection of {block}) is missing"
                ))
            }
            (false, Some(_)) => {
                return Err(format!(
                    "layer `{add}` adds a residual connection that timm's {block} does not have"
                ))
            }
            _ => {}
        }
    }
    Ok(())
}

fn check_feature_layer(model: &LayersModel) -> std::result::Result<(), String> {
    let layer = find_layer(model, FEATURE_LAYER, "ReLU")?;
    check_config(layer, "max_value", json!(6))?;
    if layer.inbound.first().map(String::as_str) != Some("Conv_1_bn") {
        return Err(format!(
            "feature layer `{FEATURE_LAYER}` does not follow `Conv_1_bn`"
        ));
    }
    Ok(())
}

/// Checks that the manifest has every weight the mapping needs, with the
/// Keras shape timm's channel counts imply.
fn check_manifest(model: &LayersModel, convs: &[ConvMapping]) -> Result<()> {
    for conv in convs {
        let mut expected = vec![(conv.kernel_weight(), conv.keras_kernel_shape())];
        for (keras, _) in BN_PARAMETERS {
            expected.push((
                format!("{}/{keras}", conv.keras_bn),
                vec![conv.out_channels],
            ));
        }

        for (name, shape) in expected {
            let spec = model.weight_spec(&name).ok_or_else(|| {
                Error::format(
                    &model.model_file,
                    format!(
                        "the weights manifest has no entry `{name}` (layer `{}`); the file is damaged or not nsfwjs's MobileNetV2, so fetch the package again",
                        name.split('/').next().unwrap_or(&name)
                    ),
                )
            })?;
            if spec.shape != shape {
                return Err(Error::format(
                    &model.model_file,
                    format!("manifest entry `{name}` has shape {:?}, but timm mobilenetv2_100 needs {shape:?} (Keras layout)", spec.shape),
                ));
            }
        }
    }
    Ok(())
}

/// Lists the manifest weights the mapping does not use. Only weights of the
/// classifier head (Dense layers) may be left over; anything else means the
/// model has parts timm's layout cannot hold.
fn unconverted_weights(model: &LayersModel, convs: &[ConvMapping]) -> Result<Vec<String>> {
    let mut used: Vec<String> = Vec::new();
    for conv in convs {
        used.push(conv.kernel_weight());
        used.extend(
            BN_PARAMETERS
                .iter()
                .map(|(keras, _)| format!("{}/{keras}", conv.keras_bn)),
        );
    }

    let mut dropped = Vec::new();
    for spec in model.weight_specs() {
        if used.contains(&spec.name) {
            continue;
        }
        let layer_name = spec.name.split('/').next().unwrap_or(&spec.name);
        match model.layer(layer_name) {
            Some(layer) if layer.class_name == "Dense" => dropped.push(spec.name.clone()),
            Some(layer) => {
                return Err(Error::Unsupported(format!(
                "{}: weight `{}` of {} layer `{layer_name}` has no place in timm mobilenetv2_100",
                model.model_file.display(),
                spec.name,
                layer.class_name
            )))
            }
            None => {
                return Err(Error::format(
                    &model.model_file,
                    format!(
                        "manifest entry `{}` belongs to no layer of the model config",
                        spec.name
                    ),
                ))
            }
        }
    }
    Ok(dropped)
}

/// Appends the timm tensors of one convolution and its batch norm.
fn convert_conv(
    conv: &ConvMapping,
    weights: &HashMap<String, Vec<f32>>,
    out: &mut Vec<(String, HostTensor)>,
) -> Result<()> {
    let kernel = &weights[&conv.kernel_weight()];
    let (shape, values) = match conv.kind {
        ConvKind::Full => (
            vec![
                conv.out_channels,
                conv.in_channels,
                conv.kernel,
                conv.kernel,
            ],
            hwio_to_oihw(kernel, conv.kernel, conv.in_channels, conv.out_channels),
        ),
        ConvKind::Depthwise => (
            vec![conv.in_channels, 1, conv.kernel, conv.kernel],
            depthwise_hwc1_to_c1hw(kernel, conv.kernel, conv.in_channels),
        ),
    };
    out.push((
        format!("{}.weight", conv.timm_conv),
        HostTensor::from_f32(shape, values)?,
    ));

    for (keras, timm) in BN_PARAMETERS {
        let values = weights[&format!("{}/{keras}", conv.keras_bn)].clone();
        out.push((
            format!("{}.{timm}", conv.timm_bn),
            HostTensor::from_f32([conv.out_channels], values)?,
        ));
    }
    Ok(())
}

/// Transposes a Keras `Conv2D` kernel `[kh, kw, in, out]` into PyTorch's `[out, in, kh, kw]`.
fn hwio_to_oihw(
    values: &[f32],
    kernel: usize,
    in_channels: usize,
    out_channels: usize,
) -> Vec<f32> {
    let mut out = vec![0.0; values.len()];
    for y in 0..kernel {
        for x in 0..kernel {
            for i in 0..in_channels {
                for o in 0..out_channels {
                    out[((o * in_channels + i) * kernel + y) * kernel + x] =
                        values[((y * kernel + x) * in_channels + i) * out_channels + o];
                }
            }
        }
    }
    out
}

/// Transposes a Keras `DepthwiseConv2D` kernel `[kh, kw, channels, 1]` into
/// PyTorch's grouped-convolution layout `[channels, 1, kh, kw]`.
fn depthwise_hwc1_to_c1hw(values: &[f32], kernel: usize, channels: usize) -> Vec<f32> {
    let mut out = vec![0.0; values.len()];
    for y in 0..kernel {
        for x in 0..kernel {
            for c in 0..channels {
                out[(c * kernel + y) * kernel + x] = values[(y * kernel + x) * channels + c];
            }
        }
    }
    out
}

/// Hashes the input files and returns `"<file>=<sha256>"` entries, plus the
/// nsfwjs release when every file matches its pinned hash.
fn identify_source(input_dir: &Path, model: &LayersModel) -> Result<(String, Option<String>)> {
    let mut files = vec![input_dir.join(MODEL_FILE)];
    files.extend(model.shard_files(input_dir));

    let mut entries = Vec::new();
    let mut all_match = files.len() == NSFWJS_4_3_0_SHA256.len();
    for file in &files {
        let bytes = fs::read(file).map_err(|source| Error::io(file, source))?;
        let digest = Sha256::digest(&bytes);
        let hex: String = digest.iter().map(|byte| format!("{byte:02x}")).collect();
        let name = file
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        all_match &= NSFWJS_4_3_0_SHA256
            .iter()
            .any(|(pinned_name, pinned_hash)| *pinned_name == name && *pinned_hash == hex);
        entries.push(format!("{name}={hex}"));
    }
    Ok((entries.join(","), all_match.then(|| "4.3.0".to_string())))
}

fn metadata(
    model: &LayersModel,
    bn_eps: f64,
    source_sha256: &str,
    source_version: Option<&str>,
) -> BTreeMap<String, String> {
    let source = match source_version {
        Some(version) => format!("nsfwjs {version} (npm), dist/models/mobilenet_v2"),
        None => "nsfwjs mobilenet_v2 folder of an unrecognized release".to_string(),
    };
    let entries = [
        (keys::FORMAT, "pt".to_string()),
        (keys::ARCHITECTURE, "mobilenetv2_100".to_string()),
        (keys::SOURCE, source),
        (keys::SOURCE_PACKAGE, "nsfwjs".to_string()),
        (keys::SOURCE_VERSION, source_version.unwrap_or("unknown").to_string()),
        (keys::SOURCE_SHA256, source_sha256.to_string()),
        (keys::SOURCE_KERAS_VERSION, model.keras_version.clone().unwrap_or_else(|| "unknown".to_string())),
        (keys::CONVERTER, format!("flamingo-model {}", env!("CARGO_PKG_VERSION"))),
        (keys::BN_EPS, bn_eps.to_string()),
        (keys::PADDING, "tf_same".to_string()),
        (keys::ACTIVATION, "relu6".to_string()),
        (keys::CLASSIFIER, "none".to_string()),
        (keys::FEATURE_LAYER, FEATURE_LAYER.to_string()),
        (keys::FEATURE_MODULE, "bn2".to_string()),
        (keys::NUM_FEATURES, NUM_FEATURES.to_string()),
        (keys::FEATURE_SIZE, "7,7".to_string()),
        (keys::INPUT_SIZE, "3,224,224".to_string()),
        (keys::INPUT_COLOR, "rgb".to_string()),
        (keys::INPUT_DIVISOR, "255".to_string()),
        (keys::MEAN, "0,0,0".to_string()),
        (keys::STD, "1,1,1".to_string()),
        (keys::INTERPOLATION, "bilinear".to_string()),
        (keys::ALIGN_CORNERS, "true".to_string()),
        (keys::RESIZE_MODE, "stretch".to_string()),
        (
            keys::PREPROCESSING,
            "decode to RGB, divide by 255, resize the whole image bilinearly to 224x224 with align_corners=true (aspect ratio not kept, no crop), no mean or std normalization".to_string(),
        ),
    ];
    entries
        .into_iter()
        .map(|(key, value)| (key.to_string(), value))
        .collect()
}

/// Serializes the tensors as little-endian f32 with the metadata.
fn serialize(converted: &ConvertedModel, output: &Path) -> Result<Vec<u8>> {
    let buffers: Vec<(&str, &[usize], Vec<u8>)> = converted
        .tensors
        .iter()
        .map(|(name, tensor)| {
            let bytes = tensor
                .to_f32()
                .iter()
                .flat_map(|value| value.to_le_bytes())
                .collect();
            (name.as_str(), tensor.shape.as_slice(), bytes)
        })
        .collect();

    let mut views = Vec::with_capacity(buffers.len());
    for (name, shape, bytes) in &buffers {
        let view = TensorView::new(Dtype::F32, shape.to_vec(), bytes).map_err(|error| {
            Error::format(
                output,
                format!("tensor `{name}` could not be serialized: {error}"),
            )
        })?;
        views.push((*name, view));
    }

    let metadata: HashMap<String, String> = converted.metadata.clone().into_iter().collect();
    let bytes = safetensors::serialize(views, Some(metadata)).map_err(|error| {
        Error::format(
            output,
            format!("the safetensors file could not be serialized: {error}"),
        )
    })?;
    Ok(sort_header(bytes))
}

/// Rewrites the JSON header of a serialized safetensors file with its
/// object keys sorted. `safetensors::serialize` takes the metadata as a
/// `HashMap`, whose order changes from run to run, and the file's SHA-256,
/// which checkpoints record, should depend only on its content. The sorted
/// header has the same length, so the data offsets stay valid. If it does
/// not, the bytes are returned unchanged.
fn sort_header(mut bytes: Vec<u8>) -> Vec<u8> {
    let Some(prefix) = bytes.get(..8) else {
        return bytes;
    };
    let length = u64::from_le_bytes(prefix.try_into().expect("the slice has eight bytes")) as usize;
    let Some(header) = bytes.get(8..length.saturating_add(8)) else {
        return bytes;
    };
    // serde_json's objects are BTreeMaps, so writing the value sorts its keys.
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(header.trim_ascii_end()) else {
        return bytes;
    };
    let Ok(sorted) = serde_json::to_vec(&value) else {
        return bytes;
    };
    if sorted.len() != header.trim_ascii_end().len() {
        return bytes;
    }
    bytes[8..8 + sorted.len()].copy_from_slice(&sorted);
    bytes
}

/// Writes `bytes` to a temporary file beside `output`, syncs it, then
/// renames it to `output`. Without `overwrite` the rename fails, rather
/// than replaces, when `output` appeared in the meantime.
fn write_atomically(output: &Path, bytes: &[u8], overwrite: bool) -> Result<()> {
    let folder = match output.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut temporary = tempfile::Builder::new()
        .prefix(".flamingo-convert-")
        .suffix(".partial")
        .tempfile_in(&folder)
        .map_err(|source| Error::io(&folder, source))?;
    temporary
        .write_all(bytes)
        .map_err(|source| Error::io(temporary.path(), source))?;
    temporary
        .as_file()
        .sync_all()
        .map_err(|source| Error::io(temporary.path(), source))?;

    let persisted = if overwrite {
        temporary.persist(output)
    } else {
        temporary.persist_noclobber(output)
    };
    persisted.map_err(|error| {
        if error.error.kind() == io::ErrorKind::AlreadyExists {
            already_exists(output)
        } else {
            Error::io(output, error.error)
        }
    })?;
    Ok(())
}

fn already_exists(output: &Path) -> Error {
    Error::io(
        output,
        io::Error::new(
            io::ErrorKind::AlreadyExists,
            "the output file already exists; delete it, or request overwriting, to replace it",
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conv_list_matches_timm_block_layout() {
        let convs = mobilenet_v2_convs();
        assert_eq!(convs.len(), 52);
        assert_eq!(convs[3].keras_conv, "block_1_expand");
        assert_eq!(convs[3].timm_conv, "blocks.1.0.conv_pw");
        let last_block = &convs[convs.len() - 2];
        assert_eq!(last_block.keras_conv, "block_16_project");
        assert_eq!(last_block.timm_conv, "blocks.6.0.conv_pwl");
        assert_eq!(
            (last_block.in_channels, last_block.out_channels),
            (960, 320)
        );
        let strides: Vec<usize> = convs
            .iter()
            .filter(|conv| conv.kernel == 3)
            .map(|conv| conv.stride)
            .collect();
        assert_eq!(
            strides,
            [2, 1, 2, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1]
        );
    }

    #[test]
    fn hwio_transpose_moves_each_element() {
        // Keras kernel [kh=2, kw=2, in=2, out=3], value = its flat index.
        let keras: Vec<f32> = (0..24).map(|v| v as f32).collect();
        let torch = hwio_to_oihw(&keras, 2, 2, 3);
        // torch[o][i][y][x] == keras[y][x][i][o]
        let (y, x, i, o) = (1, 0, 1, 2);
        assert_eq!(
            torch[((o * 2 + i) * 2 + y) * 2 + x],
            keras[((y * 2 + x) * 2 + i) * 3 + o]
        );
        let mut sorted = torch.clone();
        sorted.sort_by(f32::total_cmp);
        assert_eq!(sorted, keras);
    }

    #[test]
    fn depthwise_transpose_moves_each_element() {
        // Keras kernel [kh=3, kw=3, channels=4, 1].
        let keras: Vec<f32> = (0..36).map(|v| v as f32).collect();
        let torch = depthwise_hwc1_to_c1hw(&keras, 3, 4);
        // torch[c][0][y][x] == keras[y][x][c][0]
        let (y, x, c) = (2, 1, 3);
        assert_eq!(torch[(c * 3 + y) * 3 + x], keras[(y * 3 + x) * 4 + c]);
        let mut sorted = torch.clone();
        sorted.sort_by(f32::total_cmp);
        assert_eq!(sorted, keras);
    }
}
