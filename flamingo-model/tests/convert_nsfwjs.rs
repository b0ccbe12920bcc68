//! Tests of the nsfwjs MobileNetV2 converter against the real npm package.
//!
//! The package folder comes from `scripts/fetch-assets.sh --only nsfwjs`
//! (`$FLAMINGO_CACHE/nsfwjs/mobilenet_v2`). Without it, the tests that need it
//! print why they were skipped and pass, unless `FLAMINGO_REQUIRE_ASSETS=1`
//! is set, which turns a missing package into a failure.
//!
//! Expected values come from code outside this crate: the key list from timm
//! 1.0.31 itself and the weight values from TensorFlow.js 4.22.0 (see
//! fixtures/mobilenet/README.md).

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use flamingo_model::convert::nsfwjs::keys;
use flamingo_model::convert::{convert_nsfwjs_mobilenet_v2, read_nsfwjs_mobilenet_v2};
use flamingo_model::Error;
use safetensors::{Dtype, SafeTensors};

const MODEL_FILE: &str = "model.min.js";
const SHARD_FILE: &str = "group1-shard1of1.min.js";

/// Bytes of weight data in nsfwjs 4.3.0's shard: one byte per uint8-quantized value.
const SHARD_BYTES: usize = 2_619_461;

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/mobilenet")
}

fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FLAMINGO_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("flamingo");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".cache").join("flamingo")
}

/// Returns the nsfwjs model folder, or `None` after printing why the test
/// `test` is skipped.
fn nsfwjs_dir(test: &str) -> Option<PathBuf> {
    let dir = cache_dir().join("nsfwjs").join("mobilenet_v2");
    if dir.join(MODEL_FILE).is_file() && dir.join(SHARD_FILE).is_file() {
        return Some(dir);
    }
    let reason = format!(
        "{} has no {MODEL_FILE} and {SHARD_FILE}; run scripts/fetch-assets.sh --only nsfwjs",
        dir.display()
    );
    if std::env::var("FLAMINGO_REQUIRE_ASSETS").as_deref() == Ok("1") {
        panic!("{test}: {reason} (FLAMINGO_REQUIRE_ASSETS=1 makes this a failure)");
    }
    eprintln!("SKIPPED {test}: {reason}");
    None
}

fn tensor_f32(file: &SafeTensors<'_>, name: &str) -> (Vec<usize>, Vec<f32>) {
    let view = file
        .tensor(name)
        .unwrap_or_else(|error| panic!("tensor `{name}`: {error}"));
    assert_eq!(view.dtype(), Dtype::F32, "dtype of `{name}`");
    let values = view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    (view.shape().to_vec(), values)
}

fn file_metadata(bytes: &[u8]) -> HashMap<String, String> {
    let (_, metadata) = SafeTensors::read_metadata(bytes).expect("valid safetensors header");
    metadata.metadata().clone().expect("metadata present")
}

/// Parses fixtures/mobilenet/timm_mobilenetv2_100_keys.txt: `key d0,d1,...` per line.
fn timm_keys() -> Vec<(String, Vec<usize>)> {
    let text = fs::read_to_string(fixtures_dir().join("timm_mobilenetv2_100_keys.txt"))
        .expect("timm key list");
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| {
            let (key, shape) = line.split_once(' ').expect("`key shape` line");
            (
                key.to_string(),
                shape
                    .split(',')
                    .map(|dim| dim.parse().expect("dimension"))
                    .collect(),
            )
        })
        .collect()
}

fn convert_into_temp(input: &Path) -> (tempfile::TempDir, PathBuf) {
    let out_dir = tempfile::tempdir().unwrap();
    let output = out_dir.path().join("mobilenetv2_100.safetensors");
    convert_nsfwjs_mobilenet_v2(input, &output, false).expect("conversion of the real package");
    (out_dir, output)
}

#[test]
fn real_package_keys_and_shapes() {
    let Some(input) = nsfwjs_dir("real_package_keys_and_shapes") else {
        return;
    };
    let out_dir = tempfile::tempdir().unwrap();
    let output = out_dir.path().join("mobilenetv2_100.safetensors");

    let report = convert_nsfwjs_mobilenet_v2(&input, &output, false).unwrap();
    assert_eq!(report.output, output);
    assert_eq!(report.tensors, 260);
    assert_eq!(report.source_version.as_deref(), Some("4.3.0"));
    assert_eq!(report.bytes, fs::metadata(&output).unwrap().len());

    let bytes = fs::read(&output).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let expected = timm_keys();
    assert_eq!(expected.len(), 260);
    let mut found: Vec<String> = file.names().into_iter().map(str::to_string).collect();
    let mut expected_names: Vec<String> = expected.iter().map(|(key, _)| key.clone()).collect();
    found.sort();
    expected_names.sort();
    assert_eq!(
        found, expected_names,
        "the keys differ from timm's mobilenetv2_100"
    );

    for (key, shape) in &expected {
        let view = file.tensor(key).unwrap();
        assert_eq!(view.shape(), shape.as_slice(), "shape of `{key}`");
        assert_eq!(view.dtype(), Dtype::F32, "dtype of `{key}`");
    }
    let values: usize = expected
        .iter()
        .map(|(_, shape)| shape.iter().product::<usize>())
        .sum();
    assert_eq!(report.values, values);
}

