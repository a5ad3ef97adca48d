//! transitInfo (PSEUDONYMISATION.md §7): a compact JWE, `alg` `dir`, `enc` `A256GCM`, carrying
//! the scalar s of an in-transit pseudonym under the domain's secret key.

use crate::PseudoError;
use crate::curve::decode_b64;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use serde_json::json;

/// Allowed clock skew when reading (eHealth: one minute).
pub const SKEW_SECONDS: i64 = 60;

/// The protected header fields we read.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Header {
    /// Must be `dir`.
    pub alg: String,
    /// Content encryption (`A256GCM`).
    pub enc: String,
    /// Secret key id.
    #[serde(default)]
    pub kid: Option<String>,
    /// The domain's audience.
    #[serde(default)]
    pub aud: Option<String>,
    /// Issued at (epoch seconds).
    #[serde(default)]
    pub iat: Option<i64>,
    /// Expires at (epoch seconds).
    #[serde(default)]
    pub exp: Option<i64>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    iat: i64,
    exp: i64,
    scalar: String,
}

/// The decrypted content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Content {
    /// Issued at.
    pub iat: i64,
    /// Expires at.
    pub exp: i64,
    /// s, as big-endian two's-complement bytes (Java `BigInteger.toByteArray`).
    pub scalar: Vec<u8>,
}

/// Builds a transitInfo for `scalar` (already in two's-complement bytes).
///
/// # Errors
/// Only if encryption fails (never with a 32-byte key).
pub fn create(
    audience: &str,
    kid: &str,
    key: &[u8; 32],
    scalar: &[u8],
    iat: i64,
    exp: i64,
) -> Result<String, PseudoError> {
    let header = json!({"alg": "dir", "enc": "A256GCM", "kid": kid, "aud": audience, "iat": iat, "exp": exp});
    let header_b64 = URL_SAFE_NO_PAD.encode(header.to_string());
    let claims = Claims {
        iat,
        exp,
        scalar: STANDARD.encode(scalar),
    };
    let plaintext =
        serde_json::to_vec(&claims).map_err(|e| PseudoError::Internal(e.to_string()))?;
    let mut iv = [0u8; 12];
    rand::rngs::OsRng.fill_bytes(&mut iv);
    let cipher = Aes256Gcm::new(key.into());
    let sealed = cipher
        .encrypt(
            &Nonce::from(iv),
            Payload {
                msg: &plaintext,
                aad: header_b64.as_bytes(),
            },
        )
        .map_err(|_| PseudoError::Internal("transitInfo encryption".into()))?;
    let (ciphertext, tag) = sealed.split_at(sealed.len() - 16);
    Ok(format!(
        "{header_b64}..{}.{}.{}",
        URL_SAFE_NO_PAD.encode(iv),
        URL_SAFE_NO_PAD.encode(ciphertext),
        URL_SAFE_NO_PAD.encode(tag)
    ))
}

/// Reads the protected header only (no key needed).
///
/// # Errors
/// [`PseudoError::InvalidTransitInfo`] when it is not a compact JWE with a JSON header.
pub fn header(token: &str) -> Result<Header, PseudoError> {
    let first = token
        .split('.')
        .next()
        .ok_or_else(|| invalid("not a compact JWE"))?;
    let bytes = decode_b64(first).ok_or_else(|| invalid("header is not base64url"))?;
    serde_json::from_slice(&bytes).map_err(|_| invalid("header is not JSON"))
}

fn invalid(why: &str) -> PseudoError {
    PseudoError::InvalidTransitInfo(why.to_owned())
}

/// Checks a protected header (§7 reading steps 1–2, and the JS helper's time check): `alg` `dir`,
/// `enc` `A256GCM`, `aud` equal to ours, and, when `now` is given and the header carries them,
/// iat/exp within ±60 s.
///
/// # Errors
/// [`PseudoError::InvalidTransitInfo`] or [`PseudoError::Expired`].
pub fn validate_header(h: &Header, audience: &str, now: Option<i64>) -> Result<(), PseudoError> {
    if h.alg != "dir" || h.enc.is_empty() {
        return Err(invalid("alg must be dir with an enc"));
    }
    if h.enc != "A256GCM" {
        return Err(invalid("unsupported enc"));
    }
    let aud = h.aud.as_deref().unwrap_or("");
    if aud.trim().is_empty() || aud != audience {
        return Err(invalid("audience of another domain"));
    }
    if let Some(now) = now
        && (h.iat.is_some_and(|iat| iat > now + SKEW_SECONDS)
            || h.exp.is_some_and(|exp| exp < now - SKEW_SECONDS))
    {
        return Err(PseudoError::Expired);
    }
    Ok(())
}

