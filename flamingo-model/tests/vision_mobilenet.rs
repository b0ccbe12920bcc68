//! MobileNetV2 converted from the real nsfwjs 4.3.0 package against the
//! features TensorFlow.js 4.22.0 computes with the original Keras model
//! (fixtures/mobilenet/chelsea_reference.safetensors, written by
//! scripts/mobilenet-reference/reference.js for scikit-image's chelsea.png).
//!
//! The package comes from `scripts/fetch-assets.sh --only nsfwjs` and the
//! photo from `--only photos`. Without them these tests print why they are
//! skipped and pass, unless `FLAMINGO_REQUIRE_ASSETS=1` makes that a failure.

mod vision_support;

use std::path::PathBuf;

use flamingo_kernels::{DType, Device};
use flamingo_model::convert::convert_nsfwjs_mobilenet_v2;
use flamingo_model::vision::preprocess::{AlphaMode, Resize};
use flamingo_model::vision::{load_image, MobileNetV2, Padding, VisionEncoder, VisionOptions};
use vision_support::{devices, max_abs_diff, optional_asset, skip_unsupported, values, Fixture};

const MODEL_FILES: [&str; 2] = ["model.min.js", "group1-shard1of1.min.js"];

/// Converts the fetched nsfwjs package into `folder`, returning the file.
fn converted_nsfwjs(folder: &tempfile::TempDir, test: &str) -> Option<PathBuf> {
    let package = optional_asset("nsfwjs/mobilenet_v2", &MODEL_FILES, test)?;
    let output = folder.path().join("mobilenetv2_nsfwjs.safetensors");
    convert_nsfwjs_mobilenet_v2(&package, &output, false).expect("conversion of the nsfwjs package");
    Some(output)
}

/// Largest difference allowed between our out_relu features and
/// TensorFlow.js's. Both run f32, but in a different order: the batch
/// norms are folded into the convolution weights here and applied after
/// them in TensorFlow.js, and the sums of 52 convolutions are accumulated
/// in other orders. The CPU backend measured 5.4e-5 on features in [0, 6]
/// (ReLU6); the bound leaves room for a GPU's summation order.
const FEATURE_TOLERANCE: f32 = 5e-4;

/// Mean absolute difference allowed over all 62,720 features; the CPU
/// backend measured 3.0e-7.
const FEATURE_MEAN_TOLERANCE: f32 = 5e-6;

/// Largest difference allowed between our preprocessed input and
/// TensorFlow.js's. Both compute the bilinear weights in f64 and round
/// once to f32, so only the f32 division by 255 may differ in its last bit.
const INPUT_TOLERANCE: f32 = 1e-6;

#[test]
fn mobilenet_matches_tfjs_features() {
    const TEST: &str = "mobilenet_matches_tfjs_features";
    let folder = tempfile::tempdir().unwrap();
    let Some(file) = converted_nsfwjs(&folder, TEST) else { return };
    let reference = Fixture::open("mobilenet/chelsea_reference.safetensors");
    let (input_shape, input) = reference.f32("input");
    let (_, expected) = reference.f32("out_relu");
    assert_eq!(input_shape, [1, 224, 224, 3]);

    for (name, device) in devices() {
        let options = VisionOptions { weight_dtype: Some(DType::F32), ..Default::default() };
        let run = || -> flamingo_model::Result<Vec<f32>> {
            let encoder = VisionEncoder::load(&device, &file, options)?;
            let tokens = encoder.encode(&device.from_f32(input_shape.clone(), input.clone())?)?;
            assert_eq!(tokens.shape(), [1, 49, 1280]);
            Ok(values(&tokens))
        };
        let Some(found) = skip_unsupported(run(), &name, TEST) else { continue };

        let largest = max_abs_diff(&found, &expected);
        let mean = found.iter().zip(&expected).map(|(a, b)| (a - b).abs()).sum::<f32>() / found.len() as f32;
        eprintln!("MobileNetV2 out_relu on {name}: max abs error {largest:.2e}, mean {mean:.2e}");
        assert!(largest <= FEATURE_TOLERANCE, "out_relu on {name}: max abs error {largest} > {FEATURE_TOLERANCE}");
        assert!(mean <= FEATURE_MEAN_TOLERANCE, "out_relu on {name}: mean abs error {mean} > {FEATURE_MEAN_TOLERANCE}");
    }
}

