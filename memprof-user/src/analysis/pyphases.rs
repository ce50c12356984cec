//! Phases named by Python function (`--phase NAME=py:QUALNAME`): the name a user gives, and
//! whether a Python frame (its qualified name and file, as memprof reads them) is that
//! function.
//!
//! A name is a qualified name (`render`, `Builder.render`, `outer.<locals>.inner`), optionally
//! after its module (`ssg.build.Builder.render`). The module is matched against the frame's
//! file, the way Python names modules after files: `ssg.build` is `.../ssg/build.py` or
//! `.../ssg/build/__init__.py`. CPython 3.8 to 3.10 keep only the function's own name in its
//! code object; for them the qualified name is read from the source file's indentation
//! ([`qualname_from_source`]).

/// A Python function a phase is named after.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PyPattern {
    /// The name as given, after `py:`.
    pub name: String,
    parts: Vec<String>,
}

impl PyPattern {
    /// Parses the part of a `--phase` spec after `py:`; the error says what is wrong with it.
    pub fn parse(name: &str) -> Result<Self, String> {
        let example = "write py:QUALNAME, e.g. py:render, py:Builder.render or \
                       py:ssg.build.Builder.render";
        if name.is_empty() {
            return Err(format!("no Python function name after py: ({example})"));
        }
        let parts: Vec<String> = name.split('.').map(str::to_string).collect();
        if let Some(bad) = parts.iter().find(|p| !is_name_part(p)) {
            let what = if bad.is_empty() {
                "an empty part".to_string()
            } else {
                format!("{bad:?}")
            };
            return Err(format!(
                "{name:?} is not a Python qualified name: it has {what} ({example})"
            ));
        }
        Ok(Self {
            name: name.to_string(),
            parts,
        })
    }

    /// Whether matching needs more than a function's own name: the name has a class, an
    /// enclosing function or a module before it.
    pub fn dotted(&self) -> bool {
        self.parts.len() > 1
    }

    /// The function's own name: the last part.
    pub fn function(&self) -> &str {
        self.parts.last().map_or("", String::as_str)
    }

    /// Whether a frame running `qualname` (the code object's qualified name) from `file` is
    /// this function.
    pub fn matches(&self, qualname: &str, file: &str) -> bool {
        (0..self.parts.len()).any(|k| {
            let (module, qual) = self.parts.split_at(k);
            joined_eq(qual, qualname) && (module.is_empty() || module_is_file(module, file))
        })
    }
}

/// A part of a qualified name: an identifier, or a `<...>` name CPython gives (`<locals>`,
/// `<lambda>`, `<genexpr>`).
fn is_name_part(p: &str) -> bool {
    let ident = |s: &str| {
        let mut chars = s.chars();
        chars.next().is_some_and(|c| c == '_' || c.is_alphabetic())
            && chars.all(|c| c == '_' || c.is_alphanumeric())
    };
    match p.strip_prefix('<').and_then(|p| p.strip_suffix('>')) {
        Some(inner) => ident(inner),
        None => ident(p),
    }
}

/// Whether `parts` joined by dots is `s`.
fn joined_eq(parts: &[String], s: &str) -> bool {
    let mut rest = s;
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            let Some(r) = rest.strip_prefix('.') else {
                return false;
            };
            rest = r;
        }
        let Some(r) = rest.strip_prefix(p.as_str()) else {
            return false;
        };
        rest = r;
    }
    rest.is_empty()
}

/// Whether module `module` (its dotted parts) is the file `file`: `a.b` is `.../a/b.py` or
/// `.../a/b/__init__.py` (or the same without a directory, for a relative path).
fn module_is_file(module: &[String], file: &str) -> bool {
    let Some(stem) = file.strip_suffix(".py") else {
        return false;
    };
    let ends_with = |path: &str| {
        let mut comps = path.rsplit('/');
        module
            .iter()
            .rev()
            .all(|m| comps.next() == Some(m.as_str()))
    };
    ends_with(stem) || stem.strip_suffix("/__init__").is_some_and(ends_with)
}

