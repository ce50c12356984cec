//! What the integration test crates share: running processes (a child with its stdout and
//! stderr read line by line on their own threads, deadlines that kill the whole process group,
//! the finished process's output), running memprof, building fixtures, reading reports and
//! collecting checks. Included by each test crate with `mod common;`, or from a crate kept in a
//! directory with `#[path = "../common/mod.rs"] mod common;`.
#![allow(dead_code, reason = "each test crate uses a different part")]
#![allow(unused_imports, reason = "each test crate uses a different part")]

mod checks;
mod fixtures;
mod memprof;
mod process;
mod report;

pub(crate) use checks::*;
pub(crate) use fixtures::*;
pub(crate) use memprof::*;
pub(crate) use process::*;
pub(crate) use report::*;
