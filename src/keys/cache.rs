//! Verified keys kept in memory, so a check costs no database round trip.
//!
//! Found keys are kept for `key_ttl`; unknown hashes for `negative_ttl` (briefly: a key created a
//! moment ago must start working). A background task polls the store for changed keys every
//! `poll_interval` and drops their entries, so a revoke or a limit change reaches this process
//! well within a second. When the database is away, a key already verified keeps working from its
//! cached entry, however old (DESIGN rule 7).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{ApiKey, KeyHash};
use crate::store::{KeyChange, KeyStore, StoreError};

/// Most unknown hashes remembered at once; past that, misses are not cached (a flood of random
/// keys cannot grow memory without bound).
const MAX_NEGATIVE: usize = 100_000;

/// Invalidations remembered for lookups in flight.
const MAX_RECENT: usize = 4096;

#[derive(Debug, Clone)]
enum Entry {
    Found(Arc<ApiKey>, Instant),
    Missing(Instant),
}

/// A key (or its absence) looked up by id, and when.
type IdEntry = (Option<Arc<ApiKey>>, Instant);

/// A key store with a cache in front.
pub struct KeyCache {
    store: Arc<dyn KeyStore>,
    entries: RwLock<HashMap<KeyHash, Entry>>,
    negatives: std::sync::atomic::AtomicUsize,
    /// Bumped by every invalidation: a lookup that started before one does not cache its answer,
    /// which may predate the change.
    generation: std::sync::atomic::AtomicU64,
    /// The generation of the last "anything may have changed".
    cleared_at: std::sync::atomic::AtomicU64,
    /// Recent invalidations (generation, hash), so a lookup skips caching only when its own key
    /// changed meanwhile, not whenever any key did.
    recent: std::sync::Mutex<std::collections::VecDeque<(u64, KeyHash)>>,
    key_ttl: Duration,
    negative_ttl: Duration,
    /// Keys by id, for rate limit descriptors that name a key. Any reported change empties it
    /// (changes are rare, and the change feed names hashes, not ids).
    by_id: RwLock<HashMap<i64, IdEntry>>,
    /// Set once the change feed is running: before that, a cached key could miss a change.
    primed: tokio::sync::watch::Sender<bool>,
}

/// How a lookup was answered; for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    Hit,
    Miss,
    /// The store failed and a stale entry answered.
    Stale,
}

impl KeyCache {
    pub fn new(store: Arc<dyn KeyStore>, key_ttl: Duration, negative_ttl: Duration) -> Self {
        Self {
            store,
            entries: RwLock::new(HashMap::new()),
            negatives: Default::default(),
            generation: Default::default(),
            cleared_at: Default::default(),
            recent: Default::default(),
            key_ttl,
            negative_ttl,
            by_id: RwLock::new(HashMap::new()),
            primed: tokio::sync::watch::Sender::new(false),
        }
    }

    /// The key with this hash, from the cache when fresh, else from the store.
    pub async fn lookup(
        &self,
        hash: &KeyHash,
    ) -> Result<(Option<Arc<ApiKey>>, CacheOutcome), StoreError> {
        let cached = self.entries.read().expect("cache lock").get(hash).cloned();
        let now = Instant::now();
        match &cached {
            Some(Entry::Found(key, at)) if now.duration_since(*at) < self.key_ttl => {
                return Ok((Some(key.clone()), CacheOutcome::Hit));
            }
            Some(Entry::Missing(at)) if now.duration_since(*at) < self.negative_ttl => {
                return Ok((None, CacheOutcome::Hit));
            }
            _ => {}
        }
        let generation = self.generation.load(std::sync::atomic::Ordering::Acquire);
        match self.store.find_by_hash(hash).await {
            Ok(found) => {
                let found = found.map(Arc::new);
                self.insert(*hash, found.clone(), generation);
                Ok((found, CacheOutcome::Miss))
            }
            Err(e) => match cached {
                Some(Entry::Found(key, _)) => Ok((Some(key), CacheOutcome::Stale)),
                _ => Err(e),
            },
        }
    }

