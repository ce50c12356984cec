//! Call stacks: the store of raw frames placed in their objects ([`store`]), unwinding of
//! `--unwind dwarf` stack copies ([`unwind`]), CPython frames read from a process
//! ([`python`]) and merged with native ones ([`mixed`]), naming frames ([`symbolize`], with the
//! debug information the system has: [`debuginfo`]; on a thread of its own: [`namer`]), and
//! the call sites every output groups by ([`sites`]).

pub mod debuginfo;
pub mod mixed;
pub mod namer;
pub mod python;
pub mod sites;
pub mod store;
pub mod symbolize;
pub mod tables;
pub mod unwind;

pub use sites::{SiteId, Sites};
pub use store::{RawFrame, StackStore};
pub use symbolize::{Frame, Symbolizer};
