//! A minimal partner: what an OA, SEPP, GP or operator system does on the wire. The demo, the
//! benchmark and the integration tests use it to publish inbound messages, read replies and
//! receive outbound messages exactly as partners would.

use crate::broker::{self, INBOUND_EXCHANGE, OUTBOUND_EXCHANGE};
use anyhow::{Context as _, anyhow};
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use std::time::Duration;

/// One partner connection, authenticated as one broker user.
pub struct Partner {
    _connection: Connection,
    channel: Channel,
    user: String,
    reply_queue: String,
    replies: Consumer,
}

/// An inbound message to publish.
#[derive(Debug, Clone)]
pub struct Outgoing<'a> {
    /// Routing key on `trio.inbound` (`oa`, `sepp`, `gp`, `rp`, `reference`).
    pub queue: &'a str,
    /// AMQP `type`.
    pub message_type: &'a str,
    /// AMQP `message_id`.
    pub message_id: &'a str,
    /// AMQP `content_type`.
    pub content_type: &'a str,
    /// Body.
    pub body: Vec<u8>,
    /// Ask for a reply (on this partner's reply queue).
    pub want_reply: bool,
}

impl<'a> Outgoing<'a> {
    /// A JSON message that asks for a reply.
    pub fn json(
        queue: &'a str,
        message_type: &'a str,
        message_id: &'a str,
        body: &serde_json::Value,
    ) -> Self {
        Self {
            queue,
            message_type,
            message_id,
            content_type: "application/json",
            body: body.to_string().into_bytes(),
            want_reply: true,
        }
    }
}

/// A reply, decoded.
#[derive(Debug, Clone)]
pub struct Reply {
    /// `correlation_id`: the inbound `message_id`.
    pub correlation_id: String,
    /// `message_id` of the reply.
    pub message_id: String,
    /// Body `{"status","code","detail","result"}`.
    pub body: serde_json::Value,
}

