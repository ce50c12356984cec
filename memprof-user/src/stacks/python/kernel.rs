//! What the kernel program needs to find a thread's Python frames by itself.

use super::{GLIBC_PTHREAD_SPECIFIC_1STBLOCK, NONE, PyOffsets, Resolver, Result};

/// What the kernel side needs per traced CPython process, for a BPF array map: where
/// `_PyRuntime` is, how to get the calling thread's `PyThreadState`, and the layout.
///
/// In BPF, at an allocation: `fs = task->thread.fsbase` (the `pthread_t`);
/// `tstate = *(fs + pthread_specific + 16 * tss_key + 8)`; then the frame chain from
/// `tstate + offsets.tstate_frame` (through `cframe_current_frame` when set), recording
/// `(*(frame + frame_code), *(frame + frame_instr))` per frame and following `frame_previous`,
/// skipping frames whose `owner` byte is [`FRAME_OWNED_BY_CSTACK`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PyKernelConfig {
    /// Runtime address of `_PyRuntime`.
    pub runtime: u64,
    /// The pthread key of `autoTSSkey`, [`NONE`] when not initialized or past glibc's first
    /// block of 32 keys.
    pub tss_key: u32,
    /// `offsetof(struct pthread, specific_1stblock)`: [`GLIBC_PTHREAD_SPECIFIC_1STBLOCK`].
    pub pthread_specific: u32,
    pub offsets: PyOffsets,
}

impl Resolver {
    /// The [`PyKernelConfig`] of this process (reads the `autoTSSkey` key from it).
    pub fn kernel_config(&self) -> Result<PyKernelConfig> {
        let o = &self.process.offsets;
        // 3.14 on publish no `autoTSSkey` offset: the kernel finds thread states by thread id.
        let tss_key = match o.runtime_tss_key {
            NONE => NONE,
            off => {
                let tss = self.process.runtime + u64::from(off);
                let initialized = self.mem.u32(tss)?;
                let key = self.mem.u32(tss + 4)?;
                if initialized != 0 && key < 32 {
                    key
                } else {
                    NONE
                }
            }
        };
        Ok(PyKernelConfig {
            runtime: self.process.runtime,
            tss_key,
            pthread_specific: GLIBC_PTHREAD_SPECIFIC_1STBLOCK as u32,
            offsets: *o,
        })
    }
}

/// For the kernel side: the thread state of the thread `pthread` (its `fs` base) as BPF would
/// read it through `autoTSSkey` and glibc's thread-specific data, or `None` when the key is not
/// initialized or larger than glibc's first block (32 keys).
pub fn tss_tstate(resolver: &Resolver, pthread: u64) -> Result<Option<u64>> {
    let config = resolver.kernel_config()?;
    if config.tss_key == NONE {
        return Ok(None);
    }
    let slot = pthread + u64::from(config.pthread_specific) + 16 * u64::from(config.tss_key) + 8;
    Ok(Some(resolver.mem.u64(slot)?))
}

/// For the kernel side: `_PyRuntime.gilstate.tstate_current` (3.8 to 3.11), the thread state
/// holding the GIL (0 when none does); `None` from 3.12.
pub fn gil_tstate(resolver: &Resolver) -> Result<Option<u64>> {
    let o = &resolver.process.offsets;
    match o.runtime_tstate_current {
        NONE => Ok(None),
        off => Ok(Some(
            resolver
                .mem
                .u64(resolver.process.runtime + u64::from(off))?,
        )),
    }
}
