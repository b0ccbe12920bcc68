//! Safetensors loading: dtypes, folders, shards and malformed files.

mod loader_support;

use std::path::Path;

use flamingo_kernels::HostData;
use flamingo_model::loader::{open_weights, PrefixedWeights, SafetensorsWeights, WeightSource};
use flamingo_model::Error;
use half::{bf16, f16};
use loader_support::{assert_message_contains, f32_bytes, fixtures_dir};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

/// Writes `tensors` (name, dtype, shape, bytes) with the safetensors crate.
fn write_safetensors(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(&str, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            (
                *name,
                TensorView::new(*dtype, shape.clone(), bytes).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// Writes a safetensors file from a header written by hand and raw data.
fn write_raw(path: &Path, header: &str, data: &[u8]) {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes).unwrap();
}

fn float_tensors() -> Vec<(&'static str, Dtype, Vec<usize>, Vec<u8>)> {
    let f16_values = [1.0f32, -2.5, 65504.0, 0.0];
    let bf16_values = [1.0f32, -3.140625, 1e30, -0.0];
    vec![
        (
            "w.f32",
            Dtype::F32,
            vec![2, 3],
            f32_bytes(&[0.5, 1.5, -2.0, 3.25, 1e-30, -7.0]),
        ),
        (
            "w.f16",
            Dtype::F16,
            vec![4],
            f16_values
                .iter()
                .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                .collect(),
        ),
        (
            "w.bf16",
            Dtype::BF16,
            vec![2, 2],
            bf16_values
                .iter()
                .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
                .collect(),
        ),
        (
            "w.f64",
            Dtype::F64,
            vec![2],
            [0.25f64, -1e10]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
    ]
}

#[test]
fn float_dtypes_load() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    write_safetensors(&path, &float_tensors());
    let weights = SafetensorsWeights::open(&path).unwrap();

    assert_eq!(weights.names(), vec!["w.bf16", "w.f16", "w.f32", "w.f64"]);
    assert_eq!(weights.shape("w.f32").unwrap(), vec![2, 3]);
    assert_eq!(weights.dtype("w.bf16").unwrap(), Dtype::BF16);

    let f32_tensor = weights.tensor("w.f32").unwrap();
    assert_eq!(
        f32_tensor.data,
        HostData::F32(vec![0.5, 1.5, -2.0, 3.25, 1e-30, -7.0])
    );

    let f16_tensor = weights.tensor("w.f16").unwrap();
    let expected: Vec<f16> = [1.0f32, -2.5, 65504.0, 0.0]
        .iter()
        .map(|&v| f16::from_f32(v))
        .collect();
    assert_eq!(f16_tensor.data, HostData::F16(expected), "f16 stays f16");

    let bf16_tensor = weights.tensor("w.bf16").unwrap();
    let expected: Vec<f32> = [1.0f32, -3.140625, 1e30, -0.0]
        .iter()
        .map(|&v| bf16::from_f32(v).to_f32())
        .collect();
    assert_eq!(
        bf16_tensor.data,
        HostData::F32(expected),
        "bf16 widens to f32 exactly"
    );
    assert_eq!(bf16_tensor.shape, vec![2, 2]);

    assert_eq!(
        weights.tensor("w.f64").unwrap().data,
        HostData::F32(vec![0.25, -1e10])
    );
    assert_eq!(
        weights.tensor_f32("w.f16").unwrap().to_f32(),
        vec![1.0, -2.5, 65504.0, 0.0]
    );
}

#[test]
fn folder_opens_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    write_safetensors(&dir.path().join("model.safetensors"), &float_tensors());
    let weights = SafetensorsWeights::open(dir.path()).unwrap();
    assert_eq!(weights.names().len(), 4);

    // A folder with one differently named file opens that file.
    let other = tempfile::tempdir().unwrap();
    write_safetensors(
        &other.path().join("open_clip_model.safetensors"),
        &float_tensors(),
    );
    assert_eq!(
        SafetensorsWeights::open(other.path())
            .unwrap()
            .names()
            .len(),
        4
    );

    let empty = tempfile::tempdir().unwrap();
    let error = SafetensorsWeights::open(empty.path()).err().unwrap();
    assert_message_contains(
        &error,
        &["model.safetensors.index.json", "model.safetensors"],
    );
}

fn write_sharded(dir: &Path) {
    write_safetensors(
        &dir.join("model-00001-of-00002.safetensors"),
        &[
            ("a.weight", Dtype::F32, vec![2], f32_bytes(&[1.0, 2.0])),
            ("b.weight", Dtype::F32, vec![1], f32_bytes(&[3.0])),
        ],
    );
    write_safetensors(
        &dir.join("model-00002-of-00002.safetensors"),
        &[("c.weight", Dtype::F32, vec![1, 2], f32_bytes(&[4.0, 5.0]))],
    );
    let index = r#"{
        "metadata": {"total_size": 20},
        "weight_map": {
            "a.weight": "model-00001-of-00002.safetensors",
            "b.weight": "model-00001-of-00002.safetensors",
            "c.weight": "model-00002-of-00002.safetensors"
        }
    }"#;
    std::fs::write(dir.join("model.safetensors.index.json"), index).unwrap();
}

