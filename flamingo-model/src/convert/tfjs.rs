//! Reading a TF.js layers model as nsfwjs packages it: browserify bundles
//! that wrap the `model.json` object and base64 weight shards.
//!
//! `model.min.js` exports the usual TF.js `model.json` content
//! (`modelTopology` with the Keras model config, and `weightsManifest`).
//! Each manifest path `P` is stored as `P.min.js`, a bundle that exports the
//! shard's bytes as one base64 string. The weights of a manifest group lie
//! back to back in the concatenation of that group's shards, in manifest
//! order, as TF.js reads them.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use half::f16;
use serde_json::Value;

use super::js_literal::parse_literal_at;
use crate::error::{Error, Result};

/// File name of the bundled model topology and weights manifest.
pub(crate) const MODEL_FILE: &str = "model.min.js";

/// The suffix nsfwjs appends to each manifest path to name its shard bundle.
pub(crate) const SHARD_SUFFIX: &str = ".min.js";

/// Marks the body of module 1 in a browserify bundle, the module that
/// contains the exported value.
const BROWSERIFY_MODULE_MARKER: &str = "{1:[function(";

/// Padding is optional when decoding, as it is for Node's `Buffer.from(text, "base64")`
/// that nsfwjs itself uses.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// One layer of the Keras model config.
#[derive(Debug, Clone)]
pub(crate) struct KerasLayer {
    pub name: String,
    pub class_name: String,
    pub config: Value,
    /// Names of the layers feeding this one, from its first inbound node.
    pub inbound: Vec<String>,
}

/// Storage format of a weight in its shard.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Storage {
    Float32,
    /// Affine quantization: value = q * scale + min, with q an unsigned integer of 1 or 2 bytes.
    Affine {
        bytes: usize,
        scale: f64,
        min: f64,
    },
    Float16,
}

impl Storage {
    fn bytes_per_element(self) -> usize {
        match self {
            Storage::Float32 => 4,
            Storage::Affine { bytes, .. } => bytes,
            Storage::Float16 => 2,
        }
    }
}

/// One entry of the weights manifest.
#[derive(Debug, Clone)]
pub(crate) struct WeightSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub storage: Storage,
}

impl WeightSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// One manifest group: shard paths and the weights stored in them.
#[derive(Debug, Clone)]
pub(crate) struct WeightGroup {
    pub paths: Vec<String>,
    pub weights: Vec<WeightSpec>,
}

/// The topology and weights manifest of a bundled TF.js layers model.
#[derive(Debug, Clone)]
pub(crate) struct LayersModel {
    pub model_file: PathBuf,
    pub keras_version: Option<String>,
    pub layers: Vec<KerasLayer>,
    pub groups: Vec<WeightGroup>,
}

impl LayersModel {
    /// Reads `model.min.js` from `dir`.
    pub fn read(dir: &Path) -> Result<Self> {
        let model_file = dir.join(MODEL_FILE);
        if !model_file.is_file() {
            return Err(Error::format(
                &model_file,
                format!(
                    "not found; expected the folder dist/models/mobilenet_v2 of the npm package nsfwjs, with {MODEL_FILE} and its group*-shard*{SHARD_SUFFIX} files (scripts/fetch-assets.sh puts them in $FLAMINGO_CACHE/nsfwjs/mobilenet_v2)"
                ),
            ));
        }
        let model = read_bundle(&model_file)?;
        let format_error = |message: String| Error::format(&model_file, message);

        let topology = model.get("modelTopology").ok_or_else(|| {
            format_error(
                "the exported object has no `modelTopology`; this is not a TF.js layers model"
                    .into(),
            )
        })?;
        let keras_version = topology
            .get("keras_version")
            .and_then(Value::as_str)
            .map(str::to_string);
        let layer_values = topology
            .pointer("/model_config/config/layers")
            .and_then(Value::as_array)
            .ok_or_else(|| {
                format_error(
                    "`modelTopology.model_config.config.layers` is missing or not an array".into(),
                )
            })?;
        let layers = layer_values
            .iter()
            .map(parse_layer)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(format_error)?;

        let manifest = model
            .get("weightsManifest")
            .and_then(Value::as_array)
            .ok_or_else(|| {
                format_error(
                    "`weightsManifest` is missing or not an array; the weights cannot be located"
                        .into(),
                )
            })?;
        let groups = manifest
            .iter()
            .enumerate()
            .map(|(index, group)| parse_group(index, group))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(format_error)?;

        Ok(Self {
            model_file,
            keras_version,
            layers,
            groups,
        })
    }

