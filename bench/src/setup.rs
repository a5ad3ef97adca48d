//! The benchmark's own world: a vhost, broker users, a database and a pseudonymisation domain,
//! all created for one run and removed after it; and the bulk seeding of cold insured.

use anyhow::{Context as _, bail};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Executor as _, PgPool};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use trio_gateway::admin::{self, BrokerAdmin};
use trio_gateway::config::database_url_for;

/// The OA that sends every `trajet.upsert`.
pub const OA_ID: &str = "301";
/// The GP related to every insured: the one recipient of each `trajet.updated`.
pub const GP_ID: &str = "10000000001";

/// Everything one run created, to use and then remove.
pub struct World {
    /// The vhost.
    pub vhost: String,
    /// The database name.
    pub database: String,
    /// Management API client.
    pub admin: BrokerAdmin,
    /// The server's AMQP URL (any vhost; the operator's credentials).
    pub amqp_base: String,
    /// The server's PostgreSQL URL (any database).
    pub db_base: String,
    /// Connection to the bench database.
    pub db: PgPool,
    /// Scratch directory (domain file, gateway logs).
    pub dir: PathBuf,
    /// Broker users created: `(name, password)` — gateway, OA, GP.
    pub users: [(String, String); 3],
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| default.to_owned())
}

impl World {
    /// Creates the vhost, users, database and domain file.
    ///
    /// # Errors
    /// When a service is down or refuses; whatever was created is removed again.
    pub async fn create() -> anyhow::Result<World> {
        let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
        let amqp_base = env_or("TRIO_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");
        let db_base = env_or(
            "TRIO_DATABASE_URL",
            "postgres://postgres@127.0.0.1:5432/postgres",
        );
        let admin = BrokerAdmin::from_env()?;
        let vhost = format!("trio-bench-{run}");
        let database = format!("trio_bench_{run}");
        let users = [
            (format!("trio-bench-gateway-{run}"), format!("gw-{run}")),
            (format!("trio-bench-oa-{run}"), format!("oa-{run}")),
            (format!("trio-bench-gp-{run}"), format!("gp-{run}")),
        ];
        let dir = std::env::temp_dir().join(format!("trio-bench-{run}"));

        let server = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .connect(&database_url_for(&db_base, "postgres"))
            .await
            .with_context(|| {
                format!(
                    "connecting to PostgreSQL at {} (is it running?)",
                    db_base
                        .rsplit_once('@')
                        .map_or(db_base.as_str(), |(_, h)| h)
                )
            })?;
        admin.create_vhost(&vhost).await.context(
            "creating the bench vhost (is RabbitMQ running with rabbitmq_management enabled?)",
        )?;
        let created = async {
            admin.grant(&vhost, admin::user_of(&amqp_base)).await?;
            for (i, (user, password)) in users.iter().enumerate() {
                // The gateway dead-letters with the sender's user_id: it needs `impersonator`.
                let tags = if i == 0 { "impersonator" } else { "" };
                admin.ensure_user(user, password, tags).await?;
                admin.grant(&vhost, user).await?;
            }
            server
                .execute(format!("CREATE DATABASE {database}").as_str())
                .await
                .context("creating the bench database")?;
            std::fs::create_dir_all(&dir)?;
            let domain = trio_pseudo::PseudoDomain::generate(
                "trio-bench",
                "urn:be:trio:gateway:pseudo:bench",
            );
            trio_gateway::cli::write_secret(&dir.join("domain.json"), &domain.to_json())?;
            let db = PgPoolOptions::new()
                .max_connections(4)
                .connect(&database_url_for(&db_base, &database))
                .await
                .context("connecting to the bench database")?;
            anyhow::Ok(db)
        }
        .await;
        server.close().await;
        let world = |db| World {
            vhost: vhost.clone(),
            database: database.clone(),
            admin: admin.clone(),
            amqp_base: amqp_base.clone(),
            db_base: db_base.clone(),
            db,
            dir: dir.clone(),
            users: users.clone(),
        };
        match created {
            Ok(db) => Ok(world(db)),
            Err(e) => {
                // Remove what was created before the failure.
                let lazy =
                    PgPoolOptions::new().connect_lazy(&database_url_for(&db_base, &database))?;
                world(lazy).remove().await;
                Err(e)
            }
        }
    }

    /// The URL of the bench database.
    pub fn database_url(&self) -> String {
        database_url_for(&self.db_base, &self.database)
    }

    /// The AMQP URL of `user` in the bench vhost.
    pub fn amqp_url(&self, user: &str, password: &str) -> String {
        admin::amqp_url_for(&self.amqp_base, user, password, &self.vhost)
    }

    /// The operator's (reference data) URL and user name.
    pub fn operator(&self) -> (String, String) {
        let user = admin::user_of(&self.amqp_base).to_owned();
        let password = self
            .amqp_base
            .split_once("://")
            .and_then(|(_, r)| r.rsplit_once('@'))
            .and_then(|(cred, _)| cred.split_once(':'))
            .map_or("guest".to_owned(), |(_, p)| p.to_owned());
        (
            admin::amqp_url_for(&self.amqp_base, &user, &password, &self.vhost),
            user,
        )
    }

