//! The phases of issue 10, in order, each printing its figures:
//!
//! 1. relay ceiling (plain lapin, quorum → quorum, confirms, ack after confirm), then issue 10's
//!    reference pipeline: the same relays committing each batch to PostgreSQL
//!    ([`crate::reference`]), with 2 and with 4 batches in flight;
//! 2. first contact (new insured: two `relation.set` each, then a first `trajet.upsert`);
//! 3. gateway 1:1 (`trajet.upsert` → exactly one `trajet.updated`), throughput (also against the
//!    faster reference pipeline run) and latency; then the relay ceiling again, so that `ratio`
//!    compares the gateway with the mean of two relay runs around it;
//! 4. latency at half the throughput of 3, paced; 4b, the database path alone at batches of
//!    20 and of the gateway's size; 4c, low traffic (100 msgs/s: batches of a message or two),
//!    latency and CPU per message, against the plain relay at the same pace;
//! 5. scale: 3 again with a million cold insured in the database; then the relay ceiling again,
//!    so that the comparison with 3 can also be read against the relay next to each (5r), and
//!    the database path alone again, against 4b (5b);
//! 6. backlog: messages queued before `serve` starts; peak RSS and drain rate;
//! 7. two `serve` processes; throughput, and every trajet at its highest version.
//!
//! Every inbound `trajet.upsert` comes from one OA for an insured related to that OA and one GP,
//! so it yields exactly one outbound `trajet.updated` (to the GP), received on a quorum queue.

use crate::amqp::{self, Message, Publisher, Received, Sink};
use crate::broker_log;
use crate::cpu;
use crate::db_path;
use crate::gateway::{self, Gateway};
use crate::reference;
use crate::setup::{GP_ID, OA_ID, World};
use crate::wal;
use anyhow::{Context as _, bail};
use serde_json::json;
use std::time::{Duration, Instant};
use trio_gateway::partner::synthetic_niss;

/// Phase 4c's pace: far below a batch's worth per linger, so batches hold one message or two.
const LOW_TRAFFIC_RATE: f64 = 100.0;

/// The full run's half load, in seconds: about one cycle of the broker's quorum-queue log at
/// that pace on this machine (a roll-over every 512 MiB, about every 70 s at half load, each
/// stalling confirms and deliveries for 100–640 ms). A 20-second phase, as the bench ran until the
/// nineteenth pass, met one in about a third of the runs, and then the messages that waited out
/// the stall were over one per cent of the phase's, so p99 was the stall's whatever the rest did:
/// it read whether the dice had put a roll-over in the window. Over a cycle the roll-over weighs
/// what it weighs in steady state, a third of that share: on this machine still over one per
/// cent (runs BP and BR, `bench/HISTORY.md`), for the plain relay at the same pace too, so p99
/// then says that the broker's log stalls too long for the target at this pace, and the spread
/// line's share of messages over 50 ms says by how much.
const HALF_LOAD_SECONDS: f64 = 60.0;

/// Phase 4b's small batches: about half load's size (20–25 messages in the full runs).
const DB_PATH_SMALL_BATCH: usize = 20;

/// Counts for one run.
struct Sizes {
    relay: u64,
    hot: usize,
    one_to_one: u64,
    half_load_seconds: f64,
    /// Length of phase 4c, at [`LOW_TRAFFIC_RATE`].
    low_traffic_seconds: f64,
    cold: u64,
    backlog: u64,
    two: u64,
    /// Give up on a phase when nothing arrived for this long.
    idle: Duration,
}

const FULL: Sizes = Sizes {
    relay: 200_000,
    hot: 10_000,
    one_to_one: 200_000,
    half_load_seconds: HALF_LOAD_SECONDS,
    low_traffic_seconds: 10.0,
    cold: 1_000_000,
    backlog: 1_000_000,
    two: 200_000,
    idle: Duration::from_secs(90),
};

// More hot insured than the messages two processes hold unacked (2 × 2 workers × the default
// prefetch, 400, on the one inbound queue the bench feeds): the upserts of one trajet are then
// never in flight together, so none is answered `stale`.
const QUICK: Sizes = Sizes {
    // Enough for the relay phases to outlast their start-up (with 5 000 the relay ceiling once
    // read half its usual rate, and `ratio` 1.32).
    relay: 20_000,
    hot: 2_000,
    one_to_one: 6_000,
    half_load_seconds: 2.0,
    low_traffic_seconds: 1.0,
    cold: 20_000,
    backlog: 6_000,
    two: 6_000,
    idle: Duration::from_secs(60),
};

/// The sink queue that receives what the gateway sends the GP.
const GP_QUEUE: &str = "bench.gp";
const RELAY_IN: &str = "bench.relay.in";
const RELAY_OUT: &str = "bench.relay.out";

