//! The resampler and the gated cross-attention block in IDEFICS's layout
//! against Hugging Face's `IdeficsPerceiverResampler` and
//! `IdeficsGatedCrossAttentionLayer` (transformers 5.25): outputs, input
//! gradients and every parameter gradient after copying the weights across,
//! then the same gradients against finite differences.
//!
//! IDEFICS keeps separate `k_proj` and `v_proj`, while ours is one `to_kv`
//! whose rows are the keys' and then the values'. The weights are stacked by
//! rows on loading, and the gradient of `to_kv` is split in half again for
//! the comparison.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use flamingo_kernels::{gpu, Device, HostTensor, Tensor};
use flamingo_model::flamingo::cross_attention::CrossAttentionLayout;
use flamingo_model::flamingo::layers::{FeedForward, FeedForwardKind, NormKind};
use flamingo_model::flamingo::{
    tokenize_segments, CrossAttentionShape, Flamingo, FlamingoConfig, GatedCrossAttention, ParamStore, PerceiverResampler, ResamplerConfig,
    Segment, TextBatch,
};
use flamingo_model::lm::LanguageModel;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

const TOLERANCE: f32 = 1e-4;
const PERCEIVER: &str = "model.perceiver_resampler";
const CROSS_LAYER: &str = "model.gated_cross_attn_layers.0";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/connector/idefics").join(name)
}

/// Every tensor of a fixture file, floats as f32 and integers as u32.
fn read_fixture(name: &str) -> BTreeMap<String, HostTensor> {
    let bytes = std::fs::read(fixture(name)).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors = BTreeMap::new();
    for (key, view) in file.tensors() {
        let shape = view.shape().to_vec();
        let data = view.data();
        let host = match view.dtype() {
            Dtype::F32 => HostTensor::from_f32(shape, data.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()),
            Dtype::I64 => HostTensor::from_u32(shape, data.chunks(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32).collect()),
            other => panic!("{name}: unexpected dtype {other:?} for {key}"),
        };
        tensors.insert(key, host.unwrap());
    }
    tensors
}

fn idefics_config() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("config.json")).unwrap()).unwrap()
}

fn usize_at(config: &Value, pointer: &str) -> usize {
    config.pointer(pointer).and_then(Value::as_u64).unwrap_or_else(|| panic!("config.json has no integer at {pointer}")) as usize
}

/// Our resampler configuration for IDEFICS's perceiver in `config`.
fn resampler_config(config: &Value) -> ResamplerConfig {
    assert_eq!(config.pointer("/perceiver_config/qk_layer_norms_perceiver"), Some(&Value::Bool(true)));
    ResamplerConfig {
        dim: usize_at(config, "/vision_config/embed_dim"),
        depth: usize_at(config, "/perceiver_config/resampler_depth"),
        heads: usize_at(config, "/perceiver_config/resampler_n_heads"),
        dim_head: usize_at(config, "/perceiver_config/resampler_head_dim"),
        num_latents: usize_at(config, "/perceiver_config/resampler_n_latents"),
        // IDEFICS's perceiver MLP is always 4 times the vision width.
        ff_mult: 4,
        max_num_media: 1,
        max_num_frames: 1,
        qk_norm: Some(NormKind::LayerNorm),
        feed_forward: FeedForwardKind::ReluMlp,
        time_embeddings: false,
    }
}

/// Our block shape and layout for IDEFICS's gated cross-attention in `config`.
fn cross_attention_config(config: &Value) -> (CrossAttentionShape, CrossAttentionLayout) {
    assert_eq!(config["hidden_act"], "silu");
    assert_eq!(config["alpha_type"], "float", "only scalar tanh gates are supported");
    assert_eq!(config["qk_layer_norms"], true);
    let (dim, heads, intermediate) = (usize_at(config, "/hidden_size"), usize_at(config, "/num_attention_heads"), usize_at(config, "/intermediate_size"));
    assert_eq!(intermediate % dim, 0, "the MLP width must be a multiple of the text width");
    let shape = CrossAttentionShape { dim, dim_visual: usize_at(config, "/vision_config/embed_dim"), heads, dim_head: dim / heads, ff_mult: intermediate / dim };
    let layout = CrossAttentionLayout {
        norm: NormKind::RmsNorm,
        norm_eps: config["rms_norm_eps"].as_f64().unwrap() as f32,
        qk_norm: Some(NormKind::RmsNorm),
        feed_forward: FeedForwardKind::SwiGlu,
    };
    (shape, layout)
}

