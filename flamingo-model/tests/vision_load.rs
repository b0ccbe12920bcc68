//! Loading vision encoders: format detection, timm's MobileNetV2 layout,
//! and the errors a user meets with a wrong or unsupported checkpoint.

mod vision_support;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use flamingo_kernels::{Device, HostTensor};
use flamingo_model::loader::{InMemoryWeights, WeightSource};
use flamingo_model::vision::mobilenet_v2::{config_from_metadata, MobileNetV2Config};
use flamingo_model::vision::preprocess::{AlphaMode, CenterCrop, CropRounding, Interpolation, Resize, IMAGENET_MEAN, IMAGENET_STD};
use flamingo_model::vision::{MobileNetV2, Padding, VisionEncoder, VisionOptions};
use flamingo_model::Error;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use vision_support::fixtures_dir;

/// Reads the keys and shapes of timm 1.0.31's `mobilenetv2_100`
/// (num_classes=0), as timm itself listed them.
fn timm_keys() -> Vec<(String, Vec<usize>)> {
    let text = std::fs::read_to_string(fixtures_dir().join("mobilenet/timm_mobilenetv2_100_keys.txt")).unwrap();
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| {
            let (name, shape) = line.split_once(' ').unwrap();
            (name.to_string(), shape.split(',').map(|d| d.parse().unwrap()).collect())
        })
        .collect()
}

/// Builds deterministic small weights for every timm key: convolutions in
/// ±0.05, batch norms with weight 1 ± 0.1, bias ± 0.1, mean ± 0.1, variance 1 + [0, 0.2).
fn synthetic_timm_tensors() -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut state = 0x2545_f491_u64;
    let mut next = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    timm_keys()
        .into_iter()
        .map(|(name, shape)| {
            let count = shape.iter().product();
            let values = (0..count)
                .map(|_| match name.rsplit('.').next().unwrap() {
                    "running_var" => 1.1 + 0.1 * next(),
                    "weight" if shape.len() == 1 => 1.0 + 0.1 * next(),
                    _ if shape.len() == 1 => 0.1 * next(),
                    _ => 0.05 * next(),
                })
                .collect();
            (name, shape, values)
        })
        .collect()
}

fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)], metadata: Option<HashMap<String, String>>) {
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, _, values)| values.iter().flat_map(|v| v.to_le_bytes()).collect()).collect();
    let views: Vec<(&str, TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), data)| (name.as_str(), TensorView::new(Dtype::F32, shape.clone(), data).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, metadata, path).unwrap();
}

/// Copies a fixture folder into a temporary one, replacing its weights
/// file by `tensors`.
fn copy_with_weights(fixture: &str, folder: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) -> PathBuf {
    let source = fixtures_dir().join(fixture);
    let target = folder.join(fixture.rsplit('/').next().unwrap());
    std::fs::create_dir_all(&target).unwrap();
    for file in ["config.json", "preprocessor_config.json"] {
        std::fs::copy(source.join(file), target.join(file)).unwrap();
    }
    write_safetensors(&target.join("model.safetensors"), tensors, None);
    target
}

fn fixture_tensors(relative: &str) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(fixtures_dir().join(relative)).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<_> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            (name, view.shape().to_vec(), values)
        })
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors
}

