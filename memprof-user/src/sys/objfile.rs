//! ELF files that traced processes control, read without trusting them: never whole, only the
//! headers, tables and strings a parser asks for, through positioned reads, with a cap per
//! object ([`MAX_OBJECT_BYTES`]) and a cap on what every open object holds at once
//! ([`MAX_TOTAL_BYTES`]). A file that is not a regular file (a FIFO swapped in, a device) is
//! refused before any read, and a read past what the file holds fails instead of faulting, as
//! a mapping of a file truncated under it would.
//!
//! [`ObjectFile`] implements `object`'s `ReadRef`, so `object::File::parse(&file)` works on it
//! as on a byte slice; [`ObjectFile::refusal`] tells why a parse failed when a cap was hit.

use std::{
    cell::RefCell,
    collections::HashMap,
    fs::File,
    io,
    ops::Range,
    os::unix::fs::{FileExt as _, OpenOptionsExt as _},
    path::Path,
    sync::atomic::{AtomicU64, Ordering},
};

/// Bytes one object may have read into memory (its symbol and string tables, headers, code).
pub const MAX_OBJECT_BYTES: u64 = 256 << 20;
/// Bytes all open objects may hold at once.
pub const MAX_TOTAL_BYTES: u64 = 512 << 20;
/// String tables are read in blocks of this size.
const CHUNK: u64 = 64 << 10;
/// The longest string (symbol name) read.
const MAX_STRING: u64 = 64 << 10;

/// What every open [`ObjectFile`] holds, in bytes.
static HELD: AtomicU64 = AtomicU64::new(0);

/// Bytes held by every open object now.
pub fn held_bytes() -> u64 {
    HELD.load(Ordering::Relaxed)
}

/// An ELF file opened for bounded reads.
pub struct ObjectFile {
    file: File,
    shown: String,
    len: u64,
    limit: u64,
    state: RefCell<State>,
}

#[derive(Default)]
struct State {
    used: u64,
    /// The read that was refused: (offset, size, why).
    refused: Option<(u64, u64, &'static str)>,
    exact: HashMap<(u64, u64), Box<[u8]>>,
    chunks: HashMap<u64, Box<[u8]>>,
    strings: HashMap<u64, Box<[u8]>>,
}

impl ObjectFile {
    /// Opens `path` (following links: `/proc/PID/exe`, `/proc/PID/root/...`); fails unless it is
    /// a regular file.
    pub fn open(path: &Path) -> io::Result<Self> {
        Self::open_limited(path, MAX_OBJECT_BYTES)
    }

    /// [`ObjectFile::open`] with a per-object cap of `limit` bytes.
    pub fn open_limited(path: &Path, limit: u64) -> io::Result<Self> {
        // Non-blocking: a FIFO put in the file's place must not hang the open.
        let file = File::options()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(crate::sys::maps::reachable(path))?;
        Self::from_file(file, path.display().to_string(), limit)
    }

