//! Helpers shared by the language model tests: fixture files, the devices
//! every test body runs on, tensor comparison, and the whole-model passes
//! the golden tests check.

#![allow(dead_code)]

#[path = "../loader_support/mod.rs"]
mod loader_support;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use flamingo_kernels::{DType, Device, Matmul, Tensor};
use flamingo_model::lm::{LanguageModel, LayerSaved, NormSaved, SelfAttentionInput};
use flamingo_model::loader::{SafetensorsWeights, WeightSource};
use flamingo_model::{Error, Result};

pub use loader_support::fixtures_dir;
#[allow(unused_imports)]
pub use loader_support::smollm2_gguf;

/// The Hugging Face folder of a tiny fixture model: "tiny_gpt2" or "tiny_llama".
pub fn lm_fixture(name: &str) -> PathBuf {
    fixtures_dir().join("lm").join(name)
}

/// A safetensors file of reference tensors written by transformers.
pub struct Reference {
    file: SafetensorsWeights,
}

impl Reference {
    pub fn open(path: &Path) -> Self {
        let file = SafetensorsWeights::open_file(path).unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
        Self { file }
    }

    /// An F32 tensor: shape and values.
    pub fn f32(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let tensor = self.file.tensor_f32(name).unwrap_or_else(|e| panic!("reference tensor {name}: {e}"));
        let values = tensor.to_f32();
        (tensor.shape, values)
    }

    /// An I64 tensor of token ids, as u32: shape and values.
    pub fn ids(&self, name: &str) -> (Vec<usize>, Vec<u32>) {
        let shape = self.file.shape(name).unwrap();
        let bytes = self.file.raw_bytes(name).unwrap();
        let values = bytes
            .chunks_exact(8)
            .map(|word| u32::try_from(i64::from_le_bytes(word.try_into().unwrap())).expect("token id fits in u32"))
            .collect();
        (shape, values)
    }
}

/// The devices a test body runs on: the CPU backend, then every wgpu adapter.
///
/// They are opened once per test binary and shared by its tests, because
/// wgpu's GL backend fails (EGL `BadAccess`) when several threads enumerate
/// adapters at the same time.
pub fn devices() -> Vec<Device> {
    static DEVICES: OnceLock<Vec<Device>> = OnceLock::new();
    DEVICES.get_or_init(open_devices).clone()
}

fn open_devices() -> Vec<Device> {
    let mut devices = vec![Device::cpu()];
    for adapter in flamingo_kernels::gpu::list_adapters() {
        match Device::gpu(adapter.index) {
            Ok(device) => devices.push(device),
            Err(flamingo_kernels::Error::Unsupported { .. }) => {
                eprintln!("SKIPPED adapter {} ({}): the wgpu backend cannot open it yet", adapter.index, adapter.name)
            }
            Err(e) => panic!("adapter {} ({}) failed to open: {e}", adapter.index, adapter.name),
        }
    }
    devices
}

/// The weight dtypes a golden test checks on `device`: f32 everywhere, and
/// f16 where the device stores frozen weights in f16 by default. The CPU
/// backend runs f16 weights too, as the reference for the GPU path.
pub fn weight_dtypes(device: &Device) -> Vec<DType> {
    if device.is_gpu() && device.weight_dtype() == DType::F32 {
        vec![DType::F32]
    } else {
        vec![DType::F32, DType::F16]
    }
}

/// Whether an error only reports that an op is not implemented on this backend yet.
pub fn is_unsupported(error: &Error) -> bool {
    matches!(error, Error::Unsupported(_) | Error::Kernel(flamingo_kernels::Error::Unsupported { .. }))
}

/// Runs `body` on every device. On a GPU, an `Unsupported` error skips the
/// device with a note; every other failure, on any device, fails the test.
pub fn on_every_device(test: &str, body: impl Fn(&Device) -> Result<()>) {
    for device in devices() {
        match body(&device) {
            Ok(()) => {}
            Err(e) if device.is_gpu() && is_unsupported(&e) => {
                eprintln!("SKIPPED {test} on {}: {e}", device.description());
            }
            Err(e) => panic!("{test} on {}: {e}", device.description()),
        }
    }
}