    /// The `TRIO_*` environment of a gateway process on this world (defaults otherwise).
    pub fn gateway_env(&self) -> Vec<(String, String)> {
        let (user, password) = &self.users[0];
        vec![
            ("TRIO_AMQP_URL".into(), self.amqp_url(user, password)),
            (
                "TRIO_DATABASE_URL".into(),
                database_url_for(&self.db_base, &self.database),
            ),
            (
                "TRIO_PSEUDO_DOMAIN_FILE".into(),
                self.dir.join("domain.json").display().to_string(),
            ),
            (
                "TRIO_OPERATOR_USERS".into(),
                admin::user_of(&self.amqp_base).to_owned(),
            ),
        ]
    }

    /// Removes the vhost, database, users and scratch directory (best effort, reported).
    pub async fn remove(self) {
        self.db.close().await;
        if let Err(e) = self.admin.delete_vhost(&self.vhost).await {
            eprintln!("cleanup: deleting vhost {}: {e:#}", self.vhost);
        }
        for (user, _) in &self.users {
            if let Err(e) = self.admin.delete_user(user).await {
                eprintln!("cleanup: deleting broker user {user}: {e:#}");
            }
        }
        let dropped = async {
            let server = PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(Duration::from_secs(5))
                .connect(&database_url_for(&self.db_base, "postgres"))
                .await?;
            server
                .execute(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.database).as_str())
                .await?;
            server.close().await;
            anyhow::Ok(())
        }
        .await;
        if let Err(e) = dropped {
            eprintln!("cleanup: dropping database {}: {e:#}", self.database);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// Polls `sql` (one bigint) until it reaches `expected`.
    ///
    /// # Errors
    /// When it does not within `limit`, or the query fails.
    pub async fn wait_count(
        &self,
        sql: &str,
        expected: i64,
        limit: Duration,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            let n: i64 = sqlx::query_scalar(sql).fetch_one(&self.db).await?;
            if n >= expected {
                return Ok(());
            }
            if started.elapsed() > limit {
                bail!("{sql}: {n} after {limit:?}, expected {expected}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Adds `count` cold insured, as the gateway itself would have left them after each one's
    /// two `relation.set` and first `trajet.upsert`: a dossier, two relations (OA, GP), one trajet,
    /// two history lines and three inbox outcomes each. Pseudonyms are 88-character base64 like
    /// real ones; history and inbox rows copy the shape of rows the gateway wrote for the hot
    /// insured. Then `VACUUM ANALYZE` and `CHECKPOINT`, as a long-running server would be.
    ///
    /// # Errors
    /// Database failures.
    pub async fn seed_cold(&self, count: u64) -> anyhow::Result<()> {
        let count = i64::try_from(count)?;
        let mut tx = self.db.begin().await?;
        let before: i64 = sqlx::query_scalar("SELECT coalesce(max(id), 0) FROM dossier")
            .fetch_one(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO dossier (id, number, pseudonym) \
             SELECT id, 'TRIO-' || lpad(id::text, 8, '0'), \
                    translate(encode(sha512(('cold-' || g)::bytea), 'base64'), E'\\n', '') \
             FROM (SELECT g, nextval('dossier_id_seq') AS id FROM generate_series(1, $1) g) s",
        )
        .bind(count)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO insured_relation (pseudonym, org_kind, org_id, valid_until) \
             SELECT d.pseudonym, v.k, v.o, now() + interval '24 hours' FROM dossier d \
             CROSS JOIN (VALUES ('oa', $2::text), ('gp', $3::text)) AS v(k, o) WHERE d.id > $1",
        )
        .bind(before)
        .bind(OA_ID)
        .bind(GP_ID)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO trajet (owner_kind, owner_id, ref, dossier_id, type, status, version, \
                                 start_on, consent) \
             SELECT 'oa', $2, 'cold-' || d.id, d.id, 'rtw_ami', 'en_cours', 1, \
                    date '2026-11-02', 'given' FROM dossier d WHERE d.id > $1",
        )
        .bind(before)
        .bind(OA_ID)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO history (dossier_id, actor_kind, actor_id, resource, operation, detail) \
             SELECT d.id, h.actor_kind, h.actor_id, h.resource, h.operation, h.detail \
             FROM dossier d CROSS JOIN (SELECT DISTINCT ON (operation) actor_kind, actor_id, \
                 resource, operation, detail FROM history \
                 WHERE operation IN ('dossier_created', 'trajet_created')) h \
             WHERE d.id > $1",
        )
        .bind(before)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO inbox (sender, message_id, type, status, code, detail, result, \
                                dossier_id) \
             SELECT i.sender, 'cold-' || i.n || '-' || d.id, i.type, i.status, i.code, \
                    i.detail, i.result, d.id \
             FROM dossier d CROSS JOIN (SELECT row_number() OVER () AS n, * FROM \
                 (SELECT sender, type, status, code, detail, result FROM inbox \
                  WHERE type = 'relation.set' LIMIT 2) r \
                 UNION ALL SELECT 3, * FROM (SELECT sender, type, status, code, detail, result \
                  FROM inbox WHERE type = 'trajet.upsert' LIMIT 1) t) i \
             WHERE d.id > $1",
        )
        .bind(before)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        for table in [
            "dossier",
            "insured_relation",
            "trajet",
            "history",
            "inbox",
            "outbox",
        ] {
            self.db
                .execute(format!("VACUUM ANALYZE {table}").as_str())
                .await?;
        }
        self.db.execute("CHECKPOINT").await?;
        Ok(())
    }
}
