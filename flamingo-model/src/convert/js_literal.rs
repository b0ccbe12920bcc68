//! A reader for the JavaScript data literals inside minified TF.js model bundles.
//!
//! nsfwjs ships its TF.js model as browserify bundles whose module body is
//! `<param>.exports = <literal>`, where the literal is what a minifier made of
//! a `model.json` object or of a base64 string. The accepted grammar is JSON
//! plus what minifiers emit for plain data: unquoted identifier keys,
//! single-quoted strings, numbers written `.5` or `5.`, `!0` and `!1` for
//! true and false, and `void 0` (read as null). Anything else, such as a
//! variable, a call or an operator, is rejected with its byte offset.

use serde_json::{Map, Number, Value};

/// Nesting depth beyond which the parser stops, so that a malformed file
/// cannot overflow the stack. TF.js topologies nest about 10 levels deep.
const MAX_DEPTH: usize = 128;

/// A syntax error at a byte offset of the parsed text.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ParseError {
    pub offset: usize,
    pub message: String,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} at byte {}", self.message, self.offset)
    }
}

/// Parses one literal that starts at byte `start` of `text` (after optional
/// whitespace) and returns it with the byte offset just past its end.
pub(crate) fn parse_literal_at(text: &str, start: usize) -> Result<(Value, usize), ParseError> {
    let mut parser = Parser {
        text,
        bytes: text.as_bytes(),
        pos: start,
        depth: 0,
    };
    let value = parser.value()?;
    Ok((value, parser.pos))
}

struct Parser<'a> {
    text: &'a str,
    bytes: &'a [u8],
    pos: usize,
    depth: usize,
}

