//! The WGSL sources and the small templating step that makes their variants.
//!
//! Every kernel family is one file in the workspace's `shaders/` folder.
//! A file may contain these directives, each alone on its line:
//!
//! - `#if NAME` / `#if !NAME`, `#else`, `#endif`: keep lines only when the
//!   flag `NAME` is (or is not) set. Blocks nest.
//! - `#include "file.wgsl"`: paste another file of the folder here.
//! - `#for NAME in 0..BOUND` … `#endfor`: repeat the lines once per value
//!   of `NAME` from 0 to BOUND − 1, replacing `{NAME}` with the value.
//!   BOUND is a number or one of the value constants below. This unrolls
//!   register tiles, whose private arrays some compilers (llvmpipe) would
//!   otherwise keep in memory. Inside the block, `{EXPR}` is replaced with
//!   the value of an integer expression over loop variables, value
//!   constants and numbers with `+ - * / %` and parentheses, such as
//!   `{(4*Q+E)%WG}`. Braces holding anything else are left as they are.
//!
//! After expansion every `enable …;` line moves to the top (WGSL requires
//! them before any declaration), followed by one `const NAME: u32 = V;` per
//! value constant the host passes. Everything else that varies at run time
//! without changing types (tile sizes, activation kinds) is an `override`
//! constant set at pipeline creation.
//!
//! This file depends on nothing else in the crate, so the naga validation
//! test includes it directly and validates every variant the backend can
//! build.

/// One WGSL file and the value constants it needs, with the defaults the
/// validation test uses.
pub struct ShaderFile {
    pub name: &'static str,
    pub source: &'static str,
    pub consts: &'static [(&'static str, u32)],
    /// Whether the file is only pasted into others and has no entry points.
    pub library: bool,
    /// Pairs (A, B): flag A may only be set together with flag B.
    pub requires: &'static [(&'static str, &'static str)],
}

macro_rules! shader {
    ($name:literal, $consts:expr, $library:expr) => {
        shader!($name, $consts, $library, &[])
    };
    ($name:literal, $consts:expr, $library:expr, $requires:expr) => {
        ShaderFile {
            name: $name,
            source: include_str!(concat!("../../../shaders/", $name)),
            consts: $consts,
            library: $library,
            requires: $requires,
        }
    };
}

/// Every WGSL file of the workspace's `shaders/` folder.
pub const SHADER_FILES: &[ShaderFile] = &[
    shader!("activation.wgsl", &[], true),
    shader!("reduce_workgroup.wgsl", &[], true),
    shader!("f16_bits.wgsl", &[], true),
    shader!("elementwise.wgsl", &[], false),
    shader!("reduce.wgsl", &[], false),
    shader!(
        "matmul.wgsl",
        &[
            ("THREAD_M", 4),
            ("THREAD_N", 4),
            ("THREAD_NQ", 1),
            ("THREAD_MQ", 1),
            ("TILE_M", 64),
            ("TILE_N", 64),
            ("TILE_K", 16),
            ("BROADCAST_LANES", 4),
            ("BROADCAST_STEPS", 1)
        ],
        false,
        &[("TEXTURE", "VEC4"), ("BROADCAST", "SUBGROUPS")]
    ),
    shader!("softmax.wgsl", &[], false),
    shader!("norm.wgsl", &[], false),
    shader!("attention.wgsl", &[("HEAD_DIM", 64), ("VALUE_DIM", 64)], false),
    shader!("embedding.wgsl", &[], false),
    shader!("rope.wgsl", &[], false),
    shader!("cross_entropy.wgsl", &[], false),
    shader!("adamw.wgsl", &[], false),
    shader!("conv.wgsl", &[], false),
    shader!("shape.wgsl", &[], false),
    shader!("dequantize.wgsl", &[], false),
];

/// Looks up a file of [`SHADER_FILES`] by name.
pub fn shader_file(name: &str) -> Option<&'static ShaderFile> {
    SHADER_FILES.iter().find(|file| file.name == name)
}

/// Expands the directives of `name` for the set `flags`, then prepends the
/// hoisted `enable` lines and the value constants.
pub fn expand(name: &str, flags: &[&str], consts: &[(&str, u32)]) -> Result<String, String> {
    if let Some(file) = shader_file(name) {
        for &(flag, needed) in file.requires {
            if flags.contains(&flag) && !flags.contains(&needed) {
                return Err(format!("{name}: flag {flag} needs flag {needed}"));
            }
        }
    }
    let mut included = String::new();
    expand_into(name, flags, &mut included, 0)?;
    let lines: Vec<&str> = included.lines().collect();
    let mut body = String::new();
    unroll(name, &lines, consts, &[], &mut body)?;

    let mut enables: Vec<&str> = Vec::new();
    let mut rest = String::new();
    for line in body.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with("enable ") {
            if !enables.contains(&trimmed) {
                enables.push(trimmed);
            }
        } else {
            rest.push_str(line);
            rest.push('\n');
        }
    }

    let mut out = String::new();
    for enable in enables {
        out.push_str(enable);
        out.push('\n');
    }
    for (const_name, value) in consts {
        out.push_str(&format!("const {const_name}: u32 = {value}u;\n"));
    }
    out.push_str(&rest);
    Ok(out)
}

