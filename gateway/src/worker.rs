//! The consume loop: one worker = one channel consuming the five inbound queues, one batch in
//! flight. Several workers per process give several batches in flight.
//!
//! Per batch: read envelopes → dead-letter the unreadable (confirmed) → apply the rest in one
//! transaction ([`trio_handlers::process_batch`]) → hand the committed outbound messages to the
//! relays → take the next batch. The session's acker ([`acknowledge_in_order`]) acks each batch
//! with one `multiple` ack once the relays settled its messages (confirmed by the broker, or
//! kept in the outbox table), batch after batch in delivery order, so a worker has its next
//! batch in its transaction while the previous one is being confirmed. A batch committed but
//! never acknowledged is delivered again, and its inbox rows publish its messages again.
//! Failures are split three ways:
//! - **transient** (database down): the same batch is retried with backoff, nothing acked;
//! - **failed** (a bug, a panic): the batch is retried one message at a time; a message that
//!   fails alone is requeued, and dead-lettered `delivery_limit` on its last allowed delivery;
//! - **broker** (channel or connection lost): the session restarts; unacked deliveries return.

use crate::broker;
use crate::config::Config;
use crate::dead_letter;
use crate::envelope::{self, Checked, DeadLetter};
use crate::relay::Handoff;
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
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};
use trio_handlers::batch::SLOW_BATCH;
use trio_handlers::{BatchError, Context, HeldConnection, Inbound, OutboundMessage, SourceQueue};

