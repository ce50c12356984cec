//! Taking the records waiting in the ring and applying them, in order: the table's changes feed
//! the analytics tracker; process life-cycle records keep the process views, the allocator
//! probes and the Python registrations up to date; sampling feeds the growth series.

use memprof_common::{NO_STACK, unwind_end};

use super::{
    EXITED_KEPT, EXITED_UNSCRAPED_KEPT, Session,
    mappings::{Unwinding, pin_files, unwind_copy},
    naming::Input,
    procs::Proc,
    reports::reached_entry,
};
use crate::{
    ingest::event::{Event, decode_record},
    probe::allocators,
    sys::{clock::monotonic_ns, maps::Mapping, printable::escape, process, procmem::ProcMem},
};

/// How long one turn of the event loop drains the ring at most.
const DRAIN_BUDGET: std::time::Duration = std::time::Duration::from_millis(50);

impl Session {
    /// Ends the trace: detaches every probe (on a thread of its own: closing a tracepoint
    /// waits out the kernel's grace periods) while taking the records in the ring, for at most
    /// `budget` in all. A ring filled by processes allocating flat out holds more than the agent
    /// takes in a second, and the trace ends on time: what is left once the probes are gone is
    /// let go unread, counted (in `lost_events`), and a process that stopped itself for one of
    /// those records is continued. Returns the number of uprobe links and how long detaching
    /// them took.
    pub fn end(&mut self, budget: std::time::Duration) -> (usize, std::time::Duration) {
        let until = std::time::Instant::now() + budget;
        let links = self.tracer.take_links();
        let uprobes = links.uprobes();
        let took = std::thread::scope(|s| {
            let detaching = s.spawn(move || links.detach());
            while !detaching.is_finished() && std::time::Instant::now() < until {
                if !self.drain_until(Some(until)) {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
            detaching.join()
        });
        // Nothing writes to the ring any more.
        if self.drain_until(Some(until)) {
            while let Some(item) = self.tracer.events.next() {
                self.unread_at_end += 1;
                if let Ok(record) = decode_record(&item)
                    && record.paused
                {
                    resume(record.tgid);
                }
            }
        }
        let took = match took {
            Ok(took) => took,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        (uprobes, took)
    }

    /// Takes the records waiting in the ring for at most [`DRAIN_BUDGET`], so the event loop
    /// gets back to its signals, deadline and requests however fast records come; the rest
    /// are taken in the loop's next turn. Returns whether records were left.
    pub(super) fn drain_some(&mut self) -> bool {
        self.drain_for(DRAIN_BUDGET)
    }

    /// Takes the records waiting in the ring for at most `budget`; whether records were left.
    pub(super) fn drain_for(&mut self, budget: std::time::Duration) -> bool {
        self.drain_until(Some(std::time::Instant::now() + budget))
    }

    fn drain_until(&mut self, deadline: Option<std::time::Instant>) -> bool {
        self.drain_mappings();
        let mut taken: u32 = 0;
        let left = loop {
            taken = taken.wrapping_add(1);
            if taken.is_multiple_of(1024)
                && deadline.is_some_and(|d| std::time::Instant::now() >= d)
            {
                break true;
            }
            let Some(item) = self.tracer.events.next() else {
                break false;
            };
            self.events += 1;
            let record = match decode_record(&item) {
                Ok(r) => r,
                Err(_) => {
                    self.decode_errors += 1;
                    continue;
                }
            };
            let (tgid, mut event, py_stack) = (record.tgid, record.event, record.py_stack);
            let paused = record.paused;
            // An exec's command line, as the kernel copied it, and whether it is whole.
            let exec_args = matches!(event, Event::Exec { .. })
                .then(|| process::exec_command_line(record.exec_args, record.exec_argc));
            // A process first seen through a stack copy: `unwind_copy` adds its view, and the
            // rest of its registration follows once the ring's record is let go.
            let newly = record.copy.is_some() && !self.procs.contains_key(&tgid);
            if let (Some(copy), Event::Alloc(a)) = (record.copy, &mut event) {
                let (key, stopped) = unwind_copy(
                    &mut Unwinding {
                        watch: self.watch.as_mut(),
                        procs: &mut self.procs,
                        pending: &mut self.pending_maps,
                        unwinders: &mut self.unwinders,
                        objects: &mut self.unwind_objects,
                        stacks: &mut self.stacks,
                        stats: &mut self.unwind_stats,
                        namer: &mut self.namer,
                    },
                    tgid,
                    copy,
                );
                a.stack = key;
                // With tables, a copy is the walk's fallback: its end, for the report.
                if self.tracer.tables.is_some() {
                    let end = if stopped {
                        unwind_end::AGENT_STOPPED
                    } else {
                        unwind_end::AGENT
                    };
                    self.stack_ends.insert(key, end as u8);
                }
            }
            drop(item);
            if newly {
                if let Some(p) = self.procs.get(&tgid) {
                    pin_files(&mut self.namer, p);
                }
                self.allocator_text(tgid);
                self.update_tables(tgid);
            }
            let native = match &event {
                Event::Alloc(a) => Some((a.stack, a.size)),
                _ => None,
            };
            if let Event::Alloc(a) = &mut event {
                a.stack = self.with_python(tgid, a.stack, py_stack);
            }
            self.python_phase_turns(tgid, &event, py_stack);
            self.observe(tgid, &event, exec_args);
            if paused {
                resume(tgid);
            }
            if let Some((stack, size)) = native {
                self.count_walk(stack, size);
            }
        };
        self.pump_ready();
        left
    }

    /// Applies one record's event; `exec_args` is an exec's command line (see the loop above).
    pub(super) fn observe(
        &mut self,
        tgid: u32,
        event: &Event,
        exec_args: Option<(Vec<String>, bool)>,
    ) {
        // A process's first record: its view, its files kept open, its allocator text and its
        // mappings for the kernel's walks.
        if !self.procs.contains_key(&tgid) {
            let p = Proc::discover(tgid);
            pin_files(&mut self.namer, &p);
            self.add_proc(tgid, p);
            self.allocator_text(tgid);
            self.update_tables(tgid);
        }
        // The keys each process uses, for `release_stacks` once it is forgotten: the traced
        // process itself never is (see `evict_exited`), so its events skip the set.
        if let Event::Alloc(a) = event
            && a.stack != NO_STACK
            && tgid != self.pid
            && let Some(p) = self.procs.get_mut(&tgid)
            && p.stack_keys.insert(a.stack)
        {
            *self.stack_users.entry(a.stack).or_default() += 1;
        }
        match *event {
            Event::Alloc(a) if a.stack != NO_STACK && !self.stacks.contains(a.stack) => {
                self.learn_stack(tgid, a.stack);
            }
            Event::ExecMap => {
                // Read now, while the process surely lives; keep the old view if it is gone.
                if let Some(p) = self.procs.get_mut(&tgid) {
                    p.space_stale = true;
                    if p.reread(tgid, monotonic_ns()) {
                        pin_files(&mut self.namer, p);
                    }
                }
                self.detect_allocators(tgid);
                self.allocator_text(tgid);
                self.update_tables(tgid);
                // An interpreter loads its modules as it starts: register its threads early.
                self.scan_python(tgid);
            }
            Event::Phase {
                tid, phase, enter, ..
            } => {
                let outstanding = self.table.heap_totals.outstanding_bytes;
                self.track(Input::Phase {
                    tid,
                    phase,
                    enter,
                    outstanding,
                });
            }
            Event::ChildPaused => {
                // Stopped before its first instruction: its probes and its mappings first,
                // then it goes on.
                if let Err(e) = self.tracer.follow(tgid) {
                    eprintln!(
                        "memprof: warning: pid {tgid}: {}",
                        escape(&format!("{e:#}"))
                    );
                }
                self.update_tables(tgid);
            }
            Event::Fork { child, ts_ns } => {
                // Probes of its own first: the child already runs.
                if let Err(e) = self.tracer.follow(child) {
                    eprintln!(
                        "memprof: warning: pid {child}: {}",
                        escape(&format!("{e:#}"))
                    );
                }
                let p = Proc::forked(tgid, &self.procs[&tgid]);
                self.procs.remove(&child);
                self.add_proc(child, p);
                self.table.fork(child, tgid, ts_ns);
            }
            Event::Exec { comm } => {
                let changes = &mut self.changes;
                self.table
                    .release_process(tgid, monotonic_ns(), &mut |c| changes.push(c));
                // A spawned command's own exec starts it: not a re-exec.
                let first = self.parent && tgid == self.pid && !self.command_started;
                self.command_started |= first;
                if let Some(state) = self.pythons.remove(&tgid) {
                    for tid in state.tids.keys() {
                        self.tracer.remove_python_thread(*tid);
                    }
                }
                if let Some(p) = self.procs.get_mut(&tgid) {
                    p.exec(tgid, &comm, exec_args.unwrap_or_default());
                    if first {
                        p.execs = 0;
                    }
                }
                self.detect_allocators(tgid);
                self.update_tables(tgid);
            }
            Event::Exit => {
                if let Some(p) = self.procs.get_mut(&tgid)
                    && !p.exited
                {
                    p.exited = true;
                    if tgid != self.pid {
                        self.exited.push_back(tgid);
                    }
                    self.tracer.release(tgid);
                }
                if let Some(tables) = self.tracer.tables.as_mut() {
                    tables.forget_process(tgid);
                }
                self.tables_written.remove(&tgid);
                self.tables_epoch.remove(&tgid);
                self.evict_exited(monotonic_ns());
            }
            _ => {}
        }
        let changes = &mut self.changes;
        self.table.apply_from(tgid, event, &mut |c| changes.push(c));
        let outstanding = self.table.heap_totals.outstanding_bytes;
        let mut changes = std::mem::take(&mut self.changes);
        for change in changes.drain(..) {
            self.track(Input::Change {
                pid: tgid,
                change,
                outstanding,
            });
        }
        self.changes = changes;
    }

    /// Keeps memory bounded on a long trace of many processes: the oldest exited processes
    /// beyond `EXITED_KEPT` stop being reported (their blocks count as freed, as the system
    /// freed them), and what memprof kept for them goes. With live endpoints, exited processes
    /// wait for a profile scrape instead (see `evict_scraped`), up to `EXITED_UNSCRAPED_KEPT`.
    pub(super) fn evict_exited(&mut self, now: u64) {
        let kept = if self.process_sites.is_some() {
            EXITED_UNSCRAPED_KEPT
        } else {
            EXITED_KEPT
        };
        while self.exited.len() > kept {
            let Some(pid) = self.exited.pop_front() else {
                break;
            };
            self.forget_exited(pid, now);
        }
    }

    /// Stops reporting exited process `pid` (see `evict_exited`).
    pub(super) fn forget_exited(&mut self, pid: u32, now: u64) {
        if self.process_sites.is_some() && self.procs.get(&pid).is_some_and(|p| !p.seen_exited) {
            self.evicted_unscraped += 1;
        }
        let mut changes = Vec::new();
        self.table
            .forget_process(pid, now, &mut |c| changes.push(c));
        let outstanding = self.table.heap_totals.outstanding_bytes;
        for change in changes {
            self.track(Input::Change {
                pid,
                change,
                outstanding,
            });
        }
        let stacks = self
            .procs
            .remove(&pid)
            .map(|p| p.stack_keys.into_iter().collect())
            .unwrap_or_default();
        self.track(Input::Forget { pid, stacks });
        self.unwinders.remove(&pid);
        self.pending_maps.remove(&pid);
        if let Some(state) = self.pythons.remove(&pid) {
            for tid in state.tids.keys() {
                self.tracer.remove_python_thread(*tid);
            }
        }
        self.evicted_processes += 1;
    }

    /// After an exec, probes the allocators of the new image that no probe covers yet (a
    /// static binary, another libc, jemalloc...). Its libraries are mapped one by one after the
    /// exec, so this runs at each load until an allocator is found.
    pub(super) fn detect_allocators(&mut self, tgid: u32) {
        let Some(p) = self.procs.get_mut(&tgid) else {
            return;
        };
        if p.detect_budget == 0 {
            return;
        }
        p.detect_budget -= 1;
        // An exec'd image usually maps only objects already looked at (the C library everyone
        // uses): parse the ELF files again only when a new one appeared.
        let ids: Vec<(u64, u64)> = p
            .space
            .mappings()
            .iter()
            .filter_map(Mapping::file_id)
            .collect();
        if !ids.is_empty()
            && ids
                .iter()
                .all(|id| self.tracer.is_probed(*id) || self.plain_objects.contains(id))
        {
            return;
        }
        let Ok(found) = allocators::of_pid(tgid) else {
            return;
        };
        // A dynamic program's allocators arrive with its libraries, the C library among the
        // last: look again at each load until it is there.
        if found
            .iter()
            .any(|a| matches!(a.kind, allocators::Kind::Glibc | allocators::Kind::Musl))
        {
            p.detect_budget = 0;
        }
        match self.tracer.add_allocators(&found, tgid) {
            Ok(added) if !added.is_empty() => eprintln!(
                "memprof: pid {tgid} ({}): now also probing {}",
                escape(&p.comm),
                escape(&added.join(", "))
            ),
            Ok(_) => {}
            Err(e) => eprintln!(
                "memprof: warning: pid {tgid}: {}",
                escape(&format!("{e:#}"))
            ),
        }
        for id in ids {
            if !self.tracer.is_probed(id) {
                self.plain_objects.insert(id);
            }
        }
    }

    /// Samples outstanding bytes per group and per process, and the processes' RSS.
    pub(super) fn sample(&mut self) {
        // New Python threads since the last look.
        let pythons: Vec<u32> = self.pythons.keys().copied().collect();
        for pid in pythons {
            self.scan_python(pid);
        }
        self.python_phase_threads_gone();
        let now = monotonic_ns();
        let t = (now - self.start_ns) as f64 / 1e9;
        let mut rss = None;
        for (pid, p) in &mut self.procs {
            if p.exited {
                continue;
            }
            let table = self.table.process(*pid);
            if *pid != self.pid && table.is_none() {
                continue;
            }
            if p.execs == 0 && p.parent.is_some() {
                p.retitle(*pid);
            }
            if let Ok(mem) = ProcMem::read(*pid) {
                p.last_mem = Some(mem);
                if *pid == self.pid {
                    rss = Some(mem.rss_bytes);
                }
            }
            let outstanding = table.map_or(0, |t| t.heap_totals.outstanding_bytes);
            p.series.push(t, outstanding as f64);
        }
        self.track(Input::Sample {
            ts_ns: now,
            heap: self.table.heap_totals.outstanding_bytes,
            rss,
        });
    }

    /// Tells the kernel where process `tgid`'s allocator code lies, when it needs to know (see
    /// `Tracer::wants_allocator_text`).
    pub(super) fn allocator_text(&mut self, tgid: u32) {
        if !self.tracer.wants_allocator_text() {
            return;
        }
        if let Some(p) = self.procs.get(&tgid) {
            self.tracer.set_allocator_text(tgid, &p.space);
        }
    }

    /// Adds an allocation of `size` bytes with native stack `stack` to what the kernel's table
    /// walks reached (`--unwind tables`).
    fn count_walk(&mut self, stack: u64, size: u64) {
        if self.tracer.tables.is_none() {
            return;
        }
        let end = u64::from(self.stack_ends.get(&stack).copied().unwrap_or(0));
        let name = unwind_end::NAMES
            .get(end as usize)
            .copied()
            .unwrap_or("unknown");
        let w = &mut self.table_walks;
        self.table_allocations += 1;
        w.bytes += size;
        *w.ends
            .entry(if stack == NO_STACK { "no stack" } else { name })
            .or_default() += size;
        if reached_entry(end) {
            w.entry_bytes += size;
        }
    }
}

/// Continues process `tgid`, which stopped itself for one of its records (`PAUSED`).
fn resume(tgid: u32) {
    // SAFETY: a signal to a process that stopped itself for a record.
    unsafe { libc::kill(tgid as i32, libc::SIGCONT) };
}