/// Runs every phase in a fresh world and removes it, whatever happened. `messages` overrides the
/// message count of phases 3, 5 and 7, `half_load_seconds` the length of phase 4.
///
/// # Errors
/// When a service is down, a phase fails or loses messages.
pub async fn run(
    quick: bool,
    messages: Option<u64>,
    half_load_seconds: Option<f64>,
) -> anyhow::Result<()> {
    let mut sizes = if quick { QUICK } else { FULL };
    if let Some(n) = messages {
        sizes.one_to_one = n;
        sizes.two = n;
    }
    if let Some(seconds) = half_load_seconds {
        sizes.half_load_seconds = seconds;
    }
    let sizes = &sizes;
    let world = World::create().await?;
    println!(
        "trio-bench{}: vhost {} database {} (removed at the end)",
        if quick { " --quick" } else { "" },
        world.vhost,
        world.database
    );
    let tuning = gateway::tuning();
    println!(
        "gateway settings: {}",
        if tuning.is_empty() {
            "defaults".to_owned()
        } else {
            tuning.join(" ")
        }
    );
    let mut gateways = Vec::new();
    // Interrupted (Ctrl-C, SIGTERM): still stop the gateways and remove the world.
    let result = tokio::select! {
        result = phases(&world, sizes, &mut gateways) => result,
        () = trio_gateway::serve::termination_signal() => Err(anyhow::anyhow!("interrupted")),
    };
    if result.is_err() {
        for g in &gateways {
            eprintln!("gateway log {}:\n{}", g.log.display(), g.log_tail());
        }
    }
    for g in gateways {
        if let Err(e) = gateway::stop(g).await {
            eprintln!("stopping a gateway: {e:#}");
        }
    }
    report_log_warnings(&world);
    world.remove().await;
    let summary = result?;
    println!("{summary}");
    Ok(())
}

/// Prints how many warnings and errors the gateway processes logged, grouped by message (lines
/// that differ only in their numbers, such as slow-batch timings, are one group), each group
/// with its first line in full.
fn report_log_warnings(world: &World) {
    let mut kinds: std::collections::BTreeMap<String, (usize, String)> =
        std::collections::BTreeMap::new();
    let lines = warnings_since(world, &std::collections::BTreeMap::new());
    let total = lines.len();
    for line in lines {
        let key: String = line
            .chars()
            .take(90)
            .map(|c| if c.is_ascii_digit() { '#' } else { c })
            .collect();
        kinds.entry(key).or_insert_with(|| (0, line)).0 += 1;
    }
    println!("gateway logs: {total} warning/error line(s)");
    for (count, example) in kinds.into_values() {
        println!("  {count} × {example}");
    }
}

/// How far each gateway log has been written: what a phase logs comes after these offsets.
fn log_marks(world: &World) -> std::collections::BTreeMap<std::path::PathBuf, usize> {
    let Ok(entries) = std::fs::read_dir(&world.dir) else {
        return std::collections::BTreeMap::new();
    };
    entries
        .flatten()
        .map(|e| {
            let len = e.metadata().map(|m| m.len()).unwrap_or(0);
            (e.path(), usize::try_from(len).unwrap_or(usize::MAX))
        })
        .collect()
}

/// The warnings and errors the gateways logged since `marks` (the message and its fields, no
/// timestamp), so a phase's latency tail can be told apart: a slow batch says which step was
/// slow, a slow publish round that the broker was.
fn warnings_since(
    world: &World,
    marks: &std::collections::BTreeMap<std::path::PathBuf, usize>,
) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(&world.dir) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let bytes = std::fs::read(entry.path()).unwrap_or_default();
        let from = marks
            .get(&entry.path())
            .copied()
            .unwrap_or(0)
            .min(bytes.len());
        for line in String::from_utf8_lossy(&bytes[from..]).lines() {
            let plain = strip_ansi(line);
            if let Some(at) = plain.find(" WARN ").or_else(|| plain.find(" ERROR ")) {
                found.push(plain[at..].trim().chars().take(300).collect());
            }
        }
    }
    found
}

/// A log line without its terminal colour codes.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// What a gateway phase costs per message: CPU of each process group and the database's WAL,
/// read before the phase and compared after it.
struct Meter {
    cpu: cpu::Snapshot,
    wal: wal::Snapshot,
}

/// [`Meter`]'s figures for one phase.
struct Cost {
    cpu: cpu::PerMessage,
    wal: wal::PerMessage,
}

impl Meter {
    async fn start(world: &World, gateways: &[Gateway]) -> Self {
        let wal = wal::snapshot(&world.db).await;
        Self {
            cpu: cpu::snapshot(&pids(gateways)),
            wal,
        }
    }

    async fn per_message(&self, world: &World, gateways: &[Gateway], messages: u64) -> Cost {
        let cpu = cpu::PerMessage::between(&self.cpu, &cpu::snapshot(&pids(gateways)), messages);
        let wal = wal::PerMessage::between(&self.wal, &wal::snapshot(&world.db).await, messages);
        Cost { cpu, wal }
    }
}

impl Cost {
    /// Prints both lines under the phase's label.
    fn print(&self, phase: &str) {
        println!("[{phase}] {}", self.cpu);
        println!("[{phase}] {}", self.wal);
    }
}

/// The gateway processes' pids.
fn pids(gateways: &[Gateway]) -> Vec<u32> {
    gateways.iter().map(Gateway::pid).collect()
}

/// The bench's view of the hot insured: NISS and the last version sent for each one's trajet.
struct Hot {
    niss: Vec<String>,
    versions: Vec<i64>,
}