    pub fn layer(&self, name: &str) -> Option<&KerasLayer> {
        self.layers.iter().find(|layer| layer.name == name)
    }

    pub fn weight_specs(&self) -> impl Iterator<Item = &WeightSpec> {
        self.groups.iter().flat_map(|group| group.weights.iter())
    }

    pub fn weight_spec(&self, name: &str) -> Option<&WeightSpec> {
        self.weight_specs().find(|spec| spec.name == name)
    }

    /// Lists the shard files of every group in `dir`, in manifest order.
    pub fn shard_files(&self, dir: &Path) -> Vec<PathBuf> {
        self.groups
            .iter()
            .flat_map(|group| group.paths.iter())
            .map(|path| dir.join(format!("{path}{SHARD_SUFFIX}")))
            .collect()
    }

    /// Reads every shard in `dir` and returns each weight dequantized to f32,
    /// in its manifest shape, keyed by its manifest name.
    pub fn read_weights(&self, dir: &Path) -> Result<HashMap<String, Vec<f32>>> {
        let mut weights = HashMap::new();
        for group in &self.groups {
            let (bytes, files) = self.read_group_shards(dir, group)?;

            let needed: usize = group
                .weights
                .iter()
                .map(|spec| spec.numel() * spec.storage.bytes_per_element())
                .sum();
            if bytes.len() != needed {
                return Err(Error::format(
                    files.last().cloned().unwrap_or_else(|| self.model_file.clone()),
                    format!(
                        "the shards {} decode to {} bytes, but the manifest in {} describes {needed} bytes of weights; a shard is truncated or belongs to another model, so fetch the package again",
                        group.paths.join(", "),
                        bytes.len(),
                        self.model_file.display()
                    ),
                ));
            }

            let mut offset = 0;
            for spec in &group.weights {
                let length = spec.numel() * spec.storage.bytes_per_element();
                weights.insert(
                    spec.name.clone(),
                    dequantize(&bytes[offset..offset + length], spec.storage),
                );
                offset += length;
            }
        }
        Ok(weights)
    }

    fn read_group_shards(
        &self,
        dir: &Path,
        group: &WeightGroup,
    ) -> Result<(Vec<u8>, Vec<PathBuf>)> {
        let mut bytes = Vec::new();
        let mut files = Vec::new();
        for path in &group.paths {
            let file = dir.join(format!("{path}{SHARD_SUFFIX}"));
            if !file.is_file() {
                return Err(Error::format(
                    &file,
                    format!(
                        "weight shard `{path}` listed in {} not found; copy every group*-shard*{SHARD_SUFFIX} file of the package into {} (scripts/fetch-assets.sh does this)",
                        self.model_file.display(),
                        dir.display()
                    ),
                ));
            }
            let text = match read_bundle(&file)? {
                Value::String(text) => text,
                other => {
                    return Err(Error::format(
                        &file,
                        format!(
                            "expected the bundle to export a base64 string, but it exports {}",
                            json_kind(&other)
                        ),
                    ))
                }
            };
            let decoded = BASE64.decode(text.trim()).map_err(|error| {
                Error::format(&file, format!("invalid base64 in the weight shard ({error}); the file may be truncated, so fetch the package again"))
            })?;
            bytes.extend_from_slice(&decoded);
            files.push(file);
        }
        Ok((bytes, files))
    }
}

