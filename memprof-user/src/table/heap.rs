//! The outstanding heap blocks of one process, stored compactly.
//!
//! A traced process can hold millions of blocks, so what memprof keeps per block is most of
//! its memory. A block is stored in 24 bytes with its address: the address, the time stamp, the
//! size when it fits 32 bits (larger sizes go to a side map), and the index of its site (stack,
//! allocator, realloc chain), interned once per table. Every field of [`LiveAlloc`] comes back
//! exactly.
//!
//! The blocks are spread over [`SHARDS`] hash maps by a hash of their address: a map that
//! grows copies itself into one twice its size, and with shards only one shard's copy exists at
//! a time, not a second copy of everything.

use std::{
    collections::{HashMap, hash_map::Entry},
    hash::BuildHasher,
};

use memprof_common::AllocFn;

use super::LiveAlloc;

/// Shards of the block maps: a power of two.
const SHARDS: usize = 32;

/// `size` of a stored block whose size is in [`HeapBlocks::big`].
const BIG: u32 = u32::MAX;

/// The part of a block the map stores beside its address.
#[derive(Clone, Copy, Debug)]
struct Packed {
    ts_ns: u64,
    /// The size, or [`BIG`].
    size: u32,
    /// Index into [`HeapBlocks::sites`], with [`CHAINED`] set when the block's realloc chain
    /// is in [`HeapBlocks::chains`].
    site: u32,
}

/// `Packed::site` flag: the block came from a realloc (its chain length is not 0).
const CHAINED: u32 = 1 << 31;

/// What blocks of one call site share. (Not the realloc chain: one buffer reallocated again
/// and again would add a site per length.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Site {
    stack: u64,
    func: AllocFn,
}

/// The maps' hasher: fast for integer keys and seeded at random per table, like std's SipHash
/// (a traced process can choose its mapping addresses), though not as strong.
type Seeded = foldhash::fast::RandomState;

type IntMap<K, V> = HashMap<K, V, Seeded>;

#[derive(Debug, Default)]
pub struct HeapBlocks {
    seed: Seeded,
    /// Empty until the first block.
    shards: Vec<IntMap<u64, Packed>>,
    /// Sizes of blocks of 4 GiB - 1 and more, by address.
    big: IntMap<u64, u64>,
    /// Realloc chain lengths of the blocks that have one, by address.
    chains: IntMap<u64, u32>,
    sites: Vec<Site>,
    site_ids: IntMap<Site, u32>,
    /// The last site interned: allocations come in runs from one site.
    last_site: Option<(Site, u32)>,
}

impl HeapBlocks {
    /// The shard of `addr`. The maps use the low bits of the same hash for the bucket and the
    /// top seven for their tags, so the shard takes bits from the middle, which neither uses.
    fn shard_of(&self, addr: u64) -> usize {
        (self.seed.hash_one(addr) >> 40) as usize & (SHARDS - 1)
    }

    fn site_id(&mut self, site: Site) -> u32 {
        if let Some((last, id)) = self.last_site
            && last == site
        {
            return id;
        }
        let id = match self.site_ids.get(&site) {
            Some(&id) => id,
            None => {
                // Two billion distinct sites would take far more memory than a machine has.
                let id = u32::try_from(self.sites.len())
                    .ok()
                    .filter(|&id| id < CHAINED)
                    .expect("fewer than 2^31 sites");
                self.sites.push(site);
                self.site_ids.insert(site, id);
                id
            }
        };
        self.last_site = Some((site, id));
        id
    }

    fn unpack(&self, addr: u64, p: Packed) -> LiveAlloc {
        let site = self.sites[(p.site & !CHAINED) as usize];
        let size = if p.size == BIG {
            self.big[&addr]
        } else {
            u64::from(p.size)
        };
        LiveAlloc {
            size,
            ts_ns: p.ts_ns,
            stack: site.stack,
            func: site.func,
            chain: if p.site & CHAINED != 0 {
                self.chains[&addr]
            } else {
                0
            },
        }
    }

    /// Stores `block` at `addr`; returns the block that was there.
    pub fn insert(&mut self, addr: u64, block: LiveAlloc) -> Option<LiveAlloc> {
        if self.shards.is_empty() {
            let seed = self.seed.clone();
            self.shards
                .resize_with(SHARDS, || IntMap::with_hasher(seed.clone()));
        }
        let site = self.site_id(Site {
            stack: block.stack,
            func: block.func,
        }) | if block.chain != 0 { CHAINED } else { 0 };
        let packed = Packed {
            ts_ns: block.ts_ns,
            size: u32::try_from(block.size)
                .ok()
                .filter(|&s| s != BIG)
                .unwrap_or(BIG),
            site,
        };
        let shard = self.shard_of(addr);
        let old = match self.shards[shard].entry(addr) {
            Entry::Occupied(mut e) => Some(std::mem::replace(e.get_mut(), packed)),
            Entry::Vacant(e) => {
                e.insert(packed);
                None
            }
        };
        let old = old.map(|p| self.unpack(addr, p));
        if packed.size == BIG {
            self.big.insert(addr, block.size);
        } else if old.is_some_and(|o| o.size >= u64::from(BIG)) {
            self.big.remove(&addr);
        }
        if block.chain != 0 {
            self.chains.insert(addr, block.chain);
        } else if old.is_some_and(|o| o.chain != 0) {
            self.chains.remove(&addr);
        }
        old
    }