impl Hot {
    /// `trajet.upsert` number `k` of a phase: round-robin over the insured, next version.
    fn upsert(&mut self, phase: u8, k: u64) -> Message {
        let i = usize::try_from(k).unwrap_or(0) % self.niss.len();
        self.versions[i] += 1;
        let body = json!({"niss": self.niss[i], "trajet": {
            "ref": format!("b{i}"), "type": "rtw_ami", "status": "en_cours",
            "version": self.versions[i], "start_on": "2026-11-02", "consent": "given"}});
        Message {
            exchange: trio_gateway::broker::INBOUND_EXCHANGE,
            routing_key: "oa".into(),
            message_type: Some("trajet.upsert"),
            message_id: format!("p{phase}-{k}"),
            body: body.to_string().into_bytes(),
        }
    }
}

/// `", N answered stale"` when a delayed batch was overtaken, else nothing.
fn stale_note(got: &Received) -> String {
    if got.stale == 0 {
        String::new()
    } else {
        format!(
            " ({} answered stale: overtaken by a newer version)",
            got.stale
        )
    }
}

/// Figures of one measured stretch.
struct Rate {
    messages: u64,
    seconds: f64,
}

impl Rate {
    fn per_second(&self) -> f64 {
        self.messages as f64 / self.seconds.max(1e-9)
    }
    fn us_per_message(&self) -> f64 {
        1e6 / self.per_second().max(1e-9)
    }
}

/// Throughput from `from` to the last message received; fails when messages are missing, with
/// the outcomes the gateway recorded for the phase.
async fn span(
    world: &World,
    phase: u8,
    from: Instant,
    got: &Received,
    expected: u64,
    what: &str,
) -> anyhow::Result<Rate> {
    if got.count + got.stale < expected {
        let outcomes: Vec<(String, Option<String>, i64)> = sqlx::query_as(
            "SELECT status, code, count(*) FROM inbox WHERE message_id LIKE $1 \
             GROUP BY status, code ORDER BY 3 DESC",
        )
        .bind(format!("p{phase}-%"))
        .fetch_all(&world.db)
        .await
        .unwrap_or_default();
        let stale: Vec<(String, Option<String>)> = sqlx::query_as(
            "SELECT message_id, detail FROM inbox WHERE message_id LIKE $1 AND status = 'stale' \
             ORDER BY received_at LIMIT 5",
        )
        .bind(format!("p{phase}-%"))
        .fetch_all(&world.db)
        .await
        .unwrap_or_default();
        if !stale.is_empty() {
            eprintln!("{what}: first stale outcomes {stale:?}");
        }
        let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
            .fetch_one(&world.db)
            .await
            .unwrap_or(-1);
        bail!(
            "{what}: received {} of {expected} outbound messages; inbox outcomes {outcomes:?}; \
             {outbox} outbox rows unpublished",
            got.count
        );
    }
    let last = got.last.unwrap_or(from);
    Ok(Rate {
        messages: expected,
        seconds: last.saturating_duration_since(from).as_secs_f64(),
    })
}

async fn start_gateway(
    world: &World,
    gateways: &mut Vec<Gateway>,
    probe: &lapin::Connection,
) -> anyhow::Result<()> {
    static SPAWNED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = SPAWNED.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
    let log = world.dir.join(format!("gateway-{n}.log"));
    gateways.push(gateway::spawn(&world.gateway_env(), &log)?);
    // Every worker of every process consumes the OA queue. The gateways inherit this process's
    // environment, so a `TRIO_WORKERS` set for the bench is theirs too.
    let workers = trio_gateway::config::Config::from_env()?.workers;
    let expected = u32::try_from(workers * gateways.len())?;
    let started = Instant::now();
    while amqp::consumers_of(probe, "trio.inbound.oa").await < expected {
        for g in gateways.iter_mut() {
            g.check_running()?;
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("the gateway did not start consuming within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// The OA's `trajet.upsert` traffic over the hot insured, and the sink of what the GP receives.
struct Traffic<'a> {
    world: &'a World,
    oa: &'a Publisher,
    sink: &'a mut Sink,
    hot: &'a mut Hot,
    idle: Duration,
}

impl Traffic<'_> {
    /// Publishes `count` upserts (paced when `rate` is set) while collecting their outbound
    /// messages; returns the first publish and what arrived.
    async fn run(
        &mut self,
        phase: u8,
        count: u64,
        rate: Option<f64>,
    ) -> anyhow::Result<(Instant, Received)> {
        let hot = &mut *self.hot;
        tokio::try_join!(
            self.oa
                .publish(phase, count, rate, |k| hot.upsert(phase, k)),
            receive(self.world, self.sink, phase, count, self.idle)
        )
    }

    /// [`Traffic::run`] unpaced: throughput from first publish to last outbound received.
    async fn saturated(
        &mut self,
        phase: u8,
        count: u64,
        what: &str,
    ) -> anyhow::Result<(Rate, Received)> {
        let (first, got) = self.run(phase, count, None).await?;
        let rate = span(self.world, phase, first, &got, count, what).await?;
        Ok((rate, got))
    }
}

/// Receives the outbound messages of the `sent` inbound ones of `phase`. Stops early (and counts
/// them) when the gateway answered some `stale`: it has recorded an outcome for every message and
/// every `accepted` one's outbound message has arrived. Gives up after `idle` without progress
/// (the caller reports the shortfall).
async fn receive(
    world: &World,
    sink: &mut Sink,
    phase: u8,
    sent: u64,
    idle: Duration,
) -> anyhow::Result<Received> {
    let mut got = Received::default();
    let mut progress = Instant::now();
    loop {
        let before = got.count;
        sink.collect(phase, &mut got, sent, Duration::from_secs(2))
            .await?;
        if got.count >= sent {
            return Ok(got);
        }
        let (processed, accepted): (i64, i64) = sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE status = 'accepted') FROM inbox \
             WHERE message_id LIKE $1",
        )
        .bind(format!("p{phase}-%"))
        .fetch_one(&world.db)
        .await?;
        let (processed, accepted) = (u64::try_from(processed)?, u64::try_from(accepted)?);
        if processed >= sent && got.count >= accepted {
            got.stale = sent - accepted;
            return Ok(got);
        }
        if got.count > before {
            progress = Instant::now();
        } else if progress.elapsed() > idle {
            return Ok(got);
        }
    }
}

