//! One batch of inbound messages, one transaction.
//!
//! 1. **prepare** (no locks held): parse each NISS, pseudonymise them all at once (cached, so no
//!    P-521 work for an insured already seen), and get their in-transit forms;
//! 2. **lock**: PostgreSQL transaction-scoped advisory locks on every insured, idempotency key and
//!    upserted trajet of the batch, taken in sorted order (so concurrent batches and processes
//!    never deadlock, and never apply two messages for one insured, one key or one trajet in
//!    overlapping transactions);
//! 3. **load** the batch's view of the database ([`State`]) in one statement;
//! 4. **apply** each message in delivery order: duplicate check, sender authentication, the
//!    message type's handler; outcome, reply and events recorded in memory;
//! 5. **flush** (one statement for the tables every message writes, one per table for the rarer
//!    writes), and **commit**. The caller publishes the outbound messages, and acks once the
//!    broker confirmed them (each inbox row keeps what its message caused, so a redelivery of a
//!    message committed but not acknowledged publishes it again).

use crate::context::Context;
use crate::inbound::{Inbound, SourceQueue};
use crate::messages::{self, Decision, HandlerBug, Pseudonyms, Sender};
use crate::outbound::{self, OutboundMessage};
use crate::outcome::{Outcome, RejectCode, Rejection};
use crate::state::{Needs, State};
use serde_json::value::{RawValue, to_raw_value};
use sha2::{Digest, Sha256};
use sqlx::pool::PoolConnection;
use sqlx::{Connection, Executor as _, PgConnection, PgPool, Postgres};
use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};
use trio_pseudo::{AtRest, Niss};
use trio_schemas::{Message, OrgKind, RawNiss, Relation};

/// The database connection a worker runs its batches on, kept from one batch to the next.
///
/// Taking a connection from sqlx's pool for each batch cost a round trip per batch: sqlx pings
/// every connection given back to it (0.8, unconditionally). A worker runs one batch at a time,
/// so it keeps one. A batch that fails closes it, and one that panics returns it to the pool
/// (which tests it, and rolls back what the batch left open); the next batch takes a connection
/// from the pool. A connection kept longer than its hold limit ([`HOLD_AT_MOST`] by default) is
/// given back before the next batch and one taken again, so that the pool's own limits
/// (`max_lifetime`, 30 minutes by default) apply to it too.
pub struct HeldConnection {
    /// The connection kept, and when it was taken from the pool.
    held: Option<(PoolConnection<Postgres>, Instant)>,
    hold_at_most: Duration,
}

/// How long a worker keeps one connection before giving it back to the pool and taking one
/// again: a ping and a look for the prepared statement every five minutes, so that a
/// connection the pool would retire (past its `max_lifetime`) does not live on in a worker.
pub const HOLD_AT_MOST: Duration = Duration::from_secs(300);

impl Default for HeldConnection {
    fn default() -> Self {
        Self::holding_at_most(HOLD_AT_MOST)
    }
}

impl HeldConnection {
    /// No connection yet; each one taken is given back to the pool at the first batch after
    /// `limit`.
    #[must_use]
    pub fn holding_at_most(limit: Duration) -> Self {
        Self {
            held: None,
            hold_at_most: limit,
        }
    }

    /// The connection kept, or one from `pool` on which [`PREPARE_LOCKS`] was run (unless
    /// it already was: a connection given back to the pool keeps it), with when it was taken.
    async fn take(&mut self, pool: &PgPool) -> sqlx::Result<(PoolConnection<Postgres>, Instant)> {
        match self.held.take() {
            Some((conn, since)) if since.elapsed() < self.hold_at_most => {
                return Ok((conn, since));
            }
            // Back to the pool, which retires it if past its lifetime.
            Some((conn, _)) => drop(conn),
            None => {}
        }
        let mut conn = pool.acquire().await?;
        let prepared: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT FROM pg_prepared_statements WHERE name = 'trio_batch_locks')",
        )
        .fetch_one(&mut *conn)
        .await?;
        if !prepared {
            conn.execute(PREPARE_LOCKS).await?;
        }
        Ok((conn, Instant::now()))
    }
}