fn expand_into(name: &str, flags: &[&str], out: &mut String, depth: usize) -> Result<(), String> {
    if depth > 8 {
        return Err(format!("{name}: #include nests deeper than 8 files"));
    }
    let file = shader_file(name).ok_or_else(|| format!("no shader file named {name}"))?;

    // One entry per open `#if`: (this branch is kept, the enclosing block is kept).
    let mut stack: Vec<(bool, bool)> = Vec::new();
    let kept = |stack: &[(bool, bool)]| stack.last().is_none_or(|&(this, outer)| this && outer);

    for (number, line) in file.source.lines().enumerate() {
        let trimmed = line.trim();
        let location = || format!("{name}:{}", number + 1);
        if let Some(condition) = trimmed.strip_prefix("#if ") {
            let condition = condition.trim();
            let value = match condition.strip_prefix('!') {
                Some(flag) => !flags.contains(&flag.trim()),
                None => flags.contains(&condition),
            };
            let outer = kept(&stack);
            stack.push((value, outer));
        } else if trimmed == "#else" {
            let top = stack.last_mut().ok_or_else(|| format!("{}: #else without #if", location()))?;
            top.0 = !top.0;
        } else if trimmed == "#endif" {
            stack.pop().ok_or_else(|| format!("{}: #endif without #if", location()))?;
        } else if let Some(included) = trimmed.strip_prefix("#include ") {
            if kept(&stack) {
                let included = included.trim().trim_matches('"');
                expand_into(included, flags, out, depth + 1)?;
            }
        } else if trimmed.starts_with("#for ") || trimmed == "#endfor" {
            if kept(&stack) {
                out.push_str(line);
                out.push('\n');
            }
        } else if trimmed.starts_with('#') {
            return Err(format!("{}: unknown directive `{trimmed}`", location()));
        } else if kept(&stack) {
            out.push_str(line);
            out.push('\n');
        }
    }
    if !stack.is_empty() {
        return Err(format!("{name}: {} #if block(s) are not closed", stack.len()));
    }
    Ok(())
}

/// Expands `#for` blocks of `lines` into `out`, substituting the loop
/// variables of enclosing blocks (`bound`).
fn unroll(name: &str, lines: &[&str], consts: &[(&str, u32)], bound: &[(String, u32)], out: &mut String) -> Result<(), String> {
    let mut index = 0;
    while index < lines.len() {
        let trimmed = lines[index].trim();
        if let Some(header) = trimmed.strip_prefix("#for ") {
            let (variable, range) = header
                .split_once(" in ")
                .ok_or_else(|| format!("{name}: `#for {header}` is not `#for NAME in 0..BOUND`"))?;
            let limit = range
                .trim()
                .strip_prefix("0..")
                .ok_or_else(|| format!("{name}: `#for {header}` must count from 0"))?
                .trim();
            let count = match limit.parse::<u32>() {
                Ok(count) => count,
                Err(_) => consts
                    .iter()
                    .find(|(const_name, _)| *const_name == limit)
                    .map(|&(_, value)| value)
                    .ok_or_else(|| format!("{name}: `#for` bound {limit} is neither a number nor a value constant"))?,
            };

            // Find the matching #endfor.
            let mut depth = 1;
            let mut end = index + 1;
            while end < lines.len() {
                let inner = lines[end].trim();
                if inner.starts_with("#for ") {
                    depth += 1;
                } else if inner == "#endfor" {
                    depth -= 1;
                    if depth == 0 {
                        break;
                    }
                }
                end += 1;
            }
            if end == lines.len() {
                return Err(format!("{name}: `#for {header}` has no #endfor"));
            }
            for value in 0..count {
                let mut inner_bound = bound.to_vec();
                inner_bound.push((variable.trim().to_string(), value));
                unroll(name, &lines[index + 1..end], consts, &inner_bound, out)?;
            }
            index = end + 1;
            continue;
        }
        if trimmed == "#endfor" {
            return Err(format!("{name}: #endfor without #for"));
        }
        let line = if bound.is_empty() { lines[index].to_string() } else { substitute(lines[index], consts, bound) };
        out.push_str(&line);
        out.push('\n');
        index += 1;
    }
    Ok(())
}

