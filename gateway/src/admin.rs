//! Broker administration through the RabbitMQ management API: users, virtual hosts and
//! permissions. The demo, the benchmark and the tests use it to give each organisation its own
//! broker user (the contract authenticates senders by `user_id`) and each run its own vhost.
//!
//! `TRIO_AMQP_ADMIN_URL` (default `http://guest:guest@127.0.0.1:15672`); the
//! `rabbitmq_management` plugin must be enabled (`rabbitmq-plugins enable rabbitmq_management`).

use anyhow::{Context as _, anyhow};
use base64::Engine as _;
use serde_json::json;

/// A request the management API answered with an error status, with the body that says why
/// (e.g. `{"error":"bad_request","reason":["user_already_exists","t-oa-300"]}`).
#[derive(Debug, thiserror::Error)]
#[error("management API {method} {path}: status {status}: {body}")]
pub struct Refused {
    /// The HTTP method.
    pub method: &'static str,
    /// The path under `/api/`.
    pub path: String,
    /// The HTTP status.
    pub status: u16,
    /// The response body.
    pub body: String,
}

/// A management API client.
#[derive(Clone)]
pub struct BrokerAdmin {
    base: String,
    authorization: String,
}

impl std::fmt::Debug for BrokerAdmin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerAdmin")
            .field("base", &self.base)
            .finish()
    }
}

impl BrokerAdmin {
    /// From `TRIO_AMQP_ADMIN_URL`, or the local default.
    ///
    /// # Errors
    /// When the URL has no `user:password@`.
    pub fn from_env() -> anyhow::Result<Self> {
        let url = std::env::var("TRIO_AMQP_ADMIN_URL")
            .unwrap_or_else(|_| "http://guest:guest@127.0.0.1:15672".to_owned());
        Self::new(&url)
    }

    /// From `http://user:password@host:port`.
    ///
    /// # Errors
    /// When the URL has no `user:password@`.
    pub fn new(url: &str) -> anyhow::Result<Self> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| anyhow!("admin URL has no scheme"))?;
        let (userinfo, host) = rest
            .rsplit_once('@')
            .ok_or_else(|| anyhow!("admin URL has no user:password@"))?;
        let token = base64::engine::general_purpose::STANDARD.encode(userinfo);
        Ok(Self {
            base: format!("{scheme}://{}", host.trim_end_matches('/')),
            authorization: format!("Basic {token}"),
        })
    }

    async fn call(
        &self,
        method: &'static str,
        path: String,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<serde_json::Value> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let request = ureq::request(method, &format!("{}/api/{path}", this.base))
                .set("Authorization", &this.authorization)
                .timeout(std::time::Duration::from_secs(30));
            let response = match body {
                Some(body) => request.send_json(body),
                None => request.call(),
            };
            match response {
                Ok(response) if method == "GET" => response
                    .into_json()
                    .map_err(|e| anyhow!("management API {method} {path}: {e}")),
                Ok(_) => Ok(serde_json::Value::Null),
                Err(ureq::Error::Status(404, _)) if method == "DELETE" => {
                    Ok(serde_json::Value::Null)
                }
                Err(ureq::Error::Status(status, response)) => Err(Refused {
                    method,
                    path,
                    status,
                    body: response.into_string().unwrap_or_default(),
                }
                .into()),
                Err(e) => Err(anyhow!("management API {method} {path}: {e}")),
            }
        })
        .await
        .context("management API call panicked")?
    }

    /// Creates (or updates) a user with a password and tags (e.g. `""`, `"impersonator"`).
    ///
    /// Several clients may ensure the same new user at once (parallel tests on a fresh broker):
    /// RabbitMQ then creates it for one and answers the others 400 `user_already_exists`
    /// instead of updating it. The user exists by then, so those PUT again, which updates it.
    ///
    /// # Errors
    /// When the management API refuses or is unreachable.
    pub async fn ensure_user(&self, name: &str, password: &str, tags: &str) -> anyhow::Result<()> {
        let put = || {
            self.call(
                "PUT",
                format!("users/{}", encode(name)),
                Some(json!({ "password": password, "tags": tags })),
            )
        };
        for _ in 0..3 {
            match put().await {
                Err(e) if created_meanwhile(&e) => continue,
                result => return result.map(drop),
            }
        }
        put().await.map(drop)
    }

    /// Creates a virtual host.
    ///
    /// # Errors
    /// When the management API refuses or is unreachable.
    pub async fn create_vhost(&self, vhost: &str) -> anyhow::Result<()> {
        self.call("PUT", format!("vhosts/{}", encode(vhost)), Some(json!({})))
            .await
            .map(drop)
    }

    /// Deletes a virtual host and everything in it.
    ///
    /// # Errors
    /// When the management API refuses or is unreachable.
    pub async fn delete_vhost(&self, vhost: &str) -> anyhow::Result<()> {
        self.call("DELETE", format!("vhosts/{}", encode(vhost)), None)
            .await
            .map(drop)
    }

    /// Deletes a user (nothing to do when it does not exist).
    ///
    /// # Errors
    /// When the management API refuses or is unreachable.
    pub async fn delete_user(&self, name: &str) -> anyhow::Result<()> {
        self.call("DELETE", format!("users/{}", encode(name)), None)
            .await
            .map(drop)
    }

    /// Gives a user full permissions on a virtual host.
    ///
    /// # Errors
    /// When the management API refuses or is unreachable.
    pub async fn grant(&self, vhost: &str, user: &str) -> anyhow::Result<()> {
        self.call(
            "PUT",
            format!("permissions/{}/{}", encode(vhost), encode(user)),
            Some(json!({ "configure": ".*", "write": ".*", "read": ".*" })),
        )
        .await
        .map(drop)
    }

    /// Messages in a queue, ready and unacknowledged (the management API's statistics, refreshed
    /// every few seconds).
    ///
    /// # Errors
    /// When the queue does not exist or the management API is unreachable.
    pub async fn queue_messages(&self, vhost: &str, queue: &str) -> anyhow::Result<u64> {
        let stats = self
            .call(
                "GET",
                format!("queues/{}/{}", encode(vhost), encode(queue)),
                None,
            )
            .await?;
        Ok(stats["messages"].as_u64().unwrap_or(0))
    }
}

