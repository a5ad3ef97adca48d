//! The consume loop: one worker = one channel consuming the five inbound queues, one batch in
//! flight. Several workers per process give several batches in flight.
//!
//! Per batch: read envelopes → dead-letter the unreadable (confirmed) → apply the rest in one
//! transaction ([`trio_handlers::process_batch`]) → hand the committed outbox to the relay →
//! ack everything with one `multiple` ack. Failures are split three ways:
//! - **transient** (database down): the same batch is retried with backoff, nothing acked;
//! - **failed** (a bug, a panic): the batch is retried one message at a time; a message that
//!   fails alone is requeued, and dead-lettered `delivery_limit` on its last allowed delivery;
//! - **broker** (channel or connection lost): the session restarts; unacked deliveries return.

use crate::broker;
use crate::config::Config;
use crate::dead_letter;
use crate::envelope::{self, Checked, DeadLetter};
use anyhow::{Context as _, anyhow};
use backon::{BackoffBuilder, ExponentialBuilder};
use futures::stream::{self, StreamExt};
use futures::{FutureExt, future};
use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};
use trio_handlers::batch::SLOW_BATCH;
use trio_handlers::{BatchError, Context, Inbound, OutboxEntry, SourceQueue};

/// Everything a worker shares with the rest of the process.
#[derive(Clone)]
pub struct WorkerDeps {
    /// Settings.
    pub config: Arc<Config>,
    /// Handler context (database, pseudonymiser, operators).
    pub ctx: Context,
    /// Connections for consuming.
    pub consume_pool: deadpool_lapin::Pool,
    /// Connections for publishing (dead letters).
    pub publish_pool: deadpool_lapin::Pool,
    /// Committed outbox batches, to the relay.
    pub relay: mpsc::Sender<Vec<OutboxEntry>>,
    /// Stops taking new messages.
    pub shutdown: CancellationToken,
}

/// Backoff for reconnecting and for retrying a batch while the database is down.
pub fn backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}

