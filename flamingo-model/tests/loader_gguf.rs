//! GGUF reader: metadata, tensor table, dequantization and malformed files.

mod loader_support;

use flamingo_kernels::quant::GgmlType;
use flamingo_kernels::{HostData, HostTensor};
use flamingo_model::loader::{open_weights, GgufFile, GgufValue, SafetensorsWeights, WeightSource};
use flamingo_model::Error;
use half::f16;
use loader_support::{assert_message_contains, f32_bytes, fixtures_dir, GgufBuilder};
use serde_json::{json, Value};

fn to_json(value: &GgufValue) -> Value {
    match value {
        GgufValue::U8(v) => json!(v),
        GgufValue::I8(v) => json!(v),
        GgufValue::U16(v) => json!(v),
        GgufValue::I16(v) => json!(v),
        GgufValue::U32(v) => json!(v),
        GgufValue::I32(v) => json!(v),
        GgufValue::F32(v) => json!(f64::from(*v)),
        GgufValue::Bool(v) => json!(v),
        GgufValue::String(v) => json!(v),
        GgufValue::Array(items) => Value::Array(items.iter().map(to_json).collect()),
        GgufValue::U64(v) => json!(v),
        GgufValue::I64(v) => json!(v),
        GgufValue::F64(v) => json!(v),
    }
}

fn quant_fixture() -> (GgufFile, Value) {
    let dir = fixtures_dir().join("gguf");
    let gguf = GgufFile::open(dir.join("quant_types.gguf")).unwrap();
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("quant_types.expected.json")).unwrap(),
    )
    .unwrap();
    (gguf, expected)
}

fn f16_bytes(value: f32) -> [u8; 2] {
    f16::from_f32(value).to_le_bytes()
}

#[test]
fn fixture_header_matches_gguf_py() {
    let (gguf, expected) = quant_fixture();
    assert_eq!(json!(gguf.version()), expected["version"]);
    assert_eq!(json!(gguf.alignment()), expected["alignment"]);
    assert_eq!(json!(gguf.data_start()), expected["data_offset"]);
}

#[test]
fn fixture_metadata_matches_gguf_py() {
    let (gguf, expected) = quant_fixture();
    let expected = expected["metadata"].as_object().unwrap();
    assert_eq!(gguf.metadata().count(), expected.len());

    for (key, entry) in expected {
        let value = gguf
            .get(key)
            .unwrap_or_else(|| panic!("metadata key `{key}` is missing"));
        assert_eq!(
            value.type_name().to_uppercase(),
            entry["type"],
            "type of `{key}`"
        );
        if let Some(element_type) = entry["element_type"].as_str() {
            let first = &value.as_array().unwrap()[0];
            assert_eq!(
                first.type_name().to_uppercase(),
                element_type,
                "element type of `{key}`"
            );
        }
        assert_eq!(to_json(value), entry["value"], "value of `{key}`");
    }
}

#[test]
fn fixture_tensor_table_matches_gguf_py() {
    let (gguf, expected) = quant_fixture();
    let expected = expected["tensors"].as_object().unwrap();
    assert_eq!(gguf.tensor_infos().len(), expected.len());

    for (name, entry) in expected {
        let info = gguf
            .tensor_info(name)
            .unwrap_or_else(|| panic!("tensor `{name}` is missing"));
        assert_eq!(info.ggml_type().name(), entry["type"], "type of `{name}`");
        assert_eq!(
            json!(info.ggml_type().id()),
            entry["type_id"],
            "type id of `{name}`"
        );
        assert_eq!(json!(info.dims()), entry["ne"], "ne of `{name}`");
        assert_eq!(
            json!(info.n_bytes()),
            entry["n_bytes"],
            "byte size of `{name}`"
        );
        assert_eq!(
            json!(info.offset()),
            entry["offset_in_data"],
            "data offset of `{name}`"
        );
        assert_eq!(
            json!(gguf.data_start() as u64 + info.offset()),
            entry["offset_in_file"],
            "file offset of `{name}`"
        );
    }
}