impl Partner {
    /// Connects as the user in `amqp_url` and opens a private reply queue.
    ///
    /// # Errors
    /// Connection failures.
    pub async fn connect(amqp_url: &str) -> anyhow::Result<Self> {
        let user = crate::admin::user_of(amqp_url).to_owned();
        let connection = Connection::connect(amqp_url, ConnectionProperties::default())
            .await
            .with_context(|| format!("connecting as {user}"))?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let queue = channel
            .queue_declare(
                "",
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let reply_queue = queue.name().as_str().to_owned();
        let replies = channel
            .basic_consume(
                &reply_queue,
                "replies",
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok(Self {
            _connection: connection,
            channel,
            user,
            reply_queue,
            replies,
        })
    }

    /// The broker user this partner publishes as.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// Publishes one inbound message with `user_id` set, and waits for the broker's confirm.
    ///
    /// # Errors
    /// Broker failures.
    pub async fn publish(&self, message: &Outgoing<'_>) -> anyhow::Result<()> {
        self.publish_many(std::slice::from_ref(message)).await
    }

    /// Publishes messages pipelined, then waits for all confirms.
    ///
    /// # Errors
    /// Broker failures.
    pub async fn publish_many(&self, messages: &[Outgoing<'_>]) -> anyhow::Result<()> {
        let mut confirms = Vec::with_capacity(messages.len());
        for m in messages {
            let mut props = BasicProperties::default()
                .with_message_id(ShortString::from(m.message_id.to_owned()))
                .with_type(ShortString::from(m.message_type.to_owned()))
                .with_content_type(ShortString::from(m.content_type.to_owned()))
                .with_user_id(ShortString::from(self.user.clone()))
                .with_delivery_mode(2)
                .with_timestamp(broker::unix_now());
            if m.want_reply {
                props = props.with_reply_to(ShortString::from(self.reply_queue.clone()));
            }
            let confirm = self
                .channel
                .basic_publish(
                    INBOUND_EXCHANGE,
                    m.queue,
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &m.body,
                    props,
                )
                .await?;
            confirms.push(confirm);
        }
        for confirm in confirms {
            match confirm.await? {
                lapin::publisher_confirm::Confirmation::Ack(None) => {}
                lapin::publisher_confirm::Confirmation::Ack(Some(_)) => {
                    return Err(anyhow!("no inbound queue is bound yet (message returned)"));
                }
                _ => return Err(anyhow!("the broker refused an inbound message")),
            }
        }
        Ok(())
    }

    /// Publishes raw properties and body (tests of malformed envelopes).
    ///
    /// # Errors
    /// Broker failures.
    pub async fn publish_raw(
        &self,
        queue: &str,
        properties: BasicProperties,
        body: &[u8],
    ) -> anyhow::Result<()> {
        self.channel
            .basic_publish(
                INBOUND_EXCHANGE,
                queue,
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await?
            .await?;
        Ok(())
    }

    /// Properties with this partner's `user_id` and reply queue.
    pub fn properties(&self, message_type: &str, message_id: &str) -> BasicProperties {
        BasicProperties::default()
            .with_message_id(ShortString::from(message_id.to_owned()))
            .with_type(ShortString::from(message_type.to_owned()))
            .with_content_type(ShortString::from("application/json"))
            .with_user_id(ShortString::from(self.user.clone()))
            .with_reply_to(ShortString::from(self.reply_queue.clone()))
    }

    /// The next reply, or `None` after `wait`.
    ///
    /// # Errors
    /// A reply that is not JSON, or a broken consumer.
    pub async fn next_reply(&mut self, wait: Duration) -> anyhow::Result<Option<Reply>> {
        match tokio::time::timeout(wait, self.replies.next()).await {
            Err(_) | Ok(None) => Ok(None),
            Ok(Some(delivery)) => {
                let delivery = delivery?;
                Ok(Some(Reply {
                    correlation_id: delivery
                        .properties
                        .correlation_id()
                        .as_ref()
                        .map(|c| c.to_string())
                        .unwrap_or_default(),
                    message_id: delivery
                        .properties
                        .message_id()
                        .as_ref()
                        .map(|c| c.to_string())
                        .unwrap_or_default(),
                    body: serde_json::from_slice(&delivery.data).context("reply is not JSON")?,
                }))
            }
        }
    }

    /// Waits for the reply to `message_id`, skipping others.
    ///
    /// # Errors
    /// When none comes within `wait`.
    pub async fn reply_to(&mut self, message_id: &str, wait: Duration) -> anyhow::Result<Reply> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_reply(left).await? {
                Some(reply) if reply.correlation_id == message_id => return Ok(reply),
                Some(_) => continue,
                None => return Err(anyhow!("no reply to {message_id} within {wait:?}")),
            }
        }
    }

    /// Binds a private queue to `trio.outbound` with `routing_key` and returns its listener.
    ///
    /// # Errors
    /// Broker failures (e.g. the exchange is not declared yet).
    pub async fn listen(&self, routing_key: &str) -> anyhow::Result<Listener> {
        let queue = self
            .channel
            .queue_declare(
                "",
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        self.channel
            .queue_bind(
                queue.name().as_str(),
                OUTBOUND_EXCHANGE,
                routing_key,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let consumer = self
            .channel
            .basic_consume(
                queue.name().as_str(),
                &format!("listen-{routing_key}"),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok(Listener { consumer })
    }
}

impl Partner {
    /// Consumes an existing queue (e.g. `trio.dead`), acknowledging automatically.
    ///
    /// # Errors
    /// Broker failures.
    pub async fn consume_queue(&self, queue: &str) -> anyhow::Result<Listener> {
        let consumer = self
            .channel
            .basic_consume(
                queue,
                &format!("consume-{queue}"),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok(Listener { consumer })
    }
}

/// Outbound messages for one routing key.
pub struct Listener {
    consumer: Consumer,
}

impl Listener {
    /// The next outbound message, or `None` after `wait`.
    ///
    /// # Errors
    /// A broken consumer.
    pub async fn next(&mut self, wait: Duration) -> anyhow::Result<Option<Delivery>> {
        match tokio::time::timeout(wait, self.consumer.next()).await {
            Err(_) | Ok(None) => Ok(None),
            Ok(Some(d)) => Ok(Some(d?)),
        }
    }

    /// Everything that arrives until `quiet` passes without a message.
    ///
    /// # Errors
    /// A broken consumer.
    pub async fn drain(&mut self, quiet: Duration) -> anyhow::Result<Vec<Delivery>> {
        let mut out = Vec::new();
        while let Some(d) = self.next(quiet).await? {
            out.push(d);
        }
        Ok(out)
    }
}

/// A string header of a delivery.
pub fn header(delivery: &Delivery, name: &str) -> Option<String> {
    crate::dead_letter::read_header(delivery.properties.headers().as_ref()?, name)
}

/// A `traceparent` header table.
pub fn traceparent_headers(traceparent: &str) -> FieldTable {
    let mut t = FieldTable::default();
    t.insert(
        ShortString::from("traceparent"),
        AMQPValue::LongString(LongString::from(traceparent.to_owned())),
    );
    t
}

/// A synthetic NISS that passes the modulo-97 check, different for every `seq` up to about
/// 16 million (born 1950–1999, so the pre-2000 rule applies). Test and demo data only.
pub fn synthetic_niss(seq: u32) -> String {
    let serial = 1 + (seq % 997);
    let rest = seq / 997;
    let day = 1 + rest % 28;
    let rest = rest / 28;
    let month = 1 + rest % 12;
    let year = 50 + (rest / 12) % 50;
    let first9 = u64::from(year) * 10_000_000
        + u64::from(month) * 100_000
        + u64::from(day) * 1_000
        + u64::from(serial);
    let check = 97 - (first9 % 97);
    format!("{first9:09}{check:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_niss_pass_mod97_and_differ() {
        let a = synthetic_niss(0);
        let b = synthetic_niss(1);
        assert_ne!(a, b);
        for s in [0, 1, 996, 997, 27_915, 1_000_000, 16_000_000] {
            let n = synthetic_niss(s);
            assert_eq!(n.len(), 11);
            let first9: u64 = n[..9].parse().unwrap();
            let check: u64 = n[9..].parse().unwrap();
            assert_eq!(97 - first9 % 97, check);
        }
    }
}
