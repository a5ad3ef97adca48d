//! The batch's view of the database.
//!
//! A batch is loaded with one statement (every row its messages can touch, [`LOAD`]; on steady
//! traffic, whose insured the process has all cached, only trajets and the inbox:
//! [`LOAD_NARROW`]), changed in memory by the handlers in delivery order — so a later message
//! sees an earlier one's effects — and written back with multi-row `UNNEST` statements: one for
//! the tables every message writes (trajets, history, and the inbox with each message's
//! outbound messages: [`FLUSH_HOT`]), and one per table for the rarer writes (organisations,
//! insured facts, relations, affiliations, new dossiers). The number of round trips per batch is
//! therefore fixed, whatever the batch size — four on the hot path: begin with the locks, load,
//! flush, commit — and this lets one transaction carry a hundred messages, and a small batch at
//! low load finish in a few milliseconds.
//!
//! Lookups by a batch's keys are written `UNNEST(keys) CROSS JOIN LATERAL (… WHERE key = k …
//! OFFSET 0)`: one index probe per key, whatever the planner's estimates. With `key = ANY($1)`
//! PostgreSQL chose sequential scans (comparing every row with every key) on tables of a few
//! ten thousand rows, which the benchmark showed to be most of the database's CPU; `OFFSET 0`
//! keeps the subquery from being flattened back into a join the planner could do the same with.
//! The plan is then the same for every batch, so the generic plan PostgreSQL caches for a
//! prepared statement is the right one and no batch pays for planning. Writes by key cannot be
//! written so (an `UPDATE … FROM` joins its target): the batch path's sessions turn sequential
//! scans off (`BATCH_SESSION` in `trio_gateway::serve`), or a plan cached on a near-empty table
//! kept joining by a scan of the whole table once it had grown.

use crate::messages::HandlerBug;
use crate::outbound::{self, OutboundMessage};
use crate::outcome::{Outcome, Status};
use crate::state_cache::{InsuredView, StateCache};
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};
use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use time::{Date, OffsetDateTime};
use trio_schemas::{Consent, Format, OrgKind, TrajetType};

/// `(kind, id)` of an organisation.
pub(crate) type OrgKey = (OrgKind, String);

/// A registered organisation.
#[derive(Debug, Clone)]
pub(crate) struct Org {
    pub kind: OrgKind,
    pub id: String,
    pub name: String,
    pub broker_user: String,
    pub format: Format,
}

impl Org {
    pub(crate) fn key(&self) -> OrgKey {
        (self.kind, self.id.clone())
    }
}

/// Facts about an insured that are not access rights.
#[derive(Debug, Clone, Default)]
pub(crate) struct InsuredFacts {
    pub died_on: Option<Date>,
    pub replaced_by: Option<String>,
}

/// The kind of organisation an insured is related to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum RelKind {
    Oa,
    Employer,
    Gp,
    Rp,
}

impl RelKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Oa => "oa",
            Self::Employer => "employer",
            Self::Gp => "gp",
            Self::Rp => "rp",
        }
    }

    fn parse(code: &str) -> Option<Self> {
        match code {
            "oa" => Some(Self::Oa),
            "employer" => Some(Self::Employer),
            "gp" => Some(Self::Gp),
            "rp" => Some(Self::Rp),
            _ => None,
        }
    }
}

/// An insured's relations: organisation kind and id, and when each ends.
pub(crate) type Relations = HashMap<(RelKind, String), OffsetDateTime>;

/// An employer's affiliations: SEPP id, and when each ends.
pub(crate) type Affiliations = HashMap<String, OffsetDateTime>;

/// A communication dossier.
#[derive(Debug, Clone)]
pub(crate) struct Dossier {
    pub id: i64,
    pub number: String,
    pub pseudonym: String,
    pub merged_into: Option<i64>,
}

/// A trajet's identity: its owner and the owner's reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct TrajetKey {
    pub owner_kind: OrgKind,
    pub owner_id: String,
    pub reference: String,
}

/// A trajet's state.
#[derive(Debug, Clone)]
pub(crate) struct TrajetRow {
    pub dossier_id: i64,
    pub trajet_type: TrajetType,
    pub status: String,
    pub version: i64,
    pub request_received_on: Option<Date>,
    pub start_on: Option<Date>,
    pub end_on: Option<Date>,
    pub consent: Option<Consent>,
}

/// One history line.
#[derive(Debug, Clone)]
pub(crate) struct HistoryRow {
    pub dossier_id: i64,
    pub actor: OrgKey,
    pub resource: &'static str,
    pub operation: &'static str,
    /// A JSON object's text (stored as `jsonb`).
    pub detail: Box<serde_json::value::RawValue>,
}

/// One inbox (outcome) line.
#[derive(Debug, Clone)]
struct InboxRow {
    sender: String,
    message_id: String,
    message_type: &'static str,
    outcome: Outcome,
    dossier_id: Option<i64>,
    /// The messages this one caused: a range of [`State::outbox`], kept in the row.
    outbound: std::ops::Range<usize>,
}

/// The first outcome of an idempotency key: read by the batch's load, or recorded by the batch
/// itself (then kept once, in its [`InboxRow`]).
enum Recorded {
    /// Committed by an earlier batch, as the load read it.
    Loaded(Outcome),
    /// An index into [`State::new_inbox`].
    New(usize),
}

/// A change to existing dossier rows that is not a plain upsert (NISS replacement).
#[derive(Debug, Clone)]
enum DossierOp {
    /// Move every history line of one dossier to another.
    MoveHistory { from: i64, into: i64 },
}

/// What a batch needs loaded.
#[derive(Debug, Default)]
pub(crate) struct Needs {
    pub broker_users: BTreeSet<String>,
    pub orgs: BTreeSet<OrgKey>,
    pub pseudonyms: BTreeSet<String>,
    pub employers: BTreeSet<String>,
    pub inbox_keys: BTreeSet<(String, String)>,
    /// `(sender broker user, ref)` of every trajet the batch upserts.
    pub trajet_refs: BTreeSet<(String, String)>,
    /// Whether the batch replaces a NISS: a merge moves every trajet of a dossier, so all of
    /// them are loaded (otherwise only those the batch upserts).
    pub niss_replacements: bool,
    /// How many dossiers the batch may create (ids are allocated up front).
    pub max_new_dossiers: usize,
}

// [`LOAD`] and [`LOAD_NARROW`] share their parameters `$1`–`$5` and the parts that read with them,
// written once here as literals for `concat!`: the organisations publishing as the batch's
// senders (`$1`, broker users), the batch's idempotency keys already in the inbox (`$2`, `$3`:
// senders and message ids), the trajets the batch upserts by their own key (`$4`, `$5`: the
// sender's broker user, whose organisation `org` holds, and the ref, so a ref used for another
// insured is seen), and the aggregates that return those three tables as arrays.

/// The organisations publishing as `$1`'s broker users.
macro_rules! org_by_broker_user {
    () => {
        "SELECT o.* FROM UNNEST($1::text[]) AS k(u)
    CROSS JOIN LATERAL (SELECT kind, id, name, broker_user, format FROM organisation
                        WHERE broker_user = k.u OFFSET 0) o"
    };
}

/// The trajets `($4, $5)` name, through `org`.
macro_rules! trajet_by_ref {
    () => {
        "SELECT t.* FROM UNNEST($4::text[], $5::text[]) AS k(u, r)
    JOIN org ON org.broker_user = k.u
    CROSS JOIN LATERAL (SELECT owner_kind, owner_id, ref, dossier_id, type, status, version,
                               request_received_on, start_on, end_on, consent
                        FROM trajet
                        WHERE owner_kind = org.kind AND owner_id = org.id AND ref = k.r
                        OFFSET 0) t"
    };
}

/// The inbox entries of the idempotency keys `($2, $3)`, as the CTE `inb`.
macro_rules! inbox_by_key {
    () => {
        "inb AS (
    SELECT i.* FROM UNNEST($2::text[], $3::text[]) AS k(s, m)
    CROSS JOIN LATERAL (SELECT sender, message_id, status, code, detail, result,
                               outbound
                        FROM inbox WHERE sender = k.s AND message_id = k.m OFFSET 0) i
)"
    };
}

