//! Dead-lettering by the gateway itself: the original body and properties, plus `x-trio-error`
//! (and, for operators, `x-trio-detail`, `x-trio-queue`, `x-trio-dead-at`), published with a
//! confirm to `trio.dlx` before the original is acked. Where the message has a `message_id` and
//! a `reply_to`, a `rejected` reply with the matching code goes out too.

use crate::broker::{self, DEAD_LETTER_EXCHANGE, Publish, Published};
use crate::envelope::{DeadLetter, DeadReason};
use anyhow::bail;
use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel};
use std::time::Duration;
use trio_handlers::{Outcome, Rejection, SourceQueue, outbound};

/// The properties of the dead letter: the original ones plus the `x-trio-*` headers.
fn dead_letter_properties(
    delivery: &Delivery,
    queue: SourceQueue,
    letter: &DeadLetter,
) -> BasicProperties {
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    let mut put = |name: &str, value: String| {
        headers.insert(
            ShortString::from(name.to_owned()),
            AMQPValue::LongString(LongString::from(value)),
        );
    };
    put("x-trio-error", letter.reason.as_str().to_owned());
    put("x-trio-detail", letter.detail.clone());
    put("x-trio-queue", queue.routing_key().to_owned());
    headers.insert(
        ShortString::from("x-trio-dead-at"),
        AMQPValue::Timestamp(broker::unix_now()),
    );
    delivery.properties.clone().with_headers(headers)
}

/// Publishes the dead letters (and their replies) with confirms.
///
/// # Errors
/// When the broker does not confirm them: the originals must then not be acked.
pub async fn publish(
    channel: &Channel,
    letters: &[(SourceQueue, &Delivery, DeadLetter)],
    limit: Duration,
) -> anyhow::Result<()> {
    if letters.is_empty() {
        return Ok(());
    }
    let replies: Vec<_> = letters
        .iter()
        .map(|(_, delivery, letter)| reply_for(delivery, letter))
        .collect();
    let mut messages = Vec::with_capacity(2 * letters.len());
    for ((queue, delivery, letter), reply) in letters.iter().zip(&replies) {
        messages.push(Publish {
            exchange: DEAD_LETTER_EXCHANGE,
            routing_key: queue.routing_key(),
            properties: dead_letter_properties(delivery, *queue, letter),
            body: &delivery.data,
        });
        if let Some(reply) = reply {
            messages.push(Publish {
                exchange: &reply.exchange,
                routing_key: &reply.routing_key,
                properties: broker::properties_of(reply),
                body: &reply.body,
            });
        }
    }
    let dead_letters: Vec<bool> = messages
        .iter()
        .map(|m| m.exchange == DEAD_LETTER_EXCHANGE)
        .collect();
    let results = broker::publish_confirmed(channel, messages, limit).await?;
    for (dead_letter, result) in dead_letters.into_iter().zip(results) {
        // A returned reply only means the sender's reply queue is gone; a dead letter must land.
        if dead_letter && result != Published::Confirmed {
            bail!("dead letter not accepted by the broker ({result:?})");
        }
    }
    Ok(())
}

fn reply_for(delivery: &Delivery, letter: &DeadLetter) -> Option<trio_handlers::OutboundMessage> {
    let code = letter.reason.reply_code()?;
    let message_id = delivery.properties.message_id().as_ref()?.as_str();
    let reply_to = delivery.properties.reply_to().as_ref()?.as_str();
    if message_id.is_empty() || reply_to.is_empty() {
        return None;
    }
    let sender = delivery
        .properties
        .user_id()
        .as_ref()
        .map(|u| u.as_str())
        .unwrap_or("");
    let outcome = Outcome::rejected(Rejection::new(code, letter.detail.clone()));
    Some(outbound::reply(
        sender,
        message_id,
        reply_to,
        outcome.status.as_str(),
        outcome.reply_body().ok()?,
        crate::envelope::header_str(delivery, "traceparent").as_deref(),
    ))
}

/// The dead letter for a message that failed on every delivery up to the limit.
pub fn delivery_limit(detail: impl Into<String>) -> DeadLetter {
    DeadLetter {
        reason: DeadReason::DeliveryLimit,
        detail: detail.into(),
    }
}

/// Headers of a dead letter, read back (for `dlq list` and `dlq replay`).
pub fn read_header(headers: &FieldTable, name: &str) -> Option<String> {
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        AMQPValue::Timestamp(t) => Some(t.to_string()),
        _ => None,
    }
}