/// The qualified name of function `name` whose code runs line `line` (1-based) of `source`,
/// from the indentation of the lines above it: the nearest enclosing `def name` and, outside
/// it, each enclosing `class C` (`C.name`) and `def f` (`f.<locals>.name`). Lines inside
/// triple-quoted strings are skipped. `None` when the lines do not show it plainly (no such
/// `def` encloses the line, or the name is CPython's own, such as `<lambda>`).
pub fn qualname_from_source(source: &str, line: u32, name: &str) -> Option<String> {
    let lines: Vec<&str> = source.lines().collect();
    let continued = continued(&lines);
    let code = |j: usize| {
        let l = lines[j];
        let t = l.trim_start();
        (!continued[j] && !t.is_empty() && !t.starts_with('#')).then(|| (indent(l), t))
    };
    let start = (line as usize)
        .checked_sub(1)
        .filter(|&i| i < lines.len())?;
    // The executing line, or the last line of code at or above it.
    let (mut at, (mut cur, text)) = (0..=start).rev().find_map(|j| code(j).map(|c| (j, c)))?;
    if header(text) != Some(("def", name)) {
        // Out through the enclosing blocks to the first `def` or `class`: it must be `name`.
        loop {
            let (j, (d, t)) = (0..at)
                .rev()
                .find_map(|j| code(j).filter(|(d, _)| *d < cur).map(|c| (j, c)))?;
            (at, cur) = (j, d);
            match header(t) {
                Some((_, n)) if n == name => break,
                Some(_) => return None,
                None if d == 0 => return None,
                None => {}
            }
        }
    }
    let mut parts = vec![name.to_string()];
    while cur > 0 {
        let Some((j, (d, t))) = (0..at)
            .rev()
            .find_map(|j| code(j).filter(|(d, _)| *d < cur).map(|c| (j, c)))
        else {
            break;
        };
        (at, cur) = (j, d);
        match header(t) {
            Some(("class", n)) => parts.push(n.to_string()),
            Some((_, n)) => {
                parts.push("<locals>".to_string());
                parts.push(n.to_string());
            }
            None => {}
        }
    }
    parts.reverse();
    Some(parts.join("."))
}

/// Columns of a line's indentation (a tab moves to the next multiple of 8, as in CPython).
fn indent(line: &str) -> usize {
    let mut col = 0;
    for c in line.chars() {
        match c {
            ' ' => col += 1,
            '\t' => col = (col / 8 + 1) * 8,
            '\x0c' => col = 0,
            _ => break,
        }
    }
    col
}

/// `("def", name)` or `("class", name)` for a line (already trimmed) that starts one.
fn header(t: &str) -> Option<(&'static str, &str)> {
    let t = t.strip_prefix("async ").map_or(t, str::trim_start);
    let (kw, rest) = if let Some(r) = t.strip_prefix("def ") {
        ("def", r)
    } else {
        ("class", t.strip_prefix("class ")?)
    };
    let rest = rest.trim_start();
    let end = rest
        .find(|c: char| !(c == '_' || c.is_alphanumeric()))
        .unwrap_or(rest.len());
    (end > 0).then(|| (kw, &rest[..end]))
}