    /// An object read from `file`, opened by the caller (shown in refusals as `shown`), with a
    /// per-object cap of `limit` bytes; fails unless it is a regular file.
    pub fn from_file(file: File, shown: String, limit: u64) -> io::Result<Self> {
        let meta = file.metadata()?;
        if !meta.file_type().is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{shown} is not a regular file"),
            ));
        }
        Ok(Self {
            file,
            shown,
            len: meta.len(),
            limit,
            state: RefCell::default(),
        })
    }

    /// The open file, for reads that bypass the cache (and its cap: the caller bounds them).
    pub fn raw(&self) -> &File {
        &self.file
    }

    /// The file's size.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes read into memory so far.
    pub fn used(&self) -> u64 {
        self.state.borrow().used
    }

    /// Why a read was refused, as one line, if one was: the cap it would have crossed.
    pub fn refusal(&self) -> Option<String> {
        let (offset, size, why) = self.state.borrow().refused?;
        Some(format!(
            "{}: refused to read {size} bytes at offset {offset}: {why}",
            self.shown
        ))
    }

    /// `size` bytes at `offset`, or None (past the end, or over a cap).
    pub fn bytes(&self, offset: u64, size: u64) -> Option<&[u8]> {
        object::ReadRef::read_bytes_at(self, offset, size).ok()
    }

    /// The first `max` bytes of the file (fewer if it is shorter).
    pub fn head(&self, max: u64) -> Option<&[u8]> {
        self.bytes(0, max.min(self.len))
    }

    /// Reserves `size` bytes against both caps; records the refusal otherwise.
    fn reserve(&self, state: &mut State, offset: u64, size: u64) -> Result<(), ()> {
        let refuse = |state: &mut State, why| {
            state.refused.get_or_insert((offset, size, why));
            Err(())
        };
        if offset.checked_add(size).is_none_or(|end| end > self.len) {
            return Err(());
        }
        if state.used.saturating_add(size) > self.limit {
            return refuse(
                state,
                "over the per-object cap (hostile or corrupt object?)",
            );
        }
        let held = HELD.fetch_add(size, Ordering::Relaxed);
        if held.saturating_add(size) > MAX_TOTAL_BYTES {
            HELD.fetch_sub(size, Ordering::Relaxed);
            return refuse(state, "over the cap on objects read at once");
        }
        state.used += size;
        Ok(())
    }

    fn read_new(&self, state: &mut State, offset: u64, size: u64) -> Result<Box<[u8]>, ()> {
        self.reserve(state, offset, size)?;
        let mut buf = vec![0u8; size as usize].into_boxed_slice();
        // A file truncated under the reader fails here (short read), never with SIGBUS.
        self.file.read_exact_at(&mut buf, offset).map_err(|_| ())?;
        Ok(buf)
    }

    fn chunk(&self, state: &mut State, index: u64) -> Result<*const [u8], ()> {
        if let Some(c) = state.chunks.get(&index) {
            return Ok(&**c as *const [u8]);
        }
        let start = index * CHUNK;
        let size = CHUNK.min(self.len.saturating_sub(start));
        let c = self.read_new(state, start, size)?;
        let ptr = &*c as *const [u8];
        state.chunks.insert(index, c);
        Ok(ptr)
    }
}

impl Drop for ObjectFile {
    fn drop(&mut self) {
        HELD.fetch_sub(self.state.get_mut().used, Ordering::Relaxed);
    }
}

/// Extends a borrow of a buffer owned by `state` to the reader's lifetime: buffers are boxed,
/// never removed nor mutated until the reader is dropped.
///
/// # Safety
/// `ptr` must point into a `Box<[u8]>` held by an `ObjectFile`'s state, which outlives `'a`.
unsafe fn extend<'a>(ptr: *const [u8]) -> &'a [u8] {
    // SAFETY: see the function's contract.
    unsafe { &*ptr }
}

