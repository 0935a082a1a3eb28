//! [`BoundedMap`]: the key cache's storage, a map that never holds more than its capacity.
//!
//! Eviction is CLOCK (second chance), an approximation of LRU whose hit costs a read lock and at
//! most one relaxed atomic write, where a true LRU would relink a list under a write lock. Each
//! entry has a "referenced" bit that a hit sets. When a shard is full, its hand sweeps the
//! entries as a ring: a set bit is cleared and the entry passed over; the first entry whose bit
//! was clear, or that has expired, makes room for the new one. So an entry hit since the hand
//! last passed it survives, and one never hit again goes at the next pass.
//!
//! The map is split into shards by key, each behind its own lock, so hits on different keys do
//! not contend and a write (a miss, an invalidation) blocks only one shard.

use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use hashbrown::HashTable;

/// The most shards a map is split into (a power of two).
const MAX_SHARDS: usize = 16;
/// The fewest entries a shard holds, so that a small map stays one LRU rather than many tiny ones.
const MIN_SHARD: usize = 64;
/// How many entries an insert into a map that drops expired entries looks at, when not full.
const EXPIRY_STEPS: usize = 2;
/// The bit of a slot's stamp that says it was used since the hand last passed.
const REFERENCED: u64 = 1 << 63;

/// Which shard a key goes to.
pub(crate) trait ShardKey: Hash + Eq + Copy {
    fn spread(&self) -> u64;
}

/// A key hash is SHA-256, already spread evenly. (A caller who grinds keys into one shard only
/// churns that shard's unknown keys.)
impl ShardKey for [u8; 32] {
    fn spread(&self) -> u64 {
        u64::from_le_bytes(self[..8].try_into().expect("8 bytes"))
    }
}

/// Key ids are consecutive, so they spread evenly by themselves.
impl ShardKey for i64 {
    fn spread(&self) -> u64 {
        *self as u64
    }
}

/// A map of at most `capacity` entries, each fresh for `ttl` after it was inserted.
pub(crate) struct BoundedMap<K, V> {
    shards: Box<[RwLock<Shard<K, V>>]>,
    /// The number of shards less one: a key's shard is `spread() & mask` (a power of two
    /// spares the hit a division).
    mask: u64,
    /// Hashes keys within a shard. Keyed at random, as std's `HashMap` is: the key hashes are
    /// chosen by callers, who could otherwise grind many into one run of the table.
    hasher: RandomState,
    /// What slot stamps count from: a stamp is nanoseconds since then, which takes 8 bytes where
    /// an `Instant` takes 16, and leaves a bit for "referenced".
    epoch: Instant,
    /// `ttl` in nanoseconds.
    ttl: u64,
    /// Whether expired entries are dropped as the hand passes them even when there is room. An
    /// unknown key's expired entry is worth nothing; a found key's still answers while the
    /// database is away (DESIGN rule 7), so those stay until their room is needed.
    drop_expired: bool,
    /// Entries dropped to make room for others.
    evictions: AtomicU64,
}

/// The entries are in `slots`, in no order, which the hand sweeps as a ring; `index` finds a
/// key's slot. The index holds only slot numbers (it compares keys in the slots), so a key is
/// stored once, and an index entry takes 5 bytes where a `HashMap<K, usize>` entry took 41.
struct Shard<K, V> {
    /// Where each key's slot is.
    index: HashTable<u32>,
    slots: Vec<Slot<K, V>>,
    /// At most `u32::MAX`, so that a slot's number fits the index.
    capacity: usize,
    /// The next slot the hand looks at (modulo the number of slots).
    hand: usize,
    /// The next slot an insert looks at for an expired entry, when expired entries are dropped.
    expiry: usize,
}

struct Slot<K, V> {
    key: K,
    value: V,
    /// When it was inserted (nanoseconds since the map's epoch), and [`REFERENCED`]. A hit sets
    /// the bit under the read lock; everything else changes under the write lock.
    stamp: AtomicU64,
}

