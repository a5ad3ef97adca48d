//! # TRIO gateway runtime
//!
//! The message-driven back end of Belgium's TRIO platform. The flow of one message, with the
//! module that owns each step:
//!
//! ```text
//! consume ([`worker`]) → read envelope ([`envelope`]; unreadable → [`dead_letter`])
//!   → decode (trio-schemas) → authenticate, validate, pseudonymise, authorise, apply, and
//!     keep the outbound messages in the inbox rows, in one transaction per batch (trio-handlers)
//!   → publish with confirms ([`relay`]; returned or refused → outbox table, swept)
//!   → ack (multiple) once settled, batches in commit order ([`worker`])
//! ```
//!
//! - [`config`]: `TRIO_*` environment settings;
//! - [`broker`]: connection pools, topology, confirmed publishing;
//! - [`cli`]: the `trio-gateway` command line;
//! - [`serve`]: assembling workers and relays, graceful shutdown;
//! - [`admin`]: broker users and virtual hosts through the management API (demo, benchmark,
//!   tests);
//! - [`demo`]: an end-to-end scenario for newcomers;
//! - [`dlq`]: listing and replaying dead letters;
//! - [`partner`]: a minimal partner client (demo, benchmark, tests);
//! - [`process`]: a gateway as a child process (benchmark, fault-injection tests).

pub mod admin;
pub mod broker;
pub mod cli;
pub mod config;
pub mod dead_letter;
pub mod demo;
pub mod dlq;
pub mod envelope;
pub mod partner;
pub mod process;
pub mod relay;
pub mod serve;
pub mod worker;

pub use config::Config;
pub use serve::serve;

/// Installs the log subscriber: human-readable lines on stderr, level from `RUST_LOG`
/// (default `info`), coloured only on a terminal (a file or journald gets plain text). Logs
/// carry pseudonyms and codes, never a NISS or a payload.
pub fn init_logging() {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,lapin::returned_messages=error")
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}
