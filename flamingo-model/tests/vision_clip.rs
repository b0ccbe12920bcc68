//! CLIP's vision tower against transformers 5.25 on the tiny fixture
//! (fixtures/vision/tiny_clip: 30x30 images, patch 6, 25 patches + class
//! token, hidden 32, 2 layers), on the CPU backend and every wgpu adapter.

mod vision_support;

use flamingo_kernels::{DType, Device};
use flamingo_model::vision::{VisionEncoder, VisionOptions};
use vision_support::{devices, fixtures_dir, max_abs_diff, nchw_to_nhwc, skip_unsupported, values, Fixture};

/// f32 weights and f32 activations throughout; transformers runs in f32 too.
const TOLERANCE: f32 = 1e-4;

const BATCH: usize = 2;
const PATCHES: usize = 25;
const HIDDEN: usize = 32;

/// Drops the class token (token 0) of every image of [N, 1 + P, C] values.
fn without_class_token(values: &[f32]) -> Vec<f32> {
    values
        .chunks((PATCHES + 1) * HIDDEN)
        .flat_map(|image| image[HIDDEN..].to_vec())
        .collect()
}

fn encode(device: &Device, options: VisionOptions) -> flamingo_model::Result<Vec<f32>> {
    let reference = Fixture::open("vision/tiny_clip/reference.safetensors");
    let (shape, pixels) = reference.f32("pixel_values");
    let pixels = nchw_to_nhwc(&pixels, &shape);
    let encoder = VisionEncoder::load(device, fixtures_dir().join("vision/tiny_clip"), options)?;
    let pixels = device.from_f32([shape[0], shape[2], shape[3], shape[1]], pixels)?;
    let tokens = encoder.encode(&pixels)?;
    let expected_tokens = PATCHES + usize::from(options.include_cls);
    assert_eq!(tokens.shape(), [BATCH, expected_tokens, HIDDEN], "token shape with {options:?}");
    Ok(values(&tokens))
}

#[test]
fn clip_matches_transformers_on_every_device() {
    let reference = Fixture::open("vision/tiny_clip/reference.safetensors");
    let (_, last_hidden_state) = reference.f32("last_hidden_state");
    let (_, post_layernorm) = reference.f32("post_layernorm_output");
    let (_, encoder_output) = reference.f32("encoder_output");
    assert_eq!(last_hidden_state, encoder_output, "transformers' CLIP last_hidden_state has no final LayerNorm");

    let f32_weights = Some(DType::F32);
    let cases = [
        ("last_hidden_state (class token, no final LayerNorm)", VisionOptions { include_cls: true, final_layer_norm: false, weight_dtype: f32_weights }, last_hidden_state.clone()),
        ("post_layernorm on every token", VisionOptions { include_cls: true, final_layer_norm: true, weight_dtype: f32_weights }, post_layernorm.clone()),
        ("default: patch tokens, no final LayerNorm", VisionOptions { weight_dtype: f32_weights, ..VisionOptions::default() }, without_class_token(&encoder_output)),
        ("patch tokens with final LayerNorm", VisionOptions { include_cls: false, final_layer_norm: true, weight_dtype: f32_weights }, without_class_token(&post_layernorm)),
    ];

    for (name, device) in devices() {
        for (case, options, expected) in &cases {
            let Some(found) = skip_unsupported(encode(&device, *options), &name, "clip_matches_transformers_on_every_device") else {
                break;
            };
            let error = max_abs_diff(&found, expected);
            eprintln!("CLIP {case} on {name}: max abs error {error:.2e}");
            assert!(error <= TOLERANCE, "CLIP {case} on {name}: max abs error {error} > {TOLERANCE}");
        }
    }
}

#[test]
fn clip_sizes_follow_config_and_options() {
    let folder = fixtures_dir().join("vision/tiny_clip");
    let device = Device::cpu();

    let encoder = VisionEncoder::load(&device, &folder, VisionOptions::default()).unwrap();
    assert_eq!(encoder.name(), "CLIP");
    assert_eq!(encoder.image_size(), 30);
    assert_eq!(encoder.output_dim(), HIDDEN);
    assert_eq!(encoder.num_tokens(), PATCHES);

    let with_cls = VisionEncoder::load(&device, &folder, VisionOptions { include_cls: true, ..Default::default() }).unwrap();
    assert_eq!(with_cls.num_tokens(), PATCHES + 1);
}

#[test]
fn clip_loads_through_config_file_path() {
    let device = Device::cpu();
    let encoder = VisionEncoder::load(&device, fixtures_dir().join("vision/tiny_clip/config.json"), VisionOptions::default()).unwrap();
    assert_eq!(encoder.name(), "CLIP");
}

#[test]
fn clip_rejects_wrong_pixel_shape() {
    let device = Device::cpu();
    let encoder = VisionEncoder::load(&device, fixtures_dir().join("vision/tiny_clip"), VisionOptions::default()).unwrap();
    let channels_first = device.zeros([1, 3, 30, 30], DType::F32).unwrap();
    let message = encoder.encode(&channels_first).unwrap_err().to_string();
    assert!(message.contains("[N, 30, 30, 3]"), "{message}");
    assert!(message.contains("[1, 3, 30, 30]"), "{message}");
}
