//! Typed inbound messages of the wire contract (CONTRACT.md §3), decoded once at the edge.
//!
//! Field names follow the JSON form exactly (`serde` renames where Rust reserves a word), so the
//! JSON and the XML form deserialize into the same types. Nothing here implements `Serialize` for a
//! NISS: it travels as [`RawNiss`], whose `Debug` is redacted, until the handlers parse it.

use serde::Deserialize;
use std::fmt;
use time::{Date, OffsetDateTime};

/// Every message type named by the contract, implemented in this version or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageType {
    /// `organisation.upsert` (operator).
    OrganisationUpsert,
    /// `relation.set` (operator).
    RelationSet,
    /// `relation.unset` (operator).
    RelationUnset,
    /// `dossier.open` (oa, sepp, gp).
    DossierOpen,
    /// `trajet.upsert` (oa, sepp).
    TrajetUpsert,
    /// `consent.set` (oa, sepp).
    ConsentSet,
    /// `annex.add` (oa, sepp, gp).
    AnnexAdd,
    /// `annex.share` (uploader).
    AnnexShare,
    /// `annex.delete` (uploader).
    AnnexDelete,
    /// `notification.send` (oa, sepp, gp).
    NotificationSend,
    /// `notification.respond` (recipient).
    NotificationRespond,
    /// `notification.read` (recipient).
    NotificationRead,
    /// `assignment.set` (oa, sepp).
    AssignmentSet,
    /// `pseudo.pseudonymize` (rp).
    PseudoPseudonymize,
    /// `rp.dossier.exists` (rp).
    RpDossierExists,
    /// `rp.dossier.opened` (rp).
    RpDossierOpened,
}

impl MessageType {
    /// All types, in contract order.
    pub const ALL: [MessageType; 16] = [
        Self::OrganisationUpsert,
        Self::RelationSet,
        Self::RelationUnset,
        Self::DossierOpen,
        Self::TrajetUpsert,
        Self::ConsentSet,
        Self::AnnexAdd,
        Self::AnnexShare,
        Self::AnnexDelete,
        Self::NotificationSend,
        Self::NotificationRespond,
        Self::NotificationRead,
        Self::AssignmentSet,
        Self::PseudoPseudonymize,
        Self::RpDossierExists,
        Self::RpDossierOpened,
    ];

    /// The wire name, e.g. `trajet.upsert`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OrganisationUpsert => "organisation.upsert",
            Self::RelationSet => "relation.set",
            Self::RelationUnset => "relation.unset",
            Self::DossierOpen => "dossier.open",
            Self::TrajetUpsert => "trajet.upsert",
            Self::ConsentSet => "consent.set",
            Self::AnnexAdd => "annex.add",
            Self::AnnexShare => "annex.share",
            Self::AnnexDelete => "annex.delete",
            Self::NotificationSend => "notification.send",
            Self::NotificationRespond => "notification.respond",
            Self::NotificationRead => "notification.read",
            Self::AssignmentSet => "assignment.set",
            Self::PseudoPseudonymize => "pseudo.pseudonymize",
            Self::RpDossierExists => "rp.dossier.exists",
            Self::RpDossierOpened => "rp.dossier.opened",
        }
    }

    /// Parses a wire name; `None` for a type the contract does not know.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == name)
    }

    /// Whether this version of the gateway applies the type (the others are dead-lettered as
    /// `unknown_type` so that an operator can replay them after an upgrade).
    pub fn is_implemented(self) -> bool {
        matches!(
            self,
            Self::OrganisationUpsert
                | Self::RelationSet
                | Self::RelationUnset
                | Self::DossierOpen
                | Self::TrajetUpsert
        )
    }

    /// Only operators (on the `reference` queue) may send these.
    pub fn is_operator_only(self) -> bool {
        matches!(
            self,
            Self::OrganisationUpsert | Self::RelationSet | Self::RelationUnset
        )
    }

    /// The XML root element name: the type with `.` replaced by `_`.
    pub fn xml_root(self) -> String {
        self.as_str().replace('.', "_")
    }
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A NISS exactly as received, before validation. Its `Debug` never shows the digits and it has no
/// `Display` or `Serialize`; the handlers turn it into a validated `Niss` (crate `trio-pseudo`).
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct RawNiss(String);

impl RawNiss {
    /// The received text, for the NISS parser only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Builds one (tests and the demo publish these).
    pub fn new(text: impl Into<String>) -> Self {
        Self(text.into())
    }
}

impl fmt::Debug for RawNiss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RawNiss(<redacted>)")
    }
}

/// Organisation kinds that hold a broker user (CONTRACT.md §3 `organisation.upsert`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum OrgKind {
    /// Mutualité (insurer); id = 3-digit union code.
    Oa,
    /// External prevention service; id = 10-digit KBO/BCE number.
    Sepp,
    /// Family doctor; id = 11-digit INAMI/RIZIV number.
    Gp,
    /// RP re-employment partner; id = 10-digit KBO/BCE number.
    Rp,
}

