//! The outbox relay: publishes committed replies and events with publisher confirms and
//! `mandatory`, and deletes each outbox row only once the broker confirmed it.
//!
//! Two paths feed it:
//! - **fast path**: the worker that committed a batch hands its outbox over in memory (the rows
//!   are claimed by this process for 30 s, so no other relay touches them meanwhile);
//! - **sweeper**: every second, rows whose claim expired (a crashed process, a nack, an
//!   unroutable message waiting for its recipient's queue) are claimed with
//!   `FOR UPDATE SKIP LOCKED` and published again — with the same `message_id`.
//!
//! Confirmed rows are deleted by one task per process, [`delete_confirmed`], which gathers the
//! rounds of every relay for up to [`DELETE_LINGER`] and deletes them in one statement: at
//! moderate load, publish rounds are small and a transaction per round cost PostgreSQL more
//! than the deletes themselves. A row whose delete is late or lost is still claimed by this
//! process for 30 s, and then published again by a sweeper, with the same `message_id`.

use crate::broker::{self, Published};
use crate::worker::backoff;
use futures::TryFutureExt as _;
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

/// How long [`delete_confirmed`] gathers confirmed rows before deleting them: short beside the
/// 30 s claim, long beside a publish round at moderate load (a few milliseconds).
pub const DELETE_LINGER: Duration = Duration::from_millis(100);

/// The most rows one delete statement removes.
const MAX_DELETE: usize = 10_000;

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
    /// The ids of confirmed rows, to [`delete_confirmed`].
    pub confirmed: mpsc::Sender<Vec<i64>>,
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
    if let Some(channel) = channel {
        broker::close_channel(channel, "relay stopped", deps.broker_timeout).await;
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
    if !confirmed.is_empty() && deps.confirmed.send(confirmed).await.is_err() {
        // Only when the deleter has stopped: the sweeper publishes the rows again.
        warn!("the outbox deleter has stopped; confirmed rows stay until swept");
    }
    if returned.is_empty() && nacked.is_empty() {
        return;
    }
    retry_writes(&deps.hard_stop, "releasing unconfirmed outbox rows", || {
        release(&deps.db, &returned, &nacked)
    })
    .await;
}

/// Runs `write` until it succeeds, 20 attempts at most with backoff, fewer if the shutdown grace
/// period ends. Rows it fails to write stay claimed and are published again by a sweeper.
async fn retry_writes<F: Future<Output = sqlx::Result<()>>>(
    hard_stop: &CancellationToken,
    what: &str,
    mut write: impl FnMut() -> F,
) {
    let mut delays = backoff();
    for _ in 0..20 {
        match write().await {
            Ok(()) => return,
            Err(e) => {
                let delay = delays.next().unwrap_or(Duration::from_secs(5));
                warn!(error = %e, ?delay, "{what} failed; retrying");
                tokio::select! {
                    _ = hard_stop.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    // The rows stay in the outbox; the sweeper re-publishes them with the same message ids.
    warn!("gave up {what}; those messages will be published again");
}

/// Deletes the confirmed rows the relays send, gathering them for up to [`DELETE_LINGER`] (or
/// [`MAX_DELETE`] rows) per statement, until every relay and sweeper has stopped.
pub async fn delete_confirmed(
    db: PgPool,
    mut confirmed: mpsc::Receiver<Vec<i64>>,
    hard_stop: CancellationToken,
) {
    while let Some(ids) = gather(&mut confirmed).await {
        retry_writes(&hard_stop, "deleting confirmed outbox rows", || {
            sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
                .bind(&ids)
                .execute(&db)
                .map_ok(|_| ())
        })
        .await;
    }
    debug!("outbox deleter stopped");
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

/// The next ids to delete: the first round that arrives and every round that follows it within
/// [`DELETE_LINGER`], up to [`MAX_DELETE`] ids. `None` once every sender has gone.
async fn gather(confirmed: &mut mpsc::Receiver<Vec<i64>>) -> Option<Vec<i64>> {
    let mut ids = confirmed.recv().await?;
    let deadline = tokio::time::Instant::now() + DELETE_LINGER;
    while ids.len() < MAX_DELETE {
        match tokio::time::timeout_at(deadline, confirmed.recv()).await {
            Ok(Some(more)) => ids.extend(more),
            Ok(None) | Err(_) => break,
        }
    }
    Some(ids)
}

/// Unroutable rows wait a minute before the sweeper tries them again; nacked ones are due now.
async fn release(db: &PgPool, returned: &[i64], nacked: &[i64]) -> sqlx::Result<()> {
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
    if let Some(channel) = channel {
        broker::close_channel(channel, "sweeper stopped", deps.broker_timeout).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    // Paused time: the runtime advances the clock only when every task waits, so "within the
    // linger" and "after it" do not depend on how busy the machine is.
    #[tokio::test(start_paused = true)]
    async fn confirmed_rounds_are_deleted_together_and_the_deleter_ends_with_its_senders() {
        let (tx, mut rx) = mpsc::channel(16);
        for round in [vec![1, 2], vec![3], vec![4, 5, 6]] {
            tx.send(round).await.unwrap();
        }
        // Rounds waiting together, and one arriving within the linger, make one delete.
        let late = tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(DELETE_LINGER / 4).await;
            late.send(vec![7]).await.unwrap();
        });
        assert_eq!(gather(&mut rx).await, Some(vec![1, 2, 3, 4, 5, 6, 7]));
        // A round after the linger is the next delete's.
        tx.send(vec![8]).await.unwrap();
        assert_eq!(gather(&mut rx).await, Some(vec![8]));
        // A full statement stops gathering; what is left is the next one's.
        tx.send((0..MAX_DELETE as i64).collect()).await.unwrap();
        tx.send(vec![9]).await.unwrap();
        assert_eq!(gather(&mut rx).await.map(|ids| ids.len()), Some(MAX_DELETE));
        assert_eq!(gather(&mut rx).await, Some(vec![9]));
        drop(tx);
        assert_eq!(
            gather(&mut rx).await,
            None,
            "no sender left: the deleter stops"
        );
    }
}
