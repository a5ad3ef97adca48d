//! Fault injection (CONTRACT.md §5): streams of 10 000 messages over 250 insured through real
//! `trio-gateway serve` processes, with a real fault mid-stream — kill -9, SIGTERM, a RabbitMQ
//! restart, PostgreSQL down for 10 s — and two processes on a shuffled stream. Each test prints its figures
//! and fails if anything was lost, doubled or dead-lettered, or if the final state differs from a
//! sequential run's.
//!
//! These tests stop the machine's RabbitMQ and PostgreSQL, so they run one at a time (and in
//! their own test binary, which cargo runs after the others, never beside them).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::task::JoinHandle;
use trio_tests::faults::{
    self, Collector, Figures, GatewayProcess, Plan, Progress, ServiceFault, StreamMessage,
};
use trio_tests::{Options, TestEnv};

/// One fault at a time: they stop services every test shares.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The shipped command line, built in this package.
const GATEWAY: &str = env!("CARGO_BIN_EXE_trio-test-gateway");

/// 250 insured × 4 trajets × 10 versions = 10 000 messages, published version by version.
const PLAN: Plan = Plan {
    insured: 250,
    trajets: 4,
    versions: 10,
    shuffle: false,
};

/// How long a stream may take to settle after its fault (claims of a killed process expire
/// after 30 s; a restarted broker or database needs a few seconds).
const SETTLE: Duration = Duration::from_secs(150);

/// One stream through `serve` processes: the environment (partners registered, the set-up
/// gateway stopped, so only the processes consume), the collector and the publisher.
struct Run {
    env: TestEnv,
    plan: Plan,
    messages: Arc<Vec<StreamMessage>>,
    collector: Collector,
    progress: Arc<Progress>,
    publisher: JoinHandle<anyhow::Result<()>>,
    gateways: Vec<GatewayProcess>,
}

impl Run {
    /// Sets up, starts one `serve` process per label and starts publishing (chunks of 250,
    /// paced so the stream lasts a few seconds).
    async fn start(plan: Plan, first_niss: u32, processes: &[&str]) -> Run {
        let mut env = TestEnv::start_with(Options {
            workers: 2,
            batch_size: 100,
            delivery_limit: 5,
        })
        .await;
        let niss = plan.niss(first_niss);
        faults::set_up_partners(&env, &niss)
            .await
            .expect("registering the partners");
        env.stop_gateway()
            .await
            .expect("stopping the set-up gateway");
        let messages = Arc::new(plan.messages(&niss));
        let collector = Collector::start(&env);
        let gateways = processes
            .iter()
            .map(|label| GatewayProcess::spawn(&env, Path::new(GATEWAY), label).unwrap())
            .collect();
        let progress = Arc::new(Progress::default());
        let user = format!("t-oa-{}", faults::OA);
        let url = env.amqp_url_as(&user);
        let publisher = tokio::spawn({
            let messages = messages.clone();
            let progress = progress.clone();
            async move {
                faults::publish(
                    &url,
                    &user,
                    &messages,
                    250,
                    Duration::from_millis(100),
                    &progress,
                    Duration::from_secs(120),
                )
                .await
            }
        });
        Run {
            env,
            plan,
            messages,
            collector,
            progress,
            publisher,
            gateways,
        }
    }

    /// Starts one more `serve` process.
    fn spawn(&mut self, label: &str) {
        let gateway = GatewayProcess::spawn(&self.env, Path::new(GATEWAY), label).unwrap();
        self.gateways.push(gateway);
    }

    /// Waits for the stream to settle, prints the figures, fails on anything lost, doubled or
    /// dead, then stops the processes with SIGTERM (each must exit 0) and cleans up.
    async fn finish(self, name: &str) -> Figures {
        self.publisher.await.unwrap().unwrap();
        let figures = faults::verify(
            &self.env,
            &self.plan,
            &self.messages,
            &self.progress,
            self.collector,
            SETTLE,
        )
        .await
        .unwrap();
        check(name, &figures, &self.gateways);
        for gateway in self.gateways {
            gateway.terminate().await.unwrap();
        }
        self.env.finish().await;
        figures
    }
}

/// Messages of the stream with an outcome in the inbox.
async fn processed(env: &TestEnv) -> usize {
    sqlx::query_scalar::<_, i64>("SELECT count(*) FROM inbox WHERE sender = $1")
        .bind(format!("t-oa-{}", faults::OA))
        .fetch_one(&env.db)
        .await
        .map_or(0, |n| usize::try_from(n).unwrap_or(0))
}