#[test]
fn conversion_is_deterministic() {
    // Checkpoints record the encoder file's SHA-256, so converting the same
    // package twice must give the same bytes (the header's metadata included).
    let Some(input) = nsfwjs_dir("conversion_is_deterministic") else {
        return;
    };
    let (_first_dir, first) = convert_into_temp(&input);
    let (_second_dir, second) = convert_into_temp(&input);
    let (first, second) = (fs::read(first).unwrap(), fs::read(second).unwrap());
    assert!(first == second, "two conversions of the same package differ");
    let file = SafeTensors::deserialize(&first).unwrap();
    assert_eq!(file.names().len(), 260, "the sorted header still reads");
}

#[test]
fn real_package_drops_only_classifier_head() {
    let Some(input) = nsfwjs_dir("real_package_drops_only_classifier_head") else {
        return;
    };
    let converted = read_nsfwjs_mobilenet_v2(&input).unwrap();
    let mut dropped = converted.dropped.clone();
    dropped.sort();
    let expected = [
        "dense_1/bias",
        "dense_1/kernel",
        "dense_2/bias",
        "dense_2/kernel",
        "dense_3/bias",
        "dense_3/kernel",
    ];
    assert_eq!(dropped, expected);
    assert!(converted
        .tensors
        .iter()
        .all(|(name, _)| !name.starts_with("classifier")));
}

/// Keras weight in the TF.js sample, the timm key it becomes, and how its
/// elements move.
#[derive(Clone, Copy)]
enum Layout {
    Vector,
    /// Conv2D `[kh, kw, in, out]` to `[out, in, kh, kw]`.
    Hwio,
    /// DepthwiseConv2D `[kh, kw, channels, 1]` to `[channels, 1, kh, kw]`.
    DepthwiseHwc1,
}

const SAMPLED: [(&str, &str, Layout); 15] = [
    ("Conv1/kernel", "conv_stem.weight", Layout::Hwio),
    ("bn_Conv1/gamma", "bn1.weight", Layout::Vector),
    ("bn_Conv1/beta", "bn1.bias", Layout::Vector),
    ("bn_Conv1/moving_mean", "bn1.running_mean", Layout::Vector),
    (
        "bn_Conv1/moving_variance",
        "bn1.running_var",
        Layout::Vector,
    ),
    (
        "expanded_conv_depthwise/depthwise_kernel",
        "blocks.0.0.conv_dw.weight",
        Layout::DepthwiseHwc1,
    ),
    (
        "expanded_conv_project/kernel",
        "blocks.0.0.conv_pw.weight",
        Layout::Hwio,
    ),
    (
        "expanded_conv_project_BN/moving_variance",
        "blocks.0.0.bn2.running_var",
        Layout::Vector,
    ),
    (
        "block_1_expand/kernel",
        "blocks.1.0.conv_pw.weight",
        Layout::Hwio,
    ),
    (
        "block_6_depthwise/depthwise_kernel",
        "blocks.3.0.conv_dw.weight",
        Layout::DepthwiseHwc1,
    ),
    (
        "block_13_depthwise_BN/beta",
        "blocks.5.0.bn2.bias",
        Layout::Vector,
    ),
    ("Conv_1_bn/gamma", "bn2.weight", Layout::Vector),
    ("Conv_1_bn/beta", "bn2.bias", Layout::Vector),
    ("Conv_1_bn/moving_mean", "bn2.running_mean", Layout::Vector),
    (
        "Conv_1_bn/moving_variance",
        "bn2.running_var",
        Layout::Vector,
    ),
];