/// What a committed batch produced.
#[derive(Debug)]
pub struct BatchResult {
    /// One outcome per inbound message, in batch order.
    pub outcomes: Vec<Outcome>,
    /// Replies and events committed with the outcomes, to publish now; the inbound messages
    /// are to be acknowledged only once the broker confirmed every one of them.
    pub outbound: Vec<OutboundMessage>,
}

/// Why a batch was not committed.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// The database is unreachable, restarting, or a lock conflict was detected: retry the same
    /// batch later; never dead-letter for this.
    #[error("transient: {0}")]
    Transient(String),
    /// A bug or an unexpected database error: retry message by message to isolate the culprit.
    #[error("failed: {0}")]
    Failed(String),
}

impl From<sqlx::Error> for BatchError {
    fn from(e: sqlx::Error) -> Self {
        if is_transient(&e) {
            BatchError::Transient(e.to_string())
        } else {
            BatchError::Failed(e.to_string())
        }
    }
}

impl From<HandlerBug> for BatchError {
    fn from(e: HandlerBug) -> Self {
        BatchError::Failed(e.to_string())
    }
}

/// Connection loss, server shutdown, serialization failure or deadlock: worth retrying as is.
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08")
                || code.starts_with("53")
                || code.starts_with("57P")
                || code == "40001"
                || code == "40P01"
                || code == "55P03"
        }),
        _ => false,
    }
}

/// The NISS fields of a message, in a fixed order.
fn niss_fields(message: &Message) -> Vec<&RawNiss> {
    match message {
        Message::OrganisationUpsert(_) => vec![],
        Message::DossierOpen(m) => vec![&m.niss],
        Message::TrajetUpsert(m) => vec![&m.niss],
        Message::RelationSet(m) => relation_niss(&m.relation),
        Message::RelationUnset(m) => relation_niss(&m.relation),
    }
}

fn relation_niss(relation: &Relation) -> Vec<&RawNiss> {
    match relation {
        Relation::InsuredOa { niss, .. }
        | Relation::InsuredEmployer { niss, .. }
        | Relation::InsuredGp { niss, .. }
        | Relation::InsuredRp { niss, .. }
        | Relation::InsuredDeceased { niss, .. } => vec![niss],
        Relation::EmployerSepp { .. } => vec![],
        Relation::NissReplaced { old_niss, new_niss } => vec![old_niss, new_niss],
    }
}

/// Per message: its at-rest pseudonyms, or why its NISS is invalid.
type Prepared = Vec<Result<Vec<String>, Rejection>>;

/// Step 1: NISS parsing and pseudonymisation, outside the transaction.
async fn prepare(
    ctx: &Context,
    batch: &[Inbound],
) -> Result<(Prepared, HashMap<String, Box<RawValue>>), BatchError> {
    let mut all: Vec<Niss> = Vec::new();
    let mut per_message: Vec<Result<std::ops::Range<usize>, Rejection>> = Vec::new();
    for inbound in batch {
        let fields = match &inbound.payload {
            Ok(message) => niss_fields(message),
            Err(_) => vec![],
        };
        let start = all.len();
        let parsed: Result<Vec<Niss>, Rejection> = fields
            .iter()
            .map(|raw| {
                Niss::parse(raw.expose()).map_err(|e| {
                    Rejection::new(RejectCode::InvalidNiss, format!("invalid NISS: {e}"))
                })
            })
            .collect();
        match parsed {
            Ok(nisses) => {
                all.extend(nisses);
                per_message.push(Ok(start..all.len()));
            }
            Err(r) => per_message.push(Err(r)),
        }
    }
    let at_rest: Vec<AtRest> = ctx
        .pseudonymiser
        .at_rest(&all)
        .await
        .map_err(|e| BatchError::Failed(format!("pseudonymisation: {e}")))?;
    let in_transit = in_transit_map(ctx, at_rest.iter().cloned().collect()).await?;
    let prepared = per_message
        .into_iter()
        .map(|r| {
            r.map(|range| {
                at_rest[range]
                    .iter()
                    .map(|p| p.as_str().to_owned())
                    .collect()
            })
        })
        .collect();
    Ok((prepared, in_transit))
}