#[test]
fn mobilenet_preprocessing_matches_tfjs() {
    const TEST: &str = "mobilenet_preprocessing_matches_tfjs";
    let folder = tempfile::tempdir().unwrap();
    let Some(file) = converted_nsfwjs(&folder, TEST) else { return };
    let Some(photos) = optional_asset("photos", &["chelsea.png"], TEST) else { return };
    let reference = Fixture::open("mobilenet/chelsea_reference.safetensors");
    let (_, expected) = reference.f32("input");

    let device = Device::cpu();
    let encoder = VisionEncoder::load(&device, &file, VisionOptions::default()).unwrap();
    let image = load_image(photos.join("chelsea.png")).unwrap();
    let pixels = encoder.preprocess(&image).unwrap();
    assert_eq!(pixels.shape, [224, 224, 3]);
    let error = max_abs_diff(&pixels.to_f32(), &expected);
    eprintln!("MobileNetV2 preprocessing of chelsea.png: max abs error {error:.2e}");
    assert!(error <= INPUT_TOLERANCE, "preprocessed input: max abs error {error} > {INPUT_TOLERANCE}");

    // From the file to the features, as the demo runs it.
    let tokens = encoder.encode(&device.upload(&pixels).unwrap().reshape([1, 224, 224, 3]).unwrap()).unwrap();
    let (_, features) = reference.f32("out_relu");
    let largest = max_abs_diff(&values(&tokens), &features);
    eprintln!("MobileNetV2 chelsea.png end to end: max abs error {largest:.2e}");
    assert!(largest <= FEATURE_TOLERANCE, "end to end: max abs error {largest} > {FEATURE_TOLERANCE}");
}

#[test]
fn converted_file_records_keras_conventions() {
    const TEST: &str = "converted_file_records_keras_conventions";
    let folder = tempfile::tempdir().unwrap();
    let Some(file) = converted_nsfwjs(&folder, TEST) else { return };
    let model = MobileNetV2::load_file(&Device::cpu(), &file, VisionOptions::default()).unwrap();
    assert_eq!(model.config().bn_eps, 1e-3);
    assert_eq!(model.config().padding, Padding::TfSame);
    assert_eq!(model.config().image_size, 224);
    let preprocessor = model.preprocessor();
    assert_eq!(preprocessor.alpha, AlphaMode::Drop);
    assert_eq!(preprocessor.resize, Some(Resize::BilinearAlignCorners { height: 224, width: 224 }));
    assert_eq!(preprocessor.normalize, None);
    assert_eq!(model.num_tokens(), 49);
}

#[test]
fn mobilenet_batch_equals_single_images() {
    const TEST: &str = "mobilenet_batch_equals_single_images";
    let folder = tempfile::tempdir().unwrap();
    let Some(file) = converted_nsfwjs(&folder, TEST) else { return };
    let reference = Fixture::open("mobilenet/chelsea_reference.safetensors");
    let (_, input) = reference.f32("input");
    let flipped: Vec<f32> = input.chunks(224 * 3).rev().flatten().copied().collect();

    let device = Device::cpu();
    let encoder = VisionEncoder::load(&device, &file, VisionOptions::default()).unwrap();
    let single = |pixels: &[f32]| values(&encoder.encode(&device.from_f32([1, 224, 224, 3], pixels.to_vec()).unwrap()).unwrap());
    let batch_input: Vec<f32> = input.iter().chain(&flipped).copied().collect();
    let batch = values(&encoder.encode(&device.from_f32([2, 224, 224, 3], batch_input).unwrap()).unwrap());
    let per_image = 49 * 1280;
    assert!(max_abs_diff(&batch[..per_image], &single(&input)) <= 1e-5);
    assert!(max_abs_diff(&batch[per_image..], &single(&flipped)) <= 1e-5);
}

/// Measures images per second of `encode` on the CPU backend for several
/// batch sizes, reporting the best of five timed runs of 32 images each so
/// that other processes on the machine disturb the figure less. Run with
/// `cargo test -p flamingo-model --test vision_mobilenet -- --ignored
/// --nocapture`; `RAYON_NUM_THREADS` sets the number of threads.
#[test]
#[ignore = "a benchmark, not a check"]
fn mobilenet_cpu_throughput() {
    const TEST: &str = "mobilenet_cpu_throughput";
    const IMAGES_PER_RUN: usize = 32;
    let folder = tempfile::tempdir().unwrap();
    let Some(file) = converted_nsfwjs(&folder, TEST) else { return };
    let reference = Fixture::open("mobilenet/chelsea_reference.safetensors");
    let (_, input) = reference.f32("input");
    let device = Device::cpu();
    let encoder = VisionEncoder::load(&device, &file, VisionOptions::default()).unwrap();

    for batch in [1, 2, 4, 8, 16, 32] {
        let pixels: Vec<f32> = (0..batch).flat_map(|_| input.iter().copied()).collect();
        let pixels = device.from_f32([batch, 224, 224, 3], pixels).unwrap();
        encoder.encode(&pixels).unwrap();
        let mut best = f64::INFINITY;
        for _ in 0..5 {
            let start = std::time::Instant::now();
            for _ in 0..IMAGES_PER_RUN / batch {
                encoder.encode(&pixels).unwrap();
            }
            best = best.min(start.elapsed().as_secs_f64());
        }
        let images_per_second = IMAGES_PER_RUN as f64 / best;
        eprintln!("{}: batch {batch}: {images_per_second:.1} images/s", device.description());
    }
}