/// For each of our perceiver tensors, the IDEFICS tensors it is made of
/// (two for `to_kv`: keys, then values).
fn perceiver_names(depth: usize) -> Vec<(String, Vec<String>)> {
    let mut names = vec![
        ("perceiver.latents".to_string(), vec![format!("{PERCEIVER}.latents")]),
        ("perceiver.norm.weight".to_string(), vec![format!("{PERCEIVER}.layer_norm.weight")]),
        ("perceiver.norm.bias".to_string(), vec![format!("{PERCEIVER}.layer_norm.bias")]),
    ];
    let modules = [
        ("0.norm_media", vec!["0.context_layer_norm"]),
        ("0.norm_latents", vec!["0.latents_layer_norm"]),
        ("0.to_q", vec!["0.q_proj"]),
        ("0.to_kv", vec!["0.k_proj", "0.v_proj"]),
        ("0.to_out", vec!["0.output_proj"]),
        ("0.q_norm", vec!["0.q_layer_norm"]),
        ("0.k_norm", vec!["0.k_layer_norm"]),
        ("1.0", vec!["1.ln"]),
        ("1.1", vec!["1.fc"]),
        ("1.3", vec!["1.c_proj"]),
    ];
    let with_bias = ["0.norm_media", "0.norm_latents", "0.q_norm", "0.k_norm", "1.0"];
    for i in 0..depth {
        for (ours, theirs) in &modules {
            let params: &[&str] = if with_bias.contains(ours) { &["weight", "bias"] } else { &["weight"] };
            for param in params {
                let sources = theirs.iter().map(|t| format!("{PERCEIVER}.blocks.{i}.{t}.{param}")).collect();
                names.push((format!("perceiver.layers.{i}.{ours}.{param}"), sources));
            }
        }
    }
    names
}

/// For each of our block tensors (registered under `block`), the IDEFICS
/// tensors it is made of.
fn cross_attention_names() -> Vec<(String, Vec<String>)> {
    let table: [(&str, &[&str]); 12] = [
        ("attn.norm.weight", &["input_layernorm.weight"]),
        ("attn.to_q.weight", &["cross_attn.q_proj.weight"]),
        ("attn.to_kv.weight", &["cross_attn.k_proj.weight", "cross_attn.v_proj.weight"]),
        ("attn.to_out.weight", &["cross_attn.o_proj.weight"]),
        ("attn.q_norm.weight", &["cross_attn.q_layer_norm.weight"]),
        ("attn.k_norm.weight", &["cross_attn.k_layer_norm.weight"]),
        ("attn_gate", &["alpha_cross_attn"]),
        ("ff.norm.weight", &["post_attention_layernorm.weight"]),
        ("ff.gate_proj.weight", &["mlp.gate_proj.weight"]),
        ("ff.up_proj.weight", &["mlp.up_proj.weight"]),
        ("ff.down_proj.weight", &["mlp.down_proj.weight"]),
        ("ff_gate", &["alpha_dense"]),
    ];
    table
        .iter()
        .map(|(ours, theirs)| (format!("block.{ours}"), theirs.iter().map(|t| format!("{CROSS_LAYER}.{t}")).collect()))
        .collect()
}

/// Our tensors built from the fixture's `param.` tensors, stacking rows
/// where one of ours is several of IDEFICS's.
fn load_weights(store: &mut ParamStore, fixture: &BTreeMap<String, HostTensor>, names: &[(String, Vec<String>)], origin: &str) {
    let mut weights = BTreeMap::new();
    for (ours, theirs) in names {
        let parts: Vec<&HostTensor> = theirs.iter().map(|name| &fixture[&format!("param.{name}")]).collect();
        let mut shape = parts[0].shape.clone();
        shape[0] *= parts.len();
        let values: Vec<f32> = parts.iter().flat_map(|part| part.to_f32()).collect();
        weights.insert(ours.clone(), HostTensor::from_f32(shape, values).unwrap());
    }
    store.load_from(&weights, origin).unwrap();

    // Every IDEFICS parameter is copied, and every one of ours comes from IDEFICS.
    let used: BTreeSet<String> = names.iter().flat_map(|(_, theirs)| theirs.iter().map(|t| format!("param.{t}"))).collect();
    let available: BTreeSet<String> = fixture.keys().filter(|k| k.starts_with("param.")).cloned().collect();
    assert_eq!(used, available, "{origin}: the name table must cover every IDEFICS parameter");
    assert_eq!(store.params().len(), names.len(), "{origin}: every trainable tensor must have an IDEFICS counterpart");
}

