//! # Integration-test harness
//!
//! Every test gets its own RabbitMQ virtual host and its own PostgreSQL database, and a gateway
//! running in-process against them, so tests run in parallel without seeing each other.
//!
//! Services: `TRIO_TEST_AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`),
//! `TRIO_TEST_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`, used to
//! create the per-test databases) and `TRIO_AMQP_ADMIN_URL` (default
//! `http://guest:guest@127.0.0.1:15672`, the management API). When they are not reachable and a
//! Docker engine answers, RabbitMQ and PostgreSQL are started with testcontainers; with neither,
//! the test fails with a message saying so — it never passes silently.

pub mod faults;
pub mod services;

use anyhow::{Context as _, anyhow};
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use trio_gateway::Config;
use trio_gateway::admin::{self, BrokerAdmin};
use trio_gateway::config::SecretUrl;
use trio_gateway::partner::{Outgoing, Partner, Reply};
use trio_pseudo::{CacheConfig, LocalPseudonymiser, PseudoDomain, Pseudonymiser};

pub use trio_gateway::partner::synthetic_niss;

/// The broker user the tests' gateways run as.
pub const GATEWAY_USER: &str = "trio-test-gateway";

/// How long a test waits for a reply or an outbound message.
pub const WAIT: Duration = Duration::from_secs(20);

/// Every log line the gateway wrote in this test process (to check that no NISS leaks).
pub fn captured_logs() -> String {
    let buffer = LOGS.get_or_init(|| Arc::new(Mutex::new(Vec::new())));
    let bytes = buffer.lock().map(|b| b.clone()).unwrap_or_default();
    String::from_utf8_lossy(&bytes).into_owned()
}

static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

#[derive(Clone)]
struct CaptureWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for CaptureWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut b) = self.0.lock() {
            b.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn init_capture() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let buffer = LOGS
            .get_or_init(|| Arc::new(Mutex::new(Vec::new())))
            .clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                std::env::var("RUST_LOG").unwrap_or_else(|_| {
                    "debug,sqlx=warn,lapin=error,lapin::returned_messages=off".into()
                }),
            ))
            .with_ansi(false)
            .with_writer(move || CaptureWriter(buffer.clone()))
            .try_init();
    });
}

/// Knobs a test may turn before the gateway starts.
#[derive(Debug, Clone)]
pub struct Options {
    /// Workers (batches in flight).
    pub workers: usize,
    /// Messages per batch.
    pub batch_size: usize,
    /// Delivery limit.
    pub delivery_limit: u32,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            workers: 2,
            batch_size: 50,
            delivery_limit: 3,
        }
    }
}

/// One test's world: a vhost, a database, a gateway.
pub struct TestEnv {
    /// Unique name of this test's vhost and database.
    pub name: String,
    /// The test's database.
    pub db: PgPool,
    /// Gateway configuration (points at the test's vhost and database).
    pub config: Config,
    /// The pseudonymiser the gateway uses (same domain key).
    pub pseudonymiser: Arc<dyn Pseudonymiser>,
    /// The same domain as a `TRIO_PSEUDO_DOMAIN_FILE` (for gateway processes).
    pub domain_json: String,
    admin: BrokerAdmin,
    amqp_base: String,
    db_admin_url: String,
    gateway: Option<(CancellationToken, JoinHandle<anyhow::Result<()>>)>,
    /// Set once the vhost and database are removed ([`TestEnv::finish`]); until then dropping
    /// the environment (a test that panicked) removes them.
    removed: bool,
}

impl TestEnv {
    /// A fresh vhost and database, and a running gateway.
    ///
    /// # Panics
    /// When the services are unreachable (with a message saying which and how to start them).
    pub async fn start() -> TestEnv {
        Self::start_with(Options::default()).await
    }

    /// Same, with options.
    ///
    /// # Panics
    /// When the services are unreachable.
    pub async fn start_with(options: Options) -> TestEnv {
        let mut env = Self::prepare(options)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        env.start_gateway();
        // Returned only once the gateway declared its topology (`trio.outbound`, which the
        // probe binds to, comes last): a test that fails at once and drops the environment must
        // not delete the vhost while a quorum queue is being declared. RabbitMQ 3.10 then loses
        // its quorum queues' dead-letter supervisor (`rabbit_fifo_dlx_sup`, past its restart
        // intensity) and refuses every publish to a new quorum queue until it restarts.
        drop(env.operator().await);
        env
    }