#[test]
fn unknown_model_type_names_supported_types() {
    let folder = tempfile::tempdir().unwrap();
    std::fs::write(folder.path().join("config.json"), r#"{"model_type": "vit", "hidden_size": 32}"#).unwrap();
    let error = VisionEncoder::load(&Device::cpu(), folder.path(), VisionOptions::default()).err().expect("vit is not supported");
    assert!(matches!(error, Error::Config { .. }), "{error:?}");
    let message = error.to_string();
    assert!(message.contains("`vit`"), "{message}");
    for supported in ["clip_vision_model", "clip", "siglip_vision_model", "siglip", "mobilenetv2_100"] {
        assert!(message.contains(supported), "{message} lacks {supported}");
    }
}

#[test]
fn wrong_shape_names_tensor_and_shapes() {
    let folder = tempfile::tempdir().unwrap();
    let mut tensors = fixture_tensors("vision/tiny_clip/model.safetensors");
    let name = "vision_model.encoder.layers.1.mlp.fc1.weight";
    let entry = tensors.iter_mut().find(|(n, _, _)| n == name).unwrap();
    entry.1 = vec![64, 16];
    entry.2.truncate(64 * 16);
    let path = copy_with_weights("vision/tiny_clip", folder.path(), &tensors);

    let error = VisionEncoder::load(&Device::cpu(), &path, VisionOptions::default()).err().expect("wrong shape");
    match &error {
        Error::TensorShape { name: found_name, expected, found, .. } => {
            assert_eq!(found_name, name);
            assert_eq!(expected, &[64, 32]);
            assert_eq!(found, &[64, 16]);
        }
        other => panic!("expected a tensor shape error, found {other:?}"),
    }
    let message = error.to_string();
    assert!(message.contains(name), "{message}");
    assert!(message.contains("[64, 16]"), "{message}");
    assert!(message.contains("[64, 32]"), "{message}");
}

#[test]
fn missing_tensor_is_named() {
    let folder = tempfile::tempdir().unwrap();
    let tensors: Vec<_> = fixture_tensors("vision/tiny_siglip/model.safetensors")
        .into_iter()
        .filter(|(name, _, _)| name != "vision_model.post_layernorm.bias")
        .collect();
    let path = copy_with_weights("vision/tiny_siglip", folder.path(), &tensors);
    let error = VisionEncoder::load(&Device::cpu(), &path, VisionOptions::default()).err().expect("missing tensor");
    assert!(matches!(error, Error::MissingTensor { .. }), "{error:?}");
    assert!(error.to_string().contains("vision_model.post_layernorm.bias"), "{error}");
}

#[test]
fn unprefixed_clip_checkpoint_loads() {
    // transformers 5 saves a bare vision model without `vision_model.`.
    let folder = tempfile::tempdir().unwrap();
    let tensors: Vec<_> = fixture_tensors("vision/tiny_clip/model.safetensors")
        .into_iter()
        .map(|(name, shape, values)| (name.trim_start_matches("vision_model.").to_string(), shape, values))
        .collect();
    let path = copy_with_weights("vision/tiny_clip", folder.path(), &tensors);
    let device = Device::cpu();
    let prefixed = VisionEncoder::load(&device, fixtures_dir().join("vision/tiny_clip"), VisionOptions::default()).unwrap();
    let bare = VisionEncoder::load(&device, &path, VisionOptions::default()).unwrap();
    let pixels = device.full([1, 30, 30, 3], 0.25).unwrap();
    assert_eq!(
        prefixed.encode(&pixels).unwrap().to_vec_f32().unwrap(),
        bare.encode(&pixels).unwrap().to_vec_f32().unwrap()
    );
}

#[test]
fn full_clip_config_uses_vision_config() {
    let folder = tempfile::tempdir().unwrap();
    let path = copy_with_weights("vision/tiny_clip", folder.path(), &fixture_tensors("vision/tiny_clip/model.safetensors"));
    let vision: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path.join("config.json")).unwrap()).unwrap();
    let full = serde_json::json!({
        "model_type": "clip",
        "projection_dim": 16,
        "text_config": {"hidden_size": 8},
        "vision_config": vision,
    });
    std::fs::write(path.join("config.json"), full.to_string()).unwrap();
    let encoder = VisionEncoder::load(&Device::cpu(), &path, VisionOptions::default()).unwrap();
    assert_eq!((encoder.name(), encoder.image_size(), encoder.num_tokens()), ("CLIP", 30, 25));
}

#[test]
fn missing_path_is_reported() {
    let error = VisionEncoder::load(&Device::cpu(), "/nonexistent/clip-vit", VisionOptions::default()).err().unwrap();
    assert!(matches!(error, Error::Io { .. }), "{error:?}");
    assert!(error.to_string().contains("/nonexistent/clip-vit"), "{error}");
}

