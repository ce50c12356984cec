//! memprof: traces the memory allocations of a Linux process with eBPF.
//!
//! Pipeline: kernel probes (`memprof-ebpf`) → ring buffer → [`event`] decoding → [`table`] of
//! live allocations → [`report`] → text or NDJSON. Everything below [`load`] and [`session`] is
//! free of aya types and testable without root.

pub mod allocators;
pub mod analysis;
pub mod cli;
pub mod diff;
pub mod event;
pub mod load;
pub mod maps;
pub mod marks;
pub mod mmaps;
pub mod output;
pub mod placement;
pub mod procmem;
pub mod procs;
pub mod python;
pub mod report;
pub mod session;
pub mod stacks;
pub mod symbolize;
pub mod table;
pub mod target;
pub mod tracking;
pub mod unwind;
