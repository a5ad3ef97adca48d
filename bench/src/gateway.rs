//! The gateway under test, as a child process: `trio-bench` re-executes itself with the hidden
//! `__gateway` argument, which runs `trio_gateway::cli::run(["trio-gateway", "serve"])` — the
//! shipped `serve` with default settings unless a [`TUNING`] variable is set for the bench — so
//! its memory is its own and can be read from `/proc/<pid>/status`.

use anyhow::Context as _;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::process::Command;
use trio_gateway::process::ChildProcess;

/// The hidden argument that turns `trio-bench` into the gateway.
pub const GATEWAY_ARG: &str = "__gateway";

/// A running gateway process.
pub type Gateway = ChildProcess;

/// The gateway settings an experiment may change by setting them for the bench (e.g.
/// `TRIO_WORKERS=4 trio-bench --quick`); the bench prints those set. Every other `TRIO_*` variable
/// of the bench's environment is withheld from the gateways.
pub const TUNING: [&str; 6] = [
    "TRIO_WORKERS",
    "TRIO_RELAYS",
    "TRIO_BATCH_SIZE",
    "TRIO_BATCH_LINGER_MS",
    "TRIO_PREFETCH",
    "TRIO_DB_POOL_SIZE",
];

/// The [`TUNING`] variables set in this environment, as `NAME=value`.
pub fn tuning() -> Vec<String> {
    TUNING
        .iter()
        .filter_map(|name| std::env::var(name).ok().map(|v| format!("{name}={v}")))
        .collect()
}

/// Spawns a gateway with these `TRIO_*` variables and the [`TUNING`] ones set for the bench (no
/// other: default settings otherwise, whatever the caller's environment holds); its logs go to
/// `log`.
///
/// # Errors
/// When the executable cannot be found or started.
pub fn spawn(env: &[(String, String)], log: &Path) -> anyhow::Result<Gateway> {
    // `/proc/self/exe` is this very build even when a rebuild replaced the file meanwhile.
    let exe = if Path::new("/proc/self/exe").exists() {
        PathBuf::from("/proc/self/exe")
    } else {
        std::env::current_exe().context("locating the trio-bench executable")?
    };
    let mut command = Command::new(exe);
    command.arg(GATEWAY_ARG);
    for (k, _) in std::env::vars() {
        if k.starts_with("TRIO_") && !TUNING.contains(&k.as_str()) {
            command.env_remove(k);
        }
    }
    command.envs(env.iter().map(|(k, v)| (k, v)));
    ChildProcess::spawn(command, log)
}

/// SIGTERM, then waits for a graceful stop (killed after 60 s, which is reported).
///
/// # Errors
/// When the process cannot be signalled or waited for.
pub async fn stop(gateway: Gateway) -> anyhow::Result<()> {
    gateway.terminate(Duration::from_secs(60)).await.map(|_| ())
}

/// Runs the gateway in this process (the child side of [`spawn`]).
///
/// # Errors
/// Whatever `serve` fails with.
pub fn run_child() -> anyhow::Result<()> {
    trio_gateway::cli::run(["trio-gateway", "serve"])
}