/// Replaces each `{EXPR}` of `line` whose expression evaluates with the
/// loop variables `bound` and the value constants.
pub fn substitute(line: &str, consts: &[(&str, u32)], bound: &[(String, u32)]) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let value = after.find('}').and_then(|close| {
            let lookup = |name: &str| {
                bound
                    .iter()
                    .rev()
                    .find(|(variable, _)| variable == name)
                    .map(|&(_, value)| i64::from(value))
                    .or_else(|| consts.iter().find(|(constant, _)| *constant == name).map(|&(_, value)| i64::from(value)))
            };
            Expression { text: &after.as_bytes()[..close], at: 0, lookup: &lookup }.evaluate().map(|value| (value, close))
        });
        match value {
            Some((value, close)) => {
                out.push_str(&value.to_string());
                rest = &after[close + 1..];
            }
            None => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// A recursive-descent reader of the integer expressions in `{…}`.
struct Expression<'a> {
    text: &'a [u8],
    at: usize,
    lookup: &'a dyn Fn(&str) -> Option<i64>,
}

impl Expression<'_> {
    /// Returns the value of the whole text, or `None` if it is not an expression.
    fn evaluate(mut self) -> Option<i64> {
        let value = self.sum()?;
        (self.at == self.text.len()).then_some(value)
    }

    fn peek(&self) -> Option<u8> {
        self.text.get(self.at).copied()
    }

    fn sum(&mut self) -> Option<i64> {
        let mut value = self.product()?;
        while let Some(operator @ (b'+' | b'-')) = self.peek() {
            self.at += 1;
            let right = self.product()?;
            value = if operator == b'+' { value + right } else { value - right };
        }
        Some(value)
    }

    fn product(&mut self) -> Option<i64> {
        let mut value = self.atom()?;
        while let Some(operator @ (b'*' | b'/' | b'%')) = self.peek() {
            self.at += 1;
            let right = self.atom()?;
            value = match operator {
                b'*' => value * right,
                b'/' => value.checked_div(right)?,
                _ => value.checked_rem(right)?,
            };
        }
        Some(value)
    }

    fn atom(&mut self) -> Option<i64> {
        if self.peek()? == b'(' {
            self.at += 1;
            let value = self.sum()?;
            if self.peek()? != b')' {
                return None;
            }
            self.at += 1;
            return Some(value);
        }
        let start = self.at;
        while self.peek().is_some_and(|byte| byte.is_ascii_alphanumeric() || byte == b'_') {
            self.at += 1;
        }
        let word = std::str::from_utf8(&self.text[start..self.at]).ok()?;
        if word.is_empty() {
            return None;
        }
        match word.parse::<i64>() {
            Ok(number) => Some(number),
            Err(_) => (self.lookup)(word),
        }
    }
}

/// Lists the flags a file (with the files it includes) tests in `#if` lines.
pub fn flags_of(name: &str) -> Vec<String> {
    let mut flags = Vec::new();
    collect_flags(name, &mut flags, 0);
    flags.sort();
    flags.dedup();
    flags
}

fn collect_flags(name: &str, flags: &mut Vec<String>, depth: usize) {
    let Some(file) = shader_file(name) else { return };
    if depth > 8 {
        return;
    }
    for line in file.source.lines() {
        let trimmed = line.trim();
        if let Some(condition) = trimmed.strip_prefix("#if ") {
            flags.push(condition.trim().trim_start_matches('!').trim().to_string());
        } else if let Some(included) = trimmed.strip_prefix("#include ") {
            collect_flags(included.trim().trim_matches('"'), flags, depth + 1);
        }
    }
}

/// Expands every file for every subset of the flags it tests, returning
/// (file, flags, expanded source or template error).
pub fn all_variants() -> Vec<(&'static str, Vec<String>, Result<String, String>)> {
    let mut variants = Vec::new();
    for file in SHADER_FILES {
        let flags = flags_of(file.name);
        for mask in 0u32..(1 << flags.len()) {
            let set: Vec<String> = flags
                .iter()
                .enumerate()
                .filter(|(bit, _)| mask & (1 << bit) != 0)
                .map(|(_, flag)| flag.clone())
                .collect();
            let refs: Vec<&str> = set.iter().map(String::as_str).collect();
            if file.requires.iter().any(|&(flag, needed)| refs.contains(&flag) && !refs.contains(&needed)) {
                continue;
            }
            let source = expand(file.name, &refs, file.consts);
            variants.push((file.name, set, source));
        }
    }
    variants
}
