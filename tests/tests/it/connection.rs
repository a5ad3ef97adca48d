//! A worker runs its batches on one database connection it keeps ([`HeldConnection`]), and the
//! batch's first round trip both begins the transaction and takes its locks, with a statement
//! prepared on that connection: a batch that fails there must not leave that connection, or the
//! pool, with a transaction nobody ends, a connection taken from the pool must run batches
//! whether or not the statement is prepared on it, and a connection kept past its hold limit goes
//! back to the pool, whose limits then apply to it.

use crate::{World, trajet, upsert_from_oa, world_without_gateway};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use std::time::Duration;
use trio_handlers::batch::lock_key;
use trio_handlers::context::Context;
use trio_handlers::{BatchError, HeldConnection, process_batch};
use trio_tests::WAIT;

/// The access tests' world without its gateway, and a context whose pool holds one connection:
/// whatever a batch leaves on it, the next batch gets.
async fn on_one_connection(seq: u32) -> (World, Context, PgPool) {
    let (w, shared) = world_without_gateway(seq).await;
    let one = PgPoolOptions::new()
        .max_connections(1)
        .connect(w.env.config.database_url.expose())
        .await
        .unwrap();
    let ctx = Context::new(
        one.clone(),
        shared.pseudonymiser.clone(),
        ["guest".to_owned()],
    );
    (w, ctx, one)
}

