//! The outbox relay: publishes committed replies and events with publisher confirms and
//! `mandatory`, and deletes each outbox row only once the broker confirmed it.
//!
//! Two paths feed it:
//! - **fast path**: the worker that committed a batch hands its outbox over in memory (the rows
//!   are claimed by this process for 30 s, so no other relay touches them meanwhile);
//! - **sweeper**: every second, rows whose claim expired (a crashed process, a nack, an
//!   unroutable message waiting for its recipient's queue) are claimed with
//!   `FOR UPDATE SKIP LOCKED` and published again — with the same `message_id`.

use crate::broker::{self, Published};
use crate::worker::backoff;
use lapin::Channel;
use sqlx::{PgPool, Row};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use trio_handlers::{OutboundMessage, OutboxEntry};

/// How many messages one publish round carries at most.
const MAX_ROUND: usize = 1000;

/// Shared by every relay task of the process.
#[derive(Clone)]
pub struct RelayDeps {
    /// Database (outbox rows).
    pub db: PgPool,
    /// Publishing connections.
    pub publish_pool: deadpool_lapin::Pool,
    /// The longest a broker call may take.
    pub broker_timeout: Duration,
    /// Cancelled when the shutdown grace period is over: stop retrying (rows stay committed in
    /// the outbox and are published at the next start).
    pub hard_stop: CancellationToken,
}

/// Runs one relay task until every worker has stopped and the queue is drained.
pub async fn run(deps: RelayDeps, queue: Arc<Mutex<mpsc::Receiver<Vec<OutboxEntry>>>>) {
    let mut channel: Option<Channel> = None;
    loop {
        let round = {
            let mut rx = queue.lock().await;
            let Some(mut round) = rx.recv().await else {
                break;
            };
            while round.len() < MAX_ROUND {
                match rx.try_recv() {
                    Ok(more) => round.extend(more),
                    Err(_) => break,
                }
            }
            round
        };
        deliver(&deps, &mut channel, round).await;
    }
    debug!("relay stopped");
}

