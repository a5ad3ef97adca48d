//! A worker runs its batches on one database connection it keeps ([`HeldConnection`]), and the
//! batch's first round trip both begins the transaction and takes its locks, with a statement
//! prepared on that connection: a batch that fails there must not leave that connection, or the
//! pool, with a transaction nobody ends, and a connection taken from the pool must run batches
//! whether or not the statement is prepared on it.

use crate::{World, trajet, upsert_from_oa, world_without_gateway};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
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
    let (w, ctx, _) = on_one_connection(80).await;
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
    let upsert = |version: i64| {
        let body = trajet(&w.niss, "again", "rtw_ami", "en_cours", version);
        upsert_from_oa(&format!("m-again-{version}"), &body)
    };
    let commits = |result: Result<trio_handlers::BatchResult, BatchError>| {
        let result = result.expect("the batch commits");
        assert_eq!(result.outcomes[0].status.as_str(), "accepted");
    };

    let mut first = HeldConnection::default();
    commits(process_batch(&ctx, &mut first, &[upsert(1)]).await);
    drop(first);
    let names = prepared_statements().await;
    assert!(names.iter().any(|n| n == "trio_batch_locks"), "{names:?}");

    let mut second = HeldConnection::default();
    commits(process_batch(&ctx, &mut second, &[upsert(2)]).await);
    drop(second);

    // As after a `DISCARD ALL`: the statement is gone, and the next worker prepares it again.
    sqlx::raw_sql("DEALLOCATE trio_batch_locks")
        .execute(&one)
        .await
        .unwrap();
    let mut third = HeldConnection::default();
    commits(process_batch(&ctx, &mut third, &[upsert(3)]).await);

    let version: i64 = sqlx::query_scalar("SELECT version FROM trajet WHERE ref = 'again'")
        .fetch_one(&w.env.db)
        .await
        .unwrap();
    assert_eq!(version, 3);
}
