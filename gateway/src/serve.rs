//! `serve`: migrations, topology, workers and relays, until the shutdown future completes.
//!
//! Shutdown: stop taking messages (workers finish their batch in flight, and acknowledge each
//! committed batch once the relays settled its messages; prefetched deliveries return to the
//! queue when the channel closes), then the relays, which drained what the workers handed them,
//! return. All of it within [`SHUTDOWN_GRACE`]: a batch still unsettled then stays
//! unacknowledged, so the broker delivers it again at the next start, and the inbox rows it
//! committed publish its messages again.

use crate::broker;
use crate::config::Config;
use crate::relay::{self, RelayDeps};
use crate::worker::{self, WorkerDeps, backoff};
use anyhow::Context as _;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use trio_handlers::Context;
use trio_pseudo::Pseudonymiser;

/// How long the workers and relays may keep trying to publish after shutdown was asked.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// Connects to PostgreSQL, retrying with backoff until `give_up` (forever when `None`).
///
/// # Errors
/// When the URL is malformed, or the database stays unreachable past `give_up`.
pub async fn connect_db(config: &Config, give_up: Option<Duration>) -> anyhow::Result<PgPool> {
    connect_pool(config, config.db_pool_size, &BATCH_SESSION, give_up).await
}

/// Session settings of the batch path's connections: every prepared statement runs with its
/// generic plan from its first execution. Its lookups are written as one index probe per key
/// (see `trio_handlers::state`), a plan that suits every batch size. PostgreSQL's default
/// (`auto`) plans the first five executions with their parameters and then keeps doing so for
/// as long as those plans look cheaper than the generic one, which they do when batches are
/// small: a connection that began at low traffic planned the batch load anew for every batch,
/// about 2.2 ms of PostgreSQL CPU for a one-message batch against 0.19 ms with the generic plan
/// (`pgbench`, bench/HISTORY.md, sixteenth pass).
///
/// A generic plan is made once, often at a connection's first batches on small tables, and kept
/// until an `ANALYZE` invalidates it. Made on a near-empty `trajet`, the flush's update joined
/// the batch's trajets by hashing a sequential scan of the whole table, and kept doing so with
/// ten thousand trajets: about 2 ms of PostgreSQL CPU per one-message batch in the benchmark's
/// phase 4c, some 50 µs per message at half load and 7 at 1:1 (seventeenth pass). So
/// sequential scans are off for these sessions: the planner takes one only where no index can
/// answer (the one-row `state_epoch`), and every lookup stays an index probe per key whatever
/// the statistics said when the plan was made.
const BATCH_SESSION: [(&str, &str); 2] = [
    ("plan_cache_mode", "force_generic_plan"),
    ("enable_seqscan", "off"),
];

/// Session settings of every gateway connection. No JIT: its threshold is a cost estimate, and
/// on tables nobody has analyzed (autovacuum off, as on this project's CI machine) the estimates
/// of the batch load grow into the millions, so every batch paid tens of milliseconds compiling
/// a plan that runs in one or two; the gateway's statements are short OLTP statements that JIT
/// never speeds up.
const SESSION: [(&str, &str); 1] = [("jit", "off")];

/// The relays' own connections, whose commits do not wait for the WAL flush
/// (`synchronous_commit = off`). What the sweeper writes — an outbox row deleted once the broker
/// confirmed it, a claim on expired rows — may be lost in a database crash without breaking a
/// guarantee: the row is published again with the same `message_id`, which partners already
/// handle (CONTRACT.md §5). Writes an inbound ack follows — the batch transactions, and the
/// relays' insertion of what the broker did not take — commit synchronously (the latter sets
/// it for its own transaction).
///
/// # Errors
/// As [`connect_db`].
pub async fn connect_relay_db(config: &Config) -> anyhow::Result<PgPool> {
    // One connection per relay, the sweeper's and the deleter's.
    let size = u32::try_from(config.relays + 2).unwrap_or(u32::MAX);
    // Its few small statements are planned with their actual parameters (cheap to plan): the
    // outbox is mostly dead rows between vacuums, and a plan cached for "LIMIT $1" or
    // "= ANY($1)" could scan all of it.
    let settings = [
        ("synchronous_commit", "off"),
        ("plan_cache_mode", "force_custom_plan"),
    ];
    connect_pool(config, size, &settings, None).await
}

