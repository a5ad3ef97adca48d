//! Configuration from the environment (CONTRACT.md §7), with the defaults partners rely on.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// A connection URL that may hold a password: never printed in full.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// Wraps a URL.
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The URL itself, for the client library only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // scheme://host… without user info
        let redacted = match (self.0.find("://"), self.0.rfind('@')) {
            (Some(s), Some(at)) if at > s => {
                format!("{}://***@{}", &self.0[..s], &self.0[at + 1..])
            }
            _ => self.0.clone(),
        };
        write!(f, "{redacted:?}")
    }
}

/// `base` (a PostgreSQL URL) with its database name replaced by `name`, keeping any `?query`.
pub fn database_url_for(base: &str, name: &str) -> String {
    let (head, query) = match base.split_once('?') {
        Some((h, q)) => (h, format!("?{q}")),
        None => (base, String::new()),
    };
    let scheme_end = head.find("://").map_or(0, |i| i + 3);
    let host_end = head[scheme_end..]
        .find('/')
        .map_or(head.len(), |i| scheme_end + i);
    format!("{}/{name}{query}", &head[..host_end])
}

/// Everything `serve` needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// `TRIO_AMQP_URL`: the broker (default `amqp://guest:guest@127.0.0.1:5672/%2f`).
    pub amqp_url: SecretUrl,
    /// `TRIO_DATABASE_URL`: PostgreSQL (default `postgres://postgres@127.0.0.1:5432/trio`).
    pub database_url: SecretUrl,
    /// `TRIO_PSEUDO_DOMAIN_FILE`: the local pseudonymisation domain (required by `serve`).
    pub pseudo_domain_file: Option<PathBuf>,
    /// `TRIO_OPERATOR_USERS`: broker users that may publish reference data (default `guest`).
    pub operator_users: Vec<String>,
    /// `TRIO_WORKERS`: concurrent consumers per process, i.e. batches in flight (default 2: on
    /// the benchmark's two cores, 4 gave no more throughput and a worse tail at half load, where
    /// more, smaller batches cost the database more per message; raise it with the cores).
    pub workers: usize,
    /// `TRIO_BATCH_SIZE`: deliveries per transaction at most (default 200: on the benchmark's two
    /// cores it cost about 10 % less CPU per message than 100, in the database and the broker;
    /// 300 and 500 were no better within the machine's drift).
    pub batch_size: usize,
    /// `TRIO_BATCH_LINGER_MS`: how long a worker waits to fill a batch once it has one delivery
    /// (default 2 ms: under load batches fill at once, at low load latency stays low).
    pub batch_linger: Duration,
    /// `TRIO_PREFETCH`: unacknowledged deliveries per consumer (default 3 × batch size).
    pub prefetch: u16,
    /// `TRIO_DELIVERY_LIMIT`: deliveries of a failing message before it is dead-lettered
    /// (default 5); the queues' own `x-delivery-limit` is set one higher as a backstop.
    pub delivery_limit: u32,
    /// `TRIO_RELAYS`: concurrent publishers of committed batches (default = workers).
    pub relays: usize,
    /// `TRIO_BROKER_TIMEOUT_MS`: the longest any broker call may take (default 10 s).
    pub broker_timeout: Duration,
    /// `TRIO_DB_POOL_SIZE`: PostgreSQL connections of the workers (default workers + 2, at least
    /// workers: each keeps one); the relays, the sweeper and the outbox deleter have `relays + 2`
    /// of their own.
    pub db_pool_size: u32,
    /// `TRIO_MAX_MESSAGE_BYTES`: larger bodies are dead-lettered `too_large` (default 1 MiB).
    pub max_message_bytes: usize,
    /// `TRIO_STATE_CACHE`: insured whose facts, relations and dossier the process keeps across
    /// batches (default 20 000, about 35 MB at most; 0 turns it off). Never stale: see
    /// `trio_handlers::state_cache`.
    pub state_cache: usize,
}

/// The workers' PostgreSQL connections: as many as asked, but at least one per worker (each
/// keeps one, see `trio_handlers::HeldConnection`: fewer would leave a worker waiting for
/// another to fail) and at least two.
fn workers_pool_size(asked: u32, workers: usize) -> u32 {
    asked.max(u32::try_from(workers).unwrap_or(u32::MAX)).max(2)
}

/// The workers' PostgreSQL connections by default: one per batch in flight, and two to spare.
fn default_db_pool_size(workers: usize) -> u32 {
    u32::try_from(workers + 2).unwrap_or(16)
}

