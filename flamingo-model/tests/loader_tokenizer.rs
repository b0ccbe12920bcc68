//! Tokenizers from tokenizer.json and from GGUF metadata, checked against the
//! ids that transformers produced.

mod loader_support;

use std::path::Path;

use flamingo_model::loader::{
    add_special_tokens, load_tokenizer_json, tokenizer_from_gguf, GgufFile, GgufValue,
    SpecialTokens, Tokenizer, END_OF_CHUNK_TOKEN, IMAGE_TOKEN,
};
use flamingo_model::Error;
use loader_support::{assert_message_contains, fixtures_dir, smollm2_gguf, GgufBuilder};
use serde_json::Value;

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Encodes every `{text, ids}` case without adding special tokens and
/// compares the ids, then checks that decoding gives the text back.
fn assert_cases(tokenizer: &Tokenizer, cases: &Value, what: &str) {
    let cases = cases.as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let text = case["text"].as_str().unwrap();
        // A case where llama.cpp's digit split and transformers disagree
        // stores the digit-split ids separately.
        let expected_ids = case.get("ids_with_digit_split").unwrap_or(&case["ids"]);
        let expected: Vec<u32> = serde_json::from_value(expected_ids.clone()).unwrap();
        let encoding = tokenizer.encode(text, false).unwrap();
        assert_eq!(
            encoding.get_ids(),
            expected.as_slice(),
            "{what}: ids of {text:?}"
        );

        if let Some(tokens) = case.get("tokens") {
            let tokens: Vec<String> = serde_json::from_value(tokens.clone()).unwrap();
            assert_eq!(
                encoding.get_tokens(),
                tokens.as_slice(),
                "{what}: tokens of {text:?}"
            );
        }
        let decoded = tokenizer.decode(&expected, false).unwrap();
        assert_eq!(decoded, text, "{what}: decoding the ids of {text:?}");
    }
}

fn tiny_llama_gguf() -> GgufFile {
    GgufFile::open(fixtures_dir().join("gguf/tiny_llama.gguf")).unwrap()
}

#[test]
fn tiny_llama_gguf_tokenizer_matches_transformers() {
    let tokenizer = tokenizer_from_gguf(&tiny_llama_gguf()).unwrap();
    let generation = read_json(&fixtures_dir().join("lm/tiny_llama/generation.json"));
    assert_cases(
        &tokenizer,
        &generation["tokenizer_cases"],
        "tiny_llama.gguf",
    );
    assert_eq!(tokenizer.get_vocab_size(true), 384);
}

#[test]
fn tiny_llama_tokenizer_json_matches_transformers() {
    let tokenizer = load_tokenizer_json(fixtures_dir().join("lm/tiny_llama")).unwrap();
    let generation = read_json(&fixtures_dir().join("lm/tiny_llama/generation.json"));
    assert_cases(
        &tokenizer,
        &generation["tokenizer_cases"],
        "lm/tiny_llama/tokenizer.json",
    );
}

/// Writes the vocabulary, merges and special tokens of a byte-level BPE
/// `tokenizer.json` as GGUF tokenizer metadata.
fn gguf_from_tokenizer_json(tokenizer_json: &Value, pre: &str) -> GgufBuilder {
    let vocab = tokenizer_json["model"]["vocab"].as_object().unwrap();
    let mut tokens = vec![String::new(); vocab.len()];
    for (token, id) in vocab {
        tokens[id.as_u64().unwrap() as usize] = token.clone();
    }
    let mut token_types = vec![1i32; tokens.len()];
    for added in tokenizer_json["added_tokens"].as_array().unwrap() {
        if added["special"].as_bool().unwrap() {
            token_types[added["id"].as_u64().unwrap() as usize] = 3;
        }
    }
    let merges: Vec<GgufValue> = tokenizer_json["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|merge| match merge {
            Value::String(merge) => GgufValue::String(merge.clone()),
            Value::Array(pair) => GgufValue::String(format!(
                "{} {}",
                pair[0].as_str().unwrap(),
                pair[1].as_str().unwrap()
            )),
            other => panic!("unexpected merge {other}"),
        })
        .collect();

    GgufBuilder::new()
        .metadata("general.architecture", GgufValue::String("gpt2".into()))
        .metadata("tokenizer.ggml.model", GgufValue::String("gpt2".into()))
        .metadata("tokenizer.ggml.pre", GgufValue::String(pre.into()))
        .metadata(
            "tokenizer.ggml.tokens",
            GgufValue::Array(tokens.into_iter().map(GgufValue::String).collect()),
        )
        .metadata(
            "tokenizer.ggml.token_type",
            GgufValue::Array(token_types.into_iter().map(GgufValue::I32).collect()),
        )
        .metadata("tokenizer.ggml.merges", GgufValue::Array(merges))
}

