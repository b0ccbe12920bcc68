//! Resampling that reproduces reference implementations bit for bit:
//! Pillow's separable filters on 8-bit RGB images ([`resize_pil`]) and
//! TensorFlow's bilinear resize with aligned corners on floats
//! ([`resize_bilinear_align_corners`]).
//!
//! Images are row-major [H, W, 3] (interleaved RGB). Pillow's arithmetic
//! was read from its 13.0 source (`src/libImaging/Resample.c`) and checked
//! against the processor fixtures.

use image::RgbImage;
use rayon::prelude::*;

/// A resampling filter of Pillow's `Image.resize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interpolation {
    Nearest,
    Box,
    Bilinear,
    Hamming,
    /// Keys' cubic with a = −0.5.
    Bicubic,
    /// Lanczos with three lobes.
    Lanczos,
}

impl Interpolation {
    /// Parses Pillow's integer filter code, the `resample` value of a
    /// `preprocessor_config.json`: 0 nearest, 1 Lanczos, 2 bilinear,
    /// 3 bicubic, 4 box, 5 Hamming.
    pub fn from_pil_code(code: u32) -> Option<Interpolation> {
        let filter = match code {
            0 => Interpolation::Nearest,
            1 => Interpolation::Lanczos,
            2 => Interpolation::Bilinear,
            3 => Interpolation::Bicubic,
            4 => Interpolation::Box,
            5 => Interpolation::Hamming,
            _ => return None,
        };
        Some(filter)
    }

    /// Parses a timm `interpolation` name (`bicubic`, `bilinear`, ...).
    pub fn from_name(name: &str) -> Option<Interpolation> {
        let filter = match name {
            "nearest" => Interpolation::Nearest,
            "box" => Interpolation::Box,
            "bilinear" => Interpolation::Bilinear,
            "hamming" => Interpolation::Hamming,
            "bicubic" => Interpolation::Bicubic,
            "lanczos" => Interpolation::Lanczos,
            _ => return None,
        };
        Some(filter)
    }

    /// Half-width of the kernel at scale 1, in input pixels.
    fn support(self) -> f64 {
        match self {
            Interpolation::Nearest => 0.0,
            Interpolation::Box => 0.5,
            Interpolation::Bilinear | Interpolation::Hamming => 1.0,
            Interpolation::Bicubic => 2.0,
            Interpolation::Lanczos => 3.0,
        }
    }

    /// Evaluates the kernel at distance `x`, with Pillow's boundary conventions.
    fn kernel(self, x: f64) -> f64 {
        match self {
            Interpolation::Nearest => 0.0,
            Interpolation::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Interpolation::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Interpolation::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    // Pillow writes these two constants as C floats.
                    let x = x * std::f64::consts::PI;
                    x.sin() / x * (0.54f32 as f64 + 0.46f32 as f64 * x.cos())
                }
            }
            Interpolation::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Interpolation::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * std::f64::consts::PI;
    x.sin() / x
}

/// Bits of fraction in Pillow's fixed-point filter weights for 8-bit
/// images: 32 − 8 − 2, leaving room for the sum of 8-bit products.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// The filter taps of one output pixel of one axis.
struct Taps {
    first: usize,
    weights: Vec<i32>,
}

/// Computes Pillow's fixed-point taps for resizing `in_size` pixels to `out_size`.
///
/// The kernel widens by the scale when shrinking (antialiasing), and the
/// taps of each output pixel are normalised to sum to one before rounding.
fn pil_taps(in_size: usize, out_size: usize, filter: Interpolation) -> Vec<Taps> {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = filter.support() * filter_scale;
    let inverse = 1.0 / filter_scale;

    (0..out_size)
        .map(|out| {
            let center = (out as f64 + 0.5) * scale;
            // Pillow truncates toward zero here, then clamps.
            let first = ((center - support + 0.5) as i64).max(0) as usize;
            let end = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let raw: Vec<f64> = (first..end)
                .map(|x| filter.kernel((x as f64 - center + 0.5) * inverse))
                .collect();
            let total: f64 = raw.iter().sum();
            let weights = raw
                .iter()
                .map(|&w| {
                    let w = if total != 0.0 { w / total } else { w };
                    let fixed = w * (1u32 << PRECISION_BITS) as f64;
                    // Round half away from zero, as Pillow does.
                    if fixed < 0.0 {
                        (fixed - 0.5) as i32
                    } else {
                        (fixed + 0.5) as i32
                    }
                })
                .collect();
            Taps { first, weights }
        })
        .collect()
}