/// Opens the CPU backend and every wgpu adapter that can be opened.
fn devices() -> Vec<Device> {
    let mut devices = vec![Device::cpu()];
    for adapter in gpu::list_adapters() {
        match Device::gpu(adapter.index) {
            Ok(device) => devices.push(device),
            Err(error) => eprintln!("note: adapter {} skipped: {error}", adapter.name),
        }
    }
    devices
}

/// Runs `case` on every device; a GPU that lacks an op is skipped with a note.
fn on_every_device(case: fn(&Device) -> flamingo_model::Result<()>) {
    // NOTE: two test threads that enumerate adapters or use devices opened
    // from the same GL adapter at once make wgpu's EGL backend panic
    // (`BadAccess` in `make_current`), so device runs take turns.
    static DEVICE_RUNS: Mutex<()> = Mutex::new(());
    let _turn = DEVICE_RUNS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    for device in devices() {
        match case(&device) {
            Ok(()) => {}
            Err(flamingo_model::Error::Kernel(error @ flamingo_kernels::Error::Unsupported { .. })) if device.is_gpu() => {
                eprintln!("note: {} skipped: {error}", device.description());
            }
            Err(error) => panic!("{}: {error}", device.description()),
        }
    }
}

/// Asserts that `got` matches `want` within the tolerance and prints the
/// largest difference.
#[track_caller]
fn assert_close(device: &Device, label: &str, got: &[f32], shape: &[usize], want: &HostTensor) {
    let device = device.description();
    assert_eq!(shape, want.shape.as_slice(), "{device}: {label}: shape");
    let worst = got.iter().zip(want.to_f32()).map(|(g, w)| (g - w).abs()).fold(0.0f32, f32::max);
    eprintln!("{device}: {label}: max abs error {worst:.1e}");
    assert!(worst <= TOLERANCE, "{device}: {label}: max abs error {worst:.2e} exceeds {TOLERANCE:.0e}");
}

#[track_caller]
fn assert_tensor_close(device: &Device, label: &str, got: &Tensor, want: &HostTensor) {
    assert_close(device, label, &got.to_vec_f32().unwrap(), got.shape(), want);
}

/// Compares the gradient of each of our tensors with IDEFICS's, splitting
/// stacked tensors by rows.
fn assert_param_grads_close(device: &Device, store: &ParamStore, fixture: &BTreeMap<String, HostTensor>, names: &[(String, Vec<String>)]) {
    for (ours, theirs) in names {
        let param = &store.params()[store.params().iter().position(|p| &p.name == ours).unwrap()];
        let grad = param.grad.as_ref().unwrap_or_else(|| panic!("{ours} has no gradient"));
        let values = grad.to_vec_f32().unwrap();
        let rows = grad.dim(0) / theirs.len();
        let row_len = values.len() / grad.dim(0);
        for (part, name) in theirs.iter().enumerate() {
            let mut shape = grad.shape().to_vec();
            shape[0] = rows;
            let slice = &values[part * rows * row_len..(part + 1) * rows * row_len];
            assert_close(device, &format!("gradient of {ours} against {name}"), slice, &shape, &fixture[&format!("grad.param.{name}")]);
        }
    }
}

fn perceiver_case(device: &Device) -> flamingo_model::Result<()> {
    let fixture = read_fixture("perceiver.safetensors");
    let config = resampler_config(&idefics_config());
    let names = perceiver_names(config.depth);
    let mut store = ParamStore::new(device, 0);
    let resampler = PerceiverResampler::new(&mut store, "perceiver", config)?;
    load_weights(&mut store, &fixture, &names, "perceiver.safetensors");

    // IDEFICS resamples [images, tokens, width]: one frame per item here.
    let context = &fixture["input.context"];
    let (items, tokens, dim) = (context.shape[0], context.shape[1], context.shape[2]);
    let x = device.upload(context)?.reshape([items, 1, tokens, dim])?;
    let (out, saved) = resampler.forward(&store, &x, &vec![0; items], true)?;
    assert_tensor_close(device, "perceiver output", &out, &fixture["output"]);

    let dout = device.upload(&fixture["grad_output"])?;
    let dx = resampler.backward(&mut store, saved.as_ref().unwrap(), &dout, true)?.unwrap();
    assert_tensor_close(device, "perceiver input gradient", &dx.reshape([items, tokens, dim])?, &fixture["grad.input.context"]);
    assert_param_grads_close(device, &store, &fixture, &names);
    Ok(())
}

