//! # TRIO gateway handlers: the domain rules and their persistence
//!
//! This crate knows nothing of the broker. The runtime (`trio-gateway`) hands it batches of
//! decoded inbound messages; it applies them in one PostgreSQL transaction per batch and returns
//! one outcome per message plus the replies and events it committed with them.
//!
//! Layout, in the order a message meets it:
//! - [`inbound`]: the envelope the runtime passes in, and the inbound queues;
//! - [`batch`]: prepare (NISS → pseudonyms) → lock → load → apply → flush → commit;
//! - `messages`: one handler per message type (authentication happens in [`batch`]);
//! - [`rules`]: pure rules of DOMAIN.md (trajet types per organisation kind, statuses per type);
//! - `state`: the batch's in-memory view of the database and its multi-row writes;
//! - [`state_cache`]: what the process keeps of each insured across batches, never stale;
//! - [`outcome`]: statuses, reply codes and the reply body;
//! - [`outbound`]: replies and `trio.outbound` events with stable message ids;
//! - [`MIGRATOR`]: the embedded schema migrations.

pub mod batch;
pub mod context;
pub mod inbound;
mod messages;
pub mod outbound;
pub mod outcome;
pub mod rules;
mod state;
pub mod state_cache;

pub use batch::{BatchError, BatchResult, HeldConnection, process_batch};
pub use context::Context;
pub use inbound::{Inbound, SourceQueue};
pub use messages::HandlerBug;
pub use outbound::{OutboundMessage, OutboxEntry};
pub use outcome::{Outcome, RejectCode, Rejection, Status};

/// The embedded database migrations (`handlers/migrations`).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");