/// The CTEs `org`, `traj` and `inb` as one array per column.
macro_rules! org_trajet_inbox_columns {
    () => {
        "(SELECT array_agg(kind) AS org_kind, array_agg(id) AS org_id, array_agg(name) AS org_name,
            array_agg(broker_user) AS org_broker_user, array_agg(format) AS org_format
     FROM org) AS org_,
    (SELECT array_agg(owner_kind) AS t_owner_kind, array_agg(owner_id) AS t_owner_id,
            array_agg(ref) AS t_ref, array_agg(dossier_id) AS t_dossier_id,
            array_agg(type) AS t_type, array_agg(status) AS t_status,
            array_agg(version) AS t_version,
            array_agg(request_received_on) AS t_request_received_on,
            array_agg(start_on) AS t_start_on, array_agg(end_on) AS t_end_on,
            array_agg(consent) AS t_consent FROM traj) AS traj_,
    (SELECT array_agg(sender) AS inbox_sender, array_agg(message_id) AS inbox_message_id,
            array_agg(status) AS inbox_status, array_agg(code) AS inbox_code,
            array_agg(detail) AS inbox_detail, array_agg(result) AS inbox_result,
            array_agg(outbound) AS inbox_outbound
     FROM inb) AS inb_"
    };
}

/// A batch's whole view of the database in one statement, so one round trip (about a
/// millisecond on a busy machine, which is what a small batch's time is made of) whatever the
/// batch holds. Every lookup probes an index once per key (`UNNEST … CROSS JOIN LATERAL (…
/// OFFSET 0)`: the plan is the same for every batch size, so PostgreSQL can keep one generic
/// plan), and each table comes back as one array per column (`array_agg` in one aggregate, so
/// the arrays of a table are in the same row order).
///
/// The insured asked for are `$6`, those the process has cached views of ([`StateCache`]) `$13`:
/// the latter are read only when the state epoch is no longer `$12`, the epoch of those views
/// (the cached views are then stale, and the row's `state_epoch` tells the caller which case it
/// is). What it follows, in order: those insured (and up to four NISS replacements onward), their
/// current relations, the employers named (`$7`) or related and their current SEPPs, the
/// organisations named (`$8`, `$9`: kinds and ids), related or publishing (`$1`), the insured's
/// dossiers, the trajets the batch upserts (`$4`, `$5`) and, when the batch replaces a NISS
/// (`$11`), every trajet of those dossiers, the batch's idempotency keys already in the inbox
/// (`$2`, `$3`), and ids for the dossiers the batch may create (at most `$10`, and no more than
/// the insured without a dossier: those read here, plus `$14` of the cached ones when their
/// views are used), and the transaction's time.
///
/// Its plan has some sixty nodes, and starting them up is most of its cost when a batch is
/// small: 0.2–0.3 ms of PostgreSQL CPU over empty arrays, three to five times
/// [`LOAD_NARROW`]'s.
const LOAD: &str = concat!(
    "
WITH RECURSIVE epoch AS (
    SELECT epoch, epoch IS DISTINCT FROM $12::bigint AS moved FROM state_epoch
), asked AS (
    SELECT p FROM UNNEST($6::text[]) AS k(p)
    UNION ALL
    SELECT p FROM UNNEST($13::text[]) AS k(p)
    WHERE COALESCE((SELECT moved FROM epoch), true)
), ins AS (
    SELECT i.pseudonym, i.died_on, i.replaced_by, 1 AS depth
    FROM asked AS k
    CROSS JOIN LATERAL (SELECT pseudonym, died_on, replaced_by FROM insured
                        WHERE pseudonym = k.p OFFSET 0) i
    UNION ALL
    SELECT i.pseudonym, i.died_on, i.replaced_by, ins.depth + 1
    FROM ins
    CROSS JOIN LATERAL (SELECT pseudonym, died_on, replaced_by FROM insured
                        WHERE pseudonym = ins.replaced_by OFFSET 0) i
    WHERE ins.depth < 5
), pseudo AS (
    SELECT p FROM asked
    UNION SELECT replaced_by FROM ins WHERE replaced_by IS NOT NULL
), rel AS (
    SELECT r.* FROM pseudo
    CROSS JOIN LATERAL (SELECT pseudonym, org_kind, org_id, valid_until FROM insured_relation
                        WHERE pseudonym = pseudo.p AND valid_until > now() OFFSET 0) r
), emp AS (
    SELECT e FROM UNNEST($7::text[]) AS k(e)
    UNION SELECT org_id FROM rel WHERE org_kind = 'employer'
), es AS (
    SELECT s.* FROM emp
    CROSS JOIN LATERAL (SELECT employer, sepp, valid_until FROM employer_sepp
                        WHERE employer = emp.e AND valid_until > now() OFFSET 0) s
), org_key AS (
    SELECT kind, id FROM UNNEST($8::text[], $9::text[]) AS k(kind, id)
    UNION SELECT org_kind, org_id FROM rel WHERE org_kind IN ('oa', 'gp', 'rp')
    UNION SELECT 'sepp', sepp FROM es
), org AS (
    SELECT o.* FROM org_key
    CROSS JOIN LATERAL (SELECT kind, id, name, broker_user, format FROM organisation
                        WHERE kind = org_key.kind AND id = org_key.id OFFSET 0) o
    UNION
    ",
    org_by_broker_user!(),
    "
), dos AS (
    SELECT d.* FROM pseudo
    CROSS JOIN LATERAL (SELECT id, number, pseudonym, merged_into FROM dossier
                        WHERE pseudonym = pseudo.p OFFSET 0) d
), traj AS (
    SELECT t.* FROM dos
    CROSS JOIN LATERAL (SELECT owner_kind, owner_id, ref, dossier_id, type, status, version,
                               request_received_on, start_on, end_on, consent
                        FROM trajet WHERE dossier_id = dos.id OFFSET 0) t
    WHERE $11::bool
    UNION
    ",
    trajet_by_ref!(),
    "
), ",
    inbox_by_key!(),
    ", spare AS (
    SELECT nextval('dossier_id_seq') AS id
    FROM generate_series(1, LEAST($10::int,
        (SELECT count(*)::int FROM pseudo WHERE NOT EXISTS (SELECT FROM dos WHERE pseudonym = p))
        + CASE WHEN COALESCE((SELECT moved FROM epoch), true) THEN 0 ELSE $14::int END))
)
SELECT * FROM
    (SELECT array_agg(pseudonym) AS ins_pseudonym, array_agg(died_on) AS ins_died_on,
            array_agg(replaced_by) AS ins_replaced_by FROM ins) AS ins_,
    (SELECT array_agg(pseudonym) AS rel_pseudonym, array_agg(org_kind) AS rel_org_kind,
            array_agg(org_id) AS rel_org_id, array_agg(valid_until) AS rel_valid_until
     FROM rel) AS rel_,
    (SELECT array_agg(employer) AS es_employer, array_agg(sepp) AS es_sepp,
            array_agg(valid_until) AS es_valid_until FROM es) AS es_,
    (SELECT array_agg(id) AS dos_id, array_agg(number) AS dos_number,
            array_agg(pseudonym) AS dos_pseudonym, array_agg(merged_into) AS dos_merged_into
     FROM dos) AS dos_,
    ",
    org_trajet_inbox_columns!(),
    ",
    (SELECT array_agg(id) AS spare_dossier_ids FROM spare) AS spare_,
    (SELECT (SELECT epoch FROM epoch) AS state_epoch, now() AS now) AS epoch_"
);

/// [`LOAD`] for a batch whose insured the process has all cached, each with a dossier, and
/// which names no organisation or employer of its own (steady traffic: new versions of
/// trajets): only what changes with every message (the trajets upserted and the inbox) and the
/// senders' organisations, with the state epoch. The caller uses the cached views when that
/// epoch is theirs, and otherwise runs [`LOAD`] (in the same transaction, under the same
/// locks): a reference change since costs the next batch one more round trip.
///
/// Over empty arrays it costs about a quarter of [`LOAD`]'s PostgreSQL CPU (63 against 208–228
/// µs in the same `pgbench` runs on this project's VM, round trip included): fewer plan nodes to
/// start up, which is most of a small batch's load (`bench/HISTORY.md`, sixteenth pass).
const LOAD_NARROW: &str = concat!(
    "
WITH org AS (
    ",
    org_by_broker_user!(),
    "
), traj AS (
    ",
    trajet_by_ref!(),
    "
), ",
    inbox_by_key!(),
    "
SELECT * FROM
    ",
    org_trajet_inbox_columns!(),
    ",
    (SELECT (SELECT epoch FROM state_epoch) AS state_epoch, now() AS now) AS epoch_"
);

