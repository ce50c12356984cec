//! What to attach and where: which allocators a process uses ([`allocators`]), where in each
//! entry point a probe goes ([`placement`]), and loading and attaching the kernel programs and
//! reading their maps ([`load`]). The only layer that touches aya.

pub mod allocators;
pub mod counters;
pub mod load;
pub mod placement;

pub use counters::{KernelLosses, ProbeStat};
pub use load::{Options, Targets, Tracer};
