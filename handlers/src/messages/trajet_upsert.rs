//! `trajet.upsert`: the OA (RTW/AMI) or the SEPP (CODEX types) creates or updates a trajet it
//! owns; every other related OA, SEPP and GP is told with one `trajet.updated` each.

use super::{Decision, HandlerResult, Pseudonyms, Sender, check};
use crate::outbound;
use crate::outcome::{Outcome, RejectCode, Rejection};
use crate::rules;
use crate::state::{HistoryRow, OrgKey, State, TrajetKey, TrajetRow};
use serde_json::{Map, Value, json};
use trio_schemas::{Consent, OrgKind, TrajetUpsert};

/// DOMAIN.md §2.1 and §12 #1: the organisation has a current relation and the insured is alive.
pub(crate) fn may_access(state: &State, org: &OrgKey, insured: &str) -> Result<(), Rejection> {
    if state.died_on(insured).is_some() {
        return Err(Rejection::new(
            RejectCode::Deceased,
            "the insured is reported deceased",
        ));
    }
    if !state.has_access(org, insured) {
        return Err(Rejection::new(
            RejectCode::NoRelation,
            "the sender has no current relation with the insured",
        ));
    }
    Ok(())
}

/// The inbound message that caused an event: `(sender, message_id)`.
pub(crate) type Cause<'a> = (&'a str, &'a str);

/// Applies one `trajet.upsert`.
pub(crate) fn handle(
    state: &mut State,
    sender: &Sender,
    msg: &TrajetUpsert,
    p: &Pseudonyms<'_>,
    cause: Cause<'_>,
    traceparent: Option<&str>,
) -> HandlerResult {
    let org = check!(sender.org_of_kind(&[OrgKind::Oa, OrgKind::Sepp], "trajet.upsert")).key();
    let insured = state.resolve(p.nth(0)?);
    check!(may_access(state, &org, &insured));
    let t = &msg.trajet;
    check!(if rules::may_edit_trajet(org.0, t.trajet_type) {
        Ok(())
    } else {
        Err(Rejection::new(
            RejectCode::Forbidden,
            format!(
                "a {} may not create or edit a {} trajet",
                org.0.as_str(),
                t.trajet_type.as_str()
            ),
        ))
    });
    check!(if rules::status_allowed(t.trajet_type, &t.status) {
        Ok(())
    } else {
        Err(Rejection::new(
            RejectCode::StatusNotAllowed,
            format!(
                "status is not one of the {} statuses",
                t.trajet_type.as_str()
            ),
        ))
    });

    let key = TrajetKey {
        owner_kind: org.0,
        owner_id: org.1.clone(),
        reference: t.reference.clone(),
    };
    let existing = state.trajet(&key).cloned();
    let dossier_of_insured = state.dossier_of(&insured).map(|d| d.id);
    if let Some(old) = &existing {
        check!(if Some(old.dossier_id) != dossier_of_insured {
            Err(Rejection::new(
                RejectCode::InvalidPayload,
                "this trajet ref belongs to another insured",
            ))
        } else {
            Ok(())
        });
        if t.version <= old.version {
            let number = state.dossier_of(&insured).map(|d| d.number.clone());
            return Ok(Decision::Done(
                Outcome::stale(
                    format!("stored version {} is not older", old.version),
                    json!({ "dossier_number": number, "version": old.version }),
                ),
                Some(old.dossier_id),
            ));
        }
        check!(if old.trajet_type != t.trajet_type {
            Err(Rejection::new(
                RejectCode::InvalidTransition,
                "a trajet's type never changes",
            ))
        } else {
            Ok(())
        });
    }

    let pseudonym = p.in_transit_of(&insured)?;
    let (dossier, _) = state
        .dossier_or_create(&insured, &org)
        .map_err(super::HandlerBug)?;
    let row = TrajetRow {
        dossier_id: dossier.id,
        trajet_type: t.trajet_type,
        status: t.status.clone(),
        version: t.version,
        request_received_on: t.request_received_on,
        start_on: t.start_on,
        end_on: t.end_on,
        consent: t.consent.or(existing.as_ref().and_then(|e| e.consent)),
    };
    state.add_history(HistoryRow {
        dossier_id: dossier.id,
        actor: org.clone(),
        resource: rules::history_resource(t.trajet_type),
        operation: if existing.is_none() {
            "trajet_created"
        } else {
            "trajet_updated"
        },
        detail: json!({
            "ref": t.reference,
            "version": t.version,
            "status": t.status,
            "previous_status": existing.as_ref().map(|e| e.status.clone()),
        }),
    });

    let body = trajet_updated_body(&dossier.number, &pseudonym, &key, &row);
    for (recipient, format) in state.related_actors(&insured) {
        if recipient == org {
            continue;
        }
        let routing_key = format!("{}.{}", recipient.0.as_str(), recipient.1);
        state.outbox.push(outbound::event(
            cause,
            "trajet.updated",
            &routing_key,
            format,
            &body,
            traceparent,
        ));
    }
    state.put_trajet(key, row);
    Ok(Decision::Done(
        Outcome::accepted(json!({
            "dossier_number": dossier.number,
            "pseudonym": pseudonym,
            "created": existing.is_none(),
            "version": t.version,
        })),
        Some(dossier.id),
    ))
}

/// The `trajet.updated` body (CONTRACT.md §4): only owner, ref, version, type and status once
/// consent is withdrawn.
fn trajet_updated_body(number: &str, pseudonym: &str, key: &TrajetKey, row: &TrajetRow) -> Value {
    let mut trajet = Map::new();
    trajet.insert(
        "owner".into(),
        json!({ "kind": key.owner_kind.as_str(), "id": key.owner_id }),
    );
    trajet.insert("ref".into(), json!(key.reference));
    trajet.insert("version".into(), json!(row.version));
    trajet.insert("type".into(), json!(row.trajet_type.as_str()));
    trajet.insert("status".into(), json!(row.status));
    if row.consent != Some(Consent::Withdrawn) {
        let dates = [
            ("request_received_on", row.request_received_on),
            ("start_on", row.start_on),
            ("end_on", row.end_on),
        ];
        for (name, date) in dates {
            if let Some(d) = date {
                trajet.insert(name.into(), json!(d.to_string()));
            }
        }
        if let Some(c) = row.consent {
            trajet.insert("consent".into(), json!(c.as_str()));
        }
    }
    json!({ "dossier_number": number, "pseudonym": pseudonym, "trajet": trajet })
}
