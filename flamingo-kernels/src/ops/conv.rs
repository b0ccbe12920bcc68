//! 2-D convolution over channels-last images, forward only (frozen CNN encoders).
//!
//! x is [N, H, W, Cin]; the weight keeps PyTorch's [Cout, Cin/groups, kH, kW]
//! layout so a checkpoint loads as stored; bias is [Cout]; the output is
//! [N, Ho, Wo, Cout] with Ho = (H + pad_top + pad_bottom − kH) / stride + 1.
//! Padding is given per side because TensorFlow's "same" padding puts the
//! odd pixel after the image, where PyTorch pads both sides alike.
//! `groups == Cin == Cout` is a depthwise convolution.

use crate::device::{Backend, Device};
use crate::error::{shape_err, Result};
use crate::ops::activation::Activation;
use crate::ops::matmul::cpu_gemm;
use crate::ops::par_rows;
use crate::tensor::{DType, Tensor};

/// Options of [`Device::conv2d`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2d {
    /// Step between windows, (rows, columns).
    pub stride: (usize, usize),
    /// Zero padding as [top, left, bottom, right].
    pub padding: [usize; 4],
    pub groups: usize,
    /// Applied after the bias.
    pub activation: Activation,
}

impl Default for Conv2d {
    fn default() -> Self {
        Self { stride: (1, 1), padding: [0; 4], groups: 1, activation: Activation::Identity }
    }
}

/// The sizes of one convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConvDims {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub cin: usize,
    pub cout: usize,
    pub kh: usize,
    pub kw: usize,
    pub ho: usize,
    pub wo: usize,
}

fn conv_dims(op: &'static str, x: &Tensor, weight: &Tensor, spec: &Conv2d) -> Result<ConvDims> {
    if x.rank() != 4 || weight.rank() != 4 {
        return Err(shape_err!(op, "x must be [N, H, W, C] and the weight [Cout, Cin/groups, kH, kW]; found {:?} and {:?}", x.shape(), weight.shape()));
    }
    let (n, h, w, cin) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3]);
    let (cout, cin_group, kh, kw) = (weight.shape[0], weight.shape[1], weight.shape[2], weight.shape[3]);
    let groups = spec.groups;
    if groups == 0 || cin % groups != 0 || cout % groups != 0 || cin / groups != cin_group {
        return Err(shape_err!(op, "{cin} input and {cout} output channels do not split into {groups} groups for a weight of shape {:?}", weight.shape()));
    }
    let (sh, sw) = spec.stride;
    let [top, left, bottom, right] = spec.padding;
    if sh == 0 || sw == 0 || h + top + bottom < kh || w + left + right < kw {
        return Err(shape_err!(op, "a {kh}x{kw} window with stride {:?} and padding {:?} does not fit an input of {h}x{w}", spec.stride, spec.padding));
    }
    let ho = (h + top + bottom - kh) / sh + 1;
    let wo = (w + left + right - kw) / sw + 1;
    Ok(ConvDims { n, h, w, cin, cout, kh, kw, ho, wo })
}

impl Device {
    /// Returns act(conv2d(x, weight) + bias); see the module documentation.
    pub fn conv2d(&self, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, spec: &Conv2d) -> Result<Tensor> {
        const OP: &str = "conv2d";
        self.check_f(OP, "x", x, DType::F32)?;
        self.check(OP, "weight", weight)?;
        if weight.dtype() == DType::U32 {
            return Err(weight.dtype_error(OP, "weight", "f32 or f16"));
        }
        let dims = conv_dims(OP, x, weight, spec)?;
        if let Some(bias) = bias {
            self.check_f(OP, "bias", bias, DType::F32)?;
            if bias.shape() != [dims.cout] {
                return Err(shape_err!(OP, "bias has shape {:?}, expected [{}]", bias.shape(), dims.cout));
            }
        }
        match self.backend() {
            Backend::Cpu => {
                let out = cpu_conv2d(x, weight, bias, spec, dims)?;
                Ok(Tensor::cpu_f32(vec![dims.n, dims.ho, dims.wo, dims.cout], out, self.id()))
            }
            Backend::Gpu(gpu) => gpu.conv2d(x, weight, bias, spec, dims),
        }
    }
}

