//! Decoding of ring-buffer records into typed events.
//!
//! Every record is checked for length and [`EVENT_VERSION`] before a byte of its body is read; a
//! record this build does not understand is an error the caller counts, never a misread.

use memprof_common::{
    AllocEvent, AllocFn, EVENT_VERSION, EXEC_ARGS, EventHeader, EventKind, ExecEvent, ForkEvent,
    FreeEvent, PhaseEvent, PyFreeEvent, RemapEvent, UnmapEvent, UnwindEvent,
};

/// One decoded record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    Alloc(Alloc),
    /// A block released; `func` tells whether by `free` or by a `realloc` taking it over.
    Free {
        tid: u32,
        func: AllocFn,
        addr: u64,
        ts_ns: u64,
    },
    /// The `realloc` on `tid` failed: the block it took over at entry lives on.
    ReallocFailed {
        tid: u32,
    },
    /// With byte sampling: the `realloc` on `tid` succeeded but its new block was not sampled;
    /// the block it took over at entry is gone.
    ReallocSettled {
        tid: u32,
        ts_ns: u64,
    },
    Munmap {
        addr: u64,
        len: u64,
    },
    Mremap {
        old_addr: u64,
        old_len: u64,
        new_addr: u64,
        new_len: u64,
    },
    /// A library was mapped: the address-space view is stale.
    ExecMap,
    /// A new child of a traced process stopped itself, waiting for its probes.
    ChildPaused,
    /// A thread entered (`enter`) or left a `--phase` function.
    Phase {
        tid: u32,
        phase: u32,
        enter: bool,
        ts_ns: u64,
    },
    /// The process forked `child`, which is traced too, at `ts_ns`.
    Fork {
        child: u32,
        ts_ns: u64,
    },
    /// The process replaced its image: its blocks and mappings are gone. `comm` is its new
    /// name.
    Exec {
        comm: [u8; 16],
    },
    /// The process's last thread exited.
    Exit,
}

/// A successful allocation (`kind == Heap`) or anonymous mapping (`kind == Mmap`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Alloc {
    pub tid: u32,
    pub func: AllocFn,
    pub mmap: bool,
    pub addr: u64,
    pub size: u64,
    /// Key of the stack in the `STACKS` map, or `NO_STACK`.
    pub stack: u64,
    pub ts_ns: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {got} bytes is shorter than the {need} its kind needs")]
    Short { got: usize, need: usize },
    #[error("record has layout version {0}, this build reads version {EVENT_VERSION}")]
    Version(u16),
    #[error("record has unknown kind {0}")]
    Kind(u16),
    #[error("record names unknown allocator function {0}")]
    Func(u32),
}

/// Reads a `T` from the front of `bytes` after checking the length.
fn read<T: Copy>(bytes: &[u8]) -> Result<T, DecodeError> {
    let need = size_of::<T>();
    if bytes.len() < need {
        return Err(DecodeError::Short {
            got: bytes.len(),
            need,
        });
    }
    // SAFETY: length checked above; T is a repr(C) integer-only wire type, any bit pattern is
    // valid, and read_unaligned copes with the ring's alignment.
    Ok(unsafe { bytes.as_ptr().cast::<T>().read_unaligned() })
}

/// One ring-buffer record, read once: its event and what comes with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record<'a> {
    /// The process it belongs to.
    pub tgid: u32,
    pub event: Event,
    /// Key of the Python frames of an allocation, or of a free recorded with them
    /// (`EventKind::PyFree`); `NO_STACK` for none or another kind.
    pub py_stack: u64,
    /// The stack copy of an `AllocStack` record: its `Event::Alloc` has no stack key until the
    /// agent has unwound the copy.
    pub copy: Option<StackCopy<'a>>,
    /// The process stopped itself for the agent to act on this record first (`PAUSED`): the
    /// agent continues it (SIGCONT) once it has.
    pub paused: bool,
    /// An `Exec` record's start of the new command line, as the kernel read it: arguments each
    /// ending in a NUL (empty when it could not), and how many the command line has
    /// (`sys::process::exec_command_line` reads them).
    pub exec_args: &'a [u8],
    pub exec_argc: u32,
}

/// Decodes one ring-buffer record's event.
pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    decode_record(bytes).map(|r| r.event)
}

