//! What the runtime hands the handlers: one envelope-checked, decoded inbound message.

use trio_schemas::{Message, MessageType, OrgKind};

/// The inbound queue a message arrived on (CONTRACT.md §1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceQueue {
    /// `trio.inbound.oa`.
    Oa,
    /// `trio.inbound.sepp`.
    Sepp,
    /// `trio.inbound.gp`.
    Gp,
    /// `trio.inbound.rp`.
    Rp,
    /// `trio.inbound.reference` (operators).
    Reference,
}

impl SourceQueue {
    /// All queues, in contract order.
    pub const ALL: [SourceQueue; 5] = [Self::Oa, Self::Sepp, Self::Gp, Self::Rp, Self::Reference];

    /// The routing key on `trio.inbound` (also the queue-name suffix).
    pub fn routing_key(self) -> &'static str {
        match self {
            Self::Oa => "oa",
            Self::Sepp => "sepp",
            Self::Gp => "gp",
            Self::Rp => "rp",
            Self::Reference => "reference",
        }
    }

    /// The queue name, e.g. `trio.inbound.oa`.
    pub fn queue_name(self) -> String {
        format!("trio.inbound.{}", self.routing_key())
    }

    /// The organisation kind that may publish here; `None` for the operators' queue.
    pub fn org_kind(self) -> Option<OrgKind> {
        match self {
            Self::Oa => Some(OrgKind::Oa),
            Self::Sepp => Some(OrgKind::Sepp),
            Self::Gp => Some(OrgKind::Gp),
            Self::Rp => Some(OrgKind::Rp),
            Self::Reference => None,
        }
    }
}

/// One inbound message, past the envelope checks (size, `message_id`, known and implemented
/// `type`, readable body).
#[derive(Debug, Clone)]
pub struct Inbound {
    /// The queue it arrived on.
    pub queue: SourceQueue,
    /// AMQP `user_id`: the broker-authenticated sender, if set.
    pub user_id: Option<String>,
    /// AMQP `message_id` (idempotency key together with the sender).
    pub message_id: String,
    /// AMQP `type`.
    pub message_type: MessageType,
    /// AMQP `reply_to`, where the outcome is sent.
    pub reply_to: Option<String>,
    /// W3C `traceparent` header, carried onto what the message causes.
    pub traceparent: Option<String>,
    /// The broker delivered it before (AMQP `redelivered`): an earlier delivery may have been
    /// committed without its reply and events ever being confirmed.
    pub redelivered: bool,
    /// The decoded payload, or why it is not a valid payload of its type (`invalid_payload`).
    pub payload: Result<Message, String>,
}

impl Inbound {
    /// The sender part of the idempotency key (the broker user; empty when absent).
    pub fn sender_key(&self) -> &str {
        self.user_id.as_deref().unwrap_or("")
    }
}