/// For each line, whether it continues a statement begun above: it starts inside a
/// triple-quoted string or brackets, or follows a line ending in a backslash.
fn continued(lines: &[&str]) -> Vec<bool> {
    let mut out = Vec::with_capacity(lines.len());
    let mut open: Option<&str> = None;
    let mut depth = 0usize;
    let mut backslash = false;
    for line in lines {
        out.push(open.is_some() || depth > 0 || backslash);
        backslash = false;
        let mut rest = *line;
        while !rest.is_empty() {
            if let Some(delim) = open {
                match rest.find(delim) {
                    Some(i) => {
                        rest = &rest[i + 3..];
                        open = None;
                    }
                    None => break,
                }
                continue;
            }
            // Outside a string: the first bracket, comment, quote or line-ending backslash.
            let Some(i) = rest.find(['#', '"', '\'', '(', '[', '{', ')', ']', '}', '\\']) else {
                break;
            };
            let r = &rest[i..];
            match r.as_bytes()[0] {
                b'#' => break,
                b'(' | b'[' | b'{' => depth += 1,
                b')' | b']' | b'}' => depth = depth.saturating_sub(1),
                b'\\' => backslash = r.len() == 1,
                _ if r.starts_with("\"\"\"") || r.starts_with("'''") => {
                    open = Some(&r[..3]);
                    rest = &r[3..];
                    continue;
                }
                _ => {
                    // A one-line string: to its closing quote (escapes skipped), or the end.
                    let q = &r[..1];
                    let mut chars = r[1..].char_indices();
                    let mut end = r.len();
                    while let Some((k, c)) = chars.next() {
                        if c == '\\' {
                            chars.next();
                        } else if r[1 + k..].starts_with(q) {
                            end = 1 + k + 1;
                            break;
                        }
                    }
                    rest = &r[end..];
                    continue;
                }
            }
            rest = &r[1..];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_or_say_why_not() {
        for good in [
            "render",
            "Builder.render",
            "ssg.build.Builder.render",
            "outer.<locals>.inner",
            "_private",
            "café",
        ] {
            assert!(PyPattern::parse(good).is_ok(), "{good}");
        }
        assert_eq!(
            PyPattern::parse("").unwrap_err(),
            "no Python function name after py: (write py:QUALNAME, e.g. py:render, \
             py:Builder.render or py:ssg.build.Builder.render)"
        );
        for (bad, what) in [
            ("a..b", "an empty part"),
            ("render.", "an empty part"),
            ("9lives", "\"9lives\""),
            ("ren der", "\"ren der\""),
            ("a.b(c)", "\"b(c)\""),
            ("<>", "\"<>\""),
        ] {
            let err = PyPattern::parse(bad).unwrap_err();
            assert!(
                err.starts_with(&format!(
                    "{bad:?} is not a Python qualified name: it has {what} ("
                )),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn bare_and_module_qualified_names_match_frames() {
        let p = |s| PyPattern::parse(s).unwrap();
        let file = "/srv/site/ssg/build.py";
        assert!(p("render").matches("render", file));
        assert!(!p("render").matches("Builder.render", file));
        assert!(p("Builder.render").matches("Builder.render", file));
        assert!(p("build.Builder.render").matches("Builder.render", file));
        assert!(p("ssg.build.Builder.render").matches("Builder.render", file));
        assert!(p("ssg.build.render").matches("render", file));
        assert!(!p("other.Builder.render").matches("Builder.render", file));
        assert!(!p("site.build.render").matches("render", file), "site/ssg");
        assert!(
            !p("uild.render").matches("render", file),
            "whole components"
        );
        assert!(p("ssg.render").matches("render", "/srv/site/ssg/__init__.py"));
        assert!(
            p("build.render").matches("render", "build.py"),
            "a relative path"
        );
        assert!(!p("build.render").matches("render", "<string>"));
        assert!(p("f.<locals>.g").matches("f.<locals>.g", file));
        assert!(p("render").matches("render", "<frozen runpy>"));
        assert!(!p("render").dotted() && p("a.render").dotted());
        assert_eq!(p("ssg.Builder.render").function(), "render");
    }

    const SOURCE: &str = r#"import os

class Builder:
    """Builds.

def fake(): not a def: inside a docstring
"""

    @staticmethod
    def render(self, x):
        if x:
            y = [i for i in x]
            return os.path.join(
  "a", "b")  # a continuation line less indented than the block
        return None

    class Inner:
        async def run(self):
            pass

def outer():
    def inner():
        return 1
    return inner()

def one(): return 2
"#;

    #[test]
    fn qualnames_from_indentation() {
        let q = |line, name| qualname_from_source(SOURCE, line, name);
        assert_eq!(q(12, "render").as_deref(), Some("Builder.render"));
        assert_eq!(q(11, "render").as_deref(), Some("Builder.render"));
        assert_eq!(q(15, "render").as_deref(), Some("Builder.render"));
        assert_eq!(q(19, "run").as_deref(), Some("Builder.Inner.run"));
        assert_eq!(q(23, "inner").as_deref(), Some("outer.<locals>.inner"));
        assert_eq!(q(24, "outer").as_deref(), Some("outer"));
        assert_eq!(q(26, "one").as_deref(), Some("one"));
        assert_eq!(q(12, "other"), None, "the enclosing def is render");
        assert_eq!(q(12, "<listcomp>"), None);
        assert_eq!(q(1, "render"), None, "module level");
        assert_eq!(q(99, "render"), None, "past the end");
        assert_eq!(q(0, "render"), None);
    }
}
