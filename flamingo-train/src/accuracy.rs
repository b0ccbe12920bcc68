//! Strict caption accuracy: a generated caption is correct when it names
//! the right class and no other.
//!
//! Class names match as whole words or phrases, case-insensitively. A
//! letter, digit, `-` or `_` next to a match makes it part of a longer word,
//! so "shirt" is not found in "t-shirt" or "shirts". Where one class name
//! lies inside a longer match of another ("boot" in "ankle boot"), only the
//! longer one counts.

use serde::{Deserialize, Serialize};

/// Finds class names in text.
#[derive(Debug, Clone)]
pub struct ClassMatcher {
    names: Vec<String>,
    lowercase: Vec<String>,
}

impl ClassMatcher {
    pub fn new(names: &[String]) -> Self {
        Self { names: names.to_vec(), lowercase: names.iter().map(|name| name.trim().to_lowercase()).collect() }
    }

    /// Returns the class names by label.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Returns the distinct classes `text` names, in label order.
    pub fn classes_named(&self, text: &str) -> Vec<usize> {
        let text = text.to_lowercase();
        let mut spans: Vec<(usize, usize, usize)> = Vec::new();
        for (class, name) in self.lowercase.iter().enumerate() {
            if name.is_empty() {
                continue;
            }
            for (start, found) in text.match_indices(name.as_str()) {
                let end = start + found.len();
                if is_boundary(text[..start].chars().next_back()) && is_boundary(text[end..].chars().next()) {
                    spans.push((start, end, class));
                }
            }
        }

        let mut classes: Vec<usize> = spans
            .iter()
            .filter(|&&(start, end, class)| {
                !spans.iter().any(|&(s, e, c)| c != class && s <= start && end <= e && (e - s) > (end - start))
            })
            .map(|&(_, _, class)| class)
            .collect();
        classes.sort_unstable();
        classes.dedup();
        classes
    }

    /// Judges a prediction against the true class `label`.
    pub fn judge(&self, text: &str, label: usize) -> Verdict {
        let named = self.classes_named(text);
        match named.as_slice() {
            [] => Verdict::NoClass,
            [only] if *only == label => Verdict::Correct,
            [only] => Verdict::Wrong(*only),
            _ => Verdict::SeveralClasses,
        }
    }
}

fn is_boundary(next: Option<char>) -> bool {
    match next {
        None => true,
        Some(c) => !(c.is_alphanumeric() || c == '-' || c == '_'),
    }
}

/// The outcome of one prediction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "verdict", content = "class")]
pub enum Verdict {
    Correct,
    /// Names exactly one class, another one.
    Wrong(usize),
    /// Names no class.
    NoClass,
    /// Names more than one class.
    SeveralClasses,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fashion() -> ClassMatcher {
        let names: Vec<String> =
            crate::data::FASHION_MNIST_CAPTION_NAMES.iter().map(|name| name.to_string()).collect();
        ClassMatcher::new(&names)
    }

    #[test]
    fn shirt_is_not_t_shirt() {
        let m = fashion();
        let (t_shirt, shirt) = (0, 6);
        assert_eq!(m.judge("A photo of a t-shirt.", t_shirt), Verdict::Correct);
        assert_eq!(m.judge("A photo of a t-shirt.", shirt), Verdict::Wrong(t_shirt));
        assert_eq!(m.judge("A photo of a shirt.", shirt), Verdict::Correct);
        assert_eq!(m.judge("A photo of a shirt.", t_shirt), Verdict::Wrong(shirt));
    }

    #[test]
    fn case_and_phrases() {
        let m = fashion();
        assert_eq!(m.judge("A photo of an Ankle Boot.", 9), Verdict::Correct);
        assert_eq!(m.judge("ANKLE BOOT", 9), Verdict::Correct);
        assert_eq!(m.judge("A photo of an ankle", 9), Verdict::NoClass);
    }

    #[test]
    fn words_inside_words_do_not_count() {
        let m = fashion();
        assert_eq!(m.judge("A photo of shirts.", 6), Verdict::NoClass);
        assert_eq!(m.judge("A photo of a coatrack.", 4), Verdict::NoClass);
        assert_eq!(m.judge("baggage", 8), Verdict::NoClass);
    }

    #[test]
    fn two_classes_are_wrong() {
        let m = fashion();
        assert_eq!(m.judge("A photo of a coat or a pullover.", 4), Verdict::SeveralClasses);
        assert_eq!(m.judge("A coat. A coat.", 4), Verdict::Correct, "the same class twice is still one class");
    }

    #[test]
    fn longer_name_wins_over_contained_name() {
        let names: Vec<String> = ["boot", "ankle boot"].iter().map(|s| s.to_string()).collect();
        let m = ClassMatcher::new(&names);
        assert_eq!(m.classes_named("an ankle boot"), vec![1]);
        assert_eq!(m.classes_named("a boot and an ankle boot"), vec![0, 1]);
    }

    #[test]
    fn empty_text_names_nothing() {
        assert_eq!(fashion().judge("", 3), Verdict::NoClass);
    }
}