async fn phases(
    world: &World,
    sizes: &Sizes,
    gateways: &mut Vec<Gateway>,
) -> anyhow::Result<String> {
    let (operator_url, _) = world.operator();
    let probe = amqp::connect(&operator_url, "trio-bench probe").await?;
    let setup = probe.create_channel().await?;
    // Declared here (same arguments as the gateway's) so the sink can bind before `serve` runs.
    setup
        .exchange_declare(
            trio_gateway::broker::OUTBOUND_EXCHANGE,
            lapin::ExchangeKind::Topic,
            lapin::options::ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await?;
    for q in [GP_QUEUE, RELAY_IN, RELAY_OUT] {
        amqp::declare_quorum(&setup, q).await?;
    }
    amqp::bind(
        &setup,
        GP_QUEUE,
        trio_gateway::broker::OUTBOUND_EXCHANGE,
        &format!("gp.{GP_ID}"),
    )
    .await?;

    // 1. Relay ceiling (the relays run inside this process: their CPU counts as the bench's).
    // After a tenth as many messages, not counted: in quick runs a first relay run on the fresh
    // vhost read 14–25 % below the same run after phase 3 (queues, connections and the broker's
    // processes warming up), and the gateway's phase 3 comes after phase 2 has warmed it.
    relay_run(
        &operator_url,
        world,
        10,
        (sizes.relay / 10).max(2_000),
        None,
        sizes.idle,
    )
    .await?;
    let (relay, cpu_relay) = relay_ceiling(&operator_url, world, 1, sizes, "relay").await?;
    println!(
        "[1 relay ceiling] {} × 1 KiB, quorum→quorum, 4 relays × batches of {}, confirms, \
         ack after confirm: {relay:.0} msgs/s",
        sizes.relay,
        gateway_batch_size()?,
    );
    println!("[1 relay ceiling] {cpu_relay} (bench: the relays, publisher and sink)");

    // 1b. Issue 10's reference pipeline: the same relays, each batch committed to PostgreSQL.
    let store = reference::Store::create(&world.database_url(), 4, sizes.hot as u64).await?;
    // The faster of its two runs: what a pipeline with the gateway's durability and no business
    // rules reaches here, which phase 3 compares the gateway with besides the plain relay.
    let mut reference_best = 0.0_f64;
    for (phase, workers) in [(11u8, 2usize), (12, 4)] {
        let meter = Meter::start(world, &[]).await;
        let (first, got) = relays_run(
            &operator_url,
            world,
            (phase, sizes.relay, None, sizes.idle),
            workers,
            Some(&store),
        )
        .await?;
        let cost = meter.per_message(world, &[], sizes.relay).await;
        let rate = span(world, phase, first, &got, sizes.relay, "reference pipeline")
            .await?
            .per_second();
        println!(
            "[1 reference pipeline] {workers} batches of {} in flight, each one transaction \
             (inbox insert ON CONFLICT, state upsert by version, outbox insert), confirmed \
             publishes, outbox marked sent, one `multiple` ack: {rate:.0} msgs/s ({:.2}× relay)",
            gateway_batch_size()?,
            rate / relay
        );
        cost.print("1 reference pipeline");
        reference_best = reference_best.max(rate);
    }
    // Its tables and WAL must not weigh on the gateway's phases.
    store.drop_tables().await?;
    sqlx::query("CHECKPOINT").execute(&world.db).await?;

    // 2. First contact.
    start_gateway(world, gateways, &probe).await?;
    let operator = Publisher::connect(&operator_url, &world.operator().1).await?;
    let (oa_user, oa_password) = &world.users[1];
    let oa = Publisher::connect(&world.amqp_url(oa_user, oa_password), oa_user).await?;
    let mut sink = Sink::open(&operator_url, GP_QUEUE).await?;
    let orgs = [
        json!({"id": OA_ID, "kind": "oa", "name": "OA bench", "broker_user": oa_user, "format": "json"}),
        json!({"id": GP_ID, "kind": "gp", "name": "GP bench", "broker_user": world.users[2].0, "format": "json"}),
    ];
    operator
        .publish(0, 2, None, |k| {
            reference("organisation.upsert", k, &orgs[k as usize % 2])
        })
        .await?;
    world
        .wait_count("SELECT count(*) FROM organisation", 2, sizes.idle)
        .await?;
    let mut hot = Hot {
        niss: (0..sizes.hot)
            .map(|i| synthetic_niss(u32::try_from(i).unwrap_or(0)))
            .collect(),
        versions: vec![0; sizes.hot],
    };
    let relations = 2 * sizes.hot as u64;
    let first = operator
        .publish(2, relations, None, |k| {
            let niss = &hot.niss[usize::try_from(k / 2).unwrap_or(0)];
            let relation = if k % 2 == 0 {
                json!({"relation": {"kind": "insured_oa", "niss": niss, "oa": OA_ID}})
            } else {
                json!({"relation": {"kind": "insured_gp", "niss": niss, "gp": GP_ID}})
            };
            reference("relation.set", 1000 + k, &relation)
        })
        .await?;
    world
        .wait_count(
            "SELECT count(*) FROM insured_relation",
            i64::try_from(relations)?,
            sizes.idle,
        )
        .await?;
    let relations_rate = Rate {
        messages: relations,
        seconds: first.elapsed().as_secs_f64(),
    };
    let n = sizes.hot as u64;
    let mut traffic = Traffic {
        world,
        oa: &oa,
        sink: &mut sink,
        hot: &mut hot,
        idle: sizes.idle,
    };
    let (first_open, got) = traffic.run(2, n, None).await?;
    let open_rate = span(world, 2, first_open, &got, n, "first contact").await?;
    println!(
        "[2 first contact] {} new insured: {} relation.set (first sight of each NISS: P-521) at \
         {:.0} msgs/s; {} first trajet.upsert (dossier + trajet created) at {:.0} msgs/s; \
         {:.0} insured/s overall",
        sizes.hot,
        relations,
        relations_rate.per_second(),
        n,
        open_rate.per_second(),
        n as f64 / (relations_rate.seconds + open_rate.seconds)
    );

    // 3. Gateway 1:1.
    let meter = Meter::start(world, gateways).await;
    let (one, got) = traffic
        .saturated(3, sizes.one_to_one, "gateway 1:1")
        .await?;
    let cost_one = meter.per_message(world, gateways, sizes.one_to_one).await;
    let gateway_rate = one.per_second();
    println!(
        "[3 gateway 1:1] {} trajet.upsert → {} trajet.updated over {} insured: {:.0} msgs/s \
         ({:.0} µs/msg, {:.2}× relay, {:.2}× the faster reference pipeline); latency p50 {:.1} \
         ms p99 {:.1} ms (saturated){}",
        sizes.one_to_one,
        got.count,
        sizes.hot,
        gateway_rate,
        one.us_per_message(),
        gateway_rate / relay,
        gateway_rate / reference_best,
        got.quantile_ms(0.5),
        got.quantile_ms(0.99),
        stale_note(&got)
    );
    cost_one.print("3 gateway 1:1");

    // 3r. The plain relay again, right after, so that `ratio` compares the gateway with the mean
    // of two relay runs around it: a VM that slows during the run shows as the two readings
    // parting (6 % in run AN; within 1–5 % in five runs of six), not as a gateway made faster or
    // slower. Most of `ratio`'s spread is between runs, where both readings move together.
    let (relay_after, cpu_relay_after) =
        relay_ceiling(&operator_url, world, 9, sizes, "relay again").await?;
    let relay_before = relay;
    let relay = f64::midpoint(relay_before, relay_after);
    println!(
        "[3r relay again] {} × 1 KiB as in 1: {relay_after:.0} msgs/s (phase 1: \
         {relay_before:.0}); the ceiling `ratio` uses, their mean: {relay:.0} msgs/s; gateway \
         1:1 {:.2}× that mean ({:.2}× phase 1's, {:.2}× this run's)",
        sizes.relay,
        gateway_rate / relay,
        gateway_rate / relay_before,
        gateway_rate / relay_after,
    );
    println!("[3r relay again] {cpu_relay_after} (bench: the relays, publisher and sink)");

    // 4. Half load.
    let half_rate = gateway_rate / 2.0;
    let half_count = ((half_rate * sizes.half_load_seconds) as u64).max(200);
    let logged_before = log_marks(world);
    let meter = Meter::start(world, gateways).await;
    let (run, rolled) = broker_log::during(traffic.run(4, half_count, Some(half_rate))).await;
    let (_, got) = run?;
    let cost_half = meter.per_message(world, gateways, half_count).await;
    span(world, 4, Instant::now(), &got, half_count, "half load").await?;
    let p99_half = got.quantile_ms(0.99);
    println!(
        "[4 half load] {half_count} trajet.upsert paced at {half_rate:.0} msgs/s: latency p50 \
         {:.1} ms p99 {p99_half:.1} ms{}",
        got.quantile_ms(0.5),
        stale_note(&got)
    );
    cost_half.print("4 half load");
    println!(
        "[4 half load] {}; {}",
        got.seconds_over(50.0),
        broker_log::describe(rolled.as_deref(), got.first)
    );
    let warnings = warnings_since(world, &logged_before);
    println!(
        "[4 half load] gateway warnings meanwhile: {}",
        warnings.len()
    );
    for warning in warnings.iter().take(10) {
        println!("[4 half load]   {warning}");
    }
    // The broker's share of that latency: the plain relay at the same pace.
    let wal_before = wal::snapshot(&world.db).await;
    let plain = relay_measured(
        &operator_url,
        world,
        (8, half_count, Some(half_rate), sizes.idle),
        "relay at half load",
    )
    .await?;
    let wal_plain =
        wal::PerMessage::between(&wal_before, &wal::snapshot(&world.db).await, half_count);
    println!(
        "[4 half load] the plain relay at the same pace: latency p50 {:.1} ms p99 {:.1} ms \
         (checkpoints begun meanwhile: {}); {}; {}",
        plain.got.quantile_ms(0.5),
        plain.got.quantile_ms(0.99),
        wal_plain.checkpoints(),
        plain.got.seconds_over(50.0),
        broker_log::describe(plain.rolled.as_deref(), plain.got.first)
    );
    println!(
        "[4 half load] the plain relay at the same pace: {}",
        plain.cpu
    );

    // 4b. The database path alone, over the first few hundred insured (the bench's own
    // pseudonymiser meets them once, in its warm-up).
    let small_tables = database_path("4b database path", 40, world, traffic.hot, sizes).await?;

    // 4c. Low traffic: a message at a time, so each batch pays its fixed costs alone (its
    // round trips, its statements' plans) — what half load and 1:1 share over many messages.
    // After a checkpoint: the earlier phases leave shared buffers full of dirty pages, which
    // the checkpointer and the batches' own backends would otherwise write out during the phase
    // (0.7 pages per message written by backends in the first full run with it). The 3 ms of
    // PostgreSQL CPU per message that run read was not that, but a plan scanning every trajet.
    sqlx::query("CHECKPOINT").execute(&world.db).await?;
    let low_count = ((LOW_TRAFFIC_RATE * sizes.low_traffic_seconds) as u64).max(100);
    let meter = Meter::start(world, gateways).await;
    let (_, got) = traffic.run(13, low_count, Some(LOW_TRAFFIC_RATE)).await?;
    let cost_low = meter.per_message(world, gateways, low_count).await;
    span(world, 13, Instant::now(), &got, low_count, "low traffic").await?;
    println!(
        "[4c low traffic] {low_count} trajet.upsert paced at {LOW_TRAFFIC_RATE:.0} msgs/s: \
         latency p50 {:.1} ms p99 {:.1} ms{}",
        got.quantile_ms(0.5),
        got.quantile_ms(0.99),
        stale_note(&got)
    );
    cost_low.print("4c low traffic");
    let plain = relay_measured(
        &operator_url,
        world,
        (14, low_count, Some(LOW_TRAFFIC_RATE), sizes.idle),
        "relay at low traffic",
    )
    .await?;
    println!(
        "[4c low traffic] the plain relay at the same pace: latency p50 {:.1} ms p99 {:.1} ms; \
         {}",
        plain.got.quantile_ms(0.5),
        plain.got.quantile_ms(0.99),
        plain.cpu
    );

    // 5. Scale.
    let seeding = Instant::now();
    world
        .seed_cold(sizes.cold)
        .await
        .context("seeding cold insured")?;
    let known: i64 = sqlx::query_scalar("SELECT count(*) FROM dossier")
        .fetch_one(&world.db)
        .await?;
    println!(
        "[5 scale] seeded {} cold insured in {:.1} s ({known} dossiers known)",
        sizes.cold,
        seeding.elapsed().as_secs_f64()
    );
    let meter = Meter::start(world, gateways).await;
    let (scaled, got) = traffic.saturated(5, sizes.one_to_one, "scale").await?;
    let cost_scaled = meter.per_message(world, gateways, sizes.one_to_one).await;
    println!(
        "[5 scale] {} trajet.upsert with {known} insured known: {:.0} msgs/s ({:.0} µs/msg, \
         {:+.1} % vs {} insured); latency p50 {:.1} ms p99 {:.1} ms{}",
        sizes.one_to_one,
        scaled.per_second(),
        scaled.us_per_message(),
        change_percent(one.us_per_message(), scaled.us_per_message()),
        sizes.hot,
        got.quantile_ms(0.5),
        got.quantile_ms(0.99),
        stale_note(&got)
    );
    cost_scaled.print("5 scale");

    // 5r. The plain relay again, right after, so that the scale comparison can also be read
    // against the machine's speed at each phase: phase 5 comes minutes after phase 3, and on
    // this VM the broker's own CPU per message moved by up to a third between them (run BG),
    // although it does not depend on the number of insured. Each phase's cost per message is
    // divided by the plain relay's next to it (phase 3's: the mean of 1 and 3r, as `ratio`).
    let (relay_scaled, cpu_relay_scaled) =
        relay_ceiling(&operator_url, world, 15, sizes, "relay after scale").await?;
    println!(
        "[5r relay again] {} × 1 KiB as in 1: {relay_scaled:.0} msgs/s (3r: {relay_after:.0}); \
         against the plain relay next to each, cost per message at {known} insured {:+.1} % vs \
         {} insured (gateway {:.2}× the relay in phase 5, {:.2}× in phase 3)",
        sizes.relay,
        relative_to_relay(one.per_second(), relay, scaled.per_second(), relay_scaled),
        sizes.hot,
        scaled.per_second() / relay_scaled,
        gateway_rate / relay,
    );
    println!("[5r relay again] {cpu_relay_scaled} (bench: the relays, publisher and sink)");

    // 5b. The database path alone again, as 4b over the same insured, now with a million more
    // known: what the larger tables cost PostgreSQL, read without the broker. The batch code's
    // own change beside it (the bench process, whose work the tables' size does not reach)
    // gauges the machine's drift between the two: as large as PostgreSQL's in runs BJ and BM.
    let large_tables =
        database_path("5b database path at scale", 41, world, traffic.hot, sizes).await?;
    println!(
        "[5b database path at scale] against 4b, with {known} insured known instead of {hot}: \
         PostgreSQL CPU per message in batches of {batch} {growth:+.1} % ({large:.0} µs against \
         {small:.0}); per batch {:.2} ms against {:.2}, per message {:.0} µs against {:.0}; the \
         batch code, which the tables' size does not reach, {code:+.1} % (a gauge of the drift)",
        large_tables.fixed_us / 1e3,
        small_tables.fixed_us / 1e3,
        large_tables.per_message_us,
        small_tables.per_message_us,
        hot = sizes.hot,
        batch = large_tables.large_batch,
        growth = change_percent(
            small_tables.large_batch_per_message_us,
            large_tables.large_batch_per_message_us
        ),
        large = large_tables.large_batch_per_message_us,
        small = small_tables.large_batch_per_message_us,
        code = change_percent(
            small_tables.large_batch_code_per_message_us,
            large_tables.large_batch_code_per_message_us
        ),
    );

    // 6. Backlog.
    for g in gateways.drain(..) {
        gateway::stop(g).await?;
    }
    let queuing = Instant::now();
    let hot = &mut *traffic.hot;
    oa.publish(6, sizes.backlog, None, |k| hot.upsert(6, k))
        .await?;
    println!(
        "[6 backlog] {} trajet.upsert queued in {:.1} s with no gateway running",
        sizes.backlog,
        queuing.elapsed().as_secs_f64()
    );
    start_gateway(world, gateways, &probe).await?;
    let started = gateways.first().map_or_else(Instant::now, |g| g.started);
    let got = receive(world, traffic.sink, 6, sizes.backlog, sizes.idle).await?;
    let drain = span(world, 6, started, &got, sizes.backlog, "backlog").await?;
    let rss_mb = match gateways.first() {
        Some(g) => g.peak_rss_mb()?,
        None => 0.0,
    };
    println!(
        "[6 backlog] drained {} in {:.1} s from process start: {:.0} msgs/s; gateway peak RSS \
         (VmHWM) {rss_mb:.0} MiB{}",
        sizes.backlog,
        drain.seconds,
        drain.per_second(),
        stale_note(&got)
    );

    // 7. Two processes.
    start_gateway(world, gateways, &probe).await?;
    let (two, got) = traffic.saturated(7, sizes.two, "two processes").await?;
    let refs: Vec<String> = (0..sizes.hot).map(|i| format!("b{i}")).collect();
    let (matching, wrong): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE t.version <> e.v) FROM trajet t \
         JOIN UNNEST($1::text[], $2::bigint[]) AS e(r, v) \
           ON t.owner_kind = 'oa' AND t.owner_id = $3 AND t.ref = e.r",
    )
    .bind(&refs)
    .bind(&traffic.hot.versions)
    .bind(OA_ID)
    .fetch_one(&world.db)
    .await?;
    if matching != i64::try_from(sizes.hot)? || wrong != 0 {
        bail!(
            "two processes: {wrong} of {matching} trajets not at their highest version \
             (expected {} trajets)",
            sizes.hot
        );
    }
    println!(
        "[7 two processes] {} trajet.upsert over 2 × serve: {:.0} msgs/s ({:.2}× one process); \
         all {matching} trajets at their highest version{}",
        sizes.two,
        two.per_second(),
        two.per_second() / gateway_rate,
        stale_note(&got)
    );

    Ok(format!(
        "ratio={:.2} gateway={gateway_rate:.0} relay={relay:.0} p99_ms={p99_half:.1} \
         rss_mb={rss_mb:.0}",
        gateway_rate / relay
    ))
}

