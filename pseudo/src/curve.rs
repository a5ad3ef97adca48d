//! P-521 for Blinded Pseudo (PSEUDONYMISATION.md §1–§3, §5, §6): embedding a value in a point,
//! recovering a point from its X, and the coordinate and SEC1 encodings.
//!
//! Coordinates travel as 66-byte big-endian arrays ([`Coord`]). p521 supplies validated points and
//! scalar multiplication; the Y chosen for an X is the *principal* root rhs^((p+1)/4) (what the
//! eHealth helpers all return), computed with p521's own field element (reached through
//! `primeorder::PrimeCurveParams`), whose `sqrt` is exactly that power.

use crate::PseudoError;
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use elliptic_curve::ff::{Field, PrimeField};
use elliptic_curve::sec1::{FromEncodedPoint, ToEncodedPoint};
use num_bigint::BigUint;
use p521::{AffinePoint, EncodedPoint, FieldBytes, NistP521, ProjectivePoint, Scalar};
use primeorder::PrimeCurveParams;
use std::sync::OnceLock;

/// Bytes of a coordinate (I2OSP66).
pub const COORD_BYTES: usize = 66;
/// Longest value we embed (eHealth forbids more than 32 bytes).
pub const MAX_VALUE_BYTES: usize = 32;
/// Longest counter search when embedding (each step succeeds with probability ½).
const MAX_COUNTER: u64 = 4096;

/// A coordinate as 66 big-endian bytes.
pub type Coord = [u8; COORD_BYTES];

/// p521's base-field element.
type Fe = <NistP521 as PrimeCurveParams>::FieldElement;

fn field_bytes(bytes: &Coord) -> FieldBytes {
    let mut out = FieldBytes::default();
    out.copy_from_slice(bytes);
    out
}

fn fe(bytes: &Coord) -> Option<Fe> {
    Option::from(Fe::from_repr(field_bytes(bytes)))
}

fn coord(v: &Fe) -> Coord {
    let mut out = [0u8; COORD_BYTES];
    out.copy_from_slice(&v.to_repr());
    out
}

/// The principal square root of x³ − 3x + b (§1), if x is the X of a point.
fn principal_y(x: &Fe) -> Option<Fe> {
    let rhs = x.square() * x + NistP521::EQUATION_A * x + NistP521::EQUATION_B;
    // p521's sqrt is rhs^(2^519) = rhs^((p+1)/4), checked by squaring.
    Option::from(rhs.sqrt())
}

/// The group order n.
pub fn order() -> &'static BigUint {
    static N: OnceLock<BigUint> = OnceLock::new();
    N.get_or_init(|| {
        BigUint::parse_bytes(
            b"01fffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffa51868783bf2f966b7fcc0148f709a5d03bb5c9b8899c47aebb6fb71e91386409",
            16,
        )
        .unwrap_or_default()
    })
}

/// The principal-root Y (rhs^((p+1)/4)) for this X, when X (< p) is the X of a point.
pub fn y_for_x(x: &Coord) -> Option<Coord> {
    principal_y(&fe(x)?).map(|y| coord(&y))
}

/// A validated point from its affine coordinates (rejects coordinates ≥ p and off-curve points;
/// the identity has no affine coordinates).
///
/// # Errors
/// [`PseudoError::InvalidPoint`] when (x, y) is not on P-521.
pub fn point_from_xy(x: &Coord, y: &Coord) -> Result<AffinePoint, PseudoError> {
    let encoded = EncodedPoint::from_affine_coordinates(&field_bytes(x), &field_bytes(y), false);
    Option::from(AffinePoint::from_encoded_point(&encoded))
        .ok_or_else(|| PseudoError::InvalidPoint("not on the curve".into()))
}

/// The point with this X and the principal-root Y (§1, §5 `fromX`).
///
/// # Errors
/// [`PseudoError::InvalidPoint`] when no point has this X.
pub fn point_from_x(x: &Coord) -> Result<AffinePoint, PseudoError> {
    let y = y_for_x(x).ok_or_else(|| PseudoError::InvalidPoint("no point has this x".into()))?;
    point_from_xy(x, &y)
}

