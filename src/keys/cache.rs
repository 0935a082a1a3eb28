//! Verified keys kept in memory, so a check costs no database round trip.
//!
//! Found keys are kept for `key_ttl`; unknown hashes for `negative_ttl` (briefly: a key created a
//! moment ago must start working). A background task polls the store for changed keys every
//! `poll_interval` and drops their entries, so a revoke or a limit change reaches this process
//! well within a second. When the database is away, a key already verified keeps working from its
//! cached entry, however old (DESIGN rule 7).
//!
//! Nothing a caller sends grows it without bound (DESIGN rule 9): found keys and unknown hashes
//! live in separate [`BoundedMap`]s of `max_keys` and `max_unknown` entries, so a flood of random
//! keys evicts only other unknown hashes, never a key in use. The same holds for keys looked up
//! by id. Concurrent misses of one key share one store query (a *flight*), so an unknown key
//! costs at most one lookup however many checks ask for it at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, WeakShared};
use tokio_util::sync::CancellationToken;

use super::bounded::{BoundedMap, ShardKey};
use super::{ApiKey, KeyHash};
use crate::config::CacheConfig;
use crate::store::{KeyChange, KeyStore, StoreError};

/// Invalidations remembered for lookups in flight.
const MAX_RECENT: usize = 4096;

/// Most store lookups shared at once, per map; past that, a miss queries alone.
const MAX_FLIGHTS: usize = 4096;

/// A key store with a cache in front.
pub struct KeyCache {
    inner: Arc<Inner>,
}

/// What the cache's store lookups share with it: they insert their answers themselves, since
/// the check that started one may be gone before it lands.
struct Inner {
    store: Arc<dyn KeyStore>,
    /// Keys found, by hash; each fresh for `key_ttl`.
    found: BoundedMap<KeyHash, Arc<ApiKey>>,
    /// Hashes no key has; each fresh for `negative_ttl`.
    unknown: BoundedMap<KeyHash, ()>,
    /// Keys by id, for rate limit descriptors that name a key, and ids no key has. Any reported
    /// change empties both (changes are rare, and the change feed names hashes, not ids).
    by_id: BoundedMap<i64, Arc<ApiKey>>,
    unknown_ids: BoundedMap<i64, ()>,
    flights: Arc<Flights<KeyHash>>,
    id_flights: Arc<Flights<i64>>,
    /// Bumped by every invalidation: a lookup that started before one does not cache its answer,
    /// which may predate the change.
    generation: AtomicU64,
    /// The generation of the last "anything may have changed".
    cleared_at: AtomicU64,
    /// Recent invalidations (generation, hash), so a lookup skips caching only when its own key
    /// changed meanwhile, not whenever any key did.
    recent: Mutex<std::collections::VecDeque<(u64, KeyHash)>>,
    /// Set once the change feed is running: before that, a cached key could miss a change.
    primed: tokio::sync::watch::Sender<bool>,
}

/// How a lookup was answered; for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    Hit,
    /// The store was asked.
    Miss,
    /// The store failed and a stale entry answered.
    Stale,
    /// Another check's store lookup of the same key, in flight, answered.
    Shared,
}

/// What the cache holds and has evicted; for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Keys and unknown hashes cached by hash.
    pub entries: usize,
    /// Entries dropped, in any of the maps, to make room for others.
    pub evictions: u64,
}

impl KeyCache {
    /// A cache in front of `store`, with the TTLs and capacities of `config`.
    pub fn new(store: Arc<dyn KeyStore>, config: &CacheConfig) -> Self {
        let (key_ttl, negative_ttl) = (config.key_ttl.0, config.negative_ttl.0);
        Self {
            inner: Arc::new(Inner {
                store,
                found: BoundedMap::new(config.max_keys, key_ttl, false),
                unknown: BoundedMap::new(config.max_unknown, negative_ttl, true),
                by_id: BoundedMap::new(config.max_keys, key_ttl, false),
                unknown_ids: BoundedMap::new(config.max_unknown, negative_ttl, true),
                flights: Default::default(),
                id_flights: Default::default(),
                generation: Default::default(),
                cleared_at: Default::default(),
                recent: Default::default(),
                primed: tokio::sync::watch::Sender::new(false),
            }),
        }
    }

