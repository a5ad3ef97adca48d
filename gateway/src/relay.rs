//! The relays: publish committed replies and events with publisher confirms and `mandatory`.
//!
//! Two paths feed them:
//! - **fast path** ([`run`]): the worker that committed a batch hands its outbound messages over
//!   in memory ([`Handoff`]) and acknowledges the batch's inbound messages once the relay says
//!   they are settled: every one confirmed by the broker, or, when the broker returned it (no
//!   queue bound for the recipient) or refused it, inserted in the outbox table for the sweeper.
//!   The batch's inbox rows keep the messages, so a batch committed but never settled (a crash,
//!   a lost channel, a stop past the grace period) is delivered again by the broker and the
//!   gateway publishes them again from there (`trio_handlers::batch`);
//! - **sweeper** ([`sweep`]): every second, outbox rows whose claim expired (a message returned
//!   a minute ago, a nack, a row left by a crashed process) are claimed with
//!   `FOR UPDATE SKIP LOCKED` and published again — with the same `message_id`.
//!
//! Rows the sweeper got confirmed are deleted by one task per process, [`delete_confirmed`],
//! which gathers them for up to [`DELETE_LINGER`] and deletes them in one statement. A row whose
//! delete is late or lost is still claimed for 30 s, and then published again by a sweeper,
//! with the same `message_id`.

use crate::broker::{self, Publish, Published};
use crate::worker::backoff;
use futures::TryFutureExt as _;
use lapin::Channel;
use sqlx::{PgPool, Row};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Mutex, mpsc, oneshot};
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

/// How long a returned (unroutable) message waits in the outbox before the sweeper tries again.
const RETURNED_RETRY_SECONDS: f64 = 60.0;

/// Shared by every relay task of the process.
#[derive(Clone)]
pub struct RelayDeps {
    /// Database (outbox rows).
    pub db: PgPool,
    /// Publishing connections.
    pub publish_pool: deadpool_lapin::Pool,
    /// The longest a broker call may take.
    pub broker_timeout: Duration,
    /// Cancelled when the shutdown grace period is over: stop retrying (unsettled batches stay
    /// unacknowledged, and their inbound messages are delivered again at the next start).
    pub hard_stop: CancellationToken,
    /// The ids of outbox rows the sweeper got confirmed, to [`delete_confirmed`].
    pub confirmed: mpsc::Sender<Vec<i64>>,
}

/// A committed batch's outbound messages, handed to the relays by the worker that committed it.
#[derive(Debug)]
pub struct Handoff {
    /// The messages, as committed.
    pub messages: Vec<OutboundMessage>,
    /// Sent once every message is settled (confirmed, or kept in the outbox table): the worker
    /// may then acknowledge the batch. Dropped unsent when the relay gave up at the end of the
    /// shutdown grace period, so that the batch stays unacknowledged.
    pub settled: oneshot::Sender<()>,
}

/// Runs one relay task until every worker has stopped and the queue is drained.
pub async fn run(deps: RelayDeps, queue: Arc<Mutex<mpsc::Receiver<Handoff>>>) {
    let mut channel: Option<Channel> = None;
    loop {
        let round = {
            let mut rx = queue.lock().await;
            let Some(first) = rx.recv().await else {
                break;
            };
            let mut count = first.messages.len();
            let mut round = vec![first];
            while count < MAX_ROUND {
                match rx.try_recv() {
                    Ok(more) => {
                        count += more.messages.len();
                        round.push(more);
                    }
                    Err(_) => break,
                }
            }
            round
        };
        if settle(&deps, &mut channel, &round).await {
            for handoff in round {
                // A worker that stopped waiting (its session ended) no longer needs to know.
                let _ = handoff.settled.send(());
            }
        }
    }
    if let Some(channel) = channel {
        broker::close_channel(channel, "relay stopped", deps.broker_timeout).await;
    }
    debug!("relay stopped");
}

/// Publishes a round of handoffs and keeps in the outbox table what the broker did not take.
/// `false` when the shutdown grace period ended first.
async fn settle(deps: &RelayDeps, channel: &mut Option<Channel>, round: &[Handoff]) -> bool {
    let messages: Vec<&OutboundMessage> = round.iter().flat_map(|h| &h.messages).collect();
    let Some(results) = publish_until_answered(deps, channel, &messages).await else {
        return false;
    };
    let mut returned = Vec::new();
    let mut nacked = Vec::new();
    for (message, result) in messages.into_iter().zip(results) {
        match result {
            Published::Confirmed => {}
            Published::Returned => returned.push(message),
            Published::Nacked => nacked.push(message),
        }
    }
    if returned.is_empty() && nacked.is_empty() {
        return true;
    }
    warn_unconfirmed(returned.len(), nacked.len());
    // Until it succeeds: the batch's ack waits for it (given up only when the grace period ends,
    // and the batch, unacknowledged, is then delivered again at the next start).
    retry_writes(
        &deps.hard_stop,
        "keeping unconfirmed messages in the outbox",
        None,
        || insert_unconfirmed(&deps.db, &returned, &nacked),
    )
    .await
}

