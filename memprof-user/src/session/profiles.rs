//! The live profiles (`/debug/pprof/heap`, `/debug/pprof/allocs`): each selected process's
//! samples, taken between two drains of the ring buffer; and the exited processes kept until a
//! profile scrape has seen them.
//!
//! With live endpoints an exited process stays reported until a profile that included it was
//! served after its exit, and 256 processes exited after it (`EXITED_KEPT`): a scraper polling
//! every few seconds sees every process however short its life. Processes no scrape sees are
//! kept up to `EXITED_UNSCRAPED_KEPT`; beyond, the oldest go unseen and are counted
//! (`forgotten.unscraped_processes`, `memprof_forgotten_unscraped_processes_total`).

use super::{EXITED_KEPT, Session};
use crate::{
    report::processes::{FrameCache, LiveSamples, ProcessSamples, process_samples},
    serve::pprof::{ProfileRequest, Selection},
    sys::clock::monotonic_ns,
};

impl Session {
    /// Answers one profile request with what the ring holds now.
    pub(super) fn answer_profile(&mut self, request: ProfileRequest) {
        self.drain_some();
        self.settle();
        let samples = self.live_samples(&request.selection);
        // Nobody waits any more (the client went away): still, the processes were seen.
        let _ = request.answer.send(samples);
        self.evict_scraped(monotonic_ns());
    }

    /// The samples of the processes `selection` names; exited ones are marked seen.
    fn live_samples(&mut self, selection: &Selection) -> LiveSamples {
        let mut out = LiveSamples {
            processes: Vec::new(),
            sample_mean: self.table.sample_mean(),
            elapsed_s: (monotonic_ns() - self.start_ns) as f64 / 1e9,
        };
        let Some(sites) = &self.process_sites else {
            return out;
        };
        let mut cache = FrameCache::default();
        // As the kernel keeps it: 15 bytes.
        let comm: Option<String> = selection
            .comm
            .as_ref()
            .map(|c| c.chars().take(15).collect());
        let mut pids: Vec<u32> = self
            .procs
            .iter_mut()
            .filter(|(pid, p)| {
                selection.pid.is_none_or(|want| want == **pid)
                    && comm.as_ref().is_none_or(|c| *c == p.comm)
            })
            .map(|(pid, p)| {
                // Served, even with nothing to show.
                p.seen_exited |= p.exited;
                *pid
            })
            .collect();
        pids.sort_unstable();
        for pid in pids {
            let (Some(groups), Some(p)) = (sites.process(pid), self.procs.get(&pid)) else {
                continue;
            };
            out.processes.push(ProcessSamples {
                pid,
                comm: p.comm.clone(),
                cgroup: if self.settings.per_process {
                    p.cgroup.clone()
                } else {
                    None
                },
                samples: process_samples(groups, &self.sites, &mut cache),
            });
        }
        out
    }

    /// Forgets the exited processes a scrape has seen, but the `EXITED_KEPT` most recent.
    fn evict_scraped(&mut self, now: u64) {
        let older = self.exited.len().saturating_sub(EXITED_KEPT);
        let (seen, unseen): (Vec<u32>, Vec<u32>) = self
            .exited
            .iter()
            .take(older)
            .partition(|pid| self.procs.get(pid).is_none_or(|p| p.seen_exited));
        if seen.is_empty() {
            return;
        }
        let recent: Vec<u32> = self.exited.iter().skip(older).copied().collect();
        self.exited = unseen.into_iter().chain(recent).collect();
        for pid in seen {
            self.forget_exited(pid, now);
        }
    }
}
