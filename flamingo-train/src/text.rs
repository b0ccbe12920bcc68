//! Turning a sample's text into tokens and loss flags.
//!
//! A sample built from the prompt template reads `prefix + caption +
//! suffix`, for example `<image>Output:` + `A photo of a coat.` +
//! `<|endofchunk|>`. The prefix is the prompt: no loss. The caption and the
//! suffix are targets, so the model learns the caption and to end it.
//! Text that does not have the template's shape (interleaved documents) is
//! one target segment. In both cases [`tokenize_segments`] also drops the
//! loss of every `<image>` token and of text before the first image.

use std::collections::HashMap;

use flamingo_model::flamingo::{tokenize_segments, Flamingo, Segment, TokenizedText};

use crate::data::{PromptTemplate, IMAGE_MARKER};
use crate::error::{Result, TrainError};

/// Texts whose tokens are kept; a dataset with more distinct texts
/// tokenizes the rest on every visit.
const MAX_CACHED_TEXTS: usize = 200_000;

/// The text around `{caption}` in a prompt template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptionLayout {
    /// Text before the caption, the prompt of caption generation.
    pub prefix: String,
    /// Text after the caption.
    pub suffix: String,
}

impl CaptionLayout {
    /// Splits `template` at its `{caption}` placeholder.
    pub fn new(template: &PromptTemplate) -> Self {
        const MARK: &str = "\u{0}caption\u{0}";
        let rendered = template.render(MARK);
        let (prefix, suffix) = rendered.split_once(MARK).expect("a prompt template contains {caption}");
        Self { prefix: prefix.to_string(), suffix: suffix.to_string() }
    }

    /// Returns whether the prompt contains an image, so that it can start caption generation.
    pub fn prompt_has_image(&self) -> bool {
        self.prefix.contains(IMAGE_MARKER)
    }

    /// Splits `text` into prompt, caption and suffix when it has this
    /// layout, else returns the whole text as one target.
    pub fn segments<'a>(&self, text: &'a str) -> Vec<Segment<'a>> {
        let fits = text.len() > self.prefix.len() + self.suffix.len() && text.starts_with(&self.prefix) && text.ends_with(&self.suffix);
        if !fits || !self.prompt_has_image() {
            return vec![Segment { text, target: true }];
        }
        let caption_end = text.len() - self.suffix.len();
        let mut segments = vec![
            Segment { text: &text[..self.prefix.len()], target: false },
            Segment { text: &text[self.prefix.len()..caption_end], target: true },
        ];
        if !self.suffix.is_empty() {
            segments.push(Segment { text: &text[caption_end..], target: true });
        }
        segments
    }

    /// Returns the caption inside `text`, when `text` has this layout.
    pub fn caption<'a>(&self, text: &'a str) -> Option<&'a str> {
        let inner = text.strip_prefix(self.prefix.as_str())?.strip_suffix(self.suffix.as_str())?;
        (!inner.is_empty()).then_some(inner)
    }
}

/// Tokenizes sample texts, remembering the result per text.
pub struct TextEncoder {
    layout: CaptionLayout,
    cache: HashMap<String, TokenizedText>,
}

impl TextEncoder {
    pub fn new(layout: CaptionLayout) -> Self {
        Self { layout, cache: HashMap::new() }
    }

    /// Returns the layout the texts are split with.
    pub fn layout(&self) -> &CaptionLayout {
        &self.layout
    }

    /// Tokenizes `text` into tokens and loss flags.
    pub fn encode(&mut self, model: &Flamingo, text: &str) -> Result<TokenizedText> {
        if let Some(tokens) = self.cache.get(text) {
            return Ok(tokens.clone());
        }
        let segments = self.layout.segments(text);
        let tokens = tokenize_segments(&model.tokenizer, &segments, model.image_id).map_err(TrainError::Model)?;
        if self.cache.len() < MAX_CACHED_TEXTS {
            self.cache.insert(text.to_string(), tokens.clone());
        }
        Ok(tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_template_splits_into_three_segments() {
        let layout = CaptionLayout::new(&PromptTemplate::default());
        assert_eq!(layout.prefix, "<image>Output:");
        assert_eq!(layout.suffix, "<|endofchunk|>");

        let segments = layout.segments("<image>Output:A photo of a coat.<|endofchunk|>");
        let parts: Vec<(&str, bool)> = segments.iter().map(|s| (s.text, s.target)).collect();
        assert_eq!(parts, [("<image>Output:", false), ("A photo of a coat.", true), ("<|endofchunk|>", true)]);
        assert_eq!(layout.caption("<image>Output:A photo of a coat.<|endofchunk|>"), Some("A photo of a coat."));
    }

    #[test]
    fn other_text_is_one_target() {
        let layout = CaptionLayout::new(&PromptTemplate::default());
        let text = "<image>A cat.<|endofchunk|><image>A dog.<|endofchunk|>";
        let segments = layout.segments(text);
        assert_eq!(segments.len(), 1);
        assert!(segments[0].target);
        assert_eq!(layout.caption(text), None);
    }

    #[test]
    fn template_without_suffix() {
        let layout = CaptionLayout::new(&PromptTemplate::new("<image>{caption}").unwrap());
        assert_eq!(layout.prefix, "<image>");
        assert_eq!(layout.suffix, "");
        let segments = layout.segments("<image>red");
        assert_eq!(segments.len(), 2);
        assert_eq!((segments[1].text, segments[1].target), ("red", true));
    }
}
