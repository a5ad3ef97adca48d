//! The local pseudonymisation domain (CONTRACT.md §7): the gateway's own analogue of an eHealth
//! domain — its secret scalar k, its transit keys, audience and in-transit lifetime.

use crate::curve;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use p521::Scalar;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::Path;
use std::time::Duration;

/// Why a domain file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    /// The file cannot be read.
    #[error("cannot read the domain file: {0}")]
    Io(#[from] std::io::Error),
    /// Not the expected JSON.
    #[error("domain file: {0}")]
    Format(String),
}

#[derive(Serialize, Deserialize)]
struct SecretKeyJson {
    kid: String,
    active: bool,
    k: String,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DomainJson {
    domain: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    crv: Option<String>,
    audience: String,
    buffer_size: usize,
    time_to_live_in_transit: String,
    k: String,
    secret_keys: Vec<SecretKeyJson>,
}

/// A loaded domain. `Debug` never shows k or the secret keys.
#[derive(Clone)]
pub struct PseudoDomain {
    domain: String,
    audience: String,
    buffer_size: usize,
    ttl: Duration,
    ttl_text: String,
    pub(crate) k: Scalar,
    pub(crate) keys: Vec<(String, bool, [u8; 32])>,
}

impl fmt::Debug for PseudoDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PseudoDomain")
            .field("domain", &self.domain)
            .field("audience", &self.audience)
            .field("ttl", &self.ttl)
            .field("k", &"<redacted>")
            .field(
                "secret_keys",
                &self.keys.iter().map(|k| &k.0).collect::<Vec<_>>(),
            )
            .finish()
    }
}

fn format_err(why: impl Into<String>) -> DomainError {
    DomainError::Format(why.into())
}

/// Parses the ISO-8601 durations eHealth uses (`PT10M`, `PT1H30M`, `PT600S`, `P1D`).
fn parse_duration(text: &str) -> Option<Duration> {
    let rest = text.strip_prefix('P')?;
    let (days, time) = match rest.split_once('T') {
        Some((d, t)) => (d, t),
        None => (rest, ""),
    };
    let mut secs = 0u64;
    if !days.is_empty() {
        secs += days.strip_suffix('D')?.parse::<u64>().ok()? * 86_400;
    }
    let mut number = String::new();
    for c in time.chars() {
        match c {
            '0'..='9' => number.push(c),
            'H' | 'M' | 'S' => {
                let n: u64 = number.parse().ok()?;
                number.clear();
                secs += n * match c {
                    'H' => 3600,
                    'M' => 60,
                    _ => 1,
                };
            }
            _ => return None,
        }
    }
    (number.is_empty() && secs > 0).then(|| Duration::from_secs(secs))
}

impl PseudoDomain {
    /// Reads a domain file.
    ///
    /// # Errors
    /// [`DomainError`] when unreadable or invalid.
    pub fn load(path: &Path) -> Result<Self, DomainError> {
        Self::from_json(&std::fs::read_to_string(path)?)
    }

    /// Parses a domain JSON.
    ///
    /// # Errors
    /// [`DomainError::Format`] when a field is missing or out of range.
    pub fn from_json(text: &str) -> Result<Self, DomainError> {
        let j: DomainJson = serde_json::from_str(text).map_err(|e| format_err(e.to_string()))?;
        if !(8..=16).contains(&j.buffer_size) {
            return Err(format_err("bufferSize must be 8 to 16"));
        }
        let ttl = parse_duration(&j.time_to_live_in_transit)
            .ok_or_else(|| format_err("timeToLiveInTransit is not an ISO-8601 duration"))?;
        if j.domain.trim().is_empty() || j.audience.trim().is_empty() {
            return Err(format_err("domain and audience must not be empty"));
        }
        if j.crv.as_deref().is_some_and(|c| c != "P-521") {
            return Err(format_err("crv must be P-521"));
        }
        let k = curve::scalar_from_hex(&j.k)
            .ok_or_else(|| format_err("k must be a hexadecimal scalar in [1, n-1]"))?;
        let mut keys = Vec::new();
        for key in j.secret_keys {
            let bytes = URL_SAFE_NO_PAD
                .decode(key.k.trim_end_matches('='))
                .map_err(|_| format_err("a secret key is not base64url"))?;
            let bytes: [u8; 32] = bytes
                .try_into()
                .map_err(|_| format_err("a secret key must be 32 bytes"))?;
            keys.push((key.kid, key.active, bytes));
        }
        if keys.iter().any(|k| k.0.is_empty()) {
            return Err(format_err("every secret key needs a kid"));
        }
        let mut kids: Vec<&str> = keys.iter().map(|k| k.0.as_str()).collect();
        kids.sort_unstable();
        kids.dedup();
        if kids.len() != keys.len() {
            return Err(format_err("secret key kids must be unique"));
        }
        if keys.iter().filter(|k| k.1).count() != 1 {
            return Err(format_err("exactly one secret key must be active"));
        }
        Ok(Self {
            domain: j.domain,
            audience: j.audience,
            buffer_size: j.buffer_size,
            ttl,
            ttl_text: j.time_to_live_in_transit,
            k,
            keys,
        })
    }

    /// A new domain: random k in [1, n−1] and one active 32-byte key; TTL 10 minutes.
    pub fn generate(domain: &str, audience: &str) -> Self {
        let k = curve::random_scalar();
        let mut key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        Self {
            domain: domain.to_owned(),
            audience: audience.to_owned(),
            buffer_size: 8,
            ttl: Duration::from_secs(600),
            ttl_text: "PT10M".to_owned(),
            k,
            keys: vec![(uuid::Uuid::new_v4().to_string(), true, key)],
        }
    }

