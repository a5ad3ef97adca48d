//! A gateway running as a child process, with its log in a file: what the benchmark measures
//! and what the fault-injection tests kill, stop and restart.

use anyhow::{Context as _, anyhow, bail};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// A running child process whose stderr goes to a log file.
pub struct ChildProcess {
    child: Child,
    pid: u32,
    /// Its stderr (the gateway's logs).
    pub log: PathBuf,
    /// When it was spawned.
    pub started: Instant,
}

impl ChildProcess {
    /// Spawns `command` with no stdin or stdout and its stderr in a new file at `log`. The
    /// process is killed if this value is dropped while it runs (a safety net: end it with
    /// [`terminate`](Self::terminate) or [`kill`](Self::kill)).
    ///
    /// # Errors
    /// When the log cannot be created or the program not started.
    pub fn spawn(mut command: Command, log: &Path) -> anyhow::Result<Self> {
        let stderr = std::fs::File::create(log)
            .with_context(|| format!("creating the process log {}", log.display()))?;
        command
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true);
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

    /// Fails when the process has already exited, with the end of its log.
    ///
    /// # Errors
    /// When it is no longer running.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "the gateway process exited ({status}); its log {}:\n{}",
                self.log.display(),
                self.log_tail()
            );
        }
        Ok(())
    }

    /// Peak resident set size so far (`VmHWM` of `/proc/<pid>/status`), in MiB.
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

    /// SIGKILL, and waits until it is gone.
    ///
    /// # Errors
    /// When it cannot be signalled or waited for.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }

    /// SIGTERM, and waits up to `grace` for it to exit; returns how it exited (at once when it
    /// had already exited, e.g. after [`kill`](Self::kill)). Past `grace` it is killed.
    ///
    /// # Errors
    /// When it cannot be signalled, or did not stop within `grace`.
    pub async fn terminate(mut self, grace: Duration) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        let signalled = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .status()
            .await
            .context("running kill -TERM")?;
        if !signalled.success() {
            self.child.kill().await?;
            bail!("kill -TERM {} failed; killed it", self.pid);
        }
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => {
                self.child.kill().await?;
                bail!("the gateway did not stop within {grace:?} of SIGTERM; killed it")
            }
        }
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        tail(&self.log)
    }
}

/// The last 30 lines of a log file.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
