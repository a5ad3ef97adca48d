//! `trio-gateway dlq list | replay`: what is in `trio.dead`, and putting it back.
//!
//! Listing reads every dead letter without removing it (they return to the queue when the
//! channel closes) and prints type, sender, error and time — never payload contents. Replaying
//! re-publishes the chosen letters to `trio.inbound` with their original properties and routing
//! key, then removes them from `trio.dead`. Because RabbitMQ checks `user_id` against the
//! publishing user, replay must run as a broker user with the `impersonator` tag.
//!
//! A letter may be a message the gateway had already committed: the broker dead-letters a
//! message on its own once its queue's `x-delivery-limit` is reached, which repeated crashes
//! between a batch's commit and its acknowledgement can do. What such a message caused may
//! never have been confirmed, and its replay, not delivered before as far as the broker knows,
//! would only be answered as a duplicate. So replay first puts what the inbox row kept for it
//! (its events and reply, same `message_id`s) in the outbox table, for the gateway's sweeper to
//! publish again; a recipient that already had them can tell by their ids.

use crate::broker::{self, INBOUND_EXCHANGE, Publish, Published};
use crate::config::Config;
use crate::dead_letter::read_header;
use crate::{relay, serve};
use anyhow::{Context as _, bail};
use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::types::{FieldTable, ShortString};
use sqlx::PgPool;
use std::io::Write;

/// One dead letter, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterInfo {
    /// Original `message_id` (may be empty).
    pub message_id: String,
    /// Original `type`.
    pub message_type: String,
    /// Original `user_id`.
    pub sender: String,
    /// `x-trio-error` (or RabbitMQ's own reason for a broker dead letter).
    pub error: String,
    /// Inbound queue it came from.
    pub queue: String,
    /// When it was dead-lettered (Unix seconds), if known.
    pub dead_at: Option<u64>,
}

fn info_of(delivery: &lapin::message::Delivery) -> DeadLetterInfo {
    let props = &delivery.properties;
    let headers = props.headers().clone().unwrap_or_default();
    DeadLetterInfo {
        message_id: props
            .message_id()
            .as_ref()
            .map(|m| m.to_string())
            .unwrap_or_default(),
        message_type: props
            .kind()
            .as_ref()
            .map(|m| m.to_string())
            .unwrap_or_default(),
        sender: props
            .user_id()
            .as_ref()
            .map(|m| m.to_string())
            .unwrap_or_default(),
        error: read_header(&headers, "x-trio-error")
            .unwrap_or_else(|| "delivery_limit (broker)".to_owned()),
        queue: read_header(&headers, "x-trio-queue")
            .unwrap_or_else(|| delivery.routing_key.as_str().to_owned()),
        dead_at: read_header(&headers, "x-trio-dead-at").and_then(|t| t.parse().ok()),
    }
}

/// Reads up to `limit` dead letters without removing them.
///
/// # Errors
/// Broker failures.
pub async fn list(config: &Config, limit: usize) -> anyhow::Result<Vec<DeadLetterInfo>> {
    let pool = broker::pool(config, "dlq", 1)?;
    let channel = broker::channel(&pool, config.broker_timeout).await?;
    let mut out = Vec::new();
    while out.len() < limit {
        let got = broker::timed(
            config.broker_timeout,
            "basic.get",
            channel.basic_get(broker::DEAD_LETTER_QUEUE, BasicGetOptions { no_ack: false }),
        )
        .await?;
        let Some(message) = got else { break };
        out.push(info_of(&message.delivery));
    }
    broker::close_channel(channel, "listed", config.broker_timeout).await;
    broker::close_pool(&pool, config.broker_timeout).await;
    Ok(out)
}

/// Prints dead letters as a table.
///
/// # Errors
/// When stdout cannot be written.
pub fn print(letters: &[DeadLetterInfo], out: &mut impl Write) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<38} {:<22} {:<16} {:<12} {:<18} DEAD AT",
        "MESSAGE ID", "TYPE", "SENDER", "QUEUE", "ERROR"
    )?;
    for l in letters {
        let at = l
            .dead_at
            .and_then(|t| time::OffsetDateTime::from_unix_timestamp(i64::try_from(t).ok()?).ok())
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_default();
        writeln!(
            out,
            "{:<38} {:<22} {:<16} {:<12} {:<18} {at}",
            l.message_id, l.message_type, l.sender, l.queue, l.error
        )?;
    }
    writeln!(out, "{} dead letter(s)", letters.len())
}

