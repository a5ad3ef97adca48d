//! What every batch needs from the process: the database pool, the pseudonymiser, the state
//! cache and settings.

use crate::state_cache::StateCache;
use sqlx::PgPool;
use std::collections::HashSet;
use std::sync::Arc;
use trio_pseudo::Pseudonymiser;

/// Shared, cheap-to-clone handler context.
#[derive(Clone)]
pub struct Context {
    /// The PostgreSQL pool (sqlx caches prepared statements per connection).
    pub pool: PgPool,
    /// Pseudonymisation backend (cached).
    pub pseudonymiser: Arc<dyn Pseudonymiser>,
    /// Broker users that are operators (CONTRACT.md §2).
    pub operators: Arc<HashSet<String>>,
    /// How long a relation lasts when `valid_until` is absent (24 hours).
    pub relation_ttl: time::Duration,
    /// What the process keeps of the insured it has met, across batches.
    pub state_cache: Arc<StateCache>,
}

impl Context {
    /// Builds a context with the contract's 24-hour relation lifetime.
    pub fn new(
        pool: PgPool,
        pseudonymiser: Arc<dyn Pseudonymiser>,
        operators: impl IntoIterator<Item = String>,
    ) -> Self {
        Self {
            pool,
            pseudonymiser,
            operators: Arc::new(operators.into_iter().collect()),
            relation_ttl: time::Duration::hours(24),
            state_cache: Arc::new(StateCache::default()),
        }
    }

    /// The same context keeping at most `capacity` insured views across batches (0: none).
    #[must_use]
    pub fn with_state_cache(mut self, capacity: usize) -> Self {
        self.state_cache = Arc::new(StateCache::new(capacity));
        self
    }
}
