//! Language model loading and running on bad input: every case must return
//! an error that names the problem, never panic.

mod lm_support;

use std::path::Path;

use flamingo_kernels::{DType, Device, HostTensor};
use flamingo_model::lm::{Gpt2, Gpt2Config, LanguageModel, Llama, LlamaConfig, SelfAttentionInput};
use flamingo_model::loader::{InMemoryWeights, SafetensorsWeights, WeightSource};
use flamingo_model::Error;
use lm_support::lm_fixture;

/// A copy of a fixture checkpoint in memory, so single tensors can be broken.
fn weights_in_memory(folder: &Path) -> InMemoryWeights {
    let file = SafetensorsWeights::open(folder).unwrap();
    let mut weights = InMemoryWeights::new(format!("copy of {}", folder.display()));
    for name in file.names() {
        weights.insert(name.clone(), file.tensor(&name).unwrap());
    }
    weights
}

fn write_config(json: &str) -> tempfile::TempDir {
    let folder = tempfile::tempdir().unwrap();
    std::fs::write(folder.path().join("config.json"), json).unwrap();
    folder
}

fn tiny_llama_config() -> LlamaConfig {
    LlamaConfig::from_file(&lm_fixture("tiny_llama").join("config.json")).unwrap()
}

#[test]
fn load_rejects_unknown_model_type() {
    let folder = write_config(r#"{"model_type": "bert", "hidden_size": 32}"#);
    let error = LanguageModel::load(&Device::cpu(), folder.path()).unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, Error::Unsupported(_)), "{error:?}");
    assert!(message.contains("`bert`"), "the message names the type: {message}");
    assert!(message.contains("gpt2, llama"), "the message lists the supported types: {message}");
}

#[test]
fn load_rejects_missing_model_type() {
    let folder = write_config(r#"{"hidden_size": 32}"#);
    let error = LanguageModel::load(&Device::cpu(), folder.path()).unwrap_err();
    assert!(matches!(error, Error::Config { .. }), "{error:?}");
    assert!(error.to_string().contains("model_type"), "{error}");
}

#[test]
fn load_rejects_unsupported_rope_scaling() {
    let folder = write_config(r#"{"model_type": "llama", "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}"#);
    let error = LanguageModel::load(&Device::cpu(), folder.path()).unwrap_err();
    assert!(matches!(error, Error::Unsupported(_)), "{error:?}");
    assert!(error.to_string().contains("llama3"), "{error}");
}

#[test]
fn load_rejects_file_that_is_not_gguf() {
    let path = lm_fixture("tiny_llama").join("config.json");
    let error = LanguageModel::load(&Device::cpu(), &path).unwrap_err();
    assert!(matches!(error, Error::Format { .. }), "{error:?}");
    assert!(error.to_string().contains("not GGUF"), "{error}");
}

#[test]
fn load_reports_wrong_tensor_shape() {
    let mut weights = weights_in_memory(&lm_fixture("tiny_llama"));
    let name = "model.layers.1.mlp.up_proj.weight";
    weights.insert(name, HostTensor::from_f32([63, 32], vec![0.0; 63 * 32]).unwrap());

    let error = Llama::load(&Device::cpu(), &tiny_llama_config(), &weights, DType::F32).unwrap_err();
    let message = error.to_string();
    match error {
        Error::TensorShape { name: found_name, expected, found, .. } => {
            assert_eq!(found_name, name);
            assert_eq!(expected, [64, 32]);
            assert_eq!(found, [63, 32]);
        }
        other => panic!("expected a TensorShape error, found {other:?}"),
    }
    assert!(message.contains(name), "the message names the tensor: {message}");
    assert!(message.contains("[64, 32]"), "the message names the expected shape: {message}");
    assert!(message.contains("[63, 32]"), "the message names the found shape: {message}");
}

#[test]
fn load_reports_wrong_conv1d_shape() {
    let folder = lm_fixture("tiny_gpt2");
    let mut weights = weights_in_memory(&folder);
    let name = "transformer.h.0.attn.c_attn.weight";
    weights.insert(name, HostTensor::from_f32([32, 95], vec![0.0; 32 * 95]).unwrap());
    let config = Gpt2Config::from_file(&folder.join("config.json")).unwrap();

    let error = Gpt2::load(&Device::cpu(), &config, &weights, DType::F32).unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, Error::TensorShape { .. }), "{error:?}");
    assert!(message.contains(name), "the message names the tensor as stored: {message}");
    assert!(message.contains("[32, 96]"), "the message names the expected shape: {message}");
    assert!(message.contains("[32, 95]"), "the message names the found shape: {message}");
}