#[test]
fn perceiver_matches_idefics() {
    on_every_device(perceiver_case);
}

/// IDEFICS's image attention mask [B, T, images] as our media index per
/// text token: 1 + the one image a token may attend, or 0 for none.
fn query_media_from_mask(mask: &HostTensor, gate: &HostTensor) -> Vec<u32> {
    let (batch, tokens, images) = (mask.shape[0], mask.shape[1], mask.shape[2]);
    let allowed = mask.to_f32();
    let gate = gate.to_f32();
    let mut query_media = vec![0u32; batch * tokens];
    for row in 0..batch * tokens {
        let seen: Vec<usize> = (0..images).filter(|&n| allowed[row * images + n] != 0.0).collect();
        assert!(seen.len() <= 1, "token {row} attends {} images, but a media index selects one", seen.len());
        query_media[row] = seen.first().map_or(0, |&n| n as u32 + 1);
        assert_eq!(gate[row] != 0.0, !seen.is_empty(), "cross_attention_gate of token {row} disagrees with the mask");
    }
    query_media
}

/// The fixture's block inputs on `device`: text states, image latents, and
/// the media index of each token and each latent.
struct CrossAttentionInputs {
    x: Tensor,
    latents: Tensor,
    query_media: Tensor,
    key_media: Tensor,
}

fn cross_attention_inputs(device: &Device, fixture: &BTreeMap<String, HostTensor>, num_latents: usize) -> flamingo_model::Result<CrossAttentionInputs> {
    let mask = &fixture["input.image_attention_mask"];
    let (batch, tokens, images) = (mask.shape[0], mask.shape[1], mask.shape[2]);
    let query_media = query_media_from_mask(mask, &fixture["input.cross_attention_gate"]);
    // Latents are image-major: latent j belongs to image j / L.
    let keys = images * num_latents;
    let key_media: Vec<u32> = (0..batch * keys).map(|j| ((j % keys) / num_latents + 1) as u32).collect();
    Ok(CrossAttentionInputs {
        x: device.upload(&fixture["input.hidden_states"])?,
        latents: device.upload(&fixture["input.image_hidden_states"])?,
        query_media: device.from_u32(vec![batch, tokens], query_media)?,
        key_media: device.from_u32(vec![batch, keys], key_media)?,
    })
}

fn cross_attention_case(device: &Device) -> flamingo_model::Result<()> {
    let fixture = read_fixture("gated_xattn.safetensors");
    let config = idefics_config();
    let (shape, layout) = cross_attention_config(&config);
    let names = cross_attention_names();
    let mut store = ParamStore::new(device, 0);
    let block = GatedCrossAttention::with_layout(&mut store, "block", shape, layout)?;
    load_weights(&mut store, &fixture, &names, "gated_xattn.safetensors");

    let num_latents = usize_at(&config, "/perceiver_config/resampler_n_latents");
    let inputs = cross_attention_inputs(device, &fixture, num_latents)?;
    let CrossAttentionInputs { x, latents, query_media, key_media } = &inputs;
    let (out, saved) = block.forward(&store, x, latents, query_media, key_media, true)?;
    assert_tensor_close(device, "cross-attention output", &out, &fixture["output"]);

    // Generation runs the block against keys computed once per image.
    let keys = block.media_keys(&store, latents)?;
    let cached = block.forward_with_keys(&store, x, &keys, query_media, key_media)?;
    assert_eq!(cached.to_vec_f32()?, out.to_vec_f32()?, "precomputed media keys must give the same output");

    let dout = device.upload(&fixture["grad_output"])?;
    let (dx, dlatents) = block.backward(&mut store, saved.as_ref().unwrap(), &dout, query_media, key_media)?;
    assert_tensor_close(device, "text gradient", &dx, &fixture["grad.input.hidden_states"]);
    assert_tensor_close(device, "image latent gradient", &dlatents, &fixture["grad.input.image_hidden_states"]);
    assert_param_grads_close(device, &store, &fixture, &names);
    Ok(())
}

