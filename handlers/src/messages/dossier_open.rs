//! `dossier.open`: an OA, SEPP or GP searches an insured by NISS; the dossier is created when
//! there is none. Access is checked before anything is revealed or created (DOMAIN.md §12 #26).

use super::{Decision, HandlerResult, Pseudonyms, Sender, check};
use crate::outcome::Outcome;
use crate::state::State;
use serde_json::json;
use trio_schemas::OrgKind;

/// Applies one `dossier.open`.
pub(crate) fn handle(state: &mut State, sender: &Sender, p: &Pseudonyms<'_>) -> HandlerResult {
    let org =
        check!(sender.org_of_kind(&[OrgKind::Oa, OrgKind::Sepp, OrgKind::Gp], "dossier.open"))
            .key();
    let insured = state.resolve(p.nth(0)?);
    check!(super::trajet_upsert::may_access(state, &org, &insured));
    let (dossier, created) = state
        .dossier_or_create(&insured, &org)
        .map_err(super::HandlerBug)?;
    Ok(Decision::Done(
        Outcome::accepted(&json!({
            "dossier_number": dossier.number,
            "pseudonym": p.in_transit_of(&insured)?,
            "created": created,
        }))?,
        Some(dossier.id),
    ))
}
