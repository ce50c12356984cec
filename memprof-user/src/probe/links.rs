//! Links: probe sets attached to files, for one process or for every process, and detached
//! all at once.
//!
//! One program serves every entry point of a family (the attach cookie tells the functions
//! apart, see `memprof-ebpf/src/alloc.rs`), so a file's probes for one process take one
//! session link (kernel 6.10+), or one entry link and one return link. A session or
//! multi-uprobe link (kernel 6.6+, process-wide pid filter in 6.9+) is one kernel object
//! whatever the number of functions; classic uprobes, the last fallback, take one perf event
//! per function.
//!
//! Detaching waits for an RCU grace period per link: the links are closed from threads side by
//! side, so a set detaches in about the time of one.

use std::{
    collections::BTreeMap,
    num::NonZeroU32,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf,
    programs::{
        UProbe,
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLink, UProbeScope},
    },
    sys::{UProbeMultiFeature, is_uprobe_multi_supported},
};

use super::{counters::ProbeStat, session::SessionProgram};

/// How probes are attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkKind {
    /// One uprobe session link per file and process (kernel 6.10+): entry and return in one
    /// program, the return skipped when the entry says so (see `session`).
    Session,
    /// One multi-uprobe link per file, program and process.
    Multi,
    /// One classic uprobe (a perf event) per function, program and process.
    Classic,
}

impl LinkKind {
    /// Multi links when the kernel has them with a process-wide pid filter, else classic.
    pub fn detect() -> Self {
        match is_uprobe_multi_supported(UProbeMultiFeature::ProcessScopedPidFilter) {
            Ok(true) => Self::Multi,
            _ => Self::Classic,
        }
    }

    /// `session`, `multi` or `classic`, as the start record says.
    pub fn name(self) -> &'static str {
        match self {
            Self::Session => "session",
            Self::Multi => "multi",
            Self::Classic => "classic",
        }
    }
}

/// Which programs a probe set runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// `alloc_entry` / `alloc_return`: the cookie is the function's `AllocFn`.
    Alloc,
    /// `phase_entry` / `phase_return`: the cookie is the phase's index.
    Phase,
}

impl Family {
    /// The (entry, return) programs of the family for `kind`.
    pub fn programs(self, kind: LinkKind) -> (&'static str, &'static str) {
        match (self, kind) {
            (Self::Alloc, LinkKind::Session) => ("alloc_session", "alloc_session"),
            (Self::Alloc, LinkKind::Multi) => ("alloc_entry_multi", "alloc_return_multi"),
            (Self::Alloc, LinkKind::Classic) => ("alloc_entry", "alloc_return"),
            // Phases have no session program: their links are multi ones.
            (Self::Phase, LinkKind::Session | LinkKind::Multi) => {
                ("phase_entry_multi", "phase_return_multi")
            }
            (Self::Phase, LinkKind::Classic) => ("phase_entry", "phase_return"),
        }
    }
}

/// What one file gets: entry probes and return probes, each an offset in the file and the
/// cookie its program reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeSet {
    pub path: PathBuf,
    /// The file as the process names it (for messages).
    pub shown: String,
    pub family: Family,
    pub entries: Vec<(u64, u64)>,
    pub returns: Vec<(u64, u64)>,
}

/// A link memprof holds: one aya made, or a session link (a descriptor).
enum Held {
    Aya(UProbeLink),
    Session(OwnedFd),
}

/// The links memprof holds, by the process they are scoped to (0: every process).
pub struct Links {
    pub kind: LinkKind,
    /// The session program, with `LinkKind::Session`.
    session: Option<SessionProgram>,
    held: BTreeMap<u32, Vec<Held>>,
}

impl Links {
    /// Links of `kind` (`None`: the best the kernel has: sessions, else multi links, else
    /// classic uprobes). Loads the allocator programs.
    pub fn new(ebpf: &mut Ebpf, object: &[u8], kind: Option<LinkKind>) -> Result<Self> {
        let session = match kind {
            Some(LinkKind::Session) => Some(SessionProgram::load(ebpf, object, "alloc_session")?),
            None => SessionProgram::load(ebpf, object, "alloc_session").ok(),
            Some(_) => None,
        };
        let kind = match (&session, kind) {
            (Some(_), _) => LinkKind::Session,
            (None, Some(kind)) => kind,
            (None, None) => LinkKind::detect(),
        };
        let links = Self {
            kind,
            session,
            held: BTreeMap::new(),
        };
        if kind != LinkKind::Session {
            links.load(ebpf, Family::Alloc)?;
        }
        Ok(links)
    }

    /// The session program's statistics, with sessions.
    pub fn session_stats(&self) -> Option<ProbeStat> {
        self.session.as_ref()?.stats()
    }

    /// Loads the programs of `family` (once per trace; objects probed later reuse them).
    pub fn load(&self, ebpf: &mut Ebpf, family: Family) -> Result<()> {
        let (entry, ret) = family.programs(self.kind);
        for name in [entry, ret] {
            uprobe(ebpf, name)?
                .load()
                .with_context(|| format!("the kernel rejected program {name}"))?;
        }
        Ok(())
    }