/// Reads and decrypts a transitInfo: checks `alg`, `enc`, `aud`, the kid, the tag, and (when
/// `now` is given) iat/exp within ±60 s.
///
/// # Errors
/// [`PseudoError::InvalidTransitInfo`], [`PseudoError::UnknownKid`] or [`PseudoError::Expired`].
pub fn read(
    token: &str,
    audience: &str,
    key_for: impl Fn(&str) -> Option<[u8; 32]>,
    now: Option<i64>,
) -> Result<Content, PseudoError> {
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 5 || !parts[1].is_empty() {
        return Err(invalid("not a dir compact JWE"));
    }
    let h = header(token)?;
    validate_header(&h, audience, now)?;
    let kid = h.kid.as_deref().unwrap_or("");
    let key = key_for(kid).ok_or_else(|| PseudoError::UnknownKid(kid.to_owned()))?;
    let iv = decode_b64(parts[2]).ok_or_else(|| invalid("iv"))?;
    let mut sealed = decode_b64(parts[3]).ok_or_else(|| invalid("ciphertext"))?;
    let tag = decode_b64(parts[4]).ok_or_else(|| invalid("tag"))?;
    if tag.len() != 16 {
        return Err(invalid("tag length"));
    }
    sealed.extend(tag);
    let iv: [u8; 12] = iv.try_into().map_err(|_| invalid("iv length"))?;
    let plaintext = Aes256Gcm::new((&key).into())
        .decrypt(
            &Nonce::from(iv),
            Payload {
                msg: &sealed,
                aad: parts[0].as_bytes(),
            },
        )
        .map_err(|_| invalid("decryption failed"))?;
    let claims: Claims = serde_json::from_slice(&plaintext).map_err(|_| invalid("payload"))?;
    if let Some(now) = now
        && (claims.iat > now + SKEW_SECONDS || claims.exp < now - SKEW_SECONDS)
    {
        return Err(PseudoError::Expired);
    }
    let scalar = decode_b64(&claims.scalar).ok_or_else(|| invalid("scalar"))?;
    if scalar.is_empty() || scalar[0] & 0x80 != 0 {
        return Err(invalid("scalar must be positive"));
    }
    Ok(Content {
        iat: claims.iat,
        exp: claims.exp,
        scalar,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_checks() {
        let key = [7u8; 32];
        let t = create("aud-a", "k1", &key, &[0, 0x90, 1], 1000, 1600).unwrap();
        let keys = |kid: &str| (kid == "k1").then_some(key);
        let c = read(&t, "aud-a", keys, Some(1200)).unwrap();
        assert_eq!(c.scalar, vec![0, 0x90, 1]);
        assert!(matches!(
            read(&t, "aud-b", keys, Some(1200)),
            Err(PseudoError::InvalidTransitInfo(_))
        ));
        assert!(matches!(
            read(&t, "aud-a", |_| None, Some(1200)),
            Err(PseudoError::UnknownKid(_))
        ));
        assert!(matches!(
            read(&t, "aud-a", keys, Some(1661)),
            Err(PseudoError::Expired)
        ));
        assert!(read(&t, "aud-a", keys, Some(1659)).is_ok());
        assert!(matches!(
            read(&t, "aud-a", keys, Some(939)),
            Err(PseudoError::Expired)
        ));
        // One character of the tag changed (to another one: the nonce is random, so the
        // character at that place is sometimes already an `A`).
        let mut tampered = t.clone();
        let at = t.len() - 3;
        let other = if &t[at..=at] == "A" { "B" } else { "A" };
        tampered.replace_range(at..=at, other);
        assert_ne!(tampered, t);
        assert!(read(&tampered, "aud-a", keys, Some(1200)).is_err());
    }

    #[test]
    fn reads_the_headers_of_the_ehealth_samples() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/vectors/ehealth_pseudo_vectors.json"
        );
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let row = v["vectors"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["id"] == "transit_info/header/ehealth_v1_acpt")
            .unwrap();
        let h = header(row["input"]["transitInfo"].as_str().unwrap()).unwrap();
        assert_eq!(h.alg, "dir");
        assert_eq!(h.enc, "A256GCM");
        assert_eq!(
            h.kid.as_deref(),
            Some("b54ce3e4-e7c5-455f-808e-69a03a37a85f")
        );
        assert_eq!(h.iat, Some(1_718_202_688));
        assert_eq!(h.exp, Some(1_718_203_288));
        assert_eq!(h.aud.as_deref(), row["expected"]["aud"].as_str());
        // a foreign domain's transitInfo is refused (audience, then kid)
        let t = row["input"]["transitInfo"].as_str().unwrap();
        assert!(read(t, "urn:other", |_| Some([0; 32]), None).is_err());
    }

    #[test]
    fn validates_the_js_sample_header_like_the_js_helper() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/vectors/ehealth_pseudo_vectors.json"
        );
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let row = v["vectors"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["id"] == "transit_info/header/uhmep_v1_acpt_js")
            .unwrap();
        let h = header(row["input"]["transitInfo"].as_str().unwrap()).unwrap();
        let e = &row["expected"]["parsed_header"];
        assert_eq!(h.kid.as_deref(), e["kid"].as_str());
        assert_eq!(h.iat, e["iat"].as_i64());
        assert_eq!(h.exp, e["exp"].as_i64());
        let aud = row["domain"]["audience"].as_str().unwrap();
        let now = row["input"]["currentTime_epoch_s"].as_i64().unwrap();
        assert!(validate_header(&h, aud, Some(now)).is_ok());
        assert!(matches!(
            validate_header(&h, "urn:other", Some(now)),
            Err(PseudoError::InvalidTransitInfo(_))
        ));
        let exp = h.exp.unwrap();
        assert!(validate_header(&h, aud, Some(exp + 60)).is_ok());
        assert!(matches!(
            validate_header(&h, aud, Some(exp + 61)),
            Err(PseudoError::Expired)
        ));
        let iat = h.iat.unwrap();
        assert!(validate_header(&h, aud, Some(iat - 60)).is_ok());
        assert!(matches!(
            validate_header(&h, aud, Some(iat - 61)),
            Err(PseudoError::Expired)
        ));
        // the older sample has no iat/exp in its header: only the payload can be checked
        let raw = v["vectors"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["id"] == "transit_info/raw/kid_2022-12_int")
            .unwrap();
        let h = header(raw["input"]["transitInfo"].as_str().unwrap()).unwrap();
        assert_eq!((h.iat, h.exp), (None, None));
        assert_eq!(h.kid.as_deref(), Some("2022-12"));
    }

    #[test]
    fn the_scalar_is_standard_base64_and_url_safe_is_accepted() {
        let key = [9u8; 32];
        let keys = |_: &str| Some(key);
        let scalar = [0u8, 0xfb, 0xff, 0xfe];
        let t = create("a", "k", &key, &scalar, 100, 700).unwrap();
        let parts: Vec<&str> = t.split('.').collect();
        assert_eq!(parts.len(), 5);
        assert!(parts[1].is_empty());
        let h: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
        for f in ["alg", "enc", "kid", "aud", "iat", "exp"] {
            assert!(h.get(f).is_some(), "{f}");
        }
        let plain = Aes256Gcm::new((&key).into())
            .decrypt(
                &Nonce::from(
                    <[u8; 12]>::try_from(URL_SAFE_NO_PAD.decode(parts[2]).unwrap()).unwrap(),
                ),
                Payload {
                    msg: &[
                        URL_SAFE_NO_PAD.decode(parts[3]).unwrap(),
                        URL_SAFE_NO_PAD.decode(parts[4]).unwrap(),
                    ]
                    .concat(),
                    aad: parts[0].as_bytes(),
                },
            )
            .unwrap();
        let claims: serde_json::Value = serde_json::from_slice(&plain).unwrap();
        assert_eq!(claims["scalar"], STANDARD.encode(scalar));
        assert!(STANDARD.encode(scalar).contains(['+', '/']));
        assert_eq!(claims["iat"], 100);
        assert_eq!(claims["exp"], 700);
        assert_eq!(read(&t, "a", keys, Some(400)).unwrap().scalar, scalar);
        // a token whose payload writes the scalar in base64url is read the same
        let url = seal(&key, r#"{"iat":100,"exp":700,"scalar":"APv__g"}"#);
        assert_eq!(read(&url, "a", keys, Some(400)).unwrap().scalar, scalar);
        let negative = seal(&key, r#"{"iat":100,"exp":700,"scalar":"+w=="}"#);
        assert!(read(&negative, "a", keys, Some(400)).is_err());
    }

    /// A token with an arbitrary payload, header as `create` writes it.
    fn seal(key: &[u8; 32], payload: &str) -> String {
        let header = URL_SAFE_NO_PAD
            .encode(r#"{"alg":"dir","enc":"A256GCM","kid":"k","aud":"a","iat":100,"exp":700}"#);
        let iv = [3u8; 12];
        let sealed = Aes256Gcm::new(key.into())
            .encrypt(
                &Nonce::from(iv),
                Payload {
                    msg: payload.as_bytes(),
                    aad: header.as_bytes(),
                },
            )
            .unwrap();
        let (c, t) = sealed.split_at(sealed.len() - 16);
        format!(
            "{header}..{}.{}.{}",
            URL_SAFE_NO_PAD.encode(iv),
            URL_SAFE_NO_PAD.encode(c),
            URL_SAFE_NO_PAD.encode(t)
        )
    }
}
