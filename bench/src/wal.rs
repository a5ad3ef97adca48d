//! What a phase wrote to PostgreSQL's WAL, per message, and how many checkpoints it saw, read
//! before and after the phase (cluster-wide, so the bench's database is assumed to be the only
//! busy one).
//!
//! The bytes are exact: the WAL insert position (`pg_current_wal_lsn`) moved by that much. The
//! records, full-page images and checkpoints come from `pg_stat_wal` and `pg_stat_bgwriter`,
//! which each backend updates from its own counters at most once a second, and up to ten seconds
//! after it went idle: over a phase of a few seconds they are rough, over the full run's phases
//! (20 s and more) close.
//!
//! WAL volume is what a message's durable writes cost the database, beyond CPU: it decides how
//! often checkpoints come (every `max_wal_size` of WAL), and a checkpoint's writes share the disk
//! with the broker's fsyncs.
//!
//! The line also counts the pages that backends had to write out themselves to make room in
//! `shared_buffers` (`pg_stat_bgwriter.buffers_backend`): work on the statements' own path that
//! grows once a phase's tables outgrow the buffers, which quick runs never reach.

use sqlx::PgPool;
use std::fmt;

/// Cumulative WAL and checkpoint counters.
#[derive(Debug, Clone, Copy, Default)]
pub struct Snapshot {
    records: i64,
    full_page_images: i64,
    bytes: i64,
    checkpoints: i64,
    backend_writes: i64,
}

/// Reads the counters; zeros when they cannot be read (the line then says nothing useful, and
/// the phase goes on).
pub async fn snapshot(db: &PgPool) -> Snapshot {
    sqlx::query_as::<_, (i64, i64, i64, i64, i64)>(
        "SELECT w.wal_records, w.wal_fpi, \
                pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint, \
                b.checkpoints_timed + b.checkpoints_req, b.buffers_backend \
         FROM pg_stat_wal w, pg_stat_bgwriter b",
    )
    .fetch_one(db)
    .await
    .map(
        |(records, full_page_images, bytes, checkpoints, backend_writes)| Snapshot {
            records,
            full_page_images,
            bytes,
            checkpoints,
            backend_writes,
        },
    )
    .unwrap_or_default()
}

/// WAL per message between two snapshots.
pub struct PerMessage {
    records: f64,
    full_page_images: f64,
    bytes: f64,
    checkpoints: i64,
    backend_writes: f64,
}

impl PerMessage {
    /// From `before` to `after`, over `messages`.
    pub fn between(before: &Snapshot, after: &Snapshot, messages: u64) -> Self {
        let per = |a: i64, b: i64| (a - b).max(0) as f64 / messages.max(1) as f64;
        Self {
            records: per(after.records, before.records),
            full_page_images: per(after.full_page_images, before.full_page_images),
            bytes: per(after.bytes, before.bytes),
            checkpoints: (after.checkpoints - before.checkpoints).max(0),
            backend_writes: per(after.backend_writes, before.backend_writes),
        }
    }

    /// Checkpoints begun between the two snapshots.
    pub fn checkpoints(&self) -> i64 {
        self.checkpoints
    }
}

impl fmt::Display for PerMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "WAL per message {:.0} bytes in about {:.1} records ({:.2} full-page images); \
             checkpoints begun: {}; pages written out by backends: {:.3} per message",
            self.bytes, self.records, self.full_page_images, self.checkpoints, self.backend_writes
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_message_divides_the_differences() {
        let before = Snapshot {
            records: 100,
            full_page_images: 10,
            bytes: 1_000,
            checkpoints: 3,
            backend_writes: 7,
        };
        let after = Snapshot {
            records: 1_100,
            full_page_images: 60,
            bytes: 261_000,
            checkpoints: 5,
            backend_writes: 32,
        };
        let line = PerMessage::between(&before, &after, 100).to_string();
        assert_eq!(
            line,
            "WAL per message 2600 bytes in about 10.0 records (0.50 full-page images); \
             checkpoints begun: 2; pages written out by backends: 0.250 per message"
        );
    }
}