/// Phases 4b and 5b: the database path alone ([`db_path::run`]), labelled `label`, over the first
/// few hundred hot insured, their messages numbered as phase `phase`'s.
async fn database_path(
    label: &str,
    phase: u8,
    world: &World,
    hot: &mut Hot,
    sizes: &Sizes,
) -> anyhow::Result<db_path::Fit> {
    let batch_size = gateway_batch_size()?;
    let insured = (2 * batch_size as u64).min(sizes.hot as u64);
    db_path::run(
        label,
        world,
        &world.users[1].0,
        (DB_PATH_SMALL_BATCH, batch_size),
        usize::try_from((sizes.one_to_one / 10).max(10_000)).unwrap_or(usize::MAX),
        |k| hot.upsert(phase, k % insured).body,
    )
    .await
}

/// How much more a message costs the gateway at `after` than at `before` (in %), each cost per
/// message taken as a multiple of the plain relay's measured next to it: the gateway's rate over
/// the relay's is the inverse of that multiple.
fn relative_to_relay(before: f64, relay_before: f64, after: f64, relay_after: f64) -> f64 {
    let multiple = |gateway: f64, relay: f64| relay / gateway.max(1e-9);
    change_percent(multiple(before, relay_before), multiple(after, relay_after))
}

/// How much `after` exceeds `before`, in per cent.
fn change_percent(before: f64, after: f64) -> f64 {
    (after / before - 1.0) * 100.0
}