/// One column of [`LOAD`]'s row: an array, `NULL` (no rows) read as empty.
fn column<T>(row: &PgRow, name: &str) -> sqlx::Result<Vec<T>>
where
    for<'r> Vec<T>: sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    Ok(row.try_get::<Option<Vec<T>>, _>(name)?.unwrap_or_default())
}

/// The columns of one table in [`LOAD`]'s row all have `len` entries (one aggregate builds
/// them, so they do unless the statement is broken: then the batch fails instead of panicking).
fn same_length(table: &str, len: usize, others: &[usize]) -> sqlx::Result<()> {
    if others.iter().all(|&n| n == len) {
        Ok(())
    } else {
        Err(sqlx::Error::Decode(
            format!("the {table} columns of the batch load have different lengths").into(),
        ))
    }
}

/// The in-memory view of one batch, with its pending writes.
pub(crate) struct State {
    pub now: OffsetDateTime,
    // Organisations, relations, affiliations and dossiers are shared with the state cache's
    // views (`Arc`), so a batch takes a cached insured without copying them; the rare writes
    // copy on write (`Arc::make_mut`).
    orgs: HashMap<OrgKey, Arc<Org>>,
    org_by_user: HashMap<String, OrgKey>,
    insured: HashMap<String, InsuredFacts>,
    relations: HashMap<String, Arc<Relations>>,
    employer_sepp: HashMap<String, Arc<Affiliations>>,
    dossiers: HashMap<i64, Arc<Dossier>>,
    dossier_by_pseudonym: HashMap<String, i64>,
    trajets: HashMap<TrajetKey, TrajetRow>,
    /// Trajets this batch creates (inserted; every other dirty trajet was loaded, and is updated).
    new_trajets: HashSet<TrajetKey>,
    /// First outcomes by sender, then `message_id` (looked up by `&str`, without building a key).
    inbox: HashMap<String, HashMap<String, Recorded>>,
    /// The outbound messages kept in the inbox rows the load found (see
    /// [`State::republish_stored`]).
    stored_outbound: HashMap<(String, String), Vec<u8>>,
    spare_dossier_ids: Vec<i64>,

    dirty_orgs: BTreeSet<OrgKey>,
    dirty_insured: BTreeSet<String>,
    dirty_relations: BTreeSet<(String, RelKind, String)>,
    dirty_employer_sepp: BTreeSet<(String, String)>,
    dirty_dossiers: BTreeSet<i64>,
    dossier_ops: Vec<DossierOp>,
    dirty_trajets: HashSet<TrajetKey>,
    history: Vec<HistoryRow>,
    new_inbox: Vec<InboxRow>,
    /// Replies and events to publish once the transaction commits.
    pub outbox: Vec<OutboundMessage>,
}

impl State {
    /// Loads everything `needs` names, inside the batch transaction (after its locks), taking
    /// from `cache` the insured whose views are still current, and keeping there those it read.
    /// [`State::now`] is the transaction's time (`now()`), read by the load.
    pub(crate) async fn load(
        conn: &mut PgConnection,
        needs: &Needs,
        cache: &StateCache,
    ) -> sqlx::Result<State> {
        // A batch that replaces a NISS moves relations and dossiers between insured and reads
        // every trajet of their dossiers through them: it reads everything from the tables.
        let (cached_epoch, cached) = if needs.niss_replacements {
            (i64::MIN, HashMap::new())
        } else {
            cache.lookup(needs.pseudonyms.iter())
        };
        let pseudonyms: Vec<&str> = needs
            .pseudonyms
            .iter()
            .filter(|p| !cached.contains_key(*p))
            .map(String::as_str)
            .collect();
        let cached_pseudonyms: Vec<&str> = cached.keys().map(String::as_str).collect();
        let cached_without_dossier = cached.values().filter(|v| v.dossier.is_none()).count();
        let employers: Vec<&str> = needs.employers.iter().map(String::as_str).collect();
        let (org_kinds, org_ids): (Vec<&str>, Vec<&str>) = needs
            .orgs
            .iter()
            .map(|(kind, id)| (kind.as_str(), id.as_str()))
            .unzip();
        let users: Vec<&str> = needs.broker_users.iter().map(String::as_str).collect();
        let (senders, message_ids): (Vec<&str>, Vec<&str>) = needs
            .inbox_keys
            .iter()
            .map(|(s, m)| (s.as_str(), m.as_str()))
            .unzip();
        let (ref_owners, refs): (Vec<&str>, Vec<&str>) = needs
            .trajet_refs
            .iter()
            .map(|(user, reference)| (user.as_str(), reference.as_str()))
            .unzip();
        // Steady traffic needs nothing the cache does not hold but trajets, inbox entries and the
        // senders' organisations: read only those while the cached views are current (and the
        // last load found the epoch still: when it keeps moving, the narrow load would only
        // find that out and cost one more round trip).
        let try_narrow = cache.enabled()
            && cache.epoch_was_still()
            && !needs.niss_replacements
            && pseudonyms.is_empty()
            && cached_without_dossier == 0
            && needs.employers.is_empty()
            && needs.orgs.is_empty();
        let mut narrow_row = None;
        if try_narrow {
            let row = sqlx::query(LOAD_NARROW)
                .bind(&users)
                .bind(&senders)
                .bind(&message_ids)
                .bind(&ref_owners)
                .bind(&refs)
                .fetch_one(&mut *conn)
                .await?;
            let current = row.try_get::<Option<i64>, _>("state_epoch")? == Some(cached_epoch);
            cache.record_narrow_load(current);
            narrow_row = current.then_some(row);
        }
        let narrow = narrow_row.is_some();
        let row = match narrow_row {
            Some(row) => row,
            None => {
                sqlx::query(LOAD)
                    .bind(&users)
                    .bind(&senders)
                    .bind(&message_ids)
                    .bind(&ref_owners)
                    .bind(&refs)
                    .bind(&pseudonyms)
                    .bind(&employers)
                    .bind(&org_kinds)
                    .bind(&org_ids)
                    .bind(i32::try_from(needs.max_new_dossiers).unwrap_or(i32::MAX))
                    .bind(needs.niss_replacements)
                    .bind(cached_epoch)
                    .bind(&cached_pseudonyms)
                    .bind(i32::try_from(cached_without_dossier).unwrap_or(i32::MAX))
                    .fetch_one(&mut *conn)
                    .await?
            }
        };

        let mut state = State {
            now: row.try_get("now")?,
            orgs: HashMap::new(),
            org_by_user: HashMap::new(),
            insured: HashMap::new(),
            relations: HashMap::new(),
            employer_sepp: HashMap::new(),
            dossiers: HashMap::new(),
            dossier_by_pseudonym: HashMap::new(),
            trajets: HashMap::new(),
            new_trajets: HashSet::new(),
            inbox: HashMap::new(),
            stored_outbound: HashMap::new(),
            spare_dossier_ids: Vec::new(),
            dirty_orgs: BTreeSet::new(),
            dirty_insured: BTreeSet::new(),
            dirty_relations: BTreeSet::new(),
            dirty_employer_sepp: BTreeSet::new(),
            dirty_dossiers: BTreeSet::new(),
            dossier_ops: Vec::new(),
            dirty_trajets: HashSet::new(),
            history: Vec::new(),
            new_inbox: Vec::new(),
            outbox: Vec::new(),
        };
        if !narrow {
            state.read_insured(&row)?;
            state.read_relations(&row)?;
            state.read_employer_sepp(&row)?;
            state.read_dossiers(&row)?;
            state.spare_dossier_ids = column(&row, "spare_dossier_ids")?;
        }
        state.read_organisations(&row)?;
        state.read_trajets(&row)?;
        state.read_inbox(&row)?;

        let epoch: Option<i64> = row.try_get("state_epoch")?;
        cache.record_epoch_still(epoch == Some(cached_epoch));
        let everyone: Vec<&str>;
        let read: &[&str] = match epoch {
            // The views are current: the statement read only the others.
            Some(epoch) if epoch == cached_epoch => {
                for (pseudonym, view) in &cached {
                    state.take_view(pseudonym, view);
                }
                cache.record(cached.len(), pseudonyms.len());
                &pseudonyms
            }
            // The views are stale (or there were none): the statement read every insured.
            _ => {
                cache.record(0, needs.pseudonyms.len());
                everyone = needs.pseudonyms.iter().map(String::as_str).collect();
                &everyone
            }
        };
        if let Some(epoch) = epoch.filter(|_| cache.enabled() && !needs.niss_replacements) {
            cache.saw_epoch(epoch);
            for &pseudonym in read {
                if let Some(view) = state.view_of(pseudonym, epoch) {
                    cache.keep(pseudonym.to_owned(), view);
                }
            }
        }
        Ok(state)
    }

