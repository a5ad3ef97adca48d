//! Broker plumbing: connection pools (consuming and publishing use separate connections), the
//! topology of CONTRACT.md §1, and confirmed, pipelined publishing.

use crate::config::Config;
use anyhow::{Context as _, anyhow};
use deadpool_lapin::{Pool, Runtime};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::publisher_confirm::Confirmation;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, ExchangeKind};
use std::future::Future;
use std::time::Duration;
use trio_handlers::{OutboundMessage, SourceQueue};

/// Inbound direct exchange.
pub const INBOUND_EXCHANGE: &str = "trio.inbound";
/// Outbound topic exchange.
pub const OUTBOUND_EXCHANGE: &str = trio_handlers::outbound::OUTBOUND_EXCHANGE;
/// Dead-letter fanout exchange.
pub const DEAD_LETTER_EXCHANGE: &str = "trio.dlx";
/// Dead-letter queue.
pub const DEAD_LETTER_QUEUE: &str = "trio.dead";

/// Runs a broker call with the configured time limit, so a dead channel cannot hang a worker.
///
/// # Errors
/// The call's own error, or a timeout.
pub async fn timed<T, E: std::error::Error + Send + Sync + 'static>(
    limit: Duration,
    what: &str,
    call: impl Future<Output = Result<T, E>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(limit, call).await {
        Ok(result) => result.with_context(|| format!("broker: {what}")),
        Err(_) => Err(anyhow!("broker: {what} timed out after {limit:?}")),
    }
}

/// A pool of broker connections named `name` (visible in the management UI).
///
/// # Errors
/// When the pool cannot be built (never for a well-formed URL).
pub fn pool(config: &Config, name: &str, size: usize) -> anyhow::Result<Pool> {
    let cfg = deadpool_lapin::Config {
        url: Some(config.amqp_url.expose().to_owned()),
        pool: Some(deadpool_lapin::PoolConfig::new(size.max(1))),
        connection_properties: lapin::ConnectionProperties::default()
            .with_connection_name(LongString::from(format!("trio-gateway {name}"))),
    };
    cfg.create_pool(Some(Runtime::Tokio1))
        .context("building the broker connection pool")
}

/// Closes a channel and waits for the broker's `close-ok` (bounded by `limit`), ignoring a
/// channel already closed. Every channel must be closed this way before [`close_pool`] closes
/// its connection: a channel merely dropped is closed by lapin in the background, and when its
/// `close-ok` reaches lapin together with the connection's, lapin 2.5 removes the channel twice
/// and logs `ERROR lapin::channels: Connection error error=invalid channel: N` on a clean stop.
pub async fn close_channel(channel: Channel, reason: &str, limit: Duration) {
    if channel.status().connected() {
        let _ = timed(limit, "channel.close", channel.close(200, reason)).await;
    }
}

/// Closes the pool and its idle connections with a clean `connection.close`, once nothing uses
/// them and their channels are closed ([`close_channel`]). Dropping a lapin connection instead
/// leaves its I/O thread to resolve promises nobody awaits any more, and it warns about each
/// ("promise has vanished") on every shutdown.
pub async fn close_pool(pool: &Pool, limit: Duration) {
    for connection in pool.retain(|_, _| false).removed {
        let _ = timed(limit, "connection.close", connection.close(200, "shutdown")).await;
    }
    pool.close();
}

/// Whether the broker refused a declaration because the queue or exchange exists with other
/// arguments (`PRECONDITION_FAILED`).
pub fn is_precondition_failed(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<lapin::Error>(),
            Some(lapin::Error::ProtocolError(amqp)) if matches!(
                amqp.kind(),
                AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
            )
        )
    })
}

/// Opens a channel on a pooled connection.
///
/// # Errors
/// Connection or channel failure, or timeout.
pub async fn channel(pool: &Pool, limit: Duration) -> anyhow::Result<Channel> {
    let conn = match tokio::time::timeout(limit, pool.get()).await {
        Ok(conn) => conn.map_err(|e| anyhow!("broker: connecting: {e}"))?,
        Err(_) => return Err(anyhow!("broker: connecting timed out after {limit:?}")),
    };
    timed(limit, "opening a channel", conn.create_channel()).await
}

/// Opens a channel in publisher-confirm mode.
///
/// # Errors
/// Connection or channel failure, or timeout.
pub async fn confirm_channel(pool: &Pool, limit: Duration) -> anyhow::Result<Channel> {
    let channel = channel(pool, limit).await?;
    timed(
        limit,
        "confirm.select",
        channel.confirm_select(ConfirmSelectOptions::default()),
    )
    .await?;
    Ok(channel)
}

