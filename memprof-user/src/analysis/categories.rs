//! Categories of outstanding memory: call-stack groups summed by user rule or, failing that, by
//! module.
//!
//! A group belongs to the first rule (in the order given) whose matcher accepts the function or
//! the module of any of its frames. A group matching no rule belongs to its module: the basename
//! of the module of its innermost frame that has one, or `[unknown]` when no frame has a module.
//!
//! Matching is a plain `Fn(&str) -> bool`, so this module needs no regex engine; the caller builds
//! matchers from the patterns [`parse_rule_spec`] returns.

use std::collections::HashMap;

use serde::Serialize;

/// The category of groups with no module in any frame.
pub const UNKNOWN_MODULE: &str = "[unknown]";

/// A user rule `NAME=PATTERN`, with the pattern already turned into a matcher.
pub struct Rule {
    pub name: String,
    pub matcher: Box<dyn Fn(&str) -> bool + Send + Sync>,
}

impl Rule {
    pub fn new(
        name: impl Into<String>,
        matcher: impl Fn(&str) -> bool + Send + Sync + 'static,
    ) -> Self {
        Self {
            name: name.into(),
            matcher: Box::new(matcher),
        }
    }

    /// Whether any frame's function or module matches.
    pub fn matches(&self, frames: &[(Option<&str>, Option<&str>)]) -> bool {
        frames
            .iter()
            .flat_map(|&(function, module)| [function, module])
            .flatten()
            .any(|s| (self.matcher)(s))
    }
}

impl std::fmt::Debug for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rule")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// One leak group as categorization sees it.
#[derive(Clone, Debug, Default)]
pub struct GroupRef<'a> {
    pub bytes: u64,
    pub allocs: u64,
    /// Innermost first: (function, module path).
    pub frames: Vec<(Option<&'a str>, Option<&'a str>)>,
}

/// Outstanding memory of one category.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Category {
    pub name: String,
    /// `"rule"` or `"module"`.
    pub by: &'static str,
    pub bytes: u64,
    pub allocs: u64,
    pub groups: u64,
}

/// The module category of `frames`: basename of the innermost frame's module that exists.
pub fn module_category<'a>(frames: &[(Option<&'a str>, Option<&'a str>)]) -> &'a str {
    frames
        .iter()
        .find_map(|&(_, module)| module)
        .map(|m| m.rsplit('/').next().unwrap_or(m))
        .filter(|m| !m.is_empty())
        .unwrap_or(UNKNOWN_MODULE)
}

