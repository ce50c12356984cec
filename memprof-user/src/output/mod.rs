//! Outputs for the tools people already run: each format is one module that turns a report or
//! a [`Profile`] into bytes: text ([`text`]) and NDJSON ([`json`]) for the report, and for the
//! profile pprof, folded stacks, flamegraphs, DHAT, CSV and HTML.
//!
//! A `Profile` is built once at the end of a trace (and for the live endpoints at each sample
//! tick) from the table, the analytics and the symbolizer; writers depend on `report` only and
//! never see aya or the kernel.

pub mod csv;
pub mod dhat;
pub mod file;
pub mod flamegraph;
pub mod folded;
pub mod html;
pub mod json;
pub mod pprof;
pub mod text;
pub mod trend;

use crate::report::Profile;

/// Files to write at the end of a trace (`--pprof`, `--folded`, ...).
#[derive(Clone, Debug, Default)]
pub struct OutputFiles {
    pub pprof: Option<std::path::PathBuf>,
    pub folded: Option<std::path::PathBuf>,
    pub flamegraph: Option<std::path::PathBuf>,
    pub dhat: Option<std::path::PathBuf>,
    pub csv: Option<std::path::PathBuf>,
    pub html: Option<std::path::PathBuf>,
}

impl OutputFiles {
    pub fn any(&self) -> bool {
        [
            &self.pprof,
            &self.folded,
            &self.flamegraph,
            &self.dhat,
            &self.csv,
            &self.html,
        ]
        .iter()
        .any(|f| f.is_some())
    }
}

/// Writes every requested file from `profile`: `--pprof` ([`pprof`]), `--folded` (`FILE` and
/// `FILE.alloc`, [`folded`]), `--flamegraph` (`FILE` and its `.alloc.svg` sibling), `--dhat`
/// ([`dhat`]), `--csv` ([`csv`]) and `--html` ([`html`]). Every file is attempted; the error
/// names each one that failed (`failed to write FILE: ...`). Files get permissions `mode` and
/// are written as [`file::write`] does (never through another user's link).
pub fn write_files(profile: &Profile, files: &OutputFiles, mode: u32) -> anyhow::Result<()> {
    use folded::Metric;
    use std::path::Path;

    let write = |path: &Path, bytes: anyhow::Result<Vec<u8>>| -> Result<(), String> {
        bytes
            .and_then(|b| file::write(path, &b, mode).map_err(anyhow::Error::from))
            .map_err(|e| format!("failed to write {}: {e:#}", path.display()))
    };
    let mut outcomes = Vec::new();
    if let Some(path) = &files.pprof {
        outcomes.push(write(path, pprof::render(profile)));
    }
    if let Some(path) = &files.folded {
        let text = |m| Ok(folded::render(profile, m).into_bytes());
        let alloc = folded::alloc_folded_path(path);
        outcomes.push(write(path, text(Metric::InUse)));
        outcomes.push(write(&alloc, text(Metric::Allocated)));
    }
    if let Some(path) = &files.flamegraph {
        let svg = |m| flamegraph::svg(profile, m, true).map(String::into_bytes);
        outcomes.push(write(path, svg(Metric::InUse)));
        outcomes.push(write(
            &flamegraph::alloc_svg_path(path),
            svg(Metric::Allocated),
        ));
    }
    if let Some(path) = &files.dhat {
        outcomes.push(write(path, dhat::render(profile)));
    }
    if let Some(path) = &files.csv {
        outcomes.push(write(path, Ok(csv::render(profile).into_bytes())));
    }
    if let Some(path) = &files.html {
        outcomes.push(write(path, html::render(profile).map(String::into_bytes)));
    }
    let errors: Vec<String> = outcomes.into_iter().filter_map(Result::err).collect();
    if errors.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("{}", errors.join("; "))
    }
}

/// `s` with `&`, `<`, `>`, `"` and `'` escaped, for text and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping() {
        assert_eq!(
            escape("<a href=\"x\">&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;&lt;/a&gt;"
        );
        assert_eq!(escape("plain µs"), "plain µs");
    }
}
