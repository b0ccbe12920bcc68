//! GGUF Llama under Hugging Face names: tensors, Q/K un-permutation and config.json.

mod loader_support;

use flamingo_kernels::quant;
use flamingo_model::loader::{
    llama_config_from_gguf, GgufFile, GgufLlamaWeights, GgufValue, SafetensorsWeights, WeightSource,
};
use flamingo_model::Error;
use loader_support::{
    assert_message_contains, fixtures_dir, llama_metadata, smollm2_gguf, GgufBuilder,
};
use serde_json::{json, Value};

/// Checks that `hf` rows are the GGUF rows in Hugging Face order: within each
/// head of `head_dim` rows, HF row `j * head_dim/2 + i` is GGUF row `2i + j`.
fn assert_rows_unpermuted(hf: &[f32], gguf: &[f32], heads: usize, row_len: usize, what: &str) {
    let rows = hf.len() / row_len;
    let head_dim = rows / heads;
    let half = head_dim / 2;
    for head in 0..heads {
        for j in 0..2 {
            for i in 0..half {
                let hf_row = head * head_dim + j * half + i;
                let gguf_row = head * head_dim + 2 * i + j;
                assert_eq!(
                    &hf[hf_row * row_len..(hf_row + 1) * row_len],
                    &gguf[gguf_row * row_len..(gguf_row + 1) * row_len],
                    "{what}: HF row {hf_row} should be GGUF row {gguf_row}"
                );
            }
        }
    }
}

#[test]
fn tiny_llama_f32_matches_hf_checkpoint() {
    let gguf = GgufLlamaWeights::open(fixtures_dir().join("gguf/tiny_llama.gguf")).unwrap();
    let hf = SafetensorsWeights::open(fixtures_dir().join("lm/tiny_llama")).unwrap();

    assert_eq!(gguf.names(), hf.names(), "the same tensor names");
    for name in hf.names() {
        let expected = hf.tensor(&name).unwrap();
        let found = gguf.tensor_with_shape(&name, &expected.shape).unwrap();
        assert_eq!(found, expected, "tensor `{name}`");
    }
    assert_eq!(
        gguf.gguf_name("model.layers.1.self_attn.q_proj.weight"),
        Some("blk.1.attn_q.weight")
    );
}

#[test]
fn tiny_llama_config_matches_hf_config() {
    let gguf = GgufFile::open(fixtures_dir().join("gguf/tiny_llama.gguf")).unwrap();
    let config = llama_config_from_gguf(&gguf).unwrap();
    let text = std::fs::read_to_string(fixtures_dir().join("lm/tiny_llama/config.json")).unwrap();
    let hf: Value = serde_json::from_str(&text).unwrap();

    for key in [
        "model_type",
        "architectures",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "max_position_embeddings",
        "vocab_size",
        "tie_word_embeddings",
        "hidden_act",
        "attention_bias",
        "mlp_bias",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    ] {
        assert_eq!(config[key], hf[key], "config key `{key}`");
    }
    // transformers 5 nests the RoPE base; the GGUF config uses the flat key of transformers 4.
    assert_eq!(config["rope_theta"], hf["rope_parameters"]["rope_theta"]);
    assert!(config.get("rope_scaling").is_none());
}

#[test]
fn tiny_llama_q4_1_raw_blocks_are_unpermuted() {
    let weights = GgufLlamaWeights::open(fixtures_dir().join("gguf/tiny_llama.Q4_1.gguf")).unwrap();
    let hf = SafetensorsWeights::open(fixtures_dir().join("lm/tiny_llama")).unwrap();
    assert_eq!(weights.names(), hf.names());

    for name in [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.self_attn.k_proj.weight",
    ] {
        let tensor = weights.tensor(name).unwrap();
        assert_eq!(tensor.shape, hf.shape(name).unwrap(), "shape of `{name}`");

        // The raw blocks, moved row by row, dequantize to the same tensor.
        let raw = weights.raw_tensor(name).unwrap();
        assert_eq!(raw.ggml_type, quant::GgmlType::Q4_1);
        let from_raw = quant::dequantize(raw.ggml_type, &raw.bytes, tensor.numel()).unwrap();
        assert_eq!(from_raw, tensor.to_f32(), "raw blocks of `{name}`");

        // 4-bit rounding moves each weight by at most half a quantization step,
        // and steps are 0.04 to 0.08 for these weights. A row in the wrong place
        // would be off by about the weights' standard deviation, 0.2.
        let reference = hf.tensor(name).unwrap().to_f32();
        let max_error = from_raw
            .iter()
            .zip(&reference)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            max_error < 0.1,
            "`{name}` is {max_error} away from the F32 checkpoint"
        );
    }
}

