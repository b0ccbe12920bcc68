//! AdamW over a tiny Flamingo's trainable tensors: groups, the update
//! against its formula, weight decay, clipping, multipliers and the saved state.

mod train_support;

use flamingo_kernels::Device;
use flamingo_model::flamingo::{Flamingo, FlamingoConfig, ParamStore, ResamplerConfig};
use flamingo_model::lm::LanguageModel;
use flamingo_train::{AdamWOptimizer, OptimizerConfig, ParamGroup};
use train_support::tiny_llama;

fn model() -> Flamingo {
    let device = Device::cpu();
    let (lm, tokenizer, special) = LanguageModel::load(&device, &tiny_llama()).unwrap();
    let config = FlamingoConfig {
        resampler: ResamplerConfig { dim: 12, depth: 1, heads: 2, dim_head: 4, num_latents: 3, ff_mult: 1, ..ResamplerConfig::default() },
        cross_attn_every_n_layers: 1,
        cross_attn_heads: 2,
        cross_attn_dim_head: 4,
        cross_attn_ff_mult: 1,
        cross_attn_layout: Default::default(),
    };
    Flamingo::new(lm, tokenizer, special, config, 5).unwrap()
}

/// Gives every tensor the gradient `value` in each element.
fn set_grads(store: &mut ParamStore, value: f32) {
    let device = store.device().clone();
    store.zero_grads();
    let names: Vec<String> = store.params().iter().map(|p| p.name.clone()).collect();
    for name in names {
        let id = store.id(&name).unwrap();
        let shape = store.value(id).shape().to_vec();
        store.accumulate(id, device.full(shape, value).unwrap()).unwrap();
    }
}

fn value(store: &ParamStore, name: &str) -> Vec<f32> {
    store.value(store.id(name).unwrap()).to_vec_f32().unwrap()
}

#[test]
fn groups_cover_every_tensor() {
    let model = model();
    let optimizer = AdamWOptimizer::new(model.params(), &OptimizerConfig::default()).unwrap();
    let summary = optimizer.summary();
    assert_eq!(summary.elements, model.params().num_elements());
    assert_eq!(summary.tensors, model.params().params().len());

    let group = |g: ParamGroup| summary.groups.iter().find(|s| s.group == g).unwrap().clone();
    assert_eq!(group(ParamGroup::Gates).tensors, 4, "two gates per block, two blocks");
    assert_eq!(group(ParamGroup::Gates).elements, 4);
    assert_eq!(group(ParamGroup::TokenRows).tensors, 2);
    assert_eq!(group(ParamGroup::TokenRows).elements, 2 * 2 * 32);
    assert!(group(ParamGroup::Resampler).tensors > 0);
    assert!(group(ParamGroup::CrossAttention).tensors > 0);

    let decayed: usize = model.params().params().iter().filter(|p| p.weight_decay).map(|p| p.value.numel()).sum();
    assert_eq!(summary.decayed_elements, decayed);
    assert_eq!(group(ParamGroup::CrossAttention).decayed_elements, decayed, "only cross-attention matrices decay");
    assert!(summary.to_string().contains(&format!("{} elements", summary.elements)));
}

#[test]
fn update_follows_adamw_formula() {
    let mut model = model();
    let config = OptimizerConfig { lr: 0.01, weight_decay: 0.5, ..OptimizerConfig::default() };
    let mut optimizer = AdamWOptimizer::new(model.params(), &config).unwrap();
    let decayed = model.params().params().iter().find(|p| p.weight_decay).unwrap().name.clone();
    let plain = "perceiver.latents".to_string();
    let (decayed_before, plain_before) = (value(model.params(), &decayed), value(model.params(), &plain));

    set_grads(model.params_mut(), 0.2);
    assert_eq!(optimizer.step(model.params_mut(), 0.01).unwrap(), model.params().params().len());

    // Step 1: m̂ = g and v̂ = g², so the update is lr·g/(|g| + eps) = lr·(1 − 5e-8).
    let update = 0.01 * 0.2 / (0.2 + 1e-8);
    for (before, after) in plain_before.iter().zip(value(model.params(), &plain)) {
        assert!((after - (before - update)).abs() < 1e-7, "{before} -> {after}");
    }
    for (before, after) in decayed_before.iter().zip(value(model.params(), &decayed)) {
        let expected = before * (1.0 - 0.01 * 0.5) - update;
        assert!((after - expected).abs() < 1e-7, "{before} -> {after}, expected {expected}");
    }
}

