//! Tiny Llama (2 layers, 4 query and 2 key/value heads, RoPE, untied head) against the
//! outputs transformers stored in `fixtures/lm/tiny_llama`.

mod lm_support;

use flamingo_kernels::DType;
use flamingo_model::lm::LanguageModel;
use lm_support::lm_fixture;

#[test]
fn llama_hidden_states_match_transformers() {
    lm_support::check_hidden_states("llama_hidden_states_match_transformers", &lm_fixture("tiny_llama"));
}

#[test]
fn llama_input_gradient_matches_transformers() {
    lm_support::check_input_gradient("llama_input_gradient_matches_transformers", &lm_fixture("tiny_llama"));
}

#[test]
fn llama_kv_cache_matches_full_forward() {
    lm_support::check_kv_cache("llama_kv_cache_matches_full_forward", &lm_fixture("tiny_llama"));
}

#[test]
fn llama_cache_reorder_gathers_rows() {
    lm_support::check_cache_reorder("llama_cache_reorder_gathers_rows", &lm_fixture("tiny_llama"));
}

#[test]
fn llama_left_padding_is_masked() {
    lm_support::check_left_padding("llama_left_padding_is_masked", &lm_fixture("tiny_llama"));
}

#[test]
fn llama_greedy_matches_transformers() {
    lm_support::check_greedy("llama_greedy_matches_transformers", &lm_fixture("tiny_llama"));
}

#[test]
fn llama_gguf_f32_matches_hf_logits() {
    let path = lm_support::fixtures_dir().join("gguf/tiny_llama.gguf");
    let hf_reference = lm_support::Reference::open(&lm_fixture("tiny_llama").join("reference.safetensors"));
    lm_support::on_every_device("llama_gguf_f32_matches_hf_logits", |device| {
        let (model, tokenizer, special) = LanguageModel::load_with_weight_dtype(device, &path, DType::F32)?;
        assert_eq!(model.summary().model_type, "llama");
        assert_eq!(model.summary().num_kv_heads, 2);
        assert_eq!(special.bos, Some(1));
        assert_eq!(model.summary().eos_token_ids, vec![2]);

        let (shape, ids) = hf_reference.ids("input_ids");
        let encoded = tokenizer.encode("The capital of France is", true).unwrap();
        assert_eq!(encoded.get_ids(), &ids[..shape[1]], "the GGUF tokenizer encodes row 0 as the HF one");

        let ids = device.from_u32(shape.clone(), ids)?;
        let logits = model.forward(&ids, &lm_support::positions(device, shape[0], shape[1]), None)?;
        let (shape, expected) = hf_reference.f32("logits");
        let tolerance = lm_support::FORWARD_TOLERANCE;
        lm_support::assert_close("GGUF F32 logits", device, &logits, &shape, &expected, tolerance);
        Ok(())
    });
}

#[test]
fn llama_gguf_q4_1_matches_dequantized_reference() {
    let path = lm_support::fixtures_dir().join("gguf/tiny_llama.Q4_1.gguf");
    let reference = lm_support::Reference::open(&lm_support::fixtures_dir().join("gguf/tiny_llama.Q4_1.reference.safetensors"));
    lm_support::on_every_device("llama_gguf_q4_1_matches_dequantized_reference", |device| {
        let (model, _, _) = LanguageModel::load_with_weight_dtype(device, &path, DType::F32)?;
        let ids = lm_support::reference_ids(device, &reference)?;
        let logits = model.forward(&ids, &lm_support::positions(device, ids.dim(0), ids.dim(1)), None)?;
        let (shape, expected) = reference.f32("logits");
        let tolerance = lm_support::FORWARD_TOLERANCE;
        lm_support::assert_close("GGUF Q4_1 logits", device, &logits, &shape, &expected, tolerance);
        Ok(())
    });
}
