//! Expected facts: the fixtures' documented workloads, cross-checked outside memprof (see the
//! crate's documentation).

/// One allocation site of a fixture: the leak groups whose `stack[0].function` is `function`,
/// summed, must have exactly these bytes and allocs, and every group must have one of
/// `allocators` and this `kind`.
pub(crate) struct SiteFact {
    pub(crate) function: &'static str,
    pub(crate) bytes: u64,
    pub(crate) allocs: u64,
    pub(crate) allocators: &'static [&'static str],
    pub(crate) kind: &'static str,
}

pub(crate) const fn site(
    function: &'static str,
    bytes: u64,
    allocs: u64,
    allocators: &'static [&'static str],
    kind: &'static str,
) -> SiteFact {
    SiteFact {
        function,
        bytes,
        allocs,
        allocators,
        kind,
    }
}

/// alloc_sites.c: what is outstanding at exit. In glibc 2.36 `aligned_alloc` and `memalign` are
/// one function (same address), so either name is accepted for both sites. The contract does
/// not name the allocator of realloc(NULL, n) or of reallocarray, so the outer call's name or
/// the inner one glibc makes are both accepted there; bytes and counts are exact everywhere.
pub(crate) const ALLOC_SITES: &[SiteFact] = &[
    site("leak_malloc", 10 * 1000, 10, &["malloc"], "heap"),
    site("leak_calloc", 5 * 3 * 1001, 5, &["calloc"], "heap"),
    site("leak_realloc", 4 * 2500, 4, &["realloc"], "heap"),
    site(
        "leak_realloc_null",
        3 * 777,
        3,
        &["realloc", "malloc"],
        "heap",
    ),
    site(
        "leak_reallocarray",
        3 * 7 * 1003,
        3,
        &["reallocarray", "realloc"],
        "heap",
    ),
    site(
        "leak_posix_memalign",
        6 * 4099,
        6,
        &["posix_memalign"],
        "heap",
    ),
    site(
        "leak_aligned_alloc",
        4 * 5120,
        4,
        &["aligned_alloc", "memalign"],
        "heap",
    ),
    site(
        "leak_memalign",
        3 * 6007,
        3,
        &["memalign", "aligned_alloc"],
        "heap",
    ),
    site("leak_valloc", 2 * 7001, 2, &["valloc"], "heap"),
    site("leak_pvalloc", 2 * 8192, 2, &["pvalloc"], "heap"),
    site("leak_big", 2 * 4 * 1024 * 1024, 2, &["malloc"], "heap"),
    site("leak_mmap", 12 * 4096, 1, &["mmap"], "mmap"),
];

/// alloc_sites.c functions that allocate but free everything (or fail), so they must not be
/// `stack[0]` of any leak group.
pub(crate) const ALLOC_SITES_FREED: &[&str] = &[
    "realloc_origin",
    "realloc_zero",
    "alloc_then_free",
    "free_them",
    "churn",
    "pre_alloc",
    "free_pre",
    "fail_alloc",
    "warm_up",
];

/// leak_mremap: mmap(4 pages) then mremap to 6 pages; 24576 bytes stay mapped.
pub(crate) const MREMAP_BYTES: u64 = 6 * 4096;

/// Exact malloc-family totals of an alloc_sites run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TotalsFact {
    pub(crate) allocs: u64,
    pub(crate) frees: u64,
    pub(crate) bytes_allocated: u64,
    pub(crate) bytes_freed: u64,
    pub(crate) outstanding_allocs: u64,
    pub(crate) outstanding_bytes: u64,
    pub(crate) unmatched_frees: u64,
}

/// alloc_sites --wait, window after SIGUSR1. Allocations: alloc_then_free 20x1500,
/// churn 100000x72, realloc_zero 2222, leak_malloc 10x1000, leak_calloc 5x3003,
/// realloc_origin 4x500, leak_realloc 4x2500, leak_realloc_null 3x777, leak_reallocarray
/// 3x64 + 3x7021, leak_posix_memalign 6x4099, leak_aligned_alloc 4x5120, leak_memalign 3x6007,
/// leak_valloc 2x7001, leak_pvalloc 2x8192, leak_big 2x4194304 = 100072 allocs, 15774912 bytes.
/// Matched frees: 20 + 100000 + 4 (realloc) + 1 (realloc(p, 0)) + 3 (reallocarray) = 100028,
/// 30000 + 7200000 + 2000 + 2222 + 192 = 7234414 bytes. free_pre frees the 5 blocks of
/// pre_alloc, made before the window: 5 unmatched frees. free(NULL) and the failed malloc,
/// calloc and posix_memalign count nowhere.
pub(crate) const ALLOC_SITES_WINDOW: TotalsFact = TotalsFact {
    allocs: 100_072,
    frees: 100_028,
    bytes_allocated: 15_774_912,
    bytes_freed: 7_234_414,
    outstanding_allocs: 44,
    outstanding_bytes: 8_540_498,
    unmatched_frees: 5,
};

/// alloc_sites spawned: the window plus pre_alloc's 5x1234 (then matched by free_pre). Nothing
/// else in the process's life calls the malloc family (checked with a uprobe counter from exec).
pub(crate) const ALLOC_SITES_SPAWN: TotalsFact = TotalsFact {
    allocs: 100_077,
    frees: 100_033,
    bytes_allocated: 15_781_082,
    bytes_freed: 7_240_584,
    outstanding_allocs: 44,
    outstanding_bytes: 8_540_498,
    unmatched_frees: 0,
};

/// Direct anonymous mmap outstanding at alloc_sites' exit: 12 pages of leak_mmap + 6 of
/// leak_mremap. The two 4 MiB mallocs' mmaps are made inside malloc and count nowhere here.
pub(crate) const ALLOC_SITES_MMAP_OUTSTANDING: u64 = 12 * 4096 + 6 * 4096;
/// In spawn mode the dynamic loader's own anonymous maps before main (8192 + 53072 + 12288
/// bytes on Debian 12: its scratch page, libc's .bss, the TLS block) may be included too.
pub(crate) const LOADER_ANON_MAPS: u64 = 8192 + 53072 + 12288;

/// threads.c: 4 workers x 250 x malloc(48) leaked in thread_leak.
pub(crate) const THREAD_LEAK: SiteFact =
    site("thread_leak", 4 * 250 * 48, 4 * 250, &["malloc"], "heap");
/// threads --wait, window after SIGUSR1: 4 x (250 + 25000) mallocs; 4 x 25000 matched frees.
/// (glibc's tcache shutdown at each thread's exit frees 3 addresses that are not live
/// allocations: 12 unmatched frees on glibc 2.36, not asserted.)
pub(crate) const THREADS_WINDOW: TotalsFact = TotalsFact {
    allocs: 101_000,
    frees: 100_000,
    bytes_allocated: 4 * (250 * 48 + 25_000 * 40),
    bytes_freed: 4 * 25_000 * 40,
    outstanding_allocs: 1000,
    outstanding_bytes: 48_000,
    unmatched_frees: u64::MAX, // not asserted
};

/// ctypes_native.py: 7 x malloc(123457) through ctypes, 2 freed.
pub(crate) const PY_SIZE: u64 = 123_457;
pub(crate) const PY_OUTSTANDING: u64 = 5;

pub(crate) const MALLOC_FAMILY: &[&str] = &[
    "malloc",
    "calloc",
    "realloc",
    "reallocarray",
    "posix_memalign",
    "aligned_alloc",
    "memalign",
    "valloc",
    "pvalloc",
    "free",
];