    /// What the rules read about one insured besides trajets, as just loaded, to keep for later
    /// batches; `None` for an insured whose NISS was replaced or whose dossier was merged (those
    /// are rare, and always read from the tables).
    fn view_of(&self, pseudonym: &str, epoch: i64) -> Option<InsuredView> {
        let facts = self.insured.get(pseudonym).cloned();
        if facts.as_ref().is_some_and(|f| f.replaced_by.is_some()) {
            return None;
        }
        let dossier = self.shared_dossier_of(pseudonym).cloned();
        if dossier.as_ref().is_some_and(|d| d.merged_into.is_some()) {
            return None;
        }
        let relations = self.relations.get(pseudonym).cloned().unwrap_or_default();
        let mut employer_sepp = Vec::new();
        let mut orgs = Vec::new();
        let mut keep_org = |key: OrgKey| {
            if let Some(org) = self.orgs.get(&key) {
                orgs.push(Arc::clone(org));
            }
        };
        for (kind, id) in relations.keys() {
            match kind {
                RelKind::Oa => keep_org((OrgKind::Oa, id.clone())),
                RelKind::Gp => keep_org((OrgKind::Gp, id.clone())),
                RelKind::Rp => keep_org((OrgKind::Rp, id.clone())),
                RelKind::Employer => {
                    let sepps = self.employer_sepp.get(id).cloned().unwrap_or_default();
                    for sepp in sepps.keys() {
                        keep_org((OrgKind::Sepp, sepp.clone()));
                    }
                    employer_sepp.push((id.clone(), sepps));
                }
            }
        }
        Some(InsuredView {
            epoch,
            facts,
            relations,
            dossier,
            employer_sepp,
            orgs,
        })
    }

    /// Adds a cached view to the batch's state, as if the load had read it (rows the load read
    /// at the same epoch are the same rows, so either copy will do).
    fn take_view(&mut self, pseudonym: &str, view: &InsuredView) {
        if let Some(facts) = &view.facts {
            self.insured.insert(pseudonym.to_owned(), facts.clone());
        }
        if !view.relations.is_empty() {
            self.relations
                .insert(pseudonym.to_owned(), Arc::clone(&view.relations));
        }
        if let Some(dossier) = &view.dossier {
            self.dossier_by_pseudonym
                .insert(pseudonym.to_owned(), dossier.id);
            self.dossiers.insert(dossier.id, Arc::clone(dossier));
        }
        for (employer, sepps) in &view.employer_sepp {
            if !self.employer_sepp.contains_key(employer) {
                self.employer_sepp
                    .insert(employer.clone(), Arc::clone(sepps));
            }
        }
        for org in &view.orgs {
            if let Entry::Vacant(vacant) = self.orgs.entry(org.key()) {
                self.org_by_user
                    .entry(org.broker_user.clone())
                    .or_insert_with(|| vacant.key().clone());
                vacant.insert(Arc::clone(org));
            }
        }
    }

    // ---- reading [`LOAD`]'s row: one function per table ---------------------------------------

    fn read_insured(&mut self, row: &PgRow) -> sqlx::Result<()> {
        let pseudonym: Vec<String> = column(row, "ins_pseudonym")?;
        let died_on: Vec<Option<Date>> = column(row, "ins_died_on")?;
        let mut replaced_by: Vec<Option<String>> = column(row, "ins_replaced_by")?;
        same_length(
            "insured",
            pseudonym.len(),
            &[died_on.len(), replaced_by.len()],
        )?;
        for (i, pseudonym) in pseudonym.into_iter().enumerate() {
            let facts = InsuredFacts {
                died_on: died_on[i],
                replaced_by: replaced_by[i].take(),
            };
            self.insured.insert(pseudonym, facts);
        }
        Ok(())
    }

    fn read_relations(&mut self, row: &PgRow) -> sqlx::Result<()> {
        let pseudonym: Vec<String> = column(row, "rel_pseudonym")?;
        let org_kind: Vec<String> = column(row, "rel_org_kind")?;
        let mut org_id: Vec<String> = column(row, "rel_org_id")?;
        let valid_until: Vec<OffsetDateTime> = column(row, "rel_valid_until")?;
        let others = [org_kind.len(), org_id.len(), valid_until.len()];
        same_length("insured_relation", pseudonym.len(), &others)?;
        for (i, pseudonym) in pseudonym.into_iter().enumerate() {
            if let Some(kind) = RelKind::parse(&org_kind[i]) {
                let org_id = std::mem::take(&mut org_id[i]);
                Arc::make_mut(self.relations.entry(pseudonym).or_default())
                    .insert((kind, org_id), valid_until[i]);
            }
        }
        Ok(())
    }

    fn read_employer_sepp(&mut self, row: &PgRow) -> sqlx::Result<()> {
        let employer: Vec<String> = column(row, "es_employer")?;
        let mut sepp: Vec<String> = column(row, "es_sepp")?;
        let valid_until: Vec<OffsetDateTime> = column(row, "es_valid_until")?;
        same_length(
            "employer_sepp",
            employer.len(),
            &[sepp.len(), valid_until.len()],
        )?;
        for (i, employer) in employer.into_iter().enumerate() {
            Arc::make_mut(self.employer_sepp.entry(employer).or_default())
                .insert(std::mem::take(&mut sepp[i]), valid_until[i]);
        }
        Ok(())
    }

    fn read_organisations(&mut self, row: &PgRow) -> sqlx::Result<()> {
        let kind: Vec<String> = column(row, "org_kind")?;
        let mut id: Vec<String> = column(row, "org_id")?;
        let mut name: Vec<String> = column(row, "org_name")?;
        let mut broker_user: Vec<String> = column(row, "org_broker_user")?;
        let format: Vec<String> = column(row, "org_format")?;
        let others = [id.len(), name.len(), broker_user.len(), format.len()];
        same_length("organisation", kind.len(), &others)?;
        for (i, kind) in kind.iter().enumerate() {
            let Some(kind) = OrgKind::parse(kind) else {
                continue;
            };
            let org = Org {
                kind,
                id: std::mem::take(&mut id[i]),
                name: std::mem::take(&mut name[i]),
                broker_user: std::mem::take(&mut broker_user[i]),
                format: if format[i] == "xml" {
                    Format::Xml
                } else {
                    Format::Json
                },
            };
            self.org_by_user.insert(org.broker_user.clone(), org.key());
            self.orgs.insert(org.key(), Arc::new(org));
        }
        Ok(())
    }

    fn read_dossiers(&mut self, row: &PgRow) -> sqlx::Result<()> {
        let id: Vec<i64> = column(row, "dos_id")?;
        let mut number: Vec<String> = column(row, "dos_number")?;
        let mut pseudonym: Vec<String> = column(row, "dos_pseudonym")?;
        let merged_into: Vec<Option<i64>> = column(row, "dos_merged_into")?;
        let others = [number.len(), pseudonym.len(), merged_into.len()];
        same_length("dossier", id.len(), &others)?;
        for (i, id) in id.into_iter().enumerate() {
            let dossier = Dossier {
                id,
                number: std::mem::take(&mut number[i]),
                pseudonym: std::mem::take(&mut pseudonym[i]),
                merged_into: merged_into[i],
            };
            self.dossier_by_pseudonym
                .insert(dossier.pseudonym.clone(), id);
            self.dossiers.insert(id, Arc::new(dossier));
        }
        Ok(())
    }

