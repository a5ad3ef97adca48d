//! Integration tests over a real RabbitMQ and PostgreSQL: one binary, one module per concern.
#![allow(clippy::unwrap_used)]
//! Each test has its own vhost, database and in-process gateway (see `trio_tests::TestEnv`).

mod access;
mod connection;
mod envelope;
mod environment;
mod idempotency;
mod privacy;
mod redelivery;
mod relations;
mod runtime;
mod state_cache;
mod trajets;

use serde_json::{Value, json};
use trio_gateway::partner::Partner;
use trio_handlers::context::Context;
use trio_handlers::{Inbound, SourceQueue};
use trio_schemas::{ContentType, MessageType};
use trio_tests::{TestEnv, synthetic_niss};

/// An OA (300, JSON), a SEPP (0411234567, XML) and a GP (12345678901, JSON), all related to one
/// insured (the SEPP through the insured's employer).
pub struct World {
    /// The test's vhost, database and gateway.
    pub env: TestEnv,
    /// The operator (`guest`).
    pub operator: Partner,
    /// OA 300.
    pub oa: Partner,
    /// SEPP 0411234567.
    pub sepp: Partner,
    /// GP 12345678901.
    pub gp: Partner,
    /// The insured they all relate to.
    pub niss: String,
}

/// The OA's union code.
pub const OA: &str = "300";
/// The SEPP's KBO number.
pub const SEPP: &str = "0411234567";
/// The GP's INAMI number.
pub const GP: &str = "12345678901";
/// The insured's employer.
pub const EMPLOYER: &str = "0999999999";

impl World {
    /// A new test environment with the three organisations and their relations.
    pub async fn new(seq: u32) -> World {
        Self::with_env(TestEnv::start().await, seq).await
    }

    /// Same, on a prepared environment.
    pub async fn with_env(env: TestEnv, seq: u32) -> World {
        let mut operator = env.operator().await;
        let oa = env.organisation(&mut operator, "oa", OA, "json").await;
        let sepp = env.organisation(&mut operator, "sepp", SEPP, "xml").await;
        let gp = env.organisation(&mut operator, "gp", GP, "json").await;
        let niss = synthetic_niss(seq);
        for relation in [
            json!({"kind": "insured_oa", "niss": niss, "oa": OA}),
            json!({"kind": "insured_employer", "niss": niss, "employer": EMPLOYER}),
            json!({"kind": "employer_sepp", "employer": EMPLOYER, "sepp": SEPP}),
            json!({"kind": "insured_gp", "niss": niss, "gp": GP}),
        ] {
            env.relate(&mut operator, relation).await;
        }
        World {
            env,
            operator,
            oa,
            sepp,
            gp,
            niss,
        }
    }
}

/// A `trajet.upsert` body.
pub fn trajet(niss: &str, reference: &str, trajet_type: &str, status: &str, version: i64) -> Value {
    json!({"niss": niss, "trajet": {
        "ref": reference, "type": trajet_type, "status": status, "version": version,
        "start_on": "2026-11-02", "request_received_on": "2026-10-30"}})
}

/// Asserts a reply's status and code.
#[track_caller]
pub fn assert_reply(reply: &trio_gateway::partner::Reply, status: &str, code: Option<&str>) {
    assert_eq!(reply.body["status"], status, "reply: {}", reply.body);
    match code {
        Some(code) => assert_eq!(reply.body["code"], code, "reply: {}", reply.body),
        None => assert!(reply.body["code"].is_null(), "reply: {}", reply.body),
    }
}

/// Reads `probe` every 100 ms until it says 0, for at most 5 s; returns its last reading.
pub async fn settles_to_zero<F: Future<Output = i64>>(mut probe: impl FnMut() -> F) -> i64 {
    let mut last = probe().await;
    for _ in 0..50 {
        if last == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        last = probe().await;
    }
    last
}

/// Messages ready or unacknowledged in one of the test's queues (management API).
pub async fn queue_depth(env: &TestEnv, queue: &str) -> i64 {
    let depth = env.admin().queue_messages(&env.name, queue).await.unwrap();
    i64::try_from(depth).unwrap()
}

/// Rows of a table.
pub async fn count(env: &TestEnv, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(&env.db)
        .await
        .expect("count")
}

/// Takes the advisory lock the gateway takes for the insured of this dossier, in a transaction of
/// its own, as another batch on that insured would; it holds until the transaction ends. Returns
/// the transaction and the insured's at-rest pseudonym.
pub async fn hold_insured_lock(
    env: &TestEnv,
    dossier_number: &str,
) -> (sqlx::Transaction<'static, sqlx::Postgres>, String) {
    let pseudonym: String = sqlx::query_scalar("SELECT pseudonym FROM dossier WHERE number = $1")
        .bind(dossier_number)
        .fetch_one(&env.db)
        .await
        .unwrap();
    let mut tx = env.db.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(trio_handlers::batch::lock_key("insured", &pseudonym))
        .execute(&mut *tx)
        .await
        .unwrap();
    (tx, pseudonym)
}

/// A JSON message as the runtime would hand it over.
pub fn inbound(
    queue: SourceQueue,
    user: &str,
    message_type: MessageType,
    message_id: &str,
    body: &Value,
) -> Inbound {
    let payload =
        trio_schemas::decode(message_type, ContentType::Json, body.to_string().as_bytes())
            .map_err(|e| e.to_string());
    Inbound {
        queue,
        user_id: Some(user.to_owned()),
        message_id: message_id.to_owned(),
        message_type,
        reply_to: None,
        traceparent: None,
        redelivered: false,
        payload,
    }
}

/// A `trajet.upsert` from OA 300.
pub fn upsert_from_oa(message_id: &str, body: &Value) -> Inbound {
    let user = format!("t-oa-{OA}");
    inbound(
        SourceQueue::Oa,
        &user,
        MessageType::TrajetUpsert,
        message_id,
        body,
    )
}

/// The world of the access tests, with its gateway stopped once the organisations and relations
/// are registered: the test's own context is then the only one applying messages.
pub async fn world_without_gateway(seq: u32) -> (World, Context) {
    let mut w = World::new(seq).await;
    w.env.stop_gateway().await.expect("gateway stops");
    let ctx = Context::new(
        w.env.db.clone(),
        w.env.pseudonymiser.clone(),
        ["guest".to_owned()],
    );
    (w, ctx)
}