impl<'a> object::ReadRef<'a> for &'a ObjectFile {
    fn len(self) -> Result<u64, ()> {
        Ok(self.len)
    }

    fn read_bytes_at(self, offset: u64, size: u64) -> Result<&'a [u8], ()> {
        if size == 0 {
            return Ok(&[]);
        }
        let state = &mut *self.state.borrow_mut();
        // Small reads inside one block share it (headers, symbols one at a time).
        let end = offset.checked_add(size).ok_or(())?;
        if size <= 4096 && offset / CHUNK == (end - 1) / CHUNK && end <= self.len {
            let index = offset / CHUNK;
            let c = self.chunk(state, index)?;
            // SAFETY: the chunk is owned by `state` for the reader's life.
            let c = unsafe { extend(c) };
            let at = (offset - index * CHUNK) as usize;
            return c.get(at..at + size as usize).ok_or(());
        }
        if let Some(b) = state.exact.get(&(offset, size)) {
            // SAFETY: as above.
            return Ok(unsafe { extend(&**b) });
        }
        let b = self.read_new(state, offset, size)?;
        let ptr = &*b as *const [u8];
        state.exact.insert((offset, size), b);
        // SAFETY: as above.
        Ok(unsafe { extend(ptr) })
    }

    fn read_bytes_at_until(self, range: Range<u64>, delimiter: u8) -> Result<&'a [u8], ()> {
        let end = range.end.min(self.len);
        if range.start >= end {
            return Err(());
        }
        let state = &mut *self.state.borrow_mut();
        let index = range.start / CHUNK;
        let c = self.chunk(state, index)?;
        // SAFETY: the chunk is owned by `state` for the reader's life.
        let c = unsafe { extend(c) };
        let at = (range.start - index * CHUNK) as usize;
        let upto = ((end - index * CHUNK) as usize).min(c.len());
        let in_chunk = &c[at..upto];
        if let Some(n) = in_chunk.iter().position(|b| *b == delimiter) {
            return Ok(&in_chunk[..n]);
        }
        if upto as u64 + index * CHUNK >= end {
            return Err(());
        }
        // A string across a block boundary: read it on its own.
        if let Some(s) = state.strings.get(&range.start) {
            // SAFETY: as above.
            return Ok(unsafe { extend(&**s) });
        }
        let size = (end - range.start).min(MAX_STRING);
        let b = self.read_new(state, range.start, size)?;
        let n = b.iter().position(|x| *x == delimiter).ok_or(())?;
        let ptr = &b[..n] as *const [u8];
        state.strings.insert(range.start, b);
        // SAFETY: as above.
        Ok(unsafe { extend(ptr) })
    }
}

#[cfg(test)]
mod tests {
    use object::{Object as _, ObjectSymbol as _};

    use super::*;

    fn temp(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("memprof-objfile-{}-{name}", std::process::id()))
    }

    #[test]
    fn parses_own_executable_within_its_cap() {
        let exe = std::env::current_exe().unwrap();
        let f = ObjectFile::open(&exe).unwrap();
        let obj = object::File::parse(&f).unwrap();
        assert!(obj.symbols().any(|s| s.name() == Ok("main")));
        assert!(f.used() < f.len(), "{} of {}", f.used(), f.len());
        assert!(held_bytes() >= f.used());
    }

    #[test]
    fn caps_refuse_with_a_reason() {
        let exe = std::env::current_exe().unwrap();
        let f = ObjectFile::open_limited(&exe, 4096).unwrap();
        let parsed = object::File::parse(&f).map(|o| o.symbols().count());
        assert!(parsed.is_err() || f.refusal().is_some());
        assert!(f.used() <= 4096);
        let why = f.refusal().unwrap();
        assert!(why.contains("per-object cap"), "{why}");
    }

    #[test]
    fn sparse_file_is_not_read_whole() {
        let path = temp("sparse");
        let file = File::create(&path).unwrap();
        file.set_len(8 << 30).unwrap();
        drop(file);
        let f = ObjectFile::open(&path).unwrap();
        assert!(object::File::parse(&f).is_err());
        assert!(f.used() <= CHUNK, "{}", f.used());
        assert!(f.bytes(0, 1 << 30).is_none(), "over the cap");
        assert!(f.refusal().unwrap().contains("cap"));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn non_regular_files_are_refused() {
        let e = ObjectFile::open(Path::new("/dev/zero")).err().unwrap();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let fifo = temp("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = ObjectFile::open(&fifo).err().unwrap();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        std::fs::remove_file(&fifo).unwrap();
    }

    #[test]
    fn reads_past_the_end_fail() {
        let path = temp("short");
        std::fs::write(&path, b"\x7fELF-short").unwrap();
        let f = ObjectFile::open(&path).unwrap();
        assert_eq!(f.head(4), Some(&b"\x7fELF"[..]));
        assert_eq!(f.head(100).map(<[u8]>::len), Some(10));
        assert!(f.bytes(8, 4).is_none());
        assert!(f.bytes(u64::MAX, 2).is_none());
        std::fs::remove_file(&path).unwrap();
    }
}
