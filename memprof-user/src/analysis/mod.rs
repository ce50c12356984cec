//! Leak analytics: per-site tracking, growth over time, per-stack behaviour, categories,
//! recommendations, process memory beside the traced bytes, and the diff of two reports.
//!
//! Everything here is pure (no I/O): the session feeds the table's changes and samples in, and
//! reports read verdicts, summaries, categories and recommendations out.
//!
//! - [`tracking`]: the state kept while tracing, fed by the table's changes: per call-site
//!   behaviour and series, the process's series, phases.
//! - [`series`]: bounded time series and their least-squares lines.
//! - [`growth`]: a group's verdict from the series of its outstanding bytes
//!   (`leak`, `growing`, `stable`, `churn`, `unknown`), plus the projection to a limit.
//! - [`peak`]: what each site held at the heap's peak (the trace's, a process's, a phase's),
//!   kept as the changes come.
//! - [`estimate`]: confidence intervals of sampled estimates.
//! - [`behaviour`]: per-group counts, size and lifetime histograms, realloc chains.
//! - [`categories`]: outstanding memory summed by user rule or by module.
//! - [`recommend`]: advice that quotes the measurements it rests on.
//! - [`memory`]: resident memory no traced allocation accounts for.
//! - [`rss`]: RSS explained: live, retained by the allocator, untouched, other.
//! - [`diff`]: what changed between two saved reports, site by site.
//! - [`trend`]: each call site's outstanding bytes over a series of saved reports.
//! - [`process_sites`]: each process's allocations by call-site group, capped, for the live
//!   profiles.
//! - [`pyphases`]: phases named by Python function, and which frames are those functions.

pub mod behaviour;
pub mod categories;
pub mod diff;
pub mod estimate;
pub mod growth;
pub mod memory;
pub mod peak;
pub mod process_sites;
pub mod pyphases;
pub mod recommend;
pub mod rss;
pub mod series;
pub mod tracking;
pub mod trend;

pub use behaviour::{BehaviourSummary, Log2Hist, SizeBucket, StackStats};
pub use categories::{Category, GroupRef, Rule, categorize, parse_rule_spec};
pub use growth::{Activity, Growth, Verdict, classify, projection_hours};
pub use recommend::{Recommendation, SiteFacts, recommend};
pub use series::{Fit, Series, least_squares};
