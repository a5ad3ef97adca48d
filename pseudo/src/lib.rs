//! # NISS and pseudonymisation for the TRIO gateway
//!
//! The eHealth *Blinded Pseudo* scheme (`shared/PSEUDONYMISATION.md`) on P-521, with the
//! gateway's own domain key (the local backend); the eHealth remote backend will implement the
//! same [`Pseudonymiser`] trait.
//!
//! - [`niss`]: [`Niss`], parsed once (modulo 97, BIS), never printable;
//! - [`curve`]: embedding, principal-root Y recovery, coordinate and SEC1 encodings;
//! - [`transit_info`]: the JWE that carries an in-transit pseudonym's scalar;
//! - [`domain`]: the local domain file ([`PseudoDomain`]);
//! - [`local`]: [`LocalPseudonymiser`], with its caches (no P-521 work for a NISS already seen).

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod curve;
pub mod domain;
pub mod local;
pub mod niss;
pub mod transit_info;

pub use domain::{DomainError, PseudoDomain};
pub use local::{CacheConfig, LocalPseudonymiser};
pub use niss::{Niss, NissError};

use futures::future::BoxFuture;

/// At-rest pseudonym: the 88-character standard base64 of I2OSP66(X(k·embed(NISS))) (§5, §11 a).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct AtRest(String);

impl AtRest {
    /// The 88-character form.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The 88-character form, owned.
    pub fn into_string(self) -> String {
        self.0
    }

    /// Reads a stored pseudonym (no curve check; that happens when it is used).
    ///
    /// # Errors
    /// [`PseudoError::InvalidPoint`] when it is not 88 characters of standard base64 for 66 bytes.
    pub fn from_stored(s: String) -> Result<AtRest, PseudoError> {
        match curve::decode_b64(&s) {
            Some(bytes)
                if s.len() == 88
                    && bytes.len() == curve::COORD_BYTES
                    && !s.contains(['-', '_']) =>
            {
                Ok(AtRest(s))
            }
            _ => Err(PseudoError::InvalidPoint("not an at-rest pseudonym".into())),
        }
    }

    pub(crate) fn from_x(x: &[u8; curve::COORD_BYTES]) -> AtRest {
        AtRest(curve::encode_coordinate(x))
    }
}

/// In-transit pseudonym `b64url(SEC1 uncompressed P_t) ":" transitInfo` (§6).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct InTransit(String);

impl InTransit {
    /// The string form.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The string form, owned.
    pub fn into_string(self) -> String {
        self.0
    }
}

/// RP's blinded `pseudonymize` input (§8, §11 b).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct BlindedInput {
    /// Request id.
    pub id: String,
    /// Curve, `P-521`.
    pub crv: String,
    /// Blinded point X (base64).
    pub x: String,
    /// Blinded point Y (base64).
    pub y: String,
}

/// The eHealth-shaped answer to a blinded `pseudonymize`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BlindedOutput {
    /// New id.
    pub id: String,
    /// Domain name.
    pub domain: String,
    /// `P-521`.
    pub crv: String,
    /// Issued at.
    pub iat: i64,
    /// Expires at.
    pub exp: i64,
    /// Result X (base64, 88 characters).
    pub x: String,
    /// Result Y (base64, 88 characters).
    pub y: String,
    /// The transitInfo carrying s.
    #[serde(rename = "transitInfo")]
    pub transit_info: String,
}

/// Pseudonymisation failures. Messages never contain a NISS.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PseudoError {
    /// A point that is malformed, off the curve or the identity.
    #[error("invalid point: {0}")]
    InvalidPoint(String),
    /// A transitInfo that cannot be read or is not ours.
    #[error("invalid transitInfo: {0}")]
    InvalidTransitInfo(String),
    /// Outside its validity (±60 s).
    #[error("transitInfo expired")]
    Expired,
    /// The kid is not one of the domain's keys.
    #[error("unknown kid {0}")]
    UnknownKid(String),
    /// A value over 32 bytes.
    #[error("value too long to embed")]
    ValueTooLong,
    /// Anything else.
    #[error("pseudonymisation: {0}")]
    Internal(String),
}

/// Backend-neutral pseudonymisation (local now; the eHealth remote backend later).
pub trait Pseudonymiser: Send + Sync + 'static {
    /// At-rest pseudonyms of these NISS, in order; cached.
    fn at_rest<'a>(&'a self, niss: &'a [Niss]) -> BoxFuture<'a, Result<Vec<AtRest>, PseudoError>>;
    /// In-transit forms, in order; each reused until 30 s before its exp (§10).
    fn in_transit<'a>(
        &'a self,
        pseudonyms: &'a [AtRest],
    ) -> BoxFuture<'a, Result<Vec<InTransit>, PseudoError>>;
    /// §11 b: answer RP's blinded pseudonymize as eHealth would.
    fn pseudonymize_blinded<'a>(
        &'a self,
        input: &'a BlindedInput,
    ) -> BoxFuture<'a, Result<BlindedOutput, PseudoError>>;
    /// Reads an in-transit string of this domain back to its at-rest pseudonym.
    fn at_rest_of_in_transit<'a>(
        &'a self,
        in_transit: &'a str,
    ) -> BoxFuture<'a, Result<AtRest, PseudoError>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_rest_strings_are_checked_when_read_back() {
        let x = [7u8; curve::COORD_BYTES];
        let a = AtRest::from_x(&x);
        assert_eq!(a.as_str().len(), 88);
        assert_eq!(AtRest::from_stored(a.as_str().to_owned()).unwrap(), a);
        assert!(AtRest::from_stored("AAAA".into()).is_err());
        assert!(AtRest::from_stored(format!("{}=", &a.as_str()[..87])).is_err());
        assert!(AtRest::from_stored("!".repeat(88)).is_err());
        assert!(AtRest::from_stored("_".repeat(88)).is_err());
        assert_eq!(a.clone().into_string(), a.as_str());
    }

    #[test]
    fn errors_say_what_without_values() {
        assert_eq!(PseudoError::Expired.to_string(), "transitInfo expired");
        assert_eq!(
            PseudoError::UnknownKid("k1".into()).to_string(),
            "unknown kid k1"
        );
    }
}
