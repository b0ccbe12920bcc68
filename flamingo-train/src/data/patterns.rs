//! Brace expansion of shard patterns such as `shard-{000..009}.tar`.

use super::error::DataError;

/// The largest number of names one pattern may expand to, so that a typo
/// such as `{0..9999999999}` fails with a message instead of exhausting memory.
const MAX_EXPANSION: usize = 1_000_000;

/// Expands brace groups in `pattern`, left to right, as the shell does.
///
/// A group is a numeric range, `{000..009}`, or a list, `{train,valid}`.
/// A range keeps the width of its bounds when either is written with a
/// leading zero, so `{8..10}` gives `8 9 10` and `{08..10}` gives
/// `08 09 10`. Several groups multiply: `{a,b}-{0..1}` gives `a-0 a-1 b-0
/// b-1`. A pattern without braces is returned as is. Nested braces are not
/// supported.
pub fn expand_braces(pattern: &str) -> Result<Vec<String>, DataError> {
    let invalid = |reason: String| DataError::Pattern {
        pattern: pattern.to_string(),
        reason,
    };

    let segments = parse_segments(pattern).map_err(invalid)?;
    let total = segments
        .iter()
        .try_fold(1usize, |total, segment| total.checked_mul(segment.len()))
        .filter(|&total| total <= MAX_EXPANSION)
        .ok_or_else(|| invalid(format!("it expands to more than {MAX_EXPANSION} names")))?;

    let mut names = vec![String::new()];
    for segment in &segments {
        names = names
            .iter()
            .flat_map(|prefix| segment.iter().map(move |part| format!("{prefix}{part}")))
            .collect();
    }
    debug_assert_eq!(names.len(), total);
    Ok(names)
}

/// Splits a pattern into segments, each a list of alternatives; literal
/// text is a segment of one.
fn parse_segments(pattern: &str) -> Result<Vec<Vec<String>>, String> {
    let mut segments = Vec::new();
    let mut rest = pattern;
    loop {
        let Some(open) = rest.find(['{', '}']) else {
            segments.push(vec![rest.to_string()]);
            return Ok(segments);
        };
        if rest[open..].starts_with('}') {
            return Err(format!("unmatched `}}` at `{}`", &rest[open..]));
        }

        let after = &rest[open + 1..];
        let close = after
            .find('}')
            .ok_or_else(|| format!("unclosed `{{` at `{}`", &rest[open..]))?;
        let body = &after[..close];
        if body.contains('{') {
            return Err("nested braces are not supported".to_string());
        }

        segments.push(vec![rest[..open].to_string()]);
        segments.push(expand_group(body)?);
        rest = &after[close + 1..];
    }
}

/// Expands the text between one pair of braces.
fn expand_group(body: &str) -> Result<Vec<String>, String> {
    if let Some((start, end)) = body.split_once("..") {
        return expand_range(start, end);
    }
    if body.contains(',') {
        return Ok(body.split(',').map(str::to_string).collect());
    }
    Err(format!(
        "`{{{body}}}` is neither a range such as {{000..009}} nor a list such as {{train,valid}}"
    ))
}

fn expand_range(start: &str, end: &str) -> Result<Vec<String>, String> {
    let parse = |bound: &str| {
        if bound.is_empty() || !bound.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!(
                "the range bound `{bound}` is not a non-negative integer"
            ));
        }
        bound
            .parse::<u64>()
            .map_err(|_| format!("the range bound `{bound}` is too large"))
    };
    let (first, last) = (parse(start)?, parse(end)?);
    if first > last {
        return Err(format!(
            "the range {start}..{end} runs backwards; write it as {end}..{start}"
        ));
    }
    if last - first >= MAX_EXPANSION as u64 {
        return Err(format!(
            "the range {start}..{end} has more than {MAX_EXPANSION} values"
        ));
    }

    let padded = |bound: &str| bound.len() > 1 && bound.starts_with('0');
    let width = if padded(start) || padded(end) {
        start.len().max(end.len())
    } else {
        0
    };
    Ok((first..=last).map(|n| format!("{n:0width$}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expand_padded_range() {
        let names = expand_braces("shard-{000..009}.tar").unwrap();
        assert_eq!(names.len(), 10);
        assert_eq!(names[0], "shard-000.tar");
        assert_eq!(names[9], "shard-009.tar");
    }

    #[test]
    fn expand_unpadded_range() {
        assert_eq!(expand_braces("{8..10}").unwrap(), vec!["8", "9", "10"]);
        assert_eq!(expand_braces("{08..10}").unwrap(), vec!["08", "09", "10"]);
    }

    #[test]
    fn expand_list_and_product() {
        assert_eq!(
            expand_braces("{a,b}-{0..1}.tar").unwrap(),
            vec!["a-0.tar", "a-1.tar", "b-0.tar", "b-1.tar"]
        );
    }

    #[test]
    fn expand_plain_pattern() {
        assert_eq!(
            expand_braces("data/shard.tar").unwrap(),
            vec!["data/shard.tar"]
        );
    }

    #[test]
    fn expand_rejects_bad_patterns() {
        let cases = [
            "shard-{000..009.tar",
            "shard-000..009}.tar",
            "shard-{009..000}.tar",
            "shard-{a..z}.tar",
            "shard-{000}.tar",
            "shard-{{0..1}}.tar",
            "shard-{0..99999999999}.tar",
            "{0..999}{0..999}{0..9}",
        ];
        for case in cases {
            assert!(expand_braces(case).is_err(), "accepted {case:?}");
        }
    }
}