impl Parser<'_> {
    fn error<T>(&self, message: impl Into<String>) -> Result<T, ParseError> {
        Err(ParseError {
            offset: self.pos,
            message: message.into(),
        })
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn skip_whitespace(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    fn expect(&mut self, byte: u8) -> Result<(), ParseError> {
        self.skip_whitespace();
        if self.peek() == Some(byte) {
            self.pos += 1;
            Ok(())
        } else {
            self.error(format!(
                "expected `{}`, found {}",
                byte as char,
                self.describe_next()
            ))
        }
    }

    fn describe_next(&self) -> String {
        match self.text[self.pos..].chars().next() {
            Some(c) => format!("`{c}`"),
            None => "the end of the text".to_string(),
        }
    }

    fn value(&mut self) -> Result<Value, ParseError> {
        self.skip_whitespace();
        match self.peek() {
            Some(b'{') => self.nested(Self::object),
            Some(b'[') => self.nested(Self::array),
            Some(quote @ (b'"' | b'\'')) => Ok(Value::String(self.string(quote)?)),
            Some(b'!') => self.negated_digit(),
            Some(b'-' | b'.' | b'0'..=b'9') => self.number(),
            Some(c) if is_identifier_start(c) => self.keyword(),
            _ => self.error(format!("expected a value, found {}", self.describe_next())),
        }
    }

    fn nested(
        &mut self,
        parse: fn(&mut Self) -> Result<Value, ParseError>,
    ) -> Result<Value, ParseError> {
        if self.depth >= MAX_DEPTH {
            return self.error(format!("literal nested deeper than {MAX_DEPTH} levels"));
        }
        self.depth += 1;
        let value = parse(self);
        self.depth -= 1;
        value
    }

    fn object(&mut self) -> Result<Value, ParseError> {
        self.pos += 1;
        let mut map = Map::new();
        loop {
            self.skip_whitespace();
            if self.peek() == Some(b'}') {
                self.pos += 1;
                return Ok(Value::Object(map));
            }

            let key = self.key()?;
            self.expect(b':')?;
            let value = self.value()?;
            map.insert(key, value);

            self.skip_whitespace();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {}
                _ => {
                    return self.error(format!(
                        "expected `,` or `}}` in an object, found {}",
                        self.describe_next()
                    ))
                }
            }
        }
    }

    fn key(&mut self) -> Result<String, ParseError> {
        match self.peek() {
            Some(quote @ (b'"' | b'\'')) => self.string(quote),
            Some(c) if is_identifier_start(c) => Ok(self.identifier().to_string()),
            Some(b'0'..=b'9') => {
                let start = self.pos;
                while matches!(self.peek(), Some(b'0'..=b'9')) {
                    self.pos += 1;
                }
                Ok(self.text[start..self.pos].to_string())
            }
            _ => self.error(format!(
                "expected an object key, found {}",
                self.describe_next()
            )),
        }
    }

    fn array(&mut self) -> Result<Value, ParseError> {
        self.pos += 1;
        let mut items = Vec::new();
        loop {
            self.skip_whitespace();
            if self.peek() == Some(b']') {
                self.pos += 1;
                return Ok(Value::Array(items));
            }

            items.push(self.value()?);

            self.skip_whitespace();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {}
                _ => {
                    return self.error(format!(
                        "expected `,` or `]` in an array, found {}",
                        self.describe_next()
                    ))
                }
            }
        }
    }

    /// Reads a quoted string. Runs of plain characters are copied as slices,
    /// which keeps multi-megabyte base64 strings fast.
    fn string(&mut self, quote: u8) -> Result<String, ParseError> {
        let opening = self.pos;
        self.pos += 1;
        let mut out = String::new();
        loop {
            let run_start = self.pos;
            while let Some(c) = self.peek() {
                if c == quote || c == b'\\' || c == b'\n' {
                    break;
                }
                self.pos += 1;
            }
            out.push_str(&self.text[run_start..self.pos]);

            match self.peek() {
                Some(c) if c == quote => {
                    self.pos += 1;
                    return Ok(out);
                }
                Some(b'\\') => self.escape(&mut out)?,
                _ => {
                    return Err(ParseError {
                        offset: opening,
                        message: "unterminated string (the file may be truncated)".to_string(),
                    })
                }
            }
        }
    }

    fn escape(&mut self, out: &mut String) -> Result<(), ParseError> {
        self.pos += 1;
        let Some(c) = self.text[self.pos..].chars().next() else {
            return self.error("unterminated escape sequence (the file may be truncated)");
        };
        self.pos += c.len_utf8();
        match c {
            'n' => out.push('\n'),
            't' => out.push('\t'),
            'r' => out.push('\r'),
            'b' => out.push('\u{8}'),
            'f' => out.push('\u{c}'),
            'v' => out.push('\u{b}'),
            '0' => out.push('\0'),
            'x' => {
                let code = self.hex_digits(2)?;
                out.push(char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER));
            }
            'u' => {
                let code = self.unicode_escape()?;
                out.push(code);
            }
            // A backslash before a line break continues the string.
            '\n' => {}
            // Every other escaped character stands for itself, as in JavaScript.
            other => out.push(other),
        }
        Ok(())
    }

    fn hex_digits(&mut self, count: usize) -> Result<u32, ParseError> {
        let end = self.pos + count;
        let digits = self.text.get(self.pos..end).unwrap_or("");
        match u32::from_str_radix(digits, 16) {
            Ok(code) if digits.len() == count => {
                self.pos = end;
                Ok(code)
            }
            _ => self.error(format!(
                "expected {count} hexadecimal digits in an escape sequence"
            )),
        }
    }

    /// Reads the rest of a `\uXXXX` escape, joining a UTF-16 surrogate pair.
    fn unicode_escape(&mut self) -> Result<char, ParseError> {
        let high = self.hex_digits(4)?;
        if (0xD800..0xDC00).contains(&high) && self.text[self.pos..].starts_with("\\u") {
            let resume = self.pos;
            self.pos += 2;
            let low = self.hex_digits(4)?;
            if (0xDC00..0xE000).contains(&low) {
                let code = 0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00);
                return Ok(char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER));
            }
            self.pos = resume;
        }
        Ok(char::from_u32(high).unwrap_or(char::REPLACEMENT_CHARACTER))
    }

    /// Reads `!0` (true) or `!1` (false), the minified booleans.
    fn negated_digit(&mut self) -> Result<Value, ParseError> {
        self.pos += 1;
        let value = match self.peek() {
            Some(b'0') => true,
            Some(b'1') => false,
            _ => return self.error("expected `!0` or `!1`"),
        };
        self.pos += 1;
        Ok(Value::Bool(value))
    }

    fn number(&mut self) -> Result<Value, ParseError> {
        let start = self.pos;
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        let mut integral = true;
        while let Some(c) = self.peek() {
            match c {
                b'0'..=b'9' => {}
                b'.' => integral = false,
                b'e' | b'E' => {
                    integral = false;
                    if matches!(self.bytes.get(self.pos + 1), Some(b'+' | b'-')) {
                        self.pos += 1;
                    }
                }
                _ => break,
            }
            self.pos += 1;
        }
        let lexeme = &self.text[start..self.pos];

        if integral {
            if let Ok(value) = lexeme.parse::<i64>() {
                return Ok(Value::Number(value.into()));
            }
        }
        // Rust's float parsing rounds correctly, as JavaScript's does, so the
        // f64 here is the number the bundle's own code would see.
        let parsed = lexeme.parse::<f64>().ok().and_then(Number::from_f64);
        match parsed {
            Some(number) => Ok(Value::Number(number)),
            None => Err(ParseError {
                offset: start,
                message: format!("invalid number `{lexeme}`"),
            }),
        }
    }

    fn identifier(&mut self) -> &str {
        let start = self.pos;
        while matches!(self.peek(), Some(c) if is_identifier_start(c) || c.is_ascii_digit()) {
            self.pos += 1;
        }
        &self.text[start..self.pos]
    }

    fn keyword(&mut self) -> Result<Value, ParseError> {
        let start = self.pos;
        match self.identifier() {
            "true" => Ok(Value::Bool(true)),
            "false" => Ok(Value::Bool(false)),
            "null" => Ok(Value::Null),
            "void" => {
                self.skip_whitespace();
                if self.peek() == Some(b'0') {
                    self.pos += 1;
                    Ok(Value::Null)
                } else {
                    self.error("expected `void 0`")
                }
            }
            other => Err(ParseError {
                offset: start,
                message: format!("`{other}` is not a data literal; only objects, arrays, strings, numbers and booleans are read"),
            }),
        }
    }
}