    /// When the block at `addr` was allocated, if one is there.
    pub fn allocated_at(&self, addr: u64) -> Option<u64> {
        let shard = self.shard_of(addr);
        Some(self.shards.get(shard)?.get(&addr)?.ts_ns)
    }

    /// Takes the block at `addr` out.
    pub fn remove(&mut self, addr: u64) -> Option<LiveAlloc> {
        let shard = self.shard_of(addr);
        let p = self.shards.get_mut(shard)?.remove(&addr)?;
        let block = self.unpack(addr, p);
        if p.size == BIG {
            self.big.remove(&addr);
        }
        if p.site & CHAINED != 0 {
            self.chains.remove(&addr);
        }
        Some(block)
    }

    /// Every block, as (address, block), in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, LiveAlloc)> + '_ {
        self.shards
            .iter()
            .flat_map(|shard| shard.iter())
            .map(|(&addr, &p)| (addr, self.unpack(addr, p)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(size: u64, ts_ns: u64, stack: u64, func: AllocFn, chain: u32) -> LiveAlloc {
        LiveAlloc {
            size,
            ts_ns,
            stack,
            func,
            chain,
        }
    }

    #[test]
    fn a_stored_block_comes_back_whole() {
        assert_eq!(std::mem::size_of::<(u64, Packed)>(), 24);
        let mut h = HeapBlocks::default();
        let blocks = [
            (0x10, block(32, 1, 7, AllocFn::Malloc, 0)),
            (
                0x20,
                block(u64::from(u32::MAX) - 1, 2, 7, AllocFn::Malloc, 0),
            ),
            (
                0x30,
                block(u64::from(u32::MAX), u64::MAX, 8, AllocFn::Realloc, 3),
            ),
            (0x40, block(u64::MAX, 4, u64::MAX, AllocFn::Mmap, u32::MAX)),
            (0x50, block(0, 0, 7, AllocFn::Calloc, 0)),
        ];
        for (addr, b) in blocks {
            assert_eq!(h.insert(addr, b), None);
        }
        assert_eq!(h.iter().count(), 5);
        assert_eq!(h.sites.len(), 4, "one site per (stack, allocator)");
        let mut all: Vec<_> = h.iter().collect();
        all.sort_by_key(|(a, _)| *a);
        assert_eq!(all, blocks);
        for (addr, b) in blocks {
            assert_eq!(h.remove(addr), Some(b));
            assert_eq!(h.remove(addr), None);
        }
        assert!(h.iter().next().is_none() && h.big.is_empty() && h.chains.is_empty());
    }

    #[test]
    fn a_buffer_reallocated_again_and_again_keeps_one_site() {
        let mut h = HeapBlocks::default();
        let mut addr = 0x1000;
        h.insert(addr, block(16, 0, 9, AllocFn::Malloc, 0));
        for chain in 1..=10_000u32 {
            let old = h.remove(addr).expect("the buffer is live");
            assert_eq!(old.chain, chain - 1);
            addr += 0x40;
            h.insert(
                addr,
                block(
                    16 + u64::from(chain),
                    u64::from(chain),
                    9,
                    AllocFn::Realloc,
                    chain,
                ),
            );
        }
        assert_eq!(h.sites.len(), 2, "(9, malloc) and (9, realloc)");
        assert_eq!(h.chains.len(), 1, "only the live block's chain is kept");
        assert_eq!(h.remove(addr).map(|b| b.chain), Some(10_000));
        assert!(h.chains.is_empty());
        // A chained block replaced by a fresh one at the same address loses its chain entry.
        h.insert(0x10, block(8, 1, 1, AllocFn::Realloc, 5));
        assert_eq!(
            h.insert(0x10, block(8, 2, 1, AllocFn::Malloc, 0))
                .map(|b| b.chain),
            Some(5)
        );
        assert!(h.chains.is_empty());
        assert_eq!(h.remove(0x10).map(|b| b.chain), Some(0));
    }

    #[test]
    fn replacing_a_block_returns_the_old_one() {
        let mut h = HeapBlocks::default();
        let huge = block(5 << 30, 1, 1, AllocFn::Malloc, 0);
        let small = block(64, 2, 2, AllocFn::Calloc, 1);
        assert_eq!(h.insert(0x10, huge), None);
        assert_eq!(h.insert(0x10, small), Some(huge));
        assert!(h.big.is_empty(), "the huge block's size went with it");
        assert_eq!(h.insert(0x10, huge), Some(small));
        assert_eq!(h.iter().count(), 1);
        assert_eq!(h.iter().collect::<Vec<_>>(), vec![(0x10, huge)]);
    }

    #[test]
    fn many_blocks_spread_over_the_shards() {
        let mut h = HeapBlocks::default();
        for i in 0..100_000u64 {
            h.insert(
                0x5555_0000_0000 + i * 16,
                block(i, i, i % 3, AllocFn::Malloc, 0),
            );
        }
        assert_eq!(h.iter().count(), 100_000);
        let sizes: Vec<usize> = h.shards.iter().map(HashMap::len).collect();
        let expected = 100_000 / SHARDS;
        assert!(
            sizes
                .iter()
                .all(|&n| n > expected * 8 / 10 && n < expected * 12 / 10),
            "{sizes:?}"
        );
        for i in (0..100_000u64).step_by(2) {
            let b = h.remove(0x5555_0000_0000 + i * 16).unwrap();
            assert_eq!((b.size, b.ts_ns, b.stack), (i, i, i % 3));
        }
        assert_eq!(h.iter().count(), 50_000);
        assert_eq!(h.iter().count(), 50_000);
    }
}