#[test]
fn gpt2_pre_tokenizer_matches_transformers() {
    let folder = fixtures_dir().join("lm/tiny_gpt2");
    let builder = gguf_from_tokenizer_json(&read_json(&folder.join("tokenizer.json")), "gpt2");
    let dir = tempfile::tempdir().unwrap();
    let gguf = GgufFile::open(builder.write(dir.path(), "gpt2_tokenizer.gguf")).unwrap();

    let tokenizer = tokenizer_from_gguf(&gguf).unwrap();
    let generation = read_json(&folder.join("generation.json"));
    assert_cases(
        &tokenizer,
        &generation["tokenizer_cases"],
        "GGUF with pre-tokenizer gpt2",
    );
}

#[test]
fn special_tokens_from_hf_folder() {
    let folder = fixtures_dir().join("lm/tiny_llama");
    let tokenizer = load_tokenizer_json(&folder).unwrap();
    let special = SpecialTokens::from_hf_folder(&folder, &tokenizer).unwrap();

    assert_eq!(special.bos, Some(1));
    assert_eq!(special.eos, Some(2));
    assert_eq!(special.pad, Some(2));
    assert_eq!(special.unk, Some(0));
    assert_eq!(special.id("<|im_start|>"), Some(1));
    assert_eq!(special.id("<|endoftext|>"), Some(0));
    assert_eq!(special.named.len(), 3);
}

#[test]
fn special_tokens_from_gguf() {
    let gguf = tiny_llama_gguf();
    let tokenizer = tokenizer_from_gguf(&gguf).unwrap();
    let special = SpecialTokens::from_gguf(&gguf, &tokenizer).unwrap();

    assert_eq!(special.bos, Some(1));
    assert_eq!(special.eos, Some(2));
    assert_eq!(special.pad, Some(2));
    assert_eq!(special.unk, Some(0));
    assert_eq!(special.id("<|im_end|>"), Some(2));
    assert_eq!(special.named.len(), 3);
}

#[test]
fn flamingo_tokens_get_new_ids() {
    let mut tokenizer = tokenizer_from_gguf(&tiny_llama_gguf()).unwrap();
    let ids = add_special_tokens(&mut tokenizer, &[IMAGE_TOKEN, END_OF_CHUNK_TOKEN]).unwrap();
    assert_eq!(
        ids,
        vec![384, 385],
        "new ids follow the 384-token vocabulary"
    );
    assert_eq!(tokenizer.get_vocab_size(true), 386);

    let again = add_special_tokens(
        &mut tokenizer,
        &[END_OF_CHUNK_TOKEN, IMAGE_TOKEN, "<|im_end|>"],
    )
    .unwrap();
    assert_eq!(again, vec![385, 384, 2], "present tokens keep their ids");
    assert_eq!(tokenizer.get_vocab_size(true), 386);

    let encoding = tokenizer
        .encode("<image>The cat<|endofchunk|>", false)
        .unwrap();
    let ids = encoding.get_ids();
    assert_eq!(ids.first(), Some(&384), "{ids:?}");
    assert_eq!(ids.last(), Some(&385), "{ids:?}");
    assert_eq!(
        tokenizer.decode(ids, false).unwrap(),
        "<image>The cat<|endofchunk|>"
    );
    assert_eq!(tokenizer.decode(ids, true).unwrap(), "The cat");
}