/// How many committed batches per worker may wait for the relays before the worker waits too.
const BATCHES_AWAITING_ACK: usize = 4;

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
    /// Committed batches' outbound messages, to the relays.
    pub relay: mpsc::Sender<Handoff>,
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
    let (acks, pending) = mpsc::channel(BATCHES_AWAITING_ACK);
    let mut acker = tokio::spawn(acknowledge_in_order(pending, {
        let channel = channel.clone();
        move |tag| {
            let channel = channel.clone();
            async move {
                broker::timed(
                    limit,
                    "basic.ack multiple",
                    channel.basic_ack(tag, BasicAckOptions { multiple: true }),
                )
                .await
            }
        }
    }));
    // Whatever ends the session, the acker does not outlive it.
    let _abort_acker = AbortOnDrop(acker.abort_handle());
    info!(worker = id, "consuming");
    let mut connection = HeldConnection::default();

    loop {
        let first = tokio::select! {
            biased;
            _ = deps.shutdown.cancelled() => {
                // Acknowledge what the relays settle (or give up at the end of the grace
                // period), then close: deliveries still unacknowledged return to the queue.
                drop(acks);
                if let Ok(Err(e)) = (&mut acker).await {
                    warn!(worker = id, error = %format!("{e:#}"), "batches left unacknowledged at shutdown; they will be delivered again");
                }
                broker::close_channel(channel, "shutdown", limit).await;
                broker::close_channel(publisher, "shutdown", limit).await;
                return Ok(());
            }
            ended = &mut acker => {
                return Err(match ended {
                    Ok(Err(e)) => e,
                    _ => anyhow!("the acker stopped"),
                }
                .context("acknowledging settled batches"));
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
        handle_batch(deps, &mut connection, &publisher, &acks, batch).await?;
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A committed batch waiting for its acknowledgement.
#[derive(Debug)]
pub struct PendingAck {
    /// Resolves once the relays settled the batch's outbound messages; `None` when it has none.
    pub settled: Option<oneshot::Receiver<()>>,
    /// The `multiple` ack that covers the batch; `None` when none of its deliveries is acked.
    pub last_tag: Option<u64>,
}

/// Acknowledges batches in the order they were committed, each once its messages are settled:
/// a `multiple` ack covers every earlier delivery of the channel, so a batch is never acked
/// before the one before it. Returns when `pending` closes (everything acknowledged), or with
/// an error when a batch will never be settled (the relays gave up at the end of the shutdown
/// grace period) or an ack fails: the session must then end, and the broker delivers the
/// unacknowledged messages again.
///
/// # Errors
/// As said above.
pub async fn acknowledge_in_order<F, A>(
    mut pending: mpsc::Receiver<PendingAck>,
    mut ack: F,
) -> anyhow::Result<()>
where
    F: FnMut(u64) -> A,
    A: Future<Output = anyhow::Result<()>>,
{
    while let Some(batch) = pending.recv().await {
        if let Some(settled) = batch.settled {
            settled
                .await
                .map_err(|_| anyhow!("the relays gave up publishing a committed batch"))?;
        }
        if let Some(tag) = batch.last_tag {
            ack(tag).await?;
        }
    }
    Ok(())
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
    connection: &mut HeldConnection,
    publisher: &Channel,
    acks: &mpsc::Sender<PendingAck>,
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
    let mut outbound = Vec::new();
    match process_until_not_transient(deps, connection, &inbound).await {
        Some(Ok(result)) => {
            for (message, outcome) in inbound.iter().zip(&result.outcomes) {
                debug!(message_id = %message.message_id, message_type = %message.message_type, status = outcome.status.as_str(), code = outcome.code.as_deref().unwrap_or(""), "outcome committed");
            }
            outbound = result.outbound;
        }
        Some(Err(failure)) => {
            warn!(error = %failure, messages = inbound.len(), "batch failed; retrying its messages one by one");
            let mut poison: Vec<(SourceQueue, &Delivery, DeadLetter)> = Vec::new();
            for (i, message) in positions.iter().zip(&inbound) {
                match process_until_not_transient(deps, connection, std::slice::from_ref(message))
                    .await
                {
                    Some(Ok(result)) => outbound.extend(result.outbound),
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

    // Committed: publish now; the batch is acknowledged once the relays settled it.
    let settled = if outbound.is_empty() {
        None
    } else {
        Some(hand_to_relay(&deps.relay, outbound).await?)
    };
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
    acks.send(PendingAck {
        settled,
        last_tag: last_acked,
    })
    .await
    .map_err(|_| anyhow!("the acker has stopped"))
}

/// Hands a committed batch's outbound messages to the relays; the receiver resolves once they
/// are settled. The relays' queue is bounded, so a worker waits here while the relays are behind
/// (back-pressure, holding the batch's deliveries unacked); a wait of [`SLOW_BATCH`] or more is
/// logged, so that a latency tail spent here can be told from one spent in the batch ("slow
/// batch") or in the broker's confirms ("slow publish round").
async fn hand_to_relay(
    relay: &mpsc::Sender<Handoff>,
    outbound: Vec<OutboundMessage>,
) -> anyhow::Result<oneshot::Receiver<()>> {
    let messages = outbound.len();
    let started = tokio::time::Instant::now();
    let (settled, settlement) = oneshot::channel();
    relay
        .send(Handoff {
            messages: outbound,
            settled,
        })
        .await
        .map_err(|_| anyhow!("the relays have stopped"))
        .context("handing the outbound messages to the relays")?;
    let waited = started.elapsed();
    if waited >= SLOW_BATCH {
        warn!(
            messages,
            ms = u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
            "slow relay handoff: the relays were behind"
        );
    }
    Ok(settlement)
}

/// Runs a batch, retrying while the database is unavailable. `None` if shutdown came first.
async fn process_until_not_transient(
    deps: &WorkerDeps,
    connection: &mut HeldConnection,
    batch: &[Inbound],
) -> Option<Result<trio_handlers::BatchResult, String>> {
    if batch.is_empty() {
        return Some(Ok(trio_handlers::BatchResult {
            outcomes: vec![],
            outbound: vec![],
        }));
    }
    let mut delays = backoff();
    loop {
        let attempt = AssertUnwindSafe(trio_handlers::process_batch(&deps.ctx, connection, batch))
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

    fn entry(id: i64) -> OutboundMessage {
        OutboundMessage {
            message_id: trio_handlers::outbound::stable_message_id(&["handoff", &id.to_string()]),
            exchange: String::new(),
            routing_key: "q".into(),
            message_type: "reply".into(),
            content_type: "application/json".into(),
            correlation_id: None,
            traceparent: None,
            body: b"{}".to_vec(),
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
        assert!(format!("{e:#}").contains("relays have stopped"), "{e:#}");
    }

    /// Runs [`acknowledge_in_order`] over `pending`, recording the tags it acks.
    fn acker(
        pending: mpsc::Receiver<PendingAck>,
    ) -> (
        Arc<Mutex<Vec<u64>>>,
        tokio::task::JoinHandle<anyhow::Result<()>>,
    ) {
        let acked = Arc::new(Mutex::new(Vec::new()));
        let record = acked.clone();
        let task = tokio::spawn(acknowledge_in_order(pending, move |tag| {
            let record = record.clone();
            async move {
                record.lock().map_err(|_| anyhow!("poisoned"))?.push(tag);
                Ok(())
            }
        }));
        (acked, task)
    }

    /// Queues a committed batch for the acker.
    async fn wait_for(
        acks: &mpsc::Sender<PendingAck>,
        settled: Option<oneshot::Receiver<()>>,
        last_tag: Option<u64>,
    ) {
        acks.send(PendingAck { settled, last_tag }).await.unwrap();
    }

    fn acked(tags: &Arc<Mutex<Vec<u64>>>) -> Vec<u64> {
        tags.lock().unwrap().clone()
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_is_acked_only_once_settled_and_never_before_an_earlier_one() {
        let (acks, pending) = mpsc::channel(4);
        let (tags, task) = acker(pending);
        let (first_settled, first) = oneshot::channel();
        let (second_settled, second) = oneshot::channel();
        wait_for(&acks, Some(first), Some(200)).await;
        wait_for(&acks, Some(second), Some(400)).await;
        // A batch without outbound messages still waits for the ones before it.
        wait_for(&acks, None, Some(450)).await;
        // Every delivery of this one was requeued: nothing to ack.
        wait_for(&acks, None, None).await;

        // The second batch is confirmed first: its `multiple` ack would cover the first's
        // deliveries too, so nothing is acked yet.
        second_settled.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(acked(&tags), Vec::<u64>::new());

        first_settled.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(acked(&tags), vec![200, 400, 450]);

        drop(acks);
        task.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_the_relays_give_up_on_is_never_acked_nor_anything_after_it() {
        let (acks, pending) = mpsc::channel(4);
        let (tags, task) = acker(pending);
        let (given_up, first) = oneshot::channel::<()>();
        wait_for(&acks, Some(first), Some(7)).await;
        wait_for(&acks, None, Some(9)).await;
        drop(given_up);
        let e = task.await.unwrap().unwrap_err();
        assert!(format!("{e:#}").contains("gave up"), "{e:#}");
        assert_eq!(acked(&tags), Vec::<u64>::new());
    }
}
