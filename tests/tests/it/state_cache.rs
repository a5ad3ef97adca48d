//! The state cache (`trio_handlers::state_cache`): what the rules read about an insured is kept
//! across batches, and a change by any writer — the gateway, another process, a hand-run fix —
//! is seen by the very next batch, because it moves the state epoch in its own commit.
//!
//! Steady traffic (every insured cached) is loaded with a narrow statement that reads only
//! trajets, the inbox and the senders' organisations; it falls back to the whole load when the
//! epoch moved, and is not tried while the epoch keeps moving.
//!
//! These tests drive `process_batch` directly with a context of their own, on a database the
//! gateway set up (organisations and relations registered through the broker), so they can read
//! the cache's counts and compose a batch. One checks the load's other per-batch reckoning, the
//! dossier ids it sets aside for a batch that mixes insured with and without a dossier; the last
//! two, the plans the batch path's sessions keep (generic from the first batch, and still an
//! index probe per key once the tables they were made on have grown).

use crate::{GP, OA, World, inbound, trajet, upsert_from_oa, world_without_gateway};
use serde_json::json;
use trio_handlers::context::Context;
use trio_handlers::{HeldConnection, Inbound, SourceQueue, process_batch};
use trio_schemas::MessageType;
use trio_tests::synthetic_niss;

/// One batch of one message; its outcome's status and code.
async fn apply(ctx: &Context, inbound: Inbound) -> (String, Option<String>) {
    let result = process_batch(ctx, &mut HeldConnection::default(), &[inbound])
        .await
        .expect("batch");
    let outcome = &result.outcomes[0];
    (outcome.status.as_str().to_owned(), outcome.code.clone())
}

/// Trajet `reference` at versions 1 to 3, in three batches: the first creates the insured's
/// dossier (which moves the state epoch), the second reads the insured again and keeps the view,
/// the third takes it from the cache (loading everything: the second had seen the epoch move).
async fn warm_up(ctx: &Context, w: &World, reference: &str) {
    for version in [1, 2, 3] {
        let id = format!("{reference}-{version}");
        let body = trajet(&w.niss, reference, "rtw_ami", "en_cours", version);
        let outcome = apply(ctx, upsert_from_oa(&id, &body)).await;
        assert_eq!(outcome, ("accepted".to_owned(), None));
    }
    assert_eq!(
        ctx.state_cache.counts(),
        (1, 2),
        "the dossier created by the first batch made the second read the insured again"
    );
    assert_eq!(
        ctx.state_cache.narrow_loads(),
        (0, 0),
        "after a load that saw the epoch move, the next batch loads everything"
    );
}

#[tokio::test]
async fn a_later_batch_on_an_insured_reads_it_from_the_cache() {
    let (w, ctx) = world_without_gateway(60).await;
    warm_up(&ctx, &w, "c").await;
    let fourth = apply(
        &ctx,
        upsert_from_oa("c-4", &trajet(&w.niss, "c", "rtw_ami", "en_cours", 4)),
    )
    .await;
    assert_eq!(fourth, ("accepted".to_owned(), None));
    assert_eq!(
        ctx.state_cache.counts(),
        (2, 2),
        "fourth batch: from the cache"
    );
    assert_eq!(
        ctx.state_cache.narrow_loads(),
        (1, 0),
        "the fourth batch read only trajets, the inbox and its sender (the narrow load)"
    );
    let version: i64 = sqlx::query_scalar("SELECT version FROM trajet WHERE ref = 'c'")
        .fetch_one(&w.env.db)
        .await
        .unwrap();
    assert_eq!(
        version, 4,
        "the batch served from the cache wrote its trajet"
    );

    // A narrow load finds what a batch needs from the inbox and the trajets: a redelivered
    // message is a duplicate, a version already stored is stale, and a new ref is created.
    let batch = [
        upsert_from_oa("c-4", &trajet(&w.niss, "c", "rtw_ami", "en_cours", 4)),
        upsert_from_oa("c-4bis", &trajet(&w.niss, "c", "rtw_ami", "en_cours", 4)),
        upsert_from_oa("d-1", &trajet(&w.niss, "d", "rtw_ami", "en_cours", 1)),
    ];
    let result = process_batch(&ctx, &mut HeldConnection::default(), &batch)
        .await
        .expect("batch");
    let statuses: Vec<&str> = result.outcomes.iter().map(|o| o.status.as_str()).collect();
    assert_eq!(statuses, ["duplicate", "stale", "accepted"]);
    assert_eq!(ctx.state_cache.narrow_loads(), (2, 0));
    let refs: Vec<(String, i64)> = sqlx::query_as("SELECT ref, version FROM trajet ORDER BY ref")
        .fetch_all(&w.env.db)
        .await
        .unwrap();
    assert_eq!(refs, [("c".to_owned(), 4), ("d".to_owned(), 1)]);

    // Off, nothing is kept: every batch reads the insured.
    let off = Context::new(
        w.env.db.clone(),
        w.env.pseudonymiser.clone(),
        ["guest".to_owned()],
    )
    .with_state_cache(0);
    for version in [5, 6] {
        let id = format!("c-{version}");
        let body = trajet(&w.niss, "c", "rtw_ami", "en_cours", version);
        let outcome = apply(&off, upsert_from_oa(&id, &body)).await;
        assert_eq!(outcome, ("accepted".to_owned(), None));
    }
    assert_eq!(off.state_cache.counts(), (0, 2));
    w.env.finish().await;
}