    fn read_trajets(&mut self, row: &PgRow) -> sqlx::Result<()> {
        let owner_kind: Vec<String> = column(row, "t_owner_kind")?;
        let mut owner_id: Vec<String> = column(row, "t_owner_id")?;
        let mut reference: Vec<String> = column(row, "t_ref")?;
        let dossier_id: Vec<i64> = column(row, "t_dossier_id")?;
        let trajet_type: Vec<String> = column(row, "t_type")?;
        let mut status: Vec<String> = column(row, "t_status")?;
        let version: Vec<i64> = column(row, "t_version")?;
        let request_received_on: Vec<Option<Date>> = column(row, "t_request_received_on")?;
        let start_on: Vec<Option<Date>> = column(row, "t_start_on")?;
        let end_on: Vec<Option<Date>> = column(row, "t_end_on")?;
        let consent: Vec<Option<String>> = column(row, "t_consent")?;
        let others = [
            owner_id.len(),
            reference.len(),
            dossier_id.len(),
            trajet_type.len(),
            status.len(),
            version.len(),
            request_received_on.len(),
            start_on.len(),
            end_on.len(),
            consent.len(),
        ];
        same_length("trajet", owner_kind.len(), &others)?;
        for (i, owner_kind) in owner_kind.iter().enumerate() {
            let (Some(owner_kind), Some(trajet_type)) = (
                OrgKind::parse(owner_kind),
                TrajetType::parse(&trajet_type[i]),
            ) else {
                continue;
            };
            let key = TrajetKey {
                owner_kind,
                owner_id: std::mem::take(&mut owner_id[i]),
                reference: std::mem::take(&mut reference[i]),
            };
            let trajet = TrajetRow {
                dossier_id: dossier_id[i],
                trajet_type,
                status: std::mem::take(&mut status[i]),
                version: version[i],
                request_received_on: request_received_on[i],
                start_on: start_on[i],
                end_on: end_on[i],
                consent: consent[i].as_deref().and_then(Consent::parse),
            };
            self.trajets.insert(key, trajet);
        }
        Ok(())
    }

    fn read_inbox(&mut self, row: &PgRow) -> sqlx::Result<()> {
        let sender: Vec<String> = column(row, "inbox_sender")?;
        let mut message_id: Vec<String> = column(row, "inbox_message_id")?;
        let status: Vec<String> = column(row, "inbox_status")?;
        let mut code: Vec<Option<String>> = column(row, "inbox_code")?;
        let mut detail: Vec<Option<String>> = column(row, "inbox_detail")?;
        let mut result: Vec<Option<String>> = column(row, "inbox_result")?;
        let mut stored: Vec<Option<Vec<u8>>> = column(row, "inbox_outbound")?;
        let others = [
            message_id.len(),
            status.len(),
            code.len(),
            detail.len(),
            result.len(),
            stored.len(),
        ];
        same_length("inbox", sender.len(), &others)?;
        for (i, sender) in sender.into_iter().enumerate() {
            let outcome = Outcome {
                status: Status::parse(&status[i]).unwrap_or(Status::Rejected),
                code: code[i].take(),
                detail: detail[i].take().unwrap_or_default(),
                result: crate::outcome::stored_result(result[i].take()),
            };
            let message_id = std::mem::take(&mut message_id[i]);
            if let Some(stored) = stored[i].take() {
                self.stored_outbound
                    .insert((sender.clone(), message_id.clone()), stored);
            }
            self.inbox
                .entry(sender)
                .or_default()
                .insert(message_id, Recorded::Loaded(outcome));
        }
        Ok(())
    }

    // ---- reads -------------------------------------------------------------------------------

    /// The first outcome recorded for this idempotency key, in the database or earlier in the batch.
    pub(crate) fn recorded_outcome(&self, sender: &str, message_id: &str) -> Option<&Outcome> {
        match self.inbox.get(sender)?.get(message_id)? {
            Recorded::Loaded(outcome) => Some(outcome),
            Recorded::New(row) => self.new_inbox.get(*row).map(|row| &row.outcome),
        }
    }

    /// The organisation a broker user publishes as.
    pub(crate) fn org_by_user(&self, user: &str) -> Option<&Arc<Org>> {
        self.org_by_user.get(user).and_then(|k| self.orgs.get(k))
    }

    /// The pseudonym that now stands for `pseudonym` (after NISS replacements).
    pub(crate) fn resolve(&self, pseudonym: &str) -> String {
        let mut current = pseudonym;
        for _ in 0..4 {
            match self
                .insured
                .get(current)
                .and_then(|f| f.replaced_by.as_deref())
            {
                Some(next) if next != current => current = next,
                _ => break,
            }
        }
        current.to_owned()
    }

    /// Date of death, when the National Register reported one.
    pub(crate) fn died_on(&self, pseudonym: &str) -> Option<Date> {
        self.insured.get(pseudonym).and_then(|f| f.died_on)
    }

    fn relation_current(&self, pseudonym: &str, kind: RelKind, org_id: &str) -> bool {
        // A scan of the insured's few relations: no key to build (and allocate) for a lookup.
        self.relations.get(pseudonym).is_some_and(|r| {
            r.iter()
                .any(|((k, id), until)| *k == kind && id == org_id && *until > self.now)
        })
    }

