//! What the kernel and the user hand over while a trace runs: ring-buffer records decoded with
//! version and length checks ([`event`]), the kernel's records of executable mappings
//! ([`mmaps`]), and time marks sent with `memprof mark` ([`marks`]).

pub mod event;
pub mod marks;
pub mod mmaps;
