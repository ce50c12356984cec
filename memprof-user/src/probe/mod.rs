//! What to attach and where: which allocators a process uses ([`allocators`]), where in each
//! entry point a probe goes ([`placement`]), and loading and attaching the kernel programs and
//! reading their maps ([`load`], [`plan`]). The only layer that touches aya.

pub mod allocators;
pub mod counters;
mod detach;
pub mod kernel;
pub mod kernel_log;
pub mod links;
pub mod load;
pub mod loader;
pub mod placement;
pub mod plan;
mod read;
mod session;
pub mod tables;
mod tracepoints;

pub use counters::{KernelLosses, ProbeStat};
pub use detach::Detaching;
pub use links::LinkKind;
pub use load::{Options, PhaseNotFound, Targets, Tracer};