impl OrgKind {
    /// The wire code (`oa`, `sepp`, `gp`, `rp`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Oa => "oa",
            Self::Sepp => "sepp",
            Self::Gp => "gp",
            Self::Rp => "rp",
        }
    }

    /// Parses a wire code.
    pub fn parse(code: &str) -> Option<Self> {
        match code {
            "oa" => Some(Self::Oa),
            "sepp" => Some(Self::Sepp),
            "gp" => Some(Self::Gp),
            "rp" => Some(Self::Rp),
            _ => None,
        }
    }
}

/// The format an organisation receives its outbound messages in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// `application/json`.
    #[default]
    Json,
    /// `application/xml`.
    Xml,
}

impl Format {
    /// The wire code (`json`, `xml`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Json => "json",
            Self::Xml => "xml",
        }
    }

    /// The AMQP `content_type` of this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Json => "application/json",
            Self::Xml => "application/xml",
        }
    }
}

/// `organisation.upsert`: registers or updates an organisation and its broker user.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct OrganisationUpsert {
    /// OA union code, KBO/BCE number or INAMI number (by kind).
    pub id: String,
    /// Kind of organisation.
    pub kind: OrgKind,
    /// Display name.
    pub name: String,
    /// The RabbitMQ user this organisation publishes as.
    pub broker_user: String,
    /// Format of the outbound messages it receives.
    pub format: Format,
}

/// One relation (access fact) of `relation.set` / `relation.unset`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Relation {
    /// The insured is affiliated with this OA.
    InsuredOa {
        /// The insured.
        niss: RawNiss,
        /// OA union code.
        oa: String,
    },
    /// The insured works for this employer.
    InsuredEmployer {
        /// The insured.
        niss: RawNiss,
        /// Employer KBO/BCE number.
        employer: String,
    },
    /// The employer is affiliated with this SEPP.
    EmployerSepp {
        /// Employer KBO/BCE number.
        employer: String,
        /// SEPP KBO/BCE number.
        sepp: String,
    },
    /// Therapeutic link between the insured and this GP.
    InsuredGp {
        /// The insured.
        niss: RawNiss,
        /// GP INAMI number.
        gp: String,
    },
    /// The insured is registered with this RP partner.
    InsuredRp {
        /// The insured.
        niss: RawNiss,
        /// RP partner KBO/BCE number.
        rp: String,
    },
    /// The National Register reports the insured's death (a fact: never expires).
    InsuredDeceased {
        /// The insured.
        niss: RawNiss,
        /// Date of death.
        #[serde(with = "iso_date")]
        died_on: Date,
    },
    /// NISS mutation: everything of the old NISS moves to the new one (a fact: never expires).
    NissReplaced {
        /// The NISS that is replaced.
        old_niss: RawNiss,
        /// The NISS that replaces it.
        new_niss: RawNiss,
    },
}

impl Relation {
    /// The wire code of the relation kind.
    pub fn kind_str(&self) -> &'static str {
        match self {
            Self::InsuredOa { .. } => "insured_oa",
            Self::InsuredEmployer { .. } => "insured_employer",
            Self::EmployerSepp { .. } => "employer_sepp",
            Self::InsuredGp { .. } => "insured_gp",
            Self::InsuredRp { .. } => "insured_rp",
            Self::InsuredDeceased { .. } => "insured_deceased",
            Self::NissReplaced { .. } => "niss_replaced",
        }
    }

    /// Facts (`insured_deceased`, `niss_replaced`) never expire and take no `valid_until`.
    pub fn is_fact(&self) -> bool {
        matches!(
            self,
            Self::InsuredDeceased { .. } | Self::NissReplaced { .. }
        )
    }
}

/// `relation.set`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RelationSet {
    /// The relation.
    pub relation: Relation,
    /// End of validity; absent = 24 hours from now; in the past = already ended.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub valid_until: Option<OffsetDateTime>,
}

/// `relation.unset`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RelationUnset {
    /// The relation to end.
    pub relation: Relation,
}

/// `dossier.open`: search an insured by NISS, creating the dossier if none exists.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct DossierOpen {
    /// The insured.
    pub niss: RawNiss,
}

/// Trajet types (DOMAIN.md §4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrajetType {
    /// Trajet RTW/AMI (OA).
    RtwAmi,
    /// Réintégration CODEX (SEPP).
    ReintegrationCodex,
    /// Force majeure médicale (SEPP).
    ForceMajeureMedicale,
    /// Visite pré-reprise (SEPP).
    VisitePreReprise,
}