/// The largest absolute difference between two equally long slices.
pub fn max_abs_diff(found: &[f32], expected: &[f32]) -> f32 {
    assert_eq!(found.len(), expected.len(), "lengths differ");
    found.iter().zip(expected).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max)
}

/// Asserts that `found` matches the reference within `tolerance` (max abs),
/// printing the measured error.
pub fn assert_close(label: &str, device: &Device, found: &Tensor, expected_shape: &[usize], expected: &[f32], tolerance: f32) {
    assert_eq!(found.shape(), expected_shape, "{label}: shape");
    let values = found.to_vec_f32().unwrap();
    assert!(values.iter().all(|v| v.is_finite()), "{label}: non-finite values on {}", device.description());
    let error = max_abs_diff(&values, expected);
    let scale = max_abs(expected);
    println!("{label} on {}: max abs error {error:.3e} (max |reference| {scale:.3})", device.description());
    assert!(error <= tolerance, "{label} on {}: max abs error {error:.3e} exceeds {tolerance:.1e}", device.description());
}

/// Positions 0..T for every row of a [B, T] batch.
pub fn positions(device: &Device, batch: usize, time: usize) -> Tensor {
    let values = (0..batch).flat_map(|_| 0..time as u32).collect();
    device.from_u32([batch, time], values).unwrap()
}

/// Everything one forward pass with `save` produced.
pub struct Trace {
    /// The input of every layer, then the output of the last one: L + 1 tensors.
    pub hidden_states: Vec<Tensor>,
    pub saved: Vec<LayerSaved>,
    pub final_norm_output: Tensor,
    pub final_norm: NormSaved,
    pub logits: Tensor,
}

/// Runs the model layer by layer, keeping every activation.
pub fn traced_forward(model: &LanguageModel, ids: &Tensor, positions: &Tensor) -> Result<Trace> {
    let input = SelfAttentionInput { positions, key_padding: None };
    let mut hidden_states = vec![model.embed(ids, positions)?];
    let mut saved = Vec::new();
    for index in 0..model.num_layers() {
        let (y, layer_saved) = model.layer_forward(index, hidden_states.last().unwrap(), &input, None, true)?;
        hidden_states.push(y);
        saved.push(layer_saved.expect("save = true returns the activations"));
    }
    let (final_norm_output, final_norm) = model.final_norm(hidden_states.last().unwrap(), true)?;
    let logits = model.logits(&final_norm_output)?;
    Ok(Trace { hidden_states, saved, final_norm_output, final_norm: final_norm.unwrap(), logits })
}

/// Backpropagates `dlogits` through the head, the final norm and every
/// layer; returns the gradient of each hidden state, index 0 first.
pub fn input_gradients(model: &LanguageModel, trace: &Trace, dlogits: &Tensor) -> Result<Vec<Tensor>> {
    let device = model.device();
    let dh = device.matmul(dlogits, model.lm_head(), &Matmul::new())?;
    let mut grads = vec![model.final_norm_backward(&trace.final_norm, &dh)?];
    for index in (0..model.num_layers()).rev() {
        let dx = model.layer_backward(index, &trace.saved[index], grads.last().unwrap())?;
        grads.push(dx);
    }
    grads.reverse();
    Ok(grads)
}

/// Largest allowed max-abs difference from transformers for the tiny
/// fixture models with f32 weights (activations and logits).
pub const FORWARD_TOLERANCE: f32 = 1e-4;

/// Largest allowed max-abs difference of the input gradients with f32
/// weights, relative to the largest reference value. The gradients reach a
/// few hundred (tiny Llama: 367), where one f32 ulp is 3e-5, so an absolute
/// bound alone would demand bit-exact summation order.
pub const GRADIENT_RELATIVE_TOLERANCE: f32 = 2e-6;

/// Bounds with f16 weights, relative to the largest reference value (at
/// least 1). Rounding each weight to f16 (a relative 2⁻¹¹) moves the
/// results of an f32 model systematically. On the CPU backend, the worst
/// relative errors were 2.2e-3 for activations and logits and 2.9e-3 for
/// input gradients (tiny Llama).
pub const FORWARD_RELATIVE_TOLERANCE_F16: f32 = 5e-3;
pub const GRADIENT_RELATIVE_TOLERANCE_F16: f32 = 1e-2;

