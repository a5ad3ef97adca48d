//! Outbound messages (replies and `trio.outbound` events), built inside the transaction that
//! records their cause and kept with it: in the cause's inbox row ([`encode_stored`]), or in the
//! outbox table when the broker could not take them yet (see the gateway's relay).

use serde::{Deserialize, Serialize};
use std::borrow::Cow;
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

/// The outbound messages one inbound message caused, as its inbox row keeps them: what a
/// redelivery of that message publishes again.
///
/// The row also holds the message's result, and the in-transit pseudonym (~600 bytes) is in
/// both the result and each event body; keeping it twice was a third of the row and of its WAL.
/// So each body is kept without the part it shares with `result` (the result's `pseudonym`
/// string, when the body holds it), which [`decode_stored`] puts back from the same result.
/// The encoding is `postcard` (a compact serde encoding) behind a format tag.
///
/// # Errors
/// Only if `postcard` could not encode plain fields (the batch then fails rather than keep a
/// row that would publish nothing again).
pub fn encode_stored(
    messages: &[OutboundMessage],
    result: &str,
) -> Result<Vec<u8>, postcard::Error> {
    let shared = shared_with_result(result);
    let kept = KeptRow {
        shared: shared.map(|(start, len)| (start as u64, len as u64)),
        messages: messages
            .iter()
            .map(|m| {
                let split = shared.and_then(|(start, len)| {
                    let part = &result.as_bytes()[start..start + len];
                    find(&m.body, part).map(|at| (at, at + len))
                });
                let (head, tail) = match split {
                    Some((at, after)) => (&m.body[..at], Some(&m.body[after..])),
                    None => (&m.body[..], None),
                };
                Kept {
                    message_id: m.message_id,
                    exchange: Cow::Borrowed(&m.exchange),
                    routing_key: Cow::Borrowed(&m.routing_key),
                    message_type: Cow::Borrowed(&m.message_type),
                    content_type: Cow::Borrowed(&m.content_type),
                    correlation_id: m.correlation_id.as_deref().map(Cow::Borrowed),
                    traceparent: m.traceparent.as_deref().map(Cow::Borrowed),
                    head: Cow::Borrowed(head),
                    shares_result: tail.is_some(),
                    tail: Cow::Borrowed(tail.unwrap_or_default()),
                }
            })
            .collect(),
    };
    postcard::to_extend(&kept, KEPT_SHARING_RESULT.to_vec())
}

/// Reads what [`encode_stored`] wrote, given the same row's result text.
///
/// # Errors
/// When the bytes are not such a list, or refer to a part of `result` it does not have (a
/// corrupted row).
pub fn decode_stored(bytes: &[u8], result: &str) -> Result<Vec<OutboundMessage>, StoredError> {
    let Some(rest) = bytes.strip_prefix(&KEPT_SHARING_RESULT) else {
        // Written before the format tag: a bare list, each body whole.
        return Ok(postcard::from_bytes(bytes)?);
    };
    let row: KeptRow<'_> = postcard::from_bytes(rest)?;
    // The row records where the shared part lies in its result, which the result alone also
    // says: a result whose pseudonym string is not exactly there is not this row's, and the
    // bodies are refused rather than rebuilt from the wrong bytes.
    let shared = match row.shared {
        Some(recorded) => match shared_with_result(result) {
            Some((start, len)) if recorded == (start as u64, len as u64) => {
                &result.as_bytes()[start..start + len]
            }
            _ => return Err(StoredError::NotInResult),
        },
        None => &[][..],
    };
    row.messages
        .into_iter()
        .map(|k| {
            if k.shares_result && row.shared.is_none() {
                return Err(StoredError::NotInResult);
            }
            let mut body = k.head.into_owned();
            if k.shares_result {
                body.extend_from_slice(shared);
                body.extend_from_slice(&k.tail);
            }
            Ok(OutboundMessage {
                message_id: k.message_id,
                exchange: k.exchange.into_owned(),
                routing_key: k.routing_key.into_owned(),
                message_type: k.message_type.into_owned(),
                content_type: k.content_type.into_owned(),
                correlation_id: k.correlation_id.map(Cow::into_owned),
                traceparent: k.traceparent.map(Cow::into_owned),
                body,
            })
        })
        .collect()
}

/// Why kept outbound messages could not be read back (a corrupted row).
#[derive(Debug, thiserror::Error)]
pub enum StoredError {
    /// The bytes are not what [`encode_stored`] writes.
    #[error("not a kept list: {0}")]
    Encoding(#[from] postcard::Error),
    /// They refer to a part of the row's result that it does not have.
    #[error("they refer to a part of the result the row does not hold")]
    NotInResult,
}

/// The first bytes of a kept list in [`encode_stored`]'s format. Rows written before it hold a
/// bare `postcard` list, which starts with its length as a varint of at most ten bytes, the last
/// without the continuation bit; these ten bytes all have it. So this format is told apart, and a
/// gateway of before reading such a row fails on an invalid length, loudly, instead of reading
/// an empty list and publishing nothing again.
const KEPT_SHARING_RESULT: [u8; 10] = [0xFF; 10];

/// The shortest shared part worth a reference (a pseudonym is ~600 bytes).
const SHARED_AT_LEAST: usize = 64;

/// The byte range of the result's `pseudonym` string, when it has one worth sharing: long enough,
/// and without a JSON escape (a body that does not hold the very same bytes is kept whole).
fn shared_with_result(result: &str) -> Option<(usize, usize)> {
    const KEY: &str = "\"pseudonym\":\"";
    let start = result.find(KEY)? + KEY.len();
    let len = result[start..].find('"')?;
    let value = &result[start..start + len];
    (len >= SHARED_AT_LEAST && !value.contains('\\')).then_some((start, len))
}

/// Where `part` first occurs in `body`: each place its first byte occurs, compared whole. (A
/// `memmem` searcher costs more to build, per body, than this search of ~1 KB costs.)
fn find(body: &[u8], part: &[u8]) -> Option<usize> {
    let first = *part.first()?;
    memchr::memchr_iter(first, body).find(|&at| body[at..].starts_with(part))
}

/// [`encode_stored`]'s row: the range of the result the bodies share, and the messages.
#[derive(Serialize, Deserialize)]
struct KeptRow<'a> {
    shared: Option<(u64, u64)>,
    #[serde(borrow)]
    messages: Vec<Kept<'a>>,
}

