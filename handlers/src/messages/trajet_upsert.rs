//! `trajet.upsert`: the OA (RTW/AMI) or the SEPP (CODEX types) creates or updates a trajet it
//! owns; every other related OA, SEPP and GP is told with one `trajet.updated` each.

use super::{Decision, HandlerResult, Pseudonyms, Sender, check};
use crate::outbound;
use crate::outcome::{Outcome, RejectCode, Rejection};
use crate::rules;
use crate::state::{HistoryRow, OrgKey, State, TrajetKey, TrajetRow};
use serde::Serialize;
use serde_json::json;
use serde_json::value::{RawValue, to_raw_value};
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
                    &json!({ "dossier_number": number, "version": old.version }),
                )?,
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
        detail: to_raw_value(&HistoryDetail {
            previous_status: existing.as_ref().map(|e| e.status.as_str()),
            reference: &t.reference,
            status: &t.status,
            version: t.version,
        })?,
    });

    let body = TrajetUpdated::new(&dossier.number, pseudonym, &key, &row);
    for (recipient, format) in state.related_actors(&insured) {
        if recipient == org {
            continue;
        }
        let routing_key = format!("{}.{}", recipient.0.as_str(), recipient.1);
        let event = outbound::event(
            cause,
            "trajet.updated",
            &routing_key,
            format,
            &body,
            traceparent,
        )
        .map_err(|e| super::HandlerBug(format!("encoding a trajet.updated: {e}")))?;
        state.outbox.push(event);
    }
    state.put_trajet(key, row);
    Ok(Decision::Done(
        Outcome::accepted(&Accepted {
            created: existing.is_none(),
            dossier_number: &dossier.number,
            pseudonym,
            version: t.version,
        })?,
        Some(dossier.id),
    ))
}

/// The result of an accepted `trajet.upsert`. Fields in alphabetical order, the order a
/// `serde_json::Value` object keeps, so replies are byte for byte what they were.
#[derive(Debug, Serialize)]
struct Accepted<'a> {
    created: bool,
    dossier_number: &'a str,
    pseudonym: &'a RawValue,
    version: i64,
}

/// The history line's detail (stored as `jsonb`, so field order does not matter there).
#[derive(Debug, Serialize)]
struct HistoryDetail<'a> {
    previous_status: Option<&'a str>,
    #[serde(rename = "ref")]
    reference: &'a str,
    status: &'a str,
    version: i64,
}

/// The `trajet.updated` body (CONTRACT.md §4): only owner, ref, version, type and status once
/// consent is withdrawn.
///
/// Typed rather than a `serde_json::Value`, which cost a map per object, a string per key and a
/// copy of the ~600-byte pseudonym on every message. The fields are in alphabetical order, the
/// order a `Value` object keeps, so the JSON is byte for byte what the `Value` gave.
#[derive(Debug, Serialize)]
struct TrajetUpdated<'a> {
    dossier_number: &'a str,
    pseudonym: &'a RawValue,
    trajet: UpdatedTrajet<'a>,
}

/// The `trajet` object of [`TrajetUpdated`].
#[derive(Debug, Serialize)]
struct UpdatedTrajet<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    consent: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    end_on: Option<String>,
    owner: Owner<'a>,
    #[serde(rename = "ref")]
    reference: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_received_on: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    start_on: Option<String>,
    status: &'a str,
    #[serde(rename = "type")]
    trajet_type: &'static str,
    version: i64,
}

/// The trajet's owner in [`UpdatedTrajet`].
#[derive(Debug, Serialize)]
struct Owner<'a> {
    id: &'a str,
    kind: &'static str,
}

