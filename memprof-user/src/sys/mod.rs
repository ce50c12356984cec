//! The host and the processes on it, read from `/proc` and from files: address-space views,
//! memory figures and page residency, ELF facts, process facts, the kernel's clock, the checks
//! made before tracing, spawning a command stopped before `exec`, and the program a command's
//! shims and wrappers end up running. Nothing here knows about eBPF.

pub mod clock;
pub mod elf;
pub mod elfcheck;
pub mod maps;
pub mod objfile;
pub mod printable;
pub mod process;
pub mod procmem;
pub mod residency;
pub mod shims;
pub mod target;
