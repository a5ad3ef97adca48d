//! What a process keeps of the database across batches: for each insured it has met, what the
//! rules read about them besides trajets and the inbox (facts, current relations, dossier, and
//! the organisations and employer affiliations those relations lead to).
//!
//! **Why.** Those rows were about half of the index probes of a batch's load, yet on steady
//! traffic (new versions of existing trajets) none of them changes from one batch to the next.
//! Keeping them saved 3–5 µs of PostgreSQL CPU per message in the benchmark
//! (`bench/HISTORY.md`, the eighth pass).
//!
//! **Why it is never stale.** Every change to the tables a view is made of moves the *state
//! epoch* in the same transaction (statement triggers, migration `…_state_epoch.sql`), whoever
//! writes: this process, another gateway process, a hand-run fix. A view is tagged with the epoch
//! its rows were read at, and a batch uses it only when its own load — under the batch's locks,
//! in one snapshot with the batch's other reads — reads that same epoch; otherwise the load has
//! already read those insured from the tables (it asks for them conditionally, in the same
//! statement). A batch whose insured are all cached is loaded with a narrower statement that
//! reads only trajets, the inbox and the senders' organisations, with the epoch (a quarter of the
//! whole load's PostgreSQL CPU when batches are small); when that epoch moved, the batch runs
//! the whole load after it, in the same transaction: one more round trip after a change.
//! Trajets and inbox entries are never cached: they change with every message and are read
//! under the batch's locks as before.
//!
//! The views are bounded in number ([`StateCache::new`]) and hold pseudonyms, never a NISS.

use crate::state::{Affiliations, Dossier, InsuredFacts, Org, Relations};
use quick_cache::sync::Cache;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

/// Insured views a process keeps by default. A view with two relations takes about 1.7 KB of the
/// process's memory (the benchmark's backlog run: peak RSS 168 MiB with 10 000 insured cached,
/// 149–152 without), so about 35 MB when full, which keeps that run's peak under 200 MB
/// whatever the number of insured.
pub const DEFAULT_CAPACITY: usize = 20_000;

/// One insured as the rules see them, read at one state epoch.
#[derive(Debug, Clone)]
pub(crate) struct InsuredView {
    /// The state epoch the rows were read at.
    pub epoch: i64,
    /// The `insured` row, if any.
    pub facts: Option<InsuredFacts>,
    /// Current relations, with their end.
    pub relations: Arc<Relations>,
    /// The insured's dossier, if any.
    pub dossier: Option<Arc<Dossier>>,
    /// The current SEPPs of each employer the insured is related to.
    pub employer_sepp: Vec<(String, Arc<Affiliations>)>,
    /// The registered organisations the relations and affiliations name.
    pub orgs: Vec<Arc<Org>>,
}

/// The process's insured views, shared by its workers.
pub struct StateCache {
    /// The newest state epoch a load has read (`i64::MIN` before the first).
    newest_epoch: AtomicI64,
    /// `None` when disabled (capacity 0).
    views: Option<Cache<String, Arc<InsuredView>>>,
    hits: AtomicU64,
    misses: AtomicU64,
    /// Narrow loads whose epoch was the views', and those that found it moved.
    narrow_current: AtomicU64,
    narrow_stale: AtomicU64,
    /// Whether the last load read the epoch this process had seen before it (see
    /// [`StateCache::epoch_was_still`]).
    epoch_still: AtomicBool,
}

impl std::fmt::Debug for StateCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateCache")
            .field("capacity", &self.views.as_ref().map(Cache::capacity))
            .field("newest_epoch", &self.newest_epoch.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl StateCache {
    /// A cache of at most `capacity` insured views; 0 turns it off (every batch loads all).
    pub fn new(capacity: usize) -> Self {
        Self {
            newest_epoch: AtomicI64::new(i64::MIN),
            views: (capacity > 0).then(|| Cache::new(capacity)),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            narrow_current: AtomicU64::new(0),
            narrow_stale: AtomicU64::new(0),
            epoch_still: AtomicBool::new(true),
        }
    }

    /// Insured served from the cache, and insured loaded from the tables, since start-up.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }

    /// Batches loaded with the narrow statement (every insured cached: only trajets, the inbox
    /// and the senders' organisations read) since start-up, and narrow loads that found the
    /// state epoch moved, so that their batch loaded everything after all.
    pub fn narrow_loads(&self) -> (u64, u64) {
        (
            self.narrow_current.load(Ordering::Relaxed),
            self.narrow_stale.load(Ordering::Relaxed),
        )
    }

    /// The views of these insured read at the newest epoch this process knows, with that epoch.
    pub(crate) fn lookup<'a>(
        &self,
        pseudonyms: impl Iterator<Item = &'a String>,
    ) -> (i64, HashMap<String, Arc<InsuredView>>) {
        let epoch = self.newest_epoch.load(Ordering::Acquire);
        let Some(views) = &self.views else {
            return (epoch, HashMap::new());
        };
        let found = pseudonyms
            .filter_map(|p| {
                views
                    .get(p)
                    .filter(|view| view.epoch == epoch)
                    .map(|view| (p.clone(), view))
            })
            .collect();
        (epoch, found)
    }

    /// A load read `epoch`; views read at older epochs stop being served.
    pub(crate) fn saw_epoch(&self, epoch: i64) {
        self.newest_epoch.fetch_max(epoch, Ordering::AcqRel);
    }

    /// Counts what a load took from the cache and from the tables.
    pub(crate) fn record(&self, hits: usize, misses: usize) {
        self.hits.fetch_add(hits as u64, Ordering::Relaxed);
        self.misses.fetch_add(misses as u64, Ordering::Relaxed);
    }

    /// Whether the last load read the state epoch the process had seen before it. While it does
    /// (steady traffic), a batch whose insured are all cached tries the narrow load; once a load
    /// finds the epoch moved (reference data changing), batches load everything at once until
    /// one finds it still again, so traffic that keeps moving the epoch does not pay a narrow
    /// load for nothing in every batch.
    pub(crate) fn epoch_was_still(&self) -> bool {
        self.epoch_still.load(Ordering::Relaxed)
    }

    /// Records whether a load read the epoch the process had seen before it.
    pub(crate) fn record_epoch_still(&self, still: bool) {
        self.epoch_still.store(still, Ordering::Relaxed);
    }

    /// Counts a narrow load, whether it read the views' epoch (`current`) or not.
    pub(crate) fn record_narrow_load(&self, current: bool) {
        let counter = if current {
            &self.narrow_current
        } else {
            &self.narrow_stale
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Keeps a view just read from the tables.
    pub(crate) fn keep(&self, pseudonym: String, view: InsuredView) {
        if let Some(views) = &self.views {
            views.insert(pseudonym, Arc::new(view));
        }
    }

    /// Whether views are kept at all.
    pub(crate) fn enabled(&self) -> bool {
        self.views.is_some()
    }
}

impl Default for StateCache {
    fn default() -> Self {
        Self::new(DEFAULT_CAPACITY)
    }
}
