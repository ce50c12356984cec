//! Call stacks: the store of raw frames placed in their objects ([`store`]), unwinding of
//! `--unwind dwarf` stack copies ([`unwind`]), CPython frames read from a process
//! ([`python`]) and merged with native ones ([`mixed`]), naming frames ([`symbolize`], with the
//! debug information the system has: [`debuginfo`]).

pub mod debuginfo;
pub mod mixed;
pub mod python;
pub mod store;
pub mod symbolize;
pub mod unwind;

pub use store::{RawFrame, StackStore};
pub use symbolize::{Frame, Symbolizer};
