//! Process memory beside the traced bytes: the share of resident memory that no traced
//! allocation accounts for.
//!
//! The traced bytes (`totals.outstanding_bytes`, `mmap.outstanding_bytes`) count only what was
//! allocated during the trace; RSS also holds code, stacks, file mappings and whatever was
//! allocated before memprof attached. Putting both side by side tells how much of the process
//! the trace explains.

/// Bytes of resident memory no traced allocation accounts for: rss - (heap outstanding + mmap
/// outstanding), saturating at 0.
///
/// Resident memory and allocated bytes are not the same measure (untouched allocations are
/// not resident, freed memory may stay resident), so this is an estimate, and 0 means the trace
/// accounts for at least as much as is resident.
pub fn untraced_bytes(rss: u64, heap_outstanding: u64, mmap_outstanding: u64) -> u64 {
    rss.saturating_sub(heap_outstanding.saturating_add(mmap_outstanding))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untraced_saturates_at_zero() {
        assert_eq!(untraced_bytes(10_000, 3_000, 2_000), 5_000);
        assert_eq!(untraced_bytes(10_000, 6_000, 4_000), 0, "exactly accounted");
        assert_eq!(
            untraced_bytes(10_000, 9_000, 4_000),
            0,
            "more traced than resident"
        );
        assert_eq!(untraced_bytes(10, u64::MAX, 1), 0, "sum overflow saturates");
    }
}