fn quorum_args(dead_letter: bool, delivery_limit: u32) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        ShortString::from("x-queue-type"),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    if dead_letter {
        args.insert(
            ShortString::from("x-dead-letter-exchange"),
            AMQPValue::LongString(LongString::from(DEAD_LETTER_EXCHANGE)),
        );
        args.insert(
            ShortString::from("x-dead-letter-strategy"),
            AMQPValue::LongString(LongString::from("at-least-once")),
        );
        // at-least-once dead-lettering requires reject-publish overflow
        args.insert(
            ShortString::from("x-overflow"),
            AMQPValue::LongString(LongString::from("reject-publish")),
        );
        // RabbitMQ 3.10 has no default: a backstop above the gateway's own limit, for a message
        // that kills the worker before it can be dead-lettered with its reason.
        args.insert(
            ShortString::from("x-delivery-limit"),
            AMQPValue::LongLongInt(i64::from(delivery_limit) + 1),
        );
    }
    args
}

/// Declares the whole topology, idempotently.
///
/// # Errors
/// Broker failure, or an existing entity declared with other arguments.
pub async fn declare_topology(channel: &Channel, config: &Config) -> anyhow::Result<()> {
    let limit = config.broker_timeout;
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    for (name, kind) in [
        (INBOUND_EXCHANGE, ExchangeKind::Direct),
        (DEAD_LETTER_EXCHANGE, ExchangeKind::Fanout),
    ] {
        timed(
            limit,
            "exchange.declare",
            channel.exchange_declare(name, kind, durable, FieldTable::default()),
        )
        .await?;
    }
    let queue_opts = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    timed(
        limit,
        "queue.declare trio.dead",
        channel.queue_declare(
            DEAD_LETTER_QUEUE,
            queue_opts,
            quorum_args(false, config.delivery_limit),
        ),
    )
    .await?;
    timed(
        limit,
        "queue.bind trio.dead",
        channel.queue_bind(
            DEAD_LETTER_QUEUE,
            DEAD_LETTER_EXCHANGE,
            "",
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await?;
    for queue in SourceQueue::ALL {
        let name = queue.queue_name();
        timed(
            limit,
            "queue.declare inbound",
            channel.queue_declare(&name, queue_opts, quorum_args(true, config.delivery_limit)),
        )
        .await?;
        timed(
            limit,
            "queue.bind inbound",
            channel.queue_bind(
                &name,
                INBOUND_EXCHANGE,
                queue.routing_key(),
                QueueBindOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
    }
    // Declared last, so its existence tells partners (and tests) that the whole topology is in
    // place: an inbound message published earlier could find no queue bound yet.
    timed(
        limit,
        "exchange.declare trio.outbound",
        channel.exchange_declare(
            OUTBOUND_EXCHANGE,
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        ),
    )
    .await?;
    Ok(())
}

/// How the broker answered one confirmed publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// Routed and confirmed.
    Confirmed,
    /// Confirmed but returned as unroutable (`mandatory`): nobody is bound for it yet.
    Returned,
    /// Refused by the broker (e.g. a queue in reject-publish overflow).
    Nacked,
}

/// The AMQP properties of an outbound message (persistent).
pub fn properties_of(message: &OutboundMessage) -> BasicProperties {
    let mut props = BasicProperties::default()
        .with_message_id(ShortString::from(message.message_id.to_string()))
        .with_type(ShortString::from(message.message_type.clone()))
        .with_content_type(ShortString::from(message.content_type.clone()))
        .with_delivery_mode(2)
        .with_timestamp(unix_now());
    if let Some(correlation) = &message.correlation_id {
        props = props.with_correlation_id(ShortString::from(correlation.clone()));
    }
    if let Some(traceparent) = &message.traceparent {
        let mut headers = FieldTable::default();
        headers.insert(
            ShortString::from("traceparent"),
            AMQPValue::LongString(LongString::from(traceparent.clone())),
        );
        props = props.with_headers(headers);
    }
    props
}

/// Seconds since the epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// One message for [`publish_confirmed`]: where it goes, its properties (moved into the publish)
/// and its body (borrowed).
pub struct Publish<'a> {
    /// Exchange (`""` for a queue by name).
    pub exchange: &'a str,
    /// Routing key.
    pub routing_key: &'a str,
    /// AMQP properties.
    pub properties: BasicProperties,
    /// Body.
    pub body: &'a [u8],
}

/// Publishes every message with `mandatory`, pipelined (all sent before any confirm is awaited),
/// and returns how each was confirmed, in order.
///
/// # Errors
/// A channel or connection failure: none of the results can be trusted; publish again.
pub async fn publish_confirmed(
    channel: &Channel,
    messages: Vec<Publish<'_>>,
    limit: Duration,
) -> anyhow::Result<Vec<Published>> {
    let options = BasicPublishOptions {
        mandatory: true,
        ..Default::default()
    };
    // lapin takes each message's properties; a returned message is told from the others by its
    // id, so the ids are kept aside (one small string each, where a copy of the properties
    // would be a header table and several strings).
    let mut sent = Vec::with_capacity(messages.len());
    // Every publish is started before any is awaited: each pushes its frames to lapin's I/O
    // thread and waits until they are written, so awaiting them one by one would cost a
    // hand-over between threads per message; together they are written in one go.
    let publishes: Vec<_> = messages
        .into_iter()
        .map(|m| {
            sent.push((m.exchange, m.routing_key, m.properties.message_id().clone()));
            channel.basic_publish(m.exchange, m.routing_key, options, m.body, m.properties)
        })
        .collect();
    let pending = timed(
        limit,
        "basic.publish",
        futures::future::try_join_all(publishes),
    )
    .await?;
    let confirmations = timed(
        limit,
        "awaiting publisher confirms",
        futures::future::try_join_all(pending),
    )
    .await?;
    let answers: Vec<(bool, Option<ReturnKey>)> = confirmations
        .into_iter()
        .map(|c| match c {
            Confirmation::Ack(returned) => (true, returned),
            Confirmation::NotRequested => (true, None),
            Confirmation::Nack(returned) => (false, returned),
        })
        .map(|(acked, returned)| {
            let key = returned.map(|r| {
                let d = &r.delivery;
                return_key(
                    d.exchange.as_str(),
                    d.routing_key.as_str(),
                    d.properties.message_id().as_ref(),
                )
            });
            (acked, key)
        })
        .collect();
    // Returns are rare (a recipient not bound yet): only then are the messages' keys needed.
    if answers.iter().all(|(_, returned)| returned.is_none()) {
        return Ok(answers
            .into_iter()
            .map(|(acked, _)| answered(acked))
            .collect());
    }
    let sent: Vec<ReturnKey> = sent
        .iter()
        .map(|(exchange, routing_key, id)| return_key(exchange, routing_key, id.as_ref()))
        .collect();
    Ok(classify(&sent, answers))
}

/// A message the broker did not return: confirmed if acked, else refused.
fn answered(acked: bool) -> Published {
    if acked {
        Published::Confirmed
    } else {
        Published::Nacked
    }
}

/// What tells a returned message from the others of its round: where it was sent, and its id.
type ReturnKey = (String, String, Option<String>);

fn return_key(exchange: &str, routing_key: &str, message_id: Option<&ShortString>) -> ReturnKey {
    (
        exchange.to_owned(),
        routing_key.to_owned(),
        message_id.map(|m| m.as_str().to_owned()),
    )
}

/// How each of `sent` fared, from the broker's answer to each (acked or not, and the returned
/// message lapin attached to that answer, if any).
///
/// The returned message lapin attaches to a confirmation is not necessarily that publish's own:
/// lapin hands the oldest waiting return to whichever confirmation it completes next, and a
/// `multiple` ack completes several in no particular order. So a returned message was matched
/// to the wrong publish, and the unroutable one counted as confirmed (never kept for a retry):
/// the message lost. Returns are therefore matched by their exchange, routing key and
/// `message_id`; messages alike in all three are interchangeable.
fn classify(sent: &[ReturnKey], answers: Vec<(bool, Option<ReturnKey>)>) -> Vec<Published> {
    let mut returned: Vec<ReturnKey> = Vec::new();
    let mut acked = Vec::with_capacity(answers.len());
    for (ack, key) in answers {
        acked.push(ack);
        returned.extend(key);
    }
    sent.iter()
        .zip(acked)
        .map(|(key, ack)| {
            if let Some(at) = returned.iter().position(|r| r == key) {
                returned.swap_remove(at);
                Published::Returned
            } else {
                answered(ack)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(routing_key: &str, id: &str) -> ReturnKey {
        ("trio.outbound".into(), routing_key.into(), Some(id.into()))
    }

    #[test]
    fn a_return_counts_for_the_message_it_is_whichever_confirmation_carries_it() {
        let routed = key("gp.1", "a");
        let unroutable = key("gp.nobody", "b");
        // A `multiple` ack over both: lapin attached the return to the routed message's ack.
        assert_eq!(
            classify(
                &[routed.clone(), unroutable.clone()],
                vec![(true, Some(unroutable.clone())), (true, None)]
            ),
            [Published::Confirmed, Published::Returned]
        );
        // And when it lands on its own ack.
        assert_eq!(
            classify(
                &[routed.clone(), unroutable.clone()],
                vec![(true, None), (true, Some(unroutable.clone()))]
            ),
            [Published::Confirmed, Published::Returned]
        );
    }

    #[test]
    fn nacks_stay_with_their_own_publish_and_alike_messages_share_their_returns() {
        let a = key("gp.1", "a");
        let b = key("gp.nobody", "b");
        // The nack is the first publish's own; the return attached to it is the second's.
        assert_eq!(
            classify(
                &[a.clone(), b.clone()],
                vec![(false, Some(b.clone())), (true, None)]
            ),
            [Published::Nacked, Published::Returned]
        );
        // Two copies of one message (a duplicate's reply), one return: one of them is returned.
        assert_eq!(
            classify(
                &[b.clone(), b.clone(), a.clone()],
                vec![(true, None), (true, Some(b.clone())), (true, None)]
            ),
            [
                Published::Returned,
                Published::Confirmed,
                Published::Confirmed
            ]
        );
        // A message without an id is matched by where it went.
        let anonymous: ReturnKey = ("trio.dead".into(), "x".into(), None);
        assert_eq!(
            classify(
                &[a.clone(), anonymous.clone()],
                vec![(true, Some(anonymous.clone())), (true, None)]
            ),
            [Published::Confirmed, Published::Returned]
        );
    }
}
