//! The local backend (PSEUDONYMISATION.md §11): the gateway holds the domain key k.
//!
//! Hot-path costs are cached (§10): at-rest pseudonyms under a truncated HMAC of the NISS keyed
//! with a random key that lives only in this process's memory (the NISS itself is never a cache
//! key), and in-transit forms until 30 s before they expire. Misses are computed off the async
//! executor (`spawn_blocking`), spread over the machine's cores.

use crate::domain::PseudoDomain;
use crate::{AtRest, BlindedInput, BlindedOutput, InTransit, Niss, PseudoError, Pseudonymiser};
use crate::{curve, transit_info};
use futures::future::BoxFuture;
use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use p521::Scalar;
use quick_cache::sync::Cache;
use rand::RngCore;
use sha2::Sha256;
use std::sync::Arc;

/// Cache sizes.
#[derive(Debug, Clone, Copy)]
pub struct CacheConfig {
    /// At-rest pseudonyms kept (≈ 100 bytes each: a 16-byte tag and the 66-byte X).
    pub at_rest_capacity: usize,
    /// In-transit forms kept (≈ 800 bytes each).
    pub in_transit_capacity: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            at_rest_capacity: 1_000_000,
            in_transit_capacity: 200_000,
        }
    }
}

/// Do not hand out an in-transit form with less than this left (§10).
const MIN_REMAINING_SECONDS: i64 = 30;

struct Inner {
    domain: PseudoDomain,
    /// HMAC-SHA256 keyed with 64 random bytes drawn at start-up, never persisted.
    cache_mac: Hmac<Sha256>,
    ttl_seconds: i64,
    at_rest: Cache<[u8; 16], curve::Coord>,
    in_transit: Cache<AtRest, (InTransit, i64)>,
}

/// The local pseudonymiser. Cheap to clone (shared state).
#[derive(Clone)]
pub struct LocalPseudonymiser {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for LocalPseudonymiser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalPseudonymiser")
            .field("domain", &self.inner.domain)
            .finish_non_exhaustive()
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn inverse(s: &Scalar) -> Result<Scalar, PseudoError> {
    Option::<Scalar>::from(s.invert()).ok_or_else(|| PseudoError::Internal("zero scalar".into()))
}

impl Inner {
    fn tag(&self, niss: &Niss) -> [u8; 16] {
        let mut mac = self.cache_mac.clone();
        mac.update(niss.expose_digits().as_bytes());
        let full = mac.finalize().into_bytes();
        let mut tag = [0u8; 16];
        tag.copy_from_slice(&full[..16]);
        tag
    }

    /// §11 a, computed now (no cache): X(k·embed(NISS)).
    fn compute_at_rest(&self, niss: &Niss) -> Result<curve::Coord, PseudoError> {
        let m = curve::embed(niss.expose_digits().as_bytes(), self.domain.buffer_size())?;
        Ok(curve::coordinates(&curve::mul(&m, &self.domain.k)).0)
    }

    /// A transitInfo for s, issued at `iat` (§7).
    fn transit_info(&self, s: &Scalar, iat: i64) -> Result<(String, i64), PseudoError> {
        let exp = iat.saturating_add(self.ttl_seconds);
        let (kid, key) = self.domain.active_key();
        let ti = transit_info::create(
            self.domain.audience(),
            kid,
            key,
            &curve::scalar_twos_complement(s),
            iat,
            exp,
        )?;
        Ok((ti, exp))
    }

    /// §11 c, computed now: a fresh in-transit form of P, and its exp.
    fn compute_in_transit(
        &self,
        at_rest: &AtRest,
        iat: i64,
    ) -> Result<(InTransit, i64), PseudoError> {
        let x = curve::decode_coordinate(at_rest.as_str())?;
        let p = curve::point_from_x(&x)?;
        let s = curve::random_scalar();
        let p_t = curve::mul(&p, &inverse(&s)?);
        let (ti, exp) = self.transit_info(&s, iat)?;
        Ok((
            InTransit(format!("{}:{ti}", curve::encode_sec1(&p_t, false))),
            exp,
        ))
    }