#[tokio::test]
async fn a_relation_ended_by_another_writer_is_seen_by_the_next_batch() {
    let (w, ctx) = world_without_gateway(61).await;
    warm_up(&ctx, &w, "e").await;

    // Another writer (here a hand-run statement; another gateway process alike) ends the OA's
    // relation, without the gateway's locks or code.
    let ended = sqlx::query(
        "UPDATE insured_relation SET valid_until = now() - interval '1 second' \
         WHERE org_kind = 'oa' AND org_id = $1",
    )
    .bind(OA)
    .execute(&w.env.db)
    .await
    .unwrap();
    assert_eq!(ended.rows_affected(), 1);

    let fourth = apply(
        &ctx,
        upsert_from_oa("e-4", &trajet(&w.niss, "e", "rtw_ami", "en_cours", 4)),
    )
    .await;
    assert_eq!(
        fourth,
        ("rejected".to_owned(), Some("no_relation".to_owned())),
        "the cached view must not outlive the relation"
    );
    assert_eq!(ctx.state_cache.counts(), (1, 3), "read again, not served");
    assert_eq!(
        ctx.state_cache.narrow_loads(),
        (0, 1),
        "the narrow load saw the epoch move, and the batch loaded everything"
    );

    // While the epoch keeps moving (here by hand again), batches load everything at once,
    // without a narrow load first; once a load finds it still, they load narrowly again.
    sqlx::query("UPDATE organisation SET name = name")
        .execute(&w.env.db)
        .await
        .unwrap();
    for (version, narrow) in [(5, (0, 1)), (6, (0, 1)), (7, (1, 1))] {
        let id = format!("e-{version}");
        let body = trajet(&w.niss, "e", "rtw_ami", "en_cours", version);
        let outcome = apply(&ctx, upsert_from_oa(&id, &body)).await;
        assert_eq!(outcome.1.as_deref(), Some("no_relation"));
        assert_eq!(
            ctx.state_cache.narrow_loads(),
            narrow,
            "narrow loads after version {version}"
        );
    }
    w.env.finish().await;
}

#[tokio::test]
async fn a_batch_rolled_back_leaves_the_cached_view_as_it_was() {
    let (w, ctx) = world_without_gateway(63).await;
    warm_up(&ctx, &w, "k").await;

    // A batch takes the cached insured (whose relations it shares with the cache), ends the
    // GP's relation in memory, and fails at its flush: a trigger refuses the deletion.
    sqlx::raw_sql(
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$; \
         CREATE TRIGGER refuse_relation_delete BEFORE DELETE ON insured_relation \
         FOR EACH ROW EXECUTE FUNCTION refuse();",
    )
    .execute(&w.env.db)
    .await
    .unwrap();
    let unset = inbound(
        SourceQueue::Reference,
        "guest",
        MessageType::RelationUnset,
        "k-unset",
        &json!({"relation": {"kind": "insured_gp", "niss": w.niss, "gp": GP}}),
    );
    let failed = process_batch(&ctx, &mut HeldConnection::default(), &[unset]).await;
    assert!(failed.is_err(), "the flush must fail: {failed:?}");
    assert_eq!(
        ctx.state_cache.counts(),
        (2, 2),
        "the failed batch used the view"
    );
    sqlx::raw_sql("DROP TRIGGER refuse_relation_delete ON insured_relation")
        .execute(&w.env.db)
        .await
        .unwrap();

    // Nothing was committed, so the epoch did not move and the next batch takes the same view:
    // the GP is still related, and still gets the trajet's update.
    let fourth = process_batch(
        &ctx,
        &mut HeldConnection::default(),
        &[upsert_from_oa(
            "k-4",
            &trajet(&w.niss, "k", "rtw_ami", "en_cours", 4),
        )],
    )
    .await
    .expect("batch");
    assert_eq!(fourth.outcomes[0].status.as_str(), "accepted");
    assert_eq!(ctx.state_cache.counts(), (3, 2), "served from the cache");
    assert_eq!(
        ctx.state_cache.narrow_loads(),
        (1, 0),
        "the relation.unset named its GP, so only the next batch loaded narrowly"
    );
    let recipients: Vec<&str> = fourth
        .outbound
        .iter()
        .map(|m| m.routing_key.as_str())
        .collect();
    assert!(
        recipients.contains(&format!("gp.{GP}").as_str()),
        "the rolled-back unset leaked into the cached view: recipients {recipients:?}"
    );
    w.env.finish().await;
}

