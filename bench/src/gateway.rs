//! The gateway under test, as a child process: `trio-bench` re-executes itself with the hidden
//! `__gateway` argument, which runs `trio_gateway::cli::run(["trio-gateway", "serve"])` — the
//! shipped `serve` with default settings — so its memory is its own and can be read from
//! `/proc/<pid>/status`.

use anyhow::Context as _;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::process::Command;
use trio_gateway::process::ChildProcess;

/// The hidden argument that turns `trio-bench` into the gateway.
pub const GATEWAY_ARG: &str = "__gateway";

/// A running gateway process.
pub type Gateway = ChildProcess;

/// Spawns a gateway with these `TRIO_*` variables (and no other: default settings, whatever the
/// caller's environment holds); its logs go to `log`.
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
        if k.starts_with("TRIO_") {
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
