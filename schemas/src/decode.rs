//! Decode step of the flow: message body + content type → typed [`Message`], with the contract's
//! limits (CONTRACT.md §3), or a [`DecodeError`] that tells the gateway whether to dead-letter the
//! message (§5) or to answer `invalid_payload` (§4).
//!
//! Both forms share one path: the body becomes a [`serde_json::Value`] (JSON parsed, with duplicate
//! keys refused; XML mapped by [`crate::xml`], with duplicate elements refused), the value is
//! deserialized into the type, then [`Validate`] checks the limits. Error details name the field
//! but never echo a value, so no NISS can leak into a reply or a log through them.
//!
//! A JSON body first tries a shortcut that accepts exactly what that path accepts, in two passes
//! instead of three and without tracking field paths: the type deserialized from the text
//! directly, and the duplicate-key check. Anything it does not accept goes down the path above,
//! which says why.

use crate::message::{
    DossierOpen, Message, MessageType, OrgKind, OrganisationUpsert, RawNiss, Relation, RelationSet,
    RelationUnset, Trajet, TrajetUpsert,
};
use crate::xml::{self, Hints};
use serde::Deserialize;
use serde::de::{self, DeserializeOwned, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use std::collections::HashSet;
use std::fmt;
use time::Date;
use time::macros::date;

/// The two accepted content types (parameters such as `; charset=utf-8` are ignored;
/// case-insensitive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentType {
    /// `application/json`.
    Json,
    /// `application/xml`.
    Xml,
}

impl ContentType {
    /// Parses an AMQP `content_type`; `None` for anything but `application/json` and
    /// `application/xml` (the gateway dead-letters those as `unreadable`).
    pub fn parse(s: &str) -> Option<Self> {
        let essence = s.split(';').next().unwrap_or_default().trim();
        if essence.eq_ignore_ascii_case("application/json") {
            Some(Self::Json)
        } else if essence.eq_ignore_ascii_case("application/xml") {
            Some(Self::Xml)
        } else {
            None
        }
    }

    /// The canonical MIME type.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Json => "application/json",
            Self::Xml => "application/xml",
        }
    }
}

/// Why a body could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not well-formed JSON/XML, or not UTF-8 → the gateway dead-letters it (`unreadable`).
    #[error("unreadable: {0}")]
    Unreadable(String),
    /// XML with a DOCTYPE or an entity declaration → dead letter (`dtd_refused`).
    #[error("DTD or entity declaration refused")]
    DtdRefused,
    /// Well-formed but not a valid payload of the type (missing/extra-typed field, a limit broken,
    /// a duplicated JSON key, wrong XML root or namespace) → reply `invalid_payload` with this
    /// detail, which names the field but never contains a NISS or the payload text.
    #[error("invalid payload: {0}")]
    Invalid(String),
}

/// Decodes an inbound body of `message_type` sent as `content_type`.
///
/// # Errors
///
/// See [`DecodeError`]: `Unreadable` and `DtdRefused` are dead letters, `Invalid` is an
/// `invalid_payload` reply. A type this version does not implement is `Invalid` (the gateway
/// dead-letters those as `unknown_type` before calling this).
pub fn decode(
    message_type: MessageType,
    content_type: ContentType,
    body: &[u8],
) -> Result<Message, DecodeError> {
    if !message_type.is_implemented() {
        return Err(DecodeError::Invalid(
            "type not supported by this gateway version".to_owned(),
        ));
    }
    if content_type == ContentType::Json
        && let Some(message) = valid_json_shortcut(message_type, body)
    {
        return Ok(message);
    }
    decode_fully(message_type, content_type, body)
}

/// The path every form shares (see the module's doc), for a type this version implements.
fn decode_fully(
    message_type: MessageType,
    content_type: ContentType,
    body: &[u8],
) -> Result<Message, DecodeError> {
    let value = match content_type {
        ContentType::Json => read_json(body)?,
        ContentType::Xml => xml::read(&message_type.xml_root(), body, &hints(message_type))?,
    };
    if !value.is_object() {
        return Err(DecodeError::Invalid("payload must be an object".to_owned()));
    }
    typed_message(message_type, FromValue(value))
}

