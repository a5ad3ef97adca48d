//! `relation.set` and `relation.unset`: operators feed the access facts (DOMAIN.md §2.1, §12 #4).
//!
//! Relations end after the configured time to live (24 hours) unless `valid_until` says otherwise;
//! facts (`insured_deceased`, `niss_replaced`) never expire.

use super::{Decision, HandlerResult, Pseudonyms, Sender, check};
use crate::outcome::{Outcome, RejectCode, Rejection};
use crate::state::{RelKind, State};
use serde_json::json;
use time::Duration;
use trio_schemas::Relation;

/// Applies one `relation.set`.
pub(crate) fn set(
    state: &mut State,
    sender: &Sender,
    relation: &Relation,
    valid_until: Option<time::OffsetDateTime>,
    ttl: Duration,
    p: &Pseudonyms<'_>,
) -> HandlerResult {
    let until = valid_until.unwrap_or(state.now + ttl);
    let dossier = match relation {
        Relation::InsuredOa { oa, .. } => set_insured(state, p, RelKind::Oa, oa, Some(until))?,
        Relation::InsuredEmployer { employer, .. } => {
            set_insured(state, p, RelKind::Employer, employer, Some(until))?
        }
        Relation::InsuredGp { gp, .. } => set_insured(state, p, RelKind::Gp, gp, Some(until))?,
        Relation::InsuredRp { rp, .. } => set_insured(state, p, RelKind::Rp, rp, Some(until))?,
        Relation::EmployerSepp { employer, sepp } => {
            state.set_employer_sepp(employer, sepp, Some(until));
            None
        }
        Relation::InsuredDeceased { died_on, .. } => {
            let insured = state.resolve(p.nth(0)?);
            state.set_died_on(&insured, Some(*died_on));
            state.dossier_of(&insured).map(|d| d.id)
        }
        Relation::NissReplaced { .. } => {
            let old = p.nth(0)?.to_owned();
            let new = state.resolve(p.nth(1)?);
            check!(if state.resolve(&old) == new {
                Err(Rejection::new(
                    RejectCode::InvalidPayload,
                    "old_niss and new_niss are the same insured",
                ))
            } else {
                Ok(())
            });
            state.replace_pseudonym(&old, &new, &sender.actor())?
        }
    };
    let result = if relation.is_fact() {
        json!({ "kind": relation.kind_str() })
    } else {
        json!({ "kind": relation.kind_str(), "valid_until": rfc3339(until) })
    };
    Ok(Decision::Done(Outcome::accepted(&result)?, dossier))
}

/// Applies one `relation.unset`.
pub(crate) fn unset(state: &mut State, relation: &Relation, p: &Pseudonyms<'_>) -> HandlerResult {
    let dossier = match relation {
        Relation::InsuredOa { oa, .. } => set_insured(state, p, RelKind::Oa, oa, None)?,
        Relation::InsuredEmployer { employer, .. } => {
            set_insured(state, p, RelKind::Employer, employer, None)?
        }
        Relation::InsuredGp { gp, .. } => set_insured(state, p, RelKind::Gp, gp, None)?,
        Relation::InsuredRp { rp, .. } => set_insured(state, p, RelKind::Rp, rp, None)?,
        Relation::EmployerSepp { employer, sepp } => {
            state.set_employer_sepp(employer, sepp, None);
            None
        }
        Relation::InsuredDeceased { .. } => {
            let insured = state.resolve(p.nth(0)?);
            state.set_died_on(&insured, None);
            state.dossier_of(&insured).map(|d| d.id)
        }
        Relation::NissReplaced { .. } => {
            return Ok(Decision::Rejected(Rejection::new(
                RejectCode::InvalidPayload,
                "a NISS replacement cannot be undone",
            )));
        }
    };
    Ok(Decision::Done(
        Outcome::accepted(&json!({ "kind": relation.kind_str() }))?,
        dossier,
    ))
}

fn set_insured(
    state: &mut State,
    p: &Pseudonyms<'_>,
    kind: RelKind,
    org_id: &str,
    until: Option<time::OffsetDateTime>,
) -> Result<Option<i64>, super::HandlerBug> {
    let insured = state.resolve(p.nth(0)?);
    state.set_relation(&insured, kind, org_id, until);
    Ok(state.dossier_of(&insured).map(|d| d.id))
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
