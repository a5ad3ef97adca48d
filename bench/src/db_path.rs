//! Phases 4b and 5b, the database path alone: `trio_handlers::process_batch` run by the bench
//! itself on one kept connection (as a gateway worker runs it, with the gateway's session
//! settings), no broker, in batches of half load's size and of 1:1's. Through the broker a change
//! worth a few µs per message drowns in this VM's drift; here the fixed cost of a batch and the
//! cost of a message in PostgreSQL come out of two straight lines, with 10 000 insured known
//! (4b) and with a million more (5b; in full runs).

use crate::cpu;
use crate::setup::World;
use anyhow::{Context as _, bail};
use std::sync::Arc;
use std::time::Instant;
use trio_gateway::config::{Config, SecretUrl};
use trio_handlers::{Context, HeldConnection, Inbound, SourceQueue, process_batch};
use trio_pseudo::{CacheConfig, LocalPseudonymiser, PseudoDomain};
use trio_schemas::{ContentType, MessageType};

/// What a run of the database path cost PostgreSQL: a fixed part per batch and a part per
/// message, from the two batch sizes.
#[derive(Debug, Clone, Copy)]
pub struct Fit {
    /// PostgreSQL CPU per batch, whatever its size (µs).
    pub fixed_us: f64,
    /// PostgreSQL CPU per message (µs).
    pub per_message_us: f64,
    /// The larger batch size (1:1's).
    pub large_batch: usize,
    /// PostgreSQL CPU per message at the larger size (µs): measured, not fitted.
    pub large_batch_per_message_us: f64,
    /// The batch code's CPU per message at the larger size (µs), in the bench process.
    pub large_batch_code_per_message_us: f64,
}

/// What one batch size cost.
struct Figures {
    batch: usize,
    ms_per_batch: f64,
    postgresql_us_per_batch: f64,
    bench_us_per_batch: f64,
}

/// Runs `messages` `trajet.upsert` in batches of `small`, then of `large`, from `sender` (the
/// OA's broker user); `body(k)` is the JSON body of message `k` (a new version each time).
/// Prints one line per size, labelled `[phase]`, and the fixed and per-message costs they imply,
/// which it returns. The label's first word (`4b`) also starts the message ids, so that each run
/// has its own.
pub async fn run(
    phase: &str,
    world: &World,
    sender: &str,
    (small, large): (usize, usize),
    messages: usize,
    mut body: impl FnMut(u64) -> Vec<u8>,
) -> anyhow::Result<Fit> {
    let config = Config {
        database_url: SecretUrl::new(world.database_url()),
        db_pool_size: 2,
        ..Config::default()
    };
    let pool = trio_gateway::serve::connect_db(&config, None).await?;
    let domain = std::fs::read_to_string(world.dir.join("domain.json"))
        .context("reading the bench's pseudonymisation domain")?;
    let domain = PseudoDomain::from_json(&domain)?;
    let pseudonymiser = Arc::new(LocalPseudonymiser::new(domain, CacheConfig::default()));
    let ctx = Context::new(pool.clone(), pseudonymiser, [world.operator().0]);
    let mut connection = HeldConnection::default();
    let id = phase.split_whitespace().next().unwrap_or("db");
    let mut next = 0u64;
    let mut batch_of = |size: usize| -> Vec<Inbound> {
        (0..size)
            .map(|_| {
                next += 1;
                let payload =
                    trio_schemas::decode(MessageType::TrajetUpsert, ContentType::Json, &body(next))
                        .map_err(|e| e.to_string());
                Inbound {
                    queue: SourceQueue::Oa,
                    user_id: Some(sender.to_owned()),
                    message_id: format!("{id}-{next}"),
                    message_type: MessageType::TrajetUpsert,
                    reply_to: None,
                    traceparent: None,
                    redelivered: false,
                    payload,
                }
            })
            .collect()
    };
    // Warm up: the bench's own pseudonymiser meets these insured for the first time (P-521),
    // and the connection prepares its statements.
    for _ in 0..2 {
        let warm = batch_of(large);
        run_one(&ctx, &mut connection, &warm).await?;
    }
    let narrow_before = ctx.state_cache.narrow_loads();
    let mut figures = Vec::new();
    let mut measured = 0;
    for size in [small, large] {
        let batches = (messages / size).max(1);
        measured += batches;
        let work: Vec<Vec<Inbound>> = (0..batches).map(|_| batch_of(size)).collect();
        let cpu_before = cpu::snapshot(&[]);
        let started = Instant::now();
        for batch in &work {
            run_one(&ctx, &mut connection, batch).await?;
        }
        let seconds = started.elapsed().as_secs_f64();
        let cost = cpu::PerMessage::between(&cpu_before, &cpu::snapshot(&[]), batches as u64);
        figures.push(Figures {
            batch: size,
            ms_per_batch: seconds * 1e3 / batches as f64,
            postgresql_us_per_batch: cost.postgresql(),
            bench_us_per_batch: cost.bench(),
        });
    }
    let narrow_after = ctx.state_cache.narrow_loads();
    drop(connection);
    pool.close().await;
    for f in &figures {
        println!(
            "[{phase}] batches of {}: {:.2} ms each; CPU per batch: PostgreSQL {:.0} µs \
             ({:.1} per message), the batch code {:.0} µs ({:.1} per message)",
            f.batch,
            f.ms_per_batch,
            f.postgresql_us_per_batch,
            f.postgresql_us_per_batch / f.batch as f64,
            f.bench_us_per_batch,
            f.bench_us_per_batch / f.batch as f64,
        );
    }
    println!(
        "[{phase}] {} of the {measured} batches loaded narrowly (every insured cached), \
         {} tried to and found the state epoch moved",
        narrow_after.0 - narrow_before.0,
        narrow_after.1 - narrow_before.1,
    );
    let [a, b] = figures.as_slice() else {
        bail!("{phase}: expected two batch sizes");
    };
    // Two points of `cost = fixed + per_message × size`.
    let line = |ya: f64, yb: f64| {
        let per_message = (yb - ya) / (b.batch - a.batch) as f64;
        (ya - per_message * a.batch as f64, per_message)
    };
    let (pg_fixed, pg_each) = line(a.postgresql_us_per_batch, b.postgresql_us_per_batch);
    let (wall_fixed, wall_each) = line(a.ms_per_batch * 1e3, b.ms_per_batch * 1e3);
    println!(
        "[{phase}] so a batch costs PostgreSQL about {:.2} ms of CPU plus {:.0} µs per message, \
         and takes about {:.2} ms plus {:.0} µs per message",
        pg_fixed / 1e3,
        pg_each,
        wall_fixed / 1e3,
        wall_each
    );
    Ok(Fit {
        fixed_us: pg_fixed,
        per_message_us: pg_each,
        large_batch: b.batch,
        large_batch_per_message_us: b.postgresql_us_per_batch / b.batch as f64,
        large_batch_code_per_message_us: b.bench_us_per_batch / b.batch as f64,
    })
}

/// One batch; every message must be accepted (the bench's traffic is valid by construction).
async fn run_one(
    ctx: &Context,
    connection: &mut HeldConnection,
    batch: &[Inbound],
) -> anyhow::Result<()> {
    let result = process_batch(ctx, connection, batch)
        .await
        .map_err(|e| anyhow::anyhow!("database path: {e}"))?;
    if let Some(outcome) = result
        .outcomes
        .iter()
        .find(|o| o.status.as_str() != "accepted")
    {
        bail!(
            "database path: a message was answered {} ({})",
            outcome.status.as_str(),
            outcome.code.as_deref().unwrap_or("")
        );
    }
    Ok(())
}