/// Reads a browserify bundle and returns the value its module 1 assigns to
/// `exports`.
pub(crate) fn read_bundle(file: &Path) -> Result<Value> {
    let text = fs::read_to_string(file).map_err(|source| Error::io(file, source))?;
    bundle_export(&text).map_err(|message| Error::format(file, message))
}

fn bundle_export(text: &str) -> std::result::Result<Value, String> {
    let module = text.find(BROWSERIFY_MODULE_MARKER).ok_or_else(|| {
        format!("not a browserify bundle as nsfwjs ships it (no `{BROWSERIFY_MODULE_MARKER}` found); pass the unmodified files from dist/models/ of the npm package nsfwjs")
    })?;
    let assignment = text[module..]
        .find(".exports=")
        .map(|index| module + index + ".exports=".len())
        .ok_or_else(|| "the bundle's module 1 assigns nothing to `exports`".to_string())?;

    let (value, end) = parse_literal_at(text, assignment)
        .map_err(|error| format!("invalid literal exported by the bundle: {error}"))?;

    // The module body closes right after the assignment. Anything else means
    // the export is an expression this reader does not evaluate.
    let rest = text[end..]
        .trim_start()
        .trim_start_matches(';')
        .trim_start();
    if !rest.starts_with('}') {
        return Err(format!("unexpected code after the exported literal at byte {end}; expected the end of the module body"));
    }
    Ok(value)
}

fn parse_layer(value: &Value) -> std::result::Result<KerasLayer, String> {
    let class_name = value
        .get("class_name")
        .and_then(Value::as_str)
        .ok_or("a layer in the model config has no `class_name`")?;
    let config = value.get("config").cloned().unwrap_or(Value::Null);
    let name = value
        .get("name")
        .or_else(|| config.get("name"))
        .and_then(Value::as_str)
        .ok_or_else(|| format!("a {class_name} layer in the model config has no `name`"))?;

    // inbound_nodes: [[[layer_name, node_index, tensor_index, kwargs], ...], ...]
    let inbound = value
        .pointer("/inbound_nodes/0")
        .and_then(Value::as_array)
        .map(|node| {
            node.iter()
                .filter_map(|edge| edge.get(0).and_then(Value::as_str).map(str::to_string))
                .collect()
        })
        .unwrap_or_default();

    Ok(KerasLayer {
        name: name.to_string(),
        class_name: class_name.to_string(),
        config,
        inbound,
    })
}