#[test]
fn fixture_dequantization_matches_gguf_py() {
    let (gguf, _) = quant_fixture();
    let expected =
        SafetensorsWeights::open(fixtures_dir().join("gguf/quant_types.expected.safetensors"))
            .unwrap();

    for info in gguf.tensor_infos() {
        let name = info.name();
        let tensor = gguf.tensor(name).unwrap();
        let reference = expected.tensor(name).unwrap();
        assert_eq!(tensor.shape, reference.shape, "shape of `{name}`");

        let expected_dtype = if info.ggml_type() == GgmlType::F16 {
            "f16"
        } else {
            "f32"
        };
        assert_eq!(
            tensor.dtype().name(),
            expected_dtype,
            "host dtype of `{name}`"
        );

        let found: Vec<u32> = tensor.to_f32().iter().map(|v| v.to_bits()).collect();
        let wanted: Vec<u32> = reference.to_f32().iter().map(|v| v.to_bits()).collect();
        assert_eq!(found, wanted, "values of `{name}` (compared bit for bit)");
    }
}

#[test]
fn fixture_raw_bytes_are_the_stored_blocks() {
    let (gguf, _) = quant_fixture();
    let raw = gguf.raw_tensor("q4_1.matrix").unwrap();
    assert_eq!(raw.ggml_type, GgmlType::Q4_1);
    assert_eq!(raw.shape, vec![3, 64]);
    assert_eq!(raw.bytes.len(), 3 * 2 * 20);

    let file = std::fs::read(fixtures_dir().join("gguf/quant_types.gguf")).unwrap();
    let start = gguf.data_start() + gguf.tensor_info("q4_1.matrix").unwrap().offset() as usize;
    assert_eq!(&raw.bytes[..], &file[start..start + 120]);
}

#[test]
fn metadata_of_every_type_round_trips() {
    let values = vec![
        ("t.u8", GgufValue::U8(255)),
        ("t.i8", GgufValue::I8(-128)),
        ("t.u16", GgufValue::U16(65535)),
        ("t.i16", GgufValue::I16(-32768)),
        ("t.u32", GgufValue::U32(u32::MAX)),
        ("t.i32", GgufValue::I32(i32::MIN)),
        ("t.f32", GgufValue::F32(-0.125)),
        ("t.bool", GgufValue::Bool(true)),
        ("t.string", GgufValue::String("flamingo 🦩".to_string())),
        ("t.u64", GgufValue::U64(u64::MAX)),
        ("t.i64", GgufValue::I64(i64::MIN)),
        ("t.f64", GgufValue::F64(1e-300)),
        (
            "t.nested",
            GgufValue::Array(vec![
                GgufValue::Array(vec![GgufValue::I32(1), GgufValue::I32(2)]),
                GgufValue::Array(vec![GgufValue::I32(3)]),
            ]),
        ),
        ("t.empty", GgufValue::Array(vec![])),
    ];
    let mut builder = GgufBuilder::new();
    for (key, value) in &values {
        builder = builder.metadata(key, value.clone());
    }
    let dir = tempfile::tempdir().unwrap();
    let gguf = GgufFile::open(builder.write(dir.path(), "types.gguf")).unwrap();

    let read: Vec<(&str, &GgufValue)> = gguf.metadata().collect();
    assert_eq!(read.len(), values.len());
    for ((key, value), (read_key, read_value)) in values.iter().zip(read) {
        assert_eq!(*key, read_key, "keys are kept in file order");
        assert_eq!(value, read_value, "value of `{key}`");
    }
    assert_eq!(gguf.alignment(), 32, "default alignment");
    assert!(gguf.tensor_infos().is_empty());
}