impl TrajetType {
    /// The wire code.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RtwAmi => "rtw_ami",
            Self::ReintegrationCodex => "reintegration_codex",
            Self::ForceMajeureMedicale => "force_majeure_medicale",
            Self::VisitePreReprise => "visite_pre_reprise",
        }
    }

    /// Parses a wire code.
    pub fn parse(code: &str) -> Option<Self> {
        match code {
            "rtw_ami" => Some(Self::RtwAmi),
            "reintegration_codex" => Some(Self::ReintegrationCodex),
            "force_majeure_medicale" => Some(Self::ForceMajeureMedicale),
            "visite_pre_reprise" => Some(Self::VisitePreReprise),
            _ => None,
        }
    }
}

/// Consent recorded on a trajet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Consent {
    /// Consent given.
    Given,
    /// Consent withdrawn.
    Withdrawn,
    /// The regulation requires none.
    NotRequired,
}

impl Consent {
    /// The wire code.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Given => "given",
            Self::Withdrawn => "withdrawn",
            Self::NotRequired => "not_required",
        }
    }

    /// Parses a wire code.
    pub fn parse(code: &str) -> Option<Self> {
        match code {
            "given" => Some(Self::Given),
            "withdrawn" => Some(Self::Withdrawn),
            "not_required" => Some(Self::NotRequired),
            _ => None,
        }
    }
}

/// The trajet of a `trajet.upsert`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Trajet {
    /// The sender's own reference (1–64 printable characters).
    #[serde(rename = "ref")]
    pub reference: String,
    /// Trajet type; it never changes once created.
    #[serde(rename = "type")]
    pub trajet_type: TrajetType,
    /// Status code, checked against the type by the handler (`status_not_allowed`).
    pub status: String,
    /// Increases with every change the sender makes (1 … 2^53−1).
    pub version: i64,
    /// Date the request to open was received.
    #[serde(default, with = "iso_date::option")]
    pub request_received_on: Option<Date>,
    /// Start date.
    #[serde(default, with = "iso_date::option")]
    pub start_on: Option<Date>,
    /// End date.
    #[serde(default, with = "iso_date::option")]
    pub end_on: Option<Date>,
    /// Consent, where given with the upsert.
    #[serde(default)]
    pub consent: Option<Consent>,
}

/// `trajet.upsert`: creates or updates a trajet owned by the sender.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TrajetUpsert {
    /// The insured.
    pub niss: RawNiss,
    /// The trajet.
    pub trajet: Trajet,
}

/// A decoded inbound message of a type this version implements.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// `organisation.upsert`.
    OrganisationUpsert(OrganisationUpsert),
    /// `relation.set`.
    RelationSet(RelationSet),
    /// `relation.unset`.
    RelationUnset(RelationUnset),
    /// `dossier.open`.
    DossierOpen(DossierOpen),
    /// `trajet.upsert`.
    TrajetUpsert(TrajetUpsert),
}

impl Message {
    /// The wire type of this message.
    pub fn message_type(&self) -> MessageType {
        match self {
            Self::OrganisationUpsert(_) => MessageType::OrganisationUpsert,
            Self::RelationSet(_) => MessageType::RelationSet,
            Self::RelationUnset(_) => MessageType::RelationUnset,
            Self::DossierOpen(_) => MessageType::DossierOpen,
            Self::TrajetUpsert(_) => MessageType::TrajetUpsert,
        }
    }
}

/// `YYYY-MM-DD` dates. `time`'s own serde form of [`Date`] (without its `serde-human-readable`
/// feature) is a `(year, ordinal)` tuple, not the ISO text of the contract; the contract's range
/// (1900–2199) is checked by the decoder's validation, not here.
mod iso_date {
    use serde::{Deserialize, Deserializer, de::Error};
    use time::{Date, macros::format_description};

    /// Parses exactly `YYYY-MM-DD` (four-digit year, no sign); the error never echoes the input.
    pub(crate) fn parse(text: &str) -> Option<Date> {
        let b = text.as_bytes();
        let shape_ok = b.len() == 10
            && b.iter().enumerate().all(|(i, c)| match i {
                4 | 7 => *c == b'-',
                _ => c.is_ascii_digit(),
            });
        if !shape_ok {
            return None;
        }
        Date::parse(text, format_description!("[year]-[month]-[day]")).ok()
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Date, D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).ok_or_else(|| D::Error::custom("invalid date, expected YYYY-MM-DD"))
    }

    /// The same for an optional field (`null` or absent = `None`).
    pub(crate) mod option {
        use serde::{Deserialize, Deserializer, de::Error};
        use time::Date;

        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<Date>, D::Error> {
            match Option::<String>::deserialize(d)? {
                None => Ok(None),
                Some(text) => super::parse(&text)
                    .map(Some)
                    .ok_or_else(|| D::Error::custom("invalid date, expected YYYY-MM-DD")),
            }
        }
    }
}