/// The JSON shortcut (see the module's doc): `None` for anything the full path must look at.
/// A struct would also deserialize from a JSON array, field by field, so the body must open an
/// object, as the full path requires.
fn valid_json_shortcut(message_type: MessageType, body: &[u8]) -> Option<Message> {
    let text = std::str::from_utf8(body).ok()?;
    if !text
        .trim_start_matches([' ', '\t', '\n', '\r'])
        .starts_with('{')
    {
        return None;
    }
    typed_message(message_type, FromText(text)).ok()
}

/// Where [`typed_message`] deserializes the payload from.
trait PayloadSource {
    /// The payload as `T`, its limits checked.
    fn typed<T: DeserializeOwned + Validate>(self) -> Result<T, DecodeError>;
}

/// A parsed value, errors naming the field ([`typed`]).
struct FromValue(Value);

impl PayloadSource for FromValue {
    fn typed<T: DeserializeOwned + Validate>(self) -> Result<T, DecodeError> {
        typed(self.0)
    }
}

/// JSON text, with duplicated keys refused. Its errors say nothing (the shortcut discards them,
/// and serde's messages may quote the input, a NISS among it).
struct FromText<'a>(&'a str);

impl PayloadSource for FromText<'_> {
    fn typed<T: DeserializeOwned + Validate>(self) -> Result<T, DecodeError> {
        let declined = |_| DecodeError::Unreadable("left to the full path".to_owned());
        let message: T = serde_json::from_str(self.0).map_err(declined)?;
        let mut de = serde_json::Deserializer::from_str(self.0);
        NoDuplicateKeys::deserialize(&mut de).map_err(declined)?;
        message.validate().map_err(DecodeError::Invalid)?;
        Ok(message)
    }
}

/// The payload as the message of its type.
fn typed_message(
    message_type: MessageType,
    payload: impl PayloadSource,
) -> Result<Message, DecodeError> {
    Ok(match message_type {
        MessageType::OrganisationUpsert => Message::OrganisationUpsert(payload.typed()?),
        MessageType::RelationSet => Message::RelationSet(payload.typed()?),
        MessageType::RelationUnset => Message::RelationUnset(payload.typed()?),
        MessageType::DossierOpen => Message::DossierOpen(payload.typed()?),
        MessageType::TrajetUpsert => Message::TrajetUpsert(payload.typed()?),
        _ => {
            return Err(DecodeError::Invalid(
                "type not supported by this gateway version".to_owned(),
            ));
        }
    })
}

/// The non-string leaves of each type's XML form.
fn hints(message_type: MessageType) -> Hints {
    match message_type {
        MessageType::TrajetUpsert => Hints {
            integers: &["trajet/version"],
            ..Hints::default()
        },
        _ => Hints::default(),
    }
}

/// Parses a JSON body: syntax errors are `Unreadable`, duplicated keys `Invalid`.
fn read_json(body: &[u8]) -> Result<Value, DecodeError> {
    let text = std::str::from_utf8(body)
        .map_err(|e| DecodeError::Unreadable(format!("JSON body is not UTF-8: {e}")))?;
    // serde_json's syntax errors carry only a line and column, never input text.
    let value: Value = serde_json::from_str(text)
        .map_err(|e| DecodeError::Unreadable(format!("JSON not well-formed: {e}")))?;
    // `Value` keeps the last of duplicated keys silently; a second pass refuses them.
    let mut de = serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize::<_, NoDuplicateKeys>(&mut de).map_err(|e| {
        DecodeError::Invalid(describe(&e.path().to_string(), &e.inner().to_string()))
    })?;
    Ok(value)
}

/// Deserializes anything, failing on an object with a duplicated key at any depth.
struct NoDuplicateKeys;

impl<'de> Deserialize<'de> for NoDuplicateKeys {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(NoDuplicateKeys)
    }
}

impl<'de> Visitor<'de> for NoDuplicateKeys {
    type Value = NoDuplicateKeys;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_unit<E>(self) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_none<E>(self) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self, D::Error> {
        NoDuplicateKeys::deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self, A::Error> {
        while seq.next_element::<NoDuplicateKeys>()?.is_some() {}
        Ok(self)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self, A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(de::Error::custom(format!("duplicated key `{key}`")));
            }
            map.next_value::<NoDuplicateKeys>()?;
        }
        Ok(self)
    }
}

