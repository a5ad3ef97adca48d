//! Pure domain rules (DOMAIN.md §2 and §4): no I/O, so each is unit-tested on its own.

use trio_schemas::{OrgKind, TrajetType};

/// Who may create or edit a trajet of this type (DOMAIN.md §2.2): RTW/AMI is the OA's, the three
/// CODEX types are the SEPP's.
pub fn may_edit_trajet(kind: OrgKind, trajet_type: TrajetType) -> bool {
    match trajet_type {
        TrajetType::RtwAmi => kind == OrgKind::Oa,
        TrajetType::ReintegrationCodex
        | TrajetType::ForceMajeureMedicale
        | TrajetType::VisitePreReprise => kind == OrgKind::Sepp,
    }
}

/// The statuses of a trajet type (DOMAIN.md §4.3, exhaustive). Any of them may follow any other
/// (§12 #2).
pub fn statuses(trajet_type: TrajetType) -> &'static [&'static str] {
    match trajet_type {
        TrajetType::ReintegrationCodex => &[
            "en_cours",
            "en_cours_copie_plan_reintegration",
            "termine",
            "termine_rapport_motive",
            "termine_pas_de_reintegration",
            "accepte",
            "refuse",
        ],
        TrajetType::ForceMajeureMedicale => &[
            "en_cours",
            "termine",
            "termine_retour_travail_possible",
            "termine_pas_retour_travail_possible",
        ],
        TrajetType::VisitePreReprise => &["en_cours", "termine"],
        TrajetType::RtwAmi => &[
            "en_cours",
            "en_cours_plan_reintegration",
            "termine_pas_de_consentement",
            "termine",
            "contact_medecin_travail",
        ],
    }
}

/// Whether `status` is a status of `trajet_type`.
pub fn status_allowed(trajet_type: TrajetType, status: &str) -> bool {
    statuses(trajet_type).contains(&status)
}

/// History resource of a trajet type (DOMAIN.md §8, §12 #11).
pub fn history_resource(trajet_type: TrajetType) -> &'static str {
    match trajet_type {
        TrajetType::RtwAmi => "trajet_rtw_ami",
        TrajetType::ReintegrationCodex => "trajet_reintegration_codex",
        TrajetType::ForceMajeureMedicale => "trajet_force_majeure_medicale",
        TrajetType::VisitePreReprise => "trajet_visite_pre_reprise",
    }
}

/// The organisation kinds that see a dossier and receive its events (DOMAIN.md §2.1).
pub fn is_trio_actor(kind: OrgKind) -> bool {
    matches!(kind, OrgKind::Oa | OrgKind::Sepp | OrgKind::Gp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtw_ami_is_the_oas_and_codex_the_sepps() {
        assert!(may_edit_trajet(OrgKind::Oa, TrajetType::RtwAmi));
        assert!(!may_edit_trajet(OrgKind::Sepp, TrajetType::RtwAmi));
        assert!(!may_edit_trajet(OrgKind::Gp, TrajetType::RtwAmi));
        for t in [
            TrajetType::ReintegrationCodex,
            TrajetType::ForceMajeureMedicale,
            TrajetType::VisitePreReprise,
        ] {
            assert!(may_edit_trajet(OrgKind::Sepp, t));
            assert!(!may_edit_trajet(OrgKind::Oa, t));
            assert!(!may_edit_trajet(OrgKind::Gp, t));
        }
    }

    #[test]
    fn statuses_are_keyed_by_type() {
        assert!(status_allowed(
            TrajetType::RtwAmi,
            "contact_medecin_travail"
        ));
        assert!(!status_allowed(
            TrajetType::VisitePreReprise,
            "contact_medecin_travail"
        ));
        assert!(status_allowed(TrajetType::ReintegrationCodex, "accepte"));
        assert!(!status_allowed(TrajetType::RtwAmi, "accepte"));
        assert!(status_allowed(
            TrajetType::ForceMajeureMedicale,
            "termine_retour_travail_possible"
        ));
        assert!(!status_allowed(TrajetType::RtwAmi, "unknown"));
        assert_eq!(statuses(TrajetType::ReintegrationCodex).len(), 7);
        assert_eq!(statuses(TrajetType::ForceMajeureMedicale).len(), 4);
        assert_eq!(statuses(TrajetType::VisitePreReprise).len(), 2);
        assert_eq!(statuses(TrajetType::RtwAmi).len(), 5);
    }
}
