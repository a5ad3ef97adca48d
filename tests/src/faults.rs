//! # Fault injection: a stream of messages, a real fault, and the figures that prove nothing was
//! lost or doubled
//!
//! A [`Plan`] is K insured × T trajets × V versions of `trajet.upsert` from one OA (JSON), with one
//! GP related to every insured: every applied message yields exactly one reply to the OA and exactly
//! one `trajet.updated` to the GP. What a sequential run gives is known without running it: every
//! trajet at version V with V's dates, one history row, one reply and one event per message.
//!
//! The partners are as stubborn as real ones must be:
//! - [`publish`] sends in chunks with publisher confirms and sends a whole chunk again when its
//!   confirms do not all come back (broker restart): the gateway's inbox absorbs the copies;
//! - [`Collector`] reads the GP's and the OA's *durable* queues with manual acks and reconnects:
//!   a message redelivered after a restart is counted as a redelivered copy (same `message_id`).
//!
//! [`verify`] waits for the stream to settle, compares the database and everything received with
//! the sequential expectation and returns the [`Figures`]; the test prints them and asserts.

use crate::TestEnv;
use anyhow::{Context as _, anyhow, bail};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::publisher_confirm::Confirmation;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use trio_gateway::process::ChildProcess;

/// The OA that sends the stream.
pub const OA: &str = "300";
/// The GP related to every insured of the stream.
pub const GP: &str = "12345678901";
/// The GP's durable outbound queue (bound to `trio.outbound` with `gp.<GP>`).
pub const GP_QUEUE: &str = "faults.gp";
/// The OA's durable reply queue (its `reply_to`).
pub const REPLY_QUEUE: &str = "faults.replies";

/// The shape of a stream.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Insured persons (each gets a dossier).
    pub insured: u32,
    /// Trajets per insured.
    pub trajets: u32,
    /// Versions per trajet (1..=versions).
    pub versions: u32,
    /// Publish in a shuffled order (versions of one trajet out of order) instead of version by
    /// version.
    pub shuffle: bool,
}

/// One message of the stream.
#[derive(Debug, Clone)]
pub struct StreamMessage {
    /// AMQP `message_id`.
    pub message_id: String,
    /// The trajet's reference (unique over the stream).
    pub reference: String,
    /// Its version.
    pub version: i64,
    /// JSON body.
    pub body: Vec<u8>,
}

impl Plan {
    /// Messages in the stream.
    pub fn total(&self) -> usize {
        (self.insured * self.trajets * self.versions) as usize
    }

    /// The insured's NISS, `first_seq`.. in [`synthetic_niss`](crate::synthetic_niss) order.
    pub fn niss(&self, first_seq: u32) -> Vec<String> {
        (0..self.insured)
            .map(|i| crate::synthetic_niss(first_seq + i))
            .collect()
    }

    /// The stream, in publishing order: version 1 of every trajet, then version 2, … — or, with
    /// `shuffle`, a deterministic permutation of that.
    pub fn messages(&self, niss: &[String]) -> Vec<StreamMessage> {
        let mut out = Vec::with_capacity(self.total());
        for version in 1..=i64::from(self.versions) {
            for (i, n) in niss.iter().enumerate() {
                for t in 0..self.trajets {
                    let reference = format!("i{i}-t{t}");
                    let body = json!({"niss": n, "trajet": {
                        "ref": reference, "type": "rtw_ami", "status": "en_cours",
                        "version": version, "start_on": start_on(version),
                        "request_received_on": "2025-12-15"}});
                    out.push(StreamMessage {
                        message_id: format!("{reference}-v{version}"),
                        reference,
                        version,
                        body: body.to_string().into_bytes(),
                    });
                }
            }
        }
        if self.shuffle {
            // Fisher–Yates with a fixed xorshift: the same permutation on every run.
            let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
            for i in (1..out.len()).rev() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let j = (state % (i as u64 + 1)) as usize;
                out.swap(i, j);
            }
        }
        out
    }
}

/// The `start_on` date written by `version`: the final state shows which version won.
pub fn start_on(version: i64) -> String {
    let base =
        time::Date::from_calendar_date(2026, time::Month::January, 1).unwrap_or(time::Date::MIN);
    (base + time::Duration::days(version)).to_string()
}