/// The in-transit form of each pseudonym, as a JSON string: encoded once per batch and insured,
/// then copied as it is into each result and event body that carries it (escaping ~600 bytes per
/// body, and a copy of the string per handler, cost more).
async fn in_transit_map(
    ctx: &Context,
    pseudonyms: BTreeSet<AtRest>,
) -> Result<HashMap<String, Box<RawValue>>, BatchError> {
    let pseudonyms: Vec<AtRest> = pseudonyms.into_iter().collect();
    let forms = ctx
        .pseudonymiser
        .in_transit(&pseudonyms)
        .await
        .map_err(|e| BatchError::Failed(format!("pseudonymisation: {e}")))?;
    pseudonyms
        .into_iter()
        .zip(forms)
        .map(|(p, t)| {
            let json = to_raw_value(t.as_str())
                .map_err(|e| BatchError::Failed(format!("encoding a pseudonym: {e}")))?;
            Ok((p.into_string(), json))
        })
        .collect()
}

/// A batch slower than this says, in a warning, where its time went: the latency tail is made of
/// such batches, and the steps tell a lock wait from a slow load or a slow commit (WAL flush).
pub const SLOW_BATCH: Duration = Duration::from_millis(200);

/// The time of each step of a batch, for the slow-batch warning.
struct Steps {
    started: Instant,
    last: Instant,
    marks: Vec<(&'static str, Duration)>,
}

impl Steps {
    fn start() -> Self {
        let now = Instant::now();
        Self {
            started: now,
            last: now,
            marks: Vec::with_capacity(8),
        }
    }

    /// Ends step `name`.
    fn mark(&mut self, name: &'static str) {
        let now = Instant::now();
        self.marks.push((name, now - self.last));
        self.last = now;
    }

    /// Warns when the batch took longer than [`SLOW_BATCH`].
    fn warn_if_slow(&self, messages: usize) {
        let total = self.last - self.started;
        if total < SLOW_BATCH {
            return;
        }
        let mut steps = String::new();
        for (name, took) in &self.marks {
            let sep = if steps.is_empty() { "" } else { ", " };
            let _ = write!(steps, "{sep}{name} {:.1} ms", took.as_secs_f64() * 1e3);
        }
        tracing::warn!(
            messages,
            total_ms = total.as_millis() as u64,
            %steps,
            "slow batch"
        );
    }
}

/// How many times a batch locks newly found NISS successors and loads again before it gives up
/// for now (a successor replaced meanwhile by another batch needs one more round).
const MAX_REDIRECT_ROUNDS: usize = 4;

/// The 64-bit advisory-lock key of a string in a domain (first 8 bytes of a SHA-256 over both):
/// `("insured", at-rest pseudonym)`, `("trajet", "<broker user>\n<ref>")`,
/// `("inbox", "<broker user>\n<message_id>")`, `("org", "<kind>.<id>")`, `("broker_user", …)`,
/// `("employer", …)`. Whatever else changes those rows while gateways run takes the same lock.
pub fn lock_key(domain: &str, value: &str) -> i64 {
    let digest = Sha256::new()
        .chain_update(domain.as_bytes())
        .chain_update([0u8])
        .chain_update(value.as_bytes())
        .finalize();
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(bytes)
}

/// Prepares, by name, the statement that takes a batch's advisory locks in sorted order, on each
/// connection a worker keeps ([`HeldConnection::take`]), so that [`begin_and_lock`] can run it in
/// the same simple query as `BEGIN`.
const PREPARE_LOCKS: &str = "PREPARE trio_batch_locks(bigint[]) AS SELECT count(*) FROM \
     (SELECT pg_advisory_xact_lock(k) FROM UNNEST($1) AS k) AS locked";

/// `BEGIN` and the batch's advisory locks in one simple query: one round trip for both (a round
/// trip costs about a millisecond on a busy machine, and a small batch's time is made of them),
/// and a plan PostgreSQL keeps ([`PREPARE_LOCKS`]: planned each time, as a literal query, it
/// cost about 55 µs per batch). A simple query takes no parameters, so the keys are written out
/// as an array literal: numbers this process computed ([`lock_key`]), never text from a message.
fn begin_and_lock(locks: &[i64]) -> String {
    let mut sql = String::with_capacity(64 + 21 * locks.len());
    sql.push_str("BEGIN; EXECUTE trio_batch_locks('{");
    for (i, key) in locks.iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        let _ = write!(sql, "{sep}{key}");
    }
    sql.push_str("}')");
    sql
}

