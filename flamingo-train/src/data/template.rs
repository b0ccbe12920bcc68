//! Text templates with `{name}` placeholders.
//!
//! `{{` and `}}` stand for literal braces. A placeholder that the template
//! kind does not define is rejected when the template is built, so a typo
//! fails at startup rather than producing odd training text.

use super::error::DataError;
use super::IMAGE_MARKER;

/// A template parsed into literal text and placeholders.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Parsed {
    source: String,
    parts: Vec<Part>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Literal(String),
    Field(&'static str),
}

impl Parsed {
    /// Parses `source`, accepting only the placeholders in `fields`.
    fn new(source: &str, fields: &[&'static str]) -> Result<Self, DataError> {
        let invalid = |reason: String| DataError::Template {
            template: source.to_string(),
            reason,
        };

        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = source.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    let mut closed = false;
                    for c in chars.by_ref() {
                        if c == '}' {
                            closed = true;
                            break;
                        }
                        name.push(c);
                    }
                    if !closed {
                        return Err(invalid(format!(
                            "the placeholder {{{name} has no closing `}}`; write `{{{{` for a literal brace"
                        )));
                    }
                    let field = fields.iter().find(|&&field| field == name).ok_or_else(|| {
                        invalid(format!(
                            "unknown placeholder {{{name}}}; the placeholders are {}",
                            list_fields(fields)
                        ))
                    })?;
                    parts.push(Part::Literal(std::mem::take(&mut literal)));
                    parts.push(Part::Field(field));
                }
                '}' => {
                    return Err(invalid(
                        "unmatched `}`; write `}}` for a literal brace".to_string(),
                    ));
                }
                _ => literal.push(c),
            }
        }
        parts.push(Part::Literal(literal));
        parts.retain(|part| !matches!(part, Part::Literal(text) if text.is_empty()));

        Ok(Parsed {
            source: source.to_string(),
            parts,
        })
    }

    fn uses(&self, field: &str) -> bool {
        self.parts
            .iter()
            .any(|part| matches!(part, Part::Field(name) if *name == field))
    }

    fn count_literal(&self, pattern: &str) -> usize {
        self.parts
            .iter()
            .map(|part| match part {
                Part::Literal(text) => text.matches(pattern).count(),
                Part::Field(_) => 0,
            })
            .sum()
    }

    /// Renders the template; `value` maps a placeholder name to its text.
    fn render<'a>(&self, value: impl Fn(&str) -> &'a str) -> String {
        let mut text = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(literal) => text.push_str(literal),
                Part::Field(field) => text.push_str(value(field)),
            }
        }
        text
    }
}

fn list_fields(fields: &[&str]) -> String {
    let quoted: Vec<String> = fields.iter().map(|field| format!("{{{field}}}")).collect();
    quoted.join(", ")
}

/// A template that turns a caption into training text for a sample with
/// one image or clip.
///
/// Placeholder: `{caption}`, the caption with surrounding whitespace removed.
/// The template must contain `{caption}` and exactly one `<image>` marker.
/// The default, `<image>Output:{caption}<|endofchunk|>`, is the layout
/// OpenFlamingo trains image-caption pairs with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PromptTemplate(Parsed);

impl PromptTemplate {
    /// The default template.
    pub const DEFAULT: &'static str = "<image>Output:{caption}<|endofchunk|>";

    /// Parses and checks a template.
    pub fn new(template: &str) -> Result<Self, DataError> {
        let parsed = Parsed::new(template, &["caption"])?;
        let invalid = |reason: &str| DataError::Template {
            template: template.to_string(),
            reason: reason.to_string(),
        };

        if !parsed.uses("caption") {
            return Err(invalid(
                "it lacks {caption}, so the caption would never be trained on",
            ));
        }
        let markers = parsed.count_literal(IMAGE_MARKER);
        if markers != 1 {
            return Err(invalid(&format!(
                "it contains {markers} `{IMAGE_MARKER}` markers, but a caption belongs to exactly one image or clip"
            )));
        }

        Ok(PromptTemplate(parsed))
    }

    /// Renders the text for `caption`.
    pub fn render(&self, caption: &str) -> String {
        self.0.render(|_| caption)
    }

    /// Returns the template as written.
    pub fn as_str(&self) -> &str {
        &self.0.source
    }
}

impl Default for PromptTemplate {
    fn default() -> Self {
        PromptTemplate::new(Self::DEFAULT).expect("the default prompt template is valid")
    }
}

/// A template that turns a class label into a caption, for classification
/// datasets.
///
/// Placeholders: `{class}` is the class name and `{label}` the label
/// integer. `{article}` is "an" when the class name starts with a vowel
/// letter and "a" otherwise. That is a spelling rule, so "an hour" and "a
/// unicorn" come out wrong.
/// The template must contain `{class}` or `{label}`. The default is
/// `A photo of {article} {class}.`, which renders "A photo of an ankle boot.".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassTemplate(Parsed);

impl ClassTemplate {
    /// The default template.
    pub const DEFAULT: &'static str = "A photo of {article} {class}.";

    /// Parses and checks a template.
    pub fn new(template: &str) -> Result<Self, DataError> {
        let parsed = Parsed::new(template, &["class", "label", "article"])?;
        if !parsed.uses("class") && !parsed.uses("label") {
            return Err(DataError::Template {
                template: template.to_string(),
                reason: "it lacks both {class} and {label}, so every caption would be the same"
                    .to_string(),
            });
        }
        Ok(ClassTemplate(parsed))
    }

    /// Renders the caption for a class name and its label.
    pub fn render(&self, class: &str, label: u32) -> String {
        let label = label.to_string();
        let article = indefinite_article(class);
        self.0.render(|field| match field {
            "class" => class,
            "article" => article,
            _ => label.as_str(),
        })
    }

    /// Returns the template as written.
    pub fn as_str(&self) -> &str {
        &self.0.source
    }
}

impl Default for ClassTemplate {
    fn default() -> Self {
        ClassTemplate::new(Self::DEFAULT).expect("the default class template is valid")
    }
}

fn indefinite_article(word: &str) -> &'static str {
    match word.chars().next().map(|c| c.to_ascii_lowercase()) {
        Some('a' | 'e' | 'i' | 'o' | 'u') => "an",
        _ => "a",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_default_renders() {
        let template = PromptTemplate::default();
        assert_eq!(
            template.render("a cat"),
            "<image>Output:a cat<|endofchunk|>"
        );
    }

    #[test]
    fn prompt_literal_braces() {
        let template = PromptTemplate::new("<image>{{json}}: {caption}").unwrap();
        assert_eq!(template.render("x"), "<image>{json}: x");
    }

    #[test]
    fn prompt_rejects_bad_templates() {
        let cases = [
            "<image>Output:{capton}",
            "<image>Output:{caption",
            "<image>Output:}{caption}",
            "Output:{caption}",
            "<image><image>{caption}",
            "<image>Output:",
        ];
        for case in cases {
            assert!(PromptTemplate::new(case).is_err(), "accepted {case:?}");
        }
    }

    #[test]
    fn class_article_and_label() {
        let template = ClassTemplate::default();
        assert_eq!(
            template.render("ankle boot", 9),
            "A photo of an ankle boot."
        );
        assert_eq!(template.render("sneaker", 7), "A photo of a sneaker.");

        let numbered = ClassTemplate::new("class {label}: {class}").unwrap();
        assert_eq!(numbered.render("bag", 8), "class 8: bag");
    }

    #[test]
    fn class_requires_placeholder() {
        assert!(ClassTemplate::new("A photo.").is_err());
        assert!(ClassTemplate::new("A photo of {article}.").is_err());
    }
}
