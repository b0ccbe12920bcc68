//! Image preprocessing: decoded image in, normalised [H, W, 3] f32 pixels out.
//!
//! Output: channels-last f32 [H, W, 3] in RGB order, the layout
//! [`super::VisionEncoder::encode`] takes once images are stacked to
//! [N, H, W, 3].
//!
//! Two pipelines are supported, each reproducing a reference to the last bit
//! where the arithmetic allows:
//!
//! - Pillow's (Hugging Face image processors with their PIL backend,
//!   torchvision's transforms on PIL images, timm's eval transform):
//!   convert to 8-bit RGB, resize the 8-bit image with Pillow's separable
//!   filters ([`resize_pil`]), center-crop, then `(u8 · rescale − mean) / std`.
//!   Pillow resamples in fixed point and rounds to 8 bits after each of its
//!   two passes. [`resize_pil`] repeats that arithmetic, so the resized bytes
//!   are the bytes Pillow 13.0 writes (checked against the processor fixtures).
//!   NOTE: transformers 5 uses its torchvision backend unless a PIL processor
//!   is requested, and torchvision's tensor resize rounds differently, so
//!   pixels from that backend can differ from these by a few 8-bit levels.
//! - TensorFlow's (nsfwjs): convert to RGB, divide by 255, then
//!   `resize_bilinear` with `align_corners = true` on the float values
//!   ([`resize_bilinear_align_corners`]), without rounding to 8 bits.

use flamingo_kernels::HostTensor;
use image::{DynamicImage, RgbImage};
use rayon::prelude::*;
use serde::Deserialize;

pub use super::resample::{resize_bilinear_align_corners, resize_pil, Interpolation};
use crate::error::{Error, Result};

/// The mean of OpenAI CLIP's training images, per RGB channel.
pub const OPENAI_CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// The standard deviation of OpenAI CLIP's training images, per RGB channel,
/// with the digits transformers publishes.
#[allow(clippy::excessive_precision)]
pub const OPENAI_CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];
/// The ImageNet mean per RGB channel that timm and torchvision models use.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// The ImageNet standard deviation per RGB channel that timm and torchvision models use.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// The treatment of an alpha channel when an image becomes RGB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlphaMode {
    /// Composite onto opaque white, as transformers' `convert_to_rgb` does
    /// with Pillow's `alpha_composite`.
    CompositeOnWhite,
    /// Drop the alpha channel, as TensorFlow.js's `fromPixels` with three
    /// channels does.
    Drop,
}

/// The resize step of a pipeline.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Resize {
    /// Pillow resize so that the shorter side becomes `edge` and the longer
    /// `floor(edge · long / short)`, as transformers' `shortest_edge` and
    /// torchvision's `Resize(int)` compute it.
    ShortestEdge { edge: usize, filter: Interpolation },
    /// Pillow resize to exactly `height` x `width`, ignoring the aspect ratio.
    Exact { height: usize, width: usize, filter: Interpolation },
    /// TensorFlow's bilinear resize with `align_corners = true` on float
    /// values after the rescale, to exactly `height` x `width`.
    BilinearAlignCorners { height: usize, width: usize },
}

/// The rounding of an odd center-crop margin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CropRounding {
    /// `(size − crop) // 2`, as transformers' `center_crop`.
    Floor,
    /// `round((size − crop) / 2)` with ties to even, as torchvision's `CenterCrop`.
    HalfEven,
}

/// The center-crop step of a pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CenterCrop {
    pub height: usize,
    pub width: usize,
    pub rounding: CropRounding,
}

/// A complete preprocessing pipeline; see the module documentation.
#[derive(Debug, Clone, PartialEq)]
pub struct ImagePreprocessor {
    pub alpha: AlphaMode,
    pub resize: Option<Resize>,
    /// Applied after the resize, to the 8-bit image. Pillow pipelines only.
    pub center_crop: Option<CenterCrop>,
    /// Factor from 8-bit values to floats, usually 1/255; `None` keeps 0..255.
    pub rescale: Option<f64>,
    /// Per-channel (mean, std): `(x − mean) / std` after the rescale.
    pub normalize: Option<([f32; 3], [f32; 3])>,
}