/// What to lock and load for this batch.
fn needs(batch: &[Inbound], prepared: &Prepared) -> (Needs, Vec<i64>) {
    let mut needs = Needs::default();
    let mut locks = BTreeSet::new();
    for (inbound, pseudonyms) in batch.iter().zip(prepared) {
        let sender = inbound.sender_key().to_owned();
        locks.insert(lock_key(
            "inbox",
            &format!("{sender}\n{}", inbound.message_id),
        ));
        needs
            .inbox_keys
            .insert((sender.clone(), inbound.message_id.clone()));
        if !sender.is_empty() {
            needs.broker_users.insert(sender.clone());
        }
        if let Ok(pseudonyms) = pseudonyms {
            for p in pseudonyms {
                locks.insert(lock_key("insured", p));
                needs.pseudonyms.insert(p.clone());
            }
        }
        let Ok(message) = &inbound.payload else {
            continue;
        };
        match message {
            Message::OrganisationUpsert(m) => {
                needs.broker_users.insert(m.broker_user.clone());
                needs.orgs.insert((m.kind, m.id.clone()));
                locks.insert(lock_key("broker_user", &m.broker_user));
                locks.insert(lock_key("org", &format!("{}.{}", m.kind.as_str(), m.id)));
            }
            Message::RelationSet(trio_schemas::RelationSet { relation, .. })
            | Message::RelationUnset(trio_schemas::RelationUnset { relation }) => match relation {
                Relation::InsuredEmployer { employer, .. } => {
                    needs.employers.insert(employer.clone());
                }
                Relation::EmployerSepp { employer, sepp } => {
                    needs.employers.insert(employer.clone());
                    needs.orgs.insert((OrgKind::Sepp, sepp.clone()));
                    locks.insert(lock_key("employer", employer));
                }
                Relation::InsuredOa { oa, .. } => {
                    needs.orgs.insert((OrgKind::Oa, oa.clone()));
                }
                Relation::InsuredGp { gp, .. } => {
                    needs.orgs.insert((OrgKind::Gp, gp.clone()));
                }
                Relation::InsuredRp { rp, .. } => {
                    needs.orgs.insert((OrgKind::Rp, rp.clone()));
                }
                Relation::NissReplaced { .. } => {
                    needs.niss_replacements = true;
                }
                Relation::InsuredDeceased { .. } => {}
            },
            Message::DossierOpen(_) => {
                needs.max_new_dossiers += 1;
            }
            Message::TrajetUpsert(m) => {
                needs.max_new_dossiers += 1;
                // A trajet is its owner's (the sender's organisation) and its ref, whichever
                // insured it belongs to: locked and loaded by that key too, so a ref already
                // used for another insured is seen, whatever batch used it.
                let reference = m.trajet.reference.clone();
                locks.insert(lock_key("trajet", &format!("{sender}\n{reference}")));
                needs.trajet_refs.insert((sender.clone(), reference));
            }
        }
    }
    (needs, locks.into_iter().collect())
}

/// Processes a batch in one transaction, on the worker's `connection` (taken from the pool when
/// it has none), and returns what to ack and publish.
///
/// # Errors
/// [`BatchError::Transient`] when the database is unavailable (retry the batch as is),
/// [`BatchError::Failed`] for anything else (retry message by message).
pub async fn process_batch(
    ctx: &Context,
    connection: &mut HeldConnection,
    batch: &[Inbound],
) -> Result<BatchResult, BatchError> {
    let mut steps = Steps::start();
    let (prepared, in_transit) = prepare(ctx, batch).await?;
    let (needs, locks) = needs(batch, &prepared);
    steps.mark("prepare");

    let (mut conn, since) = connection.take(&ctx.pool).await?;
    let result = transaction(
        ctx,
        &mut conn,
        batch,
        Preparation {
            pseudonyms: prepared,
            in_transit,
            needs,
            locks,
        },
        &mut steps,
    )
    .await;
    if result.is_ok() {
        connection.held = Some((conn, since));
    } else {
        // A statement that failed inside the one that begins the transaction (a cancelled lock
        // wait, say) leaves it aborted without sqlx knowing of it, so it would not roll it back:
        // back in the pool, the connection would fail every batch after. Failures are rare (the
        // database unavailable, or a bug isolated message by message): a new connection is cheap
        // next to them.
        conn.close_on_drop();
    }
    steps.warn_if_slow(batch.len());
    result
}