/// Sums `groups` by category (see the module doc); sorted by bytes descending, then name, then
/// `by`. A rule and a module of the same name stay separate categories.
pub fn categorize(groups: &[GroupRef<'_>], rules: &[Rule]) -> Vec<Category> {
    let mut sums: HashMap<(&str, &'static str), Category> = HashMap::new();
    for g in groups {
        let key = match rules.iter().find(|r| r.matches(&g.frames)) {
            Some(rule) => (rule.name.as_str(), "rule"),
            None => (module_category(&g.frames), "module"),
        };
        let c = sums.entry(key).or_insert_with(|| Category {
            name: key.0.to_string(),
            by: key.1,
            bytes: 0,
            allocs: 0,
            groups: 0,
        });
        c.bytes += g.bytes;
        c.allocs += g.allocs;
        c.groups += 1;
    }
    let mut out: Vec<Category> = sums.into_values().collect();
    out.sort_by(|a, b| {
        b.bytes
            .cmp(&a.bytes)
            .then_with(|| a.name.cmp(&b.name))
            .then_with(|| a.by.cmp(b.by))
    });
    out
}

/// Splits a rule spec `NAME=PATTERN` at its first `=` (the pattern may contain more). Both sides
/// are trimmed; errors on a missing `=`, an empty name or an empty pattern.
pub fn parse_rule_spec(spec: &str) -> Result<(String, String), String> {
    let Some((name, pattern)) = spec.split_once('=') else {
        return Err(format!("category rule {spec:?} is not NAME=REGEX"));
    };
    let (name, pattern) = (name.trim(), pattern.trim());
    if name.is_empty() {
        return Err(format!("category rule {spec:?} has an empty name"));
    }
    if pattern.is_empty() {
        return Err(format!("category rule {spec:?} has an empty pattern"));
    }
    Ok((name.to_string(), pattern.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group<'a>(
        bytes: u64,
        allocs: u64,
        frames: &[(Option<&'a str>, Option<&'a str>)],
    ) -> GroupRef<'a> {
        GroupRef {
            bytes,
            allocs,
            frames: frames.to_vec(),
        }
    }

    #[test]
    fn by_module_of_innermost_frame_with_one() {
        let groups = [
            group(
                100,
                1,
                &[
                    (Some("parse"), Some("/usr/bin/app")),
                    (Some("main"), Some("/usr/bin/app")),
                ],
            ),
            group(
                50,
                2,
                &[
                    (None, None),
                    (Some("png_read"), Some("/usr/lib/libpng.so.16")),
                    (Some("main"), Some("/usr/bin/app")),
                ],
            ),
            group(30, 3, &[(Some("x"), Some("/usr/bin/app"))]),
            group(7, 1, &[(None, None)]),
            group(5, 1, &[]),
        ];
        let cats = categorize(&groups, &[]);
        let got: Vec<_> = cats
            .iter()
            .map(|c| (c.name.as_str(), c.by, c.bytes, c.allocs, c.groups))
            .collect();
        assert_eq!(
            got,
            vec![
                ("app", "module", 130, 4, 2),
                ("libpng.so.16", "module", 50, 2, 1),
                ("[unknown]", "module", 12, 2, 2),
            ]
        );
    }

    #[test]
    fn first_matching_rule_wins_and_others_fall_back_to_module() {
        let rules = [
            Rule::new("cache", |s: &str| s.contains("cache")),
            Rule::new("png", |s: &str| {
                s.starts_with("png_") || s.contains("libpng")
            }),
        ];
        let groups = [
            // Matches both rules (cache in an outer frame): the first rule wins.
            group(
                400,
                4,
                &[
                    (Some("png_read"), Some("/lib/libpng.so")),
                    (Some("cache_put"), Some("/bin/app")),
                ],
            ),
            // Matches "png" by module only.
            group(300, 3, &[(None, Some("/lib/libpng.so"))]),
            // Matches nothing: its module.
            group(200, 2, &[(Some("main"), Some("/bin/app"))]),
            group(100, 1, &[(Some("lru_cache_grow"), None)]),
        ];
        let cats = categorize(&groups, &rules);
        assert_eq!(
            cats,
            vec![
                Category {
                    name: "cache".into(),
                    by: "rule",
                    bytes: 500,
                    allocs: 5,
                    groups: 2
                },
                Category {
                    name: "png".into(),
                    by: "rule",
                    bytes: 300,
                    allocs: 3,
                    groups: 1
                },
                Category {
                    name: "app".into(),
                    by: "module",
                    bytes: 200,
                    allocs: 2,
                    groups: 1
                },
            ]
        );
    }

    #[test]
    fn ties_sort_by_name_and_rule_and_module_of_same_name_stay_apart() {
        let rules = [Rule::new("app", |s: &str| s == "special")];
        let groups = [
            group(10, 1, &[(Some("f"), Some("/b/zeta"))]),
            group(10, 1, &[(Some("special"), Some("/b/app"))]),
            group(10, 1, &[(Some("g"), Some("/b/app"))]),
            group(10, 1, &[(Some("h"), Some("/b/alpha"))]),
        ];
        let got: Vec<_> = categorize(&groups, &rules)
            .into_iter()
            .map(|c| (c.name, c.by))
            .collect();
        assert_eq!(
            got,
            vec![
                ("alpha".to_string(), "module"),
                ("app".to_string(), "module"),
                ("app".to_string(), "rule"),
                ("zeta".to_string(), "module"),
            ]
        );
    }

    #[test]
    fn rule_specs() {
        assert_eq!(
            parse_rule_spec("cache=lru_.*"),
            Ok(("cache".into(), "lru_.*".into()))
        );
        assert_eq!(
            parse_rule_spec(" io = a=b "),
            Ok(("io".into(), "a=b".into())),
            "split at the first '='"
        );
        assert!(parse_rule_spec("cache").unwrap_err().contains("NAME=REGEX"));
        assert!(parse_rule_spec("=x").unwrap_err().contains("empty name"));
        assert!(parse_rule_spec("x=").unwrap_err().contains("empty pattern"));
    }

    #[test]
    fn category_json() {
        let c = Category {
            name: "app".into(),
            by: "module",
            bytes: 1,
            allocs: 2,
            groups: 3,
        };
        assert_eq!(
            serde_json::to_string(&c).unwrap(),
            r#"{"name":"app","by":"module","bytes":1,"allocs":2,"groups":3}"#
        );
    }
}