#[tokio::test]
async fn every_table_a_view_is_made_of_moves_the_state_epoch() {
    let w = World::new(62).await;
    let epoch = || async {
        sqlx::query_scalar::<_, i64>("SELECT epoch FROM state_epoch")
            .fetch_one(&w.env.db)
            .await
            .unwrap()
    };
    for statement in [
        "UPDATE organisation SET name = name || ' '",
        "INSERT INTO insured (pseudonym) VALUES ('p-epoch')",
        "UPDATE insured_relation SET valid_until = valid_until + interval '1 hour'",
        "UPDATE employer_sepp SET valid_until = valid_until + interval '1 hour'",
        "INSERT INTO dossier (id, number, pseudonym) VALUES (999999, 'TRIO-x', 'p-epoch')",
    ] {
        let before = epoch().await;
        sqlx::query(statement).execute(&w.env.db).await.unwrap();
        assert!(epoch().await > before, "{statement} did not move the epoch");
    }
    // The hot path's tables do not.
    let before = epoch().await;
    sqlx::query("DELETE FROM outbox")
        .execute(&w.env.db)
        .await
        .unwrap();
    sqlx::query("UPDATE trajet SET version = version")
        .execute(&w.env.db)
        .await
        .unwrap();
    assert_eq!(epoch().await, before);
    w.env.finish().await;
}

#[tokio::test]
async fn a_batch_mixing_insured_with_and_without_a_dossier_has_an_id_for_each_new_one() {
    let (mut w, ctx) = world_without_gateway(63).await;
    let newcomer = synthetic_niss(63_063);
    let open = |id: &str, niss: &str| {
        let user = format!("t-oa-{OA}");
        let body = json!({"niss": niss});
        inbound(SourceQueue::Oa, &user, MessageType::DossierOpen, id, &body)
    };
    // The world's insured gets a dossier; the newcomer is related to the OA, without one.
    let opened = process_batch(
        &ctx,
        &mut HeldConnection::default(),
        &[open("m-1", &w.niss)],
    )
    .await
    .unwrap();
    assert_eq!(opened.outcomes[0].status.as_str(), "accepted");
    w.env.start_gateway();
    let relation = json!({"kind": "insured_oa", "niss": newcomer, "oa": OA});
    w.env.relate(&mut w.operator, relation).await;
    w.env.stop_gateway().await.unwrap();

    // One batch: a dossier.open for the newcomer (it may create a dossier) and a relation.set on
    // the insured who has one (it may not). One id must be set aside for the newcomer.
    let refresh = json!({"relation": {"kind": "insured_gp", "niss": w.niss, "gp": crate::GP}});
    let batch = [
        open("m-2", &newcomer),
        inbound(
            SourceQueue::Reference,
            "guest",
            MessageType::RelationSet,
            "m-3",
            &refresh,
        ),
    ];
    let result = process_batch(&ctx, &mut HeldConnection::default(), &batch)
        .await
        .expect("the batch commits as one, without falling back to message by message");
    let statuses: Vec<&str> = result.outcomes.iter().map(|o| o.status.as_str()).collect();
    assert_eq!(statuses, ["accepted", "accepted"]);
    assert_eq!(crate::count(&w.env, "dossier").await, 2);
    w.env.finish().await;
}