impl ImagePreprocessor {
    /// Returns the (height, width) of every output, or `None` when it
    /// depends on the input image (a shortest-edge resize without a crop).
    pub fn output_size(&self) -> Option<(usize, usize)> {
        if let Some(crop) = self.center_crop {
            return Some((crop.height, crop.width));
        }
        match self.resize? {
            Resize::ShortestEdge { .. } => None,
            Resize::Exact { height, width, .. } | Resize::BilinearAlignCorners { height, width } => {
                Some((height, width))
            }
        }
    }

    /// Checks that the pipeline produces `size` x `size` images whatever the
    /// input, so its outputs fit an encoder of that input size.
    pub(crate) fn check_output_size(&self, size: usize, origin: &str) -> Result<()> {
        if self.center_crop.is_some() && matches!(self.resize, Some(Resize::BilinearAlignCorners { .. })) {
            return Err(Error::Config {
                origin: origin.to_string(),
                message: "a center crop after TensorFlow's bilinear resize is not supported".into(),
            });
        }
        match self.output_size() {
            Some(found) if found == (size, size) => {}
            Some((height, width)) => {
                return Err(Error::Config {
                    origin: origin.to_string(),
                    message: format!(
                        "the image processor produces {height}x{width} images, but the model takes {size}x{size}; make the crop or resize size {size}"
                    ),
                })
            }
            None => {
                let step = if self.resize.is_some() { "resizes the shortest edge" } else { "does not resize" };
                return Err(Error::Config {
                    origin: origin.to_string(),
                    message: format!(
                        "the image processor {step} and does not crop, so image sizes vary, but the model takes {size}x{size}; enable do_center_crop with crop_size {size}"
                    ),
                })
            }
        }
        // transformers pads a crop larger than the resized image with zeros.
        // That is not implemented, so such a config is rejected here.
        if let (Some(crop), Some(resize)) = (self.center_crop, self.resize) {
            let smallest = match resize {
                Resize::ShortestEdge { edge, .. } => (edge, edge),
                Resize::Exact { height, width, .. } | Resize::BilinearAlignCorners { height, width } => (height, width),
            };
            if crop.height > smallest.0 || crop.width > smallest.1 {
                return Err(Error::Config {
                    origin: origin.to_string(),
                    message: format!(
                        "crop {}x{} is larger than the resized image ({}x{} or more), which would need padding",
                        crop.height, crop.width, smallest.0, smallest.1
                    ),
                });
            }
        }
        Ok(())
    }

    /// Runs the pipeline on one image, returning [H, W, 3] f32.
    pub fn apply(&self, image: &DynamicImage) -> Result<HostTensor> {
        if image.width() == 0 || image.height() == 0 {
            return Err(Error::Image {
                origin: "preprocess".into(),
                message: format!("the image is empty ({}x{})", image.width(), image.height()),
            });
        }
        let rgb = to_rgb(image, self.alpha);

        let (height, width, values) = match self.resize {
            Some(Resize::BilinearAlignCorners { height, width }) => {
                let scale = self.rescale.unwrap_or(1.0);
                let floats: Vec<f32> = rgb.as_raw().iter().map(|&v| (v as f64 * scale) as f32).collect();
                let (in_h, in_w) = (rgb.height() as usize, rgb.width() as usize);
                let resized = resize_bilinear_align_corners(&floats, in_h, in_w, height, width);
                (height, width, resized)
            }
            resize => {
                let resized = match resize {
                    Some(Resize::ShortestEdge { edge, filter }) => {
                        let (h, w) = shortest_edge_size(rgb.height() as usize, rgb.width() as usize, edge);
                        resize_pil(&rgb, w, h, filter)
                    }
                    Some(Resize::Exact { height, width, filter }) => resize_pil(&rgb, width, height, filter),
                    _ => rgb,
                };
                let cropped = match self.center_crop {
                    Some(crop) => center_crop(&resized, crop)?,
                    None => resized,
                };
                let scale = self.rescale.unwrap_or(1.0);
                let values = cropped.as_raw().iter().map(|&v| (v as f64 * scale) as f32).collect();
                (cropped.height() as usize, cropped.width() as usize, values)
            }
        };

        let mut values = values;
        if let Some((mean, std)) = self.normalize {
            for pixel in values.chunks_exact_mut(3) {
                for channel in 0..3 {
                    pixel[channel] = (pixel[channel] - mean[channel]) / std[channel];
                }
            }
        }
        Ok(HostTensor::from_f32([height, width, 3], values)?)
    }