/// The gateway's batch size (its default, or `TRIO_BATCH_SIZE` set for the bench). The plain
/// relay and the reference pipeline take batches of as many deliveries, so that `ratio` compares
/// pipelines that batch alike (the gateway cost about 10 % less per message with 200 than with
/// 100; the plain relay's ceiling moved less than the machine's drift).
fn gateway_batch_size() -> anyhow::Result<usize> {
    Ok(trio_gateway::config::Config::from_env()?.batch_size)
}

/// The relay ceiling as phase `phase`: the plain relay on [`Sizes::relay`] messages as fast as
/// the broker takes them; its msgs/s and CPU per message.
async fn relay_ceiling(
    url: &str,
    world: &World,
    phase: u8,
    sizes: &Sizes,
    what: &str,
) -> anyhow::Result<(f64, cpu::PerMessage)> {
    let run = relay_measured(url, world, (phase, sizes.relay, None, sizes.idle), what).await?;
    Ok((run.rate.per_second(), run.cpu))
}

/// One measured run of the plain relay.
struct RelayRun {
    /// From first publish to last arrival.
    rate: Rate,
    /// What arrived, with its latencies.
    got: Received,
    /// CPU per message meanwhile (the relays, publisher and sink count as the bench's).
    cpu: cpu::PerMessage,
    /// When the broker's log rolled over meanwhile (`None`: not readable here).
    rolled: Option<Vec<Instant>>,
}