#[test]
fn typed_getters_check_types() {
    let dir = tempfile::tempdir().unwrap();
    let path = GgufBuilder::new()
        .metadata("a.count", GgufValue::I32(7))
        .metadata("a.name", GgufValue::String("x".into()))
        .metadata(
            "a.list",
            GgufValue::Array(vec![
                GgufValue::String("p".into()),
                GgufValue::String("q".into()),
            ]),
        )
        .write(dir.path(), "typed.gguf");
    let gguf = GgufFile::open(path).unwrap();

    assert_eq!(gguf.get_u64("a.count").unwrap(), Some(7));
    assert_eq!(gguf.get_f64("a.count").unwrap(), Some(7.0));
    assert_eq!(gguf.get_str("a.name").unwrap(), Some("x"));
    assert_eq!(
        gguf.get_string_array("a.list").unwrap(),
        Some(vec!["p", "q"])
    );
    assert_eq!(gguf.get_u64("a.absent").unwrap(), None);

    let error = gguf.get_u64("a.name").unwrap_err();
    assert_message_contains(&error, &["`a.name`", "string", "non-negative integer"]);
    let error = gguf.require("a.absent").unwrap_err();
    assert_message_contains(&error, &["`a.absent`", "missing"]);
}

#[test]
fn hand_quantized_blocks_dequantize() {
    // Q8_0: d = 0.5, q = -16..16.
    let mut q8_0 = f16_bytes(0.5).to_vec();
    q8_0.extend((0..32).map(|i: i32| (i - 16) as i8 as u8));
    // Q4_0: d = 2, byte j stores q = j (low nibble) and q = 15 - j (high nibble).
    let mut q4_0 = f16_bytes(2.0).to_vec();
    q4_0.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    // Q4_1: d = 0.25, m = -1, same nibbles.
    let mut q4_1 = f16_bytes(0.25).to_vec();
    q4_1.extend_from_slice(&f16_bytes(-1.0));
    q4_1.extend((0..16u8).map(|j| j | ((15 - j) << 4)));

    let dir = tempfile::tempdir().unwrap();
    let path = GgufBuilder::new()
        .tensor("q8_0", &[32], 8, q8_0)
        .tensor("q4_0", &[32], 2, q4_0)
        .tensor("q4_1", &[32], 3, q4_1)
        .write(dir.path(), "blocks.gguf");
    let gguf = GgufFile::open(path).unwrap();

    let q8_0: Vec<f32> = (0..32).map(|i| 0.5 * (i as f32 - 16.0)).collect();
    assert_eq!(
        gguf.tensor("q8_0").unwrap(),
        HostTensor::from_f32([32], q8_0).unwrap()
    );

    let nibbles: Vec<f32> = (0..16)
        .chain((0..16).map(|j| 15 - j))
        .map(|q| q as f32)
        .collect();
    let q4_0: Vec<f32> = nibbles.iter().map(|q| 2.0 * (q - 8.0)).collect();
    assert_eq!(
        gguf.tensor("q4_0").unwrap(),
        HostTensor::from_f32([32], q4_0).unwrap()
    );
    let q4_1: Vec<f32> = nibbles.iter().map(|q| 0.25 * q - 1.0).collect();
    assert_eq!(
        gguf.tensor("q4_1").unwrap(),
        HostTensor::from_f32([32], q4_1).unwrap()
    );
}

#[test]
fn shapes_are_reversed_dims() {
    let values: Vec<f32> = (0..24).map(|i| i as f32).collect();
    let dir = tempfile::tempdir().unwrap();
    let path = GgufBuilder::new()
        .tensor("m", &[4, 3, 2], 0, f32_bytes(&values))
        .write(dir.path(), "dims.gguf");
    let gguf = GgufFile::open(path).unwrap();

    assert_eq!(gguf.tensor_info("m").unwrap().dims(), &[4, 3, 2]);
    assert_eq!(gguf.shape("m").unwrap(), vec![2, 3, 4]);
    assert_eq!(gguf.tensor("m").unwrap().data, HostData::F32(values));
}

