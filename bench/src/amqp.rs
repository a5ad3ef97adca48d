//! The broker side of the benchmark: a pipelined confirmed publisher (optionally paced), an
//! outbound sink that measures end-to-end latency, and the plain-lapin relay that gives the
//! broker's own ceiling.
//!
//! Latency travels in the W3C `traceparent` header, which the gateway copies from an inbound
//! message to every message it causes: the trace id carries the publish instant (nanoseconds on
//! this process's monotonic clock) and the span id the phase number.

use crate::reference::Store;
use anyhow::{Context as _, anyhow, bail};
use futures::{FutureExt as _, StreamExt as _};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::publisher_confirm::{Confirmation, PublisherConfirm};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use std::collections::VecDeque;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The monotonic origin of every timestamp the benchmark puts on the wire.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds since [`epoch`].
pub fn now_ns() -> u64 {
    u64::try_from(epoch().elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// The instant `ns` nanoseconds after [`epoch`].
pub fn instant_of(ns: u64) -> Instant {
    epoch() + Duration::from_nanos(ns)
}

/// A `traceparent` carrying the publish instant and the phase (never all-zero ids).
fn traceparent(phase: u8, at_ns: u64) -> String {
    format!(
        "00-7472696f62656e63{at_ns:016x}-{:016x}-01",
        u64::from(phase) + 1
    )
}

/// `(phase, publish instant)` from a benchmark `traceparent`.
fn parse_traceparent(value: &str) -> Option<(u8, u64)> {
    let mut parts = value.split('-');
    let (_, trace, span) = (parts.next()?, parts.next()?, parts.next()?);
    let at = u64::from_str_radix(trace.get(16..32)?, 16).ok()?;
    let phase = u64::from_str_radix(span, 16).ok()?.checked_sub(1)?;
    Some((u8::try_from(phase).ok()?, at))
}

/// Opens a named connection.
///
/// # Errors
/// When the broker is unreachable or refuses the user.
pub async fn connect(url: &str, name: &str) -> anyhow::Result<Connection> {
    Connection::connect(
        url,
        ConnectionProperties::default().with_connection_name(LongString::from(name.to_owned())),
    )
    .await
    .with_context(|| {
        format!(
            "connecting to RabbitMQ ({name}); is it running on {}?",
            host_of(url)
        )
    })
}

fn host_of(url: &str) -> &str {
    url.rsplit_once('@').map_or(url, |(_, h)| h)
}

/// Declares a durable quorum queue.
///
/// # Errors
/// Broker failures.
pub async fn declare_quorum(channel: &Channel, name: &str) -> anyhow::Result<()> {
    let mut args = FieldTable::default();
    args.insert(
        ShortString::from("x-queue-type"),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    channel
        .queue_declare(
            name,
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .with_context(|| format!("declaring queue {name}"))?;
    Ok(())
}

/// Binds a queue to an exchange.
///
/// # Errors
/// Broker failures.
pub async fn bind(channel: &Channel, queue: &str, exchange: &str, key: &str) -> anyhow::Result<()> {
    channel
        .queue_bind(
            queue,
            exchange,
            key,
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("binding {queue} to {exchange}"))?;
    Ok(())
}

/// How many consumers a queue has (0 when it does not exist yet).
pub async fn consumers_of(connection: &Connection, queue: &str) -> u32 {
    let Ok(channel) = connection.create_channel().await else {
        return 0;
    };
    let declared = channel
        .queue_declare(
            queue,
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    let _ = channel.close(200, "probe").await;
    declared.map(|q| q.consumer_count()).unwrap_or(0)
}

/// One message to publish (its `traceparent` is added at publish time).
pub struct Message {
    /// Exchange.
    pub exchange: &'static str,
    /// Routing key.
    pub routing_key: String,
    /// AMQP `type` (None for the relay's plain messages).
    pub message_type: Option<&'static str>,
    /// AMQP `message_id`.
    pub message_id: String,
    /// Body.
    pub body: Vec<u8>,
}

/// A confirmed publisher on its own connection, as one broker user.
pub struct Publisher {
    _connection: Connection,
    channel: Channel,
    user: String,
}

/// Unconfirmed publishes allowed in flight.
const WINDOW: usize = 2000;

impl Publisher {
    /// Connects as the user in `url`.
    ///
    /// # Errors
    /// Broker failures.
    pub async fn connect(url: &str, user: &str) -> anyhow::Result<Self> {
        let connection = connect(url, &format!("trio-bench publisher {user}")).await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Self {
            _connection: connection,
            channel,
            user: user.to_owned(),
        })
    }

    /// Publishes `count` messages made by `make(k)`, persistent, with `user_id` and the phase's
    /// `traceparent`, keeping up to [`WINDOW`] unconfirmed; paced at `rate` msgs/s when given.
    /// Returns the instant of the first publish.
    ///
    /// The messages due together (when paced, every one whose instant has come), up to
    /// [`GROUP`] at a time, are published together, as the gateway's relays do: each
    /// `basic_publish` hands its frames to lapin's I/O thread and waits until they are written,
    /// and awaited one by one that cost two thread switches per message, about 10 µs of the
    /// bench's CPU per message at 1:1 and at half load (runs BO and BP) on the machine the
    /// gateway shares.
    ///
    /// # Errors
    /// Broker failures, or a message the broker refused or could not route.
    pub async fn publish(
        &self,
        phase: u8,
        count: u64,
        rate: Option<f64>,
        mut make: impl FnMut(u64) -> Message,
    ) -> anyhow::Result<Instant> {
        let start = Instant::now();
        let mut pending: VecDeque<PublisherConfirm> = VecDeque::with_capacity(WINDOW + GROUP);
        let options = BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        };
        let mut k = 0;
        while k < count {
            let end = match rate {
                Some(rate) => {
                    let due = start + Duration::from_secs_f64(k as f64 / rate);
                    tokio::time::sleep_until(due.into()).await;
                    due_by(start.elapsed(), rate).clamp(k + 1, count.min(k + GROUP as u64))
                }
                None => count.min(k + GROUP as u64),
            };
            // The properties apart from the messages, so that each publish takes its own
            // (lapin wants them by value) while the bodies stay borrowed.
            let (group, props): (Vec<Message>, Vec<BasicProperties>) = (k..end)
                .map(|i| {
                    let mut m = make(i);
                    let id = std::mem::take(&mut m.message_id);
                    let props = self.properties(phase, id, m.message_type);
                    (m, props)
                })
                .unzip();
            let publishes = group.iter().zip(props).map(|(m, props)| {
                self.channel
                    .basic_publish(m.exchange, &m.routing_key, options, &m.body, props)
            });
            let confirms = futures::future::try_join_all(publishes)
                .await
                .context("publishing")?;
            pending.extend(confirms);
            while pending.len() > WINDOW {
                if let Some(c) = pending.pop_front() {
                    check(c.await?)?;
                }
            }
            k = end;
        }
        for c in pending {
            check(c.await?)?;
        }
        Ok(start)
    }

    /// A message's properties: its id and type, persistent, `user_id`, its phase's `traceparent`
    /// stamped now.
    fn properties(
        &self,
        phase: u8,
        message_id: String,
        message_type: Option<&'static str>,
    ) -> BasicProperties {
        let mut headers = FieldTable::default();
        headers.insert(
            ShortString::from("traceparent"),
            AMQPValue::LongString(LongString::from(traceparent(phase, now_ns()))),
        );
        let mut props = BasicProperties::default()
            .with_message_id(ShortString::from(message_id))
            .with_user_id(ShortString::from(self.user.clone()))
            .with_delivery_mode(2)
            .with_headers(headers);
        if let Some(t) = message_type {
            props = props
                .with_type(ShortString::from(t))
                .with_content_type(ShortString::from("application/json"));
        }
        props
    }
}

/// Messages published together at most.
const GROUP: usize = 100;

/// How many messages of a paced publisher are due `elapsed` after its first: message `k` is
/// due at `k / rate` seconds, so every `k` up to `elapsed × rate`, inclusive.
fn due_by(elapsed: Duration, rate: f64) -> u64 {
    (elapsed.as_secs_f64() * rate).floor() as u64 + 1
}

fn check(confirmation: Confirmation) -> anyhow::Result<()> {
    match confirmation {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        Confirmation::Ack(Some(_)) => bail!("a message was unroutable (no queue bound)"),
        Confirmation::Nack(_) => bail!("the broker refused a message"),
    }
}

/// What a sink received for one phase.
#[derive(Debug, Default)]
pub struct Received {
    /// Messages of the phase.
    pub count: u64,
    /// When the last one arrived.
    pub last: Option<Instant>,
    /// End-to-end latencies, microseconds.
    pub latencies_us: Vec<u32>,
    /// The worst latency (microseconds) among the messages that arrived in each second since
    /// the first arrival: whether a tail is one stall or spread over the phase.
    pub worst_per_second_us: Vec<u32>,
    /// When the first one arrived.
    pub first: Option<Instant>,
    /// Inbound messages answered `stale` (no outbound message): a delayed batch was overtaken
    /// by a newer version of the same trajet, which the gateway rightly refuses to undo.
    pub stale: u64,
}

impl Received {
    /// How the latencies over `limit_ms` spread over the phase: `"3 of 20 seconds had a
    /// latency over 50 ms, 0.42 % of the messages (worst 380.2 ms, in second 12)"`. The share
    /// says how far p99 is from the limit: it is over the limit exactly when the share is over
    /// one per cent.
    pub fn seconds_over(&self, limit_ms: f64) -> String {
        let limit_us = limit_ms * 1000.0;
        // Sorted by [`Sink::collect`].
        let within = self
            .latencies_us
            .partition_point(|&us| f64::from(us) <= limit_us);
        let share = if self.latencies_us.is_empty() {
            0.0
        } else {
            100.0 * (self.latencies_us.len() - within) as f64 / self.latencies_us.len() as f64
        };
        let over = self
            .worst_per_second_us
            .iter()
            .filter(|&&us| f64::from(us) > limit_us)
            .count();
        let (worst_second, worst_us) = self
            .worst_per_second_us
            .iter()
            .enumerate()
            .max_by_key(|&(_, us)| *us)
            .map_or((0, 0), |(s, us)| (s, *us));
        format!(
            "{over} of {} seconds had a latency over {limit_ms:.0} ms, {share:.2} % of the \
             messages (worst {:.1} ms, in second {worst_second})",
            self.worst_per_second_us.len(),
            f64::from(worst_us) / 1000.0
        )
    }

    /// The `q` quantile of the latencies (sorted by [`Sink::collect`]), in milliseconds.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return 0.0;
        }
        let last = self.latencies_us.len() - 1;
        let i = ((last as f64) * q).round() as usize;
        f64::from(self.latencies_us[i.min(last)]) / 1000.0
    }
}

/// Consumes a quorum queue (acks in batches) and times what arrives.
pub struct Sink {
    _connection: Connection,
    channel: Channel,
    consumer: Consumer,
    last_tag: u64,
    acked_tag: u64,
}

impl Sink {
    /// Consumes `queue` as the user in `url`.
    ///
    /// # Errors
    /// Broker failures.
    pub async fn open(url: &str, queue: &str) -> anyhow::Result<Self> {
        let connection = connect(url, &format!("trio-bench sink {queue}")).await?;
        let channel = connection.create_channel().await?;
        channel.basic_qos(4000, BasicQosOptions::default()).await?;
        let consumer = channel
            .basic_consume(
                queue,
                "trio-bench-sink",
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Self {
            _connection: connection,
            channel,
            consumer,
            last_tag: 0,
            acked_tag: 0,
        })
    }

    async fn ack_all(&mut self) -> anyhow::Result<()> {
        if self.last_tag > self.acked_tag {
            self.channel
                .basic_ack(self.last_tag, BasicAckOptions { multiple: true })
                .await
                .context("acking the sink")?;
            self.acked_tag = self.last_tag;
        }
        Ok(())
    }

    /// Receives into `got` until it holds `expected` messages of `phase`, or nothing arrived for
    /// `idle`. Messages of other phases (late re-publishes) are acked and ignored.
    ///
    /// # Errors
    /// A broken consumer.
    pub async fn collect(
        &mut self,
        phase: u8,
        got: &mut Received,
        expected: u64,
        idle: Duration,
    ) -> anyhow::Result<()> {
        let mut unacked = 0u32;
        while got.count < expected {
            let next = match self.consumer.next().now_or_never() {
                Some(next) => next,
                None => {
                    if unacked > 0 {
                        self.ack_all().await?;
                        unacked = 0;
                    }
                    match tokio::time::timeout(idle, self.consumer.next()).await {
                        Ok(next) => next,
                        Err(_) => break,
                    }
                }
            };
            let delivery = next.ok_or_else(|| anyhow!("the sink's consumer was cancelled"))??;
            let now = Instant::now();
            self.last_tag = delivery.delivery_tag;
            unacked += 1;
            if unacked >= 1000 {
                self.ack_all().await?;
                unacked = 0;
            }
            let stamp = delivery
                .properties
                .headers()
                .as_ref()
                .and_then(|h| trio_gateway::dead_letter::read_header(h, "traceparent"))
                .and_then(|t| parse_traceparent(&t));
            if let Some((p, at)) = stamp
                && p == phase
            {
                got.count += 1;
                got.last = Some(now);
                let latency = now.saturating_duration_since(instant_of(at));
                let latency_us = u32::try_from(latency.as_micros()).unwrap_or(u32::MAX);
                got.latencies_us.push(latency_us);
                let second = now
                    .saturating_duration_since(*got.first.get_or_insert(now))
                    .as_secs();
                let second = usize::try_from(second).unwrap_or(usize::MAX);
                if got.worst_per_second_us.len() <= second {
                    got.worst_per_second_us.resize(second + 1, 0);
                }
                got.worst_per_second_us[second] = got.worst_per_second_us[second].max(latency_us);
            }
        }
        self.ack_all().await?;
        got.latencies_us.sort_unstable();
        Ok(())
    }
}

/// The relay ceiling: `workers` plain lapin relays, each consuming `from` (prefetch 2 × batch)
/// and, per batch of up to `batch` deliveries, publishing every message to `to` with confirms
/// (pipelined: all started before any is awaited), awaiting the confirms, then acking the batch
/// with one `multiple` ack — the gateway's durability without its work. With a `store`, each
/// batch is first committed to it and its outbox rows marked sent after the confirms: issue 10's
/// reference pipeline ([`crate::reference`]). Runs until the returned tasks are aborted.
///
/// # Errors
/// Broker failures while setting up.
pub async fn spawn_relay(
    url: &str,
    from: &str,
    to: &str,
    workers: usize,
    batch: usize,
    store: Option<&Store>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<anyhow::Result<()>>>> {
    let mut tasks = Vec::new();
    for w in 0..workers {
        let consume = connect(url, &format!("trio-bench relay {w} consume")).await?;
        let publish = connect(url, &format!("trio-bench relay {w} publish")).await?;
        let input = consume.create_channel().await?;
        input
            .basic_qos(
                u16::try_from(batch * 2).unwrap_or(u16::MAX),
                BasicQosOptions::default(),
            )
            .await?;
        let mut consumer = input
            .basic_consume(
                from,
                &format!("relay-{w}"),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let output = publish.create_channel().await?;
        output
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let to = to.to_owned();
        let store = store.cloned();
        tasks.push(tokio::spawn(async move {
            let _connections = (consume, publish);
            let options = BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            };
            loop {
                let first = consumer
                    .next()
                    .await
                    .ok_or_else(|| anyhow!("relay consumer cancelled"))??;
                let mut deliveries = vec![first];
                while deliveries.len() < batch {
                    match consumer.next().now_or_never() {
                        Some(Some(d)) => deliveries.push(d?),
                        _ => break,
                    }
                }
                let outbox = match &store {
                    Some(store) => store.commit(&deliveries, &to).await?,
                    None => Vec::new(),
                };
                // Every publish started before any is awaited, as the gateway does
                // (`trio_gateway::broker::publish_confirmed`): lapin then writes them in one go.
                let confirms = futures::future::try_join_all(deliveries.iter().map(|d| {
                    output.basic_publish("", &to, options, &d.data, d.properties.clone())
                }))
                .await?;
                for c in confirms {
                    check(c.await?)?;
                }
                if let Some(store) = &store {
                    store.mark_sent(&outbox).await?;
                }
                if let Some(last) = deliveries.last() {
                    input
                        .basic_ack(last.delivery_tag, BasicAckOptions { multiple: true })
                        .await?;
                }
            }
        }));
    }
    Ok(tasks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_paced_publisher_has_due_every_message_whose_instant_has_come() {
        // Message k is due k / rate seconds after the first, which is due at once.
        assert_eq!(due_by(Duration::ZERO, 4000.0), 1);
        assert_eq!(due_by(Duration::from_micros(249), 4000.0), 1);
        assert_eq!(due_by(Duration::from_micros(250), 4000.0), 2);
        assert_eq!(due_by(Duration::from_millis(1), 4000.0), 5);
        assert_eq!(due_by(Duration::from_secs(2), 100.0), 201);
    }

    #[test]
    fn traceparent_round_trips() {
        let t = traceparent(3, 123_456_789);
        assert_eq!(t.len(), 55);
        assert_eq!(parse_traceparent(&t), Some((3, 123_456_789)));
    }

    #[test]
    fn the_spread_counts_the_seconds_over_the_limit_and_names_the_worst() {
        let mut latencies_us = vec![9_000; 396];
        latencies_us.extend([50_000, 60_000, 70_000, 180_000]);
        let got = Received {
            worst_per_second_us: vec![10_000, 60_000, 180_000, 50_000],
            latencies_us,
            ..Received::default()
        };
        assert_eq!(
            got.seconds_over(50.0),
            "2 of 4 seconds had a latency over 50 ms, 0.75 % of the messages (worst 180.0 ms, \
             in second 2)"
        );
        assert_eq!(
            Received::default().seconds_over(50.0),
            "0 of 0 seconds had a latency over 50 ms, 0.00 % of the messages (worst 0.0 ms, in \
             second 0)"
        );
    }
}
