//! `organisation.upsert`: an operator registers an organisation and its broker user.

use super::{Decision, HandlerResult, check};
use crate::outcome::{Outcome, RejectCode, Rejection};
use crate::state::{Org, State};
use serde_json::json;
use trio_schemas::OrganisationUpsert;

/// Applies one `organisation.upsert`.
pub(crate) fn handle(state: &mut State, msg: &OrganisationUpsert) -> HandlerResult {
    check!(match state.org_by_user(&msg.broker_user) {
        Some(other) if other.kind != msg.kind || other.id != msg.id => Err(Rejection::new(
            RejectCode::InvalidPayload,
            "broker_user is already registered to another organisation",
        )),
        _ => Ok(()),
    });
    state.upsert_org(Org {
        kind: msg.kind,
        id: msg.id.clone(),
        name: msg.name.clone(),
        broker_user: msg.broker_user.clone(),
        format: msg.format,
    });
    Ok(Decision::Done(
        Outcome::accepted(&json!({ "kind": msg.kind.as_str(), "id": msg.id }))?,
        None,
    ))
}