    /// Runs the pipeline on several images in parallel and stacks them to
    /// [N, H, W, 3]. Every output must have the same size.
    pub fn apply_batch(&self, images: &[DynamicImage]) -> Result<HostTensor> {
        let outputs: Vec<HostTensor> = images.par_iter().map(|image| self.apply(image)).collect::<Result<_>>()?;
        stack(outputs)
    }
}

/// Stacks [H, W, 3] tensors of one shape into [N, H, W, 3].
pub(crate) fn stack(images: Vec<HostTensor>) -> Result<HostTensor> {
    let Some(first) = images.first() else {
        return Err(Error::InvalidInput("no images to preprocess".into()));
    };
    let shape = first.shape.clone();
    let mut values = Vec::with_capacity(first.numel() * images.len());
    for (index, image) in images.iter().enumerate() {
        if image.shape != shape {
            return Err(Error::InvalidInput(format!(
                "image {index} was preprocessed to shape {:?}, but image 0 to {shape:?}; a batch needs one size",
                image.shape
            )));
        }
        values.extend(image.to_f32());
    }
    let mut batch_shape = vec![images.len()];
    batch_shape.extend(shape);
    Ok(HostTensor::from_f32(batch_shape, values)?)
}

/// Computes the (height, width) after a shortest-edge resize to `edge`.
pub fn shortest_edge_size(height: usize, width: usize, edge: usize) -> (usize, usize) {
    // `int(edge * long / short)` in Python's float arithmetic.
    let long_of = |long: usize, short: usize| (edge as f64 * long as f64 / short as f64) as usize;
    if width <= height {
        (long_of(height, width), edge)
    } else {
        (edge, long_of(width, height))
    }
}

/// Converts any decoded image to 8-bit RGB. Greyscale channels are
/// repeated, and `alpha` decides what happens to an alpha channel. The
/// `image` crate scales 16-bit and float images to 8 bits.
pub fn to_rgb(image: &DynamicImage, alpha: AlphaMode) -> RgbImage {
    if !image.color().has_alpha() {
        return image.to_rgb8();
    }
    match alpha {
        AlphaMode::Drop => image.to_rgb8(),
        AlphaMode::CompositeOnWhite => {
            let rgba = image.to_rgba8();
            let (width, height) = rgba.dimensions();
            let mut out = Vec::with_capacity(width as usize * height as usize * 3);
            for pixel in rgba.pixels() {
                let [r, g, b, a] = pixel.0;
                for channel in [r, g, b] {
                    out.push(composite_on_white(channel, a));
                }
            }
            RgbImage::from_raw(width, height, out).expect("three bytes per pixel")
        }
    }
}

/// Composites one channel onto white as Pillow's `alpha_composite(white,
/// pixel)` does: the blend c·a + 255·(255 − a), divided by 255 in Pillow's
/// 7-bit fixed point.
fn composite_on_white(channel: u8, alpha: u8) -> u8 {
    if alpha == 0 {
        return 255;
    }
    const PRECISION_BITS: u32 = 7;
    let coef1 = alpha as u32 * (1 << PRECISION_BITS);
    let coef2 = 255 * (1 << PRECISION_BITS) - coef1;
    let blend = channel as u32 * coef1 + 255 * coef2 + (0x80 << PRECISION_BITS);
    let divided = ((blend >> 8) + blend) >> 8;
    (divided >> PRECISION_BITS) as u8
}