    /// §11 b, at time `iat`.
    fn blinded(&self, input: &BlindedInput, iat: i64) -> Result<BlindedOutput, PseudoError> {
        if input.crv != "P-521" {
            return Err(PseudoError::InvalidPoint("crv must be P-521".into()));
        }
        let x = curve::decode_coordinate(&input.x)?;
        let y = curve::decode_coordinate(&input.y)?;
        let blinded = curve::point_from_xy(&x, &y)?;
        let s = curve::random_scalar();
        let result = curve::mul(&blinded, &(inverse(&s)? * self.domain.k));
        let (rx, ry) = curve::coordinates(&result);
        let (transit_info, exp) = self.transit_info(&s, iat)?;
        Ok(BlindedOutput {
            id: uuid::Uuid::new_v4().to_string(),
            domain: self.domain.domain().to_owned(),
            crv: "P-521".to_owned(),
            iat,
            exp,
            x: curve::encode_coordinate(&rx),
            y: curve::encode_coordinate(&ry),
            transit_info,
        })
    }

    /// §11 d (read side) at time `now`: P = s·P_t.
    fn read_in_transit(&self, in_transit: &str, now: i64) -> Result<AtRest, PseudoError> {
        let (sec1, ti) = in_transit.split_once(':').ok_or_else(|| {
            PseudoError::InvalidPoint("no ':' in the in-transit pseudonym".into())
        })?;
        let p_t = curve::decode_sec1(sec1)?;
        let d = &self.domain;
        let content = transit_info::read(ti, d.audience(), |kid| d.key(kid), Some(now))?;
        let s = curve::scalar_from_be_bytes(&content.scalar)?;
        Ok(AtRest::from_x(&curve::coordinates(&curve::mul(&p_t, &s)).0))
    }

    fn in_transit_cached(&self, at_rest: &AtRest, now: i64) -> Option<InTransit> {
        self.in_transit
            .get(at_rest)
            .filter(|(_, exp)| now < exp - MIN_REMAINING_SECONDS)
            .map(|(t, _)| t)
    }
}

/// Runs `work` on a blocking thread.
async fn blocking<R: Send + 'static>(
    work: impl FnOnce() -> Result<R, PseudoError> + Send + 'static,
) -> Result<R, PseudoError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| PseudoError::Internal(format!("pseudonymisation task: {e}")))?
}

impl LocalPseudonymiser {
    /// A pseudonymiser for this domain.
    pub fn new(domain: PseudoDomain, cache: CacheConfig) -> Self {
        let mut cache_key = [0u8; 64];
        rand::rngs::OsRng.fill_bytes(&mut cache_key);
        let cache_mac = <Hmac<Sha256> as KeyInit>::new(&cache_key.into());
        let ttl_seconds = i64::try_from(domain.ttl().as_secs()).unwrap_or(600);
        Self {
            inner: Arc::new(Inner {
                domain,
                cache_mac,
                ttl_seconds,
                at_rest: Cache::new(cache.at_rest_capacity.max(16)),
                in_transit: Cache::new(cache.in_transit_capacity.max(16)),
            }),
        }
    }

    /// The domain this pseudonymiser serves.
    pub fn domain(&self) -> &PseudoDomain {
        &self.inner.domain
    }

    /// The at-rest pseudonym of one NISS, synchronously on this thread (seeding, benchmarks).
    /// Cached like [`Pseudonymiser::at_rest`].
    ///
    /// # Errors
    /// Never for a valid NISS.
    pub fn at_rest_blocking(&self, niss: &Niss) -> Result<AtRest, PseudoError> {
        let tag = self.inner.tag(niss);
        if let Some(x) = self.inner.at_rest.get(&tag) {
            return Ok(AtRest::from_x(&x));
        }
        let x = self.inner.compute_at_rest(niss)?;
        self.inner.at_rest.insert(tag, x);
        Ok(AtRest::from_x(&x))
    }

