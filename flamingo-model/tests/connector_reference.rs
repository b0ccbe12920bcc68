//! The resampler and the gated cross-attention block against lucidrains'
//! flamingo-pytorch: outputs and every gradient, from fixtures written by
//! `scripts/fixtures/gen_connector.py`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use flamingo_kernels::{gpu, Device, HostTensor, Tensor};
use flamingo_model::flamingo::{CrossAttentionShape, GatedCrossAttention, ParamStore, PerceiverResampler, ResamplerConfig};
use safetensors::{Dtype, SafeTensors};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/connector").join(name)
}

/// Every tensor of a fixture file, floats as f32 and integers and booleans as u32.
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
            Dtype::BOOL => HostTensor::from_u32(shape, data.iter().map(|&b| b as u32).collect()),
            other => panic!("{name}: unexpected dtype {other:?} for {key}"),
        };
        tensors.insert(key, host.unwrap());
    }
    tensors
}

/// The CPU backend and every wgpu adapter that can run the connector's ops.
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

/// Whether `error` says the device lacks an op; such a device is skipped.
fn unsupported(device: &Device, error: &dyn std::fmt::Display) -> bool {
    let text = error.to_string();
    if device.is_gpu() && text.contains("not supported") {
        eprintln!("note: {} skipped: {text}", device.description());
        return true;
    }
    false
}

#[track_caller]
fn assert_close(what: &str, got: &Tensor, want: &HostTensor, tol: f32) {
    assert_eq!(got.shape(), want.shape.as_slice(), "{what}: shape");
    let got = got.to_vec_f32().unwrap();
    let want = want.to_f32();
    let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0.0f32, f32::max);
    assert!(worst <= tol, "{what}: max abs error {worst:.2e} exceeds {tol:.0e}");
}

fn resampler_case(device: &Device) -> flamingo_model::Result<()> {
    let fixture = read_fixture("flamingo_pytorch_resampler.safetensors");
    let config = ResamplerConfig { dim: 32, depth: 2, heads: 2, dim_head: 8, num_latents: 5, ff_mult: 2, max_num_media: 3, max_num_frames: 1, ..ResamplerConfig::default() };
    let mut store = ParamStore::new(device, 0);
    let resampler = PerceiverResampler::new(&mut store, "perceiver", config)?;

    // flamingo-pytorch's `media_pos_emb` is OpenFlamingo's `media_time_embs`;
    // it has no frame embeddings, which stay at zero here.
    let ours = |theirs: &str| format!("perceiver.{}", theirs.replace("media_pos_emb", "media_time_embs"));
    let mut weights: BTreeMap<String, HostTensor> = fixture
        .iter()
        .filter_map(|(key, value)| key.strip_prefix("param.").map(|name| (ours(name), value.clone())))
        .collect();
    weights.insert("perceiver.frame_embs".into(), HostTensor::from_f32(vec![1, 32], vec![0.0; 32])?);
    store.load_from(&weights, "flamingo_pytorch_resampler.safetensors")?;

    // Batch 2 with 2 media each becomes 4 items of one frame of 6 tokens.
    let x = device.upload(&fixture["input.x"])?.reshape([4, 1, 6, 32])?;
    let (out, saved) = resampler.forward(&store, &x, &[0, 1, 0, 1], true)?;
    assert_close("resampler output", &out.reshape([2, 2, 5, 32])?, &fixture["output"], 1e-4);

    let dout = device.upload(&fixture["grad_output"])?.reshape([4, 5, 32])?;
    let dx = resampler.backward(&mut store, saved.as_ref().unwrap(), &dout, true)?.unwrap();
    assert_close("resampler input gradient", &dx.reshape([2, 2, 6, 32])?, &fixture["grad.input.x"], 1e-4);
    let mut compared = 0;
    for (key, want) in &fixture {
        let Some(name) = key.strip_prefix("grad.param.") else { continue };
        let param = &store.params()[store.params().iter().position(|p| p.name == ours(name)).unwrap()];
        assert_close(&format!("gradient of {}", param.name), param.grad.as_ref().unwrap(), want, 1e-4);
        compared += 1;
    }
    assert_eq!(compared, store.params().len() - 1, "every parameter but frame_embs has a reference gradient");
    Ok(())
}

#[test]
fn resampler_matches_flamingo_pytorch() {
    for device in devices() {
        if let Err(error) = resampler_case(&device) {
            if !unsupported(&device, &error) {
                panic!("{}: {error}", device.description());
            }
        }
    }
}

fn cross_attention_case(device: &Device) -> flamingo_model::Result<()> {
    let fixture = read_fixture("flamingo_pytorch_gated_xattn.safetensors");
    let shape = CrossAttentionShape { dim: 32, dim_visual: 32, heads: 2, dim_head: 8, ff_mult: 2 };
    let mut store = ParamStore::new(device, 0);
    let block = GatedCrossAttention::new(&mut store, "block", shape)?;
    let weights: BTreeMap<String, HostTensor> = fixture
        .iter()
        .filter_map(|(key, value)| key.strip_prefix("param.").map(|name| (format!("block.{name}"), value.clone())))
        .collect();
    store.load_from(&weights, "flamingo_pytorch_gated_xattn.safetensors")?;

    // Three media items of five latents: latent j belongs to item j / 5 + 1.
    let x = device.upload(&fixture["input.x"])?;
    let latents = device.upload(&fixture["input.media"])?.reshape([2, 15, 32])?;
    let query_media = device.upload(&fixture["input.media_index"])?;
    let key_media = device.from_u32(vec![2, 15], (0..30).map(|j| (j % 15 / 5 + 1) as u32).collect())?;
    let (out, saved) = block.forward(&store, &x, &latents, &query_media, &key_media, true)?;
    assert_close("cross-attention output", &out, &fixture["output"], 1e-4);

    let dout = device.upload(&fixture["grad_output"])?;
    let (dx, dlatents) = block.backward(&mut store, saved.as_ref().unwrap(), &dout, &query_media, &key_media)?;
    assert_close("text gradient", &dx, &fixture["grad.input.x"], 1e-4);
    assert_close("latent gradient", &dlatents.reshape([2, 3, 5, 32])?, &fixture["grad.input.media"], 1e-4);
    for param in store.params() {
        let want = &fixture[&format!("grad.param.{}", param.name.trim_start_matches("block."))];
        assert_close(&format!("gradient of {}", param.name), param.grad.as_ref().unwrap(), want, 1e-4);
    }
    Ok(())
}

#[test]
fn cross_attention_matches_flamingo_pytorch() {
    for device in devices() {
        if let Err(error) = cross_attention_case(&device) {
            if !unsupported(&device, &error) {
                panic!("{}: {error}", device.description());
            }
        }
    }
}