/// Crops the center `crop.height` x `crop.width` of an 8-bit image.
pub fn center_crop(image: &RgbImage, crop: CenterCrop) -> Result<RgbImage> {
    let (height, width) = (image.height() as usize, image.width() as usize);
    if crop.height > height || crop.width > width {
        return Err(Error::Image {
            origin: "center crop".into(),
            message: format!("cannot crop {}x{} from a {height}x{width} image", crop.height, crop.width),
        });
    }
    let offset = |size: usize, cropped: usize| match crop.rounding {
        CropRounding::Floor => (size - cropped) / 2,
        CropRounding::HalfEven => {
            let margin = size - cropped;
            // margin / 2 is either whole or ends in .5; ties go to the even neighbour.
            let half = margin / 2;
            if margin % 2 == 1 && half % 2 == 1 {
                half + 1
            } else {
                half
            }
        }
    };
    let (top, left) = (offset(height, crop.height), offset(width, crop.width));
    let mut out = Vec::with_capacity(crop.height * crop.width * 3);
    for row in top..top + crop.height {
        let start = (row * width + left) * 3;
        out.extend_from_slice(&image.as_raw()[start..start + crop.width * 3]);
    }
    Ok(RgbImage::from_raw(crop.width as u32, crop.height as u32, out).expect("three bytes per pixel"))
}

/// A `size` or `crop_size` entry of `preprocessor_config.json`: an integer
/// (older files) or a map.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum SizeConfig {
    Square(usize),
    Map {
        height: Option<usize>,
        width: Option<usize>,
        shortest_edge: Option<usize>,
        longest_edge: Option<usize>,
    },
}

/// The fields of a Hugging Face `preprocessor_config.json` that image
/// preprocessing reads. Absent fields take the defaults of the model's own
/// image processor class, so every field is optional here.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ImageProcessorConfig {
    pub image_processor_type: Option<String>,
    pub do_resize: Option<bool>,
    pub size: Option<SizeConfig>,
    /// Pillow filter code.
    pub resample: Option<u32>,
    pub do_center_crop: Option<bool>,
    pub crop_size: Option<SizeConfig>,
    pub do_rescale: Option<bool>,
    pub rescale_factor: Option<f64>,
    pub do_normalize: Option<bool>,
    pub image_mean: Option<Vec<f32>>,
    pub image_std: Option<Vec<f32>>,
    pub do_convert_rgb: Option<bool>,
}

/// Defaults of one Hugging Face image processor class, for fields a
/// `preprocessor_config.json` leaves out.
pub(crate) struct ProcessorDefaults {
    /// Whether a bare integer `size` is the shortest edge (CLIP) rather than a square (SigLIP).
    pub int_size_is_shortest_edge: bool,
    pub size: Resize,
    pub center_crop: Option<usize>,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl ImageProcessorConfig {
    /// Reads `preprocessor_config.json`.
    pub fn read(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::format(path, format!("invalid image processor config: {e}")))
    }

