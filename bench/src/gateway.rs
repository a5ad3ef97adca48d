//! The gateway under test, as a child process: `trio-bench` re-executes itself with the hidden
//! `__gateway` argument, which runs `trio_gateway::cli::run(["trio-gateway", "serve"])` — the
//! shipped `serve` with default settings — so its memory is its own and can be read from
//! `/proc/<pid>/status`.

use anyhow::{Context as _, anyhow, bail};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// The hidden argument that turns `trio-bench` into the gateway.
pub const GATEWAY_ARG: &str = "__gateway";

/// A running gateway process.
pub struct Gateway {
    child: Child,
    pid: u32,
    /// Its stderr (logs).
    pub log: PathBuf,
    /// When it was spawned.
    pub started: Instant,
}

impl Gateway {
    /// Spawns a gateway with these `TRIO_*` variables; its logs go to `log`.
    ///
    /// # Errors
    /// When the executable cannot be found or started.
    pub fn spawn(env: &[(String, String)], log: &Path) -> anyhow::Result<Self> {
        // `/proc/self/exe` is this very build even when a rebuild replaced the file meanwhile.
        let exe = if Path::new("/proc/self/exe").exists() {
            PathBuf::from("/proc/self/exe")
        } else {
            std::env::current_exe().context("locating the trio-bench executable")?
        };
        let stderr = std::fs::File::create(log)
            .with_context(|| format!("creating the gateway log {}", log.display()))?;
        let mut command = Command::new(exe);
        command
            .arg(GATEWAY_ARG)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            // Safety net only: a normal end sends SIGTERM and waits (see `stop`).
            .kill_on_drop(true);
        // Default settings: no TRIO_* from the caller's environment leaks into the measurement.
        for (k, _) in std::env::vars() {
            if k.starts_with("TRIO_") {
                command.env_remove(k);
            }
        }
        command.envs(env.iter().map(|(k, v)| (k, v)));
        let child = command.spawn().context("starting the gateway process")?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow!("the gateway process exited at once"))?;
        Ok(Self {
            child,
            pid,
            log: log.to_owned(),
            started: Instant::now(),
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Fails when the process has already exited (with the end of its log).
    ///
    /// # Errors
    /// When it is no longer running.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "the gateway process exited ({status}); its log {}:\n{}",
                self.log.display(),
                tail(&self.log)
            );
        }
        Ok(())
    }

    /// Peak resident set size so far (`VmHWM`), in MiB.
    ///
    /// # Errors
    /// When `/proc/<pid>/status` cannot be read.
    pub fn peak_rss_mb(&self) -> anyhow::Result<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .context("reading the gateway's /proc status")?;
        let kb: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| anyhow!("no VmHWM in /proc/{}/status", self.pid))?;
        Ok(kb / 1024.0)
    }

    /// SIGTERM, then waits for a graceful stop (SIGKILL after 60 s).
    ///
    /// # Errors
    /// When the process cannot be signalled or waited for.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .status()
            .await
            .context("running kill -TERM")?;
        if !status.success() {
            self.child.kill().await?;
            return Ok(());
        }
        match tokio::time::timeout(Duration::from_secs(60), self.child.wait()).await {
            Ok(result) => {
                result?;
            }
            Err(_) => {
                eprintln!("the gateway did not stop within 60 s of SIGTERM; killing it");
                self.child.kill().await?;
            }
        }
        Ok(())
    }
}

/// The last lines of a log file.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Runs the gateway in this process (the child side of [`Gateway::spawn`]).
///
/// # Errors
/// Whatever `serve` fails with.
pub fn run_child() -> anyhow::Result<()> {
    trio_gateway::cli::run(["trio-gateway", "serve"])
}
