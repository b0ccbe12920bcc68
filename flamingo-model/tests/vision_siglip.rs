//! SigLIP's vision tower against transformers 5.25 on the tiny fixture
//! (fixtures/vision/tiny_siglip: 32x32 images, patch 8, 16 patches, hidden
//! 32, 2 layers, no class token), on the CPU backend and every wgpu adapter.

mod vision_support;

use flamingo_kernels::{DType, Device};
use flamingo_model::vision::{VisionEncoder, VisionOptions};
use flamingo_model::Error;
use vision_support::{devices, fixtures_dir, max_abs_diff, nchw_to_nhwc, skip_unsupported, values, Fixture};

/// f32 weights and f32 activations throughout; transformers runs in f32 too.
const TOLERANCE: f32 = 1e-4;

fn encode(device: &Device, options: VisionOptions) -> flamingo_model::Result<Vec<f32>> {
    let reference = Fixture::open("vision/tiny_siglip/reference.safetensors");
    let (shape, pixels) = reference.f32("pixel_values");
    let pixels = nchw_to_nhwc(&pixels, &shape);
    let encoder = VisionEncoder::load(device, fixtures_dir().join("vision/tiny_siglip"), options)?;
    let pixels = device.from_f32([shape[0], shape[2], shape[3], shape[1]], pixels)?;
    let tokens = encoder.encode(&pixels)?;
    assert_eq!(tokens.shape(), [2, 16, 32], "token shape with {options:?}");
    Ok(values(&tokens))
}

#[test]
fn siglip_matches_transformers_on_every_device() {
    let reference = Fixture::open("vision/tiny_siglip/reference.safetensors");
    let (_, last_hidden_state) = reference.f32("last_hidden_state");
    let (_, post_layernorm) = reference.f32("post_layernorm_output");
    let (_, encoder_output) = reference.f32("encoder_output");
    assert_eq!(last_hidden_state, post_layernorm, "transformers' SigLIP last_hidden_state includes the final LayerNorm");

    let f32_weights = Some(DType::F32);
    let cases = [
        ("last_hidden_state (final LayerNorm)", VisionOptions { final_layer_norm: true, weight_dtype: f32_weights, ..Default::default() }, last_hidden_state),
        ("encoder output (no final LayerNorm)", VisionOptions { weight_dtype: f32_weights, ..Default::default() }, encoder_output),
    ];

    for (name, device) in devices() {
        for (case, options, expected) in &cases {
            let Some(found) = skip_unsupported(encode(&device, *options), &name, "siglip_matches_transformers_on_every_device") else {
                break;
            };
            let error = max_abs_diff(&found, expected);
            eprintln!("SigLIP {case} on {name}: max abs error {error:.2e}");
            assert!(error <= TOLERANCE, "SigLIP {case} on {name}: max abs error {error} > {TOLERANCE}");
        }
    }
}

#[test]
fn siglip_sizes_follow_config() {
    let device = Device::cpu();
    let encoder = VisionEncoder::load(&device, fixtures_dir().join("vision/tiny_siglip"), VisionOptions::default()).unwrap();
    assert_eq!(encoder.name(), "SigLIP");
    assert_eq!(encoder.image_size(), 32);
    assert_eq!(encoder.output_dim(), 32);
    assert_eq!(encoder.num_tokens(), 16);
}

#[test]
fn siglip_rejects_class_token_option() {
    let device = Device::cpu();
    let options = VisionOptions { include_cls: true, ..Default::default() };
    let error = VisionEncoder::load(&device, fixtures_dir().join("vision/tiny_siglip"), options).err().expect("no class token");
    assert!(matches!(error, Error::InvalidInput(_)), "{error:?}");
    assert!(error.to_string().contains("no class token"), "{error}");
}