#[test]
fn clipping_scales_to_max_norm() {
    let mut model = model();
    set_grads(model.params_mut(), 0.1);
    let elements = model.params().num_elements() as f32;
    let expected = 0.1 * elements.sqrt();
    let norm = AdamWOptimizer::clip_grad_norm(model.params_mut(), 1.0).unwrap();
    assert!((norm - expected).abs() < 1e-3 * expected, "norm {norm}, expected {expected}");
    let after = AdamWOptimizer::grad_norm(model.params()).unwrap();
    assert!((after - 1.0).abs() < 1e-4, "clipped norm {after}");

    // Below the limit nothing changes.
    let unchanged = AdamWOptimizer::clip_grad_norm(model.params_mut(), 10.0).unwrap();
    assert!((unchanged - after).abs() < 1e-6);
    assert!((AdamWOptimizer::grad_norm(model.params()).unwrap() - after).abs() < 1e-6);
}

#[test]
fn zero_multiplier_freezes_gates() {
    let mut model = model();
    let config = OptimizerConfig { gate_lr_multiplier: 0.0, resampler_lr_multiplier: 3.0, ..OptimizerConfig::default() };
    let mut optimizer = AdamWOptimizer::new(model.params(), &config).unwrap();
    let gates_before = model.gate_values().unwrap();
    let latents_before = value(model.params(), "perceiver.latents");
    set_grads(model.params_mut(), 0.3);
    optimizer.step(model.params_mut(), 1e-3).unwrap();
    assert_eq!(model.gate_values().unwrap(), gates_before);
    let moved = latents_before.iter().zip(value(model.params(), "perceiver.latents")).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!((moved - 3e-3).abs() < 1e-6, "a multiplier of 3 moves the latents by 3 × lr in the first step: {moved}");
}

#[test]
fn saved_state_continues_identically() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("optimizer.safetensors");
    let config = OptimizerConfig::default();

    let mut first = model();
    let mut optimizer = AdamWOptimizer::new(first.params(), &config).unwrap();
    for step in 0..3 {
        set_grads(first.params_mut(), 0.1 * (step + 1) as f32);
        optimizer.step(first.params_mut(), 1e-2).unwrap();
    }
    optimizer.save(&path).unwrap();

    let mut second = model();
    let tensors = first.params().to_host().unwrap();
    second.params_mut().load_from(&tensors, "test").unwrap();
    let mut restored = AdamWOptimizer::new(second.params(), &config).unwrap();
    restored.load(&path).unwrap();

    set_grads(first.params_mut(), -0.4);
    set_grads(second.params_mut(), -0.4);
    optimizer.step(first.params_mut(), 1e-2).unwrap();
    restored.step(second.params_mut(), 1e-2).unwrap();
    assert_eq!(first.params().to_host().unwrap(), second.params().to_host().unwrap());
}

#[test]
fn state_of_another_model_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("optimizer.safetensors");
    let model = model();
    let optimizer = AdamWOptimizer::new(model.params(), &OptimizerConfig::default()).unwrap();
    optimizer.save(&path).unwrap();

    let device = Device::cpu();
    let (lm, tokenizer, special) = LanguageModel::load(&device, &tiny_llama()).unwrap();
    let mut config = model.config.clone();
    config.resampler.num_latents = 5;
    let other = Flamingo::new(lm, tokenizer, special, config, 5).unwrap();
    let mut optimizer = AdamWOptimizer::new(other.params(), &OptimizerConfig::default()).unwrap();
    let message = optimizer.load(&path).unwrap_err().to_string();
    assert!(message.contains("perceiver.latents.exp_avg"), "{message}");
}