async fn connect_pool(
    config: &Config,
    size: u32,
    settings: &[(&str, &str)],
    give_up: Option<Duration>,
) -> anyhow::Result<PgPool> {
    let options: PgConnectOptions = config
        .database_url
        .expose()
        .parse()
        .context("TRIO_DATABASE_URL is not a valid PostgreSQL URL")?;
    // Statements are prepared once per connection (sqlx caches them); on the batch path each
    // keeps one generic plan ([`BATCH_SESSION`]), so nothing is planned per batch. (Forcing a
    // custom plan per execution cost the database about a quarter of its CPU per message in
    // the benchmark.)
    let options = options.options(SESSION.iter().chain(settings).copied());
    let started = tokio::time::Instant::now();
    let mut delays = backoff();
    loop {
        // No ping before each acquire (sqlx's default): it cost a round trip per batch. A
        // connection that died while idle fails its batch's first statement instead, a
        // transient error the batch is retried on, and sqlx drops it when it comes back.
        let attempt = PgPoolOptions::new()
            .max_connections(size)
            .test_before_acquire(false)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options.clone())
            .await;
        match attempt {
            Ok(pool) => return Ok(pool),
            Err(e) if trio_handlers::batch::is_transient(&e) => {
                if give_up.is_some_and(|limit| started.elapsed() > limit) {
                    return Err(e).context("connecting to PostgreSQL");
                }
                let delay = delays.next().unwrap_or(Duration::from_secs(5));
                warn!(error = %e, ?delay, "PostgreSQL unreachable; retrying");
                tokio::time::sleep(delay).await;
            }
            Err(e) => return Err(e).context("connecting to PostgreSQL"),
        }
    }
}

/// Creates the configured database when it does not exist yet (first run on a new server).
///
/// # Errors
/// When PostgreSQL is unreachable or refuses.
pub async fn ensure_database(config: &Config) -> anyhow::Result<()> {
    use sqlx::migrate::MigrateDatabase;
    let url = config.database_url.expose();
    if !sqlx::Postgres::database_exists(url).await.unwrap_or(false) {
        sqlx::Postgres::create_database(url)
            .await
            .context("creating the database")?;
    }
    Ok(())
}

/// Applies pending migrations.
///
/// # Errors
/// When a migration fails.
pub async fn migrate(db: &PgPool) -> anyhow::Result<()> {
    trio_handlers::MIGRATOR
        .run(db)
        .await
        .context("applying database migrations")
}