#[test]
fn hand_built_q_and_k_are_unpermuted() {
    // 2 query heads and 1 key/value head of dimension 4 over 8 input features.
    let q: Vec<f32> = (0..64).map(|i| i as f32).collect();
    let k: Vec<f32> = (0..32).map(|i| 100.0 + i as f32).collect();
    let v: Vec<f32> = (0..32).map(|i| 200.0 + i as f32).collect();
    let dir = tempfile::tempdir().unwrap();
    let path = llama_metadata(GgufBuilder::new(), "llama")
        .f32_tensor("blk.0.attn_q.weight", &[8, 8], &q)
        .f32_tensor("blk.0.attn_k.weight", &[4, 8], &k)
        .f32_tensor("blk.0.attn_v.weight", &[4, 8], &v)
        .f32_tensor("blk.0.attn_q.bias", &[8], &q[..8])
        .f32_tensor("unmapped.weight", &[2], &[1.0, 2.0])
        .write(dir.path(), "qk.gguf");
    let weights = GgufLlamaWeights::open(path).unwrap();

    let hf_q = weights
        .tensor("model.layers.0.self_attn.q_proj.weight")
        .unwrap();
    assert_eq!(hf_q.shape, vec![8, 8]);
    assert_rows_unpermuted(&hf_q.to_f32(), &q, 2, 8, "q_proj");
    // Row 1 of head 0 in HF order is GGUF row 2: rows 0, 2, 1, 3 of each head.
    assert_eq!(hf_q.to_f32()[8..16], q[16..24]);

    let hf_k = weights
        .tensor("model.layers.0.self_attn.k_proj.weight")
        .unwrap();
    assert_rows_unpermuted(&hf_k.to_f32(), &k, 1, 8, "k_proj");

    let hf_v = weights
        .tensor("model.layers.0.self_attn.v_proj.weight")
        .unwrap();
    assert_eq!(hf_v.to_f32(), v, "v_proj is stored unpermuted");

    let hf_bias = weights
        .tensor("model.layers.0.self_attn.q_proj.bias")
        .unwrap();
    assert_rows_unpermuted(&hf_bias.to_f32(), &q[..8], 2, 1, "q_proj bias");

    assert!(!weights.contains("lm_head.weight"));
    assert_eq!(
        weights.names().len(),
        4,
        "tensors without an HF name are not exposed: {:?}",
        weights.names()
    );
}

#[test]
fn tied_embedding_sets_config_flag() {
    let dir = tempfile::tempdir().unwrap();
    let path = llama_metadata(GgufBuilder::new(), "llama")
        .metadata("tokenizer.ggml.bos_token_id", GgufValue::U32(1))
        .f32_tensor("token_embd.weight", &[10, 8], &[0.0; 80])
        .write(dir.path(), "tied.gguf");
    let weights = GgufLlamaWeights::open(path).unwrap();
    let config = weights.config_json().unwrap();

    assert_eq!(config["tie_word_embeddings"], json!(true));
    assert_eq!(config["vocab_size"], json!(10));
    assert_eq!(
        config["rms_norm_eps"],
        json!(1e-6),
        "the f32 epsilon is written as its shortest decimal"
    );
    assert_eq!(
        config["rope_theta"],
        json!(10000.0),
        "llama.cpp's default RoPE base"
    );
    assert_eq!(config["head_dim"], json!(4));
    assert_eq!(config["bos_token_id"], json!(1));
    assert!(config.get("eos_token_id").is_none());
    assert!(!weights.contains("lm_head.weight"));
    assert_eq!(
        weights.shape("model.embed_tokens.weight").unwrap(),
        vec![10, 8]
    );
}