#[test]
fn cross_attention_matches_idefics() {
    on_every_device(cross_attention_case);
}

/// Deterministic values in [-1, 1).
fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E3779B97F4A7C15).wrapping_add(1);
    (0..n)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Σ out ⊙ weights in f64: the scalar whose gradient backward computes when
/// given `weights` as the output gradient.
fn weighted_sum(out: &Tensor, weights: &[f32]) -> f64 {
    out.to_vec_f32().unwrap().iter().zip(weights).map(|(&o, &w)| o as f64 * w as f64).sum()
}

/// Checks one directional derivative: `analytic` against central differences
/// of `loss_at(±step)` along the same direction.
#[track_caller]
fn assert_directional_derivative(label: &str, analytic: f64, mut loss_at: impl FnMut(f32) -> f64) {
    let step = 1e-3f32;
    let numeric = (loss_at(step) - loss_at(-step)) / (2.0 * step as f64);
    let error = (analytic - numeric).abs();
    assert!(
        error <= 2e-3 + 2e-2 * numeric.abs(),
        "{label} along a random direction is {analytic:.6}, finite differences give {numeric:.6}"
    );
}

/// `values + step · direction`.
fn moved(values: &[f32], direction: &[f32], step: f32) -> Vec<f32> {
    values.iter().zip(direction).map(|(v, d)| v + step * d).collect()
}

/// Checks every parameter gradient of `store` against finite differences of
/// `loss`, which must read the parameters from the store.
fn check_param_gradients(store: &mut ParamStore, loss: impl Fn(&ParamStore) -> f64) {
    let names: Vec<String> = store.params().iter().map(|p| p.name.clone()).collect();
    for (index, name) in names.iter().enumerate() {
        let param = &store.params()[index];
        let value = param.value.to_host().unwrap();
        let grad = param.grad.as_ref().unwrap_or_else(|| panic!("{name} has no gradient")).to_vec_f32().unwrap();
        let direction = random(grad.len(), index as u64 + 100);
        let analytic: f64 = grad.iter().zip(&direction).map(|(&g, &d)| g as f64 * d as f64).sum();
        assert_directional_derivative(&format!("gradient of {name}"), analytic, |step| {
            let shifted = HostTensor::from_f32(value.shape.clone(), moved(&value.to_f32(), &direction, step)).unwrap();
            store.set(name, &shifted).unwrap();
            let loss = loss(store);
            store.set(name, &value).unwrap();
            loss
        });
    }
}

#[test]
fn perceiver_gradients_match_finite_differences() {
    let device = Device::cpu();
    let fixture = read_fixture("perceiver.safetensors");
    // NOTE: with the fixture's ReLU MLP, a step of 1e-3 along a random
    // direction moves some of the 2304 pre-activations across zero, and
    // central differences of the latents then miss by 25% (36.7 against
    // 48.4). GELU keeps the function smooth; the ReLU backward is checked on
    // its own in `feed_forward_gradients_match_finite_differences`.
    let config = ResamplerConfig { feed_forward: FeedForwardKind::GeluMlp, ..resampler_config(&idefics_config()) };
    let names = perceiver_names(config.depth);
    let mut store = ParamStore::new(&device, 0);
    let resampler = PerceiverResampler::new(&mut store, "perceiver", config).unwrap();
    load_weights(&mut store, &fixture, &names, "perceiver.safetensors");

    let context = &fixture["input.context"];
    let shape = [context.shape[0], 1, context.shape[1], context.shape[2]];
    let x_values = context.to_f32();
    let slots = vec![0; shape[0]];
    let weights = fixture["grad_output"].to_f32();
    let x = device.from_f32(shape.to_vec(), x_values.clone()).unwrap();
    let (_, saved) = resampler.forward(&store, &x, &slots, true).unwrap();
    let dout = device.upload(&fixture["grad_output"]).unwrap();
    let dx = resampler.backward(&mut store, saved.as_ref().unwrap(), &dout, true).unwrap().unwrap();

    let loss = |store: &ParamStore, x: &Tensor| weighted_sum(&resampler.forward(store, x, &slots, false).unwrap().0, &weights);
    check_param_gradients(&mut store, |store| loss(store, &x));

    let direction = random(x_values.len(), 7);
    let analytic: f64 = dx.to_vec_f32().unwrap().iter().zip(&direction).map(|(&g, &d)| g as f64 * d as f64).sum();
    assert_directional_derivative("input gradient", analytic, |step| {
        loss(&store, &device.from_f32(shape.to_vec(), moved(&x_values, &direction, step)).unwrap())
    });
}