/// What step 1 made of a batch: each message's at-rest pseudonyms (or why it has none), their
/// in-transit forms, and what to lock and load.
struct Preparation {
    pseudonyms: Prepared,
    in_transit: HashMap<String, Box<RawValue>>,
    needs: Needs,
    locks: Vec<i64>,
}

/// Steps 2 to 5 on `conn`.
async fn transaction(
    ctx: &Context,
    conn: &mut PgConnection,
    batch: &[Inbound],
    Preparation {
        pseudonyms: prepared,
        mut in_transit,
        mut needs,
        locks,
    }: Preparation,
    steps: &mut Steps,
) -> Result<BatchResult, BatchError> {
    let mut tx = conn.begin_with(begin_and_lock(&locks)).await?;
    steps.mark("begin and lock");
    let mut state = State::load(&mut tx, &needs, &ctx.state_cache).await?;
    steps.mark("load");

    // A NISS replaced earlier resolves to its successor, which the locks above did not cover:
    // the load read the successor's rows (facts, relations, dossier) without its lock, and
    // another batch on the successor may have changed them since. So lock the successors, then
    // load again: every row the batch decides on was read under its insured's lock. Batches
    // without replaced NISS skip this; a chain that keeps moving is retried later.
    let mut rounds = 0;
    loop {
        let redirected: BTreeSet<String> = needs
            .pseudonyms
            .iter()
            .map(|p| state.resolve(p))
            .filter(|p| !needs.pseudonyms.contains(p))
            .collect();
        if redirected.is_empty() {
            break;
        }
        rounds += 1;
        if rounds > MAX_REDIRECT_ROUNDS {
            return Err(BatchError::Transient(
                "NISS replacements kept changing while the batch locked their successors".into(),
            ));
        }
        let keys: Vec<i64> = redirected.iter().map(|p| lock_key("insured", p)).collect();
        sqlx::query("SELECT pg_advisory_xact_lock(k) FROM UNNEST($1::bigint[]) AS k")
            .bind(&keys)
            .execute(&mut *tx)
            .await?;
        let at_rest = redirected
            .iter()
            .filter_map(|p| AtRest::from_stored(p.clone()).ok())
            .collect();
        in_transit.extend(in_transit_map(ctx, at_rest).await?);
        needs.pseudonyms.extend(redirected);
        state = State::load(&mut tx, &needs, &ctx.state_cache).await?;
        steps.mark("successors");
    }

    let mut outcomes = Vec::with_capacity(batch.len());
    for (inbound, pseudonyms) in batch.iter().zip(&prepared) {
        let outcome = apply_one(ctx, &mut state, inbound, pseudonyms, &in_transit)?;
        outcomes.push(outcome);
    }
    steps.mark("apply");
    let outbound = state.flush(&mut tx).await?;
    steps.mark("flush");
    tx.commit().await?;
    steps.mark("commit");
    Ok(BatchResult { outcomes, outbound })
}

/// Step 4 for one message.
fn apply_one(
    ctx: &Context,
    state: &mut State,
    inbound: &Inbound,
    pseudonyms: &Result<Vec<String>, Rejection>,
    in_transit: &HashMap<String, Box<RawValue>>,
) -> Result<Outcome, HandlerBug> {
    let sender_key = inbound.sender_key();
    if let Some(first) = state.recorded_outcome(sender_key, &inbound.message_id) {
        let outcome = Outcome::duplicate_of(first);
        state.republish_stored(sender_key, &inbound.message_id, inbound.redelivered)?;
        push_reply(state, inbound, &outcome)?;
        return Ok(outcome);
    }
    let outbound_from = state.outbox.len();
    let decision = decide(ctx, state, inbound, pseudonyms, in_transit)?;
    let (outcome, dossier) = match decision {
        Decision::Done(outcome, dossier) => (outcome, dossier),
        Decision::Rejected(rejection) => (Outcome::rejected(rejection), None),
    };
    push_reply(state, inbound, &outcome)?;
    state.record_outcome(
        sender_key,
        &inbound.message_id,
        inbound.message_type.as_str(),
        &outcome,
        dossier,
        outbound_from,
    );
    Ok(outcome)
}