    /// Runs `work` over `items` on blocking threads, one chunk per core; results in order.
    async fn parallel<T, R>(
        &self,
        items: Vec<T>,
        work: fn(&Inner, &T) -> Result<R, PseudoError>,
    ) -> Result<Vec<R>, PseudoError>
    where
        T: Send + 'static,
        R: Send + 'static,
    {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let chunk = items.len().div_ceil(cores).max(1);
        let mut items = items;
        let mut tasks = Vec::new();
        while !items.is_empty() {
            let rest = items.split_off(chunk.min(items.len()));
            let part = std::mem::replace(&mut items, rest);
            let inner = Arc::clone(&self.inner);
            tasks.push(blocking(move || {
                part.iter()
                    .map(|i| work(&inner, i))
                    .collect::<Result<Vec<R>, _>>()
            }));
        }
        let mut out = Vec::with_capacity(tasks.len() * chunk);
        for part in futures::future::join_all(tasks).await {
            out.extend(part?);
        }
        Ok(out)
    }
}

impl Pseudonymiser for LocalPseudonymiser {
    fn at_rest<'a>(&'a self, niss: &'a [Niss]) -> BoxFuture<'a, Result<Vec<AtRest>, PseudoError>> {
        Box::pin(async move {
            let mut out: Vec<Option<AtRest>> = Vec::with_capacity(niss.len());
            let mut misses: Vec<(usize, [u8; 16], Niss)> = Vec::new();
            for (i, n) in niss.iter().enumerate() {
                let tag = self.inner.tag(n);
                match self.inner.at_rest.get(&tag) {
                    Some(x) => out.push(Some(AtRest::from_x(&x))),
                    None => {
                        out.push(None);
                        misses.push((i, tag, n.clone()));
                    }
                }
            }
            let computed = self
                .parallel(misses, |inner, (i, tag, n)| {
                    let x = inner.compute_at_rest(n)?;
                    inner.at_rest.insert(*tag, x);
                    Ok((*i, AtRest::from_x(&x)))
                })
                .await?;
            for (i, p) in computed {
                out[i] = Some(p);
            }
            out.into_iter()
                .map(|p| p.ok_or_else(|| PseudoError::Internal("missing pseudonym".into())))
                .collect()
        })
    }