/// Returns the sign of every pre-activation of `ff` on `x`.
fn pre_activation_signs(ff: &FeedForward, store: &ParamStore, x: &Tensor) -> Vec<bool> {
    let (normed, _) = ff.norm.forward(store, x).unwrap();
    ff.up.forward(store, &normed).unwrap().to_vec_f32().unwrap().iter().map(|&v| v > 0.0).collect()
}

/// Every feed-forward kind after either norm, on its own: parameter and
/// input gradients against finite differences.
#[test]
fn feed_forward_gradients_match_finite_differences() {
    let device = Device::cpu();
    let (rows, dim, inner) = (4, 8, 16);
    let kinds = [FeedForwardKind::GeluMlp, FeedForwardKind::ReluMlp, FeedForwardKind::SwiGlu];
    for (case, (kind, norm)) in kinds.iter().flat_map(|&k| [(k, NormKind::LayerNorm), (k, NormKind::RmsNorm)]).enumerate() {
        let mut store = ParamStore::new(&device, case as u64);
        let ff = FeedForward::new(&mut store, "ff", dim, inner, kind, norm, 1e-6, false).unwrap();
        // The norm's weight and bias (the block's only 1-D tensors) away from
        // their initial ones and zeros.
        let norm_names: Vec<String> = store.params().iter().filter(|p| p.value.rank() == 1).map(|p| p.name.clone()).collect();
        for name in &norm_names {
            let center = if name.ends_with(".weight") { 1.0 } else { 0.0 };
            let values = random(dim, 40 + case as u64).iter().map(|v| center + 0.3 * v).collect();
            store.set(name, &HostTensor::from_f32(vec![dim], values).unwrap()).unwrap();
        }

        // Central differences are exact for a ReLU MLP only if no
        // pre-activation changes sign within the step, so for ReLU the input
        // is the first whose pre-activations all lie at least 0.02 from zero.
        let x_at = |seed: u64| device.from_f32(vec![rows, dim], random(rows * dim, seed).iter().map(|v| 2.0 * v).collect()).unwrap();
        let far_from_kinks = |seed: u64| {
            let (normed, _) = ff.norm.forward(&store, &x_at(seed)).unwrap();
            ff.up.forward(&store, &normed).unwrap().to_vec_f32().unwrap().iter().all(|v| v.abs() >= 0.02)
        };
        let seed = match kind {
            FeedForwardKind::ReluMlp => (1000..1500).find(|&seed| far_from_kinks(seed)).expect("an input keeps every pre-activation 0.02 from zero"),
            _ => 1000,
        };
        let x = x_at(seed);
        let signs = pre_activation_signs(&ff, &store, &x);

        let weights = random(rows * dim, 60 + case as u64);
        let (_, saved) = ff.forward(&store, &x).unwrap();
        let dout = device.from_f32(vec![rows, dim], weights.clone()).unwrap();
        let dx = ff.backward(&mut store, &saved, &dout).unwrap();

        let loss = |store: &ParamStore, x: &Tensor| {
            if kind == FeedForwardKind::ReluMlp {
                assert_eq!(pre_activation_signs(&ff, store, x), signs, "{kind:?}: a pre-activation changed sign within the step");
            }
            weighted_sum(&ff.forward(store, x).unwrap().0, &weights)
        };
        check_param_gradients(&mut store, |store| loss(store, &x));

        let x_values = x.to_vec_f32().unwrap();
        let direction = random(x_values.len(), 7);
        let analytic: f64 = dx.to_vec_f32().unwrap().iter().zip(&direction).map(|(&g, &d)| g as f64 * d as f64).sum();
        assert_directional_derivative(&format!("{kind:?} after {norm:?}: input gradient"), analytic, |step| {
            loss(&store, &device.from_f32(vec![rows, dim], moved(&x_values, &direction, step)).unwrap())
        });
    }
}