/// Publishes a round until the broker has answered for every message, then records the answers.
async fn deliver(deps: &RelayDeps, channel: &mut Option<Channel>, round: Vec<OutboxEntry>) {
    let mut delays = backoff();
    let results = loop {
        let started = std::time::Instant::now();
        match publish_round(deps, channel, &round).await {
            Ok(results) => {
                let took = started.elapsed();
                if took >= trio_handlers::batch::SLOW_BATCH {
                    warn!(
                        messages = round.len(),
                        ms = took.as_millis() as u64,
                        "slow publish round: the broker took this long to confirm"
                    );
                }
                break results;
            }
            Err(e) => {
                *channel = None;
                if deps.hard_stop.is_cancelled() {
                    warn!(
                        messages = round.len(),
                        "shutdown grace period over; unpublished messages stay in the outbox"
                    );
                    return;
                }
                let delay = delays.next().unwrap_or(Duration::from_secs(5));
                warn!(error = %format!("{e:#}"), ?delay, messages = round.len(), "publishing the outbox failed; retrying");
                tokio::select! {
                    _ = deps.hard_stop.cancelled() => {}
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    };
    let mut confirmed = Vec::new();
    let mut returned = Vec::new();
    let mut nacked = Vec::new();
    for (entry, result) in round.iter().zip(results) {
        let message = &entry.message;
        debug!(message_id = %message.message_id, correlation_id = message.correlation_id.as_deref().unwrap_or(""), routing_key = %message.routing_key, ?result, "published");
        match result {
            Published::Confirmed => confirmed.push(entry.id),
            Published::Returned => returned.push(entry.id),
            Published::Nacked => nacked.push(entry.id),
        }
    }
    if !returned.is_empty() {
        warn!(
            count = returned.len(),
            "outbound messages unroutable (no queue bound for the recipient); kept in the outbox and retried in a minute"
        );
    }
    let mut delays = backoff();
    for _ in 0..20 {
        match record(&deps.db, &confirmed, &returned, &nacked).await {
            Ok(()) => return,
            Err(e) => {
                let delay = delays.next().unwrap_or(Duration::from_secs(5));
                warn!(error = %e, ?delay, "recording published outbox rows failed; retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
    // The rows stay in the outbox; the sweeper re-publishes them with the same message ids.
    warn!("gave up recording published outbox rows; they will be published again");
}

async fn publish_round(
    deps: &RelayDeps,
    channel: &mut Option<Channel>,
    round: &[OutboxEntry],
) -> anyhow::Result<Vec<Published>> {
    let ch = match channel {
        Some(ch) if ch.status().connected() => ch.clone(),
        _ => {
            let ch = broker::confirm_channel(&deps.publish_pool, deps.broker_timeout).await?;
            *channel = Some(ch.clone());
            ch
        }
    };
    let messages: Vec<_> = round
        .iter()
        .map(|OutboxEntry { message: m, .. }| {
            (
                m.exchange.clone(),
                m.routing_key.clone(),
                broker::properties_of(m),
                m.body.as_slice(),
            )
        })
        .collect();
    broker::publish_confirmed(&ch, &messages, deps.broker_timeout).await
}

async fn record(
    db: &PgPool,
    confirmed: &[i64],
    returned: &[i64],
    nacked: &[i64],
) -> sqlx::Result<()> {
    if !confirmed.is_empty() {
        sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
            .bind(confirmed)
            .execute(db)
            .await?;
    }
    if !returned.is_empty() {
        sqlx::query(
            "UPDATE outbox SET claimed_until = now() + interval '60 seconds' \
             WHERE id = ANY($1)",
        )
        .bind(returned)
        .execute(db)
        .await?;
    }
    if !nacked.is_empty() {
        sqlx::query("UPDATE outbox SET claimed_until = now() WHERE id = ANY($1)")
            .bind(nacked)
            .execute(db)
            .await?;
    }
    Ok(())
}

/// Re-publishes outbox rows whose claim expired, until shutdown.
pub async fn sweep(deps: RelayDeps, shutdown: CancellationToken) {
    let mut channel: Option<Channel> = None;
    loop {
        match claim_expired(&deps.db).await {
            Ok(round) if !round.is_empty() => {
                let full = round.len() == MAX_ROUND;
                debug!(count = round.len(), "sweeper re-publishing outbox rows");
                deliver(&deps, &mut channel, round).await;
                if full {
                    continue;
                }
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "outbox sweep failed"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Claims up to [`MAX_ROUND`] expired rows for this process (30 s).
async fn claim_expired(db: &PgPool) -> sqlx::Result<Vec<OutboxEntry>> {
    // Oldest claims first, in the index's own order (no sort of every expired row), each due
    // row then updated through its primary key.
    let rows = sqlx::query(
        "WITH due AS (SELECT id FROM outbox WHERE claimed_until < now() \
                      ORDER BY claimed_until LIMIT $1 FOR UPDATE SKIP LOCKED) \
         UPDATE outbox o SET claimed_until = now() + interval '30 seconds', \
                             attempts = o.attempts + 1 \
         FROM due WHERE o.id = due.id \
         RETURNING o.id, o.message_id, o.exchange, o.routing_key, o.type, o.content_type, \
                   o.correlation_id, o.traceparent, o.body",
    )
    .bind(i64::try_from(MAX_ROUND).unwrap_or(1000))
    .fetch_all(db)
    .await?;
    rows.into_iter()
        .map(|row| {
            let message = OutboundMessage {
                message_id: row.try_get("message_id")?,
                exchange: row.try_get("exchange")?,
                routing_key: row.try_get("routing_key")?,
                message_type: row.try_get("type")?,
                content_type: row.try_get("content_type")?,
                correlation_id: row.try_get("correlation_id")?,
                traceparent: row.try_get("traceparent")?,
                body: row.try_get("body")?,
            };
            Ok(OutboxEntry {
                id: row.try_get("id")?,
                message,
            })
        })
        .collect()
}