/// The statements every `trajet.upsert` batch prepares, by what each one's text holds.
const BATCH_STATEMENTS: [(&str, &str); 3] = [
    ("the whole load", "WITH RECURSIVE epoch"),
    ("the narrow load", "WITH org AS"),
    ("the flush", "INSERT INTO inbox"),
];

/// Fails unless each of `expected` (a name, and a part of its text) is among `prepared`.
fn assert_prepared(prepared: &[&str], expected: &[(&str, &str)]) {
    for (name, part) in expected {
        assert!(
            prepared.iter().any(|statement| statement.contains(part)),
            "{name} was not prepared on the connection: {prepared:?}"
        );
    }
}

/// A context whose batches run on a pool of one connection made as the gateway's batch path makes
/// them (its session settings), so that what they prepared can be read on that connection.
async fn on_one_batch_connection(w: &World) -> (sqlx::PgPool, Context) {
    let config = trio_gateway::config::Config {
        db_pool_size: 1,
        ..w.env.config.clone()
    };
    let one = trio_gateway::serve::connect_db(&config, Some(std::time::Duration::from_secs(10)))
        .await
        .expect("a pool of one connection");
    let ctx = Context::new(
        one.clone(),
        w.env.pseudonymiser.clone(),
        ["guest".to_owned()],
    );
    (one, ctx)
}

#[tokio::test]
async fn batches_of_one_message_are_never_planned_anew() {
    // PostgreSQL plans a prepared statement with its parameters for its first five executions,
    // and for as long after as that plan looks cheaper than the generic one, as it does for a
    // small batch: the batch path's connections force the generic plan from the start.
    let (w, _) = world_without_gateway(64).await;
    let (one, ctx) = on_one_batch_connection(&w).await;
    for version in 1..=8 {
        let id = format!("p-{version}");
        let body = trajet(&w.niss, "p", "rtw_ami", "en_cours", version);
        let outcome = apply(&ctx, upsert_from_oa(&id, &body)).await;
        assert_eq!(outcome, ("accepted".to_owned(), None));
    }
    assert!(
        ctx.state_cache.narrow_loads().0 >= 5,
        "the later batches loaded narrowly: {:?}",
        ctx.state_cache.narrow_loads()
    );
    // The batches ran on the pool's one connection, which this query runs on too (and is left
    // out: its own text names the tables).
    let plans: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements \
         WHERE statement ~ 'trajet|inbox' AND statement !~ 'pg_prepared_statements'",
    )
    .fetch_all(&one)
    .await
    .unwrap();
    let texts: Vec<&str> = plans.iter().map(|(s, _, _)| s.as_str()).collect();
    assert_prepared(&texts, &BATCH_STATEMENTS);
    for (statement, generic, custom) in &plans {
        assert_eq!(*custom, 0, "planned per execution: {statement}");
        assert!(*generic > 0, "never run generically: {statement}");
    }
    one.close().await;
    w.env.finish().await;
}