    fn current_related(&self, pseudonym: &str, kind: RelKind) -> Vec<&str> {
        self.relations
            .get(pseudonym)
            .map(|r| {
                r.iter()
                    .filter(|((k, _), until)| *k == kind && **until > self.now)
                    .map(|((_, id), _)| id.as_str())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn current_sepps_of_employer(&self, employer: &str) -> Vec<&str> {
        self.employer_sepp
            .get(employer)
            .map(|s| {
                s.iter()
                    .filter(|(_, until)| **until > self.now)
                    .map(|(id, _)| id.as_str())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// DOMAIN.md §2.1: does this organisation have access to the insured's dossier?
    pub(crate) fn has_access(&self, org: &OrgKey, pseudonym: &str) -> bool {
        match org.0 {
            OrgKind::Oa => self.relation_current(pseudonym, RelKind::Oa, &org.1),
            OrgKind::Gp => self.relation_current(pseudonym, RelKind::Gp, &org.1),
            OrgKind::Sepp => self
                .current_related(pseudonym, RelKind::Employer)
                .into_iter()
                .any(|employer| {
                    self.current_sepps_of_employer(employer)
                        .contains(&org.1.as_str())
                }),
            OrgKind::Rp => false,
        }
    }

    /// Every OA, SEPP and GP with a current relation to the insured, sorted, with the format each
    /// receives in (JSON when the organisation is not registered).
    pub(crate) fn related_actors(&self, pseudonym: &str) -> Vec<(OrgKey, Format)> {
        let mut keys: BTreeSet<OrgKey> = BTreeSet::new();
        for id in self.current_related(pseudonym, RelKind::Oa) {
            keys.insert((OrgKind::Oa, id.to_owned()));
        }
        for id in self.current_related(pseudonym, RelKind::Gp) {
            keys.insert((OrgKind::Gp, id.to_owned()));
        }
        for employer in self.current_related(pseudonym, RelKind::Employer) {
            for sepp in self.current_sepps_of_employer(employer) {
                keys.insert((OrgKind::Sepp, sepp.to_owned()));
            }
        }
        keys.into_iter()
            .map(|key| {
                let format = self.orgs.get(&key).map(|o| o.format).unwrap_or_default();
                (key, format)
            })
            .collect()
    }

    /// The live dossier of an insured.
    pub(crate) fn dossier_of(&self, pseudonym: &str) -> Option<&Dossier> {
        self.shared_dossier_of(pseudonym).map(Arc::as_ref)
    }

    fn shared_dossier_of(&self, pseudonym: &str) -> Option<&Arc<Dossier>> {
        self.dossier_by_pseudonym
            .get(pseudonym)
            .and_then(|id| self.dossiers.get(id))
    }

    /// A trajet by its identity.
    pub(crate) fn trajet(&self, key: &TrajetKey) -> Option<&TrajetRow> {
        self.trajets.get(key)
    }

    // ---- writes ------------------------------------------------------------------------------

    /// Records the outcome of a message (inbox), so a later duplicate repeats it, with the
    /// outbound messages it caused: those pushed to [`State::outbox`] from `outbound_from` on.
    pub(crate) fn record_outcome(
        &mut self,
        sender: &str,
        message_id: &str,
        message_type: &'static str,
        outcome: &Outcome,
        dossier_id: Option<i64>,
        outbound_from: usize,
    ) {
        let recorded = Recorded::New(self.new_inbox.len());
        match self.inbox.get_mut(sender) {
            Some(of_sender) => {
                of_sender.insert(message_id.to_owned(), recorded);
            }
            None => {
                let of_sender = HashMap::from([(message_id.to_owned(), recorded)]);
                self.inbox.insert(sender.to_owned(), of_sender);
            }
        }
        self.new_inbox.push(InboxRow {
            sender: sender.to_owned(),
            message_id: message_id.to_owned(),
            message_type,
            outcome: outcome.clone(),
            dossier_id,
            outbound: outbound_from..self.outbox.len(),
        });
    }

    /// Queues again, once per batch, the outbound messages a committed first outcome of this
    /// idempotency key caused — its events and its reply — as its inbox row kept them, when the
    /// broker says it delivered this message before (`redelivered`).
    ///
    /// The inbound message is acknowledged only once all of them were confirmed, so a
    /// redelivery that finds its outcome already committed follows a crash, a lost channel or
    /// a stop between that commit and the confirms: what the first delivery caused goes out
    /// again, with its own stable `message_id`s (CONTRACT.md §4, §5), before the duplicate's
    /// reply. A sender's own re-send of a message (not `redelivered`) found the first delivery
    /// acknowledged, so everything it caused confirmed: it gets the `duplicate` reply only.
    ///
    /// # Errors
    /// When the stored bytes cannot be read (a corrupted row).
    pub(crate) fn republish_stored(
        &mut self,
        sender: &str,
        message_id: &str,
        redelivered: bool,
    ) -> Result<(), HandlerBug> {
        if !redelivered {
            return Ok(());
        }
        let key = (sender.to_owned(), message_id.to_owned());
        if let Some(stored) = self.stored_outbound.remove(&key) {
            let result = self
                .recorded_outcome(sender, message_id)
                .map_or("{}", |first| first.result.get());
            let messages = outbound::decode_stored(&stored, result).map_err(|e| {
                HandlerBug(format!(
                    "the outbound messages kept for message {message_id} cannot be read: {e}"
                ))
            })?;
            self.outbox.extend(messages);
        }
        Ok(())
    }

    /// Registers or updates an organisation.
    pub(crate) fn upsert_org(&mut self, org: Org) {
        self.org_by_user.retain(|_, key| *key != org.key());
        self.org_by_user.insert(org.broker_user.clone(), org.key());
        self.dirty_orgs.insert(org.key());
        self.orgs.insert(org.key(), Arc::new(org));
    }

    /// Sets (or with `None`, ends) an insured's relation to an organisation.
    pub(crate) fn set_relation(
        &mut self,
        pseudonym: &str,
        kind: RelKind,
        org_id: &str,
        valid_until: Option<OffsetDateTime>,
    ) {
        let relations = Arc::make_mut(self.relations.entry(pseudonym.to_owned()).or_default());
        match valid_until {
            Some(until) => {
                relations.insert((kind, org_id.to_owned()), until);
            }
            None => {
                relations.remove(&(kind, org_id.to_owned()));
            }
        }
        self.dirty_relations
            .insert((pseudonym.to_owned(), kind, org_id.to_owned()));
    }

    /// Sets (or with `None`, ends) an employer's affiliation with a SEPP.
    pub(crate) fn set_employer_sepp(
        &mut self,
        employer: &str,
        sepp: &str,
        valid_until: Option<OffsetDateTime>,
    ) {
        let sepps = Arc::make_mut(self.employer_sepp.entry(employer.to_owned()).or_default());
        match valid_until {
            Some(until) => {
                sepps.insert(sepp.to_owned(), until);
            }
            None => {
                sepps.remove(sepp);
            }
        }
        self.dirty_employer_sepp
            .insert((employer.to_owned(), sepp.to_owned()));
    }

    /// Records or clears a death.
    pub(crate) fn set_died_on(&mut self, pseudonym: &str, died_on: Option<Date>) {
        self.insured
            .entry(pseudonym.to_owned())
            .or_default()
            .died_on = died_on;
        self.dirty_insured.insert(pseudonym.to_owned());
    }

    /// The insured's dossier, created (with a number) when there is none. Returns it and whether it
    /// was created.
    ///
    /// # Errors
    /// When the batch ran out of pre-allocated dossier ids (a bug in the needs computation).
    pub(crate) fn dossier_or_create(
        &mut self,
        pseudonym: &str,
        actor: &OrgKey,
    ) -> Result<(Arc<Dossier>, bool), String> {
        if let Some(dossier) = self.shared_dossier_of(pseudonym) {
            return Ok((Arc::clone(dossier), false));
        }
        let id = self
            .spare_dossier_ids
            .pop()
            .ok_or_else(|| "no pre-allocated dossier id left in the batch".to_owned())?;
        let dossier = Arc::new(Dossier {
            id,
            number: dossier_number(id),
            pseudonym: pseudonym.to_owned(),
            merged_into: None,
        });
        self.dossier_by_pseudonym.insert(pseudonym.to_owned(), id);
        self.dossiers.insert(id, Arc::clone(&dossier));
        self.dirty_dossiers.insert(id);
        self.add_history(HistoryRow {
            dossier_id: id,
            actor: actor.clone(),
            resource: "dossier_trio",
            operation: "dossier_created",
            detail: crate::outcome::empty_object(),
        });
        Ok((dossier, true))
    }

    /// Creates or updates a trajet.
    pub(crate) fn put_trajet(&mut self, key: TrajetKey, row: TrajetRow) {
        if self.trajets.insert(key.clone(), row).is_none() {
            self.new_trajets.insert(key.clone());
        }
        self.dirty_trajets.insert(key);
    }

    /// Adds a history line.
    pub(crate) fn add_history(&mut self, row: HistoryRow) {
        self.history.push(row);
    }

    /// NISS replacement: moves the old pseudonym's relations, facts and dossier to the new one,
    /// merging dossiers when both exist (CONTRACT.md §3). Returns the surviving dossier, if any.
    ///
    /// # Errors
    /// When the merge's history detail does not encode (a bug; the batch then fails whole).
    pub(crate) fn replace_pseudonym(
        &mut self,
        old: &str,
        new: &str,
        actor: &OrgKey,
    ) -> serde_json::Result<Option<i64>> {
        let old_facts = self.insured.get(old).cloned().unwrap_or_default();
        let new_facts = self.insured.entry(new.to_owned()).or_default();
        if new_facts.died_on.is_none() && old_facts.died_on.is_some() {
            new_facts.died_on = old_facts.died_on;
            self.dirty_insured.insert(new.to_owned());
        }
        self.insured.entry(old.to_owned()).or_default().replaced_by = Some(new.to_owned());
        self.dirty_insured.insert(old.to_owned());

        let moved: Vec<((RelKind, String), OffsetDateTime)> = self
            .relations
            .remove(old)
            .map(|r| Arc::unwrap_or_clone(r).into_iter().collect())
            .unwrap_or_default();
        for ((kind, org_id), until) in moved {
            self.dirty_relations
                .insert((old.to_owned(), kind, org_id.clone()));
            let target = Arc::make_mut(self.relations.entry(new.to_owned()).or_default());
            let entry = target.entry((kind, org_id.clone())).or_insert(until);
            if *entry < until {
                *entry = until;
            }
            self.dirty_relations.insert((new.to_owned(), kind, org_id));
        }

        let old_dossier = self.dossier_by_pseudonym.get(old).copied();
        let new_dossier = self.dossier_by_pseudonym.get(new).copied();
        Ok(match (old_dossier, new_dossier) {
            (None, survivor) => survivor,
            (Some(id), None) => {
                self.dossier_by_pseudonym.remove(old);
                self.dossier_by_pseudonym.insert(new.to_owned(), id);
                if let Some(d) = self.dossiers.get_mut(&id) {
                    Arc::make_mut(d).pseudonym = new.to_owned();
                }
                self.dirty_dossiers.insert(id);
                self.add_history(HistoryRow {
                    dossier_id: id,
                    actor: actor.clone(),
                    resource: "dossier_trio",
                    operation: "niss_replaced",
                    detail: crate::outcome::empty_object(),
                });
                Some(id)
            }
            (Some(from), Some(into)) => {
                self.dossier_by_pseudonym.remove(old);
                if let Some(d) = self.dossiers.get_mut(&from) {
                    Arc::make_mut(d).merged_into = Some(into);
                }
                self.dirty_dossiers.insert(from);
                let keys: Vec<TrajetKey> = self
                    .trajets
                    .iter()
                    .filter(|(_, t)| t.dossier_id == from)
                    .map(|(k, _)| k.clone())
                    .collect();
                for key in keys {
                    if let Some(t) = self.trajets.get_mut(&key) {
                        t.dossier_id = into;
                    }
                    self.dirty_trajets.insert(key);
                }
                for h in &mut self.history {
                    if h.dossier_id == from {
                        h.dossier_id = into;
                    }
                }
                self.dossier_ops.push(DossierOp::MoveHistory { from, into });
                let from_number = self.dossiers.get(&from).map(|d| d.number.clone());
                self.add_history(HistoryRow {
                    dossier_id: into,
                    actor: actor.clone(),
                    resource: "dossier_trio",
                    operation: "dossier_merged",
                    detail: serde_json::value::to_raw_value(
                        &serde_json::json!({ "merged_dossier_number": from_number }),
                    )?,
                });
                Some(into)
            }
        })
    }

    /// Writes every pending change with one statement per table; returns the outbound messages
    /// to publish once the transaction commits.
    pub(crate) async fn flush(
        &mut self,
        conn: &mut PgConnection,
    ) -> sqlx::Result<Vec<OutboundMessage>> {
        self.flush_orgs(conn).await?;
        self.flush_insured(conn).await?;
        self.flush_relations(conn).await?;
        self.flush_employer_sepp(conn).await?;
        self.flush_dossiers(conn).await?;
        for op in std::mem::take(&mut self.dossier_ops) {
            match op {
                DossierOp::MoveHistory { from, into } => {
                    sqlx::query("UPDATE history SET dossier_id = $2 WHERE dossier_id = $1")
                        .bind(from)
                        .bind(into)
                        .execute(&mut *conn)
                        .await?;
                }
            }
        }
        self.flush_hot(conn).await
    }

    async fn flush_orgs(&mut self, conn: &mut PgConnection) -> sqlx::Result<()> {
        if self.dirty_orgs.is_empty() {
            return Ok(());
        }
        let orgs: Vec<&Org> = self
            .dirty_orgs
            .iter()
            .filter_map(|k| self.orgs.get(k).map(Arc::as_ref))
            .collect();
        // A broker user moving between organisations must first leave the old one.
        let users: Vec<&str> = orgs.iter().map(|o| o.broker_user.as_str()).collect();
        let (kinds, ids): (Vec<&str>, Vec<&str>) = orgs
            .iter()
            .map(|o| (o.kind.as_str(), o.id.as_str()))
            .unzip();
        sqlx::query(
            "DELETE FROM organisation WHERE broker_user = ANY($1) \
             AND (kind, id) NOT IN (SELECT * FROM UNNEST($2::text[], $3::text[]))",
        )
        .bind(&users)
        .bind(&kinds)
        .bind(&ids)
        .execute(&mut *conn)
        .await?;
        sqlx::query(
            "INSERT INTO organisation (kind, id, name, broker_user, format) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]) \
             ON CONFLICT (kind, id) DO UPDATE SET name = EXCLUDED.name, \
                broker_user = EXCLUDED.broker_user, format = EXCLUDED.format, updated_at = now()",
        )
        .bind(&kinds)
        .bind(&ids)
        .bind(orgs.iter().map(|o| o.name.as_str()).collect::<Vec<_>>())
        .bind(&users)
        .bind(orgs.iter().map(|o| o.format.as_str()).collect::<Vec<_>>())
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    async fn flush_insured(&mut self, conn: &mut PgConnection) -> sqlx::Result<()> {
        if self.dirty_insured.is_empty() {
            return Ok(());
        }
        let mut pseudonyms = Vec::new();
        let mut died = Vec::new();
        let mut replaced = Vec::new();
        for p in &self.dirty_insured {
            let facts = self.insured.get(p).cloned().unwrap_or_default();
            pseudonyms.push(p.as_str());
            died.push(facts.died_on);
            replaced.push(facts.replaced_by);
        }
        sqlx::query(
            "INSERT INTO insured (pseudonym, died_on, replaced_by) \
             SELECT * FROM UNNEST($1::text[], $2::date[], $3::text[]) \
             ON CONFLICT (pseudonym) DO UPDATE SET died_on = EXCLUDED.died_on, \
                replaced_by = EXCLUDED.replaced_by",
        )
        .bind(&pseudonyms)
        .bind(&died)
        .bind(&replaced)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    async fn flush_relations(&mut self, conn: &mut PgConnection) -> sqlx::Result<()> {
        if self.dirty_relations.is_empty() {
            return Ok(());
        }
        let (mut up_p, mut up_k, mut up_o, mut up_u) = (vec![], vec![], vec![], vec![]);
        let (mut del_p, mut del_k, mut del_o) = (vec![], vec![], vec![]);
        for (p, kind, org) in &self.dirty_relations {
            match self
                .relations
                .get(p)
                .and_then(|r| r.get(&(*kind, org.clone())))
            {
                Some(until) => {
                    up_p.push(p.as_str());
                    up_k.push(kind.as_str());
                    up_o.push(org.as_str());
                    up_u.push(*until);
                }
                None => {
                    del_p.push(p.as_str());
                    del_k.push(kind.as_str());
                    del_o.push(org.as_str());
                }
            }
        }
        if !del_p.is_empty() {
            sqlx::query(
                "DELETE FROM insured_relation WHERE (pseudonym, org_kind, org_id) IN \
                 (SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[]))",
            )
            .bind(&del_p)
            .bind(&del_k)
            .bind(&del_o)
            .execute(&mut *conn)
            .await?;
        }
        if !up_p.is_empty() {
            sqlx::query(
                "INSERT INTO insured_relation (pseudonym, org_kind, org_id, valid_until) \
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::timestamptz[]) \
                 ON CONFLICT (pseudonym, org_kind, org_id) \
                 DO UPDATE SET valid_until = EXCLUDED.valid_until",
            )
            .bind(&up_p)
            .bind(&up_k)
            .bind(&up_o)
            .bind(&up_u)
            .execute(&mut *conn)
            .await?;
        }
        Ok(())
    }

    async fn flush_employer_sepp(&mut self, conn: &mut PgConnection) -> sqlx::Result<()> {
        if self.dirty_employer_sepp.is_empty() {
            return Ok(());
        }
        let (mut up_e, mut up_s, mut up_u) = (vec![], vec![], vec![]);
        let (mut del_e, mut del_s) = (vec![], vec![]);
        for (employer, sepp) in &self.dirty_employer_sepp {
            match self.employer_sepp.get(employer).and_then(|s| s.get(sepp)) {
                Some(until) => {
                    up_e.push(employer.as_str());
                    up_s.push(sepp.as_str());
                    up_u.push(*until);
                }
                None => {
                    del_e.push(employer.as_str());
                    del_s.push(sepp.as_str());
                }
            }
        }
        if !del_e.is_empty() {
            sqlx::query(
                "DELETE FROM employer_sepp WHERE (employer, sepp) IN \
                 (SELECT * FROM UNNEST($1::text[], $2::text[]))",
            )
            .bind(&del_e)
            .bind(&del_s)
            .execute(&mut *conn)
            .await?;
        }
        if !up_e.is_empty() {
            sqlx::query(
                "INSERT INTO employer_sepp (employer, sepp, valid_until) \
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::timestamptz[]) \
                 ON CONFLICT (employer, sepp) DO UPDATE SET valid_until = EXCLUDED.valid_until",
            )
            .bind(&up_e)
            .bind(&up_s)
            .bind(&up_u)
            .execute(&mut *conn)
            .await?;
        }
        Ok(())
    }

    async fn flush_dossiers(&mut self, conn: &mut PgConnection) -> sqlx::Result<()> {
        if self.dirty_dossiers.is_empty() {
            return Ok(());
        }
        let dossiers: Vec<&Dossier> = self
            .dirty_dossiers
            .iter()
            .filter_map(|id| self.dossiers.get(id).map(Arc::as_ref))
            .collect();
        sqlx::query(
            "INSERT INTO dossier (id, number, pseudonym, merged_into) \
             SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::bigint[]) \
             ON CONFLICT (id) DO UPDATE SET pseudonym = EXCLUDED.pseudonym, \
                merged_into = EXCLUDED.merged_into",
        )
        .bind(dossiers.iter().map(|d| d.id).collect::<Vec<_>>())
        .bind(
            dossiers
                .iter()
                .map(|d| d.number.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            dossiers
                .iter()
                .map(|d| d.pseudonym.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(dossiers.iter().map(|d| d.merged_into).collect::<Vec<_>>())
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// The tables every message writes — trajets, history and the inbox, whose rows keep the
    /// outbound messages each inbound message caused — in one statement (one data-modifying
    /// CTE each: they run once, in full, whether or not the final statement reads them; foreign
    /// keys are checked when the statement ends).
    /// Returns the outbound messages; fails when a trajet the load found was not updated (see
    /// [`FLUSH_HOT`]).
    async fn flush_hot(&mut self, conn: &mut PgConnection) -> sqlx::Result<Vec<OutboundMessage>> {
        if self.dirty_trajets.is_empty() && self.history.is_empty() && self.new_inbox.is_empty() {
            // Only duplicates: their replies (and what they publish again) write nothing.
            return Ok(std::mem::take(&mut self.outbox));
        }
        let t: Vec<(&TrajetKey, &TrajetRow)> = self
            .dirty_trajets
            .iter()
            .filter_map(|k| self.trajets.get(k).map(|t| (k, t)))
            .collect();
        // Whether the load found each trajet: found ones are updated, the others inserted.
        let loaded: Vec<bool> = t
            .iter()
            .map(|(k, _)| !self.new_trajets.contains(k))
            .collect();
        let h = &self.history;
        let i = &self.new_inbox;
        let stored = i
            .iter()
            .map(|r| {
                let caused = &self.outbox[r.outbound.clone()];
                (!caused.is_empty())
                    .then(|| outbound::encode_stored(caused, r.outcome.result.get()))
                    .transpose()
            })
            .collect::<Result<Vec<Option<Vec<u8>>>, _>>()
            .map_err(|e| sqlx::Error::Encode(e.into()))?;
        let row = sqlx::query(FLUSH_HOT)
            .bind(
                t.iter()
                    .map(|(k, _)| k.owner_kind.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(
                t.iter()
                    .map(|(k, _)| k.owner_id.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(
                t.iter()
                    .map(|(k, _)| k.reference.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(t.iter().map(|(_, t)| t.dossier_id).collect::<Vec<_>>())
            .bind(
                t.iter()
                    .map(|(_, t)| t.trajet_type.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(t.iter().map(|(_, t)| t.status.as_str()).collect::<Vec<_>>())
            .bind(t.iter().map(|(_, t)| t.version).collect::<Vec<_>>())
            .bind(
                t.iter()
                    .map(|(_, t)| t.request_received_on)
                    .collect::<Vec<_>>(),
            )
            .bind(t.iter().map(|(_, t)| t.start_on).collect::<Vec<_>>())
            .bind(t.iter().map(|(_, t)| t.end_on).collect::<Vec<_>>())
            .bind(
                t.iter()
                    .map(|(_, t)| t.consent.map(Consent::as_str))
                    .collect::<Vec<_>>(),
            )
            .bind(h.iter().map(|r| r.dossier_id).collect::<Vec<_>>())
            .bind(h.iter().map(|r| r.actor.0.as_str()).collect::<Vec<_>>())
            .bind(h.iter().map(|r| r.actor.1.as_str()).collect::<Vec<_>>())
            .bind(h.iter().map(|r| r.resource).collect::<Vec<_>>())
            .bind(h.iter().map(|r| r.operation).collect::<Vec<_>>())
            .bind(h.iter().map(|r| r.detail.get()).collect::<Vec<_>>())
            .bind(i.iter().map(|r| r.sender.as_str()).collect::<Vec<_>>())
            .bind(i.iter().map(|r| r.message_id.as_str()).collect::<Vec<_>>())
            .bind(i.iter().map(|r| r.message_type).collect::<Vec<_>>())
            .bind(
                i.iter()
                    .map(|r| r.outcome.status.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(
                i.iter()
                    .map(|r| r.outcome.code.as_deref())
                    .collect::<Vec<_>>(),
            )
            .bind(
                i.iter()
                    .map(|r| r.outcome.detail.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(i.iter().map(|r| r.outcome.result.get()).collect::<Vec<_>>())
            .bind(i.iter().map(|r| r.dossier_id).collect::<Vec<_>>())
            .bind(&stored)
            .bind(&loaded)
            .fetch_one(&mut *conn)
            .await?;
        let found = loaded.iter().filter(|&&s| s).count();
        let updated: i64 = row.try_get("trajets_updated")?;
        if usize::try_from(updated).ok() != Some(found) {
            return Err(sqlx::Error::Decode(
                format!(
                    "the flush updated {updated} of the {found} trajets the batch loaded: a \
                     writer deleted one without taking the batch's locks"
                )
                .into(),
            ));
        }
        Ok(std::mem::take(&mut self.outbox))
    }
}

/// [`State::flush_hot`]'s statement: trajets written (`$1`–`$11`, and `$27`: whether the load
/// found the row), history appended (`$12`–`$17`), outcomes recorded in the inbox (`$18`–`$25`)
/// with the outbound messages each caused (`$26`). It returns one row: how many trajets it
/// updated.
///
/// The outbound messages have no table of their own on this path: the inbox row keeps them, and
/// the inbound message stays unacknowledged until the broker confirmed them all, so the broker's
/// redelivery of an unacknowledged message is what publishes them again after a crash (see
/// [`State::republish_stored`]). An outbox row and its deletion per message (three index entries
/// and a delete record in the WAL) were the price of the previous design.
///
/// Trajets the load found are updated, the others inserted, both plainly: the batch holds the
/// lock of every trajet it writes (its key's, or its insured's) and loaded it after taking it.
/// `INSERT … ON CONFLICT DO UPDATE` would write a row-lock WAL record before each update. A
/// found trajet the `UPDATE` misses (a writer that deleted it without those locks) would leave
/// an outcome and a `trajet.updated` for a write that did not happen, so the caller counts the
/// updated rows and fails the batch when one is missing.
///
/// The inbox rows are plain inserts: the batch holds the advisory lock of each idempotency key
/// and loaded the inbox after taking it, so a key already recorded was answered as a duplicate
/// and is not among them (an `ON CONFLICT` clause would make PostgreSQL insert speculatively and
/// write one more WAL record per message for nothing; a conflict would be a bug, and fails the
/// batch).
const FLUSH_HOT: &str = "
WITH written AS (
    SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[],
                         $6::text[], $7::bigint[], $8::date[], $9::date[], $10::date[],
                         $11::text[], $27::bool[])
        AS w(owner_kind, owner_id, ref, dossier_id, type, status, version,
             request_received_on, start_on, end_on, consent, loaded)
), updated AS (
    UPDATE trajet t SET
        dossier_id = w.dossier_id, status = w.status, version = w.version,
        request_received_on = w.request_received_on, start_on = w.start_on,
        end_on = w.end_on, consent = w.consent, updated_at = now()
    FROM written w
    WHERE w.loaded AND t.owner_kind = w.owner_kind AND t.owner_id = w.owner_id
      AND t.ref = w.ref
    RETURNING 1
), created AS (
    INSERT INTO trajet (owner_kind, owner_id, ref, dossier_id, type, status, version,
                        request_received_on, start_on, end_on, consent)
    SELECT owner_kind, owner_id, ref, dossier_id, type, status, version,
           request_received_on, start_on, end_on, consent
    FROM written WHERE NOT loaded
), history_lines AS (
    INSERT INTO history (dossier_id, actor_kind, actor_id, resource, operation, detail)
    SELECT d, ak, ai, r, o, de::jsonb
    FROM UNNEST($12::bigint[], $13::text[], $14::text[], $15::text[], $16::text[],
                $17::text[]) AS h(d, ak, ai, r, o, de)
), outcomes AS (
    INSERT INTO inbox (sender, message_id, type, status, code, detail, result, dossier_id,
                       outbound)
    SELECT s, m, t, st, c, d, r, di, o
    FROM UNNEST($18::text[], $19::text[], $20::text[], $21::text[], $22::text[], $23::text[],
                $24::text[], $25::bigint[], $26::bytea[]) AS i(s, m, t, st, c, d, r, di, o)
)
SELECT count(*) AS trajets_updated FROM updated";

/// The stable, human-quotable dossier number («numéro du dossier»).
pub(crate) fn dossier_number(id: i64) -> String {
    format!("TRIO-{id:08}")
}