#[test]
fn cross_attention_gradients_match_finite_differences() {
    let device = Device::cpu();
    let fixture = read_fixture("gated_xattn.safetensors");
    let config = idefics_config();
    let (shape, layout) = cross_attention_config(&config);
    let mut store = ParamStore::new(&device, 0);
    let block = GatedCrossAttention::with_layout(&mut store, "block", shape, layout).unwrap();
    load_weights(&mut store, &fixture, &cross_attention_names(), "gated_xattn.safetensors");

    let inputs = cross_attention_inputs(&device, &fixture, usize_at(&config, "/perceiver_config/resampler_n_latents")).unwrap();
    let CrossAttentionInputs { x, latents, query_media, key_media } = &inputs;
    let weights = fixture["grad_output"].to_f32();
    let (_, saved) = block.forward(&store, x, latents, query_media, key_media, true).unwrap();
    let dout = device.upload(&fixture["grad_output"]).unwrap();
    let (dx, dlatents) = block.backward(&mut store, saved.as_ref().unwrap(), &dout, query_media, key_media).unwrap();

    let loss = |store: &ParamStore, x: &Tensor, latents: &Tensor| {
        weighted_sum(&block.forward(store, x, latents, query_media, key_media, false).unwrap().0, &weights)
    };
    check_param_gradients(&mut store, |store| loss(store, x, latents));

    let x_values = x.to_vec_f32().unwrap();
    let direction = random(x_values.len(), 7);
    let analytic: f64 = dx.to_vec_f32().unwrap().iter().zip(&direction).map(|(&g, &d)| g as f64 * d as f64).sum();
    assert_directional_derivative("text gradient", analytic, |step| {
        loss(&store, &device.from_f32(x.shape().to_vec(), moved(&x_values, &direction, step)).unwrap(), latents)
    });

    let latent_values = latents.to_vec_f32().unwrap();
    let direction = random(latent_values.len(), 8);
    let analytic: f64 = dlatents.to_vec_f32().unwrap().iter().zip(&direction).map(|(&g, &d)| g as f64 * d as f64).sum();
    assert_directional_derivative("image latent gradient", analytic, |step| {
        loss(&store, x, &device.from_f32(latents.shape().to_vec(), moved(&latent_values, &direction, step)).unwrap())
    });
}

