//! `--kernel`: where the fields of the kernel's allocation tracepoints lie. The agent reads
//! them from each event's `format` file in tracefs and sets the `KMEM` global; nothing here is
//! hard-coded to one kernel's layout.

/// Byte offsets of the fields the kmem programs read, in each tracepoint's record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KmemFields {
    /// `kmem:kmalloc`: `ptr`, `bytes_req`.
    pub kmalloc_ptr: u32,
    pub kmalloc_bytes: u32,
    /// `kmem:kfree`: `ptr`.
    pub kfree_ptr: u32,
    /// `kmem:kmem_cache_alloc`: `ptr`, `bytes_req`.
    pub cache_alloc_ptr: u32,
    pub cache_alloc_bytes: u32,
    /// `kmem:kmem_cache_free`: `ptr`.
    pub cache_free_ptr: u32,
    /// `kmem:mm_page_alloc`: `pfn`, `order`, `migratetype`.
    pub page_alloc_pfn: u32,
    pub page_alloc_order: u32,
    pub page_alloc_migratetype: u32,
    /// `kmem:mm_page_free`: `pfn`, `order`.
    pub page_free_pfn: u32,
    pub page_free_order: u32,
    /// `percpu:percpu_alloc_percpu`: `ptr`, `bytes_alloc` (the size times the possible CPUs).
    pub percpu_alloc_ptr: u32,
    pub percpu_alloc_bytes: u32,
    /// `percpu:percpu_free_percpu`: `ptr`.
    pub percpu_free_ptr: u32,
    /// 1 when set (the programs do nothing before).
    pub ready: u32,
    pub _pad: u32,
}

/// Size of the `KMEM_LIVE` map: kernel blocks of the traced processes alive at once. Beyond
/// it an allocation is not recorded and `Counter::KmemFull` counts it.
pub const DEFAULT_KMEM_ENTRIES: u32 = 256 * 1024;

/// The kernel's `MIGRATE_MOVABLE`: pages of this type become the process's own (anonymous
/// memory, page cache) and are its RSS, not kernel memory it holds.
pub const MIGRATE_MOVABLE: i32 = 1;

/// Pages and per-CPU areas are named by made-up addresses that no slab object, and no user
/// address, has: a page by its frame number under `PAGE_TAG`, a per-CPU area by its pointer
/// (an offset, which can look like a user address) under `PERCPU_TAG`.
pub const PAGE_TAG: u64 = 0xfffd << 48;
pub const PERCPU_TAG: u64 = 0xfffe << 48;
