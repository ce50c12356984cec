//! What the agent knows of each traced process besides its allocation table: name, command
//! line, address-space view, where its files live (its own root, for containers), life cycle and
//! growth.

use crate::{
    analysis::series::Series,
    sys::{
        clock::monotonic_ns,
        maps::AddressSpace,
        process::{self, foreign_root},
        procmem::ProcMem,
    },
};

/// Points kept per process for its growth line.
const SERIES_POINTS: usize = 512;

pub struct Proc {
    pub comm: String,
    pub cmdline: Vec<String>,
    /// The traced process that forked it (followed children).
    pub parent: Option<u32>,
    pub exited: bool,
    /// A profile scrape included the process after it exited (see `Session::evict_scraped`).
    pub seen_exited: bool,
    pub execs: u32,
    /// Its cgroup v2 path, read when it was discovered or exec'd.
    pub cgroup: Option<String>,
    /// The raw stack keys of its allocations (released when it is forgotten).
    pub stack_keys: foldhash::HashSet<u64>,
    /// `/proc/PID/root` when the process lives under another root than memprof (a container):
    /// its files are read through it, and its stacks are symbolized as soon as they are seen.
    pub root: Option<String>,
    pub space: AddressSpace,
    /// Set when a library was mapped since `space` was read.
    pub space_stale: bool,
    /// When `space` was last read (CLOCK_MONOTONIC ns).
    pub space_read_ns: u64,
    /// Bumped at each change of `space` (unwinders rebuild their module list on a change).
    pub space_gen: u64,
    /// Outstanding heap bytes over time.
    pub series: Series,
    /// The process's memory at the last sample (kept for the report after it exits).
    pub last_mem: Option<ProcMem>,
    /// Library loads left during which to look for allocators of a new image (after an exec).
    pub detect_budget: u32,
    /// `space_gen` at which `may_python` was decided (None again after an exec renames it).
    python_checked: Option<u64>,
    may_python: bool,
}

impl Proc {
    /// A process named `comm` running `cmdline` under `root`, with nothing read yet.
    fn new(comm: String, cmdline: Vec<String>, root: Option<String>) -> Self {
        Self {
            comm,
            cmdline,
            parent: None,
            exited: false,
            seen_exited: false,
            execs: 0,
            cgroup: None,
            stack_keys: Default::default(),
            root,
            space: AddressSpace::default(),
            space_stale: true,
            space_read_ns: 0,
            space_gen: 0,
            series: Series::new(SERIES_POINTS),
            last_mem: None,
            detect_budget: 0,
            python_checked: None,
            may_python: false,
        }
    }

    /// A process seen for the first time: read what /proc still shows.
    pub fn discover(pid: u32) -> Self {
        let mut p = Self::new(
            process::comm(pid).unwrap_or_default(),
            process::command_line(pid),
            foreign_root(pid),
        );
        p.cgroup = process::cgroup_of(pid);
        p.reread(pid, monotonic_ns());
        p
    }

    /// A process forked by a traced one: until it execs, it has its parent's image.
    pub fn forked(parent_pid: u32, parent: &Self) -> Self {
        Self {
            parent: Some(parent_pid),
            space: parent.space.clone(),
            space_stale: parent.space_stale,
            space_read_ns: parent.space_read_ns,
            cgroup: parent.cgroup.clone(),
            ..Self::new(
                parent.comm.clone(),
                parent.cmdline.clone(),
                parent.root.clone(),
            )
        }
    }

    /// A forked process that has not exec'd (it started with its parent's command line and
    /// name) as `/proc` shows it now: servers' workers retitle themselves (`nginx: worker
    /// process`, postgres backends, setproctitle). Kept as it was if the process is gone.
    pub fn retitle(&mut self, pid: u32) {
        let cmdline = process::command_line(pid);
        if !cmdline.is_empty() {
            self.cmdline = cmdline;
        }
        if let Some(comm) = process::comm(pid).filter(|c| !c.is_empty()) {
            self.comm = comm;
        }
    }

    /// Re-reads the address space; keeps the old view if the process is gone.
    pub fn reread(&mut self, pid: u32, now_ns: u64) -> bool {
        match AddressSpace::read(pid) {
            Ok(space) => {
                self.space = match &self.root {
                    Some(_) => space.resolved(pid),
                    None => space,
                };
                self.space_stale = false;
                self.space_read_ns = now_ns;
                self.space_gen += 1;
                true
            }
            Err(_) => false,
        }
    }

    /// The process replaced its image and is now named `comm` (NUL-padded), with command line
    /// `args` (the kernel's copy, and whether it is whole: if not, `/proc`'s is taken when the
    /// process is still there to give it).
    pub fn exec(&mut self, pid: u32, comm: &[u8], (args, whole): (Vec<String>, bool)) {
        self.execs += 1;
        self.python_checked = None;
        let len = comm.iter().position(|b| *b == 0).unwrap_or(comm.len());
        self.comm = String::from_utf8_lossy(&comm[..len]).into_owned();
        self.cmdline = if whole {
            args
        } else {
            Some(process::command_line(pid))
                .filter(|c| !c.is_empty())
                .unwrap_or(args)
        };
        self.root = foreign_root(pid);
        self.cgroup = process::cgroup_of(pid).or(self.cgroup.take());
        // The new image's mappings replace the old ones as they are reported or read: records
        // of them may have been applied already.
        self.space_stale = true;
        self.detect_budget = 64;
    }

    /// Whether the process may run CPython: its name or one of its files says python. Decided
    /// again only when its address space or name changed.
    pub fn may_run_python(&mut self) -> bool {
        if self.python_checked != Some(self.space_gen) {
            self.python_checked = Some(self.space_gen);
            self.may_python = self.comm.contains("python")
                || self.space.mappings().iter().any(|m| {
                    m.path
                        .rsplit('/')
                        .next()
                        .is_some_and(|n| n.contains("python"))
                });
        }
        self.may_python
    }

    /// Growth of outstanding heap bytes (bytes/s) over its life in the trace, or why none is
    /// given.
    pub fn growth(&self) -> Result<f64, String> {
        crate::analysis::growth::heap_rate(self.series.points())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_discovered() {
        let p = Proc::discover(std::process::id());
        assert!(!p.comm.is_empty());
        assert!(
            p.space
                .mappings()
                .iter()
                .any(|m| m.path.contains("memprof"))
        );
    }
}
