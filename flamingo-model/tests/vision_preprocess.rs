//! Image preprocessing against transformers 5.25's image processors (PIL
//! backend, Pillow 13.0) on fixtures/vision/test_image_37x23.png, and the
//! image inputs a user may pass: greyscale, RGBA, undecodable files.

mod vision_support;

use flamingo_kernels::Device;
use flamingo_model::vision::preprocess::{
    center_crop, resize_pil, to_rgb, AlphaMode, CenterCrop, CropRounding, Interpolation,
};
use flamingo_model::vision::{load_image, VisionEncoder, VisionOptions};
use flamingo_model::Error;
use image::{DynamicImage, GrayImage, ImageBuffer, Luma, LumaA, Rgba, RgbaImage};
use vision_support::{fixtures_dir, max_abs_diff, nchw_to_nhwc, Fixture};

/// Largest difference allowed between our normalised pixels and the
/// processor's. The 8-bit resize is bit-exact (checked separately), so only
/// the last f32 rounding of `(x − mean) / std` may differ: one unit in the
/// last place of values up to |(0 − 0.48) / 0.26| ≈ 1.9 is 2.4e-7.
const PIXEL_TOLERANCE: f32 = 1e-6;

fn test_image() -> DynamicImage {
    load_image(fixtures_dir().join("vision/test_image_37x23.png")).expect("the committed PNG decodes")
}

/// Counts bytes that differ and the largest difference.
fn byte_differences(found: &[u8], expected: &[u8]) -> (usize, u8) {
    assert_eq!(found.len(), expected.len(), "lengths differ");
    let differing = found.iter().zip(expected).filter(|(a, b)| a != b).count();
    let largest = found.iter().zip(expected).map(|(a, b)| a.abs_diff(*b)).max().unwrap_or(0);
    (differing, largest)
}

#[test]
fn decoded_png_matches_pillow() {
    let reference = Fixture::open("vision/tiny_clip/preprocess_reference.safetensors");
    let (shape, expected) = reference.u8("image");
    let image = to_rgb(&test_image(), AlphaMode::CompositeOnWhite);
    assert_eq!([image.height() as usize, image.width() as usize, 3], shape[..]);
    assert_eq!(image.as_raw(), &expected);
}

#[test]
fn clip_resize_and_crop_match_pillow() {
    let reference = Fixture::open("vision/tiny_clip/preprocess_reference.safetensors");
    let image = to_rgb(&test_image(), AlphaMode::CompositeOnWhite);

    let (resized_shape, expected_resized) = reference.u8("resized");
    assert_eq!(resized_shape, [30, 48, 3]);
    let resized = resize_pil(&image, 48, 30, Interpolation::Bicubic);
    let (differing, largest) = byte_differences(resized.as_raw(), &expected_resized);
    eprintln!("CLIP bicubic resize 37x23 -> 48x30: {differing} of {} bytes differ, by at most {largest}", expected_resized.len());
    assert_eq!(differing, 0, "Pillow's bicubic resize is reproduced bit for bit");

    let (_, expected_cropped) = reference.u8("cropped");
    let cropped = center_crop(&resized, CenterCrop { height: 30, width: 30, rounding: CropRounding::Floor }).unwrap();
    assert_eq!(cropped.as_raw(), &expected_cropped);
}

#[test]
fn siglip_resize_matches_pillow() {
    let reference = Fixture::open("vision/tiny_siglip/preprocess_reference.safetensors");
    let image = to_rgb(&test_image(), AlphaMode::CompositeOnWhite);
    let (shape, expected) = reference.u8("resized");
    assert_eq!(shape, [32, 32, 3]);
    // Width shrinks 37 -> 32 (antialiased) while height grows 23 -> 32.
    let resized = resize_pil(&image, 32, 32, Interpolation::Bicubic);
    let (differing, largest) = byte_differences(resized.as_raw(), &expected);
    eprintln!("SigLIP bicubic resize 37x23 -> 32x32: {differing} of {} bytes differ, by at most {largest}", expected.len());
    assert_eq!(differing, 0, "Pillow's bicubic resize is reproduced bit for bit");
}

fn check_pixel_values(model: &str) {
    let reference = Fixture::open(&format!("vision/{model}/preprocess_reference.safetensors"));
    let (shape, expected) = reference.f32("pixel_values");
    let expected = nchw_to_nhwc(&expected, &shape);

    let encoder = VisionEncoder::load(&Device::cpu(), fixtures_dir().join("vision").join(model), VisionOptions::default()).unwrap();
    let pixels = encoder.preprocess(&test_image()).unwrap();
    assert_eq!(pixels.shape, [shape[2], shape[3], 3]);
    let error = max_abs_diff(&pixels.to_f32(), &expected);
    eprintln!("{model} pixel_values: max abs error {error:.2e}");
    assert!(error <= PIXEL_TOLERANCE, "{model} pixel_values: max abs error {error} > {PIXEL_TOLERANCE}");
}

