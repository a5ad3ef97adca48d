//! `sqlx::migrate!` embeds `migrations/` at compile time, but on stable Rust cargo does not know
//! the macro read that directory: without this, adding a migration left binaries built before it
//! silently without it (the benchmark ran such a binary once).

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
