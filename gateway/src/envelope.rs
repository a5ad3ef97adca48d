//! Step 1 of the flow: read a delivery's envelope and body. What cannot be read becomes a dead
//! letter with its reason (CONTRACT.md §5); the rest becomes an [`Inbound`] for the handlers.

use lapin::message::Delivery;
use lapin::types::AMQPValue;
use trio_handlers::{Inbound, RejectCode, SourceQueue};
use trio_schemas::{ContentType, DecodeError, MessageType};

/// Why a message goes to `trio.dead` (header `x-trio-error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadReason {
    /// Not well-formed JSON/XML, not UTF-8, unknown `content_type`.
    Unreadable,
    /// No `message_id`.
    NoMessageId,
    /// Missing, unknown or not yet supported `type`.
    UnknownType,
    /// Body over the size limit.
    TooLarge,
    /// XML with a DOCTYPE or entity declaration.
    DtdRefused,
    /// Failed on every delivery up to the limit.
    DeliveryLimit,
}

impl DeadReason {
    /// The `x-trio-error` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unreadable => "unreadable",
            Self::NoMessageId => "no_message_id",
            Self::UnknownType => "unknown_type",
            Self::TooLarge => "too_large",
            Self::DtdRefused => "dtd_refused",
            Self::DeliveryLimit => "delivery_limit",
        }
    }

    /// The reply code sent with it, where the message can be answered.
    pub fn reply_code(self) -> Option<RejectCode> {
        match self {
            Self::Unreadable => Some(RejectCode::Unreadable),
            Self::UnknownType => Some(RejectCode::UnknownType),
            Self::TooLarge => Some(RejectCode::TooLarge),
            Self::DtdRefused => Some(RejectCode::DtdRefused),
            Self::NoMessageId | Self::DeliveryLimit => None,
        }
    }
}

/// A message to dead-letter, with a short detail for operators (never payload contents).
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The reason.
    pub reason: DeadReason,
    /// What exactly was wrong.
    pub detail: String,
}

/// The outcome of reading one delivery.
#[derive(Debug)]
pub enum Checked {
    /// Ready for the handlers.
    Valid(Box<Inbound>),
    /// Goes to `trio.dead`.
    Dead(DeadLetter),
}

fn dead(reason: DeadReason, detail: impl Into<String>) -> Checked {
    Checked::Dead(DeadLetter {
        reason,
        detail: detail.into(),
    })
}

/// A string header, if present.
pub fn header_str(delivery: &Delivery, name: &str) -> Option<String> {
    crate::dead_letter::read_header(delivery.properties.headers().as_ref()?, name)
}

/// How many times the broker delivered this message before (quorum queues' `x-delivery-count`).
pub fn previous_deliveries(delivery: &Delivery) -> u64 {
    let Some(headers) = delivery.properties.headers().as_ref() else {
        return 0;
    };
    match headers.inner().get("x-delivery-count") {
        Some(AMQPValue::LongLongInt(n)) => u64::try_from(*n).unwrap_or(0),
        Some(AMQPValue::LongInt(n)) => u64::try_from(*n).unwrap_or(0),
        Some(AMQPValue::ShortInt(n)) => u64::try_from(*n).unwrap_or(0),
        Some(AMQPValue::LongUInt(n)) => u64::from(*n),
        _ => 0,
    }
}

/// Reads one delivery from `queue`.
pub fn check(queue: SourceQueue, delivery: &Delivery, max_bytes: usize) -> Checked {
    let props = &delivery.properties;
    if delivery.data.len() > max_bytes {
        return dead(
            DeadReason::TooLarge,
            format!("body of {} bytes exceeds {max_bytes}", delivery.data.len()),
        );
    }
    let Some(message_id) = props
        .message_id()
        .as_ref()
        .map(|m| m.as_str().to_owned())
        .filter(|m| !m.is_empty())
    else {
        return dead(DeadReason::NoMessageId, "message_id is missing");
    };
    let Some(type_name) = props.kind().as_ref().map(|t| t.as_str().to_owned()) else {
        return dead(DeadReason::UnknownType, "type is missing");
    };
    let Some(message_type) = MessageType::parse(&type_name) else {
        return dead(
            DeadReason::UnknownType,
            "type is not a contract message type",
        );
    };
    if !message_type.is_implemented() {
        return dead(
            DeadReason::UnknownType,
            format!("{message_type} is not supported by this gateway version"),
        );
    }
    let Some(content_type) = props
        .content_type()
        .as_ref()
        .and_then(|c| ContentType::parse(c.as_str()))
    else {
        return dead(
            DeadReason::Unreadable,
            "content_type is not application/json or application/xml",
        );
    };
    let payload = match trio_schemas::decode(message_type, content_type, &delivery.data) {
        Ok(message) => Ok(message),
        Err(DecodeError::Unreadable(detail)) => return dead(DeadReason::Unreadable, detail),
        Err(DecodeError::DtdRefused) => {
            return dead(
                DeadReason::DtdRefused,
                "XML with a DOCTYPE or entity declaration",
            );
        }
        Err(DecodeError::Invalid(detail)) => Err(detail),
    };
    Checked::Valid(Box::new(Inbound {
        queue,
        user_id: props.user_id().as_ref().map(|u| u.as_str().to_owned()),
        message_id,
        message_type,
        reply_to: props
            .reply_to()
            .as_ref()
            .map(|r| r.as_str().to_owned())
            .filter(|r| !r.is_empty()),
        traceparent: header_str(delivery, "traceparent"),
        redelivered: delivery.redelivered,
        payload,
    }))
}
