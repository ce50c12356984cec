//! Phases: functions named by `--phase`; the attach cookie is the phase's index. Classic and
//! multi-uprobe variants, as in `alloc`.

use aya_ebpf::{
    EbpfContext as _,
    helpers::bpf_get_attach_cookie,
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use memprof_common::{EventKind, PhaseEvent};

use crate::{
    emit::{emit, header},
    filter::traced_thread,
};

#[uprobe]
pub fn phase_entry(ctx: ProbeContext) -> u32 {
    phase_event(ctx.as_ptr(), EventKind::PhaseEnter);
    0
}

#[uretprobe]
pub fn phase_return(ctx: RetProbeContext) -> u32 {
    phase_event(ctx.as_ptr(), EventKind::PhaseLeave);
    0
}

#[uprobe(multi)]
pub fn phase_entry_multi(ctx: ProbeContext) -> u32 {
    phase_event(ctx.as_ptr(), EventKind::PhaseEnter);
    0
}

#[uretprobe(multi)]
pub fn phase_return_multi(ctx: RetProbeContext) -> u32 {
    phase_event(ctx.as_ptr(), EventKind::PhaseLeave);
    0
}

#[inline(always)]
fn phase_event(ctx: *mut core::ffi::c_void, kind: EventKind) {
    let Some(id) = traced_thread() else {
        return;
    };
    // SAFETY: the helper reads the cookie of the link that ran this program.
    let phase = unsafe { bpf_get_attach_cookie(ctx) } as u32;
    emit(PhaseEvent {
        header: header(kind, 0, id),
        phase,
        _pad: 0,
    });
}
