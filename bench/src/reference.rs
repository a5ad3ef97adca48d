//! Issue 10's reference pipeline, measured on this machine: the plain relay of
//! [`crate::amqp::spawn_relay`] given the gateway's durability in PostgreSQL and no business
//! logic. Per batch of deliveries it commits one transaction — inbox insert with `ON CONFLICT`,
//! state upsert by version, outbox insert, all `UNNEST` array parameters of one prepared
//! statement — then publishes with confirms, marks the outbox rows sent and acks once.
//!
//! The issue quotes this pipeline at 0.78× the relay with 2 batches in flight and 0.95× with 4.
//! Measured beside the relay and the gateway in the same run, it tells how much of the gap
//! between them any gateway would pay for durability on this machine, and how much is the
//! gateway's own work.

use anyhow::Context as _;
use lapin::message::Delivery;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Executor as _, PgPool};
use std::collections::HashMap;

/// The reference pipeline's tables, in the bench database beside the gateway's (the `ref_`
/// prefix keeps them apart): narrow rows, one key each, as the issue describes.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS ref_inbox (
    sender text NOT NULL, message_id text NOT NULL, status text NOT NULL,
    PRIMARY KEY (sender, message_id));
CREATE TABLE IF NOT EXISTS ref_state (
    key text PRIMARY KEY, version bigint NOT NULL, status text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS ref_outbox (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, message_id text NOT NULL,
    routing_key text NOT NULL, body bytea NOT NULL, sent boolean NOT NULL DEFAULT false);
";

/// One batch's transaction, as a single statement (one round trip besides `BEGIN`/`COMMIT`).
const COMMIT_BATCH: &str = "
WITH inbox AS (
    INSERT INTO ref_inbox (sender, message_id, status)
    SELECT 'bench', m, 'accepted' FROM UNNEST($1::text[]) AS i(m)
    ON CONFLICT DO NOTHING
), state AS (
    INSERT INTO ref_state (key, version, status)
    SELECT * FROM UNNEST($2::text[], $3::bigint[], $4::text[])
    ON CONFLICT (key) DO UPDATE
        SET version = EXCLUDED.version, status = EXCLUDED.status, updated_at = now()
        WHERE ref_state.version < EXCLUDED.version
)
INSERT INTO ref_outbox (message_id, routing_key, body)
SELECT * FROM UNNEST($1::text[], $5::text[], $6::bytea[])
RETURNING id";

/// The reference pipeline's database side.
#[derive(Clone)]
pub struct Store {
    /// Batch transactions (synchronous commit: the ack follows them).
    commits: PgPool,
    /// Outbox rows marked sent, without waiting for the WAL flush, as the gateway's relay does.
    sent: PgPool,
    /// How many state rows the messages spread over (message `k` updates row `k % keys`).
    keys: u64,
}

impl Store {
    /// Creates the tables in the database of `url` and pools for `workers` batches in flight.
    ///
    /// # Errors
    /// When PostgreSQL refuses.
    pub async fn create(url: &str, workers: u32, keys: u64) -> anyhow::Result<Self> {
        let options: PgConnectOptions = url.parse().context("the bench database URL")?;
        let options = options.options([("jit", "off")]);
        let commits = PgPoolOptions::new()
            .max_connections(workers)
            .connect_with(options.clone())
            .await?;
        commits
            .execute(SCHEMA)
            .await
            .context("creating the tables")?;
        let sent = PgPoolOptions::new()
            .max_connections(workers)
            .connect_with(options.options([("synchronous_commit", "off")]))
            .await?;
        Ok(Self {
            commits,
            sent,
            keys: keys.max(1),
        })
    }

    /// Commits one batch; returns its outbox rows' ids.
    ///
    /// # Errors
    /// Database failures.
    pub async fn commit(&self, deliveries: &[Delivery], to: &str) -> anyhow::Result<Vec<i64>> {
        let ids: Vec<String> = deliveries
            .iter()
            .map(|d| {
                d.properties
                    .message_id()
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default()
            })
            .collect();
        // One state row per key (an upsert may not touch a row twice), at its highest version.
        let mut state: HashMap<String, i64> = HashMap::with_capacity(ids.len());
        for id in &ids {
            let k = id
                .rsplit('-')
                .next()
                .and_then(|k| k.parse::<u64>().ok())
                .unwrap_or(0);
            let version = i64::try_from(k).unwrap_or(i64::MAX);
            let slot = state
                .entry(format!("k{}", k % self.keys))
                .or_insert(version);
            *slot = (*slot).max(version);
        }
        let (keys, versions): (Vec<String>, Vec<i64>) = state.into_iter().unzip();
        let mut tx = self.commits.begin().await?;
        let rows: Vec<i64> = sqlx::query_scalar(COMMIT_BATCH)
            .bind(&ids)
            .bind(&keys)
            .bind(&versions)
            .bind(vec!["open"; keys.len()])
            .bind(vec![to; ids.len()])
            .bind(
                deliveries
                    .iter()
                    .map(|d| d.data.as_slice())
                    .collect::<Vec<_>>(),
            )
            .fetch_all(&mut *tx)
            .await
            .context("committing a batch")?;
        tx.commit().await?;
        Ok(rows)
    }

    /// Marks published outbox rows sent.
    ///
    /// # Errors
    /// Database failures.
    pub async fn mark_sent(&self, ids: &[i64]) -> anyhow::Result<()> {
        sqlx::query("UPDATE ref_outbox SET sent = true WHERE id = ANY($1)")
            .bind(ids)
            .execute(&self.sent)
            .await
            .context("marking the outbox sent")?;
        Ok(())
    }

    /// Drops the tables and closes the pools.
    ///
    /// # Errors
    /// When PostgreSQL refuses.
    pub async fn drop_tables(self) -> anyhow::Result<()> {
        self.sent.close().await;
        self.commits
            .execute("DROP TABLE ref_inbox, ref_state, ref_outbox")
            .await?;
        self.commits.close().await;
        Ok(())
    }
}
