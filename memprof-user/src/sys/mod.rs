//! The host and the processes on it, read from `/proc` and from files: address-space views,
//! memory figures, ELF facts, process facts, the kernel's clock, the checks made before tracing
//! and spawning a command stopped before `exec`. Nothing here knows about eBPF.

pub mod clock;
pub mod elf;
pub mod elfcheck;
pub mod maps;
pub mod objfile;
pub mod printable;
pub mod process;
pub mod procmem;
pub mod target;