#[test]
fn tfjs_folder_asks_for_conversion() {
    let folder = tempfile::tempdir().unwrap();
    std::fs::write(folder.path().join("model.min.js"), "module.exports = {}").unwrap();
    let error = VisionEncoder::load(&Device::cpu(), folder.path(), VisionOptions::default()).err().unwrap();
    assert!(matches!(error, Error::Unsupported(_)), "{error:?}");
    assert!(error.to_string().contains("convert_nsfwjs_mobilenet_v2"), "{error}");
}

#[test]
fn unrelated_safetensors_is_rejected() {
    let error = VisionEncoder::load(&Device::cpu(), fixtures_dir().join("vision/tiny_clip/model.safetensors"), VisionOptions::default())
        .err()
        .expect("a bare CLIP weights file has no config");
    assert!(matches!(error, Error::Unsupported(_)), "{error:?}");
    assert!(error.to_string().contains("config.json"), "{error}");
}

#[test]
fn plain_timm_file_uses_pytorch_conventions() {
    let folder = tempfile::tempdir().unwrap();
    let path = folder.path().join("mobilenetv2_100.safetensors");
    write_safetensors(&path, &synthetic_timm_tensors(), None);

    let device = Device::cpu();
    let encoder = VisionEncoder::load(&device, &path, VisionOptions::default()).unwrap();
    let VisionEncoder::MobileNetV2(model) = &encoder else { panic!("expected MobileNetV2, loaded {}", encoder.name()) };
    assert_eq!(model.config(), &MobileNetV2Config { bn_eps: 1e-5, padding: Padding::Symmetric, image_size: 224 });

    // timm's eval transform for mobilenetv2_100: bicubic to 256, center crop 224, ImageNet statistics.
    let preprocessor = model.preprocessor();
    assert_eq!(preprocessor.alpha, AlphaMode::CompositeOnWhite);
    assert_eq!(preprocessor.resize, Some(Resize::ShortestEdge { edge: 256, filter: Interpolation::Bicubic }));
    assert_eq!(preprocessor.center_crop, Some(CenterCrop { height: 224, width: 224, rounding: CropRounding::HalfEven }));
    assert_eq!(preprocessor.normalize, Some((IMAGENET_MEAN, IMAGENET_STD)));

    assert_eq!((encoder.image_size(), encoder.num_tokens(), encoder.output_dim()), (224, 49, 1280));
    let image = image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(300, 200, |x, y| image::Rgb([x as u8, y as u8, 128])));
    let pixels = device.upload(&encoder.preprocess(&image).unwrap()).unwrap().reshape([1, 224, 224, 3]).unwrap();
    let tokens = encoder.encode(&pixels).unwrap();
    assert_eq!(tokens.shape(), [1, 49, 1280]);
    let values = tokens.to_vec_f32().unwrap();
    assert!(values.iter().all(|v| (0.0..=6.0).contains(v)), "features after ReLU6 lie in [0, 6]");
}

