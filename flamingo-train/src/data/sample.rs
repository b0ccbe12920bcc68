//! The decoded unit every dataset yields.

use image::RgbImage;

/// One image or one video clip of a sample.
#[derive(Clone, Debug, PartialEq)]
pub enum Media {
    /// A still image. Greyscale, RGBA and 16-bit inputs are converted to
    /// RGB8; alpha is dropped, not blended.
    Image(RgbImage),
    /// The frames of a clip in playback order, already sampled to the
    /// configured frame count. Every frame is RGB8.
    Video(Vec<RgbImage>),
}

impl Media {
    /// Returns the frames of this media: one for an image, all of them for a clip.
    pub fn frames(&self) -> &[RgbImage] {
        match self {
            Media::Image(image) => std::slice::from_ref(image),
            Media::Video(frames) => frames,
        }
    }
}

/// Media plus text, decoded and ready for preprocessing and tokenization.
///
/// The text contains one `<image>` marker per entry of `media`, in the same
/// order, so the n-th marker refers to `media[n]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Images or clips in the order their markers appear in `text`.
    pub media: Vec<Media>,
    /// The text with `<image>` markers, after any prompt template.
    pub text: String,
    /// The class label of a classification dataset (IDX), for accuracy evaluation.
    pub label: Option<u32>,
    /// The sample's origin, for messages: `file:line`,
    /// `shard.tar:key` or `file[index]`.
    pub id: String,
}