/// Rounds a fixed-point sum to 8 bits, clamping like Pillow's `clip8`.
fn clip8(sum: i64) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes an 8-bit RGB image to `width` x `height` as Pillow 13.0's
/// `Image.resize` does: two separable passes, each in fixed point and
/// rounded to 8 bits. A pass whose size does not change is skipped. The
/// horizontal pass runs first unless the height shrinks by more than twice
/// as many pixels as the width does. The order changes the result, because
/// the intermediate image is rounded.
pub fn resize_pil(image: &RgbImage, width: usize, height: usize, filter: Interpolation) -> RgbImage {
    let (in_w, in_h) = (image.width() as usize, image.height() as usize);
    if (width, height) == (in_w, in_h) {
        return image.clone();
    }
    if filter == Interpolation::Nearest {
        return resize_nearest(image, width, height);
    }

    let shrink_h = in_h as i64 - height as i64;
    let shrink_w = in_w as i64 - width as i64;
    let vertical_first = shrink_h > 0 && shrink_h > 2 * shrink_w;
    let passes = if vertical_first { [Axis::Height, Axis::Width] } else { [Axis::Width, Axis::Height] };

    let mut data = image.as_raw().clone();
    let (mut current_w, mut current_h) = (in_w, in_h);
    for axis in passes {
        match axis {
            Axis::Width if width != current_w => {
                data = resample_rows(&data, current_w, current_h, width, filter);
                current_w = width;
            }
            Axis::Height if height != current_h => {
                data = resample_columns(&data, current_w, current_h, height, filter);
                current_h = height;
            }
            _ => {}
        }
    }
    RgbImage::from_raw(width as u32, height as u32, data).expect("three bytes per pixel")
}

#[derive(Clone, Copy)]
enum Axis {
    Width,
    Height,
}

/// Resamples every row of an [h, w, 3] image to `out_w` pixels (Pillow's horizontal pass).
fn resample_rows(data: &[u8], in_w: usize, height: usize, out_w: usize, filter: Interpolation) -> Vec<u8> {
    let taps = pil_taps(in_w, out_w, filter);
    let mut out = vec![0u8; height * out_w * 3];
    out.par_chunks_mut(out_w * 3).enumerate().for_each(|(row, out_row)| {
        let in_row = &data[row * in_w * 3..(row + 1) * in_w * 3];
        for (x, tap) in taps.iter().enumerate() {
            for channel in 0..3 {
                let mut sum: i64 = 1 << (PRECISION_BITS - 1);
                for (i, &w) in tap.weights.iter().enumerate() {
                    sum += in_row[(tap.first + i) * 3 + channel] as i64 * w as i64;
                }
                out_row[x * 3 + channel] = clip8(sum);
            }
        }
    });
    out
}

/// Resamples every column of an [h, w, 3] image to `out_h` pixels (Pillow's vertical pass).
fn resample_columns(data: &[u8], width: usize, in_h: usize, out_h: usize, filter: Interpolation) -> Vec<u8> {
    let taps = pil_taps(in_h, out_h, filter);
    let row_len = width * 3;
    let mut out = vec![0u8; out_h * row_len];
    out.par_chunks_mut(row_len).zip(taps.par_iter()).for_each(|(out_row, tap)| {
        let mut sums = vec![1i64 << (PRECISION_BITS - 1); row_len];
        for (i, &w) in tap.weights.iter().enumerate() {
            let in_row = &data[(tap.first + i) * row_len..(tap.first + i + 1) * row_len];
            for (sum, &value) in sums.iter_mut().zip(in_row) {
                *sum += value as i64 * w as i64;
            }
        }
        for (out, sum) in out_row.iter_mut().zip(sums) {
            *out = clip8(sum);
        }
    });
    out
}

