//! Leak analytics: growth over time, per-stack behaviour, categories, recommendations.
//!
//! Everything here is pure: the session feeds samples and events in, and reports read verdicts,
//! summaries, categories and recommendations out.
//!
//! - [`growth`]: the bounded time series of a group's outstanding bytes and its verdict
//!   (`leak`, `growing`, `stable`, `churn`, `unknown`), plus the projection to a limit.
//! - [`behaviour`]: per-group counts, size and lifetime histograms, realloc chains.
//! - [`categories`]: outstanding memory summed by user rule or by module.
//! - [`recommend`]: advice that quotes the measurements it rests on.

pub mod behaviour;
pub mod categories;
pub mod growth;
pub mod recommend;

pub use behaviour::{BehaviourSummary, Log2Hist, SizeBucket, StackStats};
pub use categories::{Category, GroupRef, Rule, categorize, parse_rule_spec};
pub use growth::{
    Activity, Fit, Growth, Series, Verdict, classify, least_squares, projection_hours,
};
pub use recommend::{Recommendation, SiteFacts, recommend};