impl<K: ShardKey, V: Clone> BoundedMap<K, V> {
    /// An empty map that will hold at most `capacity` (at least 1) entries.
    pub(crate) fn new(capacity: usize, ttl: Duration, drop_expired: bool) -> Self {
        let capacity = capacity.max(1);
        let n = 1 << (capacity / MIN_SHARD).clamp(1, MAX_SHARDS).ilog2();
        let shards = (0..n)
            .map(|i| {
                RwLock::new(Shard {
                    index: HashTable::new(),
                    slots: Vec::new(),
                    capacity: (capacity / n + usize::from(i < capacity % n)).min(u32::MAX as usize),
                    hand: 0,
                    expiry: 0,
                })
            })
            .collect();
        Self {
            shards,
            mask: n as u64 - 1,
            hasher: RandomState::new(),
            epoch: Instant::now(),
            ttl: u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX),
            drop_expired,
            evictions: AtomicU64::new(0),
        }
    }

    fn shard(&self, key: &K) -> &RwLock<Shard<K, V>> {
        &self.shards[(key.spread() & self.mask) as usize]
    }

    /// `now` as a stamp: nanoseconds since the epoch (0 before it), short of [`REFERENCED`]
    /// (292 years).
    fn stamp(&self, now: Instant) -> u64 {
        let nanos = now.saturating_duration_since(self.epoch).as_nanos();
        u64::try_from(nanos).unwrap_or(u64::MAX).min(REFERENCED - 1)
    }

    /// The value of `key`, and whether it is still fresh at `now`. Marks it as used.
    pub(crate) fn get(&self, key: &K, now: Instant) -> Option<(V, bool)> {
        let shard = self.shard(key).read().expect("cache lock");
        let slot = &shard.slots[shard.find(self.hasher.hash_one(key), key)?];
        let stamp = slot.stamp.load(Relaxed);
        // Load first: a hot entry's bit is set already, and a write would bounce its cache
        // line between cores on every hit.
        if stamp & REFERENCED == 0 {
            slot.stamp.fetch_or(REFERENCED, Relaxed);
        }
        Some((slot.value.clone(), self.is_fresh(stamp, now)))
    }

    /// Whether an entry stamped `stamp` is still fresh at `now`.
    fn is_fresh(&self, stamp: u64, now: Instant) -> bool {
        self.stamp(now).saturating_sub(stamp & !REFERENCED) < self.ttl
    }

    /// Inserts (or replaces) `key`'s value as of `now`, if `keep()` says so; `keep` runs under
    /// the shard's lock, so nothing removes `key` between its answer and the insert. When the
    /// shard is full, another entry is evicted. Returns whether the value was inserted.
    pub(crate) fn insert_if(
        &self,
        key: K,
        value: V,
        now: Instant,
        keep: impl FnOnce() -> bool,
    ) -> bool {
        let mut guard = self.shard(&key).write().expect("cache lock");
        if !keep() {
            return false;
        }
        let shard = &mut *guard;
        let hash = self.hasher.hash_one(key);
        let stamp = self.stamp(now);
        if let Some(i) = shard.find(hash, &key) {
            let slot = &mut shard.slots[i];
            slot.value = value;
            // The bit stays as it was, as it did when the stamp was an `Instant` beside it.
            let referenced = *slot.stamp.get_mut() & REFERENCED;
            *slot.stamp.get_mut() = stamp | referenced;
            return true;
        }
        let slot = Slot {
            key,
            value,
            stamp: AtomicU64::new(stamp),
        };
        if self.drop_expired {
            for _ in 0..EXPIRY_STEPS.min(shard.slots.len()) {
                let i = shard.expiry % shard.slots.len();
                if self.is_fresh(*shard.slots[i].stamp.get_mut(), now) {
                    shard.expiry = i + 1;
                } else {
                    // The slot moved into `i` is the next to look at.
                    shard.remove_at(i, &self.hasher);
                }
            }
        }
        if shard.slots.len() < shard.capacity {
            if shard.slots.len() == shard.slots.capacity() {
                // Grow as a Vec does, but never past the capacity.
                let more = shard
                    .slots
                    .len()
                    .max(4)
                    .min(shard.capacity - shard.slots.len());
                shard.slots.reserve_exact(more);
            }
            shard.slots.push(slot);
            let i = shard.slots.len() as u32 - 1;
            let slots = &shard.slots;
            shard
                .index
                .insert_unique(hash, i, |&j| self.hasher.hash_one(slots[j as usize].key));
            return true;
        }
        // Full: the hand finds the entry to replace, within one turn (it clears what it passes).
        loop {
            let i = shard.hand % shard.slots.len();
            shard.hand = i + 1;
            let old = shard.slots[i].stamp.get_mut();
            let referenced = *old & REFERENCED != 0;
            *old &= !REFERENCED;
            if !self.is_fresh(*old, now) || !referenced {
                let old_key = shard.slots[i].key;
                shard.unindex(self.hasher.hash_one(old_key), &old_key);
                shard.slots[i] = slot;
                let slots = &shard.slots;
                shard.index.insert_unique(hash, i as u32, |&j| {
                    self.hasher.hash_one(slots[j as usize].key)
                });
                self.evictions.fetch_add(1, Relaxed);
                return true;
            }
        }
    }

    /// Drops `key`'s entry, if there is one.
    pub(crate) fn remove(&self, key: &K) {
        let mut shard = self.shard(key).write().expect("cache lock");
        if let Some(i) = shard.find(self.hasher.hash_one(key), key) {
            shard.remove_at(i, &self.hasher);
        }
    }

    /// Drops every entry.
    pub(crate) fn clear(&self) {
        for shard in self.shards.iter() {
            let mut shard = shard.write().expect("cache lock");
            shard.index.clear();
            shard.slots.clear();
            shard.hand = 0;
            shard.expiry = 0;
        }
    }

    /// Entries held now, fresh or not.
    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().expect("cache lock").slots.len())
            .sum()
    }

    /// Entries evicted so far to make room for others.
    pub(crate) fn evictions(&self) -> u64 {
        self.evictions.load(Relaxed)
    }
}

