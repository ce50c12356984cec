//! memprof: traces the memory allocations of a Linux process with eBPF.
//!
//! One pipeline, one layer per module, each importing only the layers listed before it
//! (`layers` checks this; docs/design/pipeline.md follows one event through them):
//!
//! - [`sys`]: the host and its processes as files: `/proc`, ELF files, the clock, spawning.
//! - [`probe`]: what to attach and where (allocator detection, probe placement), loading and
//!   attaching the kernel programs, reading their maps. The only code that touches aya.
//! - [`ingest`]: what the kernel hands over: versioned records decoded with length checks,
//!   mapping records, time marks.
//! - [`stacks`]: stacks: the store of raw frames, unwinding copies, Python frames, names.
//! - [`table`]: the live-allocation table of each process and its totals.
//! - [`analysis`]: per-site tracking, growth and verdicts, behaviour, categories,
//!   recommendations, report diffs: pure, no I/O.
//! - [`report`]: the report model and the one place that names frames and formats bytes.
//! - [`output`]: one module per format (text, JSON, pprof, folded, flamegraph, DHAT, CSV, HTML).
//! - [`serve`]: the HTTP endpoints served while tracing (Prometheus metrics, live dashboard).
//! - [`session`]: the loop that wires them together for one trace.
//! - [`cli`]: the command line.

pub mod sys;

pub mod probe;

pub mod ingest;

pub mod stacks;

pub mod table;

pub mod analysis;

pub mod report;

pub mod output;

pub mod serve;

pub mod session;

pub mod cli;

#[cfg(test)]
mod layers;

#[cfg(test)]
mod fuzz;