/// Unacknowledged deliveries per consumer by default: a batch waiting for its confirms (it is
/// acknowledged only then), one being processed, and the next one already buffered.
fn default_prefetch(batch_size: usize) -> u16 {
    u16::try_from(batch_size * 3).unwrap_or(u16::MAX)
}

impl Default for Config {
    fn default() -> Self {
        let workers = 2;
        let batch_size = 200;
        Self {
            amqp_url: SecretUrl::new("amqp://guest:guest@127.0.0.1:5672/%2f"),
            database_url: SecretUrl::new("postgres://postgres@127.0.0.1:5432/trio"),
            pseudo_domain_file: None,
            operator_users: vec!["guest".to_owned()],
            workers,
            batch_size,
            batch_linger: Duration::from_millis(2),
            prefetch: default_prefetch(batch_size),
            delivery_limit: 5,
            relays: workers,
            broker_timeout: Duration::from_secs(10),
            db_pool_size: default_db_pool_size(workers),
            max_message_bytes: 1024 * 1024,
            state_cache: trio_handlers::state_cache::DEFAULT_CAPACITY,
        }
    }
}

/// A variable that is set but cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("environment variable {name}: {problem}")]
pub struct ConfigError {
    name: &'static str,
    problem: String,
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn number<T: std::str::FromStr>(name: &'static str, default: T) -> Result<T, ConfigError> {
    match var(name) {
        None => Ok(default),
        Some(v) => v.trim().parse().map_err(|_| ConfigError {
            name,
            problem: format!("{v:?} is not a valid number"),
        }),
    }
}

impl Config {
    /// Reads the `TRIO_*` variables; unset ones take their defaults.
    ///
    /// # Errors
    /// When a numeric variable does not parse or is zero where it must not be.
    pub fn from_env() -> Result<Self, ConfigError> {
        let d = Config::default();
        let workers: usize = number("TRIO_WORKERS", d.workers)?.max(1);
        let batch_size: usize = number("TRIO_BATCH_SIZE", d.batch_size)?.clamp(1, 1000);
        let relays: usize = number("TRIO_RELAYS", workers)?.max(1);
        Ok(Self {
            amqp_url: var("TRIO_AMQP_URL")
                .map(SecretUrl::new)
                .unwrap_or(d.amqp_url),
            database_url: var("TRIO_DATABASE_URL")
                .map(SecretUrl::new)
                .unwrap_or(d.database_url),
            pseudo_domain_file: var("TRIO_PSEUDO_DOMAIN_FILE").map(PathBuf::from),
            operator_users: var("TRIO_OPERATOR_USERS")
                .map(|v| {
                    v.split(',')
                        .map(|u| u.trim().to_owned())
                        .filter(|u| !u.is_empty())
                        .collect()
                })
                .unwrap_or(d.operator_users),
            workers,
            batch_size,
            batch_linger: Duration::from_millis(number("TRIO_BATCH_LINGER_MS", 2)?),
            prefetch: number("TRIO_PREFETCH", default_prefetch(batch_size))?.max(1),
            delivery_limit: number("TRIO_DELIVERY_LIMIT", d.delivery_limit)?.max(1),
            relays,
            broker_timeout: Duration::from_millis(number("TRIO_BROKER_TIMEOUT_MS", 10_000)?),
            db_pool_size: workers_pool_size(
                number("TRIO_DB_POOL_SIZE", default_db_pool_size(workers))?,
                workers,
            ),
            max_message_bytes: number("TRIO_MAX_MESSAGE_BYTES", d.max_message_bytes)?,
            state_cache: number("TRIO_STATE_CACHE", d.state_cache)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_urls_name_another_database() {
        assert_eq!(
            database_url_for("postgres://postgres@127.0.0.1:5432/trio", "x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            database_url_for("postgres://postgres@127.0.0.1:5432", "x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            database_url_for("postgres://u:p@h/db?sslmode=disable", "x"),
            "postgres://u:p@h/x?sslmode=disable"
        );
    }

    #[test]
    fn every_worker_has_a_connection_to_keep() {
        assert_eq!(workers_pool_size(1, 4), 4);
        assert_eq!(workers_pool_size(6, 4), 6);
        assert_eq!(workers_pool_size(1, 1), 2);
        assert_eq!(default_db_pool_size(4), 6);
    }

    #[test]
    fn urls_never_print_their_password() {
        let url = SecretUrl::new("amqp://oa300:s3cret@broker:5672/%2f");
        let printed = format!("{url:?}");
        assert!(!printed.contains("s3cret"), "{printed}");
        assert!(printed.contains("broker:5672"));
    }
}