/// Runs worker `id` until shutdown, reconnecting with backoff whenever the broker goes away.
pub async fn run(id: usize, deps: WorkerDeps) {
    let mut delays = backoff();
    while !deps.shutdown.is_cancelled() {
        match session(id, &deps).await {
            Ok(()) => break,
            Err(e) => {
                let delay = delays.next().unwrap_or(Duration::from_secs(5));
                warn!(worker = id, error = %format!("{e:#}"), ?delay, "worker session ended; reconnecting");
                tokio::select! {
                    _ = deps.shutdown.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    debug!(worker = id, "worker stopped");
}

type Item = (SourceQueue, lapin::Result<Delivery>);

/// One connection's worth of consuming. Returns `Ok` on shutdown, `Err` when the broker failed.
async fn session(id: usize, deps: &WorkerDeps) -> anyhow::Result<()> {
    let limit = deps.config.broker_timeout;
    let channel = broker::channel(&deps.consume_pool, limit).await?;
    broker::timed(
        limit,
        "basic.qos",
        channel.basic_qos(deps.config.prefetch, BasicQosOptions::default()),
    )
    .await?;
    let mut consumers = Vec::new();
    for queue in SourceQueue::ALL {
        let consumer = broker::timed(
            limit,
            "basic.consume",
            channel.basic_consume(
                &queue.queue_name(),
                &format!(
                    "trio-gateway-{}-w{id}-{}",
                    std::process::id(),
                    queue.routing_key()
                ),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
        consumers.push(consumer.map(move |d| (queue, d)).boxed());
    }
    let mut deliveries = stream::select_all(consumers);
    let publisher = broker::confirm_channel(&deps.publish_pool, limit).await?;
    info!(worker = id, "consuming");

    loop {
        let first = tokio::select! {
            biased;
            _ = deps.shutdown.cancelled() => {
                broker::close_channel(channel, "shutdown", limit).await;
                broker::close_channel(publisher, "shutdown", limit).await;
                return Ok(());
            }
            next = deliveries.next() => next,
        };
        let mut batch = vec![delivered(first)?];
        let deadline = tokio::time::Instant::now() + deps.config.batch_linger;
        while batch.len() < deps.config.batch_size {
            // Take what is already buffered at once; wait at most the linger for more.
            let next = match deliveries.next().now_or_never() {
                Some(next) => next,
                None => match tokio::time::timeout_at(deadline, deliveries.next()).await {
                    Ok(next) => next,
                    Err(_) => break,
                },
            };
            batch.push(delivered(next)?);
        }
        handle_batch(deps, &channel, &publisher, batch).await?;
    }
}

fn delivered(item: Option<Item>) -> anyhow::Result<(SourceQueue, Delivery)> {
    match item {
        Some((queue, Ok(delivery))) => Ok((queue, delivery)),
        Some((_, Err(e))) => Err(anyhow!(e).context("consumer failed")),
        None => Err(anyhow!("the broker cancelled the consumers")),
    }
}

/// What to do with one delivery after processing.
enum Settle {
    /// Covered by the batch's `multiple` ack.
    Ack,
    /// Return it to the queue (it failed; its delivery count grows).
    Requeue,
}

async fn handle_batch(
    deps: &WorkerDeps,
    channel: &Channel,
    publisher: &Channel,
    batch: Vec<(SourceQueue, Delivery)>,
) -> anyhow::Result<()> {
    let limit = deps.config.broker_timeout;
    // The readable messages, and where each stands in the batch (for settling it).
    let mut inbound: Vec<Inbound> = Vec::with_capacity(batch.len());
    let mut positions: Vec<usize> = Vec::with_capacity(batch.len());
    let mut dead: Vec<(SourceQueue, &Delivery, DeadLetter)> = Vec::new();
    for (i, (queue, delivery)) in batch.iter().enumerate() {
        match envelope::check(*queue, delivery, deps.config.max_message_bytes) {
            Checked::Valid(message) => {
                inbound.push(*message);
                positions.push(i);
            }
            Checked::Dead(letter) => {
                warn!(queue = queue.routing_key(), reason = letter.reason.as_str(), detail = %letter.detail, "dead-lettering an unreadable message");
                dead.push((*queue, delivery, letter));
            }
        }
    }
    dead_letter::publish(publisher, &dead, limit).await?;

    let mut settle: Vec<Settle> = batch.iter().map(|_| Settle::Ack).collect();
    let mut outbox = Vec::new();
    match process_until_not_transient(deps, &inbound).await {
        Some(Ok(result)) => {
            for (message, outcome) in inbound.iter().zip(&result.outcomes) {
                debug!(message_id = %message.message_id, message_type = %message.message_type, status = outcome.status.as_str(), code = outcome.code.as_deref().unwrap_or(""), "outcome committed");
            }
            outbox = result.outbox;
        }
        Some(Err(failure)) => {
            warn!(error = %failure, messages = inbound.len(), "batch failed; retrying its messages one by one");
            let mut poison: Vec<(SourceQueue, &Delivery, DeadLetter)> = Vec::new();
            for (i, message) in positions.iter().zip(&inbound) {
                match process_until_not_transient(deps, std::slice::from_ref(message)).await {
                    Some(Ok(result)) => outbox.extend(result.outbox),
                    Some(Err(failure)) => {
                        let (queue, delivery) = &batch[*i];
                        let attempt = envelope::previous_deliveries(delivery) + 1;
                        error!(queue = queue.routing_key(), message_type = %message.message_type, attempt, error = %failure, "message failed");
                        if attempt >= u64::from(deps.config.delivery_limit) {
                            poison.push((
                                *queue,
                                delivery,
                                dead_letter::delivery_limit(format!(
                                    "failed {attempt} times; last error: {failure}"
                                )),
                            ));
                        } else {
                            settle[*i] = Settle::Requeue;
                        }
                    }
                    None => return Ok(()),
                }
            }
            dead_letter::publish(publisher, &poison, limit).await?;
        }
        // Shutting down while the database is unreachable: leave the batch unacked.
        None => return Ok(()),
    }

    // Committed: publish now (before the ack, so a lost channel cannot delay the replies).
    if !outbox.is_empty() {
        hand_to_relay(&deps.relay, outbox).await?;
    }
    for ((_, delivery), settle) in batch.iter().zip(&settle) {
        if let Settle::Requeue = settle {
            broker::timed(
                limit,
                "basic.nack",
                delivery.acker.nack(BasicNackOptions {
                    multiple: false,
                    requeue: true,
                }),
            )
            .await?;
        }
    }
    // One `multiple` ack up to the last delivery to ack (requeued ones are no longer outstanding).
    let last_acked = batch
        .iter()
        .zip(&settle)
        .rev()
        .find(|(_, s)| matches!(s, Settle::Ack))
        .map(|((_, delivery), _)| delivery.delivery_tag);
    if let Some(tag) = last_acked {
        broker::timed(
            limit,
            "basic.ack multiple",
            channel.basic_ack(tag, BasicAckOptions { multiple: true }),
        )
        .await?;
    }
    Ok(())
}

/// Hands a committed outbox to the relays. Their queue is bounded, so a worker waits here while
/// the relays are behind (back-pressure, holding the batch's deliveries unacked); a wait of
/// [`SLOW_BATCH`] or more is logged, so that a latency tail spent here can be told from one
/// spent in the batch ("slow batch") or in the broker's confirms ("slow publish round").
async fn hand_to_relay(
    relay: &mpsc::Sender<Vec<OutboxEntry>>,
    outbox: Vec<OutboxEntry>,
) -> anyhow::Result<()> {
    let messages = outbox.len();
    let started = tokio::time::Instant::now();
    relay
        .send(outbox)
        .await
        .map_err(|_| anyhow!("the outbox relay has stopped"))
        .context("handing the outbox to the relay")?;
    let waited = started.elapsed();
    if waited >= SLOW_BATCH {
        warn!(
            messages,
            ms = u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
            "slow relay handoff: the relays were behind"
        );
    }
    Ok(())
}

/// Runs a batch, retrying while the database is unavailable. `None` if shutdown came first.
async fn process_until_not_transient(
    deps: &WorkerDeps,
    batch: &[Inbound],
) -> Option<Result<trio_handlers::BatchResult, String>> {
    if batch.is_empty() {
        return Some(Ok(trio_handlers::BatchResult {
            outcomes: vec![],
            outbox: vec![],
        }));
    }
    let mut delays = backoff();
    loop {
        let attempt = AssertUnwindSafe(trio_handlers::process_batch(&deps.ctx, batch))
            .catch_unwind()
            .await;
        match attempt {
            Ok(Ok(result)) => return Some(Ok(result)),
            Ok(Err(BatchError::Failed(e))) => return Some(Err(e)),
            Err(_) => return Some(Err("a handler panicked".to_owned())),
            Ok(Err(BatchError::Transient(e))) => {
                let delay = delays.next().unwrap_or(Duration::from_secs(5));
                warn!(error = %e, ?delay, "database unavailable; retrying the batch");
                let cancelled = future::select(
                    Box::pin(deps.shutdown.cancelled()),
                    Box::pin(tokio::time::sleep(delay)),
                )
                .await;
                if let future::Either::Left(_) = cancelled {
                    return None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use trio_handlers::OutboundMessage;

    /// Log lines written while a test runs, on its own thread.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Ok(mut lines) = self.0.lock() {
                lines.extend_from_slice(buf);
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn text(&self) -> String {
            let bytes = self.0.lock().map(|b| b.clone()).unwrap_or_default();
            String::from_utf8_lossy(&bytes).into_owned()
        }
    }

    fn entry(id: i64) -> OutboxEntry {
        OutboxEntry {
            id,
            message: OutboundMessage {
                message_id: trio_handlers::outbound::stable_message_id(&[
                    "handoff",
                    &id.to_string(),
                ]),
                exchange: String::new(),
                routing_key: "q".into(),
                message_type: "reply".into(),
                content_type: "application/json".into(),
                correlation_id: None,
                traceparent: None,
                body: b"{}".to_vec(),
            },
        }
    }

    // Paused time: the relay's delay is exact, whatever the machine's load.
    #[tokio::test(start_paused = true)]
    async fn a_handoff_that_waits_for_the_relays_says_so_in_a_warning() {
        let logs = Captured::default();
        let writer = logs.clone();
        let _subscriber = tracing::subscriber::set_default(
            tracing_subscriber::fmt()
                .with_ansi(false)
                .with_writer(move || writer.clone())
                .finish(),
        );
        let (relay, mut queue) = mpsc::channel(1);

        // Room in the queue: no wait, no warning.
        hand_to_relay(&relay, vec![entry(1)]).await.unwrap();
        assert!(
            !logs.text().contains("slow relay handoff"),
            "{}",
            logs.text()
        );

        // The queue is full and the relays take longer than SLOW_BATCH to make room.
        tokio::spawn(async move {
            tokio::time::sleep(SLOW_BATCH + Duration::from_millis(50)).await;
            let first = queue.recv().await;
            let second = queue.recv().await;
            (first, second)
        });
        hand_to_relay(&relay, vec![entry(2), entry(3)])
            .await
            .unwrap();
        let text = logs.text();
        let line = text
            .lines()
            .find(|l| l.contains("slow relay handoff"))
            .unwrap_or_else(|| panic!("no handoff warning in: {text}"));
        assert!(line.contains("messages=2"), "{line}");
        assert!(line.contains("ms=250"), "{line}");
    }

    #[tokio::test]
    async fn a_handoff_to_stopped_relays_is_an_error() {
        let (relay, queue) = mpsc::channel(1);
        drop(queue);
        let e = hand_to_relay(&relay, vec![entry(1)]).await.unwrap_err();
        assert!(format!("{e:#}").contains("relay has stopped"), "{e:#}");
    }
}