fn push_reply(state: &mut State, inbound: &Inbound, outcome: &Outcome) -> Result<(), HandlerBug> {
    if let Some(reply_to) = &inbound.reply_to {
        state.outbox.push(outbound::reply(
            inbound.sender_key(),
            &inbound.message_id,
            reply_to,
            outcome.status.as_str(),
            outcome.reply_body()?,
            inbound.traceparent.as_deref(),
        ));
    }
    Ok(())
}

fn decide(
    ctx: &Context,
    state: &mut State,
    inbound: &Inbound,
    pseudonyms: &Result<Vec<String>, Rejection>,
    in_transit: &HashMap<String, Box<RawValue>>,
) -> Result<Decision, HandlerBug> {
    let sender = match authenticate(ctx, state, inbound) {
        Ok(sender) => sender,
        Err(rejection) => return Ok(Decision::Rejected(rejection)),
    };
    let message = match &inbound.payload {
        Ok(message) => message,
        Err(detail) => {
            return Ok(Decision::Rejected(Rejection::new(
                RejectCode::InvalidPayload,
                detail.clone(),
            )));
        }
    };
    let at_rest = match pseudonyms {
        Ok(p) => p.as_slice(),
        Err(rejection) => return Ok(Decision::Rejected(rejection.clone())),
    };
    let p = Pseudonyms {
        at_rest,
        in_transit,
    };
    let cause = (inbound.sender_key(), inbound.message_id.as_str());
    match message {
        Message::OrganisationUpsert(m) => messages::organisation_upsert::handle(state, m),
        Message::RelationSet(m) => messages::relation::set(
            state,
            &sender,
            &m.relation,
            m.valid_until,
            ctx.relation_ttl,
            &p,
        ),
        Message::RelationUnset(m) => messages::relation::unset(state, &m.relation, &p),
        Message::DossierOpen(_) => messages::dossier_open::handle(state, &sender, &p),
        Message::TrajetUpsert(m) => messages::trajet_upsert::handle(
            state,
            &sender,
            m,
            &p,
            cause,
            inbound.traceparent.as_deref(),
        ),
    }
}

/// CONTRACT.md §2: the sender is the broker-validated `user_id`; the organisation's kind must
/// match the queue; operator-only types come from operators on `reference`.
fn authenticate(ctx: &Context, state: &State, inbound: &Inbound) -> Result<Sender, Rejection> {
    let Some(user) = inbound.user_id.as_deref() else {
        return Err(Rejection::new(
            RejectCode::Unauthenticated,
            "the message has no user_id",
        ));
    };
    let message_type = inbound.message_type;
    match inbound.queue {
        SourceQueue::Reference => {
            if !ctx.operators.contains(user) {
                return Err(if state.org_by_user(user).is_some() {
                    Rejection::new(
                        RejectCode::Forbidden,
                        "only operators may publish on the reference queue",
                    )
                } else {
                    Rejection::new(RejectCode::Unauthenticated, "unknown broker user")
                });
            }
            if !message_type.is_operator_only() {
                return Err(Rejection::new(
                    RejectCode::Forbidden,
                    format!("{message_type} is not reference data"),
                ));
            }
            Ok(Sender::Operator(user.to_owned()))
        }
        queue => {
            let Some(org) = state.org_by_user(user) else {
                return Err(Rejection::new(
                    RejectCode::Unauthenticated,
                    "unknown broker user",
                ));
            };
            if queue.org_kind() != Some(org.kind) {
                return Err(Rejection::new(
                    RejectCode::Forbidden,
                    format!(
                        "a {} organisation may not publish on trio.inbound.{}",
                        org.kind.as_str(),
                        queue.routing_key()
                    ),
                ));
            }
            if message_type.is_operator_only() {
                return Err(Rejection::new(
                    RejectCode::Forbidden,
                    format!("{message_type} is for operators only"),
                ));
            }
            Ok(Sender::Org(Arc::clone(org)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_keys_are_stable_and_separate_domains() {
        assert_eq!(lock_key("insured", "abc"), lock_key("insured", "abc"));
        assert_ne!(lock_key("insured", "abc"), lock_key("inbox", "abc"));
        assert_ne!(lock_key("insured", "abc"), lock_key("insured", "abd"));
    }
}