/// Deserializes `value` into `T` and checks its limits.
fn typed<T: DeserializeOwned + Validate>(value: Value) -> Result<T, DecodeError> {
    let message: T = serde_path_to_error::deserialize(value).map_err(|e| {
        DecodeError::Invalid(describe(&e.path().to_string(), &e.inner().to_string()))
    })?;
    message.validate().map_err(DecodeError::Invalid)?;
    Ok(message)
}

/// An `invalid_payload` detail from a serde error: the field path plus the message with every
/// quoted value and every long digit run removed (serde quotes the offending input, e.g.
/// ``invalid type: integer `85073003370` ``).
fn describe(path: &str, message: &str) -> String {
    let message = sanitise(message);
    if path.is_empty() || path == "." {
        message
    } else {
        format!("field `{path}`: {message}")
    }
}

/// Removes what may be input text from a serde message: `"…"`-quoted text always, `` `…` ``-quoted
/// text unless it looks like a field or variant name, and any run of 4 or more digits.
fn sanitise(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(i) = rest.find(['"', '`']) {
        out.push_str(&rest[..i]);
        let quote = &rest[i..i + 1];
        let after = &rest[i + 1..];
        let Some(j) = after.find(quote) else {
            // An unbalanced quote: drop the rest, it may be input.
            out.push_str(quote);
            out.push('…');
            rest = "";
            break;
        };
        let inner = &after[..j];
        let name_like = !inner.is_empty()
            && inner
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == '_' || c == '.');
        out.push_str(quote);
        out.push_str(if quote == "`" && name_like {
            inner
        } else {
            "…"
        });
        out.push_str(quote);
        rest = &after[j + 1..];
    }
    out.push_str(rest);
    // Last resort for unquoted numbers.
    let mut clean = String::with_capacity(out.len());
    let mut digits = String::new();
    for c in out.chars().chain(std::iter::once('\0')) {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        if digits.len() >= 4 {
            clean.push('…');
        } else {
            clean.push_str(&digits);
        }
        digits.clear();
        if c != '\0' {
            clean.push(c);
        }
    }
    clean.chars().take(300).collect()
}

/// The contract's limits (CONTRACT.md §2, §3) on a deserialized message; the `Err` is the
/// `invalid_payload` detail. One implementation per type, shared by the JSON and XML forms.
pub trait Validate {
    /// Checks every limit of the message.
    ///
    /// # Errors
    ///
    /// A short detail naming the first field that breaks a limit (never its value).
    fn validate(&self) -> Result<(), String>;
}

/// Largest `version`: 2^53 − 1, the largest integer every JSON implementation keeps exactly.
pub const MAX_VERSION: i64 = (1 << 53) - 1;
/// Earliest accepted date.
pub const MIN_DATE: Date = date!(1900 - 01 - 01);
/// Latest accepted date.
pub const MAX_DATE: Date = date!(2199 - 12 - 31);
/// Longest accepted NISS text (the handlers check its form; this only bounds it).
pub const MAX_NISS_CHARS: usize = 32;
/// Longest id or reference.
pub const MAX_ID_CHARS: usize = 64;
/// Longest name.
pub const MAX_NAME_CHARS: usize = 200;

/// Ids and refs: 1–64 printable characters.
fn check_id(field: &str, s: &str) -> Result<(), String> {
    let n = s.chars().count();
    if n == 0 || n > MAX_ID_CHARS {
        return Err(format!("`{field}` must be 1 to {MAX_ID_CHARS} characters"));
    }
    if s.chars().any(char::is_control) {
        return Err(format!("`{field}` must be printable characters"));
    }
    Ok(())
}

/// Names: non-blank, at most 200 characters.
fn check_name(field: &str, s: &str) -> Result<(), String> {
    if s.trim().is_empty() || s.chars().count() > MAX_NAME_CHARS {
        return Err(format!(
            "`{field}` must be 1 to {MAX_NAME_CHARS} characters"
        ));
    }
    Ok(())
}

/// A NISS is checked by the handlers (`invalid_niss`); here only its length is bounded.
fn check_niss(field: &str, niss: &RawNiss) -> Result<(), String> {
    if niss.expose().chars().count() > MAX_NISS_CHARS {
        return Err(format!(
            "`{field}` must be at most {MAX_NISS_CHARS} characters"
        ));
    }
    Ok(())
}