/// Decodes one ring-buffer record.
pub fn decode_record(bytes: &[u8]) -> Result<Record<'_>, DecodeError> {
    let header: EventHeader = read(bytes)?;
    if header.version != EVENT_VERSION {
        return Err(DecodeError::Version(header.version));
    }
    let kind = EventKind::from_u16(header.kind).ok_or(DecodeError::Kind(header.kind))?;
    let func = || AllocFn::from_u32(header.func).ok_or(DecodeError::Func(header.func));
    let tid = header.tid;
    let mut py_stack = memprof_common::NO_STACK;
    let mut copy = None;
    let mut exec_args: &[u8] = &[];
    let mut exec_argc = 0;
    let event = match kind {
        EventKind::Alloc | EventKind::Mmap => {
            let e: AllocEvent = read(bytes)?;
            py_stack = e.py_stack;
            Event::Alloc(Alloc {
                tid,
                func: func()?,
                mmap: kind == EventKind::Mmap,
                addr: e.addr,
                size: e.size,
                stack: e.stack,
                ts_ns: header.ts_ns,
            })
        }
        EventKind::Free => {
            let e: FreeEvent = read(bytes)?;
            Event::Free {
                tid,
                func: func()?,
                addr: e.addr,
                ts_ns: header.ts_ns,
            }
        }
        EventKind::PyFree => {
            let e: PyFreeEvent = read(bytes)?;
            py_stack = e.py_stack;
            Event::Free {
                tid,
                func: func()?,
                addr: e.addr,
                ts_ns: header.ts_ns,
            }
        }
        EventKind::ReallocFailed => {
            read::<FreeEvent>(bytes)?;
            Event::ReallocFailed { tid }
        }
        EventKind::ReallocSettled => {
            read::<FreeEvent>(bytes)?;
            Event::ReallocSettled {
                tid,
                ts_ns: header.ts_ns,
            }
        }
        EventKind::Munmap => {
            let e: UnmapEvent = read(bytes)?;
            Event::Munmap {
                addr: e.addr,
                len: e.len,
            }
        }
        EventKind::Mremap => {
            let e: RemapEvent = read(bytes)?;
            Event::Mremap {
                old_addr: e.old_addr,
                old_len: e.old_len,
                new_addr: e.new_addr,
                new_len: e.new_len,
            }
        }
        EventKind::AllocStack => {
            let e: UnwindEvent = read(bytes)?;
            let from = size_of::<UnwindEvent>();
            let need = from + e.stack_len as usize;
            let Some(stack) = bytes.get(from..need) else {
                return Err(DecodeError::Short {
                    got: bytes.len(),
                    need,
                });
            };
            py_stack = e.py_stack;
            copy = Some(StackCopy {
                ip: e.ip,
                sp: e.sp,
                bp: e.bp,
                stack,
            });
            Event::Alloc(Alloc {
                tid,
                func: func()?,
                mmap: e.mmap != 0,
                addr: e.addr,
                size: e.size,
                stack: memprof_common::NO_STACK,
                ts_ns: header.ts_ns,
            })
        }
        EventKind::ExecMap => Event::ExecMap,
        EventKind::ChildPaused => Event::ChildPaused,
        EventKind::Fork => {
            let e: ForkEvent = read(bytes)?;
            Event::Fork {
                child: e.child,
                ts_ns: header.ts_ns,
            }
        }
        EventKind::Exec => {
            let e: ExecEvent = read(bytes)?;
            let from = std::mem::offset_of!(ExecEvent, args);
            let len = (e.args_len as usize).min(EXEC_ARGS);
            exec_args = &bytes[from..from + len];
            exec_argc = e.argc;
            Event::Exec { comm: e.comm }
        }
        EventKind::Exit => Event::Exit,
        EventKind::PhaseEnter | EventKind::PhaseLeave => {
            let e: PhaseEvent = read(bytes)?;
            Event::Phase {
                tid,
                phase: e.phase,
                enter: kind == EventKind::PhaseEnter,
                ts_ns: header.ts_ns,
            }
        }
    };
    let paused = matches!(
        kind,
        EventKind::ExecMap | EventKind::Exec | EventKind::ChildPaused
    ) && header.func & memprof_common::PAUSED != 0;
    Ok(Record {
        tgid: header.tgid,
        event,
        py_stack,
        copy,
        paused,
        exec_args,
        exec_argc,
    })
}

/// What an `AllocStack` record carries for unwinding: the caller's registers and a copy of its
/// stack from `sp` up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StackCopy<'a> {
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
    pub stack: &'a [u8],
}

