//! The end of a trace: every probe link taken out of the tracer, to be closed on a thread of
//! its own while the ring is drained (`Session::end`).

use std::time::Duration;

use aya::programs::{TracePoint, trace_point::TracePointLink};

use super::{Tracer, links::Taken, tracepoints::Tracepoints};

impl Tracer {
    /// Every probe link, taken out of the tracer to be detached on another thread: closing a
    /// tracepoint waits out the kernel's grace periods (40 ms each, one at a time), so the ring
    /// is drained meanwhile.
    pub fn take_links(&mut self) -> Detaching {
        let fork_child = std::mem::take(&mut self.fork_child)
            .into_iter()
            .map(|link| ("fork_child", link))
            .collect();
        let rest = std::mem::take(&mut self.tracepoints);
        Detaching {
            fork_child: self.take_tracepoints(fork_child),
            uprobes: self.links.take(),
            rest: self.take_tracepoints(rest),
        }
    }

    fn take_tracepoints(&mut self, links: Tracepoints) -> Vec<TracePointLink> {
        let mut taken = Vec::with_capacity(links.len());
        for (program, link) in links {
            if let Some(tp) = self
                .ebpf
                .program_mut(program)
                .and_then(|p| <&mut TracePoint>::try_from(p).ok())
                && let Ok(link) = tp.take_link(link)
            {
                taken.push(link);
            }
        }
        taken
    }
}

/// The probe links of a trace that ends (see [`Tracer::take_links`]), attached until
/// [`Detaching::detach`] (or their drop).
pub struct Detaching {
    fork_child: Vec<TracePointLink>,
    uprobes: Taken,
    rest: Vec<TracePointLink>,
}

impl Detaching {
    /// Number of uprobe links.
    pub fn uprobes(&self) -> usize {
        self.uprobes.len()
    }

    /// Detaches `fork_child` first (no child pauses after this, see `Tracer::follow`), the
    /// uprobes (side by side), then the other tracepoints, so nothing writes to the ring any
    /// more. Returns how long the uprobes took.
    pub fn detach(self) -> Duration {
        drop(self.fork_child);
        let start = std::time::Instant::now();
        self.uprobes.detach();
        let took = start.elapsed();
        drop(self.rest);
        took
    }
}