/// [`relay_run`] with what it cost: its rate, CPU per message and the broker log's roll-overs;
/// fails, naming it `what`, when messages are missing.
async fn relay_measured(
    url: &str,
    world: &World,
    (phase, count, rate, idle): (u8, u64, Option<f64>, Duration),
    what: &str,
) -> anyhow::Result<RelayRun> {
    let cpu_before = cpu::snapshot(&[]);
    let (run, rolled) = broker_log::during(relay_run(url, world, phase, count, rate, idle)).await;
    let (first, got) = run?;
    let cpu = cpu::PerMessage::between(&cpu_before, &cpu::snapshot(&[]), count);
    let rate = span(world, phase, first, &got, count, what).await?;
    Ok(RelayRun {
        rate,
        got,
        cpu,
        rolled,
    })
}

/// Runs the plain relay (4 relays, batches of [`gateway_batch_size`]) on `count` 1 KiB messages
/// published at `rate` (as fast as possible when `None`), and returns the first publish and what
/// arrived.
async fn relay_run(
    url: &str,
    world: &World,
    phase: u8,
    count: u64,
    rate: Option<f64>,
    idle: Duration,
) -> anyhow::Result<(Instant, Received)> {
    relays_run(url, world, (phase, count, rate, idle), 4, None).await
}