fn max_abs(values: &[f32]) -> f32 {
    values.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

/// The bound for activations or logits whose reference values are
/// `expected`, with weights stored in `dtype`.
pub fn forward_tolerance(expected: &[f32], dtype: DType) -> f32 {
    match dtype {
        DType::F16 => FORWARD_RELATIVE_TOLERANCE_F16 * max_abs(expected).max(1.0),
        _ => FORWARD_TOLERANCE,
    }
}

/// The bound for a gradient whose reference values are `expected`, with
/// weights stored in `dtype`.
pub fn gradient_tolerance(expected: &[f32], dtype: DType) -> f32 {
    match dtype {
        DType::F16 => GRADIENT_RELATIVE_TOLERANCE_F16 * max_abs(expected).max(1.0),
        _ => FORWARD_TOLERANCE.max(GRADIENT_RELATIVE_TOLERANCE * max_abs(expected)),
    }
}

/// Loads a fixture model with weights in `dtype`, and its reference tensors, on `device`.
pub fn load_fixture(device: &Device, folder: &Path, dtype: DType) -> Result<(LanguageModel, Reference)> {
    let (model, _, _) = LanguageModel::load_with_weight_dtype(device, folder, dtype)?;
    Ok((model, Reference::open(&folder.join("reference.safetensors"))))
}

/// Uploads the reference `input_ids` [B, T].
pub fn reference_ids(device: &Device, reference: &Reference) -> Result<Tensor> {
    let (shape, ids) = reference.ids("input_ids");
    Ok(device.from_u32(shape, ids)?)
}

/// Every hidden state, the final norm output and the logits match transformers.
pub fn check_hidden_states(test: &str, folder: &Path) {
    on_every_device(test, |device| {
        for dtype in weight_dtypes(device) {
            let (model, reference) = load_fixture(device, folder, dtype)?;
            let ids = reference_ids(device, &reference)?;
            let (batch, time) = (ids.dim(0), ids.dim(1));
            let trace = traced_forward(&model, &ids, &positions(device, batch, time))?;
            let label = |name: &str| format!("{name} ({} weights)", dtype.name());

            let (shape, embeds) = reference.f32("inputs_embeds");
            let token_rows = device.embedding(model.token_embedding(), &ids, 0)?;
            let tolerance = forward_tolerance(&embeds, dtype);
            assert_close(&label("inputs_embeds"), device, &token_rows, &shape, &embeds, tolerance);
            for (index, hidden) in trace.hidden_states.iter().enumerate() {
                let name = format!("hidden_states.{index}");
                let (shape, expected) = reference.f32(&name);
                let tolerance = forward_tolerance(&expected, dtype);
                assert_close(&label(&name), device, hidden, &shape, &expected, tolerance);
            }
            let (shape, expected) = reference.f32("final_norm_output");
            let tolerance = forward_tolerance(&expected, dtype);
            assert_close(&label("final_norm_output"), device, &trace.final_norm_output, &shape, &expected, tolerance);
            let (shape, expected) = reference.f32("logits");
            let tolerance = forward_tolerance(&expected, dtype);
            assert_close(&label("logits, layer by layer"), device, &trace.logits, &shape, &expected, tolerance);

            let logits = model.forward(&ids, &positions(device, batch, time), None)?;
            assert_close(&label("logits, forward"), device, &logits, &shape, &expected, tolerance);
        }
        Ok(())
    });
}

/// The gradient of sum(logits · R) with respect to every hidden state matches transformers.
pub fn check_input_gradient(test: &str, folder: &Path) {
    on_every_device(test, |device| {
        for dtype in weight_dtypes(device) {
            let (model, reference) = load_fixture(device, folder, dtype)?;
            let ids = reference_ids(device, &reference)?;
            let (batch, time) = (ids.dim(0), ids.dim(1));
            let trace = traced_forward(&model, &ids, &positions(device, batch, time))?;
            let (shape, r) = reference.f32("grad_logits");
            let grads = input_gradients(&model, &trace, &device.from_f32(shape, r)?)?;
            let label = |name: &str| format!("{name} ({} weights)", dtype.name());

            let (shape, expected) = reference.f32("grad_inputs_embeds");
            let tolerance = gradient_tolerance(&expected, dtype);
            assert_close(&label("grad_inputs_embeds"), device, &grads[0], &shape, &expected, tolerance);
            for (index, grad) in grads.iter().enumerate().skip(1) {
                let name = format!("grad_hidden_states.{index}");
                let (shape, expected) = reference.f32(&name);
                let tolerance = gradient_tolerance(&expected, dtype);
                assert_close(&label(&name), device, grad, &shape, &expected, tolerance);
            }
        }
        Ok(())
    });
}

/// Rows `rows` of position `t` of logits [B, T, V], as one flat vector.
fn logits_at(logits: &[f32], time: usize, vocab: usize, rows: &[usize], t: usize) -> Vec<f32> {
    rows.iter().flat_map(|&b| logits[(b * time + t) * vocab..(b * time + t + 1) * vocab].to_vec()).collect()
}

/// Decoding with the KV cache (a 5-token prefill, then one token per step)
/// gives the logits of the full forward pass.
pub fn check_kv_cache(test: &str, folder: &Path) {
    on_every_device(test, |device| {
        let (model, reference) = load_fixture(device, folder, DType::F32)?;
        let (shape, ids) = reference.ids("input_ids");
        let (batch, time) = (shape[0], shape[1]);
        let vocab = model.summary().vocab_size;
        let (_, full) = reference.f32("logits");
        let rows: Vec<usize> = (0..batch).collect();

        let mut cache = model.new_cache();
        let prefill = 5;
        let slice = |start: usize, len: usize| -> Vec<u32> {
            (0..batch).flat_map(|b| ids[b * time + start..b * time + start + len].to_vec()).collect()
        };
        let step_positions = |start: usize, len: usize| -> Vec<u32> {
            (0..batch).flat_map(|_| start as u32..(start + len) as u32).collect()
        };
        let logits = model.forward_with_cache(
            &device.from_u32([batch, prefill], slice(0, prefill))?,
            &device.from_u32([batch, prefill], step_positions(0, prefill))?,
            None,
            Some(&mut cache),
        )?;
        assert_eq!(cache.len(), prefill);
        let values = logits.to_vec_f32()?;
        for t in 0..prefill {
            let error = max_abs_diff(&logits_at(&values, prefill, vocab, &rows, t), &logits_at(&full, time, vocab, &rows, t));
            assert!(error <= FORWARD_TOLERANCE, "prefill position {t}: max abs error {error:.3e}");
        }

        for t in prefill..time {
            let logits = model.forward_with_cache(
                &device.from_u32([batch, 1], slice(t, 1))?,
                &device.from_u32([batch, 1], step_positions(t, 1))?,
                None,
                Some(&mut cache),
            )?;
            assert_eq!(cache.len(), t + 1);
            let error = max_abs_diff(&logits.to_vec_f32()?, &logits_at(&full, time, vocab, &rows, t));
            println!("cached step at position {t} on {}: max abs error {error:.3e}", device.description());
            assert!(error <= FORWARD_TOLERANCE, "cached step at position {t}: max abs error {error:.3e}");
        }
        Ok(())
    });
}

/// After `KvCache::reorder`, each new row continues the sequence it was gathered from.
pub fn check_cache_reorder(test: &str, folder: &Path) {
    on_every_device(test, |device| {
        let (model, reference) = load_fixture(device, folder, DType::F32)?;
        let (shape, ids) = reference.ids("input_ids");
        let (batch, time) = (shape[0], shape[1]);
        let vocab = model.summary().vocab_size;
        let (_, full) = reference.f32("logits");
        let prefill = 6;

        let mut cache = model.new_cache();
        let prefix: Vec<u32> = (0..batch).flat_map(|b| ids[b * time..b * time + prefill].to_vec()).collect();
        model.forward_with_cache(
            &device.from_u32([batch, prefill], prefix)?,
            &positions(device, batch, prefill),
            None,
            Some(&mut cache),
        )?;

        let order = [1usize, 0, 1];
        cache.reorder(device, &order.map(|b| b as u32))?;
        assert_eq!(cache.batch_size(), Some(order.len()));
        assert_eq!(cache.len(), prefill);
        let next: Vec<u32> = order.iter().map(|&b| ids[b * time + prefill]).collect();
        let logits = model.forward_with_cache(
            &device.from_u32([order.len(), 1], next)?,
            &device.from_u32([order.len(), 1], vec![prefill as u32; order.len()])?,
            None,
            Some(&mut cache),
        )?;
        let error = max_abs_diff(&logits.to_vec_f32()?, &logits_at(&full, time, vocab, &order, prefill));
        println!("step after reorder on {}: max abs error {error:.3e}", device.description());
        assert!(error <= FORWARD_TOLERANCE, "step after reorder: max abs error {error:.3e}");

        let out_of_range = cache.reorder(device, &[3]);
        assert!(matches!(out_of_range, Err(Error::InvalidInput(_))), "index 3 of 3 rows: {out_of_range:?}");
        Ok(())
    });
}

/// A left-padded row, with its pads masked and its positions starting at
/// the first real token, gives the logits of the same tokens unpadded.
pub fn check_left_padding(test: &str, folder: &Path) {
    on_every_device(test, |device| {
        let (model, reference) = load_fixture(device, folder, DType::F32)?;
        let (shape, ids) = reference.ids("input_ids");
        let (batch, time) = (shape[0], shape[1]);
        let vocab = model.summary().vocab_size;
        let (_, full) = reference.f32("logits");
        let pads = 3;

        // Row 0 is unchanged; row 1 is three pad tokens (id 0) and its first 6 tokens.
        let mut padded_ids = ids[..time].to_vec();
        padded_ids.extend(std::iter::repeat_n(0, pads));
        padded_ids.extend_from_slice(&ids[time..2 * time - pads]);
        let mut padded_positions: Vec<u32> = (0..time as u32).collect();
        padded_positions.extend(std::iter::repeat_n(0, pads));
        padded_positions.extend(0..(time - pads) as u32);
        let mut key_padding = vec![1u32; time];
        key_padding.extend(std::iter::repeat_n(0, pads));
        key_padding.extend(std::iter::repeat_n(1, time - pads));

        let key_padding = device.from_u32([batch, time], key_padding)?;
        let logits = model.forward(
            &device.from_u32([batch, time], padded_ids)?,
            &device.from_u32([batch, time], padded_positions)?,
            Some(&key_padding),
        )?;
        let values = logits.to_vec_f32()?;
        assert!(values.iter().all(|v| v.is_finite()), "padded positions must not produce NaN");

        let row0 = max_abs_diff(&values[..time * vocab], &full[..time * vocab]);
        assert!(row0 <= FORWARD_TOLERANCE, "unpadded row: max abs error {row0:.3e}");
        for t in 0..time - pads {
            let found = &values[(time + pads + t) * vocab..(time + pads + t + 1) * vocab];
            let expected = &full[(time + t) * vocab..(time + t + 1) * vocab];
            let error = max_abs_diff(found, expected);
            assert!(error <= FORWARD_TOLERANCE, "padded row, token {t}: max abs error {error:.3e}");
        }
        Ok(())
    });
}

/// Greedy decoding reproduces transformers' `generate(do_sample=False)`
/// with the end token stated in `generation.json`.
pub fn check_greedy(test: &str, folder: &Path) {
    let text = std::fs::read_to_string(folder.join("generation.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let as_ids = |value: &serde_json::Value| -> Vec<u32> {
        value.as_array().unwrap().iter().map(|id| id.as_u64().unwrap() as u32).collect()
    };
    let prompt = as_ids(&json["prompt_ids"]);
    let greedy = &json["greedy"];
    let sequence = as_ids(&greedy["sequence"]);
    let eos = greedy["eos_token_id"].as_u64().unwrap() as u32;
    let max_new_tokens = greedy["max_new_tokens"].as_u64().unwrap() as usize;

    on_every_device(test, |device| {
        let (model, tokenizer, _) = LanguageModel::load_with_weight_dtype(device, folder, DType::F32)?;
        let encoded = tokenizer.encode(json["prompt_text"].as_str().unwrap(), true).unwrap();
        assert_eq!(encoded.get_ids(), prompt.as_slice(), "prompt ids");

        let generated = model.greedy_ids(&prompt, max_new_tokens, &[eos])?;
        assert_eq!(generated, sequence[prompt.len()..], "greedy continuation of {prompt:?}");
        Ok(())
    });
}