    /// A fresh vhost and database, without a gateway yet.
    ///
    /// # Errors
    /// When the services are unreachable.
    pub async fn prepare(options: Options) -> anyhow::Result<TestEnv> {
        init_capture();
        let services = services::get().await?;
        let name = format!("trio-test-{}", uuid::Uuid::new_v4().simple());
        let admin = BrokerAdmin::new(&services.admin_url)?;
        admin.create_vhost(&name).await?;
        admin.grant(&name, "guest").await?;
        // The gateway runs as its own user with the `impersonator` tag: dead letters keep the
        // sender's `user_id`, which RabbitMQ lets only impersonators publish.
        admin
            .ensure_user(GATEWAY_USER, GATEWAY_USER, "impersonator")
            .await?;
        admin.grant(&name, GATEWAY_USER).await?;
        let db_name = name.replace('-', "_");
        let admin_db = PgPoolOptions::new()
            .max_connections(1)
            .connect(&services.database_url)
            .await
            .context("connecting to PostgreSQL")?;
        sqlx::query(&format!("CREATE DATABASE {db_name}"))
            .execute(&admin_db)
            .await?;
        admin_db.close().await;
        let db_url = trio_gateway::config::database_url_for(&services.database_url, &db_name);
        let amqp_url = admin::amqp_url_for(&services.amqp_url, GATEWAY_USER, GATEWAY_USER, &name);
        let config = Config {
            amqp_url: SecretUrl::new(amqp_url),
            database_url: SecretUrl::new(db_url.clone()),
            workers: options.workers,
            relays: options.workers,
            batch_size: options.batch_size,
            prefetch: u16::try_from(options.batch_size * 2).unwrap_or(200),
            delivery_limit: options.delivery_limit,
            db_pool_size: 8,
            broker_timeout: Duration::from_secs(10),
            ..Config::default()
        };
        let db = trio_gateway::serve::connect_db(&config, Some(Duration::from_secs(10))).await?;
        trio_gateway::serve::migrate(&db).await?;
        let domain = PseudoDomain::generate("trio-test", "urn:be:trio:gateway:pseudo:test");
        Ok(TestEnv {
            name,
            db,
            config,
            domain_json: domain.to_json(),
            pseudonymiser: Arc::new(LocalPseudonymiser::new(domain, CacheConfig::default())),
            admin,
            amqp_base: services.amqp_url.clone(),
            db_admin_url: services.database_url.clone(),
            gateway: None,
            removed: false,
        })
    }

    /// Starts the in-process gateway.
    pub fn start_gateway(&mut self) {
        let stop = CancellationToken::new();
        let handle = tokio::spawn(trio_gateway::serve(
            self.config.clone(),
            self.pseudonymiser.clone(),
            {
                let stop = stop.clone();
                async move { stop.cancelled().await }
            },
        ));
        self.gateway = Some((stop, handle));
    }

    /// Stops the in-process gateway gracefully and waits for it.
    ///
    /// # Errors
    /// When it ended with an error.
    pub async fn stop_gateway(&mut self) -> anyhow::Result<()> {
        if let Some((stop, handle)) = self.gateway.take() {
            stop.cancel();
            handle.await.context("gateway task")??;
        }
        Ok(())
    }

    /// The management API client.
    pub fn admin(&self) -> &BrokerAdmin {
        &self.admin
    }

    /// An AMQP URL on this test's vhost for `user` (password = user name).
    pub fn amqp_url_as(&self, user: &str) -> String {
        admin::amqp_url_for(&self.amqp_base, user, user, &self.name)
    }

    /// The operator (`guest`), connected once the gateway declared the topology.
    ///
    /// # Panics
    /// When the broker is unreachable.
    pub async fn operator(&self) -> Partner {
        self.connect_as("guest", "guest").await
    }