#[test]
fn custom_alignment_is_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let path = GgufBuilder::new()
        .metadata("general.alignment", GgufValue::U32(128))
        .f32_tensor("a", &[3], &[1.0, 2.0, 3.0])
        .f32_tensor("b", &[2], &[4.0, 5.0])
        .write(dir.path(), "aligned.gguf");
    let gguf = GgufFile::open(path).unwrap();

    assert_eq!(gguf.alignment(), 128);
    assert_eq!(gguf.data_start() % 128, 0);
    assert_eq!(gguf.tensor_info("b").unwrap().offset(), 128);
    assert_eq!(
        gguf.tensor("b").unwrap().data,
        HostData::F32(vec![4.0, 5.0])
    );
}

#[test]
fn invalid_alignment_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = GgufBuilder::new()
        .metadata("general.alignment", GgufValue::U32(48))
        .write(dir.path(), "bad_alignment.gguf");
    let error = GgufFile::open(path).err().unwrap();
    assert_message_contains(&error, &["general.alignment", "power of two"]);
}

#[test]
fn bad_magic_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let mut builder = GgufBuilder::new();
    builder.magic = *b"GGML";
    let error = GgufFile::open(builder.write(dir.path(), "magic.gguf"))
        .err()
        .unwrap();
    assert!(matches!(error, Error::Format { .. }), "{error:?}");
    assert_message_contains(&error, &["not a GGUF file", "magic.gguf"]);
}

#[test]
fn unsupported_versions_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    for (version, expected) in [
        (1u32, "version 1 is not supported"),
        (4, "version 4 is not supported; supported versions: 2, 3"),
        (3u32.swap_bytes(), "big-endian"),
    ] {
        let mut builder = GgufBuilder::new();
        builder.version = version;
        let error = GgufFile::open(builder.write(dir.path(), "version.gguf"))
            .err()
            .unwrap();
        assert!(matches!(error, Error::Unsupported(_)), "{error:?}");
        assert_message_contains(&error, &[expected]);
    }
}

#[test]
fn version_2_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let mut builder = GgufBuilder::new().f32_tensor("x", &[2], &[1.5, -2.5]);
    builder.version = 2;
    let gguf = GgufFile::open(builder.write(dir.path(), "v2.gguf")).unwrap();
    assert_eq!(gguf.version(), 2);
    assert_eq!(
        gguf.tensor("x").unwrap().data,
        HostData::F32(vec![1.5, -2.5])
    );
}

#[test]
fn truncated_metadata_names_the_key() {
    let bytes = GgufBuilder::new()
        .metadata(
            "general.name",
            GgufValue::String("a long enough name".into()),
        )
        .to_bytes();
    // Header (24 bytes), key (8 + 12), value type (4), string length (8),
    // then 4 of the 18 bytes of the string.
    let cut = 24 + 8 + 12 + 4 + 8 + 4;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.gguf");
    std::fs::write(&path, &bytes[..cut]).unwrap();

    let error = GgufFile::open(&path).err().unwrap();
    assert_message_contains(
        &error,
        &[
            "truncated",
            "`general.name`",
            &format!("ends at byte {cut}"),
            "download the file again",
        ],
    );
}

#[test]
fn truncated_tensor_data_names_the_tensor() {
    let bytes = GgufBuilder::new()
        .f32_tensor("first", &[8], &[0.0; 8])
        .f32_tensor("blk.0.ffn_up.weight", &[4, 8], &[1.0; 32])
        .to_bytes();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.gguf");
    std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();

    let error = GgufFile::open(&path).err().unwrap();
    assert!(matches!(error, Error::Format { .. }), "{error:?}");
    assert_message_contains(
        &error,
        &["truncated", "`blk.0.ffn_up.weight`", "F32", "128 bytes", "download the file again"],
    );
}

#[test]
fn empty_file_is_reported_as_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.gguf");
    std::fs::write(&path, b"").unwrap();
    let error = GgufFile::open(&path).err().unwrap();
    assert_message_contains(&error, &["truncated", "magic"]);
}