#[test]
fn clip_pixel_values_match_processor() {
    check_pixel_values("tiny_clip");
}

#[test]
fn siglip_pixel_values_match_processor() {
    check_pixel_values("tiny_siglip");
}

#[test]
fn preprocess_batch_stacks_images() {
    let encoder = VisionEncoder::load(&Device::cpu(), fixtures_dir().join("vision/tiny_clip"), VisionOptions::default()).unwrap();
    let image = test_image();
    let single = encoder.preprocess(&image).unwrap();
    let batch = encoder.preprocess_batch(&[image.clone(), image.fliph(), image]).unwrap();
    assert_eq!(batch.shape, [3, 30, 30, 3]);
    let values = batch.to_f32();
    let per_image = 30 * 30 * 3;
    assert_eq!(&values[..per_image], &single.to_f32()[..]);
    assert_eq!(&values[2 * per_image..], &single.to_f32()[..]);
    assert_ne!(&values[per_image..2 * per_image], &single.to_f32()[..]);
}

#[test]
fn greyscale_image_becomes_rgb() {
    let encoder = VisionEncoder::load(&Device::cpu(), fixtures_dir().join("vision/tiny_clip"), VisionOptions::default()).unwrap();
    let grey = GrayImage::from_fn(40, 50, |x, y| Luma([(x * 5 + y) as u8]));
    let as_rgb = DynamicImage::ImageRgb8(DynamicImage::ImageLuma8(grey.clone()).to_rgb8());
    let from_grey = encoder.preprocess(&DynamicImage::ImageLuma8(grey)).unwrap();
    assert_eq!(from_grey.shape, [30, 30, 3]);
    assert_eq!(from_grey, encoder.preprocess(&as_rgb).unwrap(), "greyscale equals its RGB expansion");

    let grey_alpha = ImageBuffer::from_fn(40, 50, |x, _| LumaA([(x * 5) as u8, 255]));
    let from_grey_alpha = encoder.preprocess(&DynamicImage::ImageLumaA8(grey_alpha)).unwrap();
    assert_eq!(from_grey_alpha.shape, [30, 30, 3]);
}

#[test]
fn rgba_image_is_composited_on_white() {
    let encoder = VisionEncoder::load(&Device::cpu(), fixtures_dir().join("vision/tiny_siglip"), VisionOptions::default()).unwrap();
    let transparent = RgbaImage::from_pixel(32, 32, Rgba([10, 20, 30, 0]));
    let white = RgbaImage::from_pixel(32, 32, Rgba([255, 255, 255, 255]));
    let opaque = RgbaImage::from_pixel(32, 32, Rgba([10, 20, 30, 255]));
    let rgb = DynamicImage::ImageRgba8(opaque.clone()).to_rgb8();

    let preprocess = |image: RgbaImage| encoder.preprocess(&DynamicImage::ImageRgba8(image)).unwrap();
    assert_eq!(preprocess(transparent), preprocess(white), "fully transparent pixels become white");
    assert_eq!(preprocess(opaque), encoder.preprocess(&DynamicImage::ImageRgb8(rgb)).unwrap(), "opaque pixels keep their colour");

    let half = to_rgb(&DynamicImage::ImageRgba8(RgbaImage::from_pixel(1, 1, Rgba([0, 100, 255, 128]))), AlphaMode::CompositeOnWhite);
    // c·a/255 + 255·(1 − a/255) for a = 128: 127, 177, 255.
    assert_eq!(half.as_raw(), &[127, 177, 255]);

    let dropped = to_rgb(&DynamicImage::ImageRgba8(RgbaImage::from_pixel(1, 1, Rgba([0, 100, 255, 0]))), AlphaMode::Drop);
    assert_eq!(dropped.as_raw(), &[0, 100, 255]);
}

#[test]
fn undecodable_image_names_file() {
    let folder = tempfile::tempdir().unwrap();
    let path = folder.path().join("broken.png");
    std::fs::write(&path, b"\x89PNG\r\n\x1a\nthis is not a PNG body").unwrap();
    let error = load_image(&path).unwrap_err();
    assert!(matches!(error, Error::Image { .. }), "{error:?}");
    let message = error.to_string();
    assert!(message.contains("broken.png"), "{message}");
    assert!(message.contains("could not be decoded"), "{message}");

    let text = folder.path().join("notes.jpg");
    std::fs::write(&text, "plain text").unwrap();
    let message = load_image(&text).unwrap_err().to_string();
    assert!(message.contains("notes.jpg"), "{message}");
}

#[test]
fn missing_image_names_file() {
    let error = load_image("/nonexistent/cat.png").unwrap_err();
    assert!(matches!(error, Error::Io { .. }), "{error:?}");
    assert!(error.to_string().contains("/nonexistent/cat.png"), "{error}");
}