    fn in_transit<'a>(
        &'a self,
        pseudonyms: &'a [AtRest],
    ) -> BoxFuture<'a, Result<Vec<InTransit>, PseudoError>> {
        Box::pin(async move {
            let now = now();
            let mut out: Vec<Option<InTransit>> = Vec::with_capacity(pseudonyms.len());
            let mut misses = Vec::new();
            for (i, p) in pseudonyms.iter().enumerate() {
                match self.inner.in_transit_cached(p, now) {
                    Some(t) => out.push(Some(t)),
                    None => {
                        out.push(None);
                        misses.push((i, p.clone()));
                    }
                }
            }
            let computed = self
                .parallel(misses, |inner, (i, p)| {
                    let (t, exp) = inner.compute_in_transit(p, self::now())?;
                    inner.in_transit.insert(p.clone(), (t.clone(), exp));
                    Ok((*i, t))
                })
                .await?;
            for (i, t) in computed {
                out[i] = Some(t);
            }
            out.into_iter()
                .map(|p| p.ok_or_else(|| PseudoError::Internal("missing pseudonym".into())))
                .collect()
        })
    }

    fn pseudonymize_blinded<'a>(
        &'a self,
        input: &'a BlindedInput,
    ) -> BoxFuture<'a, Result<BlindedOutput, PseudoError>> {
        Box::pin(async move {
            let inner = Arc::clone(&self.inner);
            let input = input.clone();
            blocking(move || inner.blinded(&input, now())).await
        })
    }

    fn at_rest_of_in_transit<'a>(
        &'a self,
        in_transit: &'a str,
    ) -> BoxFuture<'a, Result<AtRest, PseudoError>> {
        Box::pin(async move {
            let inner = Arc::clone(&self.inner);
            let in_transit = in_transit.to_owned();
            blocking(move || inner.read_in_transit(&in_transit, now())).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::niss::tests::with_check;

    fn pseudonymiser() -> LocalPseudonymiser {
        LocalPseudonymiser::new(
            PseudoDomain::generate("trio", "urn:test"),
            CacheConfig::default(),
        )
    }

    /// Same k and key bytes, with one edit to the domain file.
    fn variant(p: &LocalPseudonymiser, from: &str, to: &str) -> LocalPseudonymiser {
        let json = p.domain().to_json();
        assert!(json.contains(from));
        let d = PseudoDomain::from_json(&json.replace(from, to)).unwrap();
        LocalPseudonymiser::new(d, CacheConfig::default())
    }

    fn niss(first9: &str) -> Niss {
        Niss::parse(&with_check(first9, false)).unwrap()
    }

    fn tamper(s: &str, at: usize) -> String {
        let mut out = s.to_owned();
        let c = if s[at..].starts_with('A') { "B" } else { "A" };
        out.replace_range(at..at + 1, c);
        out
    }

    #[tokio::test]
    async fn at_rest_is_deterministic_per_domain_and_distinct_per_niss() {
        let p = pseudonymiser();
        let a = niss("850730033");
        let b = niss("850730034");
        let r = p.at_rest(&[a.clone(), b.clone(), a.clone()]).await.unwrap();
        assert_eq!(r[0], r[2]);
        assert_ne!(r[0], r[1]);
        assert_eq!(r[0].as_str().len(), 88);
        assert_eq!(AtRest::from_stored(r[0].as_str().to_owned()).unwrap(), r[0]);
        // computing again without the cache gives the same value
        assert_eq!(AtRest::from_x(&p.inner.compute_at_rest(&a).unwrap()), r[0]);
        // a fresh pseudonymiser on the same domain (new cache key) agrees
        let same = variant(&p, "urn:test", "urn:test");
        assert_eq!(
            same.at_rest(std::slice::from_ref(&a)).await.unwrap()[0],
            r[0]
        );
        assert_eq!(same.at_rest_blocking(&b).unwrap(), r[1]);
        // another domain key gives another pseudonym
        let other = pseudonymiser().at_rest(&[a]).await.unwrap();
        assert_ne!(other[0], r[0]);
    }

    #[tokio::test]
    async fn a_batch_keeps_its_order_across_chunks_and_fills_the_cache() {
        let p = pseudonymiser();
        let batch: Vec<Niss> = (0..25).map(|i| niss(&format!("8507300{i:02}"))).collect();
        let r = p.at_rest(&batch).await.unwrap();
        assert_eq!(r.len(), 25);
        for (n, a) in batch.iter().zip(&r) {
            assert_eq!(AtRest::from_x(&p.inner.compute_at_rest(n).unwrap()), *a);
            assert!(p.inner.at_rest.get(&p.inner.tag(n)).is_some());
        }
        let distinct: std::collections::HashSet<_> = r.iter().collect();
        assert_eq!(distinct.len(), 25);
        assert!(p.at_rest(&[]).await.unwrap().is_empty());
        let t = p.in_transit(&r).await.unwrap();
        for (a, t) in r.iter().zip(&t) {
            assert_eq!(p.at_rest_of_in_transit(t.as_str()).await.unwrap(), *a);
        }
    }

    #[tokio::test]
    async fn in_transit_reads_back_and_is_reused_from_the_cache() {
        let p = pseudonymiser();
        let at_rest = p.at_rest(&[niss("850730033")]).await.unwrap();
        let t1 = p.in_transit(&at_rest).await.unwrap();
        let t2 = p.in_transit(&at_rest).await.unwrap();
        assert_eq!(t1, t2, "reused until it nears expiry");
        let (sec1, ti) = t1[0].as_str().split_once(':').unwrap();
        assert_eq!(sec1.len(), 178);
        let h = transit_info::header(ti).unwrap();
        assert_eq!(h.aud.as_deref(), Some("urn:test"));
        assert_eq!(h.exp.unwrap() - h.iat.unwrap(), 600);
        assert_eq!(
            p.at_rest_of_in_transit(t1[0].as_str()).await.unwrap(),
            at_rest[0]
        );
        // the short (compressed SEC1) form reads back too
        let short = format!(
            "{}:{ti}",
            curve::encode_sec1(&curve::decode_sec1(sec1).unwrap(), true)
        );
        assert_eq!(p.at_rest_of_in_transit(&short).await.unwrap(), at_rest[0]);
        // another domain cannot read it
        assert!(
            pseudonymiser()
                .at_rest_of_in_transit(t1[0].as_str())
                .await
                .is_err()
        );
        assert!(p.at_rest_of_in_transit("garbage").await.is_err());
        assert!(p.at_rest_of_in_transit(sec1).await.is_err());
    }

    #[tokio::test]
    async fn in_transit_is_renewed_when_less_than_30_seconds_remain() {
        let p = pseudonymiser();
        let at_rest = p.at_rest(&[niss("850730033")]).await.unwrap();
        let now = now();
        let (old, _) = p.inner.compute_in_transit(&at_rest[0], now - 600).unwrap();
        p.inner
            .in_transit
            .insert(at_rest[0].clone(), (old.clone(), now + 29));
        let fresh = p.in_transit(&at_rest).await.unwrap();
        assert_ne!(fresh[0], old);
        assert_eq!(p.in_transit(&at_rest).await.unwrap(), fresh);
    }

    #[tokio::test]
    async fn expired_foreign_unknown_kid_and_tampered_transit_info_are_refused() {
        let p = pseudonymiser();
        let at_rest = p.at_rest(&[niss("850730033")]).await.unwrap().remove(0);
        let now = now();
        // expired more than 60 s ago, or issued more than 60 s ahead
        let (old, _) = p.inner.compute_in_transit(&at_rest, now - 661).unwrap();
        assert!(matches!(
            p.at_rest_of_in_transit(old.as_str()).await,
            Err(PseudoError::Expired)
        ));
        let (future, _) = p.inner.compute_in_transit(&at_rest, now + 61 + 5).unwrap();
        assert!(matches!(
            p.at_rest_of_in_transit(future.as_str()).await,
            Err(PseudoError::Expired)
        ));
        // within the skew: accepted
        let (late, _) = p.inner.compute_in_transit(&at_rest, now - 630).unwrap();
        assert_eq!(
            p.at_rest_of_in_transit(late.as_str()).await.unwrap(),
            at_rest
        );

        let (t, _) = p.inner.compute_in_transit(&at_rest, now).unwrap();
        // same keys, other audience
        let foreign = variant(&p, "urn:test", "urn:other");
        assert!(matches!(
            foreign.at_rest_of_in_transit(t.as_str()).await,
            Err(PseudoError::InvalidTransitInfo(_))
        ));
        // same keys and audience, but the kid is unknown
        let kid = transit_info::header(t.as_str().split_once(':').unwrap().1)
            .unwrap()
            .kid
            .unwrap();
        let rotated = variant(&p, &kid, "another-kid");
        assert!(matches!(
            rotated.at_rest_of_in_transit(t.as_str()).await,
            Err(PseudoError::UnknownKid(_))
        ));
        // a changed byte in the ciphertext or the tag
        let s = t.as_str();
        for at in [s.len() - 30, s.len() - 3] {
            assert!(matches!(
                p.at_rest_of_in_transit(&tamper(s, at)).await,
                Err(PseudoError::InvalidTransitInfo(_))
            ));
        }
        // a point that is not on the curve
        assert!(matches!(
            p.at_rest_of_in_transit(&tamper(s, 100)).await,
            Err(PseudoError::InvalidPoint(_))
        ));
    }

    #[tokio::test]
    async fn blinded_pseudonymize_gives_what_the_rp_can_send_back() {
        let p = pseudonymiser();
        let n = niss("850730033");
        let m = curve::embed(n.expose_digits().as_bytes(), 8).unwrap();
        let r = curve::random_scalar();
        let (bx, by) = curve::coordinates(&curve::mul(&m, &r));
        let out = p
            .pseudonymize_blinded(&BlindedInput {
                id: "1".into(),
                crv: "P-521".into(),
                x: curve::encode_coordinate(&bx),
                y: curve::encode_coordinate(&by),
            })
            .await
            .unwrap();
        assert_eq!(out.domain, "trio");
        assert_eq!(out.crv, "P-521");
        assert_eq!((out.x.len(), out.y.len()), (88, 88));
        assert_eq!(out.exp - out.iat, 600);
        let json = serde_json::to_value(&out).unwrap();
        assert!(json["transitInfo"].is_string());
        // the RP unblinds with r⁻¹ and holds an ordinary in-transit pseudonym
        let blinded_result = curve::point_from_xy(
            &curve::decode_coordinate(&out.x).unwrap(),
            &curve::decode_coordinate(&out.y).unwrap(),
        )
        .unwrap();
        let r_inv = Option::<Scalar>::from(r.invert()).unwrap();
        let p_t = curve::mul(&blinded_result, &r_inv);
        let in_transit = format!("{}:{}", curve::encode_sec1(&p_t, false), out.transit_info);
        assert_eq!(
            p.at_rest_of_in_transit(&in_transit).await.unwrap(),
            p.at_rest(&[n]).await.unwrap()[0]
        );
    }

    #[tokio::test]
    async fn blinded_pseudonymize_refuses_bad_input() {
        let p = pseudonymiser();
        let input = |crv: &str, x: &str, y: &str| BlindedInput {
            id: "2".into(),
            crv: crv.into(),
            x: x.into(),
            y: y.into(),
        };
        let m = curve::embed(b"12345678901", 8).unwrap();
        let (x, y) = curve::coordinates(&m);
        let (x, y) = (curve::encode_coordinate(&x), curve::encode_coordinate(&y));
        assert!(
            p.pseudonymize_blinded(&input("P-521", &x, &y))
                .await
                .is_ok()
        );
        for bad in [
            input("P-256", &x, &y),
            input("P-521", "AQ==", "Ag=="),
            input("P-521", &x, &x),
            input("P-521", "", &y),
            input("P-521", "not base64!", &y),
        ] {
            assert!(matches!(
                p.pseudonymize_blinded(&bad).await,
                Err(PseudoError::InvalidPoint(_))
            ));
        }
    }

    #[tokio::test]
    async fn usable_as_a_shared_trait_object() {
        let p: Arc<dyn Pseudonymiser> = Arc::new(pseudonymiser());
        let n = Niss::parse("00000000097").unwrap();
        let a = p.at_rest(std::slice::from_ref(&n)).await.unwrap();
        let t = p.in_transit(&a).await.unwrap();
        assert_eq!(p.at_rest_of_in_transit(t[0].as_str()).await.unwrap(), a[0]);
    }

    #[test]
    fn debug_shows_no_secret() {
        let p = pseudonymiser();
        let shown = format!("{p:?}");
        assert!(!shown.contains(&curve::scalar_to_hex(&p.inner.domain.k)[..16]));
    }

    #[test]
    #[ignore = "prints timings; run with --release -- --ignored --nocapture"]
    fn timings() {
        let p = pseudonymiser();
        let rounds = 200u32;
        let batch: Vec<Niss> = (0..rounds)
            .map(|i| niss(&format!("850{:06}", 730_000 + i)))
            .collect();
        let t = std::time::Instant::now();
        let xs: Vec<_> = batch
            .iter()
            .map(|n| p.inner.compute_at_rest(n).unwrap())
            .collect();
        println!("at-rest miss: {:?}", t.elapsed() / rounds);
        let pseudonyms: Vec<AtRest> = xs.iter().map(AtRest::from_x).collect();
        let t = std::time::Instant::now();
        let ts: Vec<_> = pseudonyms
            .iter()
            .map(|a| p.inner.compute_in_transit(a, now()).unwrap().0)
            .collect();
        println!("in-transit miss: {:?}", t.elapsed() / rounds);
        let t = std::time::Instant::now();
        for s in &ts {
            p.inner.read_in_transit(s.as_str(), now()).unwrap();
        }
        println!("in-transit read: {:?}", t.elapsed() / rounds);
        let t = std::time::Instant::now();
        for n in &batch {
            p.at_rest_blocking(n).unwrap();
        }
        println!("at-rest cold via cache path: {:?}", t.elapsed() / rounds);
        let t = std::time::Instant::now();
        for n in &batch {
            p.at_rest_blocking(n).unwrap();
        }
        println!("at-rest hit: {:?}", t.elapsed() / rounds);
        let rt = tokio::runtime::Runtime::new().unwrap();
        let fresh = pseudonymiser();
        let t = std::time::Instant::now();
        rt.block_on(fresh.at_rest(&batch[..100])).unwrap();
        println!("at_rest batch of 100 misses (parallel): {:?}", t.elapsed());
        let t = std::time::Instant::now();
        rt.block_on(fresh.at_rest(&batch[..100])).unwrap();
        println!("at_rest batch of 100 hits: {:?}", t.elapsed());
    }
}
