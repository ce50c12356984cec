//! Naming stacks on a thread of its own: loading an object's symbols or DWARF takes from a
//! millisecond to seconds (a large debug file), and the event loop must keep draining the ring
//! meanwhile. The [`Namer`] sends each new stack (with the modules and Python frames it refers
//! to) to its thread, whose [`Symbolizer`] names it; the named frames come back in order.
//!
//! Files of a process under another root are opened, and their debug information looked for,
//! on the calling thread ([`Namer::pin`]), while the process surely lives.

use std::{
    collections::HashSet,
    path::PathBuf,
    sync::mpsc::{Receiver, Sender, channel},
    thread::JoinHandle,
};

use super::{Frame, RawFrame, StackStore, Symbolizer, debuginfo::ObjectInfo, python::PyFrame};

enum Msg {
    /// Modules appended to the store since the last message.
    Modules(Vec<String>),
    /// Python frames appended to the store since the last message.
    Python(Vec<PyFrame>),
    /// An object to read from its open file.
    Pin(String, std::fs::File, ObjectInfo),
    /// A stack to name.
    Name(u64, Vec<RawFrame>),
}

pub struct Namer {
    to: Option<Sender<Msg>>,
    from: Receiver<(u64, Vec<Frame>)>,
    thread: Option<JoinHandle<()>>,
    /// How many of the store's modules and Python frames the thread has.
    modules_sent: usize,
    python_sent: usize,
    /// Stacks sent and not answered yet.
    pending: usize,
    pinned: HashSet<String>,
    debug_dirs: Vec<PathBuf>,
}

impl Namer {
    /// Starts the naming thread; debug files are looked for in `debug_dirs` first (see
    /// `debuginfo`).
    pub fn new(debug_dirs: Vec<PathBuf>) -> Self {
        let (to, inbox) = channel::<Msg>();
        let (outbox, from) = channel();
        let dirs = debug_dirs.clone();
        let thread = std::thread::Builder::new()
            .name("memprof-names".into())
            .spawn(move || {
                let mut symbolizer = Symbolizer::with_debug_dirs(dirs);
                let (mut modules, mut python) = (Vec::new(), Vec::new());
                for msg in inbox {
                    match msg {
                        Msg::Modules(m) => modules.extend(m),
                        Msg::Python(p) => python.extend(p),
                        Msg::Pin(path, file, object) => symbolizer.pin(&path, file, object),
                        Msg::Name(stack, raw) => {
                            let frames = symbolizer.frames(&modules, &python, &raw);
                            if outbox.send((stack, frames)).is_err() {
                                return;
                            }
                        }
                    }
                }
            })
            .ok();
        Self {
            to: Some(to),
            from,
            thread,
            modules_sent: 0,
            python_sent: 0,
            pending: 0,
            pinned: HashSet::new(),
            debug_dirs,
        }
    }

    /// Keeps `path` open and finds its debug information now, on this thread: the path (under a
    /// process's root) stops working when the process exits.
    pub fn pin(&mut self, path: &str) {
        if self.pinned.contains(path) {
            return;
        }
        let Ok(file) = std::fs::File::open(crate::sys::maps::reachable(std::path::Path::new(path)))
        else {
            return;
        };
        self.pinned.insert(path.to_string());
        let object = ObjectInfo::inspect(&super::debuginfo::fd_path(&file), path, &self.debug_dirs);
        self.send(Msg::Pin(path.to_string(), file, object));
    }

    /// Asks for stack `stack` of `store` to be named; false when the store does not hold it.
    pub fn request(&mut self, stack: u64, store: &StackStore) -> bool {
        let Some(raw) = store.get(stack) else {
            return false;
        };
        let raw = raw.to_vec();
        if store.modules().len() > self.modules_sent {
            self.send(Msg::Modules(store.modules()[self.modules_sent..].to_vec()));
            self.modules_sent = store.modules().len();
        }
        let python = store.python_frames();
        if python.len() > self.python_sent {
            self.send(Msg::Python(python[self.python_sent..].to_vec()));
            self.python_sent = python.len();
        }
        self.send(Msg::Name(stack, raw));
        self.pending += 1;
        true
    }

    fn send(&mut self, msg: Msg) {
        if let Some(to) = &self.to
            && to.send(msg).is_err()
        {
            // The thread is gone (it panicked): nothing more will be named.
            self.to = None;
        }
    }

    /// A named stack, if one is ready; with `wait`, waits for one while some are pending.
    pub fn next(&mut self, wait: bool) -> Option<(u64, Vec<Frame>)> {
        if self.pending == 0 {
            return None;
        }
        let got = if wait && self.to.is_some() {
            self.from.recv().ok()
        } else {
            self.from.try_recv().ok()
        };
        if got.is_some() {
            self.pending -= 1;
        } else if self.to.is_none() {
            // Nothing will come: the stacks still pending go unnamed.
            self.pending = 0;
        }
        got
    }

    /// Stacks sent and not answered yet.
    pub fn pending(&self) -> usize {
        self.pending
    }
}

impl Drop for Namer {
    fn drop(&mut self) {
        self.to = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::maps::AddressSpace;

    #[test]
    fn names_stacks_on_its_thread_in_order() {
        let space = AddressSpace::parse("1000-2000 r-xp 00000000 08:01 9 /nonexistent/app\n");
        let mut store = StackStore::new();
        store.insert(1, &[0x1010], &space);
        store.insert(2, &[0x1020, 0x9999], &space);
        let mut namer = Namer::new(Vec::new());
        assert!(namer.request(1, &store));
        assert!(namer.request(2, &store));
        assert!(!namer.request(3, &store), "not stored");
        assert_eq!(namer.pending(), 2);
        let (a, frames_a) = namer.next(true).unwrap();
        let (b, frames_b) = namer.next(true).unwrap();
        assert_eq!((a, b), (1, 2));
        assert_eq!(frames_a[0].module.as_deref(), Some("/nonexistent/app"));
        assert_eq!(frames_a[0].offset, Some(0x10));
        assert_eq!(frames_b.len(), 2);
        assert_eq!(frames_b[1].kind, "unknown");
        assert_eq!(namer.next(true), None, "nothing pending");
    }
}
