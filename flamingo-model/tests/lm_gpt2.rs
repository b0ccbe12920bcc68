//! Tiny GPT-2 (2 layers, 4 heads, learned positions, tied head) against the
//! outputs transformers stored in `fixtures/lm/tiny_gpt2`.

mod lm_support;

use flamingo_kernels::{DType, HostTensor};
use flamingo_model::lm::{Gpt2, Gpt2Config, LanguageModel};
use flamingo_model::loader::{InMemoryWeights, SafetensorsWeights, WeightSource};
use lm_support::lm_fixture;

#[test]
fn gpt2_hidden_states_match_transformers() {
    lm_support::check_hidden_states("gpt2_hidden_states_match_transformers", &lm_fixture("tiny_gpt2"));
}

#[test]
fn gpt2_input_gradient_matches_transformers() {
    lm_support::check_input_gradient("gpt2_input_gradient_matches_transformers", &lm_fixture("tiny_gpt2"));
}

#[test]
fn gpt2_kv_cache_matches_full_forward() {
    lm_support::check_kv_cache("gpt2_kv_cache_matches_full_forward", &lm_fixture("tiny_gpt2"));
}

#[test]
fn gpt2_cache_reorder_gathers_rows() {
    lm_support::check_cache_reorder("gpt2_cache_reorder_gathers_rows", &lm_fixture("tiny_gpt2"));
}

#[test]
fn gpt2_left_padding_is_masked() {
    lm_support::check_left_padding("gpt2_left_padding_is_masked", &lm_fixture("tiny_gpt2"));
}

#[test]
fn gpt2_greedy_matches_transformers() {
    lm_support::check_greedy("gpt2_greedy_matches_transformers", &lm_fixture("tiny_gpt2"));
}

/// Checkpoints saved from a bare `GPT2Model` (such as the original `gpt2`
/// upload) have no `transformer.` prefix. Older ones also carry `attn.bias`
/// mask buffers. Such a checkpoint loads to the same logits.
#[test]
fn gpt2_loads_unprefixed_checkpoint() {
    let folder = lm_fixture("tiny_gpt2");
    let file = SafetensorsWeights::open(&folder).unwrap();
    let mut weights = InMemoryWeights::new("tiny_gpt2 without the transformer. prefix");
    for name in file.names() {
        let bare = name.strip_prefix("transformer.").unwrap_or(&name).to_string();
        weights.insert(bare, file.tensor(&name).unwrap());
    }
    weights.insert("h.0.attn.bias", HostTensor::from_f32([1, 1, 64, 64], vec![1.0; 64 * 64]).unwrap());
    let config = Gpt2Config::from_file(&folder.join("config.json")).unwrap();
    let reference = lm_support::Reference::open(&folder.join("reference.safetensors"));

    lm_support::on_every_device("gpt2_loads_unprefixed_checkpoint", |device| {
        let model = LanguageModel::Gpt2(Gpt2::load(device, &config, &weights, DType::F32)?);
        let ids = lm_support::reference_ids(device, &reference)?;
        let logits = model.forward(&ids, &lm_support::positions(device, ids.dim(0), ids.dim(1)), None)?;
        let (shape, expected) = reference.f32("logits");
        lm_support::assert_close("logits", device, &logits, &shape, &expected, lm_support::FORWARD_TOLERANCE);
        Ok(())
    });
}