    /// The domain file's JSON (contains the secrets).
    pub fn to_json(&self) -> String {
        let j = DomainJson {
            domain: self.domain.clone(),
            audience: self.audience.clone(),
            buffer_size: self.buffer_size,
            time_to_live_in_transit: self.ttl_text.clone(),
            crv: None,
            k: curve::scalar_to_hex(&self.k),
            secret_keys: self
                .keys
                .iter()
                .map(|(kid, active, k)| SecretKeyJson {
                    kid: kid.clone(),
                    active: *active,
                    k: URL_SAFE_NO_PAD.encode(k),
                })
                .collect(),
        };
        serde_json::to_string_pretty(&j).unwrap_or_default()
    }

    /// Domain name.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// Audience written into (and required in) transitInfo.
    pub fn audience(&self) -> &str {
        &self.audience
    }

    /// Lifetime of in-transit pseudonyms.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Embedding buffer size.
    pub fn buffer_size(&self) -> usize {
        self.buffer_size
    }

    /// The active transit key.
    pub(crate) fn active_key(&self) -> (&str, &[u8; 32]) {
        self.keys
            .iter()
            .find(|k| k.1)
            .map(|(kid, _, key)| (kid.as_str(), key))
            .unwrap_or(("", &[0u8; 32]))
    }

    /// The key for a kid (any, active or not).
    pub(crate) fn key(&self, kid: &str) -> Option<[u8; 32]> {
        self.keys.iter().find(|k| k.0 == kid).map(|k| k.2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_save_load_round_trip_and_debug_redacts() {
        let d = PseudoDomain::generate("trio", "urn:aud");
        let back = PseudoDomain::from_json(&d.to_json()).unwrap();
        assert_eq!(back.k, d.k);
        assert_eq!(back.keys, d.keys);
        assert_eq!(back.ttl(), Duration::from_secs(600));
        let shown = format!("{d:?}");
        let k_hex = curve::scalar_to_hex(&d.k);
        assert!(!shown.contains(&k_hex[..20]));
        assert!(shown.contains("trio") && shown.contains("redacted"));
        assert!(!shown.contains(&URL_SAFE_NO_PAD.encode(d.keys[0].2)));
    }

    #[test]
    fn durations_and_validation() {
        assert_eq!(parse_duration("PT10M"), Some(Duration::from_secs(600)));
        assert_eq!(parse_duration("PT1H30M5S"), Some(Duration::from_secs(5405)));
        assert_eq!(parse_duration("P1D"), Some(Duration::from_secs(86400)));
        assert_eq!(parse_duration("10M"), None);
        let bad = PseudoDomain::generate("trio", "a")
            .to_json()
            .replace("\"active\": true", "\"active\": false");
        assert!(PseudoDomain::from_json(&bad).is_err());
    }

    const N_HEX: &str = "01fffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffa51868783bf2f966b7fcc0148f709a5d03bb5c9b8899c47aebb6fb71e91386409";

    fn file(k: &str, buffer: usize, ttl: &str, keys: &str) -> String {
        format!(
            r#"{{"domain":"trio","audience":"urn:trio","bufferSize":{buffer},
               "timeToLiveInTransit":"{ttl}","k":"{k}","secretKeys":[{keys}]}}"#
        )
    }

    const KEY: &str =
        r#"{"kid":"a","active":true,"k":"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8"}"#;
    const OLD: &str =
        r#"{"kid":"b","active":false,"k":"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="}"#;

    #[test]
    fn reads_the_contract_format() {
        let d = PseudoDomain::from_json(&file("2a", 8, "PT10M", &format!("{KEY},{OLD}"))).unwrap();
        assert_eq!(d.domain(), "trio");
        assert_eq!(d.audience(), "urn:trio");
        assert_eq!(d.ttl(), Duration::from_secs(600));
        assert_eq!(d.buffer_size(), 8);
        assert_eq!(d.k, Scalar::from(42u64));
        assert_eq!(d.active_key().0, "a");
        assert_eq!(d.key("b").unwrap()[31], 31);
        assert!(d.key("c").is_none());
        let path = std::env::temp_dir().join(format!("trio-domain-{}.json", uuid::Uuid::new_v4()));
        std::fs::write(&path, d.to_json()).unwrap();
        let back = PseudoDomain::load(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(back.k, d.k);
        assert_eq!(back.keys, d.keys);
        assert!(matches!(
            PseudoDomain::load(Path::new("/nonexistent/domain.json")),
            Err(DomainError::Io(_))
        ));
    }

    #[test]
    fn refuses_invalid_files() {
        let ok = |k: &str, b: usize, ttl: &str, keys: &str| {
            PseudoDomain::from_json(&file(k, b, ttl, keys)).is_ok()
        };
        assert!(ok("2a", 16, "PT1H", KEY));
        assert!(!ok("0", 8, "PT10M", KEY));
        assert!(!ok(N_HEX, 8, "PT10M", KEY));
        assert!(!ok("xyz", 8, "PT10M", KEY));
        assert!(!ok("2a", 7, "PT10M", KEY));
        assert!(!ok("2a", 17, "PT10M", KEY));
        assert!(!ok("2a", 8, "10 minutes", KEY));
        assert!(!ok("2a", 8, "PT0S", KEY));
        assert!(!ok("2a", 8, "PT10M", OLD));
        assert!(!ok("2a", 8, "PT10M", &format!("{KEY},{KEY}")));
        assert!(!ok("2a", 8, "PT10M", &KEY.replace("Hh8", "Hh8AA")));
        assert!(!ok("2a", 8, "PT10M", ""));
        assert!(PseudoDomain::from_json("{}").is_err());
    }
}