#[test]
fn unknown_architecture_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = llama_metadata(GgufBuilder::new(), "mamba").write(dir.path(), "mamba.gguf");

    let error = GgufLlamaWeights::open(&path).err().unwrap();
    assert!(matches!(error, Error::Unsupported(_)), "{error:?}");
    assert_message_contains(&error, &["`mamba`", "supported architectures: llama"]);

    let gguf = GgufFile::open(&path).unwrap();
    let error = llama_config_from_gguf(&gguf).unwrap_err();
    assert_message_contains(&error, &["`mamba`", "supported architectures: llama"]);
}

#[test]
fn missing_head_count_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = GgufBuilder::new()
        .metadata("general.architecture", GgufValue::String("llama".into()))
        .write(dir.path(), "no_heads.gguf");
    let error = GgufLlamaWeights::open(path).err().unwrap();
    assert!(matches!(error, Error::Config { .. }), "{error:?}");
    assert_message_contains(&error, &["`llama.attention.head_count`", "missing"]);
}

#[test]
fn smollm2_maps_to_hf_llama() {
    let Some(path) = smollm2_gguf("smollm2_maps_to_hf_llama") else {
        return;
    };
    let weights = GgufLlamaWeights::open(&path).unwrap();
    let config = weights.config_json().unwrap();

    for (key, value) in [
        ("hidden_size", json!(576)),
        ("intermediate_size", json!(1536)),
        ("num_hidden_layers", json!(30)),
        ("num_attention_heads", json!(9)),
        ("num_key_value_heads", json!(3)),
        ("head_dim", json!(64)),
        ("vocab_size", json!(49152)),
        ("max_position_embeddings", json!(8192)),
        ("rope_theta", json!(100000.0)),
        ("rms_norm_eps", json!(1e-5)),
        ("tie_word_embeddings", json!(true)),
        ("bos_token_id", json!(1)),
        ("eos_token_id", json!(2)),
        ("pad_token_id", json!(2)),
    ] {
        assert_eq!(config[key], value, "config key `{key}`");
    }

    // 9 tensors per layer, the embedding and the final norm; no lm_head.
    assert_eq!(weights.names().len(), 30 * 9 + 2);
    assert!(!weights.contains("lm_head.weight"));
    assert_eq!(
        weights.shape("model.embed_tokens.weight").unwrap(),
        vec![49152, 576]
    );
    assert_eq!(weights.shape("model.norm.weight").unwrap(), vec![576]);
    for layer in 0..30 {
        let prefix = format!("model.layers.{layer}");
        for (suffix, shape) in [
            ("input_layernorm.weight", vec![576]),
            ("self_attn.q_proj.weight", vec![576, 576]),
            ("self_attn.k_proj.weight", vec![192, 576]),
            ("self_attn.v_proj.weight", vec![192, 576]),
            ("self_attn.o_proj.weight", vec![576, 576]),
            ("post_attention_layernorm.weight", vec![576]),
            ("mlp.gate_proj.weight", vec![1536, 576]),
            ("mlp.up_proj.weight", vec![1536, 576]),
            ("mlp.down_proj.weight", vec![576, 1536]),
        ] {
            assert_eq!(
                weights.shape(&format!("{prefix}.{suffix}")).unwrap(),
                shape,
                "{prefix}.{suffix}"
            );
        }
    }

    let gguf = weights.gguf();
    let hf_q = weights
        .tensor("model.layers.0.self_attn.q_proj.weight")
        .unwrap()
        .to_f32();
    let gguf_q = gguf.tensor("blk.0.attn_q.weight").unwrap().to_f32();
    assert_rows_unpermuted(&hf_q, &gguf_q, 9, 576, "q_proj");
    let hf_k = weights
        .tensor("model.layers.29.self_attn.k_proj.weight")
        .unwrap()
        .to_f32();
    let gguf_k = gguf.tensor("blk.29.attn_k.weight").unwrap().to_f32();
    assert_rows_unpermuted(&hf_k, &gguf_k, 3, 576, "k_proj");

    let raw = weights
        .raw_tensor("model.layers.0.self_attn.q_proj.weight")
        .unwrap();
    assert_eq!(raw.ggml_type, quant::GgmlType::Q4_1);
    assert_eq!(
        quant::dequantize(raw.ggml_type, &raw.bytes, hf_q.len()).unwrap(),
        hf_q
    );

    let embed = weights.raw_tensor("model.embed_tokens.weight").unwrap();
    assert_eq!(embed.ggml_type, quant::GgmlType::Q8_0);
    assert_eq!(embed.shape, vec![49152, 576]);
}