/// Affine coordinates as 66-byte arrays (zeros for the identity, which we never produce).
pub fn coordinates(point: &AffinePoint) -> (Coord, Coord) {
    let encoded = point.to_encoded_point(false);
    let mut x = [0u8; COORD_BYTES];
    let mut y = [0u8; COORD_BYTES];
    if let (Some(ex), Some(ey)) = (encoded.x(), encoded.y()) {
        x.copy_from_slice(ex);
        y.copy_from_slice(ey);
    }
    (x, y)
}

/// §2: embeds a value (≤ 32 bytes) as `0x00 ‖ v ‖ len ‖ 0x00 × bufferSize`, adding the smallest
/// counter that gives a point (whose Y is the principal root).
///
/// # Errors
/// [`PseudoError::ValueTooLong`] over 32 bytes (or a buffer size that leaves no room), or no point
/// within the counter range (never in practice).
pub fn embed(value: &[u8], buffer_size: usize) -> Result<AffinePoint, PseudoError> {
    let total = value.len() + 2 + buffer_size;
    if value.len() > MAX_VALUE_BYTES || total > COORD_BYTES {
        return Err(PseudoError::ValueTooLong);
    }
    let mut x0 = [0u8; COORD_BYTES];
    let start = COORD_BYTES - total;
    // x0[start] = 0x00, then v, then its length; the buffer stays zero.
    x0[start + 1..start + 1 + value.len()].copy_from_slice(value);
    x0[start + 1 + value.len()] =
        u8::try_from(value.len()).map_err(|_| PseudoError::ValueTooLong)?;
    let x0 = fe(&x0).ok_or_else(|| PseudoError::Internal("embedding above p".into()))?;
    for counter in 0..MAX_COUNTER {
        let x = x0 + Fe::from(counter);
        if let Some(y) = principal_y(&x) {
            return point_from_xy(&coord(&x), &coord(&y));
        }
    }
    Err(PseudoError::Internal("no point found for the value".into()))
}

/// §3 with our checks: the value a point embeds (length ≤ 32, zero prefix).
///
/// # Errors
/// [`PseudoError::InvalidPoint`] when the point embeds no value.
pub fn value_of(point: &AffinePoint, buffer_size: usize) -> Result<Vec<u8>, PseudoError> {
    let (x, _) = coordinates(point);
    let pos = COORD_BYTES
        .checked_sub(buffer_size + 1)
        .ok_or_else(|| PseudoError::InvalidPoint("buffer size".into()))?;
    let len = usize::from(x[pos]);
    if len > MAX_VALUE_BYTES || len > pos || x[..pos - len].iter().any(|b| *b != 0) {
        return Err(PseudoError::InvalidPoint(
            "the point embeds no value".into(),
        ));
    }
    Ok(x[pos - len..pos].to_vec())
}

/// `k·P`.
pub fn mul(point: &AffinePoint, k: &Scalar) -> AffinePoint {
    (ProjectivePoint::from(*point) * k).to_affine()
}

/// Standard base64 of a 66-byte coordinate (88 characters).
pub fn encode_coordinate(c: &Coord) -> String {
    STANDARD.encode(c)
}

/// Decodes a base64 coordinate of 1–67 bytes (one leading 0x00 allowed), standard or url
/// alphabet, padded or not; the value must be below p.
///
/// # Errors
/// [`PseudoError::InvalidPoint`] for bad base64, bad length, or a value ≥ p.
pub fn decode_coordinate(text: &str) -> Result<Coord, PseudoError> {
    let bytes = decode_b64(text)
        .ok_or_else(|| PseudoError::InvalidPoint("coordinate is not base64".into()))?;
    let bytes = match bytes.len() {
        1..=66 => &bytes[..],
        67 if bytes[0] == 0 => &bytes[1..],
        _ => return Err(PseudoError::InvalidPoint("coordinate length".into())),
    };
    let mut out = [0u8; COORD_BYTES];
    out[COORD_BYTES - bytes.len()..].copy_from_slice(bytes);
    fe(&out).ok_or_else(|| PseudoError::InvalidPoint("coordinate not below p".into()))?;
    Ok(out)
}

