//! Text from traced processes (function and file names, command lines, paths, process names)
//! made safe to print: control characters, escape sequences and other invisible bytes are
//! written as escapes, so nothing a target names can move a terminal's cursor, rewrite earlier
//! lines or hide itself, and overlong text is cut.

use std::borrow::Cow;

/// The longest name printed whole; longer ones are cut with a note of what was left out.
pub const MAX_NAME_CHARS: usize = 1024;

/// Whether `c` must be escaped: C0 and C1 controls (ESC, BEL, NUL, CR, ...), DEL, and the
/// invisible characters that reorder or hide text (bidirectional overrides, zero-width).
fn hostile(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
            | '\u{feff}')
}

/// `s` with every hostile character escaped (`\x1b`, `\u{202e}`); newlines and tabs too, so the
/// result is one line. Borrowed when nothing needed escaping.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(hostile) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if hostile(c) && (c as u32) < 0x100 => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c if hostile(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// [`escape`], cut to at most `max` characters of the original with `...(N more bytes)`.
pub fn escape_capped(s: &str, max: usize) -> Cow<'_, str> {
    match s.char_indices().nth(max) {
        None => escape(s),
        Some((cut, _)) => Cow::Owned(format!(
            "{}...({} more bytes)",
            escape(&s[..cut]),
            s.len() - cut
        )),
    }
}

/// The longest line of text output kept whole.
pub const MAX_LINE_CHARS: usize = 8192;

/// [`escape_capped`] for multi-line text that memprof wrote itself around names: newlines
/// stay, every other hostile character is escaped, each line is cut at [`MAX_LINE_CHARS`].
pub fn escape_lines(s: &str) -> Cow<'_, str> {
    let clean = |line: &str| !line.chars().any(hostile) && line.len() <= MAX_LINE_CHARS;
    if s.split('\n').all(clean) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for (i, line) in s.split('\n').enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&escape_capped(line, MAX_LINE_CHARS));
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_a_terminal_would_act_on() {
        assert_eq!(escape("plain µs name"), "plain µs name");
        assert!(matches!(escape("plain"), Cow::Borrowed(_)));
        assert_eq!(escape("a\x1b[2Jb"), "a\\x1b[2Jb");
        assert_eq!(escape("\0\0"), "\\x00\\x00");
        assert_eq!(escape("x\ny\tz\r"), "x\\ny\\tz\\r");
        assert_eq!(escape("\u{9b}31m"), "\\x9b31m");
        assert_eq!(escape("evil\u{202e}txt"), "evil\\u{202e}txt");
        assert_eq!(escape("\x7f"), "\\x7f");
    }

    #[test]
    fn caps_and_lines() {
        assert_eq!(escape_capped("abcdef", 3), "abc...(3 more bytes)");
        assert_eq!(escape_capped("abc", 3), "abc");
        let nul = "\0".repeat(751_833);
        let cut = escape_capped(&nul, MAX_NAME_CHARS);
        assert!(cut.len() < 5 * MAX_NAME_CHARS, "{}", cut.len());
        assert!(cut.ends_with("...(750809 more bytes)"));
        assert_eq!(escape_lines("a\x1b\nb\n"), "a\\x1b\nb\n");
        let long = format!("x\n{}\ny", "\0".repeat(751_833));
        let cut = escape_lines(&long);
        assert!(
            cut.starts_with("x\n\\x00") && cut.ends_with(" more bytes)\ny"),
            "{cut:.40}"
        );
        assert!(cut.len() < 5 * MAX_LINE_CHARS);
    }
}
