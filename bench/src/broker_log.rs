//! RabbitMQ's quorum-queue write-ahead log, watched from its files. Every quorum queue of a node
//! writes to one Ra WAL file; past `raft.wal_max_size_bytes` (512 MiB by default) the node starts
//! a new file and writes the old one's entries out to each queue's segments. On this machine a
//! half-load phase's worst second lined up with such a roll-over (run BJ: a new file about 1.5 s
//! into the phase, whose worst second, its second 2, had a 304 ms latency; run BK: none during
//! the phase, p99 27 ms), so the half-load phases say when one happened. The bench reads the
//! files only when it runs on the broker's machine with access to its data directory; elsewhere
//! it says so.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How often the watcher looks for a new WAL file.
const POLL: Duration = Duration::from_millis(100);

/// A running watch of the WAL directory.
pub struct Watch {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Vec<Instant>>,
}

/// Starts watching, or `None` when no WAL directory is readable here: `TRIO_BENCH_RA_WAL_DIR`,
/// else the first `/var/lib/rabbitmq/mnesia/<node>/quorum/<node>/` holding a `.wal` file.
pub fn watch() -> Option<Watch> {
    let dir = std::env::var_os("TRIO_BENCH_RA_WAL_DIR")
        .map(PathBuf::from)
        .or_else(|| find_wal_dir(Path::new("/var/lib/rabbitmq/mnesia")))?;
    let mut newest = newest_wal(&dir)?;
    let (stop, mut stopped) = oneshot::channel();
    let task = tokio::spawn(async move {
        let mut rolled = Vec::new();
        loop {
            tokio::select! {
                _ = &mut stopped => return rolled,
                () = tokio::time::sleep(POLL) => {}
            }
            if let Some(now) = newest_wal(&dir)
                && now != newest
            {
                rolled.push(Instant::now());
                newest = now;
            }
        }
    });
    Some(Watch { stop, task })
}

impl Watch {
    /// Stops watching; the instants at which a new WAL file was seen (within [`POLL`]).
    pub async fn stop(self) -> Vec<Instant> {
        let _ = self.stop.send(());
        self.task.await.unwrap_or_default()
    }
}

/// Runs `phase` while watching the log: its output, and the instants of the roll-overs seen
/// (`None` when the log is not readable here).
pub async fn during<T>(phase: impl Future<Output = T>) -> (T, Option<Vec<Instant>>) {
    let watch = watch();
    let output = phase.await;
    let rolled = match watch {
        Some(watch) => Some(watch.stop().await),
        None => None,
    };
    (output, rolled)
}

/// `"the broker's quorum-queue log rolled over once meanwhile (in second 2)"`, the seconds
/// counted from `first` as the phase's spread of latencies counts them; or that it could not be
/// watched.
pub fn describe(rolled: Option<&[Instant]>, first: Option<Instant>) -> String {
    let Some(rolled) = rolled else {
        return "the broker's quorum-queue log: not readable from here".into();
    };
    if rolled.is_empty() {
        return "the broker's quorum-queue log did not roll over meanwhile".into();
    }
    let seconds: Vec<String> = rolled
        .iter()
        .map(|at| match first {
            Some(first) if *at >= first => format!("{}", at.duration_since(first).as_secs()),
            _ => "before the first arrival".into(),
        })
        .collect();
    format!(
        "the broker's quorum-queue log rolled over {} meanwhile (in second {})",
        match rolled.len() {
            1 => "once".to_owned(),
            n => format!("{n} times"),
        },
        seconds.join(", ")
    )
}

/// The first `<root>/<node>/quorum/<node>/` directory that holds a `.wal` file.
fn find_wal_dir(root: &Path) -> Option<PathBuf> {
    let nodes = std::fs::read_dir(root).ok()?;
    nodes.flatten().find_map(|node| {
        let quorum = node.path().join("quorum");
        std::fs::read_dir(quorum)
            .ok()?
            .flatten()
            .map(|entry| entry.path())
            .find(|dir| newest_wal(dir).is_some())
    })
}

/// The name of the newest WAL file in `dir` (Ra numbers them in order).
fn newest_wal(dir: &Path) -> Option<String> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|entry| entry.file_name().into_string().ok())
        .filter(|name| name.ends_with(".wal"))
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_wal_file_is_the_highest_numbered() {
        let dir = std::env::temp_dir().join(format!("trio-bench-wal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        assert_eq!(newest_wal(&dir), None);
        for name in ["00000009.wal", "00000010.wal", "names.dets"] {
            std::fs::write(dir.join(name), b"").expect("file");
        }
        assert_eq!(newest_wal(&dir).as_deref(), Some("00000010.wal"));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn roll_overs_are_placed_in_the_seconds_of_the_phase() {
        let first = Instant::now();
        let at = |ms| first + Duration::from_millis(ms);
        assert_eq!(
            describe(Some(&[at(2_400)]), Some(first)),
            "the broker's quorum-queue log rolled over once meanwhile (in second 2)"
        );
        assert_eq!(
            describe(Some(&[at(900), at(15_100)]), Some(first)),
            "the broker's quorum-queue log rolled over 2 times meanwhile (in second 0, 15)"
        );
        assert!(describe(Some(&[]), Some(first)).contains("did not roll over"));
        assert!(describe(None, Some(first)).contains("not readable"));
    }
}