/// One kept message: an [`OutboundMessage`] whose body is `head`, then, when `shares_result`,
/// the result's shared part and `tail`.
#[derive(Serialize, Deserialize)]
struct Kept<'a> {
    message_id: Uuid,
    #[serde(borrow)]
    exchange: Cow<'a, str>,
    #[serde(borrow)]
    routing_key: Cow<'a, str>,
    #[serde(borrow)]
    message_type: Cow<'a, str>,
    #[serde(borrow)]
    content_type: Cow<'a, str>,
    #[serde(borrow)]
    correlation_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    traceparent: Option<Cow<'a, str>>,
    #[serde(with = "serde_bytes", borrow)]
    head: Cow<'a, [u8]>,
    shares_result: bool,
    #[serde(with = "serde_bytes", borrow)]
    tail: Cow<'a, [u8]>,
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

    /// A result as `trajet.upsert` gives it, with a pseudonym-sized string.
    fn result_with(pseudonym: &str) -> String {
        format!(
            r#"{{"created":true,"dossier_number":"TRIO-00000007","pseudonym":"{pseudonym}","version":2}}"#
        )
    }

    #[test]
    fn stored_messages_read_back_as_they_were_written_keeping_the_pseudonym_once() {
        let pseudonym = "Ab+/9".repeat(120);
        let result = result_with(&pseudonym);
        let reply = reply(
            "oa-300",
            "m1",
            "replies.oa",
            "accepted",
            format!(r#"{{"code":null,"detail":"","result":{result},"status":"accepted"}}"#)
                .into_bytes(),
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        );
        let body = serde_json::json!({"pseudonym": pseudonym, "version": 2});
        let json_event = event(
            ("oa-300", "m1"),
            "trajet.updated",
            "sepp.0411234567",
            Format::Json,
            &body,
            None,
        )
        .unwrap();
        let xml_event = event(
            ("oa-300", "m1"),
            "trajet.updated",
            "gp.12345678901",
            Format::Xml,
            &body,
            None,
        )
        .unwrap();
        let without = event(
            ("oa-300", "m1"),
            "trajet.updated",
            "oa.100",
            Format::Json,
            &serde_json::json!({"version": 2}),
            None,
        )
        .unwrap();
        let messages = vec![reply, json_event, xml_event, without];

        let stored = encode_stored(&messages, &result).unwrap();
        assert_eq!(decode_stored(&stored, &result).unwrap(), messages);
        assert!(
            memchr::memmem::find(&stored, pseudonym.as_bytes()).is_none(),
            "the pseudonym is kept in the result only"
        );
        assert!(decode_stored(&stored[..stored.len() - 1], &result).is_err());
        // Read back with a result that lacks the shared part, or holds a pseudonym elsewhere
        // (another row's: here one character later), refused, never a wrong body.
        assert!(matches!(
            decode_stored(&stored, "{}"),
            Err(StoredError::NotInResult)
        ));
        let elsewhere = result.replace("TRIO-00000007", "TRIO-000000007");
        assert!(matches!(
            decode_stored(&stored, &elsewhere),
            Err(StoredError::NotInResult)
        ));
        // A result without a pseudonym: every body kept whole.
        let stored = encode_stored(&messages, "{}").unwrap();
        assert!(memchr::memmem::find(&stored, pseudonym.as_bytes()).is_some());
        assert_eq!(decode_stored(&stored, "{}").unwrap(), messages);
    }

    #[test]
    fn a_gateway_of_before_refuses_a_list_kept_in_this_format() {
        let pseudonym = "Ab+/9".repeat(120);
        let result = result_with(&pseudonym);
        let m = reply(
            "oa-300",
            "m1",
            "replies.oa",
            "accepted",
            result.clone().into_bytes(),
            None,
        );
        let stored = encode_stored(std::slice::from_ref(&m), &result).unwrap();
        // What `decode_stored` was before the format tag.
        assert!(postcard::from_bytes::<Vec<OutboundMessage>>(&stored).is_err());
    }

    #[test]
    fn lists_kept_before_the_format_tag_read_back() {
        /// `OutboundMessage` as rows kept it then: a bare list, the body a sequence of `u8`.
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
        let pseudonym = "Ab+/9".repeat(120);
        let m = reply(
            "oa-300",
            "m1",
            "replies.oa",
            "accepted",
            result_with(&pseudonym).into_bytes(),
            None,
        );
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
        assert_eq!(
            decode_stored(&before, &result_with(&pseudonym)).unwrap(),
            vec![m.clone()]
        );
        assert_eq!(decode_stored(&before, "{}").unwrap(), vec![m]);
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
