//! Outbound messages (replies and `trio.outbound` events), built inside the transaction that
//! records their cause and kept with it: in the cause's inbox row ([`encode_stored`]), or in the
//! outbox table when the broker could not take them yet (see the gateway's relay).

use serde::{Deserialize, Serialize};
use trio_schemas::Format;
use uuid::Uuid;

/// The outbound topic exchange (CONTRACT.md §1).
pub const OUTBOUND_EXCHANGE: &str = "trio.outbound";

/// Namespace of the stable outbound message ids (UUID v5).
const MESSAGE_ID_NAMESPACE: Uuid = Uuid::from_u128(0x5c0b_7a1e_2f4d_4e7b_9a53_7e1f_0c2d_8b61);

/// One message to publish, exactly as it will go on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// Encoded body. Kept as one byte string (`serde_bytes`): postcard writes the same bytes as
    /// for a sequence of `u8`, but copies them at once instead of one serializer call per byte.
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
}

/// An outbound message in the outbox table (one the broker returned or refused when first
/// published), with the id of the row that holds it: the sweeper deletes that row once the
/// broker confirmed the message.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxEntry {
    /// `outbox.id`.
    pub id: i64,
    /// The message as it goes on the wire.
    pub message: OutboundMessage,
}

/// The outbound messages one inbound message caused, as its inbox row keeps them (`postcard`, a
/// compact serde encoding): what a redelivery of that message publishes again.
///
/// # Errors
/// Only if `postcard` could not encode plain owned fields (the batch then fails rather than
/// keep a row that would publish nothing again).
pub fn encode_stored(messages: &[OutboundMessage]) -> Result<Vec<u8>, postcard::Error> {
    postcard::to_allocvec(messages)
}

/// Reads what [`encode_stored`] wrote.
///
/// # Errors
/// When the bytes are not such a list (a corrupted row).
pub fn decode_stored(bytes: &[u8]) -> Result<Vec<OutboundMessage>, postcard::Error> {
    postcard::from_bytes(bytes)
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
    body: Vec<u8>,
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
        body,
    }
}

/// An event on `trio.outbound` for one recipient, in the recipient's registered format.
///
/// # Errors
/// When `body` does not serialize as a JSON object (a bug: event bodies are typed).
pub fn event<B: Serialize + ?Sized>(
    cause: (&str, &str),
    message_type: &str,
    recipient_routing_key: &str,
    format: Format,
    body: &B,
    traceparent: Option<&str>,
) -> serde_json::Result<OutboundMessage> {
    let encoded = match format {
        Format::Json => serde_json::to_vec(body)?,
        Format::Xml => trio_schemas::xml::to_xml(
            &message_type.replace('.', "_"),
            &serde_json::to_value(body)?,
        )
        .into_bytes(),
    };
    Ok(OutboundMessage {
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
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_messages_read_back_as_they_were_written() {
        let reply = reply(
            "oa-300",
            "m1",
            "replies.oa",
            "accepted",
            br#"{"status":"accepted"}"#.to_vec(),
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        );
        let event = event(
            ("oa-300", "m1"),
            "trajet.updated",
            "gp.12345678901",
            Format::Xml,
            &serde_json::json!({"version": 2}),
            None,
        )
        .unwrap();
        let messages = vec![reply, event];
        let stored = encode_stored(&messages).unwrap();
        assert_eq!(decode_stored(&stored).unwrap(), messages);
        assert!(decode_stored(&stored[..stored.len() - 1]).is_err());
        assert_eq!(decode_stored(&encode_stored(&[]).unwrap()).unwrap(), vec![]);
    }

    #[test]
    fn stored_bodies_are_the_bytes_rows_written_before_serde_bytes_hold() {
        /// `OutboundMessage` as it was: the body a plain sequence of `u8`.
        #[derive(Serialize)]
        struct BodyAsSequence<'a> {
            message_id: Uuid,
            exchange: &'a str,
            routing_key: &'a str,
            message_type: &'a str,
            content_type: &'a str,
            correlation_id: Option<&'a str>,
            traceparent: Option<&'a str>,
            body: &'a Vec<u8>,
        }
        let m = reply("oa-300", "m1", "replies.oa", "accepted", vec![7; 300], None);
        let before = postcard::to_allocvec(&vec![BodyAsSequence {
            message_id: m.message_id,
            exchange: &m.exchange,
            routing_key: &m.routing_key,
            message_type: &m.message_type,
            content_type: &m.content_type,
            correlation_id: m.correlation_id.as_deref(),
            traceparent: m.traceparent.as_deref(),
            body: &m.body,
        }])
        .unwrap();
        assert_eq!(encode_stored(std::slice::from_ref(&m)).unwrap(), before);
        assert_eq!(decode_stored(&before).unwrap(), vec![m]);
    }

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
