//! Where the test services are: the local (or configured) RabbitMQ and PostgreSQL, or, when
//! those do not answer and a Docker engine does, containers started once per test process.

use crate::unavailable;
use std::time::Duration;
use tokio::sync::OnceCell;

/// URLs of the services every test uses.
#[derive(Debug, Clone)]
pub struct Services {
    /// AMQP URL (guest on `/`).
    pub amqp_url: String,
    /// Management API URL with credentials.
    pub admin_url: String,
    /// PostgreSQL URL of a database the tests may create databases from.
    pub database_url: String,
}

static SERVICES: OnceCell<Services> = OnceCell::const_new();

/// The services, found (or started) once per process.
///
/// # Errors
/// When neither the configured services nor a Docker engine answer.
pub async fn get() -> anyhow::Result<Services> {
    SERVICES.get_or_try_init(find).await.cloned()
}

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

async fn reachable(host_port: &str) -> bool {
    matches!(
        tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect(host_port)
        )
        .await,
        Ok(Ok(_))
    )
}

fn host_port(url: &str, default_port: u16) -> String {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let rest = rest.rsplit_once('@').map(|(_, r)| r).unwrap_or(rest);
    let host = rest.split(['/', '?']).next().unwrap_or("127.0.0.1");
    if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:{default_port}")
    }
}

async fn find() -> anyhow::Result<Services> {
    let local = Services {
        amqp_url: env(
            "TRIO_TEST_AMQP_URL",
            "amqp://guest:guest@127.0.0.1:5672/%2f",
        ),
        admin_url: env("TRIO_AMQP_ADMIN_URL", "http://guest:guest@127.0.0.1:15672"),
        database_url: env(
            "TRIO_TEST_DATABASE_URL",
            "postgres://postgres@127.0.0.1:5432/postgres",
        ),
    };
    let amqp_up = reachable(&host_port(&local.amqp_url, 5672)).await;
    let pg_up = reachable(&host_port(&local.database_url, 5432)).await;
    let admin_up = reachable(&host_port(&local.admin_url, 15672)).await;
    if amqp_up && pg_up && admin_up {
        return Ok(local);
    }
    if docker_answers() {
        return containers::start().await;
    }
    Err(unavailable(&format!(
        "test services unreachable (RabbitMQ {}, management API {}, PostgreSQL {}) and no Docker engine answers",
        up(amqp_up),
        up(admin_up),
        up(pg_up)
    )))
}

fn up(b: bool) -> &'static str {
    if b { "up" } else { "DOWN" }
}

fn docker_answers() -> bool {
    std::process::Command::new("docker")
        .arg("info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

mod containers {
    use super::Services;
    use testcontainers::core::{IntoContainerPort, WaitFor};
    use testcontainers::runners::AsyncRunner;
    use testcontainers::{ContainerAsync, GenericImage, ImageExt};
    use tokio::sync::OnceCell;

    /// Kept alive for the whole test process.
    static KEEP: OnceCell<(ContainerAsync<GenericImage>, ContainerAsync<GenericImage>)> =
        OnceCell::const_new();

    pub(super) async fn start() -> anyhow::Result<Services> {
        let (rabbit, pg) = KEEP
            .get_or_try_init(|| async {
                let rabbit = GenericImage::new("rabbitmq", "3.10-management")
                    .with_exposed_port(5672.tcp())
                    .with_exposed_port(15672.tcp())
                    .with_wait_for(WaitFor::message_on_stdout("Server startup complete"))
                    .start()
                    .await?;
                let pg = GenericImage::new("postgres", "15")
                    .with_exposed_port(5432.tcp())
                    .with_wait_for(WaitFor::message_on_stderr(
                        "database system is ready to accept connections",
                    ))
                    .with_env_var("POSTGRES_HOST_AUTH_METHOD", "trust")
                    .start()
                    .await?;
                anyhow::Ok((rabbit, pg))
            })
            .await?;
        let amqp = rabbit.get_host_port_ipv4(5672).await?;
        let http = rabbit.get_host_port_ipv4(15672).await?;
        let pgp = pg.get_host_port_ipv4(5432).await?;
        Ok(Services {
            amqp_url: format!("amqp://guest:guest@127.0.0.1:{amqp}/%2f"),
            admin_url: format!("http://guest:guest@127.0.0.1:{http}"),
            database_url: format!("postgres://postgres@127.0.0.1:{pgp}/postgres"),
        })
    }
}