/// Every converted value of the sampled tensors must equal, bit for bit, the
/// value TensorFlow.js computes when it dequantizes the same weight.
#[test]
fn real_package_values_match_tfjs() {
    let Some(input) = nsfwjs_dir("real_package_values_match_tfjs") else {
        return;
    };
    let (_out_dir, output) = convert_into_temp(&input);
    let converted_bytes = fs::read(&output).unwrap();
    let converted = SafeTensors::deserialize(&converted_bytes).unwrap();
    let sample_bytes = fs::read(fixtures_dir().join("nsfwjs_weights_sample.safetensors")).unwrap();
    let sample = SafeTensors::deserialize(&sample_bytes).unwrap();

    for (keras_name, timm_name, layout) in SAMPLED {
        let (keras_shape, keras) = tensor_f32(&sample, keras_name);
        let (timm_shape, timm) = tensor_f32(&converted, timm_name);
        assert_eq!(
            keras.len(),
            timm.len(),
            "{keras_name} -> {timm_name}: element count"
        );

        for (index, &expected) in keras.iter().enumerate() {
            let target = match layout {
                Layout::Vector => index,
                Layout::Hwio => {
                    let [kh, kw, cin, cout] = keras_shape[..] else {
                        panic!("{keras_name}: not 4-D")
                    };
                    let (o, i, x, y) = (
                        index % cout,
                        (index / cout) % cin,
                        (index / (cout * cin)) % kw,
                        index / (cout * cin * kw),
                    );
                    assert_eq!(timm_shape, [cout, cin, kh, kw], "{timm_name}: shape");
                    ((o * cin + i) * kh + y) * kw + x
                }
                Layout::DepthwiseHwc1 => {
                    let [kh, kw, channels, 1] = keras_shape[..] else {
                        panic!("{keras_name}: not [kh, kw, c, 1]")
                    };
                    let (c, x, y) = (
                        index % channels,
                        (index / channels) % kw,
                        index / (channels * kw),
                    );
                    assert_eq!(timm_shape, [channels, 1, kh, kw], "{timm_name}: shape");
                    (c * kh + y) * kw + x
                }
            };
            assert_eq!(
                timm[target].to_bits(),
                expected.to_bits(),
                "{timm_name}[{target}] = {}, TF.js {keras_name}[{index}] = {expected}",
                timm[target]
            );
        }
    }
}

#[test]
fn real_package_metadata() {
    let Some(input) = nsfwjs_dir("real_package_metadata") else {
        return;
    };
    let (_out_dir, output) = convert_into_temp(&input);
    let metadata = file_metadata(&fs::read(&output).unwrap());

    let expected: BTreeMap<&str, &str> = [
        (keys::FORMAT, "pt"),
        (keys::ARCHITECTURE, "mobilenetv2_100"),
        (keys::SOURCE, "nsfwjs 4.3.0 (npm), dist/models/mobilenet_v2"),
        (keys::SOURCE_PACKAGE, "nsfwjs"),
        (keys::SOURCE_VERSION, "4.3.0"),
        (
            keys::SOURCE_SHA256,
            "model.min.js=c32f104fd562b08cdff5ed69dfe1209643afa47e792fb12751d2949aa61a397a,\
             group1-shard1of1.min.js=ef2e0a63f7d2c4960b37b024b669313f65d3c45cd59e9042636c55b39de53517",
        ),
        (keys::SOURCE_KERAS_VERSION, "2.2.4"),
        (keys::BN_EPS, "0.001"),
        (keys::PADDING, "tf_same"),
        (keys::ACTIVATION, "relu6"),
        (keys::CLASSIFIER, "none"),
        (keys::FEATURE_LAYER, "out_relu"),
        (keys::FEATURE_MODULE, "bn2"),
        (keys::NUM_FEATURES, "1280"),
        (keys::FEATURE_SIZE, "7,7"),
        (keys::INPUT_SIZE, "3,224,224"),
        (keys::INPUT_COLOR, "rgb"),
        (keys::INPUT_DIVISOR, "255"),
        (keys::MEAN, "0,0,0"),
        (keys::STD, "1,1,1"),
        (keys::INTERPOLATION, "bilinear"),
        (keys::ALIGN_CORNERS, "true"),
        (keys::RESIZE_MODE, "stretch"),
    ]
    .into_iter()
    .collect();
    for (key, value) in &expected {
        assert_eq!(
            metadata.get(*key).map(String::as_str),
            Some(*value),
            "metadata `{key}`"
        );
    }
    assert!(
        metadata[keys::CONVERTER].starts_with("flamingo-model "),
        "{}",
        metadata[keys::CONVERTER]
    );
    assert!(
        metadata[keys::PREPROCESSING].contains("align_corners=true"),
        "{}",
        metadata[keys::PREPROCESSING]
    );
    assert_eq!(
        metadata.len(),
        expected.len() + 2,
        "unexpected metadata keys: {metadata:?}"
    );
}