/// Pillow's nearest-neighbour resize. Output pixel x reads input pixel
/// ⌊in / out · (x + ½)⌋, with the position accumulated step by step in
/// f64 as Pillow does, which decides the ties.
fn resize_nearest(image: &RgbImage, width: usize, height: usize) -> RgbImage {
    let (in_w, in_h) = (image.width() as usize, image.height() as usize);
    let positions = |in_size: usize, out_size: usize| -> Vec<usize> {
        let step = in_size as f64 / out_size as f64;
        let mut position = step * 0.5;
        (0..out_size)
            .map(|_| {
                let index = (position as usize).min(in_size - 1);
                position += step;
                index
            })
            .collect()
    };
    let (columns, rows) = (positions(in_w, width), positions(in_h, height));
    let raw = image.as_raw();
    let mut out = Vec::with_capacity(width * height * 3);
    for &sy in &rows {
        for &sx in &columns {
            out.extend_from_slice(&raw[(sy * in_w + sx) * 3..][..3]);
        }
    }
    RgbImage::from_raw(width as u32, height as u32, out).expect("three bytes per pixel")
}

/// Resizes channels-last [H, W, 3] floats as TensorFlow's `resize_bilinear`
/// does with `align_corners = true` and `half_pixel_centers = false`.
///
/// Output row r reads input row r · (in − 1) / (out − 1). The arithmetic
/// runs in f64 and rounds to f32 once, as TensorFlow.js's CPU kernel does
/// in JavaScript numbers.
pub fn resize_bilinear_align_corners(values: &[f32], in_h: usize, in_w: usize, out_h: usize, out_w: usize) -> Vec<f32> {
    let ratio = |in_size: usize, out_size: usize| {
        if out_size > 1 {
            (in_size - 1) as f64 / (out_size - 1) as f64
        } else {
            in_size as f64 / out_size as f64
        }
    };
    let (row_ratio, col_ratio) = (ratio(in_h, out_h), ratio(in_w, out_w));
    let source = |index: usize, ratio: f64, in_size: usize| {
        let exact = ratio * index as f64;
        let floor = exact.floor().max(0.0);
        let ceil = (exact.ceil() as usize).min(in_size - 1);
        (floor as usize, ceil, exact - floor)
    };
    let columns: Vec<(usize, usize, f64)> = (0..out_w).map(|c| source(c, col_ratio, in_w)).collect();

    let mut out = vec![0.0f32; out_h * out_w * 3];
    out.par_chunks_mut(out_w * 3).enumerate().for_each(|(r, out_row)| {
        let (top_row, bottom_row, row_frac) = source(r, row_ratio, in_h);
        let top = &values[top_row * in_w * 3..(top_row + 1) * in_w * 3];
        let bottom = &values[bottom_row * in_w * 3..(bottom_row + 1) * in_w * 3];
        for (c, &(left, right, col_frac)) in columns.iter().enumerate() {
            for channel in 0..3 {
                let top_left = top[left * 3 + channel] as f64;
                let top_right = top[right * 3 + channel] as f64;
                let bottom_left = bottom[left * 3 + channel] as f64;
                let bottom_right = bottom[right * 3 + channel] as f64;
                let upper = top_left + (top_right - top_left) * col_frac;
                let lower = bottom_left + (bottom_right - bottom_left) * col_frac;
                out_row[c * 3 + channel] = (upper + (lower - upper) * row_frac) as f32;
            }
        }
    });
    out
}