#[test]
fn timm_folder_reads_pretrained_cfg() {
    let folder = tempfile::tempdir().unwrap();
    write_safetensors(&folder.path().join("model.safetensors"), &synthetic_timm_tensors(), None);
    let config = serde_json::json!({
        "architecture": "mobilenetv2_100",
        "num_classes": 0,
        "pretrained_cfg": {"input_size": [3, 224, 224], "interpolation": "bilinear", "crop_pct": 0.95, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    });
    std::fs::write(folder.path().join("config.json"), config.to_string()).unwrap();
    let encoder = VisionEncoder::load(&Device::cpu(), folder.path(), VisionOptions::default()).unwrap();
    let preprocessor = encoder.preprocessor();
    // floor(224 / 0.95) = 235.
    assert_eq!(preprocessor.resize, Some(Resize::ShortestEdge { edge: 235, filter: Interpolation::Bilinear }));
    assert_eq!(preprocessor.normalize, Some(([0.5; 3], [0.25; 3])));

    std::fs::write(folder.path().join("config.json"), r#"{"architecture": "efficientnet_b0"}"#).unwrap();
    let error = VisionEncoder::load(&Device::cpu(), folder.path(), VisionOptions::default()).err().unwrap();
    assert!(matches!(error, Error::Unsupported(_)), "{error:?}");
    assert!(error.to_string().contains("efficientnet_b0"), "{error}");
    assert!(error.to_string().contains("mobilenetv2_100"), "{error}");
}

#[test]
fn mobilenet_wrong_shape_names_tensor() {
    let folder = tempfile::tempdir().unwrap();
    let path = folder.path().join("mobilenetv2_100.safetensors");
    let mut tensors = synthetic_timm_tensors();
    let name = "blocks.3.1.conv_dw.weight";
    let entry = tensors.iter_mut().find(|(n, _, _)| n == name).unwrap();
    assert_eq!(entry.1, [384, 1, 3, 3]);
    entry.1 = vec![384, 1, 5, 5];
    entry.2 = vec![0.0; 384 * 25];
    write_safetensors(&path, &tensors, None);

    let error = VisionEncoder::load(&Device::cpu(), &path, VisionOptions::default()).err().expect("wrong shape");
    match &error {
        Error::TensorShape { name: found_name, expected, found, .. } => {
            assert_eq!(found_name, name);
            assert_eq!(expected, &[384, 1, 3, 3]);
            assert_eq!(found, &[384, 1, 5, 5]);
        }
        other => panic!("expected a tensor shape error, found {other:?}"),
    }
}

#[test]
fn unsupported_metadata_is_rejected() {
    let folder = tempfile::tempdir().unwrap();
    let path = folder.path().join("mobilenetv2.safetensors");
    let metadata = HashMap::from([("padding".to_string(), "reflect".to_string())]);
    write_safetensors(&path, &synthetic_timm_tensors(), Some(metadata));
    let error = VisionEncoder::load(&Device::cpu(), &path, VisionOptions::default()).err().unwrap();
    assert!(matches!(error, Error::Unsupported(_)), "{error:?}");
    assert!(error.to_string().contains("`padding` = `reflect`"), "{error}");
}

/// A weight source that records the names read from it.
struct Recording {
    inner: InMemoryWeights,
    read: Mutex<Vec<String>>,
}

impl WeightSource for Recording {
    fn origin(&self) -> String {
        self.inner.origin()
    }
    fn names(&self) -> Vec<String> {
        self.inner.names()
    }
    fn contains(&self, name: &str) -> bool {
        self.inner.contains(name)
    }
    fn shape(&self, name: &str) -> flamingo_model::Result<Vec<usize>> {
        self.inner.shape(name)
    }
    fn tensor(&self, name: &str) -> flamingo_model::Result<HostTensor> {
        self.read.lock().unwrap().push(name.to_string());
        self.inner.tensor(name)
    }
}

#[test]
fn mobilenet_reads_exactly_timm_keys() {
    let mut inner = InMemoryWeights::new("synthetic timm mobilenetv2_100");
    for (name, shape, values) in synthetic_timm_tensors() {
        inner.insert(name, HostTensor::from_f32(shape, values).unwrap());
    }
    let source = Recording { inner, read: Mutex::new(Vec::new()) };
    let (config, preprocessor) = config_from_metadata(&BTreeMap::new(), "no metadata").unwrap();
    MobileNetV2::from_weights(&Device::cpu(), &source, config, preprocessor, VisionOptions::default()).unwrap();

    let read: BTreeMap<String, usize> = source.read.lock().unwrap().iter().fold(BTreeMap::new(), |mut counts, name| {
        *counts.entry(name.clone()).or_default() += 1;
        counts
    });
    let keys: Vec<String> = timm_keys().into_iter().map(|(name, _)| name).collect();
    assert_eq!(read.keys().cloned().collect::<Vec<_>>(), { let mut sorted = keys.clone(); sorted.sort(); sorted });
    assert!(read.values().all(|&count| count == 1), "every tensor is read once");
}

#[test]
fn encoder_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<VisionEncoder>();
}