/// Which dead letters to replay.
#[derive(Debug, Clone)]
pub enum Selection {
    /// The one(s) with this `message_id`.
    Id(String),
    /// All of them.
    All,
}

/// Re-publishes the selected dead letters to `trio.inbound` and removes them from `trio.dead`,
/// after keeping in the outbox what an already committed one caused (see the module's doc).
/// Returns how many were replayed.
///
/// # Errors
/// Broker or database failures; a letter whose re-publish is not confirmed stays in
/// `trio.dead`.
pub async fn replay(config: &Config, selection: &Selection) -> anyhow::Result<usize> {
    let db = serve::connect_db(config, Some(config.broker_timeout)).await?;
    let pool = broker::pool(config, "dlq", 2)?;
    let channel = broker::channel(&pool, config.broker_timeout).await?;
    let publisher = broker::confirm_channel(&pool, config.broker_timeout).await?;
    let mut replayed = 0;
    let mut seen = 0usize;
    loop {
        let got = broker::timed(
            config.broker_timeout,
            "basic.get",
            channel.basic_get(broker::DEAD_LETTER_QUEUE, BasicGetOptions { no_ack: false }),
        )
        .await?;
        let Some(message) = got else { break };
        seen += 1;
        let delivery = message.delivery;
        let info = info_of(&delivery);
        let chosen = match selection {
            Selection::All => true,
            Selection::Id(id) => info.message_id == *id,
        };
        if !chosen {
            continue;
        }
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        let kept: FieldTable = {
            let mut t = FieldTable::default();
            for (k, v) in headers.inner() {
                let name = k.as_str();
                if !name.starts_with("x-trio-")
                    && !name.starts_with("x-death")
                    && name != "x-delivery-count"
                {
                    t.insert(ShortString::from(name.to_owned()), v.clone());
                }
            }
            t
        };
        headers = kept;
        keep_what_it_caused(&db, &info).await.with_context(|| {
            format!(
                "keeping what message {} already caused; it stays in trio.dead",
                info.message_id
            )
        })?;
        let props = delivery.properties.clone().with_headers(headers);
        let results = broker::publish_confirmed(
            &publisher,
            vec![Publish {
                exchange: INBOUND_EXCHANGE,
                routing_key: &info.queue,
                properties: props,
                body: &delivery.data,
            }],
            config.broker_timeout,
        )
        .await?;
        if results.first() != Some(&Published::Confirmed) {
            bail!("replay of {} was not routed ({results:?})", info.message_id);
        }
        broker::timed(
            config.broker_timeout,
            "basic.ack",
            channel.basic_ack(delivery.delivery_tag, BasicAckOptions::default()),
        )
        .await?;
        replayed += 1;
        if seen > 1_000_000 {
            break;
        }
    }
    broker::close_channel(channel, "replayed", config.broker_timeout).await;
    broker::close_channel(publisher, "replayed", config.broker_timeout).await;
    broker::close_pool(&pool, config.broker_timeout).await;
    db.close().await;
    Ok(replayed)
}

/// Puts in the outbox table, due at once, the outbound messages the inbox kept for a dead
/// letter's message when the gateway committed it (none when it never did).
async fn keep_what_it_caused(db: &PgPool, letter: &DeadLetterInfo) -> anyhow::Result<()> {
    if letter.message_id.is_empty() {
        return Ok(());
    }
    let row: Option<(Option<Vec<u8>>, Option<String>)> =
        sqlx::query_as("SELECT outbound, result FROM inbox WHERE sender = $1 AND message_id = $2")
            .bind(&letter.sender)
            .bind(&letter.message_id)
            .fetch_optional(db)
            .await?;
    let Some((Some(stored), result)) = row else {
        return Ok(());
    };
    let messages =
        trio_handlers::outbound::decode_stored(&stored, result.as_deref().unwrap_or("{}"))?;
    relay::keep_in_outbox(db, &messages.iter().collect::<Vec<_>>()).await?;
    Ok(())
}
