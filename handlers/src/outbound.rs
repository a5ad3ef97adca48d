//! Outbound messages (replies and `trio.outbound` events) as stored in the outbox and published by
//! the relay. Built here, inside the transaction that records their cause.

use serde_json::Value;
use trio_schemas::Format;
use uuid::Uuid;

/// The outbound topic exchange (CONTRACT.md §1).
pub const OUTBOUND_EXCHANGE: &str = "trio.outbound";

/// Namespace of the stable outbound message ids (UUID v5).
const MESSAGE_ID_NAMESPACE: Uuid = Uuid::from_u128(0x5c0b_7a1e_2f4d_4e7b_9a53_7e1f_0c2d_8b61);

/// One message to publish, exactly as it will go on the wire.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboundMessage {
    /// Stable per (event, recipient): the same on every re-publish.
    pub message_id: Uuid,
    /// Exchange (`""` for replies, `trio.outbound` for events).
    pub exchange: String,
    /// Routing key (`reply_to` queue, or `<kind>.<id>`).
    pub routing_key: String,
    /// AMQP `type`.
    pub message_type: String,
    /// AMQP `content_type`.
    pub content_type: String,
    /// AMQP `correlation_id` (replies: the inbound `message_id`).
    pub correlation_id: Option<String>,
    /// W3C trace context of the inbound message that caused it.
    pub traceparent: Option<String>,
    /// Encoded body.
    pub body: Vec<u8>,
}

/// An outbound message committed in the outbox, with the id of the row that holds it: the relay
/// deletes that row once the broker confirmed the message.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxEntry {
    /// `outbox.id`.
    pub id: i64,
    /// The message as it goes on the wire.
    pub message: OutboundMessage,
}

/// Derives a stable message id from the parts that identify an event and its recipient.
pub fn stable_message_id(parts: &[&str]) -> Uuid {
    Uuid::new_v5(&MESSAGE_ID_NAMESPACE, parts.join("\u{1f}").as_bytes())
}

/// The reply to an inbound message: always JSON, `type` = `reply`, through the default exchange.
pub fn reply(
    sender: &str,
    inbound_message_id: &str,
    reply_to: &str,
    status: &str,
    body: &Value,
    traceparent: Option<&str>,
) -> OutboundMessage {
    OutboundMessage {
        message_id: stable_message_id(&["reply", sender, inbound_message_id, status]),
        exchange: String::new(),
        routing_key: reply_to.to_owned(),
        message_type: "reply".to_owned(),
        content_type: "application/json".to_owned(),
        correlation_id: Some(inbound_message_id.to_owned()),
        traceparent: traceparent.map(str::to_owned),
        body: body.to_string().into_bytes(),
    }
}

/// An event on `trio.outbound` for one recipient, in the recipient's registered format.
pub fn event(
    cause: (&str, &str),
    message_type: &str,
    recipient_routing_key: &str,
    format: Format,
    body: &Value,
    traceparent: Option<&str>,
) -> OutboundMessage {
    let encoded = match format {
        Format::Json => body.to_string().into_bytes(),
        Format::Xml => {
            trio_schemas::xml::to_xml(&message_type.replace('.', "_"), body).into_bytes()
        }
    };
    OutboundMessage {
        message_id: stable_message_id(&[
            "event",
            cause.0,
            cause.1,
            message_type,
            recipient_routing_key,
        ]),
        exchange: OUTBOUND_EXCHANGE.to_owned(),
        routing_key: recipient_routing_key.to_owned(),
        message_type: message_type.to_owned(),
        content_type: format.content_type().to_owned(),
        correlation_id: None,
        traceparent: traceparent.map(str::to_owned),
        body: encoded,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_are_stable_per_event_and_recipient() {
        let a = stable_message_id(&["event", "u", "m1", "trajet.updated", "oa.300"]);
        assert_eq!(
            a,
            stable_message_id(&["event", "u", "m1", "trajet.updated", "oa.300"])
        );
        assert_ne!(
            a,
            stable_message_id(&["event", "u", "m1", "trajet.updated", "gp.12345678901"])
        );
        assert_ne!(
            a,
            stable_message_id(&["event", "u", "m2", "trajet.updated", "oa.300"])
        );
    }
}