#[tokio::test]
async fn plans_made_on_small_tables_still_read_by_key_once_they_are_large() {
    // The batch path's generic plans are made at a connection's first batches, often on small
    // tables, and kept until something invalidates them (an ANALYZE, which autovacuum runs and
    // this project's CI machine does not). Planned on a near-empty `trajet`, the flush updated
    // trajets through a hash join over a sequential scan of the whole table: harmless with two
    // rows, a scan of every trajet per batch once there are thousands.
    let (w, _) = world_without_gateway(65).await;
    let (one, ctx) = on_one_batch_connection(&w).await;
    warm_up(&ctx, &w, "s").await;
    assert_eq!(
        apply(
            &ctx,
            upsert_from_oa("s-4", &trajet(&w.niss, "s", "rtw_ami", "en_cours", 4))
        )
        .await,
        ("accepted".to_owned(), None)
    );
    assert_eq!(ctx.state_cache.narrow_loads(), (1, 0));
    // A relation refreshed, so that the relations' and dossiers' writes are prepared too.
    let refresh = json!({"relation": {"kind": "insured_gp", "niss": w.niss, "gp": GP}});
    let refreshed = apply(
        &ctx,
        inbound(
            SourceQueue::Reference,
            "guest",
            MessageType::RelationSet,
            "s-r",
            &refresh,
        ),
    )
    .await;
    assert_eq!(refreshed, ("accepted".to_owned(), None));
    // Ten thousand dossiers, trajets, history lines and inbox rows, written behind the plans'
    // back (no ANALYZE, so nothing invalidates them).
    sqlx::raw_sql(
        "INSERT INTO dossier (id, number, pseudonym)
             SELECT 1000000 + g, 'BULK-' || g, 'bulk-' || g FROM generate_series(1, 10000) g;
         INSERT INTO trajet (owner_kind, owner_id, ref, dossier_id, type, status, version)
             SELECT 'oa', '300', 'bulk-' || g, 1000000 + g, 'rtw_ami', 'en_cours', 1
             FROM generate_series(1, 10000) g;
         INSERT INTO history (dossier_id, actor_kind, actor_id, resource, operation)
             SELECT 1000000 + g, 'oa', '300', 'trajet', 'create' FROM generate_series(1, 10000) g;
         INSERT INTO inbox (sender, message_id, type, status)
             SELECT 'guest', 'bulk-' || g, 'trajet.upsert', 'accepted'
             FROM generate_series(1, 10000) g;",
    )
    .execute(&w.env.db)
    .await
    .expect("bulk rows");
    // Every statement the batches prepared on the pool's one connection, explained with the plan
    // it keeps (parameters do not change a generic plan; NULL stands for each).
    let statements: Vec<(String, String, i32)> = sqlx::query_as(
        "SELECT name, statement, cardinality(parameter_types) FROM pg_prepared_statements \
         WHERE statement !~ 'pg_prepared_statements'",
    )
    .fetch_all(&one)
    .await
    .unwrap();
    let texts: Vec<&str> = statements.iter().map(|(_, s, _)| s.as_str()).collect();
    assert_prepared(&texts, &BATCH_STATEMENTS);
    assert_prepared(
        &texts,
        &[("the relations' write", "INSERT INTO insured_relation")],
    );
    for (name, statement, parameters) in &statements {
        let nulls = vec!["NULL"; usize::try_from(*parameters).unwrap()].join(", ");
        let plan = explain(&one, &format!("EXECUTE {name}({nulls})")).await;
        let whole = whole_table_reads(&plan);
        assert!(
            whole.is_empty(),
            "a batch statement reads a whole table: {whole:?}\n{plan:#}\n{statement}"
        );
    }
    // The check itself sees the other way of reading a whole table, which the sessions' settings
    // leave open: every entry of an index, in order, for a merge join (forced here by turning
    // the other joins off on this connection).
    sqlx::raw_sql("SET enable_hashjoin = off; SET enable_nestloop = off")
        .execute(&one)
        .await
        .unwrap();
    let merged = explain(
        &one,
        "SELECT * FROM trajet t JOIN dossier d ON d.id = t.dossier_id",
    )
    .await;
    let whole = whole_table_reads(&merged);
    assert!(
        whole.iter().any(|read| read.starts_with("Index")),
        "a merge join over whole indexes went unseen: {whole:?}\n{merged:#}"
    );
    one.close().await;
    w.env.finish().await;
}

/// `EXPLAIN (FORMAT JSON)` of `statement` on `pool`'s connection: its top plan node.
async fn explain(pool: &sqlx::PgPool, statement: &str) -> serde_json::Value {
    let explained: serde_json::Value =
        sqlx::query_scalar(&format!("EXPLAIN (FORMAT JSON) {statement}"))
            .fetch_one(pool)
            .await
            .unwrap();
    explained[0]["Plan"].clone()
}

/// The nodes of `plan` that read a whole table: a sequential scan, or an index scan with no
/// index condition (every entry, as a merge join takes it), on any table but the one-row
/// `state_epoch`; each as its node type and table.
fn whole_table_reads(plan: &serde_json::Value) -> Vec<String> {
    let mut found = Vec::new();
    let mut nodes = vec![plan];
    while let Some(node) = nodes.pop() {
        let kind = node["Node Type"].as_str().unwrap_or_default();
        let table = node["Relation Name"].as_str().unwrap_or_default();
        let keyed = node.get("Index Cond").is_some();
        let whole = match kind {
            "Seq Scan" => true,
            "Index Scan" | "Index Only Scan" => !keyed,
            _ => false,
        };
        if whole && table != "state_epoch" {
            found.push(format!("{kind} on {table}"));
        }
        if let Some(children) = node["Plans"].as_array() {
            nodes.extend(children);
        }
    }
    found
}