/// Decodes base64 in the standard or the url-safe alphabet, padded or not.
pub fn decode_b64(text: &str) -> Option<Vec<u8>> {
    let trimmed = text.trim_end_matches('=');
    if trimmed.contains(['-', '_']) {
        let cleaned: String = trimmed
            .chars()
            .map(|c| match c {
                '-' => '+',
                '_' => '/',
                other => other,
            })
            .collect();
        STANDARD_NO_PAD.decode(cleaned).ok()
    } else {
        STANDARD_NO_PAD.decode(trimmed).ok()
    }
}

/// SEC1 encoding, base64url without padding: uncompressed (133 bytes) or compressed (67).
pub fn encode_sec1(point: &AffinePoint, compressed: bool) -> String {
    URL_SAFE_NO_PAD.encode(point.to_encoded_point(compressed).as_bytes())
}

/// Parses a base64url SEC1 point (both forms; compressed picks the root of the prefix's parity).
///
/// # Errors
/// [`PseudoError::InvalidPoint`] for bad encoding, the identity or an off-curve point.
pub fn decode_sec1(text: &str) -> Result<AffinePoint, PseudoError> {
    let bytes = decode_b64(text)
        .ok_or_else(|| PseudoError::InvalidPoint("SEC1 is not base64url".into()))?;
    let well_formed = matches!(
        (bytes.len(), bytes.first()),
        (133, Some(4)) | (67, Some(2 | 3))
    );
    if !well_formed {
        return Err(PseudoError::InvalidPoint("SEC1 form or length".into()));
    }
    let encoded = EncodedPoint::from_bytes(&bytes)
        .map_err(|_| PseudoError::InvalidPoint("SEC1 encoding".into()))?;
    Option::from(AffinePoint::from_encoded_point(&encoded))
        .ok_or_else(|| PseudoError::InvalidPoint("SEC1 point not on the curve".into()))
}

/// A uniformly random scalar in [1, n−1] from the OS generator.
pub fn random_scalar() -> Scalar {
    loop {
        let s = Scalar::random(&mut rand::rngs::OsRng);
        if !bool::from(s.is_zero()) {
            return s;
        }
    }
}

/// A scalar from unsigned big-endian bytes, reduced mod n; zero is refused.
///
/// # Errors
/// [`PseudoError::InvalidTransitInfo`] when the value is 0 mod n.
pub fn scalar_from_be_bytes(bytes: &[u8]) -> Result<Scalar, PseudoError> {
    let reduced = BigUint::from_bytes_be(bytes) % order();
    let be = reduced.to_bytes_be();
    let mut repr = [0u8; COORD_BYTES];
    repr[COORD_BYTES - be.len()..].copy_from_slice(&be);
    let s = Option::<Scalar>::from(Scalar::from_repr(field_bytes(&repr)))
        .ok_or_else(|| PseudoError::Internal("scalar reduction".into()))?;
    if bool::from(s.is_zero()) {
        return Err(PseudoError::InvalidTransitInfo("zero scalar".into()));
    }
    Ok(s)
}

/// Java `BigInteger.toByteArray` of a scalar: minimal big-endian, with a 0x00 first when the top
/// bit is set.
pub fn scalar_twos_complement(s: &Scalar) -> Vec<u8> {
    let repr = s.to_repr();
    let first = repr.iter().position(|b| *b != 0).unwrap_or(repr.len() - 1);
    let mut out = Vec::with_capacity(repr.len() - first + 1);
    if repr[first] & 0x80 != 0 {
        out.push(0);
    }
    out.extend_from_slice(&repr[first..]);
    out
}

/// A scalar as 132 lowercase hex digits.
pub fn scalar_to_hex(s: &Scalar) -> String {
    s.to_repr().iter().map(|b| format!("{b:02x}")).collect()
}