#[test]
fn sharded_checkpoint_opens() {
    let dir = tempfile::tempdir().unwrap();
    write_sharded(dir.path());
    let weights = SafetensorsWeights::open(dir.path()).unwrap();

    assert_eq!(weights.names(), vec!["a.weight", "b.weight", "c.weight"]);
    assert_eq!(weights.shard_paths().len(), 2);
    assert_eq!(
        weights.tensor("a.weight").unwrap().data,
        HostData::F32(vec![1.0, 2.0])
    );
    assert_eq!(weights.tensor("c.weight").unwrap().shape, vec![1, 2]);
    assert_eq!(
        weights.tensor("c.weight").unwrap().data,
        HostData::F32(vec![4.0, 5.0])
    );
    assert_eq!(
        weights.metadata().get("total_size").map(String::as_str),
        Some("20")
    );
}

#[test]
fn missing_shard_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    write_sharded(dir.path());
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();

    let error = SafetensorsWeights::open(dir.path()).err().unwrap();
    assert!(matches!(error, Error::Format { .. }), "{error:?}");
    assert_message_contains(
        &error,
        &[
            "model-00002-of-00002.safetensors",
            "is missing",
            "`c.weight`",
        ],
    );
}

#[test]
fn index_naming_absent_tensor_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    write_sharded(dir.path());
    let index = r#"{"weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                                    "z.weight": "model-00002-of-00002.safetensors"}}"#;
    std::fs::write(dir.path().join("model.safetensors.index.json"), index).unwrap();

    let error = SafetensorsWeights::open(dir.path()).err().unwrap();
    assert_message_contains(
        &error,
        &[
            "`z.weight`",
            "model-00002-of-00002.safetensors",
            "no such tensor",
        ],
    );
}

#[test]
fn truncated_file_names_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    write_safetensors(
        &path,
        &[
            ("first", Dtype::F32, vec![4], f32_bytes(&[1.0; 4])),
            ("second", Dtype::F32, vec![4], f32_bytes(&[2.0; 4])),
        ],
    );
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();

    let error = SafetensorsWeights::open(&path).err().unwrap();
    assert!(matches!(error, Error::Format { .. }), "{error:?}");
    assert_message_contains(
        &error,
        &[
            "truncated",
            "`second`",
            &format!("{} bytes long", bytes.len() - 3),
        ],
    );
}