impl<K: ShardKey, V> Shard<K, V> {
    /// The slot of `key`, whose hash is `hash`.
    fn find(&self, hash: u64, key: &K) -> Option<usize> {
        self.index
            .find(hash, |&i| self.slots[i as usize].key == *key)
            .map(|&i| i as usize)
    }

    /// Drops `key`'s index entry (its slot stays).
    fn unindex(&mut self, hash: u64, key: &K) {
        let slots = &self.slots;
        if let Ok(entry) = self
            .index
            .find_entry(hash, |&i| slots[i as usize].key == *key)
        {
            entry.remove();
        }
    }

    /// Removes the entry in slot `i`; the last slot moves into its place.
    fn remove_at(&mut self, i: usize, hasher: &RandomState) {
        let gone = self.slots[i].key;
        self.unindex(hasher.hash_one(gone), &gone);
        let last = self.slots.len() - 1;
        if i != last {
            // The last slot's index entry now points at `i`.
            let moved = self.slots[last].key;
            let slots = &self.slots;
            if let Some(entry) = self
                .index
                .find_mut(hasher.hash_one(moved), |&j| slots[j as usize].key == moved)
            {
                *entry = i as u32;
            }
        }
        self.slots.swap_remove(i);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn key(i: u64) -> [u8; 32] {
        let mut k = [0u8; 32];
        k[..8].copy_from_slice(&i.to_le_bytes());
        k
    }

    #[test]
    fn never_holds_more_than_its_capacity() {
        for capacity in [1, 7, 64, 1000, 1025, 20_000] {
            let map = BoundedMap::new(capacity, HOUR, false);
            let now = Instant::now();
            for i in 0..(3 * capacity as u64 + 10) {
                assert!(map.insert_if(key(i), i, now, || true));
                assert!(map.len() <= capacity, "capacity {capacity}, after {i}");
            }
            assert_eq!(map.len(), capacity);
            assert_eq!(map.evictions(), 2 * capacity as u64 + 10);
            // The newest entry is always there.
            assert!(map.get(&key(3 * capacity as u64 + 9), now).is_some());
        }
    }

    #[test]
    fn an_entry_in_use_survives_a_flood_of_new_ones() {
        let map = BoundedMap::new(50, HOUR, true);
        let now = Instant::now();
        map.insert_if(key(u64::MAX), 0, now, || true);
        for i in 0..10_000 {
            // Used once every 25 inserts: more often than the hand comes round.
            if i % 25 == 0 {
                assert!(map.get(&key(u64::MAX), now).is_some(), "evicted by {i}");
            }
            map.insert_if(key(i), i, now, || true);
        }
        assert!(map.get(&key(u64::MAX), now).is_some());
        assert!(
            map.get(&key(0), now).is_none(),
            "never used again, yet kept"
        );
    }

    #[test]
    fn expired_entries_are_replaced_on_access_and_evicted_first() {
        let map = BoundedMap::new(10, Duration::from_secs(5), false);
        let t = Instant::now();
        for i in 0..10 {
            map.insert_if(key(i), i, t, || true);
            map.get(&key(i), t);
        }
        let later = t + Duration::from_secs(6);
        assert_eq!(map.get(&key(3), later), Some((3, false)));
        map.insert_if(key(3), 33, later, || true);
        assert_eq!(map.get(&key(3), later), Some((33, true)));
        // Every other entry is in use but expired: the new one takes an expired one's place.
        map.insert_if(key(100), 100, later, || true);
        assert_eq!(map.len(), 10);
        assert_eq!(map.get(&key(3), later), Some((33, true)));
        assert_eq!(map.get(&key(100), later), Some((100, true)));
    }

    #[test]
    fn a_map_of_unknown_keys_drops_expired_entries_before_it_is_full() {
        let map = BoundedMap::new(1000, Duration::from_secs(5), true);
        let t = Instant::now();
        for i in 0..500 {
            map.insert_if(key(i), (), t, || true);
        }
        let later = t + Duration::from_secs(6);
        for i in 1000..1500 {
            map.insert_if(key(i), (), later, || true);
        }
        // Each insert looked at two entries, and dropped those that had expired.
        assert!(map.len() < 600, "{} entries", map.len());
        assert_eq!(map.evictions(), 0);
        assert!((1000..1500).all(|i| map.get(&key(i), later) == Some(((), true))));
    }

    #[test]
    fn a_key_cache_slot_takes_48_bytes() {
        // The key cache holds 100,000 of these in the memory benchmark: 100 kB a byte.
        assert_eq!(size_of::<Slot<[u8; 32], std::sync::Arc<()>>>(), 48);
    }

    #[test]
    fn remove_and_clear_keep_the_index_true() {
        let map = BoundedMap::new(100, HOUR, false);
        let now = Instant::now();
        for i in 0..100 {
            map.insert_if(key(i), i, now, || true);
        }
        for i in (0..100).step_by(3) {
            map.remove(&key(i));
        }
        for i in 0..100 {
            let want = (i % 3 != 0).then_some((i, true));
            assert_eq!(map.get(&key(i), now), want, "key {i}");
        }
        assert!(!map.insert_if(key(0), 0, now, || false));
        assert_eq!(map.get(&key(0), now), None);
        map.clear();
        assert_eq!(map.len(), 0);
        assert_eq!(map.get(&key(1), now), None);
    }
}
