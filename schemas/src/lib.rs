//! # TRIO gateway wire messages
//!
//! The typed form of every inbound message (CONTRACT.md §3), their decoding from JSON and XML with
//! the contract's limits, the XML rendering of outbound messages, and the published JSON Schema,
//! XSD and AsyncAPI files (in `schemas/json`, `schemas/xsd`, `schemas/asyncapi.yaml`).
//!
//! Layout:
//! - [`message`]: the types, one struct per message type, and [`MessageType`] for every wire name;
//! - [`decode`](mod@decode): bytes + content type → [`Message`], or a [`DecodeError`] that says whether the
//!   message is unreadable (dead letter) or merely invalid (`invalid_payload` reply);
//! - [`xml`]: the mechanical JSON ↔ XML mapping of CONTRACT.md §3 "XML form".

pub mod decode;
pub mod message;
pub mod xml;

pub use decode::{ContentType, DecodeError, decode};
pub use message::*;
