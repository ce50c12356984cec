//! Tracking by call site without making the event loop wait for names: what the analysis
//! takes (table changes, phase entries and exits, marks, samples) goes through one queue, in
//! order, and reaches the tracker as soon as every stack it needs has been named on the naming
//! thread (`stacks::namer`) and mapped to its call site. The tracker thus sees exactly what it
//! would have seen had names been instant, a little later; reports first wait for the queue to
//! empty ([`Session::settle`]).

use std::collections::VecDeque;

use super::{GROUP_IDLE_NS, GROUPS_KEPT, Session};
use crate::table::Change;

/// Queued inputs beyond which the loop waits for names rather than keep queueing (about
/// 20 MiB).
const QUEUE_MAX: usize = 1 << 18;

/// One input of the tracker.
pub(super) enum Input {
    /// A table change of process `pid`; `outstanding` is the heap's outstanding bytes after
    /// it.
    Change {
        pid: u32,
        change: Change,
        outstanding: u64,
    },
    /// Process `pid` is no longer reported: what the tracker kept for it alone goes, and the
    /// raw stack keys of its allocations are released.
    Forget { pid: u32, stacks: Vec<u64> },
    Phase {
        tid: u32,
        phase: u32,
        enter: bool,
        outstanding: u64,
    },
    Mark {
        name: String,
        ts_ns: u64,
        outstanding: u64,
    },
    Sample {
        ts_ns: u64,
        heap: u64,
        rss: Option<u64>,
    },
}

/// The queue, and the stacks sent for naming.
#[derive(Default)]
pub(super) struct Pending {
    queue: VecDeque<Input>,
    requested: std::collections::HashSet<u64>,
}

impl Pending {
    /// Inputs queued, and stacks sent for naming and not named yet.
    pub(super) fn sizes(&self) -> (usize, usize) {
        (self.queue.len(), self.requested.len())
    }
}

impl Session {
    /// Hands `input` to the tracker, in order, once the stack it needs is named.
    pub(super) fn track(&mut self, input: Input) {
        if let Input::Change { change, .. } = &input {
            let stack = change.block().stack;
            if self.sites.get(stack).is_none()
                && self.pending.requested.insert(stack)
                && !self.namer.request(stack, &self.stacks)
            {
                // Not stored (its process was unknown): no stack, for good.
                self.sites.intern(stack, &[]);
                self.pending.requested.remove(&stack);
            }
        }
        self.pending.queue.push_back(input);
        self.pump(false);
        if self.pending.queue.len() > QUEUE_MAX {
            self.settle();
        }
    }

    /// Maps the stacks named so far to their sites and gives the tracker every queued input
    /// that no longer waits; with `wait`, until the queue is empty.
    fn pump(&mut self, wait: bool) {
        loop {
            while let Some((stack, frames)) = self.namer.next(false) {
                self.named(stack, &frames);
            }
            while let Some(input) = self.pending.queue.front() {
                if let Input::Change { change, .. } = input
                    && self.sites.get(change.block().stack).is_none()
                {
                    break;
                }
                let Some(input) = self.pending.queue.pop_front() else {
                    break;
                };
                self.apply(input);
            }
            let Some(Input::Change { change, .. }) = self.pending.queue.front() else {
                return;
            };
            if !wait {
                return;
            }
            let waiting = change.block().stack;
            match self.namer.next(true) {
                Some((stack, frames)) => self.named(stack, &frames),
                // Nothing more will come (the naming thread is gone): no stack.
                None => self.named(waiting, &[]),
            }
        }
    }

    fn named(&mut self, stack: u64, frames: &[crate::stacks::Frame]) {
        self.sites.intern(stack, frames);
        self.pending.requested.remove(&stack);
    }

    /// Gives the tracker everything queued, waiting for the names it needs.
    pub(super) fn settle(&mut self) {
        self.pump(true);
    }

    /// Takes the names ready now and what no longer waits for them.
    pub(super) fn pump_ready(&mut self) {
        self.pump(false);
    }

    /// Releases one process's use of each of `stacks`; a key no process uses any more is
    /// forgotten (its blocks are gone: the changes before this input freed them).
    fn release_stacks(&mut self, stacks: Vec<u64>) {
        let mut gone = Vec::new();
        for key in stacks {
            let Some(users) = self.stack_users.get_mut(&key) else {
                continue;
            };
            *users -= 1;
            if *users > 0 {
                continue;
            }
            self.stack_users.remove(&key);
            gone.push(key);
            self.stacks.remove(key);
            self.sites.forget_stack(key);
            if let Some(end) = self.stack_ends.remove(&key) {
                self.stacks_forgotten.0 += 1;
                if !super::reports::reached_entry(u64::from(end)) {
                    self.stacks_forgotten.1 += 1;
                }
            }
        }
        // And from the kernel's map, which would fill otherwise.
        self.tracer.forget_stacks(&gone);
    }

    fn apply(&mut self, input: Input) {
        match input {
            Input::Change {
                pid,
                change,
                outstanding,
            } => {
                let site = self.sites.site_of(change.block().stack);
                self.tracker.on_change_in(pid, &change, site, outstanding);
                if let Some(p) = &mut self.process_sites {
                    let mmap = matches!(
                        change,
                        Change::Alloc { mmap: true, .. } | Change::Free { mmap: true, .. }
                    );
                    p.on_change(pid, &change, (site, change.block().func, mmap));
                }
            }
            Input::Forget { pid, stacks } => {
                self.tracker.forget_process(pid);
                if let Some(p) = &mut self.process_sites {
                    p.forget(pid);
                }
                self.release_stacks(stacks);
            }
            Input::Phase {
                tid,
                phase,
                enter,
                outstanding,
            } => self.tracker.on_phase(tid, phase, enter, outstanding),
            Input::Mark {
                name,
                ts_ns,
                outstanding,
            } => self.tracker.mark(&name, ts_ns, outstanding),
            Input::Sample { ts_ns, heap, rss } => {
                self.tracker.sample(ts_ns, heap, rss);
                self.pruned_groups += self.tracker.prune(GROUPS_KEPT, ts_ns, GROUP_IDLE_NS) as u64;
            }
        }
    }
}