    /// The key with this hash, from the cache when fresh, else from the store (one query for
    /// all the concurrent lookups of this hash). A stale entry answers when the store fails.
    pub async fn lookup(
        &self,
        hash: &KeyHash,
    ) -> Result<(Option<Arc<ApiKey>>, CacheOutcome), StoreError> {
        let now = Instant::now();
        let stale = match self.inner.found.get(hash, now) {
            Some((key, true)) => return Ok((Some(key), CacheOutcome::Hit)),
            Some((key, false)) => Some(key),
            None => {
                if let Some(((), true)) = self.inner.unknown.get(hash, now) {
                    return Ok((None, CacheOutcome::Hit));
                }
                None
            }
        };
        let hash = *hash;
        let landed = self
            .inner
            .flights
            .join(hash, || self.inner.clone().fetch_hash(hash).boxed())
            .await;
        answer(&landed, stale)
    }

    /// The key with this id, cached and shared like [`KeyCache::lookup`]; a stale entry answers
    /// when the store fails.
    pub async fn lookup_id(&self, id: i64) -> Result<Option<Arc<ApiKey>>, StoreError> {
        let now = Instant::now();
        let stale = match self.inner.by_id.get(&id, now) {
            Some((key, true)) => return Ok(Some(key)),
            Some((key, false)) => Some(key),
            None => {
                if let Some(((), true)) = self.inner.unknown_ids.get(&id, now) {
                    return Ok(None);
                }
                None
            }
        };
        let landed = self
            .inner
            .id_flights
            .join(id, || self.inner.clone().fetch_id(id).boxed())
            .await;
        answer(&landed, stale).map(|(key, _)| key)
    }

    /// Drops the entries of these hashes, found or not.
    pub fn invalidate(&self, hashes: &[KeyHash]) {
        self.inner.invalidate(hashes)
    }