    /// The key with this id, cached like [`KeyCache::lookup`]; a stale entry answers when the
    /// store fails.
    pub async fn lookup_id(&self, id: i64) -> Result<Option<Arc<ApiKey>>, StoreError> {
        let cached = self.by_id.read().expect("cache lock").get(&id).cloned();
        let ttl = |found: &Option<Arc<ApiKey>>| {
            if found.is_some() {
                self.key_ttl
            } else {
                self.negative_ttl
            }
        };
        if let Some((found, at)) = &cached
            && at.elapsed() < ttl(found)
        {
            return Ok(found.clone());
        }
        let generation = self.generation.load(std::sync::atomic::Ordering::Acquire);
        match self.store.get(id).await {
            Ok(found) => {
                let found = found.map(Arc::new);
                let mut by_id = self.by_id.write().expect("cache lock");
                if self.generation.load(std::sync::atomic::Ordering::Acquire) == generation
                    && (found.is_some() || by_id.len() < MAX_NEGATIVE)
                {
                    by_id.insert(id, (found.clone(), Instant::now()));
                }
                Ok(found)
            }
            Err(e) => match cached {
                Some((Some(key), _)) => Ok(Some(key)),
                _ => Err(e),
            },
        }
    }

    fn insert(&self, hash: KeyHash, found: Option<Arc<ApiKey>>, generation: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let mut entries = self.entries.write().expect("cache lock");
        if self.changed_since(&hash, generation) {
            return;
        }
        let entry = match found {
            Some(key) => Entry::Found(key, Instant::now()),
            None if self.negatives.load(Relaxed) >= MAX_NEGATIVE => return,
            None => Entry::Missing(Instant::now()),
        };
        let was_missing = matches!(entries.get(&hash), Some(Entry::Missing(_)));
        let is_missing = matches!(entry, Entry::Missing(_));
        entries.insert(hash, entry);
        match (was_missing, is_missing) {
            (false, true) => self.negatives.fetch_add(1, Relaxed),
            (true, false) => self.negatives.fetch_sub(1, Relaxed),
            _ => 0,
        };
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

    /// Drops the entries of these hashes, found or not.
    pub fn invalidate(&self, hashes: &[KeyHash]) {
        use std::sync::atomic::Ordering::Relaxed;
        let mut entries = self.entries.write().expect("cache lock");
        let generation = self
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel)
            + 1;
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
            if let Some(Entry::Missing(_)) = entries.remove(hash) {
                self.negatives.fetch_sub(1, Relaxed);
            }
        }
    }

    /// Number of cached entries (found and missing).
    pub fn len(&self) -> usize {
        self.entries.read().expect("cache lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies changes the store reports until `stop` is cancelled.
    pub async fn watch_changes(self: Arc<Self>, interval: Duration, stop: CancellationToken) {
        let cache = self.clone();
        self.store
            .watch_changes(interval, &move |change| cache.apply(change), stop)
            .await;
    }

    fn apply(&self, change: KeyChange) {
        self.by_id.write().expect("cache lock").clear();
        match change {
            KeyChange::Keys(hashes) => {
                tracing::debug!(changed = hashes.len(), "dropping changed keys from cache");
                self.invalidate(&hashes);
            }
            KeyChange::All => {
                let mut entries = self.entries.write().expect("cache lock");
                let generation = self
                    .generation
                    .fetch_add(1, std::sync::atomic::Ordering::AcqRel)
                    + 1;
                self.cleared_at
                    .store(generation, std::sync::atomic::Ordering::Release);
                entries.clear();
                self.negatives
                    .store(0, std::sync::atomic::Ordering::Relaxed);
                drop(entries);
                self.primed.send_replace(true);
            }
        }
    }

    /// Waits until the change feed runs (its first report), at most `limit`. Serving before
    /// then would cache keys whose changes could go unheard, until the feed drops them all.
    pub async fn wait_primed(&self, limit: Duration) -> bool {
        let mut primed = self.primed.subscribe();
        tokio::time::timeout(limit, primed.wait_for(|p| *p))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering::Acquire;

    async fn cache() -> (KeyCache, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("c.db").display());
        let store = crate::store::sqlite::SqliteStore::open(&url).await.unwrap();
        store.migrate().await.unwrap();
        (
            KeyCache::new(
                Arc::new(store),
                Duration::from_secs(60),
                Duration::from_secs(5),
            ),
            dir,
        )
    }

    #[tokio::test]
    async fn only_a_change_to_this_key_or_to_all_stops_caching_a_lookup_in_flight() {
        let (c, _dir) = cache().await;
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
        let (c, _dir) = cache().await;
        let start = c.generation.load(Acquire);
        for i in 0..(MAX_RECENT + 10) {
            let mut h = [0u8; 32];
            h[..8].copy_from_slice(&(i as u64).to_le_bytes());
            c.invalidate(&[h]);
        }
        assert!(c.changed_since(&[0xff; 32], start));
    }
}