    async fn connect_as(&self, user: &str, password: &str) -> Partner {
        let url = admin::amqp_url_for(&self.amqp_base, user, password, &self.name);
        for _ in 0..100 {
            if let Ok(p) = Partner::connect(&url).await {
                // the topology exists once a binding to trio.outbound succeeds
                if p.listen("probe.none").await.is_ok() {
                    return p;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("could not connect as {user} to vhost {}", self.name);
    }

    /// A broker user for an organisation (created and granted on this vhost, not registered).
    ///
    /// # Panics
    /// When the management API refuses.
    pub async fn broker_user(&self, user: &str) -> Partner {
        self.admin
            .ensure_user(user, user, "")
            .await
            .expect("creating a broker user");
        self.admin.grant(&self.name, user).await.expect("granting");
        self.connect_as(user, user).await
    }

    /// Registers an organisation through `organisation.upsert` and returns its partner
    /// connection. Broker user = `t-<kind>-<id>`.
    ///
    /// # Panics
    /// When the registration is not accepted.
    pub async fn organisation(
        &self,
        operator: &mut Partner,
        kind: &str,
        id: &str,
        format: &str,
    ) -> Partner {
        let user = format!("t-{kind}-{id}");
        let partner = self.broker_user(&user).await;
        let reply = request(
            operator,
            "reference",
            "organisation.upsert",
            &json!({"id": id, "kind": kind, "name": format!("{kind} {id}"), "broker_user": user, "format": format}),
        )
        .await;
        assert_eq!(reply.body["status"], "accepted", "{}", reply.body);
        partner
    }

    /// Sends `relation.set` as the operator and asserts it was accepted.
    ///
    /// # Panics
    /// When it is not accepted.
    pub async fn relate(&self, operator: &mut Partner, relation: Value) {
        let reply = request(
            operator,
            "reference",
            "relation.set",
            &json!({ "relation": relation }),
        )
        .await;
        assert_eq!(reply.body["status"], "accepted", "{}", reply.body);
    }

    /// Every row of every table as JSON text, for leak checks.
    ///
    /// # Panics
    /// When the database query fails.
    pub async fn dump_database(&self) -> String {
        let tables: Vec<String> = sqlx::query_scalar(
            "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public'",
        )
        .fetch_all(&self.db)
        .await
        .expect("listing tables");
        let mut out = String::new();
        for t in tables {
            let rows: Vec<String> =
                sqlx::query_scalar(&format!("SELECT row_to_json(t)::text FROM \"{t}\" t"))
                    .fetch_all(&self.db)
                    .await
                    .expect("dumping a table");
            for r in rows {
                out.push_str(&r);
                out.push('\n');
            }
        }
        out
    }

    /// Stops the gateway and removes the vhost and the database.
    pub async fn finish(mut self) {
        let _ = self.stop_gateway().await;
        self.db.close().await;
        remove_vhost_and_database(&self.admin, &self.name, &self.db_admin_url).await;
        self.removed = true;
    }
}

/// A test that failed before [`TestEnv::finish`] still leaves nothing on the machine's services.
/// The cleanup runs on a thread and runtime of its own: the test's runtime may be unwinding.
impl Drop for TestEnv {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        let (admin, name, db_admin_url) = (
            self.admin.clone(),
            self.name.clone(),
            self.db_admin_url.clone(),
        );
        let cleanup = std::thread::spawn(move || {
            if let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                runtime.block_on(remove_vhost_and_database(&admin, &name, &db_admin_url));
            }
        });
        let _ = cleanup.join();
    }
}

/// Deletes the test's vhost (closing its connections) and drops its database (`WITH (FORCE)`:
/// whatever still holds a connection to it). Errors are ignored: cleanup is best effort.
async fn remove_vhost_and_database(admin: &BrokerAdmin, name: &str, db_admin_url: &str) {
    let _ = admin.delete_vhost(name).await;
    if let Ok(admin_db) = PgPoolOptions::new()
        .max_connections(1)
        .connect(db_admin_url)
        .await
    {
        let _ = sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            name.replace('-', "_")
        ))
        .execute(&admin_db)
        .await;
        admin_db.close().await;
    }
}

/// Publishes one JSON message with a fresh `message_id` and returns its reply.
///
/// # Panics
/// When no reply comes within [`WAIT`].
pub async fn request(
    partner: &mut Partner,
    queue: &str,
    message_type: &str,
    body: &Value,
) -> Reply {
    let id = uuid::Uuid::new_v4().to_string();
    request_with_id(partner, queue, message_type, &id, body).await
}

/// Publishes one JSON message that asks for a reply, and returns its `message_id` without waiting
/// for the reply (see [`Partner::reply_to`]).
///
/// # Panics
/// When the broker refuses the publish.
pub async fn send(partner: &Partner, queue: &str, message_type: &str, body: &Value) -> String {
    let id = uuid::Uuid::new_v4().to_string();
    partner
        .publish(&Outgoing::json(queue, message_type, &id, body))
        .await
        .expect("publishing");
    id
}

/// Publishes one JSON message with this `message_id` and returns its reply.
///
/// # Panics
/// When no reply comes within [`WAIT`].
pub async fn request_with_id(
    partner: &mut Partner,
    queue: &str,
    message_type: &str,
    message_id: &str,
    body: &Value,
) -> Reply {
    partner
        .publish(&Outgoing::json(queue, message_type, message_id, body))
        .await
        .expect("publishing");
    partner
        .reply_to(message_id, WAIT)
        .await
        .unwrap_or_else(|e| {
            let logs = captured_logs();
            let about: Vec<&str> = logs.lines().filter(|l| l.contains(message_id)).collect();
            panic!(
                "{e:#}\nlog lines about it:\n{}\nrecent gateway warnings:\n{}",
                about.join("\n"),
                recent_warnings()
            )
        })
}

/// The last warnings and errors the gateways logged (for failure messages).
pub fn recent_warnings() -> String {
    let logs = captured_logs();
    let lines: Vec<&str> = logs
        .lines()
        .filter(|l| (l.contains("WARN") || l.contains("ERROR")) && !l.contains("Connection reset"))
        .collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Fails with a clear message.
///
/// # Errors
/// Always.
pub fn unavailable(what: &str) -> anyhow::Error {
    anyhow!(
        "{what}. Start the local services (`rabbitmq-server -detached`, `rabbitmq-plugins enable rabbitmq_management`, \
         `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`), set TRIO_TEST_* URLs, \
         or run where a Docker engine answers (testcontainers)"
    )
}
