//! Property-based fuzzing (proptest, on stable) of everything that reads bytes a traced process
//! or another user controls: the ring's event decoder, the kernel's mapping records, ELF
//! objects (the bounded reader, the compressed-section check, symbol lookup, allocator
//! detection), CPython's interpreter memory (thread lists, frame chains, code objects, strings,
//! line tables), and saved reports (`memprof diff`).
//!
//! Each target mutates seeds (built here, and the corpus checked in under
//! `tests/fixtures/fuzz/TARGET/`) and random bytes for `MEMPROF_FUZZ_SECS` seconds (default 2),
//! and fails with the shrunk input on a panic or a bound broken (a Python walk that does not
//! end within its budget). `MEMPROF_FUZZ_SECS=600 cargo test --release -p memprof-user --lib
//! fuzz` runs each for ten minutes.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use proptest::{
    prelude::*,
    test_runner::{Config, TestCaseError, TestRunner},
};

/// Runs `check` on inputs from `strategy` for the fuzzing time; panics with the shrunk input on
/// a failure.
fn fuzz<S: Strategy>(name: &str, strategy: S, check: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    let secs: f64 = std::env::var("MEMPROF_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    const BATCH: u32 = 256;
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut cases = 0u64;
    let mut batch = 0u64;
    while Instant::now() < deadline {
        // A runner per batch, each with its own seed (batch number): runs are reproducible
        // and every batch tries new inputs.
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&batch.to_le_bytes());
        let rng = proptest::test_runner::TestRng::from_seed(
            proptest::test_runner::RngAlgorithm::ChaCha,
            &seed,
        );
        let config = Config {
            cases: BATCH,
            failure_persistence: None,
            ..Config::default()
        };
        let mut runner = TestRunner::new_with_rng(config, rng);
        if let Err(e) = runner.run(&strategy, &check) {
            panic!("fuzz target {name} failed in batch {batch} after {cases} cases: {e}");
        }
        cases += u64::from(BATCH);
        batch += 1;
    }
    eprintln!("fuzz {name}: {cases} cases in {secs} s");
}

/// The checked-in corpus of `target`.
fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/fuzz")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    files.iter().filter_map(|f| std::fs::read(f).ok()).collect()
}

/// Values that break arithmetic: edges, sizes that overflow, lengths past any file.
const WORDS: &[u64] = &[
    0,
    1,
    7,
    0xff,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    1 << 32,
    1 << 36,
    1 << 40,
    u64::MAX / 2,
    u64::MAX - 1,
    u64::MAX,
];

/// Bytes from mutating one of `seeds` (byte edits, little-endian words from [`WORDS`] at any
/// offset, a cut) or plain random bytes.
fn mutated(seeds: Vec<Vec<u8>>) -> BoxedStrategy<Vec<u8>> {
    assert!(!seeds.is_empty());
    let n = seeds.len();
    let edits = proptest::collection::vec((any::<usize>(), any::<u8>()), 0..16);
    let words = proptest::collection::vec((any::<usize>(), 0..WORDS.len(), 1..=8usize), 0..6);
    prop_oneof![
        1 => proptest::collection::vec(any::<u8>(), 0..512),
        4 => (0..n, edits, words, proptest::option::of(any::<usize>())).prop_map(
            move |(i, edits, words, cut)| {
                let mut v = seeds[i].clone();
                if v.is_empty() {
                    return v;
                }
                let len = v.len();
                for (at, b) in edits {
                    v[at % len] = b;
                }
                for (at, w, width) in words {
                    let at = at % len;
                    let bytes = WORDS[w].to_le_bytes();
                    let end = (at + width).min(len);
                    v[at..end].copy_from_slice(&bytes[..end - at]);
                }
                if let Some(cut) = cut {
                    v.truncate(cut % (len + 1));
                }
                v
            }
        ),
    ]
    .boxed()
}

/// A file holding `bytes` for the duration of a case.
struct Temp(PathBuf);