#[test]
fn layout_options_default_to_openflamingo() {
    // A connector config written before the layout options existed.
    let old = r#"{
        "resampler": {"dim": 12, "depth": 1, "heads": 2, "dim_head": 4, "num_latents": 3, "ff_mult": 2, "max_num_media": 2, "max_num_frames": 1},
        "cross_attn_every_n_layers": 1, "cross_attn_heads": 2, "cross_attn_dim_head": 4, "cross_attn_ff_mult": 2
    }"#;
    let config: FlamingoConfig = serde_json::from_str(old).unwrap();
    assert_eq!(config.cross_attn_layout, CrossAttentionLayout::default());
    assert_eq!(config.resampler.qk_norm, None);
    assert_eq!(config.resampler.feed_forward, FeedForwardKind::GeluMlp);
    assert!(config.resampler.time_embeddings);

    let layout: CrossAttentionLayout = serde_json::from_str(r#"{"norm": "rms_norm", "norm_eps": 1e-6, "qk_norm": "rms_norm", "feed_forward": "swiglu"}"#).unwrap();
    assert_eq!(layout, CrossAttentionLayout { norm: NormKind::RmsNorm, norm_eps: 1e-6, qk_norm: Some(NormKind::RmsNorm), feed_forward: FeedForwardKind::SwiGlu });
    let error = serde_json::from_str::<CrossAttentionLayout>(r#"{"feed_forward": "geglu"}"#).unwrap_err();
    assert!(error.to_string().contains("unknown variant `geglu`"), "{error}");
}

#[test]
fn invalid_norm_eps_is_rejected() {
    let mut store = ParamStore::new(&Device::cpu(), 0);
    let shape = CrossAttentionShape { dim: 8, dim_visual: 8, heads: 2, dim_head: 4, ff_mult: 2 };
    let bad = CrossAttentionLayout { norm_eps: 0.0, ..CrossAttentionLayout::default() };
    let error = GatedCrossAttention::with_layout(&mut store, "block", shape, bad).unwrap_err();
    assert!(error.to_string().contains("norm_eps must be a positive number, found 0"), "{error}");
}

#[test]
fn flamingo_with_idefics_layout_has_correct_gradients() {
    let device = Device::cpu();
    let lm_folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/lm/tiny_llama");
    let (lm, tokenizer, special) = LanguageModel::load(&device, &lm_folder).unwrap();
    let visual_dim = 12;
    let config = FlamingoConfig {
        resampler: ResamplerConfig {
            dim: visual_dim,
            depth: 1,
            heads: 2,
            dim_head: 4,
            num_latents: 3,
            ff_mult: 2,
            max_num_media: 2,
            max_num_frames: 1,
            qk_norm: Some(NormKind::LayerNorm),
            // GELU rather than IDEFICS's ReLU keeps the loss smooth for
            // central differences; see `perceiver_gradients_match_finite_differences`.
            feed_forward: FeedForwardKind::GeluMlp,
            time_embeddings: false,
        },
        cross_attn_every_n_layers: 1,
        cross_attn_heads: 2,
        cross_attn_dim_head: 4,
        cross_attn_ff_mult: 2,
        cross_attn_layout: CrossAttentionLayout {
            norm: NormKind::RmsNorm,
            norm_eps: 1e-6,
            qk_norm: Some(NormKind::RmsNorm),
            feed_forward: FeedForwardKind::SwiGlu,
        },
    };
    let mut model = Flamingo::new(lm, tokenizer, special, config, 7).unwrap();
    let names: Vec<String> = model.params().params().iter().map(|p| p.name.clone()).collect();
    assert!(!names.iter().any(|n| n.contains("frame_embs") || n.contains("media_time_embs")), "{names:?}");
    for expected in ["perceiver.layers.0.0.q_norm.bias", "lang_encoder.model.layers.1.gated_cross_attn_layer.attn.k_norm.weight"] {
        assert!(names.iter().any(|n| n == expected), "{expected} is missing from {names:?}");
    }
    // The added rows start at the mean embedding, whose RMS (about 1e-3) is
    // near √eps of the blocks' RMSNorm, so a step of 1e-3 is not small there.
    // Rows of real tokens stand in for trained ones.
    let embedding = model.lm.token_embedding().to_vec_f32().unwrap();
    let width = model.lm.token_embedding().dim(1);
    let added = HostTensor::from_f32(vec![2, width], embedding[5 * width..7 * width].to_vec()).unwrap();
    model.params_mut().set("lang_encoder.model.embed_tokens.additional_embedding.weight", &added).unwrap();
    // Latents of N(0, 0.02²) are so small that a step of 1e-3 changes them by
    // 5%; IDEFICS starts them at unit scale.
    let latents = HostTensor::from_f32(vec![3, visual_dim], random(3 * visual_dim, 11)).unwrap();
    model.params_mut().set("perceiver.latents", &latents).unwrap();
    for gate in names.iter().filter(|n| n.ends_with("_gate")) {
        let value = if gate.ends_with("attn_gate") { 0.6 } else { -0.5 };
        model.params_mut().set(gate, &HostTensor::from_f32(vec![1], vec![value]).unwrap()).unwrap();
    }

    let segments = [
        Segment { text: "A cat ", target: false },
        Segment { text: "<image>", target: false },
        Segment { text: "sat on", target: true },
        Segment { text: "<image>", target: false },
        Segment { text: "The capital", target: true },
    ];
    let sample = tokenize_segments(&model.tokenizer, &segments, model.image_id).unwrap();
    let batch = TextBatch::new(&device, &[sample], &[2], &model.batch_limits()).unwrap();
    let visual = device.from_f32(vec![2, 1, 5, visual_dim], random(2 * 5 * visual_dim, 3)).unwrap();
    model.params_mut().zero_grads();
    model.loss_and_backward(&batch, &visual, 1.0).unwrap();

    for (index, name) in names.iter().enumerate() {
        let param = &model.params().params()[index];
        let value = param.value.to_host().unwrap();
        let grad = param.grad.as_ref().map(|g| g.to_vec_f32().unwrap()).unwrap_or(vec![0.0; value.numel()]);
        let direction = random(grad.len(), index as u64 + 100);
        let analytic: f64 = grad.iter().zip(&direction).map(|(&g, &d)| g as f64 * d as f64).sum();
        assert_directional_derivative(&format!("gradient of {name}"), analytic, |step| {
            let shifted = HostTensor::from_f32(value.shape.clone(), moved(&value.to_f32(), &direction, step)).unwrap();
            model.params_mut().set(name, &shifted).unwrap();
            let loss = model.loss(&batch, &visual).unwrap().loss as f64;
            model.params_mut().set(name, &value).unwrap();
            loss
        });
    }
}