/// Whether a PUT of a user lost the race to create it to another client.
fn created_meanwhile(e: &anyhow::Error) -> bool {
    e.downcast_ref::<Refused>()
        .is_some_and(|r| r.status == 400 && r.body.contains("user_already_exists"))
}

/// Percent-encodes a path segment (vhost `/` becomes `%2F`).
fn encode(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The user named in an AMQP URL (`guest` when it names none).
pub fn user_of(amqp_url: &str) -> &str {
    amqp_url
        .split_once("://")
        .and_then(|(_, rest)| rest.rsplit_once('@'))
        .and_then(|(credentials, _)| credentials.split_once(':'))
        .map_or("guest", |(user, _)| user)
}

/// The AMQP URL for another user and vhost on the same broker as `base`
/// (`amqp://user:password@host:port/vhost`).
pub fn amqp_url_for(base: &str, user: &str, password: &str, vhost: &str) -> String {
    let rest = base.split_once("://").map(|(_, r)| r).unwrap_or(base);
    let host_and_path = rest.rsplit_once('@').map(|(_, h)| h).unwrap_or(rest);
    let host = host_and_path.split('/').next().unwrap_or("127.0.0.1:5672");
    format!(
        "amqp://{}:{}@{host}/{}",
        encode(user),
        encode(password),
        encode(vhost)
    )
}

/// The vhost named by an AMQP URL (`/` when none).
pub fn vhost_of(amqp_url: &str) -> String {
    let rest = amqp_url
        .split_once("://")
        .map(|(_, r)| r)
        .unwrap_or(amqp_url);
    match rest.split_once('/') {
        Some((_, path)) if !path.is_empty() => {
            let path = path.split('?').next().unwrap_or(path);
            percent_decode(path)
        }
        _ => "/".to_owned(),
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_of_reads_the_user_of_an_amqp_url() {
        assert_eq!(user_of("amqp://t-oa-300:pw@127.0.0.1:5672/v"), "t-oa-300");
        assert_eq!(user_of("amqp://127.0.0.1:5672/%2f"), "guest");
    }

    #[test]
    fn urls_for_other_users_and_vhosts() {
        assert_eq!(
            amqp_url_for(
                "amqp://guest:guest@127.0.0.1:5672/%2f",
                "oa300",
                "pw",
                "t-1"
            ),
            "amqp://oa300:pw@127.0.0.1:5672/t-1"
        );
        assert_eq!(vhost_of("amqp://guest:guest@127.0.0.1:5672/%2f"), "/");
        assert_eq!(vhost_of("amqp://guest:guest@127.0.0.1:5672/t-1"), "t-1");
        assert_eq!(vhost_of("amqp://guest:guest@127.0.0.1:5672"), "/");
    }
}