#[test]
fn existing_output_needs_overwrite() {
    let Some(input) = nsfwjs_dir("existing_output_needs_overwrite") else {
        return;
    };
    let out_dir = tempfile::tempdir().unwrap();
    let output = out_dir.path().join("weights.safetensors");
    fs::write(&output, b"keep me").unwrap();

    let error = convert_nsfwjs_mobilenet_v2(&input, &output, false).unwrap_err();
    match &error {
        Error::Io { path, source } => {
            assert_eq!(path, &output);
            assert_eq!(source.kind(), io::ErrorKind::AlreadyExists);
        }
        other => panic!("expected an I/O error of kind AlreadyExists, got {other:?}"),
    }
    assert!(error.to_string().contains("weights.safetensors"), "{error}");
    assert_eq!(fs::read(&output).unwrap(), b"keep me");

    convert_nsfwjs_mobilenet_v2(&input, &output, true).unwrap();
    let bytes = fs::read(&output).unwrap();
    assert_eq!(SafeTensors::deserialize(&bytes).unwrap().len(), 260);

    let leftovers: Vec<_> = fs::read_dir(out_dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert_eq!(
        leftovers,
        ["weights.safetensors"],
        "temporary files left behind"
    );
}

#[test]
fn missing_output_folder_is_named() {
    let Some(input) = nsfwjs_dir("missing_output_folder_is_named") else {
        return;
    };
    let out_dir = tempfile::tempdir().unwrap();
    let folder = out_dir.path().join("absent");
    let error =
        convert_nsfwjs_mobilenet_v2(&input, folder.join("weights.safetensors"), false).unwrap_err();
    assert!(
        matches!(error, Error::Io { ref path, .. } if path == &folder),
        "{error:?}"
    );
}

/// Copies the real package into a temporary folder, applying `edit` to the
/// text of the named files; `None` from `edit` leaves that file out.
fn edited_package(
    input: &Path,
    edit: impl Fn(&str, String) -> Option<String>,
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for name in [MODEL_FILE, SHARD_FILE] {
        let text = fs::read_to_string(input.join(name)).unwrap();
        if let Some(text) = edit(name, text) {
            fs::write(dir.path().join(name), text).unwrap();
        }
    }
    dir
}

#[test]
fn missing_shard_is_named() {
    let Some(input) = nsfwjs_dir("missing_shard_is_named") else {
        return;
    };
    let package = edited_package(&input, |name, text| (name == MODEL_FILE).then_some(text));
    let output = package.path().join("out.safetensors");

    let message = convert_nsfwjs_mobilenet_v2(package.path(), &output, false)
        .unwrap_err()
        .to_string();
    assert!(message.contains(SHARD_FILE), "{message}");
    assert!(message.contains("`group1-shard1of1`"), "{message}");
    assert!(message.contains("not found"), "{message}");
    assert!(!output.exists());
}

#[test]
fn missing_model_file_is_named() {
    let Some(input) = nsfwjs_dir("missing_model_file_is_named") else {
        return;
    };
    let package = edited_package(&input, |name, text| (name == SHARD_FILE).then_some(text));

    let message = convert_nsfwjs_mobilenet_v2(
        package.path(),
        package.path().join("out.safetensors"),
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(message.contains(MODEL_FILE), "{message}");
    assert!(message.contains("not found"), "{message}");
    assert!(message.contains("nsfwjs"), "{message}");
}

/// The base64 string loses 1000 characters near its end, but the bundle
/// around it stays intact, so the shard decodes to too few bytes.
#[test]
fn truncated_base64_is_detected() {
    let Some(input) = nsfwjs_dir("truncated_base64_is_detected") else {
        return;
    };
    let package = edited_package(&input, |name, text| {
        if name != SHARD_FILE {
            return Some(text);
        }
        let closing_quote = text.rfind('"').unwrap();
        // The last quad keeps its `=` padding, so 1000 characters are exactly 750 bytes.
        Some(format!(
            "{}{}",
            &text[..closing_quote - 1004],
            &text[closing_quote - 4..]
        ))
    });

    let message = convert_nsfwjs_mobilenet_v2(
        package.path(),
        package.path().join("out.safetensors"),
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(message.contains(SHARD_FILE), "{message}");
    assert!(
        message.contains(&format!("decode to {} bytes", SHARD_BYTES - 750)),
        "{message}"
    );
    assert!(
        message.contains(&format!("describes {SHARD_BYTES} bytes")),
        "{message}"
    );
}

/// A shard cut in the middle of its base64 string, as an interrupted
/// download leaves it.
#[test]
fn truncated_shard_file_is_detected() {
    let Some(input) = nsfwjs_dir("truncated_shard_file_is_detected") else {
        return;
    };
    let package = edited_package(&input, |name, text| {
        Some(if name == SHARD_FILE {
            text[..text.len() / 2].to_string()
        } else {
            text
        })
    });

    let message = convert_nsfwjs_mobilenet_v2(
        package.path(),
        package.path().join("out.safetensors"),
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(message.contains(SHARD_FILE), "{message}");
    assert!(message.contains("unterminated string"), "{message}");
    assert!(message.contains("truncated"), "{message}");
}

#[test]
fn invalid_base64_is_detected() {
    let Some(input) = nsfwjs_dir("invalid_base64_is_detected") else {
        return;
    };
    let package = edited_package(&input, |name, text| {
        Some(if name == SHARD_FILE {
            text.replacen("exports=\"", "exports=\"*", 1)
        } else {
            text
        })
    });

    let message = convert_nsfwjs_mobilenet_v2(
        package.path(),
        package.path().join("out.safetensors"),
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(message.contains(SHARD_FILE), "{message}");
    assert!(message.contains("invalid base64"), "{message}");
}

/// The manifest loses the entry of `block_3_expand/kernel`.
#[test]
fn missing_manifest_entry_is_named() {
    let Some(input) = nsfwjs_dir("missing_manifest_entry_is_named") else {
        return;
    };
    let package = edited_package(&input, |name, text| {
        if name != MODEL_FILE {
            return Some(text);
        }
        let start = text
            .find(r#"{name:"block_3_expand/kernel""#)
            .expect("entry in nsfwjs 4.3.0's manifest");
        let end = start + text[start..].find("}},").expect("end of the entry") + "}},".len();
        Some(format!("{}{}", &text[..start], &text[end..]))
    });

    let message = convert_nsfwjs_mobilenet_v2(
        package.path(),
        package.path().join("out.safetensors"),
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(message.contains(MODEL_FILE), "{message}");
    assert!(message.contains("`block_3_expand/kernel`"), "{message}");
    assert!(message.contains("layer `block_3_expand`"), "{message}");
}

/// A manifest shape that disagrees with timm's channel counts is named with both shapes.
#[test]
fn wrong_manifest_shape_is_named() {
    let Some(input) = nsfwjs_dir("wrong_manifest_shape_is_named") else {
        return;
    };
    let package = edited_package(&input, |name, text| {
        Some(if name == MODEL_FILE {
            text.replacen(
                r#"name:"Conv_1_bn/beta",shape:[1280]"#,
                r#"name:"Conv_1_bn/beta",shape:[1281]"#,
                1,
            )
        } else {
            text
        })
    });

    let message = convert_nsfwjs_mobilenet_v2(
        package.path(),
        package.path().join("out.safetensors"),
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(
        message.contains("`Conv_1_bn/beta` has shape [1281]"),
        "{message}"
    );
    assert!(message.contains("needs [1280]"), "{message}");
}

/// The checked-in TF.js reference has the tensors and metadata its README describes.
#[test]
fn reference_fixture_matches_readme() {
    let bytes = fs::read(fixtures_dir().join("chelsea_reference.safetensors")).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();

    let (input_shape, input) = tensor_f32(&file, "input");
    assert_eq!(input_shape, [1, 224, 224, 3]);
    assert!(
        input.iter().all(|value| (0.0..=1.0).contains(value)),
        "input outside [0, 1]"
    );

    let (features_shape, features) = tensor_f32(&file, "out_relu");
    assert_eq!(features_shape, [1, 7, 7, 1280]);
    assert!(
        features.iter().all(|value| (0.0..=6.0).contains(value)),
        "out_relu outside ReLU6 range"
    );

    let (means_shape, means) = tensor_f32(&file, "mean_hw.out_relu");
    assert_eq!(means_shape, [1280]);
    let channel_0_mean = (0..49)
        .map(|position| features[position * 1280])
        .sum::<f32>()
        / 49.0;
    assert!(
        (means[0] - channel_0_mean).abs() < 1e-5,
        "mean_hw.out_relu[0] = {}, recomputed {channel_0_mean}",
        means[0]
    );
    assert_eq!(file.len(), 2 + 19, "input, out_relu and 19 mean_hw tensors");

    let metadata = file_metadata(&bytes);
    assert_eq!(metadata["tfjs_version"], "4.22.0");
    assert_eq!(metadata["image"], "chelsea.png");
    assert_eq!(
        metadata["image_sha256"],
        "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb"
    );
    assert_eq!(metadata["model"], "nsfwjs 4.3.0 dist/models/mobilenet_v2");
    assert_eq!(metadata["layout"], "NHWC");
}