/// Declares the topology, retrying with backoff while the broker is unreachable.
///
/// # Errors
/// At once when the broker refuses the declaration itself: an existing queue or exchange was
/// declared with other arguments (e.g. another `TRIO_DELIVERY_LIMIT`), which waiting does not
/// change. After about five minutes of other failures.
pub async fn declare(config: &Config, pool: &deadpool_lapin::Pool) -> anyhow::Result<()> {
    let mut delays = backoff();
    for attempt in 1.. {
        let result = async {
            let channel = broker::channel(pool, config.broker_timeout).await?;
            broker::declare_topology(&channel, config).await?;
            broker::close_channel(channel, "declared", config.broker_timeout).await;
            anyhow::Ok(())
        }
        .await;
        match result {
            Ok(()) => return Ok(()),
            Err(e) if broker::is_precondition_failed(&e) => {
                return Err(e.context(
                    "the broker holds a queue or exchange of the topology declared with other \
                     arguments: give this gateway the settings the running ones have (e.g. \
                     TRIO_DELIVERY_LIMIT), or move the old queue's messages and delete it",
                ));
            }
            Err(e) if attempt >= 60 => return Err(e),
            Err(e) => {
                let delay = delays.next().unwrap_or(Duration::from_secs(5));
                warn!(error = %format!("{e:#}"), ?delay, "declaring the topology failed; retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
    Ok(())
}

/// Runs the gateway until `shutdown` completes.
///
/// # Errors
/// Start-up failures (database, migrations, topology); once running, failures are retried.
pub async fn serve(
    config: Config,
    pseudonymiser: Arc<dyn Pseudonymiser>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let config = Arc::new(config);
    if let Err(e) = ensure_database(&config).await {
        warn!(error = %format!("{e:#}"), "could not check that the database exists; connecting anyway");
    }
    let db = connect_db(&config, None).await?;
    migrate(&db).await?;
    // One connection for consuming and one for publishing, each carrying every worker's or
    // relay's channel: each lapin connection has its own I/O thread, and on a small machine
    // fewer threads handing frames to the workers means fewer context switches per message and
    // fewer buffers (the benchmark's gateway peaked at about 100 MiB instead of 170 MiB).
    let consume_pool = broker::pool(&config, "consume", 1)?;
    let publish_pool = broker::pool(&config, "publish", 1)?;
    declare(&config, &consume_pool).await?;

    let stop_consuming = CancellationToken::new();
    let hard_stop = CancellationToken::new();
    let (relay_tx, relay_rx) = mpsc::channel(config.workers * 2);
    let relay_rx = Arc::new(Mutex::new(relay_rx));
    let relay_db = connect_relay_db(&config).await?;
    let (confirmed_tx, confirmed_rx) = mpsc::channel(config.relays * 64);
    let deleter = tokio::spawn(relay::delete_confirmed(
        relay_db.clone(),
        confirmed_rx,
        hard_stop.clone(),
    ));
    let relay_deps = RelayDeps {
        db: relay_db.clone(),
        publish_pool: publish_pool.clone(),
        broker_timeout: config.broker_timeout,
        hard_stop: hard_stop.clone(),
        confirmed: confirmed_tx,
    };
    let relays: Vec<_> = (0..config.relays)
        .map(|_| tokio::spawn(relay::run(relay_deps.clone(), relay_rx.clone())))
        .collect();
    let sweeper = tokio::spawn(relay::sweep(relay_deps, stop_consuming.clone()));

    let ctx = Context::new(db.clone(), pseudonymiser, config.operator_users.clone())
        .with_state_cache(config.state_cache);
    let deps = WorkerDeps {
        config: config.clone(),
        ctx,
        consume_pool: consume_pool.clone(),
        publish_pool: publish_pool.clone(),
        relay: relay_tx,
        shutdown: stop_consuming.clone(),
    };
    let workers: Vec<_> = (0..config.workers)
        .map(|id| tokio::spawn(worker::run(id, deps.clone())))
        .collect();
    drop(deps);
    info!(
        workers = config.workers,
        batch_size = config.batch_size,
        "trio-gateway serving"
    );

    shutdown.await;
    info!("shutdown requested: finishing in-flight batches");
    stop_consuming.cancel();
    // The workers wait for the relays' confirms before they close their channels: the grace
    // period bounds both.
    let grace = tokio::spawn({
        let hard_stop = hard_stop.clone();
        async move {
            tokio::time::sleep(SHUTDOWN_GRACE).await;
            hard_stop.cancel();
        }
    });
    for w in workers {
        let _ = w.await;
    }
    for r in relays {
        let _ = r.await;
    }
    let _ = sweeper.await;
    // The sweeper has dropped its sender: the deleter drains and stops.
    let _ = deleter.await;
    grace.abort();
    broker::close_pool(&consume_pool, config.broker_timeout).await;
    broker::close_pool(&publish_pool, config.broker_timeout).await;
    db.close().await;
    relay_db.close().await;
    info!("trio-gateway stopped");
    Ok(())
}

/// Completes on SIGTERM or SIGINT.
pub async fn termination_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