    /// Number of keys and unknown hashes cached by hash.
    pub fn len(&self) -> usize {
        self.inner.found.len() + self.inner.unknown.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What the cache holds and has evicted.
    pub fn stats(&self) -> CacheStats {
        let i = &self.inner;
        CacheStats {
            entries: self.len(),
            evictions: i.found.evictions()
                + i.unknown.evictions()
                + i.by_id.evictions()
                + i.unknown_ids.evictions(),
        }
    }

    /// Applies changes the store reports until `stop` is cancelled.
    pub async fn watch_changes(self: Arc<Self>, interval: Duration, stop: CancellationToken) {
        let inner = self.inner.clone();
        self.inner
            .store
            .watch_changes(interval, &move |change| inner.apply(change), stop)
            .await;
    }

    /// Waits until the change feed runs (its first report), at most `limit`. Serving before
    /// then would cache keys whose changes could go unheard, until the feed drops them all.
    pub async fn wait_primed(&self, limit: Duration) -> bool {
        let mut primed = self.inner.primed.subscribe();
        tokio::time::timeout(limit, primed.wait_for(|p| *p))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

/// A flight's answer for one of the lookups that waited on it, with the stale entry that
/// answers if the store failed.
fn answer(
    landed: &Landed,
    stale: Option<Arc<ApiKey>>,
) -> Result<(Option<Arc<ApiKey>>, CacheOutcome), StoreError> {
    // The first lookup to take the answer counts the query; the others shared it.
    let outcome = if landed.claimed.swap(true, Ordering::Relaxed) {
        CacheOutcome::Shared
    } else {
        CacheOutcome::Miss
    };
    match (&landed.answer, stale) {
        (Ok(found), _) => Ok((found.clone(), outcome)),
        (Err(_), Some(key)) => Ok((Some(key), CacheOutcome::Stale)),
        (Err(e), None) => Err(e.clone()),
    }
}

impl Inner {
    /// Asks the store for a hash, and caches the answer unless the key changed meanwhile.
    async fn fetch_hash(self: Arc<Self>, hash: KeyHash) -> Landed {
        // Read before the query: a change after this point keeps the answer out of the cache.
        let generation = self.generation.load(Ordering::Acquire);
        let answer = self.store.find_by_hash(&hash).await;
        let answer = answer.map(|found| found.map(Arc::new));
        if let Ok(found) = &answer {
            let now = Instant::now();
            let unchanged = || !self.changed_since(&hash, generation);
            match found {
                Some(key) => {
                    if self.found.insert_if(hash, key.clone(), now, unchanged) {
                        self.unknown.remove(&hash);
                    }
                }
                None => {
                    if self.unknown.insert_if(hash, (), now, unchanged) {
                        self.found.remove(&hash);
                    }
                }
            }
        }
        Landed::new(answer)
    }

    /// Asks the store for an id, and caches the answer unless any key changed meanwhile.
    async fn fetch_id(self: Arc<Self>, id: i64) -> Landed {
        let generation = self.generation.load(Ordering::Acquire);
        let answer = self.store.get(id).await;
        let answer = answer.map(|found| found.map(Arc::new));
        if let Ok(found) = &answer {
            let now = Instant::now();
            let unchanged = || self.generation.load(Ordering::Acquire) == generation;
            match found {
                Some(key) => {
                    if self.by_id.insert_if(id, key.clone(), now, unchanged) {
                        self.unknown_ids.remove(&id);
                    }
                }
                None => {
                    if self.unknown_ids.insert_if(id, (), now, unchanged) {
                        self.by_id.remove(&id);
                    }
                }
            }
        }
        Landed::new(answer)
    }

    /// Whether `hash` (or everything) was invalidated after `generation` was read.
    fn changed_since(&self, hash: &KeyHash, generation: u64) -> bool {
        use std::sync::atomic::Ordering::Acquire;
        if self.generation.load(Acquire) == generation {
            return false;
        }
        if self.cleared_at.load(Acquire) > generation {
            return true;
        }
        let recent = self.recent.lock().expect("cache lock");
        // Entries newer than `generation` may have been dropped from a full list: assume ours.
        if recent.len() >= MAX_RECENT && recent.front().is_some_and(|(g, _)| *g > generation) {
            return true;
        }
        recent.iter().any(|(g, h)| *g > generation && h == hash)
    }

    /// Drops the entries of these hashes, found or not, and their lookups in flight (a lookup
    /// that starts from now on must not share an answer read before the change).
    ///
    /// The order matters: the generation is bumped and the hashes recorded before any entry
    /// goes. A lookup that inserts before the removal is removed with it; one that inserts after
    /// it sees the record, under the same shard lock, and does not insert.
    fn invalidate(&self, hashes: &[KeyHash]) {
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        {
            let mut recent = self.recent.lock().expect("cache lock");
            for hash in hashes {
                recent.push_back((generation, *hash));
            }
            while recent.len() > MAX_RECENT {
                recent.pop_front();
            }
        }
        for hash in hashes {
            self.found.remove(hash);
            self.unknown.remove(hash);
            self.flights.forget(hash);
        }
    }

    fn apply(&self, change: KeyChange) {
        let all = change == KeyChange::All;
        match change {
            KeyChange::Keys(hashes) => {
                tracing::debug!(changed = hashes.len(), "dropping changed keys from cache");
                self.invalidate(&hashes);
            }
            KeyChange::All => {
                let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
                self.cleared_at.store(generation, Ordering::Release);
                self.found.clear();
                self.unknown.clear();
                self.flights.clear();
            }
        }
        // After the generation moved, as for hashes: a lookup by id that raced this change
        // either inserted before the clear or sees the new generation.
        self.by_id.clear();
        self.unknown_ids.clear();
        self.id_flights.clear();
        if all {
            self.primed.send_replace(true);
        }
    }
}

/// A store lookup's answer, shared by every lookup that waited on it.
struct Landed {
    answer: Result<Option<Arc<ApiKey>>, StoreError>,
    /// Whether a lookup took the answer yet.
    claimed: AtomicBool,
}

impl Landed {
    fn new(answer: Result<Option<Arc<ApiKey>>, StoreError>) -> Self {
        Self {
            answer,
            claimed: AtomicBool::new(false),
        }
    }
}

type Flight = BoxFuture<'static, Arc<Landed>>;

/// Store lookups in flight, by key, so that concurrent misses of one key share one query. A
/// flight lives as long as a lookup waits on it: when every check waiting has given up, the
/// query is dropped with it, and nothing is spent for nobody.
struct Flights<K> {
    /// Each flight with its number, so that a finished one removes itself and not a successor.
    map: Mutex<HashMap<K, (u64, WeakShared<Flight>)>>,
    next: AtomicU64,
}

impl<K> Default for Flights<K> {
    fn default() -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
        }
    }
}

impl<K: ShardKey + Send + Sync + 'static> Flights<K> {
    /// Waits for the flight of `key`, starting it with `query` if there is none.
    async fn join(
        self: &Arc<Self>,
        key: K,
        query: impl FnOnce() -> BoxFuture<'static, Landed>,
    ) -> Arc<Landed> {
        let flight = {
            let mut map = self.map.lock().expect("flights lock");
            match map.get(&key).and_then(|(_, weak)| weak.upgrade()) {
                Some(flight) => flight,
                None => {
                    let number = self.next.fetch_add(1, Ordering::Relaxed);
                    let landing = Landing {
                        flights: self.clone(),
                        key,
                        number,
                    };
                    let query = query();
                    let flight = async move {
                        // Dropped when the answer is in, or when nobody waits any more.
                        let _landing = landing;
                        Arc::new(query.await)
                    }
                    .boxed()
                    .shared();
                    if map.len() < MAX_FLIGHTS || map.contains_key(&key) {
                        let weak = flight.downgrade().expect("a new flight is not finished");
                        map.insert(key, (number, weak));
                    }
                    flight
                }
            }
        };
        flight.await
    }

