//! Outcomes: the one result every inbound message ends in (CONTRACT.md §4), and the reply body.

use serde::Serialize;
use serde_json::value::{RawValue, to_raw_value};
use std::fmt;

/// The reply status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Applied.
    Accepted,
    /// Same `(sender, message_id)` already processed: nothing applied again.
    Duplicate,
    /// Trajet version not newer than the stored one.
    Stale,
    /// A rule refused it; nothing was written but the outcome.
    Rejected,
}

impl Status {
    /// The wire code.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Duplicate => "duplicate",
            Self::Stale => "stale",
            Self::Rejected => "rejected",
        }
    }

    /// Parses a stored code.
    pub fn parse(code: &str) -> Option<Self> {
        match code {
            "accepted" => Some(Self::Accepted),
            "duplicate" => Some(Self::Duplicate),
            "stale" => Some(Self::Stale),
            "rejected" => Some(Self::Rejected),
            _ => None,
        }
    }
}

/// Why a message was rejected (CONTRACT.md §4). Names are the wire codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum RejectCode {
    Unauthenticated,
    Forbidden,
    NoRelation,
    Deceased,
    InvalidNiss,
    InvalidPayload,
    UnknownTrajet,
    UnknownAnnex,
    RoleNotAllowed,
    StatusNotAllowed,
    InvalidTransition,
    AnnexTypeNotAllowed,
    ConsentWithdrawn,
    AnnexNotShared,
    SelfNotification,
    RecipientNoRelation,
    NotRecipient,
    ResponseNotRequired,
    AlreadyAnswered,
    DossierArchived,
    Unreadable,
    UnknownType,
    TooLarge,
    DtdRefused,
}

impl RejectCode {
    /// The wire code.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unauthenticated => "unauthenticated",
            Self::Forbidden => "forbidden",
            Self::NoRelation => "no_relation",
            Self::Deceased => "deceased",
            Self::InvalidNiss => "invalid_niss",
            Self::InvalidPayload => "invalid_payload",
            Self::UnknownTrajet => "unknown_trajet",
            Self::UnknownAnnex => "unknown_annex",
            Self::RoleNotAllowed => "role_not_allowed",
            Self::StatusNotAllowed => "status_not_allowed",
            Self::InvalidTransition => "invalid_transition",
            Self::AnnexTypeNotAllowed => "annex_type_not_allowed",
            Self::ConsentWithdrawn => "consent_withdrawn",
            Self::AnnexNotShared => "annex_not_shared",
            Self::SelfNotification => "self_notification",
            Self::RecipientNoRelation => "recipient_no_relation",
            Self::NotRecipient => "not_recipient",
            Self::ResponseNotRequired => "response_not_required",
            Self::AlreadyAnswered => "already_answered",
            Self::DossierArchived => "dossier_archived",
            Self::Unreadable => "unreadable",
            Self::UnknownType => "unknown_type",
            Self::TooLarge => "too_large",
            Self::DtdRefused => "dtd_refused",
        }
    }
}

impl fmt::Display for RejectCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refusal by a rule: the code and a human-readable detail (never a NISS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The reply code.
    pub code: RejectCode,
    /// What was wrong, for the sender's operators.
    pub detail: String,
}

impl Rejection {
    /// Builds a rejection.
    pub fn new(code: RejectCode, detail: impl Into<String>) -> Self {
        Self {
            code,
            detail: detail.into(),
        }
    }
}

/// The outcome of one inbound message.
///
/// Its result is JSON text, serialized once where the handler builds it: the flush stores that
/// text in the inbox and a reply embeds it as it is. (A `serde_json::Value` here cost a map per
/// object, a copy of the ~600-byte pseudonym, a clone per record and an encoding per flush, on
/// every message.)
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Reply status.
    pub status: Status,
    /// Reply code: the rejection code, or for a duplicate the first outcome's code.
    pub code: Option<String>,
    /// Human-readable detail.
    pub detail: String,
    /// Result object (`{}` when there is none), as JSON text.
    pub result: Box<RawValue>,
}

impl Outcome {
    /// Accepted with a result object.
    ///
    /// # Errors
    /// When `result` does not serialize (a bug: results are typed or `json!` objects).
    pub fn accepted(result: &impl Serialize) -> serde_json::Result<Self> {
        Ok(Self {
            status: Status::Accepted,
            code: None,
            detail: String::new(),
            result: to_raw_value(result)?,
        })
    }

    /// Stale: the stored version is not older.
    ///
    /// # Errors
    /// When `result` does not serialize (a bug, as for [`Outcome::accepted`]).
    pub fn stale(detail: impl Into<String>, result: &impl Serialize) -> serde_json::Result<Self> {
        Ok(Self {
            status: Status::Stale,
            code: None,
            detail: detail.into(),
            result: to_raw_value(result)?,
        })
    }

    /// Rejected by a rule.
    pub fn rejected(rejection: Rejection) -> Self {
        Self {
            status: Status::Rejected,
            code: Some(rejection.code.as_str().to_owned()),
            detail: rejection.detail,
            result: empty_object(),
        }
    }

    /// A duplicate of `first`: repeats its code and result, the detail names its status.
    pub fn duplicate_of(first: &Outcome) -> Self {
        Self {
            status: Status::Duplicate,
            code: first.code.clone(),
            detail: first.status.as_str().to_owned(),
            result: first.result.clone(),
        }
    }

    /// The reply body `{"status","code","detail","result"}`, encoded.
    ///
    /// # Errors
    /// None in practice (strings and JSON text into a vector); the encoder's signature has one.
    pub fn reply_body(&self) -> serde_json::Result<Vec<u8>> {
        serde_json::to_vec(&ReplyBody {
            code: self.code.as_deref(),
            detail: &self.detail,
            result: &self.result,
            status: self.status.as_str(),
        })
    }
}

/// The reply body. Fields in alphabetical order: the order a `serde_json::Value` object keeps,
/// so replies are byte for byte what they were when the body was a `Value`.
#[derive(Serialize)]
struct ReplyBody<'a> {
    code: Option<&'a str>,
    detail: &'a str,
    result: &'a RawValue,
    status: &'a str,
}

/// `{}` as JSON text: the result of an outcome that has none.
pub fn empty_object() -> Box<RawValue> {
    RawValue::from_string("{}".to_owned()).expect("`{}` is a JSON object")
}

/// Stored result text read back as JSON text; `{}` when it is missing or not JSON (a row
/// written by hand).
pub fn stored_result(text: Option<String>) -> Box<RawValue> {
    text.and_then(|t| RawValue::from_string(t).ok())
        .unwrap_or_else(empty_object)
}
