//! Conversions of pretrained weights from other frameworks into the layouts the loaders read.

mod js_literal;
pub mod nsfwjs;
mod tfjs;

pub use nsfwjs::{
    convert_nsfwjs_mobilenet_v2, read_nsfwjs_mobilenet_v2, ConversionReport, ConvertedModel,
};
