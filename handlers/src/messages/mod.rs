//! One handler per message type. Each checks every rule first and only then changes the batch
//! state, so a rejected message leaves no partial write.

pub(crate) mod dossier_open;
pub(crate) mod organisation_upsert;
pub(crate) mod relation;
pub(crate) mod trajet_upsert;

use crate::outcome::{Outcome, RejectCode, Rejection};
use crate::state::{Org, OrgKey};
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::sync::Arc;
use trio_schemas::OrgKind;

/// The authenticated sender of a message.
#[derive(Debug, Clone)]
pub(crate) enum Sender {
    /// A broker user listed as operator (reference data on the `reference` queue).
    Operator(String),
    /// A registered organisation, on its own kind's queue (shared with the batch's state).
    Org(Arc<Org>),
}

impl Sender {
    /// The actor recorded in history lines.
    pub(crate) fn actor(&self) -> OrgKey {
        match self {
            Self::Operator(user) => (OrgKind::Rp, format!("operator:{user}")),
            Self::Org(org) => org.key(),
        }
    }

    /// The sending organisation, when it must be one of `kinds`.
    pub(crate) fn org_of_kind(
        &self,
        kinds: &[OrgKind],
        message_type: &str,
    ) -> Result<&Org, Rejection> {
        match self {
            Self::Org(org) if kinds.contains(&org.kind) => Ok(org),
            _ => Err(Rejection::new(
                RejectCode::Forbidden,
                format!("{message_type} may not be sent by this sender"),
            )),
        }
    }
}

/// Per-message inputs computed before the transaction: the at-rest pseudonyms of the message's
/// NISS fields (in field order) and the in-transit forms of the batch's insured.
pub(crate) struct Pseudonyms<'a> {
    /// At-rest pseudonyms of this message's NISS fields.
    pub at_rest: &'a [String],
    /// In-transit form of each at-rest pseudonym the batch touches, as a JSON string.
    pub in_transit: &'a HashMap<String, Box<RawValue>>,
}

impl Pseudonyms<'_> {
    /// The in-transit form of `at_rest`.
    ///
    /// # Errors
    /// When it was not computed (a bug): the batch is then retried message by message.
    pub(crate) fn in_transit_of(&self, at_rest: &str) -> Result<&RawValue, HandlerBug> {
        self.in_transit
            .get(at_rest)
            .map(|form| &**form)
            .ok_or_else(|| HandlerBug("in-transit pseudonym missing for an insured".into()))
    }

    /// The n-th NISS field's at-rest pseudonym.
    pub(crate) fn nth(&self, n: usize) -> Result<&str, HandlerBug> {
        self.at_rest
            .get(n)
            .map(String::as_str)
            .ok_or_else(|| HandlerBug("pseudonym missing for a NISS field".into()))
    }
}

/// An internal inconsistency: not the sender's fault, never answered as a rejection.
#[derive(Debug, Clone, thiserror::Error)]
#[error("handler bug: {0}")]
pub struct HandlerBug(pub String);

/// A result or history detail that did not encode as JSON: typed and `json!` values always do,
/// so this is a bug, never the sender's fault.
impl From<serde_json::Error> for HandlerBug {
    fn from(e: serde_json::Error) -> Self {
        HandlerBug(format!("encoding JSON: {e}"))
    }
}

/// What a handler decided.
pub(crate) enum Decision {
    /// Applied (or stale): the outcome, and the dossier it concerns.
    Done(Outcome, Option<i64>),
    /// Refused by a rule.
    Rejected(Rejection),
}

impl From<Rejection> for Decision {
    fn from(r: Rejection) -> Self {
        Decision::Rejected(r)
    }
}

/// Shorthand for handler results.
pub(crate) type HandlerResult = Result<Decision, HandlerBug>;

/// Turns `Err(rejection)` into a returned `Decision::Rejected`.
macro_rules! check {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(rejection) => return Ok($crate::messages::Decision::Rejected(rejection)),
        }
    };
}
pub(crate) use check;