fn parse_group(index: usize, group: &Value) -> std::result::Result<WeightGroup, String> {
    let paths = group
        .get("paths")
        .and_then(Value::as_array)
        .ok_or_else(|| format!("weightsManifest[{index}] has no `paths` array"))?
        .iter()
        .map(|path| {
            path.as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("weightsManifest[{index}].paths holds a non-string"))
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let weights = group
        .get("weights")
        .and_then(Value::as_array)
        .ok_or_else(|| format!("weightsManifest[{index}] has no `weights` array"))?
        .iter()
        .map(|spec| parse_weight_spec(index, spec))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(WeightGroup { paths, weights })
}

fn parse_weight_spec(group: usize, spec: &Value) -> std::result::Result<WeightSpec, String> {
    let name = spec
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("an entry of weightsManifest[{group}] has no `name`"))?;
    let shape = spec
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(|| format!("manifest entry `{name}` has no `shape` array"))?
        .iter()
        .map(|dim| {
            as_dimension(dim)
                .ok_or_else(|| format!("manifest entry `{name}` has an invalid dimension {dim}"))
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    // Four bytes per element is the most any storage uses, so this check
    // keeps the later byte-size computations from overflowing.
    if shape
        .iter()
        .try_fold(4usize, |bytes, &dim| bytes.checked_mul(dim))
        .is_none()
    {
        return Err(format!(
            "manifest entry `{name}` has shape {shape:?}, too large to address"
        ));
    }

    let dtype = spec
        .get("dtype")
        .and_then(Value::as_str)
        .unwrap_or("float32");
    if dtype != "float32" {
        return Err(format!(
            "manifest entry `{name}` has dtype `{dtype}`; only float32 weights are supported"
        ));
    }

    let storage = match spec.get("quantization") {
        None | Some(Value::Null) => Storage::Float32,
        Some(quantization) => parse_quantization(name, quantization)?,
    };
    Ok(WeightSpec {
        name: name.to_string(),
        shape,
        storage,
    })
}

fn parse_quantization(name: &str, quantization: &Value) -> std::result::Result<Storage, String> {
    let dtype = quantization
        .get("dtype")
        .and_then(Value::as_str)
        .unwrap_or("");
    let affine = |bytes| {
        let field = |key: &str| {
            quantization
                .get(key)
                .and_then(Value::as_f64)
                .ok_or_else(|| {
                    format!(
                        "manifest entry `{name}` is {dtype}-quantized but has no numeric `{key}`"
                    )
                })
        };
        Ok(Storage::Affine {
            bytes,
            scale: field("scale")?,
            min: field("min")?,
        })
    };
    match dtype {
        "uint8" => affine(1),
        "uint16" => affine(2),
        "float16" => Ok(Storage::Float16),
        other => Err(format!("manifest entry `{name}` uses quantization dtype `{other}`; supported are uint8, uint16 and float16")),
    }
}

/// Accepts a non-negative integer, also when a minifier wrote it as a float
/// (`1e3`).
fn as_dimension(value: &Value) -> Option<usize> {
    if let Some(dim) = value.as_u64() {
        return usize::try_from(dim).ok();
    }
    let dim = value.as_f64()?;
    (dim >= 0.0 && dim.fract() == 0.0 && dim <= u32::MAX as f64).then_some(dim as usize)
}

/// Turns stored little-endian elements into f32 values. Affine values are
/// computed in f64 and rounded once to f32, as TF.js does when it fills a
/// Float32Array, so the results match TF.js bit for bit.
fn dequantize(bytes: &[u8], storage: Storage) -> Vec<f32> {
    match storage {
        Storage::Float32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Storage::Affine {
            bytes: 1,
            scale,
            min,
        } => bytes
            .iter()
            .map(|&q| (f64::from(q) * scale + min) as f32)
            .collect(),
        Storage::Affine { scale, min, .. } => bytes
            .chunks_exact(2)
            .map(|b| (f64::from(u16::from_le_bytes([b[0], b[1]])) * scale + min) as f32)
            .collect(),
        Storage::Float16 => bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundle_export_of_string() {
        let text = r#"!function(e){}(function(){return function e(){}({1:[function(e,h,n){h.exports="QUJD"},{}]},{},[1])(1)});"#;
        assert_eq!(bundle_export(text).unwrap(), Value::String("QUJD".into()));
    }

    #[test]
    fn bundle_export_rejects_expression() {
        let text = r#"({1:[function(e,h,n){h.exports="QUJD"+x},{}]},{},[1])"#;
        let error = bundle_export(text).unwrap_err();
        assert!(
            error.contains("unexpected code after the exported literal"),
            "{error}"
        );
    }

    #[test]
    fn bundle_export_requires_browserify() {
        let error = bundle_export(r#"{"modelTopology":{}}"#).unwrap_err();
        assert!(error.contains("not a browserify bundle"), "{error}");
    }

    #[test]
    fn affine_dequantization() {
        let values = dequantize(
            &[0, 1, 255],
            Storage::Affine {
                bytes: 1,
                scale: 0.5,
                min: -1.0,
            },
        );
        assert_eq!(values, vec![-1.0, -0.5, 126.5]);
        let values = dequantize(
            &[1, 1],
            Storage::Affine {
                bytes: 2,
                scale: 1.0,
                min: 0.0,
            },
        );
        assert_eq!(values, vec![257.0]);
    }

    #[test]
    fn float_storage() {
        let bytes: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(dequantize(&bytes, Storage::Float32), vec![1.5, -2.0]);
        let bytes: Vec<u8> = f16::from_f32(0.25).to_le_bytes().to_vec();
        assert_eq!(dequantize(&bytes, Storage::Float16), vec![0.25]);
    }
}
