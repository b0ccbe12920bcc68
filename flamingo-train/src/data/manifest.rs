//! Reading JSONL manifests line by line, with each bad line skipped and counted,
//! and the checks shared by every manifest format.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::error::{BadSample, DataError};
use super::skip::{SkipLog, SkipReason};
use super::IMAGE_MARKER;

/// One parsed JSON object and where it was found.
pub(crate) struct JsonLine {
    /// `file:line`, for messages.
    pub id: String,
    pub object: Map<String, Value>,
}

impl JsonLine {
    /// Builds an invalid-record failure for this line.
    pub fn invalid(&self, detail: impl Into<String>) -> BadSample {
        BadSample::new(SkipReason::InvalidRecord, &self.id, detail)
    }

    /// Returns the string field `key`.
    pub fn string(&self, key: &str) -> Result<&str, BadSample> {
        match self.object.get(key) {
            Some(Value::String(text)) => Ok(text),
            Some(other) => Err(self.invalid(format!(
                "field `{key}` must be a string, found {}",
                json_kind(other)
            ))),
            None => Err(self.missing(key)),
        }
    }

    /// Returns the field `key`, of any type.
    pub fn field(&self, key: &str) -> Result<&Value, BadSample> {
        self.object.get(key).ok_or_else(|| self.missing(key))
    }

    /// Returns the field `key` as a list of strings.
    pub fn strings(&self, key: &str) -> Result<Vec<&str>, BadSample> {
        let not_a_list = |found: &Value| {
            self.invalid(format!(
                "field `{key}` must be a list of strings, found {}",
                json_kind(found)
            ))
        };

        let value = self.field(key)?;
        let items = value.as_array().ok_or_else(|| not_a_list(value))?;
        items
            .iter()
            .map(|item| item.as_str().ok_or_else(|| not_a_list(item)))
            .collect()
    }

    fn missing(&self, key: &str) -> BadSample {
        let mut keys: Vec<&str> = self.object.keys().map(String::as_str).collect();
        keys.sort_unstable();
        self.invalid(format!(
            "missing field `{key}` (fields: {})",
            keys.join(", ")
        ))
    }
}

/// Reads every non-blank line of `path` as a JSON object.
///
/// A line that is not valid UTF-8 or not a JSON object is recorded in
/// `skips` and left out. Only a file that cannot be read is an error.
pub(crate) fn read_jsonl(path: &Path, skips: &SkipLog) -> Result<Vec<JsonLine>, DataError> {
    let file = File::open(path).map_err(|error| DataError::io(path, error))?;
    let mut reader = BufReader::new(file);
    let mut lines = Vec::new();
    let mut buffer = Vec::new();
    let mut line_number = 0u64;

    loop {
        buffer.clear();
        let read = reader
            .read_until(b'\n', &mut buffer)
            .map_err(|error| DataError::io(path, error))?;
        if read == 0 {
            break;
        }
        line_number += 1;

        let id = format!("{}:{line_number}", path.display());
        match parse_object(&buffer) {
            Ok(Some(object)) => lines.push(JsonLine { id, object }),
            Ok(None) => {}
            Err(detail) => skips.record(&BadSample::new(SkipReason::InvalidRecord, id, detail)),
        }
    }
    Ok(lines)
}

/// Parses one line; `Ok(None)` for a blank line.
fn parse_object(bytes: &[u8]) -> Result<Option<Map<String, Value>>, String> {
    let text = std::str::from_utf8(bytes)
        .map_err(|error| format!("the line is not valid UTF-8: {error}"))?;
    // A byte order mark, which some editors write at the start of a file, is not JSON.
    let text = text.trim_start_matches('\u{feff}').trim();
    if text.is_empty() {
        return Ok(None);
    }

    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(object)) => Ok(Some(object)),
        Ok(other) => Err(format!(
            "expected a JSON object, found {}",
            json_kind(&other)
        )),
        Err(error) => Err(format!("invalid JSON: {error}")),
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Resolves a path from a manifest: absolute paths stay, relative ones are
/// taken from `base`.
pub(crate) fn resolve(base: &Path, path: &str) -> PathBuf {
    let path = Path::new(path);
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}

/// Returns the folder that relative paths in the manifest at `path` start from.
pub(crate) fn manifest_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Trims the caption and checks that it is usable.
pub(crate) fn caption(text: &str, id: &str) -> Result<String, BadSample> {
    let text = text.trim();
    if text.is_empty() {
        return Err(BadSample::new(
            SkipReason::EmptyCaption,
            id,
            "the caption is empty",
        ));
    }
    if text.contains(IMAGE_MARKER) {
        return Err(BadSample::new(
            SkipReason::MarkerMismatch,
            id,
            format!("the caption contains `{IMAGE_MARKER}`, but the prompt template places the only marker"),
        ));
    }
    Ok(text.to_string())
}

/// Fails with [`DataError::NoSamples`] when opening left no record.
pub(crate) fn require_records<R>(
    records: &[R],
    name: &str,
    skips: &SkipLog,
) -> Result<(), DataError> {
    if records.is_empty() {
        return Err(DataError::NoSamples {
            dataset: name.to_string(),
            detail: skips.summary(),
        });
    }
    Ok(())
}