fn warn_unconfirmed(returned: usize, nacked: usize) {
    if returned > 0 {
        warn!(
            count = returned,
            "outbound messages unroutable (no queue bound for the recipient); kept in the outbox and retried in a minute"
        );
    }
    if nacked > 0 {
        warn!(
            count = nacked,
            "outbound messages refused by the broker; kept in the outbox and retried"
        );
    }
}

/// Puts outbound messages in the outbox table, due at once, for the sweeper to publish (`dlq
/// replay`: what a dead letter's committed message caused).
///
/// # Errors
/// Database failures.
pub async fn keep_in_outbox(db: &PgPool, messages: &[&OutboundMessage]) -> sqlx::Result<()> {
    insert_unconfirmed(db, &[], messages).await
}

/// One transaction with synchronous commit: the inbound acknowledgement follows it, so the rows
/// must outlive a database crash (the relay's connections otherwise do not wait for the WAL).
async fn insert_unconfirmed(
    db: &PgPool,
    returned: &[&OutboundMessage],
    nacked: &[&OutboundMessage],
) -> sqlx::Result<()> {
    let mut tx = db.begin().await?;
    sqlx::query("SET LOCAL synchronous_commit = on")
        .execute(&mut *tx)
        .await?;
    for (m, retry_in) in [(returned, RETURNED_RETRY_SECONDS), (nacked, 0.0)] {
        if m.is_empty() {
            continue;
        }
        sqlx::query(
            "INSERT INTO outbox (message_id, exchange, routing_key, type, content_type, \
                                 correlation_id, traceparent, body, claimed_until, attempts) \
             SELECT *, now() + make_interval(secs => $9), 1 \
             FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], \
                         $6::text[], $7::text[], $8::bytea[])",
        )
        .bind(m.iter().map(|m| m.message_id).collect::<Vec<_>>())
        .bind(m.iter().map(|m| m.exchange.as_str()).collect::<Vec<_>>())
        .bind(m.iter().map(|m| m.routing_key.as_str()).collect::<Vec<_>>())
        .bind(
            m.iter()
                .map(|m| m.message_type.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            m.iter()
                .map(|m| m.content_type.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            m.iter()
                .map(|m| m.correlation_id.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            m.iter()
                .map(|m| m.traceparent.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(m.iter().map(|m| m.body.as_slice()).collect::<Vec<_>>())
        .bind(retry_in)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await
}

/// Publishes `messages` until the broker has answered for every one. `None` when the shutdown
/// grace period ended first.
async fn publish_until_answered(
    deps: &RelayDeps,
    channel: &mut Option<Channel>,
    messages: &[&OutboundMessage],
) -> Option<Vec<Published>> {
    let mut delays = backoff();
    loop {
        let started = std::time::Instant::now();
        match publish_round(deps, channel, messages).await {
            Ok(results) => {
                let took = started.elapsed();
                if took >= trio_handlers::batch::SLOW_BATCH {
                    warn!(
                        messages = messages.len(),
                        ms = took.as_millis() as u64,
                        "slow publish round: the broker took this long to confirm"
                    );
                }
                for (message, result) in messages.iter().zip(&results) {
                    debug!(message_id = %message.message_id, correlation_id = message.correlation_id.as_deref().unwrap_or(""), routing_key = %message.routing_key, ?result, "published");
                }
                return Some(results);
            }
            Err(e) => {
                *channel = None;
                if deps.hard_stop.is_cancelled() {
                    warn!(
                        messages = messages.len(),
                        "shutdown grace period over; unpublished messages are published again at the next start"
                    );
                    return None;
                }
                let delay = delays.next().unwrap_or(Duration::from_secs(5));
                warn!(error = %format!("{e:#}"), ?delay, messages = messages.len(), "publishing failed; retrying");
                tokio::select! {
                    _ = deps.hard_stop.cancelled() => {}
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// How often the sweeper's writes are tried before their rows are left for a later sweep.
const SWEEPER_WRITE_ATTEMPTS: usize = 20;

/// Runs `write` until it succeeds, with backoff: at most `attempts` times (`None`: no limit),
/// and no more once the shutdown grace period has ended. `false` when it gave up; the messages
/// concerned are then published again with the same message ids (outbox rows by a sweeper once
/// their claim expires, an unacknowledged batch by the broker's redelivery).
async fn retry_writes<F: Future<Output = sqlx::Result<()>>>(
    hard_stop: &CancellationToken,
    what: &str,
    attempts: Option<usize>,
    mut write: impl FnMut() -> F,
) -> bool {
    let mut delays = backoff();
    let mut tried = 0;
    loop {
        let Err(e) = write().await else {
            return true;
        };
        tried += 1;
        if hard_stop.is_cancelled() || attempts.is_some_and(|limit| tried >= limit) {
            warn!(error = %e, "gave up {what}; those messages will be published again");
            return false;
        }
        let delay = delays.next().unwrap_or(Duration::from_secs(5));
        warn!(error = %e, ?delay, "{what} failed; retrying");
        tokio::select! {
            _ = hard_stop.cancelled() => {}
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Deletes the confirmed rows the sweeper sends, gathering them for up to [`DELETE_LINGER`] (or
/// [`MAX_DELETE`] rows) per statement, until the sweeper has stopped.
pub async fn delete_confirmed(
    db: PgPool,
    mut confirmed: mpsc::Receiver<Vec<i64>>,
    hard_stop: CancellationToken,
) {
    while let Some(ids) = gather(&mut confirmed).await {
        retry_writes(
            &hard_stop,
            "deleting confirmed outbox rows",
            Some(SWEEPER_WRITE_ATTEMPTS),
            || {
                sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
                    .bind(&ids)
                    .execute(&db)
                    .map_ok(|_| ())
            },
        )
        .await;
    }
    debug!("outbox deleter stopped");
}

async fn publish_round(
    deps: &RelayDeps,
    channel: &mut Option<Channel>,
    round: &[&OutboundMessage],
) -> anyhow::Result<Vec<Published>> {
    let ch = match channel {
        Some(ch) if ch.status().connected() => ch.clone(),
        _ => {
            let ch = broker::confirm_channel(&deps.publish_pool, deps.broker_timeout).await?;
            *channel = Some(ch.clone());
            ch
        }
    };
    let messages = round
        .iter()
        .map(|m| Publish {
            exchange: &m.exchange,
            routing_key: &m.routing_key,
            properties: broker::properties_of(m),
            body: &m.body,
        })
        .collect();
    broker::publish_confirmed(&ch, messages, deps.broker_timeout).await
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
            "UPDATE outbox SET claimed_until = now() + make_interval(secs => $2) \
             WHERE id = ANY($1)",
        )
        .bind(returned)
        .bind(RETURNED_RETRY_SECONDS)
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
                deliver_swept(&deps, &mut channel, round).await;
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

/// Publishes swept rows; confirmed ones go to [`delete_confirmed`], the others wait again.
async fn deliver_swept(deps: &RelayDeps, channel: &mut Option<Channel>, round: Vec<OutboxEntry>) {
    let messages: Vec<&OutboundMessage> = round.iter().map(|e| &e.message).collect();
    let Some(results) = publish_until_answered(deps, channel, &messages).await else {
        // The rows stay claimed, and are swept again when the claim expires.
        return;
    };
    let mut confirmed = Vec::new();
    let mut returned = Vec::new();
    let mut nacked = Vec::new();
    for (entry, result) in round.iter().zip(results) {
        match result {
            Published::Confirmed => confirmed.push(entry.id),
            Published::Returned => returned.push(entry.id),
            Published::Nacked => nacked.push(entry.id),
        }
    }
    warn_unconfirmed(returned.len(), nacked.len());
    if !confirmed.is_empty() && deps.confirmed.send(confirmed).await.is_err() {
        // Only when the deleter has stopped: the sweeper publishes the rows again.
        warn!("the outbox deleter has stopped; confirmed rows stay until swept");
    }
    if returned.is_empty() && nacked.is_empty() {
        return;
    }
    retry_writes(
        &deps.hard_stop,
        "releasing unconfirmed outbox rows",
        Some(SWEEPER_WRITE_ATTEMPTS),
        || release(&deps.db, &returned, &nacked),
    )
    .await;
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

    /// Runs [`retry_writes`] over a write that fails `failures` times; how it ended, and the
    /// number of calls.
    async fn retried(
        hard_stop: &CancellationToken,
        attempts: Option<usize>,
        failures: usize,
    ) -> (bool, usize) {
        let calls = std::cell::Cell::new(0);
        let done = retry_writes(hard_stop, "a test write", attempts, || {
            calls.set(calls.get() + 1);
            let result = if calls.get() > failures {
                Ok(())
            } else {
                Err(sqlx::Error::PoolTimedOut)
            };
            std::future::ready(result)
        })
        .await;
        (done, calls.get())
    }

    #[tokio::test(start_paused = true)]
    async fn writes_are_retried_up_to_their_limit_or_until_the_grace_period_ends() {
        let running = CancellationToken::new();
        assert_eq!(retried(&running, Some(3), 10).await, (false, 3));
        assert_eq!(retried(&running, Some(3), 2).await, (true, 3));
        // No limit: as long as it takes (the ack of a batch waits on this one).
        assert_eq!(retried(&running, None, 30).await, (true, 31));
        // Once the grace period is over, one failure is the last.
        let over = CancellationToken::new();
        over.cancel();
        assert_eq!(retried(&over, None, 30).await, (false, 1));
    }

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