#[test]
fn unknown_type_id_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = GgufBuilder::new()
        .tensor("mystery", &[32], 99, vec![0; 64])
        .write(dir.path(), "unknown_type.gguf");
    let error = GgufFile::open(path).err().unwrap();
    assert_message_contains(&error, &["`mystery`", "type id 99"]);
}

#[test]
fn unknown_value_type_is_rejected() {
    let mut bytes = GgufBuilder::new()
        .metadata("a.b", GgufValue::U8(1))
        .to_bytes();
    // The value type of the only key follows the header (24 bytes) and the key (8 + 3 bytes).
    bytes[35..39].copy_from_slice(&13u32.to_le_bytes());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("value_type.gguf");
    std::fs::write(&path, bytes).unwrap();

    let error = GgufFile::open(&path).err().unwrap();
    assert_message_contains(&error, &["`a.b`", "unknown metadata value type 13"]);
}

#[test]
fn unsupported_quantization_names_type_and_supported() {
    let dir = tempfile::tempdir().unwrap();
    let path = GgufBuilder::new()
        .tensor("output.weight", &[256, 2], 14, vec![0; 420])
        .write(dir.path(), "q6_k.gguf");
    let gguf = GgufFile::open(path).unwrap();

    assert_eq!(gguf.shape("output.weight").unwrap(), vec![2, 256]);
    let error = gguf.tensor("output.weight").unwrap_err();
    assert!(matches!(error, Error::Unsupported(_)), "{error:?}");
    assert_message_contains(
        &error,
        &[
            "`output.weight`",
            "type Q6_K, which is not supported; supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1",
        ],
    );

    let raw = gguf.raw_tensor("output.weight").unwrap();
    assert_eq!(raw.ggml_type, GgmlType::Q6_K);
    assert_eq!(raw.bytes.len(), 420);
}

#[test]
fn partial_block_rows_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = GgufBuilder::new()
        .tensor("odd", &[16, 2], 8, vec![0; 34])
        .write(dir.path(), "odd_rows.gguf");
    let error = GgufFile::open(path).err().unwrap();
    assert_message_contains(
        &error,
        &["`odd`", "rows of 16 elements", "Q8_0 block size 32"],
    );
}

#[test]
fn shape_check_and_missing_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = GgufBuilder::new()
        .f32_tensor("blk.0.attn_q.weight", &[3, 5], &[0.0; 15])
        .write(dir.path(), "shapes.gguf");
    let gguf = GgufFile::open(path).unwrap();

    let error = gguf
        .tensor_with_shape("blk.0.attn_q.weight", &[4, 4])
        .unwrap_err();
    match &error {
        Error::TensorShape {
            name,
            expected,
            found,
            ..
        } => {
            assert_eq!(name, "blk.0.attn_q.weight");
            assert_eq!(expected, &vec![4, 4]);
            assert_eq!(found, &vec![3, 5]);
        }
        other => panic!("expected a shape error, got {other:?}"),
    }
    assert_message_contains(
        &error,
        &["`blk.0.attn_q.weight`", "[3, 5]", "[4, 4]", "shapes.gguf"],
    );

    let error = gguf
        .tensor_with_shape("blk.0.attn_k.weight", &[4, 4])
        .unwrap_err();
    assert!(
        matches!(error, Error::MissingTensor { ref name, .. } if name == "blk.0.attn_k.weight"),
        "{error:?}"
    );
    assert!(gguf
        .tensor_with_shape("blk.0.attn_q.weight", &[3, 5])
        .is_ok());
}

#[test]
fn open_weights_detects_gguf() {
    let dir = tempfile::tempdir().unwrap();
    // The extension is deliberately not .gguf: detection reads the magic.
    let path = GgufBuilder::new()
        .f32_tensor("w", &[2], &[1.0, 2.0])
        .write(dir.path(), "weights.bin");
    let weights = open_weights(&path).unwrap();
    assert!(weights.origin().contains("GGUF"), "{}", weights.origin());
    assert_eq!(weights.names(), vec!["w".to_string()]);
}