impl Temp {
    fn new(tag: &str, bytes: &[u8]) -> Temp {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "memprof-fuzz-{}-{tag}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&p, bytes).unwrap();
        Temp(p)
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn fuzz_event_decoder() {
    use memprof_common::{AllocEvent, EVENT_VERSION, EventHeader};

    use crate::ingest::event::{decode, decode_record, encode};
    let mut seeds = corpus("events");
    let header = EventHeader {
        version: EVENT_VERSION,
        kind: 1,
        func: 1,
        tid: 7,
        ..Default::default()
    };
    seeds.push(encode(&AllocEvent {
        header,
        ..Default::default()
    }));
    for kind in 0..16u16 {
        seeds.push(encode(&EventHeader { kind, ..header }));
    }
    fuzz("event decoder", mutated(seeds), |bytes| {
        let _ = decode(&bytes);
        if let Ok(r) = decode_record(&bytes)
            && let Some(copy) = r.copy
        {
            prop_assert!(copy.stack.len() <= bytes.len());
        }
        Ok(())
    });
}

#[test]
fn fuzz_mapping_records() {
    use crate::ingest::mmaps::parse_mmap2;
    let mut seeds = corpus("mmap2");
    let mut r = vec![0u8; 72];
    r[16..24].copy_from_slice(&0x7f00_0000_0000u64.to_ne_bytes());
    r[24..32].copy_from_slice(&0x1000u64.to_ne_bytes());
    r.extend_from_slice(b"/usr/lib/x86_64-linux-gnu/libc.so.6\0\0\0\0\0");
    seeds.push(r);
    fuzz(
        "mapping records",
        (mutated(seeds), any::<u16>()),
        |(bytes, misc)| {
            if let Some(m) = parse_mmap2(&bytes, misc) {
                prop_assert!(m.mapping.start <= m.mapping.end);
                prop_assert!(m.mapping.path.starts_with('/'));
            }
            Ok(())
        },
    );
}

#[test]
fn fuzz_elf_objects() {
    use object::{Object as _, ObjectSymbol as _};

    use crate::{
        probe::{allocators, loader::Candidate, plan},
        sys::{elfcheck, objfile::ObjectFile},
    };
    let mut seeds = corpus("elf");
    // A small real object: the C library's loader is on every Linux this runs on.
    for lib in ["/lib64/ld-linux-x86-64.so.2", "/lib/ld-musl-x86_64.so.1"] {
        if let Ok(b) = std::fs::read(lib) {
            seeds.push(b);
            break;
        }
    }
    let text = b"debug text ".repeat(50);
    use crate::sys::elfcheck::tests::{Part, chdr, elf, zlib};
    seeds.push(elf(&[
        Part {
            name: ".symtab",
            kind: 2,
            flags: 0,
            data: vec![0; 48],
            size: None,
        },
        Part {
            name: ".debug_info",
            kind: 1,
            flags: 0x800,
            data: chdr(text.len() as u64, &zlib(&text)),
            size: None,
        },
    ]));
    fuzz("ELF objects", mutated(seeds), |bytes| {
        let f = Temp::new("elf", &bytes);
        let _ = elfcheck::check_object(&f.0);
        let file = ObjectFile::open(&f.0).unwrap();
        if let Ok(obj) = object::File::parse(&file) {
            for s in obj.symbols().chain(obj.dynamic_symbols()).take(100_000) {
                let _ = s.name();
            }
            let _ = crate::sys::elf::interpreter(&obj);
        }
        prop_assert!(file.used() <= crate::sys::objfile::MAX_OBJECT_BYTES);
        let _ = plan::resolve_symbols(&file, &f.0, ["malloc", "free", "_Znwm"]);
        let candidate = Candidate {
            path: f.0.clone(),
            shown: f.0.display().to_string(),
            executable: true,
        };
        let _ = allocators::detect(&[candidate], "fuzz");
        Ok(())
    });
}

#[test]
fn fuzz_saved_reports() {
    use crate::{analysis::diff, output::text, report::saved};
    let mut seeds = corpus("report");
    let before = diff::tests::before();
    let after = diff::tests::after();
    seeds.push(serde_json::to_vec(&after).unwrap());
    let mut stream = serde_json::to_vec(&before).unwrap();
    stream.push(b'\n');
    stream.extend(serde_json::to_vec(&after).unwrap());
    seeds.push(stream);
    fuzz("saved reports", mutated(seeds), |bytes| {
        let f = Temp::new("report", &bytes);
        if let Ok(v) = saved::load_report(&f.0) {
            for d in [diff::diff(&before, &v), diff::diff(&v, &v)]
                .into_iter()
                .flatten()
            {
                let _ = text::render_diff(&d, 20);
                let _ = diff::grows_beyond(&d, 5.0);
            }
        }
        Ok(())
    });
}

#[test]
fn fuzz_python_line_tables() {
    use crate::stacks::python::{linetable310_line, lnotab_line, locations_line};
    let strategy = (
        proptest::collection::vec(any::<u8>(), 0..256),
        any::<i32>(),
        any::<i64>(),
    );
    fuzz("Python line tables", strategy, |(table, first, at)| {
        let _ = lnotab_line(&table, first, at);
        let _ = linetable310_line(&table, first, at);
        let _ = locations_line(&table, first, at);
        Ok(())
    });
}

/// CPython's interpreter memory, crafted: a block of words in this very process, each word
/// zero, random, or a pointer into the block (so lists, chains and objects point at each
/// other, in cycles too), read through the real reader as another process's memory would be.
#[test]
fn fuzz_python_interpreter_memory() {
    use crate::stacks::python::{PyOffsets, PyProcess, PyVersion, Resolver};
    const WORDS_IN_BLOCK: usize = 2048;
    let word = prop_oneof![
        3 => (0..WORDS_IN_BLOCK).prop_map(|i| (1u8, i as u64)),
        1 => Just((0u8, 0u64)),
        1 => any::<u64>().prop_map(|v| (2u8, v)),
        1 => (0..WORDS.len()).prop_map(|i| (2u8, WORDS[i])),
    ];
    let strategy = (
        proptest::collection::vec(word, WORDS_IN_BLOCK),
        8u8..=13,
        any::<bool>(),
    );
    fuzz(
        "Python interpreter memory",
        strategy,
        |(words, minor, typed)| {
            let mut block = vec![0u64; WORDS_IN_BLOCK];
            let base = block.as_ptr() as u64;
            for (slot, (kind, v)) in block.iter_mut().zip(&words) {
                *slot = match kind {
                    1 => base + 8 * v,
                    _ => *v,
                };
            }
            let offsets = PyOffsets::for_version(3, minor).unwrap();
            let process = PyProcess {
                pid: std::process::id(),
                version: PyVersion {
                    major: 3,
                    minor,
                    micro: 0,
                },
                object: "fuzz".into(),
                bias: 0,
                runtime: base,
                // With a type, code objects must point at it: some of the block's words do.
                code_type: typed.then_some(base + 8),
                from_debug_offsets: false,
                offsets,
                eval_loop: Vec::new(),
            };
            let started = Instant::now();
            let mut r = Resolver::with_process(process);
            let _ = r.thread_ids(Instant::now() + Duration::from_millis(200));
            if let Ok(states) = r.thread_states() {
                for tstate in states.into_iter().take(8) {
                    if let Ok(pairs) = r.frame_pairs(tstate) {
                        for (code, instr) in pairs.into_iter().take(16) {
                            if let Ok(frame) = r.resolve(code, instr) {
                                prop_assert!(frame.function.len() <= 4 * 16 * 1024);
                            }
                        }
                    }
                }
            }
            prop_assert!(
                started.elapsed() < Duration::from_secs(5),
                "a walk took {:?}",
                started.elapsed()
            );
            drop(block);
            Ok(())
        },
    );
}

/// Writes the seeds of each target to `tests/fixtures/fuzz/` (run by hand with
/// `MEMPROF_FUZZ_WRITE_CORPUS=1`).
#[test]
fn write_corpus() {
    if std::env::var_os("MEMPROF_FUZZ_WRITE_CORPUS").is_none() {
        return;
    }
    use crate::sys::elfcheck::tests::{Part, chdr, elf, zlib};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/fuzz");
    let write = |target: &str, name: &str, bytes: &[u8]| {
        std::fs::create_dir_all(dir.join(target)).unwrap();
        std::fs::write(dir.join(target).join(name), bytes).unwrap();
    };
    let symtab = || Part {
        name: ".symtab",
        kind: 2,
        flags: 0,
        data: vec![0; 48],
        size: None,
    };
    let debug = |data| Part {
        name: ".debug_info",
        kind: 1,
        flags: 0x800,
        data,
        size: None,
    };
    write(
        "elf",
        "claims-64g",
        &elf(&[symtab(), debug(chdr(64 << 30, &zlib(b"x")))]),
    );
    write(
        "elf",
        "claims-max",
        &elf(&[symtab(), debug(chdr(u64::MAX, &zlib(b"x")))]),
    );
    write(
        "elf",
        "bomb-1m",
        &elf(&[symtab(), debug(chdr(1 << 20, &zlib(&vec![0u8; 4 << 20])))]),
    );
    let d = crate::analysis::diff::tests::after();
    write("report", "after.json", &serde_json::to_vec(&d).unwrap());
    write("report", "deep.json", "[".repeat(200).as_bytes());
    let mut r = vec![0u8; 72];
    r[24..32].copy_from_slice(&u64::MAX.to_ne_bytes());
    r.extend_from_slice(b"/tmp/a\nb.so (deleted)\0");
    write("mmap2", "wrapping-len", &r);
    use memprof_common::{EVENT_VERSION, EventHeader};
    let h = EventHeader {
        version: EVENT_VERSION,
        kind: 2,
        func: 1,
        ..Default::default()
    };
    write("events", "header-only", &crate::ingest::event::encode(&h));
}