fn is_identifier_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c == b'$'
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(text: &str) -> Result<Value, ParseError> {
        parse_literal_at(text, 0).map(|(value, _)| value)
    }

    #[test]
    fn minified_object() {
        let text = r#"{name:"Conv1",sparse:!1,trainable:!0,min:-.87,scale:5.,big:1e-3,shape:[null,224],'q':'a\'b',x:void 0}"#;
        let expected = json!({
            "name": "Conv1", "sparse": false, "trainable": true, "min": -0.87, "scale": 5.0,
            "big": 0.001, "shape": [null, 224], "q": "a'b", "x": null
        });
        assert_eq!(parse(text).unwrap(), expected);
    }

    #[test]
    fn plain_json_and_escapes() {
        let text = r#" { "a" : [1, 2.5, true, false, null], "s": "tab\tnl\nq\"u\u00e9\ud83d\ude00x\x41" } "#;
        let expected =
            json!({"a": [1, 2.5, true, false, null], "s": "tab\tnl\nq\"u\u{e9}\u{1F600}xA"});
        assert_eq!(parse(text).unwrap(), expected);
    }

    #[test]
    fn end_offset_after_literal() {
        let text = r#"a.exports="QUJD"},{}]"#;
        let (value, end) = parse_literal_at(text, 10).unwrap();
        assert_eq!(value, json!("QUJD"));
        assert_eq!(&text[end..], "},{}]");
    }

    #[test]
    fn integers_stay_integers() {
        assert_eq!(parse("[1280, -3]").unwrap(), json!([1280, -3]));
        assert!(parse("1280").unwrap().is_i64());
        assert!(parse("1e3").unwrap().is_f64());
    }

    #[test]
    fn unterminated_string_is_reported_at_opening_quote() {
        let error = parse(r#"{data:"QUJD"#).unwrap_err();
        assert_eq!(error.offset, 6);
        assert!(error.message.contains("unterminated string"), "{error}");
    }

    #[test]
    fn code_is_rejected() {
        let error = parse("{a:foo()}").unwrap_err();
        assert_eq!(error.offset, 3);
        assert!(
            error.message.contains("`foo` is not a data literal"),
            "{error}"
        );
    }

    #[test]
    fn missing_separator_is_rejected() {
        let error = parse("[1 2]").unwrap_err();
        assert!(error.message.contains("expected `,` or `]`"), "{error}");
    }

    #[test]
    fn deep_nesting_is_rejected() {
        let text = "[".repeat(MAX_DEPTH + 1);
        let error = parse(&text).unwrap_err();
        assert!(error.message.contains("nested deeper"), "{error}");
    }
}
