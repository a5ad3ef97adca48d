//! Where a phase's CPU went: CPU time per message of the gateway processes, PostgreSQL, RabbitMQ
//! and the benchmark itself, read from `/proc/<pid>/stat` before and after the phase.
//!
//! On a shared 2-core machine throughput moves by ±15 % from run to run; CPU time per message
//! moves much less, so it is what shows whether a change made a component cheaper. It needs the
//! services on this machine (their processes visible in `/proc`); otherwise their lines read 0.

use std::collections::BTreeMap;
use std::fmt;

/// `/proc` reports CPU times in clock ticks of `USER_HZ`, 100 on Linux.
const TICKS_PER_SECOND: f64 = 100.0;

/// The groups a phase's CPU is split into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Group {
    Gateway,
    PostgreSql,
    RabbitMq,
    Bench,
}

impl Group {
    fn label(self) -> &'static str {
        match self {
            Group::Gateway => "gateway",
            Group::PostgreSql => "PostgreSQL",
            Group::RabbitMq => "RabbitMQ",
            Group::Bench => "bench",
        }
    }
}

/// CPU ticks used so far, per group.
#[derive(Debug, Clone, Default)]
pub struct Snapshot(BTreeMap<Group, u64>);

/// Reads every process's CPU time; `gateways` are the gateway processes' pids.
pub fn snapshot(gateways: &[u32]) -> Snapshot {
    let mut totals = BTreeMap::new();
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Snapshot(totals);
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((comm, ticks)) = parse_stat(&stat) else {
            continue;
        };
        let group = if gateways.contains(&pid) {
            Group::Gateway
        } else if pid == me {
            Group::Bench
        } else if comm == "postgres" {
            Group::PostgreSql
        } else if comm == "beam.smp" {
            Group::RabbitMq
        } else {
            continue;
        };
        *totals.entry(group).or_default() += ticks;
    }
    Snapshot(totals)
}

/// `(comm, utime + stime + cutime + cstime)` of one `/proc/<pid>/stat` line. The children's
/// times count exited PostgreSQL backends, which the postmaster has reaped.
fn parse_stat(stat: &str) -> Option<(&str, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?;
    // Fields after the command: state is field 3, utime 14, stime 15, cutime 16, cstime 17.
    let fields: Vec<&str> = stat.get(close + 2..)?.split(' ').collect();
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<i64>().ok());
    let ticks = field(14)? + field(15)? + field(16)?.max(0) + field(17)?.max(0);
    Some((comm, u64::try_from(ticks).ok()?))
}

/// CPU per message between two snapshots.
pub struct PerMessage {
    micros: Vec<(Group, f64)>,
}

impl PerMessage {
    /// CPU time per message of each group, from `before` to `after`, over `messages`.
    pub fn between(before: &Snapshot, after: &Snapshot, messages: u64) -> Self {
        let micros = after
            .0
            .iter()
            .map(|(group, ticks)| {
                let used = ticks.saturating_sub(before.0.get(group).copied().unwrap_or(0));
                let seconds = used as f64 / TICKS_PER_SECOND;
                (*group, seconds * 1e6 / messages.max(1) as f64)
            })
            .collect();
        Self { micros }
    }

    /// PostgreSQL's CPU per message, in µs.
    pub fn postgresql(&self) -> f64 {
        self.of(Group::PostgreSql)
    }

    /// The benchmark process's own CPU per message, in µs.
    pub fn bench(&self) -> f64 {
        self.of(Group::Bench)
    }

    fn of(&self, wanted: Group) -> f64 {
        self.micros
            .iter()
            .find(|(group, _)| *group == wanted)
            .map_or(0.0, |(_, us)| *us)
    }
}

impl fmt::Display for PerMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total: f64 = self.micros.iter().map(|(_, us)| us).sum();
        write!(f, "CPU per message {total:.0} µs:")?;
        for (i, (group, us)) in self.micros.iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            write!(f, "{sep} {} {us:.0}", group.label())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_gives_its_command_and_cpu_ticks() {
        let line = "4242 (postgres) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 7 3 20 0 1 0 \
                    10 1000 100 18446744073709551615";
        assert_eq!(parse_stat(line), Some(("postgres", 310)));
        // A command with spaces and parentheses still parses.
        let line = "7 (a (b) c) R 1 7 7 0 -1 0 0 0 0 0 1 2 3 4 20 0 1 0 10 1000 100 0";
        assert_eq!(parse_stat(line), Some(("a (b) c", 10)));
    }
}