/// Test and benchmark helper: the bytes the kernel would write for `value`.
pub fn encode<T: Copy>(value: &T) -> Vec<u8> {
    // SAFETY: T is a plain-old-data wire type; we copy its bytes.
    unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: EventKind, func: AllocFn) -> EventHeader {
        EventHeader {
            version: EVENT_VERSION,
            kind: kind as u16,
            tgid: 7,
            tid: 8,
            func: func as u32,
            ts_ns: 99,
        }
    }

    #[test]
    fn decodes_alloc() {
        let bytes = encode(&AllocEvent {
            header: header(EventKind::Alloc, AllocFn::Calloc),
            addr: 0x1000,
            size: 48,
            stack: 3,
            py_stack: 0,
        });
        assert_eq!(
            decode(&bytes),
            Ok(Event::Alloc(Alloc {
                tid: 8,
                func: AllocFn::Calloc,
                mmap: false,
                addr: 0x1000,
                size: 48,
                stack: 3,
                ts_ns: 99
            }))
        );
    }

    #[test]
    fn decodes_exec_with_its_command_line() {
        let mut args = [0u8; EXEC_ARGS];
        args[..12].copy_from_slice(b"ls\0-l\0/tmp\0x");
        let e = ExecEvent {
            header: header(EventKind::Exec, AllocFn::Malloc),
            comm: *b"ls\0\0\0\0\0\0\0\0\0\0\0\0\0\0",
            args_len: 11,
            argc: 3,
            args,
        };
        let bytes = encode(&e);
        let r = decode_record(&bytes).unwrap();
        assert_eq!(r.exec_args, b"ls\0-l\0/tmp\0");
        assert_eq!(r.exec_argc, 3);
        // A length past the record's array is held to it.
        let long = encode(&ExecEvent {
            args_len: u32::MAX,
            ..e
        });
        assert_eq!(decode_record(&long).unwrap().exec_args.len(), EXEC_ARGS);
        assert_eq!(
            decode(&bytes[..100]),
            Err(DecodeError::Short {
                got: 100,
                need: 304
            })
        );
    }

    #[test]
    fn rejects_short_records() {
        let bytes = encode(&AllocEvent {
            header: header(EventKind::Alloc, AllocFn::Malloc),
            ..Default::default()
        });
        assert_eq!(
            decode(&bytes[..40]),
            Err(DecodeError::Short { got: 40, need: 56 })
        );
        assert_eq!(
            decode(&bytes[..10]),
            Err(DecodeError::Short { got: 10, need: 24 })
        );
    }

    #[test]
    fn rejects_other_versions_and_kinds() {
        let mut h = header(EventKind::Free, AllocFn::Free);
        h.version = EVENT_VERSION + 1;
        let bytes = encode(&FreeEvent { header: h, addr: 1 });
        assert_eq!(decode(&bytes), Err(DecodeError::Version(EVENT_VERSION + 1)));
        let mut h = header(EventKind::Free, AllocFn::Free);
        h.kind = 77;
        assert_eq!(
            decode(&encode(&FreeEvent { header: h, addr: 1 })),
            Err(DecodeError::Kind(77))
        );
        let mut h = header(EventKind::Free, AllocFn::Free);
        h.func = 0;
        assert_eq!(
            decode(&encode(&FreeEvent { header: h, addr: 1 })),
            Err(DecodeError::Func(0))
        );
    }

    #[test]
    fn decodes_alloc_with_stack_copy() {
        let e = UnwindEvent {
            header: header(EventKind::AllocStack, AllocFn::Malloc),
            addr: 0x1000,
            size: 64,
            ip: 0x40_1000,
            sp: 0x7ff0_0000,
            bp: 0,
            stack_len: 16,
            mmap: 0,
            py_stack: 77,
        };
        let mut bytes = encode(&e);
        bytes.extend((0u8..16).collect::<Vec<_>>());
        match decode(&bytes).unwrap() {
            Event::Alloc(a) => assert_eq!((a.addr, a.size, a.stack), (0x1000, 64, 0)),
            other => panic!("{other:?}"),
        }
        let record = decode_record(&bytes).unwrap();
        assert_eq!((record.tgid, record.py_stack), (7, 77));
        let copy = record.copy.unwrap();
        assert_eq!(
            (copy.ip, copy.sp, copy.stack.len()),
            (0x40_1000, 0x7ff0_0000, 16)
        );
        assert_eq!(copy.stack[15], 15);
        // A record shorter than its stated copy is refused, never read past.
        bytes.truncate(bytes.len() - 1);
        assert!(matches!(decode(&bytes), Err(DecodeError::Short { .. })));
    }

    #[test]
    fn decodes_free_with_python_frames() {
        let bytes = encode(&PyFreeEvent {
            header: header(EventKind::PyFree, AllocFn::Realloc),
            addr: 0x2000,
            py_stack: 91,
        });
        let record = decode_record(&bytes).unwrap();
        assert_eq!(
            record.event,
            Event::Free {
                tid: 8,
                func: AllocFn::Realloc,
                addr: 0x2000,
                ts_ns: 99
            }
        );
        assert_eq!(record.py_stack, 91);
        assert_eq!(
            decode(&bytes[..32]),
            Err(DecodeError::Short { got: 32, need: 40 })
        );
    }

    #[test]
    fn decodes_remap() {
        let bytes = encode(&RemapEvent {
            header: header(EventKind::Mremap, AllocFn::Mremap),
            old_addr: 1,
            old_len: 2,
            new_addr: 3,
            new_len: 4,
        });
        assert_eq!(
            decode(&bytes),
            Ok(Event::Mremap {
                old_addr: 1,
                old_len: 2,
                new_addr: 3,
                new_len: 4
            })
        );
    }
}