/// [`relay_run`] with `workers` relays, each committing its batches to `store`
/// when given: issue 10's reference pipeline.
async fn relays_run(
    url: &str,
    world: &World,
    (phase, count, rate, idle): (u8, u64, Option<f64>, Duration),
    workers: usize,
    store: Option<&reference::Store>,
) -> anyhow::Result<(Instant, Received)> {
    let batch = gateway_batch_size()?;
    let tasks = amqp::spawn_relay(url, RELAY_IN, RELAY_OUT, workers, batch, store).await?;
    let publisher = Publisher::connect(url, &world.operator().1).await?;
    let mut sink = Sink::open(url, RELAY_OUT).await?;
    let body = vec![b'x'; 1024];
    let result = tokio::try_join!(
        publisher.publish(phase, count, rate, |k| Message {
            exchange: "",
            routing_key: RELAY_IN.into(),
            message_type: None,
            message_id: format!("r{phase}-{k}"),
            body: body.clone(),
        }),
        async {
            let mut got = Received::default();
            sink.collect(phase, &mut got, count, idle).await?;
            anyhow::Ok(got)
        }
    );
    for t in &tasks {
        t.abort();
    }
    result
}

/// A reference-data message from the operator.
fn reference(message_type: &'static str, k: u64, body: &serde_json::Value) -> Message {
    Message {
        exchange: trio_gateway::broker::INBOUND_EXCHANGE,
        routing_key: "reference".into(),
        message_type: Some(message_type),
        message_id: format!("ref-{k}"),
        body: body.to_string().into_bytes(),
    }
}

#[cfg(test)]
mod tests {
    use super::relative_to_relay;

    #[test]
    fn scale_against_the_relay_cancels_a_machine_slowed_alike() {
        // Both the gateway and the relay a quarter slower: the gateway's cost did not move.
        assert!(relative_to_relay(10_000.0, 12_000.0, 7_500.0, 9_000.0).abs() < 1e-9);
        // The gateway half as fast with the relay unchanged: twice the cost.
        assert!((relative_to_relay(10_000.0, 12_000.0, 5_000.0, 12_000.0) - 100.0).abs() < 1e-9);
        // The gateway unchanged while the relay got faster: the gateway's cost rose against it.
        assert!((relative_to_relay(10_000.0, 12_000.0, 10_000.0, 13_200.0) - 10.0).abs() < 1e-9);
    }
}