/// Dates between 1900-01-01 and 2199-12-31.
fn check_date(field: &str, d: Date) -> Result<(), String> {
    if d < MIN_DATE || d > MAX_DATE {
        return Err(format!(
            "`{field}` must be between 1900-01-01 and 2199-12-31"
        ));
    }
    Ok(())
}

/// An organisation id of the given kind: OA 3 digits; SEPP, RP and employer 10 (KBO/BCE); GP 11
/// (INAMI/RIZIV).
fn check_org_id(field: &str, id: &str, digits: usize) -> Result<(), String> {
    if id.len() != digits || !id.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("`{field}` must be {digits} digits"));
    }
    Ok(())
}

/// The number of digits of an organisation id of `kind`.
fn org_id_digits(kind: OrgKind) -> usize {
    match kind {
        OrgKind::Oa => 3,
        OrgKind::Sepp | OrgKind::Rp => 10,
        OrgKind::Gp => 11,
    }
}

/// Digits of an employer id (KBO/BCE).
const EMPLOYER_DIGITS: usize = 10;

impl Validate for OrganisationUpsert {
    fn validate(&self) -> Result<(), String> {
        check_id("id", &self.id)?;
        check_org_id("id", &self.id, org_id_digits(self.kind))?;
        check_name("name", &self.name)?;
        check_id("broker_user", &self.broker_user)
    }
}

impl Validate for Relation {
    fn validate(&self) -> Result<(), String> {
        let id = |field: &str, value: &str, kind: OrgKind| {
            check_org_id(&format!("relation.{field}"), value, org_id_digits(kind))
        };
        let employer = |value: &str| check_org_id("relation.employer", value, EMPLOYER_DIGITS);
        let niss = |field: &str, value: &RawNiss| check_niss(&format!("relation.{field}"), value);
        match self {
            Relation::InsuredOa { niss: n, oa } => {
                niss("niss", n)?;
                id("oa", oa, OrgKind::Oa)
            }
            Relation::InsuredEmployer {
                niss: n,
                employer: e,
            } => {
                niss("niss", n)?;
                employer(e)
            }
            Relation::EmployerSepp { employer: e, sepp } => {
                employer(e)?;
                id("sepp", sepp, OrgKind::Sepp)
            }
            Relation::InsuredGp { niss: n, gp } => {
                niss("niss", n)?;
                id("gp", gp, OrgKind::Gp)
            }
            Relation::InsuredRp { niss: n, rp } => {
                niss("niss", n)?;
                id("rp", rp, OrgKind::Rp)
            }
            Relation::InsuredDeceased { niss: n, died_on } => {
                niss("niss", n)?;
                check_date("relation.died_on", *died_on)
            }
            Relation::NissReplaced { old_niss, new_niss } => {
                niss("old_niss", old_niss)?;
                niss("new_niss", new_niss)
            }
        }
    }
}

impl Validate for RelationSet {
    fn validate(&self) -> Result<(), String> {
        self.relation.validate()?;
        if self.valid_until.is_some() && self.relation.is_fact() {
            return Err(format!(
                "`valid_until` is not allowed with relation `{}`",
                self.relation.kind_str()
            ));
        }
        Ok(())
    }
}

impl Validate for RelationUnset {
    fn validate(&self) -> Result<(), String> {
        self.relation.validate()
    }
}

impl Validate for DossierOpen {
    fn validate(&self) -> Result<(), String> {
        check_niss("niss", &self.niss)
    }
}

impl Validate for Trajet {
    fn validate(&self) -> Result<(), String> {
        check_id("trajet.ref", &self.reference)?;
        if !(1..=MAX_VERSION).contains(&self.version) {
            return Err("`trajet.version` must be an integer from 1 to 2^53-1".to_owned());
        }
        for (field, d) in [
            ("trajet.request_received_on", self.request_received_on),
            ("trajet.start_on", self.start_on),
            ("trajet.end_on", self.end_on),
        ] {
            if let Some(d) = d {
                check_date(field, d)?;
            }
        }
        Ok(())
    }
}

impl Validate for TrajetUpsert {
    fn validate(&self) -> Result<(), String> {
        check_niss("niss", &self.niss)?;
        self.trajet.validate()
    }
}

#[cfg(test)]
mod tests;