/// Waits until `share` of the stream has been processed.
async fn until_processed(env: &TestEnv, share: f64, total: usize) {
    let target = (total as f64 * share) as usize;
    for _ in 0..600 {
        if processed(env).await >= target {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the stream did not reach {target} processed messages");
}

/// Prints the figures and fails on anything lost, doubled or dead.
fn check(name: &str, figures: &Figures, logs: &[GatewayProcess]) {
    // Straight to stderr, past the test harness's capture: CI's log shows the figures.
    let _ = writeln!(std::io::stderr(), "fault injection, {name}: {figures}");
    let tails: Vec<String> = logs.iter().map(|g| g.log_tail()).collect();
    let context = format!(
        "{name}: {figures}\ngateway logs:\n{}",
        tails.join("\n---\n")
    );
    assert_eq!(figures.lost, 0, "lost: {context}");
    assert_eq!(figures.doubled, 0, "doubled: {context}");
    assert_eq!(figures.dead, 0, "dead-lettered: {context}");
    assert_eq!(
        figures.applied + figures.stale,
        figures.sent,
        "one outcome per message: {context}"
    );
    assert_eq!(
        figures.outbound_received, figures.applied,
        "one event per applied message: {context}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_then_restart_loses_nothing_and_doubles_nothing() {
    let _serial = SERIAL.lock().await;
    let mut run = Run::start(PLAN, 200_000, &["first"]).await;
    until_processed(&run.env, 0.3, run.messages.len()).await;
    run.gateways[0].kill().await.unwrap();
    let killed_at = processed(&run.env).await;
    let _ = writeln!(
        std::io::stderr(),
        "kill -9 with {killed_at} messages processed"
    );
    run.spawn("second");
    run.finish("kill -9 and restart").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_stream_then_restart_loses_nothing_and_doubles_nothing() {
    let _serial = SERIAL.lock().await;
    let mut run = Run::start(PLAN, 600_000, &["first"]).await;
    until_processed(&run.env, 0.3, run.messages.len()).await;
    // A deployment's stop: SIGTERM while batches are in flight and deliveries prefetched. The
    // process must finish its batches, hand their outbox to the relays, and exit 0; what it had
    // prefetched goes back to the queue for the next process.
    let first = run.gateways.remove(0);
    first.terminate().await.expect("a graceful stop exits 0");
    let stopped_at = processed(&run.env).await;
    let _ = writeln!(
        std::io::stderr(),
        "SIGTERM with {stopped_at} messages processed"
    );
    run.spawn("second");
    run.finish("SIGTERM and restart").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rabbitmq_restart_mid_stream_loses_nothing_and_doubles_nothing() {
    let _serial = SERIAL.lock().await;
    let run = Run::start(PLAN, 300_000, &["gateway"]).await;
    until_processed(&run.env, 0.2, run.messages.len()).await;
    let stopped = ServiceFault::stop_rabbitmq().expect("stopping RabbitMQ (rabbitmqctl stop_app)");
    let published_at = run.progress.confirmed.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(3)).await;
    stopped.start().expect("starting RabbitMQ again");
    let _ = writeln!(
        std::io::stderr(),
        "RabbitMQ stopped with {published_at} messages published"
    );
    let figures = run.finish("RabbitMQ restart").await;
    assert!(
        figures.resent > 0,
        "the restart interrupted the publisher: {figures}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_down_for_ten_seconds_mid_stream_is_waited_out() {
    let _serial = SERIAL.lock().await;
    let run = Run::start(PLAN, 400_000, &["gateway"]).await;
    until_processed(&run.env, 0.3, run.messages.len()).await;
    let stopped = ServiceFault::stop_postgresql().expect("stopping PostgreSQL");
    tokio::time::sleep(Duration::from_secs(10)).await;
    // While the database is down nothing is acknowledged and nothing is dead-lettered.
    let (dead, waiting) = queue_depths(&run.env).await;
    stopped.start().expect("starting PostgreSQL again");
    assert_eq!(dead, 0, "nothing is dead-lettered while PostgreSQL is down");
    assert!(
        waiting > 0,
        "messages wait in their queue while PostgreSQL is down"
    );
    let _ = writeln!(
        std::io::stderr(),
        "{waiting} messages waited in trio.inbound.oa during the outage"
    );
    run.finish("PostgreSQL down 10 s").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_on_a_shuffled_stream_end_every_trajet_at_its_highest_version() {
    let _serial = SERIAL.lock().await;
    let plan = Plan {
        shuffle: true,
        ..PLAN
    };
    let run = Run::start(plan, 500_000, &["one", "two"]).await;
    let figures = run.finish("two processes, shuffled").await;
    assert!(
        figures.stale > 0,
        "a shuffled stream has older versions arriving after newer ones: {figures}"
    );
}

/// Letters in `trio.dead`, and messages ready or unacknowledged in `trio.inbound.oa` (from the
/// management API, which sees unacknowledged ones too).
async fn queue_depths(env: &TestEnv) -> (u64, u64) {
    let admin = env.admin();
    let dead = admin.queue_messages(&env.name, "trio.dead").await.unwrap();
    let waiting = admin
        .queue_messages(&env.name, "trio.inbound.oa")
        .await
        .unwrap();
    (dead, waiting)
}