/// A batch waits for a lock another session holds; the wait is cancelled (as an operator's
/// `pg_cancel_backend` or a statement timeout would). The batch fails, and the next batch of the
/// same worker — on a pool of one connection, so on whatever that failure left — commits.
#[tokio::test]
async fn a_batch_whose_lock_wait_was_cancelled_leaves_no_transaction_open_behind_it() {
    let (w, ctx, one) = on_one_connection(80).await;
    let body = trajet(&w.niss, "cancelled", "rtw_ami", "en_cours", 1);
    let message = upsert_from_oa("m-cancelled", &body);

    // Another session holds the batch's idempotency-key lock.
    let mut holder = w.env.db.acquire().await.unwrap();
    let key = lock_key(
        "inbox",
        &format!("{}\n{}", message.sender_key(), message.message_id),
    );
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(key)
        .execute(&mut *holder)
        .await
        .unwrap();

    let mut connection = HeldConnection::default();
    let batch = std::slice::from_ref(&message);
    let waiting = process_batch(&ctx, &mut connection, batch);
    let cancel = async {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let cancelled: Option<bool> = sqlx::query_scalar(
                "SELECT pg_cancel_backend(pid) FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event = 'advisory' LIMIT 1",
            )
            .fetch_optional(&mut *holder)
            .await
            .unwrap();
            if cancelled == Some(true) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the batch never waited for the lock"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let (failed, ()) = tokio::join!(waiting, cancel);
    match failed {
        Err(BatchError::Failed(e)) => assert!(e.contains("cancel"), "{e}"),
        other => panic!("the cancelled batch should fail, got {other:?}"),
    }
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(key)
        .execute(&mut *holder)
        .await
        .unwrap();

    let result = process_batch(&ctx, &mut connection, batch)
        .await
        .expect("the next batch commits");
    assert_eq!(result.outcomes[0].status.as_str(), "accepted");
    let version: i64 = sqlx::query_scalar("SELECT version FROM trajet WHERE ref = 'cancelled'")
        .fetch_one(&w.env.db)
        .await
        .unwrap();
    assert_eq!(version, 1);
    drop((holder, connection));
    one.close().await;
    w.env.finish().await;
}

/// A connection a worker gave back to the pool (its session ended) still has the statement the
/// worker prepared on it; the next worker to take it uses it as it is, and so does a connection
/// on which it is missing, once prepared again.
#[tokio::test]
async fn a_connection_taken_again_from_the_pool_runs_batches_whether_or_not_it_was_prepared() {
    let (w, ctx, one) = on_one_connection(81).await;
    let prepared_statements = || async {
        let names: Vec<String> = sqlx::query_scalar("SELECT name FROM pg_prepared_statements")
            .fetch_all(&one)
            .await
            .unwrap();
        names
    };
    let upsert = |version| version_of(&w, "again", version);

    let mut first = HeldConnection::default();
    commits(&ctx, &mut first, upsert(1)).await;
    drop(first);
    let names = prepared_statements().await;
    assert!(names.iter().any(|n| n == "trio_batch_locks"), "{names:?}");

    let mut second = HeldConnection::default();
    commits(&ctx, &mut second, upsert(2)).await;
    drop(second);

    // As after a `DISCARD ALL`: the statement is gone, and the next worker prepares it again.
    sqlx::raw_sql("DEALLOCATE trio_batch_locks")
        .execute(&one)
        .await
        .unwrap();
    let mut third = HeldConnection::default();
    commits(&ctx, &mut third, upsert(3)).await;

    let version: i64 = sqlx::query_scalar("SELECT version FROM trajet WHERE ref = 'again'")
        .fetch_one(&w.env.db)
        .await
        .unwrap();
    assert_eq!(version, 3);
    drop(third);
    one.close().await;
    w.env.finish().await;
}

/// A worker keeps its connection only up to its hold limit: past it, the connection goes back to
/// the pool before the next batch, and a pool whose `max_lifetime` it outlived closes it; the
/// batch runs on a new connection (preparing the lock statement there). Within the limit, the
/// same connection runs every batch, whatever the pool's lifetime.
#[tokio::test]
async fn a_connection_kept_past_its_hold_limit_goes_back_to_the_pool_which_may_retire_it() {
    let (w, shared) = world_without_gateway(82).await;
    let options: PgConnectOptions = w.env.config.database_url.expose().parse().unwrap();
    // Every connection is past this lifetime by the time it is given back.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .max_lifetime(Duration::from_millis(1))
        .connect_with(options.application_name("trio-held"))
        .await
        .unwrap();
    let ctx = Context::new(pool, shared.pseudonymiser.clone(), ["guest".to_owned()]);
    let backends = || async {
        let pids: Vec<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name = 'trio-held'",
        )
        .fetch_all(&w.env.db)
        .await
        .unwrap();
        pids
    };
    let upsert = |version| version_of(&w, "held", version);

    // Within the limit: one connection for every batch.
    let mut kept = HeldConnection::default();
    commits(&ctx, &mut kept, upsert(1)).await;
    let first = backends().await;
    assert_eq!(first.len(), 1, "{first:?}");
    commits(&ctx, &mut kept, upsert(2)).await;
    commits(&ctx, &mut kept, upsert(3)).await;
    assert_eq!(
        backends().await,
        first,
        "a connection within its hold limit is kept"
    );
    drop(kept);

    // Past the limit (here at once): given back before each batch, retired by the pool.
    let mut held = HeldConnection::holding_at_most(Duration::ZERO);
    commits(&ctx, &mut held, upsert(4)).await;
    let before = backends().await;
    commits(&ctx, &mut held, upsert(5)).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let after = loop {
        let now = backends().await;
        if now.len() == 1 || tokio::time::Instant::now() > deadline {
            break now;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(after.len(), 1, "{after:?}");
    assert_ne!(
        after, before,
        "the connection past its hold limit was not retired"
    );

    let version: i64 = sqlx::query_scalar("SELECT version FROM trajet WHERE ref = 'held'")
        .fetch_one(&w.env.db)
        .await
        .unwrap();
    assert_eq!(version, 5);
    drop(held);
    ctx.pool.close().await;
    w.env.finish().await;
}

/// Runs `message` alone as a batch on `connection`, which must commit and accept it.
async fn commits(ctx: &Context, connection: &mut HeldConnection, message: trio_handlers::Inbound) {
    let result = process_batch(ctx, connection, std::slice::from_ref(&message))
        .await
        .expect("the batch commits");
    assert_eq!(result.outcomes[0].status.as_str(), "accepted");
}

/// The OA's `trajet.upsert` of its trajet `reference` for the world's insured, at `version`.
fn version_of(w: &World, reference: &str, version: i64) -> trio_handlers::Inbound {
    let body = trajet(&w.niss, reference, "rtw_ami", "en_cours", version);
    upsert_from_oa(&format!("m-{reference}-{version}"), &body)
}