#[test]
fn load_reports_missing_tensor() {
    let mut weights = weights_in_memory(&lm_fixture("tiny_llama"));
    weights.remove("model.norm.weight");
    let error = Llama::load(&Device::cpu(), &tiny_llama_config(), &weights, DType::F32).unwrap_err();
    assert!(matches!(&error, Error::MissingTensor { name, .. } if name == "model.norm.weight"), "{error:?}");
    assert!(error.to_string().contains("`model.norm.weight` is missing"), "{error}");
}

#[test]
fn load_reports_missing_untied_head() {
    let mut weights = weights_in_memory(&lm_fixture("tiny_llama"));
    weights.remove("lm_head.weight");
    let error = Llama::load(&Device::cpu(), &tiny_llama_config(), &weights, DType::F32).unwrap_err();
    assert!(matches!(&error, Error::MissingTensor { name, .. } if name == "lm_head.weight"), "{error:?}");
}

#[test]
fn greedy_rejects_prompt_longer_than_context() {
    let (model, tokenizer, _) = LanguageModel::load(&Device::cpu(), &lm_fixture("tiny_gpt2")).unwrap();
    assert_eq!(model.summary().max_positions, 64);

    let error = model.greedy_ids(&[5; 65], 4, &[]).unwrap_err();
    assert!(matches!(error, Error::InvalidInput(_)), "{error:?}");
    assert!(error.to_string().contains("65 tokens"), "{error}");
    assert!(error.to_string().contains("context of 64"), "{error}");

    let long_text = "The cat sat on the mat. ".repeat(40);
    let error = model.greedy_continue(&tokenizer, &long_text, 4).unwrap_err();
    assert!(matches!(error, Error::InvalidInput(_)), "{error:?}");
}

#[test]
fn greedy_stops_when_context_is_full() {
    let (model, _, _) = LanguageModel::load(&Device::cpu(), &lm_fixture("tiny_gpt2")).unwrap();
    let generated = model.greedy_ids(&[5; 62], 10, &[]).unwrap();
    assert_eq!(generated.len(), 3, "62 prompt tokens leave room for 2 more inputs, so 3 new tokens");
}

#[test]
fn greedy_rejects_empty_prompt() {
    let (model, _, _) = LanguageModel::load(&Device::cpu(), &lm_fixture("tiny_llama")).unwrap();
    let error = model.greedy_ids(&[], 4, &[]).unwrap_err();
    assert!(matches!(error, Error::InvalidInput(_)), "{error:?}");
}

#[test]
fn forward_rejects_position_beyond_context() {
    let device = Device::cpu();
    let (model, _, _) = LanguageModel::load(&device, &lm_fixture("tiny_gpt2")).unwrap();
    let ids = device.from_u32([1, 2], vec![5, 6]).unwrap();
    let positions = device.from_u32([1, 2], vec![63, 64]).unwrap();
    let error = model.forward(&ids, &positions, None).unwrap_err();
    assert!(matches!(error, Error::InvalidInput(_)), "{error:?}");
    assert!(error.to_string().contains("position 64"), "{error}");
}

#[test]
fn layer_calls_reject_bad_arguments() {
    let device = Device::cpu();
    let (gpt2, _, _) = LanguageModel::load(&device, &lm_fixture("tiny_gpt2")).unwrap();
    let (llama, _, _) = LanguageModel::load(&device, &lm_fixture("tiny_llama")).unwrap();
    let ids = device.from_u32([1, 3], vec![5, 6, 7]).unwrap();
    let positions = lm_support::positions(&device, 1, 3);
    let input = SelfAttentionInput { positions: &positions, key_padding: None };
    let x = gpt2.embed(&ids, &positions).unwrap();

    let error = gpt2.layer_forward(2, &x, &input, None, false).unwrap_err();
    assert!(error.to_string().contains("layer 2 is out of range"), "{error}");

    let (_, saved) = gpt2.layer_forward(0, &x, &input, None, true).unwrap();
    let error = llama.layer_backward(0, &saved.unwrap(), &x).unwrap_err();
    assert!(matches!(error, Error::InvalidInput(_)), "{error:?}");

    let wrong_ids = device.from_u32([3], vec![5, 6, 7]).unwrap();
    let error = gpt2.embed(&wrong_ids, &positions).unwrap_err();
    assert!(matches!(error, Error::InvalidInput(_)), "{error:?}");
}