/// Registers the OA and the GP, relates every insured of `niss` to both, and declares the
/// partners' durable queues. Needs a running gateway (the test's in-process one will do).
///
/// # Errors
/// When a registration is refused or the broker fails.
pub async fn set_up_partners(env: &TestEnv, niss: &[String]) -> anyhow::Result<()> {
    let mut operator = env.operator().await;
    let _oa = env.organisation(&mut operator, "oa", OA, "json").await;
    let _gp = env.organisation(&mut operator, "gp", GP, "json").await;

    let connection = connect(&env.amqp_url_as("guest")).await?;
    let channel = connection.create_channel().await?;
    let mut quorum = FieldTable::default();
    quorum.insert(
        ShortString::from("x-queue-type"),
        AMQPValue::LongString("quorum".into()),
    );
    for queue in [GP_QUEUE, REPLY_QUEUE] {
        channel
            .queue_declare(
                queue,
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                quorum.clone(),
            )
            .await?;
    }
    channel
        .queue_bind(
            GP_QUEUE,
            trio_gateway::broker::OUTBOUND_EXCHANGE,
            &format!("gp.{GP}"),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    connection.close(200, "set up").await?;

    let relations: Vec<Value> = niss
        .iter()
        .flat_map(|n| {
            [
                json!({"relation": {"kind": "insured_oa", "niss": n, "oa": OA}}),
                json!({"relation": {"kind": "insured_gp", "niss": n, "gp": GP}}),
            ]
        })
        .collect();
    let ids: Vec<String> = (0..relations.len()).map(|i| format!("rel-{i}")).collect();
    for (ids, bodies) in ids.chunks(500).zip(relations.chunks(500)) {
        let messages: Vec<_> = ids
            .iter()
            .zip(bodies)
            .map(|(id, body)| {
                trio_gateway::partner::Outgoing::json("reference", "relation.set", id, body)
            })
            .collect();
        operator.publish_many(&messages).await?;
        for _ in 0..messages.len() {
            let reply = operator
                .next_reply(crate::WAIT)
                .await?
                .ok_or_else(|| anyhow!("a relation.set got no reply"))?;
            if reply.body["status"] != "accepted" {
                bail!("relation.set refused: {}", reply.body);
            }
        }
    }
    Ok(())
}

async fn connect(url: &str) -> anyhow::Result<Connection> {
    Connection::connect(url, ConnectionProperties::default())
        .await
        .context("connecting to RabbitMQ")
}

/// How far the publisher got.
#[derive(Debug, Default)]
pub struct Progress {
    /// Messages confirmed by the broker.
    pub confirmed: AtomicUsize,
    /// Messages sent again because their chunk was not wholly confirmed.
    pub resent: AtomicUsize,
}

/// Publishes `messages` as the OA (`user_id` = `oa_user`, `reply_to` = [`REPLY_QUEUE`]) in chunks,
/// pausing `pause` between chunks; a chunk whose confirms do not all come back is sent again on
/// a new connection, until `give_up` has passed.
///
/// # Errors
/// When the broker stays unreachable for `give_up`.
pub async fn publish(
    url: &str,
    oa_user: &str,
    messages: &[StreamMessage],
    chunk: usize,
    pause: Duration,
    progress: &Progress,
    give_up: Duration,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + give_up;
    let mut session: Option<(Connection, lapin::Channel)> = None;
    for part in messages.chunks(chunk) {
        let mut attempt = 0;
        loop {
            attempt += 1;
            if attempt > 1 {
                progress.resent.fetch_add(part.len(), Ordering::Relaxed);
            }
            match publish_chunk(&mut session, url, oa_user, part).await {
                Ok(()) => break,
                Err(e) => {
                    session = None;
                    if tokio::time::Instant::now() > deadline {
                        return Err(e.context("publishing the stream"));
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        progress.confirmed.fetch_add(part.len(), Ordering::Relaxed);
        tokio::time::sleep(pause).await;
    }
    if let Some((connection, _)) = session {
        let _ = connection.close(200, "stream sent").await;
    }
    Ok(())
}

async fn publish_chunk(
    session: &mut Option<(Connection, lapin::Channel)>,
    url: &str,
    oa_user: &str,
    part: &[StreamMessage],
) -> anyhow::Result<()> {
    if session.is_none() {
        let connection = connect(url).await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        *session = Some((connection, channel));
    }
    let Some((_, channel)) = session.as_ref() else {
        bail!("no channel");
    };
    let mut confirms = Vec::with_capacity(part.len());
    for m in part {
        let properties = BasicProperties::default()
            .with_message_id(m.message_id.as_str().into())
            .with_type("trajet.upsert".into())
            .with_content_type("application/json".into())
            .with_user_id(oa_user.into())
            .with_reply_to(REPLY_QUEUE.into())
            .with_delivery_mode(2);
        confirms.push(
            channel
                .basic_publish(
                    trio_gateway::broker::INBOUND_EXCHANGE,
                    "oa",
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &m.body,
                    properties,
                )
                .await?,
        );
    }
    for confirm in confirms {
        match tokio::time::timeout(Duration::from_secs(10), confirm).await?? {
            Confirmation::Ack(None) => {}
            other => bail!("not confirmed: {other:?}"),
        }
    }
    Ok(())
}

/// Everything the partners received.
#[derive(Debug, Default)]
pub struct Received {
    /// Replies by `correlation_id`: `(reply message_id, status)` for each delivery.
    pub replies: HashMap<String, Vec<(String, String)>>,
    /// `trajet.updated` events by `(ref, version)`: the `message_id` of each delivery.
    pub events: HashMap<(String, i64), Vec<String>>,
}

impl Received {
    /// Messages that have their first outcome (`accepted` or `stale`).
    pub fn answered(&self) -> usize {
        self.replies
            .values()
            .filter(|r| r.iter().any(|(_, s)| s != "duplicate"))
            .count()
    }

    /// Distinct events received.
    pub fn distinct_events(&self) -> usize {
        self.events
            .values()
            .map(|ids| ids.iter().collect::<HashSet<_>>().len())
            .sum()
    }
}

/// Reads [`GP_QUEUE`] and [`REPLY_QUEUE`] until stopped, reconnecting whenever the broker goes.
pub struct Collector {
    received: Arc<Mutex<Received>>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Collector {
    /// Starts reading as `guest` on the test's vhost.
    pub fn start(env: &TestEnv) -> Collector {
        let received = Arc::new(Mutex::new(Received::default()));
        let stop = CancellationToken::new();
        let url = env.amqp_url_as("guest");
        let task = tokio::spawn({
            let received = received.clone();
            let stop = stop.clone();
            async move {
                while !stop.is_cancelled() {
                    if let Err(e) = collect(&url, &received, &stop).await {
                        tracing::debug!(error = %format!("{e:#}"), "collector reconnecting");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        });
        Collector {
            received,
            stop,
            task,
        }
    }

    /// Reads the counts so far.
    pub fn peek<T>(&self, f: impl FnOnce(&Received) -> T) -> T {
        match self.received.lock() {
            Ok(r) => f(&r),
            Err(poisoned) => f(&poisoned.into_inner()),
        }
    }

    /// Stops reading and returns what was received.
    pub async fn stop(self) -> Received {
        self.stop.cancel();
        let _ = self.task.await;
        match Arc::try_unwrap(self.received) {
            Ok(m) => m.into_inner().unwrap_or_else(|p| p.into_inner()),
            Err(shared) => std::mem::take(&mut *shared.lock().unwrap_or_else(|p| p.into_inner())),
        }
    }
}

async fn collect(
    url: &str,
    received: &Mutex<Received>,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let connection = connect(url).await?;
    let channel = connection.create_channel().await?;
    channel.basic_qos(1000, BasicQosOptions::default()).await?;
    let mut consumers = Vec::new();
    for queue in [GP_QUEUE, REPLY_QUEUE] {
        let consumer = channel
            .basic_consume(
                queue,
                &format!("collector-{queue}"),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        consumers.push(consumer);
    }
    let mut deliveries = futures::stream::select_all(consumers);
    loop {
        let delivery = tokio::select! {
            _ = stop.cancelled() => {
                let _ = connection.close(200, "collected").await;
                return Ok(());
            }
            next = deliveries.next() => match next {
                Some(d) => d?,
                None => bail!("consumers cancelled"),
            },
        };
        let message_id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        let body: Value = serde_json::from_slice(&delivery.data).unwrap_or(Value::Null);
        {
            let mut r = received.lock().unwrap_or_else(|p| p.into_inner());
            if delivery.routing_key.as_str() == REPLY_QUEUE {
                let correlation = delivery
                    .properties
                    .correlation_id()
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default();
                let status = body["status"].as_str().unwrap_or("?").to_owned();
                r.replies
                    .entry(correlation)
                    .or_default()
                    .push((message_id, status));
            } else {
                let reference = body["trajet"]["ref"].as_str().unwrap_or("?").to_owned();
                let version = body["trajet"]["version"].as_i64().unwrap_or(-1);
                r.events
                    .entry((reference, version))
                    .or_default()
                    .push(message_id);
            }
        }
        delivery.acker.ack(BasicAckOptions::default()).await?;
    }
}

/// What a fault-injection run shows.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Figures {
    /// Distinct messages in the stream.
    pub sent: usize,
    /// Messages the publisher sent again because their chunk's confirms did not all come back
    /// (each attempt counts, including those the broker never received).
    pub resent: usize,
    /// Messages applied (`accepted`).
    pub applied: usize,
    /// Messages answered `stale` (an older version processed after a newer one).
    pub stale: usize,
    /// Copies answered `duplicate` by the inbox (redeliveries and re-sends).
    pub duplicates_absorbed: usize,
    /// Distinct outbound `trajet.updated` received.
    pub outbound_received: usize,
    /// Extra deliveries of an outbound message already received (same `message_id`).
    pub outbound_redelivered: usize,
    /// Messages with no outcome, applied messages without their event, or trajets not in their
    /// sequential final state.
    pub lost: usize,
    /// Effects that happened twice: more history rows than applied messages, two distinct events
    /// or two outcomes for one message, an event for a stale message.
    pub doubled: usize,
    /// Letters in `trio.dead`.
    pub dead: usize,
}

impl fmt::Display for Figures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sent={} resent={} applied={} stale={} duplicates_absorbed={} outbound_received={} \
             outbound_redelivered={} lost={} doubled={} dead={}",
            self.sent,
            self.resent,
            self.applied,
            self.stale,
            self.duplicates_absorbed,
            self.outbound_received,
            self.outbound_redelivered,
            self.lost,
            self.doubled,
            self.dead
        )
    }
}

/// Waits until every message has its outcome, the outbox is empty and every applied message's
/// event has arrived (or `give_up` passes), then compares everything with the sequential run.
///
/// # Errors
/// When the database or the broker cannot be read at the end.
pub async fn verify(
    env: &TestEnv,
    plan: &Plan,
    messages: &[StreamMessage],
    progress: &Progress,
    collector: Collector,
    give_up: Duration,
) -> anyhow::Result<Figures> {
    let deadline = tokio::time::Instant::now() + give_up;
    let total = messages.len();
    while collector.peek(Received::answered) < total && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let oa_user = format!("t-oa-{OA}");
    let (applied, stale) = loop {
        let outbox: Option<i64> = sqlx::query_scalar("SELECT count(*) FROM outbox")
            .fetch_one(&env.db)
            .await
            .ok();
        let applied = collector.peek(|r| {
            r.replies
                .values()
                .filter(|v| v.iter().any(|(_, s)| s == "accepted"))
                .count()
        });
        if (outbox == Some(0) && collector.peek(Received::distinct_events) >= applied)
            || tokio::time::Instant::now() >= deadline
        {
            let counts: Vec<(String, i64)> = sqlx::query_as(
                "SELECT status, count(*) FROM inbox WHERE sender = $1 AND type = 'trajet.upsert' \
                 GROUP BY status",
            )
            .bind(&oa_user)
            .fetch_all(&env.db)
            .await?;
            let of = |s: &str| {
                counts
                    .iter()
                    .find(|(status, _)| status == s)
                    .map_or(0, |(_, n)| usize::try_from(*n).unwrap_or(0))
            };
            break (of("accepted"), of("stale"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // a last moment for stray redeliveries, so they are counted rather than missed
    tokio::time::sleep(Duration::from_millis(500)).await;
    let received = collector.stop().await;

    let mut figures = Figures {
        sent: total,
        resent: progress.resent.load(Ordering::Relaxed),
        applied,
        stale,
        ..Figures::default()
    };
    // outcomes: exactly one first outcome per message, agreeing with the inbox
    let mut answered_stale = HashSet::new();
    let mut answered_accepted = HashSet::new();
    for m in messages {
        let replies = received
            .replies
            .get(&m.message_id)
            .map_or(&[][..], Vec::as_slice);
        let firsts: HashSet<&String> = replies
            .iter()
            .filter(|(_, s)| s != "duplicate")
            .map(|(id, _)| id)
            .collect();
        let statuses: HashSet<&str> = replies
            .iter()
            .filter(|(_, s)| s != "duplicate")
            .map(|(_, s)| s.as_str())
            .collect();
        match firsts.len() {
            0 => figures.lost += 1,
            1 => {}
            n => figures.doubled += n - 1,
        }
        if statuses.contains("stale") {
            answered_stale.insert((m.reference.clone(), m.version));
        }
        if statuses.contains("accepted") {
            answered_accepted.insert((m.reference.clone(), m.version));
        }
        // each reply message id counted once; its further deliveries are redeliveries
        let distinct_duplicates: HashSet<&String> = replies
            .iter()
            .filter(|(_, s)| s == "duplicate")
            .map(|(id, _)| id)
            .collect();
        figures.duplicates_absorbed += distinct_duplicates.len();
    }
    // events: one per applied message, none for a stale one
    for (key, ids) in &received.events {
        let distinct: HashSet<&String> = ids.iter().collect();
        figures.outbound_received += distinct.len();
        figures.outbound_redelivered += ids.len() - distinct.len();
        figures.doubled += distinct.len() - 1;
        if answered_stale.contains(key) {
            figures.doubled += 1;
        }
    }
    figures.lost += answered_accepted
        .iter()
        .filter(|key| !received.events.contains_key(*key))
        .count();
    // history: one row per applied message
    let history: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM history WHERE operation IN ('trajet_created', 'trajet_updated')",
    )
    .fetch_one(&env.db)
    .await?;
    let history = usize::try_from(history).unwrap_or(0);
    figures.doubled += history.saturating_sub(applied);
    figures.lost += applied.saturating_sub(history);
    // final state: every trajet at its highest version, with that version's dates
    let trajets: Vec<(String, i64, Option<time::Date>)> =
        sqlx::query_as("SELECT ref, version, start_on FROM trajet")
            .fetch_all(&env.db)
            .await?;
    let expected_version = i64::from(plan.versions);
    let final_ok = trajets
        .iter()
        .filter(|(_, v, start)| {
            *v == expected_version && start.map(|d| d.to_string()) == Some(start_on(*v))
        })
        .count();
    figures.lost += (plan.insured * plan.trajets) as usize
        - final_ok.min((plan.insured * plan.trajets) as usize);
    figures.dead = dead_letters(env).await?;
    Ok(figures)
}

async fn dead_letters(env: &TestEnv) -> anyhow::Result<usize> {
    let connection = connect(&env.amqp_url_as("guest")).await?;
    let channel = connection.create_channel().await?;
    let queue = channel
        .queue_declare(
            trio_gateway::broker::DEAD_LETTER_QUEUE,
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let _ = connection.close(200, "counted").await;
    Ok(queue.message_count() as usize)
}

/// A `trio-gateway serve` running as its own process (default settings) on the test's vhost
/// and database; its log goes to a file.
pub struct GatewayProcess {
    process: ChildProcess,
    killed: bool,
}

impl GatewayProcess {
    /// Starts `exe serve` (`exe` runs [`trio_gateway::cli`]) with the test's URLs and domain file.
    ///
    /// # Errors
    /// When the process cannot be started.
    pub fn spawn(env: &TestEnv, exe: &Path, label: &str) -> anyhow::Result<GatewayProcess> {
        let dir = std::env::temp_dir().join(&env.name);
        std::fs::create_dir_all(&dir)?;
        let domain_file = dir.join("domain.json");
        if !domain_file.exists() {
            std::fs::write(&domain_file, &env.domain_json)?;
        }
        let mut command = tokio::process::Command::new(exe);
        command
            .arg("serve")
            .env("TRIO_AMQP_URL", env.config.amqp_url.expose())
            .env("TRIO_DATABASE_URL", env.config.database_url.expose())
            .env("TRIO_PSEUDO_DOMAIN_FILE", &domain_file)
            .env("TRIO_OPERATOR_USERS", "guest")
            .env(
                "RUST_LOG",
                "warn,lapin=error,trio_gateway::serve=info,trio_gateway::relay=error,trio_gateway::worker=error",
            );
        let process = ChildProcess::spawn(command, &dir.join(format!("{label}.log")))
            .with_context(|| format!("starting {}", exe.display()))?;
        Ok(GatewayProcess {
            process,
            killed: false,
        })
    }

    /// SIGKILL, and waits for it to be gone.
    ///
    /// # Errors
    /// When it cannot be signalled.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.process.kill().await?;
        self.killed = true;
        Ok(())
    }

    /// SIGTERM, and waits for a clean exit (nothing to do for a process [`kill`](Self::kill)ed).
    ///
    /// # Errors
    /// When it does not exit 0 within a minute of SIGTERM (or had already failed).
    pub async fn terminate(self) -> anyhow::Result<()> {
        if self.killed {
            return Ok(());
        }
        let log = self.process.log.clone();
        let exit = self.process.terminate(Duration::from_secs(60)).await?;
        if !exit.success() {
            bail!(
                "the gateway exited with {exit}; log:\n{}",
                trio_gateway::process::tail(&log)
            );
        }
        Ok(())
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }

    /// Where its log (stderr) is written; the file stays after the process ends.
    pub fn log_path(&self) -> &Path {
        &self.process.log
    }
}

/// A local service the test stops and starts again; started again on drop (even on panic), so
/// a failing test does not leave the machine without it.
pub struct ServiceFault {
    start: Vec<String>,
    started: bool,
}

impl ServiceFault {
    /// Stops RabbitMQ's application (`rabbitmqctl stop_app`: every connection drops, the node
    /// stays).
    ///
    /// # Errors
    /// When `rabbitmqctl` fails (e.g. the broker is not local).
    pub fn stop_rabbitmq() -> anyhow::Result<ServiceFault> {
        run(&["rabbitmqctl", "stop_app"])?;
        Ok(ServiceFault {
            start: vec!["rabbitmqctl".into(), "start_app".into()],
            started: false,
        })
    }

    /// Stops the local PostgreSQL cluster (`pg_ctlcluster … stop -m fast`).
    ///
    /// # Errors
    /// When there is no local cluster or it does not stop.
    pub fn stop_postgresql() -> anyhow::Result<ServiceFault> {
        let version = std::fs::read_dir("/etc/postgresql")
            .context("no local PostgreSQL cluster (/etc/postgresql)")?
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .next()
            .ok_or_else(|| anyhow!("no PostgreSQL version under /etc/postgresql"))?;
        let ctl = |action: &str| -> Vec<String> {
            let mut args = vec![
                "pg_ctlcluster".to_owned(),
                "--skip-systemctl-redirect".to_owned(),
                version.clone(),
                "main".to_owned(),
                action.to_owned(),
            ];
            if action == "stop" {
                args.extend(["-m".to_owned(), "fast".to_owned()]);
            }
            args
        };
        let stop = ctl("stop");
        run(&stop.iter().map(String::as_str).collect::<Vec<_>>())?;
        Ok(ServiceFault {
            start: ctl("start"),
            started: false,
        })
    }

    /// Starts the service again.
    ///
    /// # Errors
    /// When it does not start.
    pub fn start(mut self) -> anyhow::Result<()> {
        self.started = true;
        run(&self.start.iter().map(String::as_str).collect::<Vec<_>>())
    }
}

impl Drop for ServiceFault {
    fn drop(&mut self) {
        if !self.started {
            let _ = run(&self.start.iter().map(String::as_str).collect::<Vec<_>>());
        }
    }
}

fn run(command: &[&str]) -> anyhow::Result<()> {
    let (program, args) = command
        .split_first()
        .ok_or_else(|| anyhow!("empty command"))?;
    let output = std::process::Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {}", command.join(" ")))?;
    if !output.status.success() {
        bail!(
            "{} failed: {}",
            command.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}