    /// Builds the Pillow pipeline this config describes.
    pub(crate) fn to_preprocessor(&self, defaults: &ProcessorDefaults, origin: &str) -> Result<ImagePreprocessor> {
        let config_error = |message: String| Error::Config { origin: origin.to_string(), message };

        let filter = match self.resample {
            Some(code) => Interpolation::from_pil_code(code)
                .ok_or_else(|| config_error(format!("resample {code} is not a Pillow filter code (0 to 5)")))?,
            None => match defaults.size {
                Resize::ShortestEdge { filter, .. } | Resize::Exact { filter, .. } => filter,
                Resize::BilinearAlignCorners { .. } => Interpolation::Bilinear,
            },
        };
        let resize = if self.do_resize.unwrap_or(true) {
            let resize = match &self.size {
                None => match defaults.size {
                    Resize::ShortestEdge { edge, .. } => Resize::ShortestEdge { edge, filter },
                    Resize::Exact { height, width, .. } => Resize::Exact { height, width, filter },
                    other => other,
                },
                Some(SizeConfig::Square(edge)) if defaults.int_size_is_shortest_edge => {
                    Resize::ShortestEdge { edge: *edge, filter }
                }
                Some(SizeConfig::Square(edge)) => Resize::Exact { height: *edge, width: *edge, filter },
                Some(SizeConfig::Map { height: Some(height), width: Some(width), .. }) => {
                    Resize::Exact { height: *height, width: *width, filter }
                }
                Some(SizeConfig::Map { shortest_edge: Some(edge), longest_edge: None, .. }) => {
                    Resize::ShortestEdge { edge: *edge, filter }
                }
                Some(SizeConfig::Map { longest_edge: Some(_), .. }) => {
                    return Err(Error::Unsupported(format!(
                        "{origin}: `size.longest_edge` is not supported; give `size` as {{\"shortest_edge\": N}} or {{\"height\": H, \"width\": W}}"
                    )))
                }
                Some(other) => return Err(config_error(format!("`size` {other:?} names neither height and width nor shortest_edge"))),
            };
            Some(resize)
        } else {
            None
        };

        let center_crop = if self.do_center_crop.unwrap_or(defaults.center_crop.is_some()) {
            let (height, width) = match &self.crop_size {
                Some(SizeConfig::Square(edge)) => (*edge, *edge),
                Some(SizeConfig::Map { height: Some(height), width: Some(width), .. }) => (*height, *width),
                Some(other) => return Err(config_error(format!("`crop_size` {other:?} has no height and width"))),
                None => match defaults.center_crop {
                    Some(edge) => (edge, edge),
                    None => return Err(config_error("do_center_crop is set but crop_size is missing".into())),
                },
            };
            Some(CenterCrop { height, width, rounding: CropRounding::Floor })
        } else {
            None
        };

        let rescale = self.do_rescale.unwrap_or(true).then_some(self.rescale_factor.unwrap_or(1.0 / 255.0));
        let normalize = if self.do_normalize.unwrap_or(true) {
            let channels = |values: &Option<Vec<f32>>, default: [f32; 3], name: &str| -> Result<[f32; 3]> {
                match values.as_deref() {
                    None => Ok(default),
                    Some([value]) => Ok([*value; 3]),
                    Some(&[r, g, b]) => Ok([r, g, b]),
                    Some(other) => Err(config_error(format!("`{name}` has {} values; expected 1 or 3", other.len()))),
                }
            };
            let mean = channels(&self.image_mean, defaults.mean, "image_mean")?;
            let std = channels(&self.image_std, defaults.std, "image_std")?;
            if std.contains(&0.0) {
                return Err(config_error(format!("`image_std` {std:?} contains 0")));
            }
            Some((mean, std))
        } else {
            None
        };

        Ok(ImagePreprocessor { alpha: AlphaMode::CompositeOnWhite, resize, center_crop, rescale, normalize })
    }
}

/// Decodes the image file at `path`, telling the format from its content.
pub fn load_image(path: impl AsRef<std::path::Path>) -> Result<DynamicImage> {
    let path = path.as_ref();
    let reader = image::ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    reader.decode().map_err(|e| Error::Image {
        origin: path.display().to_string(),
        message: format!("could not be decoded: {e}; PNG, JPEG, GIF, WebP and BMP files are supported"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_even_crop_offsets() {
        let image = RgbImage::from_raw(9, 1, (0..27).collect()).unwrap();
        // Margin 5: 2.5 rounds to 2 (even); margin 7: 3.5 rounds to 4.
        let crop = CenterCrop { height: 1, width: 4, rounding: CropRounding::HalfEven };
        assert_eq!(center_crop(&image, crop).unwrap().as_raw()[0], 6);
        let crop = CenterCrop { height: 1, width: 2, rounding: CropRounding::HalfEven };
        assert_eq!(center_crop(&image, crop).unwrap().as_raw()[0], 12);
        let crop = CenterCrop { height: 1, width: 2, rounding: CropRounding::Floor };
        assert_eq!(center_crop(&image, crop).unwrap().as_raw()[0], 9);
    }

    #[test]
    fn shortest_edge_keeps_aspect() {
        assert_eq!(shortest_edge_size(23, 37, 30), (30, 48));
        assert_eq!(shortest_edge_size(37, 23, 30), (48, 30));
        assert_eq!(shortest_edge_size(300, 451, 256), (256, 384));
    }

    #[test]
    fn composite_extremes() {
        assert_eq!(composite_on_white(10, 255), 10);
        assert_eq!(composite_on_white(10, 0), 255);
    }
}