#[test]
fn bad_headers_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.safetensors");

    std::fs::write(&path, [1u8, 2, 3]).unwrap();
    let error = SafetensorsWeights::open(&path).err().unwrap();
    assert_message_contains(&error, &["3 bytes long", "too short"]);

    std::fs::write(&path, u64::MAX.to_le_bytes()).unwrap();
    let error = SafetensorsWeights::open(&path).err().unwrap();
    assert_message_contains(&error, &["header length", "not a safetensors file"]);

    let mut bytes = 100u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    std::fs::write(&path, bytes).unwrap();
    let error = SafetensorsWeights::open(&path).err().unwrap();
    assert_message_contains(&error, &["truncated", "header needs bytes 8..108"]);

    write_raw(&path, "{not json", &[]);
    let error = SafetensorsWeights::open(&path).err().unwrap();
    assert_message_contains(&error, &["not a valid JSON object"]);

    write_raw(
        &path,
        r#"{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}"#,
        &[0; 4],
    );
    let error = SafetensorsWeights::open(&path).err().unwrap();
    assert_message_contains(&error, &["`w`", "[2]", "take 8 bytes", "span 4 bytes"]);

    write_raw(
        &path,
        r#"{"w": {"dtype": "F7", "shape": [2], "data_offsets": [0, 8]}}"#,
        &[0; 8],
    );
    let error = SafetensorsWeights::open(&path).err().unwrap();
    assert_message_contains(&error, &["`w`", "F7"]);
}

#[test]
fn shape_check_and_missing_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    write_safetensors(&path, &float_tensors());
    let weights = SafetensorsWeights::open(&path).unwrap();

    let error = weights.tensor_with_shape("w.f32", &[3, 2]).unwrap_err();
    match &error {
        Error::TensorShape {
            name,
            expected,
            found,
            ..
        } => {
            assert_eq!(name, "w.f32");
            assert_eq!(expected, &vec![3, 2]);
            assert_eq!(found, &vec![2, 3]);
        }
        other => panic!("expected a shape error, got {other:?}"),
    }
    assert_message_contains(&error, &["`w.f32`", "[2, 3]", "[3, 2]"]);

    let error = weights.tensor("w.absent").unwrap_err();
    assert!(
        matches!(error, Error::MissingTensor { ref name, .. } if name == "w.absent"),
        "{error:?}"
    );
    assert_message_contains(&error, &["`w.absent`", "missing", "model.safetensors"]);
    assert!(!weights.contains("w.absent"));
}

#[test]
fn unsupported_dtype_names_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let ids: Vec<u8> = [3i64, 4].iter().flat_map(|v| v.to_le_bytes()).collect();
    write_safetensors(&path, &[("position_ids", Dtype::I64, vec![2], ids)]);
    let weights = SafetensorsWeights::open(&path).unwrap();

    assert_eq!(weights.shape("position_ids").unwrap(), vec![2]);
    let error = weights.tensor("position_ids").unwrap_err();
    assert!(matches!(error, Error::Unsupported(_)), "{error:?}");
    assert_message_contains(&error, &["`position_ids`", "I64", "F32, F16, BF16"]);
    assert_eq!(weights.raw_bytes("position_ids").unwrap().len(), 16);
}

#[test]
fn fixture_llama_folder_loads() {
    let weights = open_weights(fixtures_dir().join("lm/tiny_llama")).unwrap();
    assert!(
        weights.origin().contains("safetensors"),
        "{}",
        weights.origin()
    );
    let embed = weights
        .tensor_with_shape("model.embed_tokens.weight", &[384, 32])
        .unwrap();
    assert_eq!(embed.dtype().name(), "f32");
    assert_eq!(
        weights
            .shape("model.layers.1.self_attn.k_proj.weight")
            .unwrap(),
        vec![16, 32]
    );
    assert!(weights.contains("lm_head.weight"));
}

#[test]
fn prefixed_view_strips_the_prefix() {
    let clip = SafetensorsWeights::open(fixtures_dir().join("vision/tiny_clip")).unwrap();
    let full_names = clip.names();
    let vision = PrefixedWeights::new(&clip, "vision_model.");

    let names = vision.names();
    assert_eq!(
        names.len(),
        full_names
            .iter()
            .filter(|name| name.starts_with("vision_model."))
            .count()
    );
    assert!(names.iter().all(|name| !name.starts_with("vision_model.")));
    assert_eq!(
        vision.tensor("embeddings.class_embedding").unwrap(),
        clip.tensor("vision_model.embeddings.class_embedding")
            .unwrap()
    );
    let error = vision.tensor("absent").unwrap_err();
    assert_message_contains(&error, &["`vision_model.absent`"]);
}