#[test]
fn add_bos_token_adds_bos() {
    let generation = read_json(&fixtures_dir().join("lm/tiny_llama/tokenizer.json"));
    let builder = gguf_from_tokenizer_json(&generation, "smollm")
        .metadata("tokenizer.ggml.bos_token_id", GgufValue::U32(1))
        .metadata("tokenizer.ggml.add_bos_token", GgufValue::Bool(true));
    let dir = tempfile::tempdir().unwrap();
    let gguf = GgufFile::open(builder.write(dir.path(), "bos.gguf")).unwrap();
    let tokenizer = tokenizer_from_gguf(&gguf).unwrap();

    let with = tokenizer.encode("Hello world", true).unwrap();
    let without = tokenizer.encode("Hello world", false).unwrap();
    assert_eq!(with.get_ids()[0], 1);
    assert_eq!(&with.get_ids()[1..], without.get_ids());
}

#[test]
fn unsupported_tokenizers_are_rejected() {
    let tokenizer_json = read_json(&fixtures_dir().join("lm/tiny_llama/tokenizer.json"));
    let dir = tempfile::tempdir().unwrap();

    let path = gguf_from_tokenizer_json(&tokenizer_json, "qwen2").write(dir.path(), "qwen2.gguf");
    let error = tokenizer_from_gguf(&GgufFile::open(path).unwrap()).unwrap_err();
    assert!(matches!(error, Error::Unsupported(_)), "{error:?}");
    assert_message_contains(
        &error,
        &["pre-tokenizer `qwen2`", "supported: gpt2, smollm"],
    );

    let path = GgufBuilder::new()
        .metadata("tokenizer.ggml.model", GgufValue::String("llama".into()))
        .write(dir.path(), "spm.gguf");
    let error = tokenizer_from_gguf(&GgufFile::open(path).unwrap()).unwrap_err();
    assert_message_contains(&error, &["tokenizer model `llama`", "supported: gpt2"]);

    let path = GgufBuilder::new().write(dir.path(), "none.gguf");
    let error = tokenizer_from_gguf(&GgufFile::open(path).unwrap()).unwrap_err();
    assert_message_contains(&error, &["no tokenizer", "tokenizer.ggml.model"]);
}

#[test]
fn missing_tokenizer_json_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let error = load_tokenizer_json(dir.path()).unwrap_err();
    assert!(matches!(error, Error::Io { .. }), "{error:?}");
    assert_message_contains(&error, &["tokenizer.json"]);

    std::fs::write(dir.path().join("tokenizer.json"), "{}").unwrap();
    let error = load_tokenizer_json(dir.path()).unwrap_err();
    assert_message_contains(&error, &["invalid tokenizer.json"]);
}

#[test]
fn smollm2_tokenizer_matches_transformers() {
    let Some(path) = smollm2_gguf("smollm2_tokenizer_matches_transformers") else {
        return;
    };
    let gguf = GgufFile::open(&path).unwrap();
    let mut tokenizer = tokenizer_from_gguf(&gguf).unwrap();
    let reference = read_json(&fixtures_dir().join("smollm2/reference.json"));

    assert_cases(&tokenizer, &reference["tokenizer_cases"], "SmolLM2 GGUF");
    let prompt_ids: Vec<u32> = serde_json::from_value(reference["prompt_ids"].clone()).unwrap();
    let prompt = reference["prompt"].as_str().unwrap();
    assert_eq!(
        tokenizer.encode(prompt, true).unwrap().get_ids(),
        prompt_ids.as_slice(),
        "no BOS is added"
    );

    // Every digit is its own token, as llama.cpp's `smollm` pre-tokenizer splits them.
    let digits = tokenizer.encode("year 2024", false).unwrap();
    assert_eq!(
        &digits.get_tokens()[digits.len() - 4..],
        ["2", "0", "2", "4"]
    );

    let special = SpecialTokens::from_gguf(&gguf, &tokenizer).unwrap();
    assert_eq!(
        (special.bos, special.eos, special.pad, special.unk),
        (Some(1), Some(2), Some(2), Some(0))
    );
    assert_eq!(special.id("<|im_start|>"), Some(1));
    assert_eq!(special.id("<|im_end|>"), Some(2));
    assert_eq!(special.id("<|endoftext|>"), Some(0));

    let ids = add_special_tokens(&mut tokenizer, &[IMAGE_TOKEN, END_OF_CHUNK_TOKEN]).unwrap();
    assert_eq!(ids, vec![49152, 49153]);
}