impl<'a> TrajetUpdated<'a> {
    fn new(
        number: &'a str,
        pseudonym: &'a RawValue,
        key: &'a TrajetKey,
        row: &'a TrajetRow,
    ) -> Self {
        let shown = row.consent != Some(Consent::Withdrawn);
        let date = |d: Option<time::Date>| d.filter(|_| shown).map(|d| d.to_string());
        TrajetUpdated {
            dossier_number: number,
            pseudonym,
            trajet: UpdatedTrajet {
                consent: row.consent.filter(|_| shown).map(Consent::as_str),
                end_on: date(row.end_on),
                owner: Owner {
                    id: &key.owner_id,
                    kind: key.owner_kind.as_str(),
                },
                reference: &key.reference,
                request_received_on: date(row.request_received_on),
                start_on: date(row.start_on),
                status: &row.status,
                trajet_type: row.trajet_type.as_str(),
                version: row.version,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use time::macros::date;
    use trio_schemas::TrajetType;

    fn key() -> TrajetKey {
        TrajetKey {
            owner_kind: OrgKind::Oa,
            owner_id: "300".to_owned(),
            reference: "T-1".to_owned(),
        }
    }

    fn row(consent: Option<Consent>) -> TrajetRow {
        TrajetRow {
            dossier_id: 7,
            trajet_type: TrajetType::RtwAmi,
            status: "en_cours".to_owned(),
            version: 3,
            request_received_on: Some(date!(2026 - 01 - 02)),
            start_on: Some(date!(2026 - 01 - 05)),
            end_on: None,
            consent,
        }
    }

    /// The JSON of a body, as the gateway sent it when it built the body as a
    /// `serde_json::Value` (keys sorted).
    fn as_value_gave(trajet: Value) -> String {
        json!({
            "dossier_number": "TRIO-00000007",
            "pseudonym": "eyJhbGc.x.y",
            "trajet": trajet,
        })
        .to_string()
    }

    /// An in-transit pseudonym as the batch hands it to handlers: JSON text.
    fn pseudonym() -> Box<RawValue> {
        to_raw_value("eyJhbGc.x.y").unwrap()
    }

    #[test]
    fn the_trajet_updated_body_is_the_json_partners_have_always_received() {
        let key = key();
        let pseudonym = pseudonym();
        let encoded = |row: &TrajetRow| {
            serde_json::to_string(&TrajetUpdated::new("TRIO-00000007", &pseudonym, &key, row))
                .unwrap()
        };
        assert_eq!(
            encoded(&row(Some(Consent::Given))),
            as_value_gave(json!({
                "owner": {"kind": "oa", "id": "300"},
                "ref": "T-1", "version": 3, "type": "rtw_ami", "status": "en_cours",
                "request_received_on": "2026-01-02", "start_on": "2026-01-05",
                "consent": "given",
            }))
        );
        // Consent withdrawn: owner, ref, version, type and status only (CONTRACT.md §4).
        assert_eq!(
            encoded(&row(Some(Consent::Withdrawn))),
            as_value_gave(json!({
                "owner": {"kind": "oa", "id": "300"},
                "ref": "T-1", "version": 3, "type": "rtw_ami", "status": "en_cours",
            }))
        );
    }

    #[test]
    fn the_reply_to_an_upsert_is_the_json_senders_have_always_received() {
        let accepted = Outcome::accepted(&Accepted {
            created: true,
            dossier_number: "TRIO-00000007",
            pseudonym: &pseudonym(),
            version: 3,
        })
        .unwrap();
        let as_value_gave = json!({
            "status": "accepted",
            "code": null,
            "detail": "",
            "result": {
                "dossier_number": "TRIO-00000007",
                "pseudonym": "eyJhbGc.x.y",
                "created": true,
                "version": 3,
            },
        })
        .to_string();
        assert_eq!(
            String::from_utf8(accepted.reply_body().unwrap()).unwrap(),
            as_value_gave
        );
        // A duplicate repeats the first result, read back from its stored text.
        let stored = crate::outcome::stored_result(Some(accepted.result.get().to_owned()));
        let first = Outcome {
            result: stored,
            ..accepted
        };
        let duplicate: Value =
            serde_json::from_slice(&Outcome::duplicate_of(&first).reply_body().unwrap()).unwrap();
        assert_eq!(duplicate["status"], "duplicate");
        assert_eq!(duplicate["detail"], "accepted");
        assert_eq!(duplicate["result"]["pseudonym"], "eyJhbGc.x.y");
        assert_eq!(duplicate["result"]["created"], true);
    }

    #[test]
    fn the_history_detail_holds_the_fields_it_always_held() {
        let detail = to_raw_value(&HistoryDetail {
            previous_status: None,
            reference: "T-1",
            status: "en_cours",
            version: 3,
        })
        .unwrap();
        let read: Value = serde_json::from_str(detail.get()).unwrap();
        assert_eq!(
            read,
            json!({"ref": "T-1", "version": 3, "status": "en_cours", "previous_status": null})
        );
    }
}