fn cpu_conv2d(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, spec: &Conv2d, dims: ConvDims) -> Result<Vec<f32>> {
    const OP: &str = "conv2d";
    let input = x.cpu_f32_slice(OP, "x")?;
    let weights = weight.cpu_f32_cow(OP, "weight")?;
    let ConvDims { n, cin, cout, ho, wo, .. } = dims;
    let mut out = vec![0.0f32; n * ho * wo * cout];

    if spec.groups == cin && cin == cout {
        depthwise(input, &weights, spec, dims, &mut out);
    } else if dims.kh == 1 && dims.kw == 1 && spec.stride == (1, 1) && spec.padding == [0; 4] && spec.groups == 1 {
        // A pointwise convolution is a matmul over all pixels.
        cpu_gemm(&mut out, input, &weights, n * ho * wo, cout, cin, false, true, 1.0, 0.0);
    } else {
        grouped_im2col(input, &weights, spec, dims, &mut out);
    }

    let bias = match bias {
        Some(bias) => Some(bias.cpu_f32_slice(OP, "bias")?),
        None => None,
    };
    let act = spec.activation;
    par_rows(&mut out, cout, |_, row| {
        if let Some(bias) = bias {
            row.iter_mut().zip(bias).for_each(|(value, b)| *value += b);
        }
        act.apply_in_place(row);
    });
    Ok(out)
}

/// The input row and column a window tap reads, or None in the padding.
fn tap(out_index: usize, stride: usize, pad_before: usize, kernel_index: usize, size: usize) -> Option<usize> {
    let position = (out_index * stride + kernel_index).checked_sub(pad_before)?;
    (position < size).then_some(position)
}

fn depthwise(input: &[f32], weights: &[f32], spec: &Conv2d, dims: ConvDims, out: &mut [f32]) {
    let ConvDims { h, w, cin: c, kh, kw, ho, wo, .. } = dims;
    // Taps laid out [kH, kW, C] so the inner loop runs over contiguous channels.
    let mut taps = vec![0.0f32; kh * kw * c];
    for channel in 0..c {
        for ki in 0..kh {
            for kj in 0..kw {
                taps[(ki * kw + kj) * c + channel] = weights[(channel * kh + ki) * kw + kj];
            }
        }
    }
    let [top, left, ..] = spec.padding;
    par_rows(out, wo * c, |row, out_row| {
        let (image, oh) = (row / ho, row % ho);
        for ki in 0..kh {
            let Some(ih) = tap(oh, spec.stride.0, top, ki, h) else { continue };
            for ow in 0..wo {
                let pixel = &mut out_row[ow * c..(ow + 1) * c];
                for kj in 0..kw {
                    let Some(iw) = tap(ow, spec.stride.1, left, kj, w) else { continue };
                    let source = &input[((image * h + ih) * w + iw) * c..][..c];
                    let tap_weights = &taps[(ki * kw + kj) * c..][..c];
                    for ((o, &x), &t) in pixel.iter_mut().zip(source).zip(tap_weights) {
                        *o += x * t;
                    }
                }
            }
        }
    });
}

fn grouped_im2col(input: &[f32], weights: &[f32], spec: &Conv2d, dims: ConvDims, out: &mut [f32]) {
    let ConvDims { n, h, w, cin, cout, kh, kw, ho, wo } = dims;
    let groups = spec.groups;
    let (cin_group, cout_group) = (cin / groups, cout / groups);
    let patch = kh * kw * cin_group;
    let pixels = n * ho * wo;
    let [top, left, ..] = spec.padding;

    for group in 0..groups {
        // Columns [pixels, kH·kW·Cin_g] in (ki, kj, c) order, and the
        // group's weights reordered to [Cout_g, kH·kW·Cin_g] to match.
        let mut columns = vec![0.0f32; pixels * patch];
        par_rows(&mut columns, patch, |pixel, column| {
            let (image, oh, ow) = (pixel / (ho * wo), (pixel / wo) % ho, pixel % wo);
            for ki in 0..kh {
                let Some(ih) = tap(oh, spec.stride.0, top, ki, h) else { continue };
                for kj in 0..kw {
                    let Some(iw) = tap(ow, spec.stride.1, left, kj, w) else { continue };
                    let source = &input[((image * h + ih) * w + iw) * cin + group * cin_group..][..cin_group];
                    column[(ki * kw + kj) * cin_group..][..cin_group].copy_from_slice(source);
                }
            }
        });
        let mut kernel = vec![0.0f32; cout_group * patch];
        for o in 0..cout_group {
            for c in 0..cin_group {
                for ki in 0..kh {
                    for kj in 0..kw {
                        kernel[o * patch + (ki * kw + kj) * cin_group + c] =
                            weights[(((group * cout_group + o) * cin_group + c) * kh + ki) * kw + kj];
                    }
                }
            }
        }
        let mut product = vec![0.0f32; pixels * cout_group];
        cpu_gemm(&mut product, &columns, &kernel, pixels, cout_group, patch, false, true, 1.0, 0.0);
        for (pixel, values) in product.chunks(cout_group).enumerate() {
            out[pixel * cout + group * cout_group..][..cout_group].copy_from_slice(values);
        }
    }
}