    /// Attaches `set` for process `pid` (0: every process): returns first, then entries, so
    /// that no entry runs without its return in place.
    pub fn attach(&mut self, ebpf: &mut Ebpf, set: &ProbeSet, pid: u32) -> Result<()> {
        if let (Some(session), Family::Alloc) = (&self.session, set.family) {
            let fd = session
                .attach(&set.path, &set.entries, pid)
                .with_context(|| {
                    format!(
                        "failed to attach {} probes in {}{}",
                        set.entries.len(),
                        set.shown,
                        for_pid(pid)
                    )
                })?;
            self.held.entry(pid).or_default().push(Held::Session(fd));
            return Ok(());
        }
        let scope = NonZeroU32::new(pid).map_or(UProbeScope::AllProcesses, UProbeScope::OneProcess);
        let (entry, ret) = set.family.programs(self.kind);
        let mut links = Vec::new();
        for (program, points, what) in [
            (ret, &set.returns, "return"),
            (entry, &set.entries, "entry"),
        ] {
            if points.is_empty() {
                continue;
            }
            let link = attach_points(ebpf, program, points, &set.path, scope).with_context(|| {
                format!(
                    "failed to attach {} {what} probe{} in {}{}",
                    points.len(),
                    if points.len() == 1 { "" } else { "s" },
                    set.shown,
                    for_pid(pid)
                )
            });
            match link {
                Ok(link) => links.push(Held::Aya(link)),
                Err(e) => {
                    // Nothing half-attached stays: an entry without its return would leave the
                    // thread marked as inside an allocator.
                    detach_all(links);
                    return Err(e);
                }
            }
        }
        self.held.entry(pid).or_default().extend(links);
        Ok(())
    }

    /// Whether links are held for process `pid`.
    pub fn covers(&self, pid: u32) -> bool {
        self.held.contains_key(&pid)
    }

    /// Detaches the links of process `pid` (it exited) on a thread of their own, so the trace
    /// goes on at once.
    pub fn release(&mut self, pid: u32) {
        if let Some(links) = self.held.remove(&pid) {
            let _ = std::thread::Builder::new()
                .name("memprof-detach".into())
                .spawn(move || detach_all(links));
        }
    }

    /// Number of links held.
    pub fn len(&self) -> usize {
        self.held.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Detaches every link; returns how long it took.
    pub fn detach(&mut self) -> Duration {
        let start = Instant::now();
        self.take().detach();
        start.elapsed()
    }

    /// Every link, taken out to be detached elsewhere.
    pub fn take(&mut self) -> Taken {
        Taken(
            std::mem::take(&mut self.held)
                .into_values()
                .flatten()
                .collect(),
        )
    }
}

/// Links taken out of [`Links`], attached until [`Taken::detach`] (or their drop).
pub struct Taken(Vec<Held>);

impl Taken {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Detaches them side by side.
    pub fn detach(self) {
        detach_all(self.0);
    }
}

impl Drop for Links {
    fn drop(&mut self) {
        self.detach();
    }
}

/// The uprobe program `name`.
pub fn uprobe<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut UProbe> {
    let program: &mut UProbe = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("the eBPF object has no program {name}"))?
        .try_into()
        .with_context(|| format!("program {name} is not a uprobe"))?;
    Ok(program)
}

/// Attaches program `name` at `points` (offset, cookie) of `path` and takes the link out of
/// the program, so its lifetime is memprof's to decide.
fn attach_points(
    ebpf: &mut Ebpf,
    name: &str,
    points: &[(u64, u64)],
    path: &Path,
    scope: UProbeScope,
) -> Result<UProbeLink> {
    let program = uprobe(ebpf, name)?;
    let id = program.attach(
        points.iter().map(|&(offset, cookie)| UProbeAttachPoint {
            location: UProbeAttachLocation::AbsoluteOffset(offset),
            cookie: Some(cookie),
        }),
        path,
        scope,
    )?;
    Ok(program.take_link(id)?)
}

/// " for pid N", or nothing for every process.
fn for_pid(pid: u32) -> String {
    if pid == 0 {
        String::new()
    } else {
        format!(" for pid {pid}")
    }
}

/// Detaches `links`, each kernel link closed from a thread of its own (at most 64 at once).
fn detach_all(links: Vec<Held>) {
    const THREADS: usize = 64;
    // A classic link of several functions holds one perf link per function: apart, they
    // detach side by side too.
    let mut parts: Vec<Box<dyn Send>> = Vec::new();
    for link in links {
        match link {
            Held::Session(fd) => parts.push(Box::new(fd)),
            Held::Aya(link) => match link.into_fd_links() {
                Ok(fds) => parts.extend(fds.into_iter().map(|fd| Box::new(fd) as Box<dyn Send>)),
                Err(link) => parts.push(Box::new(link)),
            },
        }
    }
    if parts.len() <= 1 {
        return;
    }
    let per_thread = parts.len().div_ceil(THREADS);
    std::thread::scope(|s| {
        while !parts.is_empty() {
            let chunk: Vec<Box<dyn Send>> = parts.drain(..per_thread.min(parts.len())).collect();
            s.spawn(move || drop(chunk));
        }
    });
}