/// A scalar in [1, n−1] from hex (optional `0x`, at most 132 digits, no reduction).
pub fn scalar_from_hex(text: &str) -> Option<Scalar> {
    let digits = text.trim();
    let digits = digits.strip_prefix("0x").unwrap_or(digits);
    if digits.is_empty()
        || digits.len() > 2 * COORD_BYTES
        || !digits.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return None;
    }
    let padded = format!("{digits:0>132}");
    let mut repr = [0u8; COORD_BYTES];
    for (i, b) in repr.iter_mut().enumerate() {
        *b = u8::from_str_radix(padded.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    let s = Option::<Scalar>::from(Scalar::from_repr(field_bytes(&repr)))?;
    (!bool::from(s.is_zero())).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn vectors() -> Value {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/vectors/ehealth_pseudo_vectors.json"
        );
        let text = std::fs::read_to_string(path).expect("shared/vectors beside the repository");
        serde_json::from_str(&text).unwrap()
    }

    fn of_kind<'a>(v: &'a Value, prefix: &str) -> Vec<&'a Value> {
        v["vectors"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["kind"].as_str().unwrap().starts_with(prefix))
            .collect()
    }

    fn long(b64: &str) -> Coord {
        decode_coordinate(b64).unwrap()
    }

    #[test]
    fn embedding_matches_the_cookbook_vectors() {
        let v = vectors();
        let rows = of_kind(&v, "value_to_point");
        assert_eq!(rows.len(), 14);
        for row in rows {
            let value = decode_b64(row["input"]["value_b64"].as_str().unwrap()).unwrap();
            let buffer = row["domain"]["bufferSize"].as_u64().unwrap() as usize;
            let point = embed(&value, buffer).unwrap();
            let (x, y) = coordinates(&point);
            assert_eq!(
                x,
                long(row["expected"]["x_b64"].as_str().unwrap()),
                "{}",
                row["id"]
            );
            assert_eq!(
                y,
                long(row["expected"]["y_b64"].as_str().unwrap()),
                "{}",
                row["id"]
            );
            assert_eq!(value_of(&point, buffer).unwrap(), value);
        }
    }

    #[test]
    fn y_from_x_is_the_principal_root_of_the_vectors() {
        let v = vectors();
        let rows = of_kind(&v, "x_to_point");
        assert_eq!(rows.len(), 14);
        for row in rows {
            let x = decode_coordinate(row["input"]["x_b64"].as_str().unwrap()).unwrap();
            let point = point_from_x(&x).unwrap();
            let (_, y) = coordinates(&point);
            assert_eq!(
                y,
                long(row["expected"]["y_b64"].as_str().unwrap()),
                "{}",
                row["id"]
            );
        }
    }

    #[test]
    fn blinding_and_unblinding_match_the_vectors() {
        let v = vectors();
        let rows = of_kind(&v, "blind_and_unblind");
        assert_eq!(rows.len(), 14);
        for row in rows {
            let i = &row["input"];
            let x = decode_coordinate(i["x_b64"].as_str().unwrap()).unwrap();
            let y = decode_coordinate(i["y_b64"].as_str().unwrap()).unwrap();
            let point = point_from_xy(&x, &y).unwrap();
            let r = scalar_from_be_bytes(&decode_b64(i["scalar_b64"].as_str().unwrap()).unwrap())
                .unwrap();
            let blinded = mul(&point, &r);
            let (bx, by) = coordinates(&blinded);
            assert_eq!(bx, long(row["expected"]["blinded_x_b64"].as_str().unwrap()));
            assert_eq!(by, long(row["expected"]["blinded_y_b64"].as_str().unwrap()));
            let r_inv = Option::<Scalar>::from(r.invert()).unwrap();
            assert_eq!(mul(&blinded, &r_inv), point);
        }
    }

    #[test]
    fn sec1_encodings_match_the_vectors() {
        let v = vectors();
        let row = v["vectors"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["id"] == "pseudonym_factory/012345678910")
            .unwrap();
        let x = decode_coordinate(row["input"]["x_b64"].as_str().unwrap()).unwrap();
        assert_eq!(
            x,
            decode_coordinate(row["input"]["x_b64_shortened"].as_str().unwrap()).unwrap()
        );
        let point = point_from_x(&x).unwrap();
        let (_, y) = coordinates(&point);
        assert_eq!(y, long(row["input"]["y_b64"].as_str().unwrap()));
        assert_eq!(
            encode_sec1(&point, false),
            row["expected"]["sec1_uncompressed_b64url"]
                .as_str()
                .unwrap()
        );
        assert_eq!(
            encode_sec1(&point, true),
            row["expected"]["sec1_compressed_b64url"].as_str().unwrap()
        );
        // the negated point (JS vector) round-trips in both forms
        let neg = v["vectors"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["id"] == "pseudonym_factory_js/012345678910_negated")
            .unwrap();
        let c = neg["input"]["sec1_compressed_b64url"].as_str().unwrap();
        let u = neg["input"]["sec1_uncompressed_b64url"].as_str().unwrap();
        assert_eq!(decode_sec1(c).unwrap(), decode_sec1(u).unwrap());
        assert_eq!(encode_sec1(&decode_sec1(c).unwrap(), false), u);
    }

    #[test]
    fn the_niss_example_embeds_as_documented() {
        let v = vectors();
        let point = embed(b"27589314370", 8).unwrap();
        let (x, y) = coordinates(&point);
        let d = &v["analyst_derived"]["niss_27589314370_value_point"];
        assert_eq!(encode_coordinate(&x), d["x_b64"].as_str().unwrap());
        assert_eq!(encode_coordinate(&y), d["y_b64"].as_str().unwrap());
        assert_eq!(
            encode_sec1(&point, false),
            d["sec1_uncompressed_b64url"].as_str().unwrap()
        );
    }

    #[test]
    fn invalid_points_are_rejected() {
        let one = decode_coordinate("AQ==").unwrap();
        let two = decode_coordinate("Ag==").unwrap();
        assert!(point_from_xy(&one, &two).is_err());
        let bad_x =
            decode_coordinate("BAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAADAx")
                .unwrap();
        let y = decode_coordinate("AVKesmomj6qNSJpqPxEaIegblCAzf8k4gh0V7h/NxrgJ5WDUIha39yfdNeX1maUWrRBwiCNztHkE/ugNiRfFq5WU").unwrap();
        assert!(point_from_xy(&bad_x, &y).is_err());
        assert!(decode_sec1("AA").is_err());
        assert!(embed(&[b'1'; 33], 8).is_err());
    }

    fn by_id<'a>(v: &'a Value, id: &str) -> &'a Value {
        v["vectors"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["id"] == id)
            .unwrap()
    }

    #[test]
    fn in_transit_string_vectors_parse_and_reserialise() {
        let v = vectors();
        let row = by_id(&v, "pseudonym_in_transit_factory/012345678910");
        let i = &row["input"];
        let point = point_from_xy(
            &long(i["x_b64"].as_str().unwrap()),
            &long(i["y_b64"].as_str().unwrap()),
        )
        .unwrap();
        let e = &row["expected"];
        assert_eq!(
            encode_sec1(&point, false),
            e["pseudonym().asString()"].as_str().unwrap()
        );
        assert_eq!(
            encode_sec1(&point, true),
            e["pseudonym().asShortString()"].as_str().unwrap()
        );
        let short = by_id(&v, "pseudonym_in_transit/short_string_roundtrip");
        let c = short["input"]["sec1CompressedBase64"].as_str().unwrap();
        assert_eq!(encode_sec1(&decode_sec1(c).unwrap(), true), c);
        let raw = by_id(&v, "multiple_pseudonym_in_transit/raw");
        let joined = raw["input"]["sec1AndTransitInfo"].as_str().unwrap();
        let (sec1, ti) = joined.split_once(':').unwrap();
        let p = decode_sec1(sec1).unwrap();
        // the negated variant of the value point: same X, other Y
        assert_eq!(coordinates(&p).0, coordinates(&point).0);
        assert_ne!(p, point);
        assert_eq!(
            crate::transit_info::header(ti).unwrap().kid.as_deref(),
            Some("2022-12")
        );
    }

    #[test]
    fn coordinate_encodings_are_66_bytes_and_accept_short_forms() {
        let v = vectors();
        let row = by_id(&v, "base64/niss_27589314370");
        let c = decode_coordinate(row["input"]["short_b64"].as_str().unwrap()).unwrap();
        assert_eq!(
            encode_coordinate(&c),
            row["expected"]["encodeFromBN(bn)"].as_str().unwrap()
        );
        let one_two = by_id(&v, "coordinate_encoding/one_two");
        let notes = &one_two["analyst_notes"];
        assert_eq!(
            encode_coordinate(&decode_coordinate("AQ==").unwrap()),
            notes["x()_exact_per_J_PseudonymImpl.x"].as_str().unwrap()
        );
        assert_eq!(
            encode_coordinate(&decode_coordinate("Ag==").unwrap()),
            notes["y()_exact"].as_str().unwrap()
        );
        // 67 bytes with a leading zero is fine, without it (or ≥ p) it is not
        let mut b = vec![0u8; 67];
        b[66] = 5;
        assert!(decode_coordinate(&STANDARD.encode(&b)).is_ok());
        b[0] = 1;
        assert!(decode_coordinate(&STANDARD.encode(&b)).is_err());
        let p = [vec![0x01], vec![0xff; 65]].concat();
        assert!(decode_coordinate(&STANDARD.encode(&p)).is_err());
        assert!(decode_coordinate("").is_err());
        // url-safe alphabet accepted as well
        let y = by_id(&v, "multiple_pseudonym/xy")["input"]["y_b64"]
            .as_str()
            .unwrap();
        let url = y.replace('+', "-").replace('/', "_");
        assert_eq!(
            decode_coordinate(&url).unwrap(),
            decode_coordinate(y).unwrap()
        );
    }

    #[test]
    fn batch_vector_points_validate_as_documented() {
        let v = vectors();
        let good = &by_id(&v, "multiple_pseudonym/xy")["input"];
        assert!(
            point_from_xy(
                &long(good["x_b64"].as_str().unwrap()),
                &long(good["y_b64"].as_str().unwrap())
            )
            .is_ok()
        );
        let bad = &by_id(&v, "multiple_pseudonym/xy_dotnet")["input"];
        assert!(
            point_from_xy(
                &long(bad["x_b64"].as_str().unwrap()),
                &long(bad["y_b64"].as_str().unwrap())
            )
            .is_err()
        );
        let zero = by_id(&v, "multiple_value/0");
        let value = zero["input"]["value_utf8"].as_str().unwrap().as_bytes();
        assert_eq!(value_of(&embed(value, 8).unwrap(), 8).unwrap(), value);
    }

    #[test]
    fn scalars_round_trip_through_their_encodings() {
        for _ in 0..20 {
            let s = random_scalar();
            let tc = scalar_twos_complement(&s);
            assert!(tc[0] & 0x80 == 0);
            assert!(tc.len() == 1 || tc[0] != 0 || tc[1] & 0x80 != 0, "minimal");
            assert_eq!(scalar_from_be_bytes(&tc).unwrap(), s);
            assert_eq!(scalar_from_hex(&scalar_to_hex(&s)).unwrap(), s);
        }
        assert_eq!(
            scalar_twos_complement(&Scalar::from(0x80u64)),
            vec![0, 0x80]
        );
        assert_eq!(scalar_twos_complement(&Scalar::from(0x7fu64)), vec![0x7f]);
        assert!(scalar_from_be_bytes(&[0]).is_err());
        assert!(scalar_from_hex("0").is_none());
        assert!(scalar_from_hex("+1").is_none());
        assert!(scalar_from_hex(&order().to_str_radix(16)).is_none());
        assert_eq!(scalar_from_hex("0x1").unwrap(), Scalar::ONE);
        // n + 1 reduces to 1
        let n1 = (order() + 1u8).to_bytes_be();
        assert_eq!(scalar_from_be_bytes(&n1).unwrap(), Scalar::ONE);
    }

    #[test]
    fn embedding_refuses_long_values_and_points_without_a_value() {
        assert!(matches!(
            embed(&[b'1'; 33], 8),
            Err(PseudoError::ValueTooLong)
        ));
        let p = embed(&[b'1'; 32], 8).unwrap();
        assert_eq!(value_of(&p, 8).unwrap(), vec![b'1'; 32]);
        let random = mul(&p, &random_scalar());
        assert!(value_of(&random, 8).is_err());
    }
}