    /// Makes the next lookup of `key` start a flight of its own.
    fn forget(&self, key: &K) {
        self.map.lock().expect("flights lock").remove(key);
    }

    fn clear(&self) {
        self.map.lock().expect("flights lock").clear();
    }
}

/// Removes its flight from the map when dropped, unless a newer flight took its place.
struct Landing<K: ShardKey> {
    flights: Arc<Flights<K>>,
    key: K,
    number: u64,
}

impl<K: ShardKey> Drop for Landing<K> {
    fn drop(&mut self) {
        // Never panic in a drop; a poisoned map only keeps a dead entry until it is replaced.
        if let Ok(mut map) = self.flights.map.lock()
            && map.get(&self.key).is_some_and(|(n, _)| *n == self.number)
        {
            map.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::atomic::Ordering::{Acquire, SeqCst};

    use async_trait::async_trait;
    use chrono::{DateTime, Utc};

    use crate::keys::Limits;
    use crate::store::{KeyQuery, KeyRecord, KeyUpdate};

    /// A SQLite store that counts the lookups it answers, and can be told to fail them or to
    /// hold them until released.
    struct Counting {
        inner: crate::store::sqlite::SqliteStore,
        finds: AtomicUsize,
        gets: AtomicUsize,
        fail: std::sync::atomic::AtomicBool,
        /// When set, each lookup waits for a permit (or for the semaphore's closing).
        gate: Option<tokio::sync::Semaphore>,
    }

    impl Counting {
        async fn lookup_gate(&self) -> Result<(), StoreError> {
            if let Some(gate) = &self.gate {
                let _ = gate.acquire().await;
            }
            if self.fail.load(SeqCst) {
                return Err(StoreError::closed());
            }
            Ok(())
        }
    }

    #[async_trait]
    impl KeyStore for Counting {
        async fn find_by_hash(&self, hash: &KeyHash) -> Result<Option<ApiKey>, StoreError> {
            self.finds.fetch_add(1, SeqCst);
            self.lookup_gate().await?;
            self.inner.find_by_hash(hash).await
        }
        async fn watch_changes(
            &self,
            interval: Duration,
            on_change: &(dyn Fn(KeyChange) + Send + Sync),
            stop: CancellationToken,
        ) {
            self.inner.watch_changes(interval, on_change, stop).await
        }
        async fn create(&self, record: &KeyRecord<'_>) -> Result<ApiKey, StoreError> {
            self.inner.create(record).await
        }
        async fn get(&self, id: i64) -> Result<Option<ApiKey>, StoreError> {
            self.gets.fetch_add(1, SeqCst);
            self.lookup_gate().await?;
            self.inner.get(id).await
        }
        async fn list(&self, query: &KeyQuery) -> Result<Vec<ApiKey>, StoreError> {
            self.inner.list(query).await
        }
        async fn revoke(&self, id: i64, now: DateTime<Utc>) -> Result<bool, StoreError> {
            self.inner.revoke(id, now).await
        }
        async fn update(
            &self,
            id: i64,
            update: &KeyUpdate,
            now: DateTime<Utc>,
        ) -> Result<Option<ApiKey>, StoreError> {
            self.inner.update(id, update, now).await
        }
        async fn rotate(
            &self,
            id: i64,
            rotation: &crate::store::Rotation<'_>,
        ) -> Result<Option<ApiKey>, StoreError> {
            self.inner.rotate(id, rotation).await
        }
        async fn ping(&self) -> Result<(), StoreError> {
            self.inner.ping().await
        }
    }

    async fn counting(gated: bool) -> (Arc<Counting>, tempfile::TempDir) {
        let (dir, inner) = crate::store::sqlite::tests::migrated_store().await;
        let store = Counting {
            inner,
            finds: AtomicUsize::new(0),
            gets: AtomicUsize::new(0),
            fail: Default::default(),
            gate: gated.then(|| tokio::sync::Semaphore::new(0)),
        };
        (Arc::new(store), dir)
    }

    async fn create_key(store: &Counting) -> (KeyHash, i64) {
        let key = crate::keys::generate();
        let created = store
            .create(&KeyRecord {
                key: &key,
                name: "k",
                limits: Limits::default(),
                expires_at: None,
                created_at: Utc::now(),
                permissions: &[],
                metadata: &Default::default(),
                identity_id: None,
            })
            .await
            .unwrap();
        (key.hash, created.id)
    }

    /// A hash no key has: a well-formed key nobody created.
    fn unknown_hash() -> KeyHash {
        crate::keys::generate().hash
    }

    async fn cache() -> (KeyCache, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("c.db").display());
        let store =
            crate::store::sqlite::SqliteStore::open(&url, std::time::Duration::from_secs(2))
                .await
                .unwrap();
        store.migrate().await.unwrap();
        (KeyCache::new(Arc::new(store), &CacheConfig::default()), dir)
    }

    #[tokio::test]
    async fn only_a_change_to_this_key_or_to_all_stops_caching_a_lookup_in_flight() {
        let (cache, _dir) = cache().await;
        let c = &cache.inner;
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let start = c.generation.load(Acquire);
        assert!(!c.changed_since(&a, start));
        c.invalidate(&[b]);
        assert!(!c.changed_since(&a, start), "another key changed");
        assert!(c.changed_since(&b, start));
        c.invalidate(&[a]);
        assert!(c.changed_since(&a, start));
        let later = c.generation.load(Acquire);
        assert!(!c.changed_since(&a, later));
        c.apply(KeyChange::All);
        assert!(c.changed_since(&a, later) && c.changed_since(&b, later));
    }

    #[tokio::test]
    async fn a_flood_of_changes_is_assumed_to_touch_every_lookup() {
        let (cache, _dir) = cache().await;
        let c = &cache.inner;
        let start = c.generation.load(Acquire);
        for i in 0..(MAX_RECENT + 10) {
            let mut h = [0u8; 32];
            h[..8].copy_from_slice(&(i as u64).to_le_bytes());
            c.invalidate(&[h]);
        }
        assert!(c.changed_since(&[0xff; 32], start));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn after_120_000_unknown_keys_a_repeated_unknown_key_is_answered_from_the_cache() {
        let (store, _dir) = counting(false).await;
        // The default capacities: 120,000 is more unknown keys than they hold.
        let cache = Arc::new(KeyCache::new(store.clone(), &CacheConfig::default()));
        // 120,000 distinct unknown keys, a few at a time (SQLite's read pool has 4 connections).
        let next = Arc::new(AtomicUsize::new(0));
        let mut workers = Vec::new();
        for _ in 0..8 {
            let (cache, next) = (cache.clone(), next.clone());
            workers.push(tokio::spawn(async move {
                while next.fetch_add(1, SeqCst) < 120_000 {
                    let (found, _) = cache.lookup(&unknown_hash()).await.unwrap();
                    assert!(found.is_none());
                }
            }));
        }
        for w in workers {
            w.await.unwrap();
        }
        assert_eq!(store.finds.load(SeqCst), 120_000);

        let one_more = unknown_hash();
        let mut misses = 0;
        for _ in 0..200 {
            let (found, outcome) = cache.lookup(&one_more).await.unwrap();
            assert!(found.is_none());
            misses += usize::from(outcome == CacheOutcome::Miss);
        }
        let lookups = store.finds.load(SeqCst) - 120_000;
        assert!(
            lookups <= 1 && misses <= 1,
            "200 lookups of one unknown key made {lookups} store lookups ({misses} misses)"
        );
    }

    /// Runs `lookups` while the gated store holds every lookup for 50 ms, so they overlap; then
    /// closes the gate again.
    async fn overlapping<T>(store: &Counting, lookups: impl std::future::Future<Output = T>) -> T {
        let gate = store.gate.as_ref().unwrap();
        let release = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            gate.add_permits(1000);
        };
        let (answers, ()) = tokio::join!(lookups, release);
        gate.forget_permits(1000);
        answers
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_lookups_of_one_key_share_one_query() {
        let (store, _dir) = counting(true).await;
        let cache = KeyCache::new(store.clone(), &CacheConfig::default());
        let (known, id) = create_key(&store).await;
        for (hash, want) in [(unknown_hash(), None), (known, Some(id))] {
            let before = store.finds.load(SeqCst);
            let lookups = futures_util::future::join_all((0..100).map(|_| cache.lookup(&hash)));
            for a in overlapping(&store, lookups).await {
                assert_eq!(a.unwrap().0.map(|k| k.id), want);
            }
            assert_eq!(store.finds.load(SeqCst) - before, 1, "key {want:?}");
        }
        for (id, want) in [(id + 1000, None), (id, Some(id))] {
            let before = store.gets.load(SeqCst);
            let lookups = futures_util::future::join_all((0..100).map(|_| cache.lookup_id(id)));
            for a in overlapping(&store, lookups).await {
                assert_eq!(a.unwrap().map(|k| k.id), want);
            }
            assert_eq!(store.gets.load(SeqCst) - before, 1, "id {id}");
        }
    }

    fn small(max_keys: usize, max_unknown: usize) -> CacheConfig {
        CacheConfig {
            max_keys,
            max_unknown,
            ..Default::default()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn entries_never_exceed_the_capacities() {
        let (store, _dir) = counting(false).await;
        let cache = KeyCache::new(store.clone(), &small(20, 50));
        let mut known = Vec::new();
        for _ in 0..40 {
            known.push(create_key(&store).await);
        }
        for i in 0..400 {
            cache.lookup(&unknown_hash()).await.unwrap();
            cache.lookup_id(10_000 + i).await.unwrap();
            if let Some((hash, id)) = known.get(i as usize % 50) {
                assert!(cache.lookup(hash).await.unwrap().0.is_some());
                assert!(cache.lookup_id(*id).await.unwrap().is_some());
            }
            let i = &cache.inner;
            assert!(i.found.len() <= 20 && i.unknown.len() <= 50);
            assert!(i.by_id.len() <= 20 && i.unknown_ids.len() <= 50);
        }
        assert_eq!(cache.len(), 70);
        assert!(cache.stats().evictions >= 2 * (400 - 50) + 2 * (40 - 20));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flood_of_unknown_keys_does_not_evict_known_ones() {
        let (store, _dir) = counting(false).await;
        let cache = KeyCache::new(store.clone(), &small(100, 50));
        let mut known = Vec::new();
        for _ in 0..10 {
            let (hash, _) = create_key(&store).await;
            cache.lookup(&hash).await.unwrap();
            known.push(hash);
        }
        for _ in 0..2000 {
            cache.lookup(&unknown_hash()).await.unwrap();
        }
        let before = store.finds.load(SeqCst);
        for hash in &known {
            let (found, outcome) = cache.lookup(hash).await.unwrap();
            assert!(found.is_some());
            assert_eq!(outcome, CacheOutcome::Hit);
        }
        assert_eq!(store.finds.load(SeqCst), before);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_lookup_is_shared_but_not_cached() {
        let (store, _dir) = counting(true).await;
        let cache = KeyCache::new(store.clone(), &CacheConfig::default());
        store.fail.store(true, SeqCst);
        let hash = unknown_hash();
        let lookups = futures_util::future::join_all((0..100).map(|_| cache.lookup(&hash)));
        for a in overlapping(&store, lookups).await {
            assert!(a.unwrap_err().is_transient());
        }
        assert_eq!(store.finds.load(SeqCst), 1);
        store.fail.store(false, SeqCst);
        store.gate.as_ref().unwrap().add_permits(1000);
        assert_eq!(
            cache.lookup(&hash).await.unwrap(),
            (None, CacheOutcome::Miss)
        );
        assert_eq!(store.finds.load(SeqCst), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lookup_after_an_invalidation_does_not_share_one_from_before() {
        let (store, _dir) = counting(true).await;
        let cache = Arc::new(KeyCache::new(store.clone(), &CacheConfig::default()));
        let hash = unknown_hash();
        let lookup = |cache: &Arc<KeyCache>| {
            let cache = cache.clone();
            tokio::spawn(async move { cache.lookup(&hash).await.unwrap() })
        };
        let before = lookup(&cache);
        while store.finds.load(SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        cache.invalidate(&[hash]);
        let after = lookup(&cache);
        while store.finds.load(SeqCst) == 1 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        store.gate.as_ref().unwrap().add_permits(1000);
        assert_eq!(before.await.unwrap(), (None, CacheOutcome::Miss));
        assert_eq!(after.await.unwrap(), (None, CacheOutcome::Miss));
        // The answer read after the change is cached; the one from before was not.
        assert_eq!(
            cache.lookup(&hash).await.unwrap(),
            (None, CacheOutcome::Hit)
        );
        assert_eq!(store.finds.load(SeqCst), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lookup_nobody_waits_for_is_dropped() {
        let (store, _dir) = counting(true).await;
        let cache = KeyCache::new(store.clone(), &CacheConfig::default());
        let hash = unknown_hash();
        let gave_up = tokio::time::timeout(Duration::from_millis(20), cache.lookup(&hash)).await;
        assert!(gave_up.is_err());
        assert!(cache.inner.flights.map.lock().unwrap().is_empty());
        store.gate.as_ref().unwrap().add_permits(1000);
        assert_eq!(
            cache.lookup(&hash).await.unwrap(),
            (None, CacheOutcome::Miss)
        );
        assert_eq!(store.finds.load(SeqCst), 2);
    }
}
