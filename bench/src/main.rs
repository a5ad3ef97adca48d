//! `trio-bench`: the TRIO gateway measured side by side with the broker's own relay ceiling
//! (issue 10). See the README's "Benchmark" section.
//!
//! Against the broker and database of `TRIO_AMQP_URL` / `TRIO_DATABASE_URL` (local defaults) and
//! the management API of `TRIO_AMQP_ADMIN_URL`, in a fresh vhost and database that it removes at
//! the end, it runs the phases of [`phases`] and prints, as its last line,
//! `ratio=… gateway=… relay=… p99_ms=… rss_mb=…`. `--quick` runs small counts (a smoke check);
//! `--messages N` sets the message count of the 1:1, scale and two-process phases,
//! `--half-load-seconds S` the length of the half-load phase.

mod amqp;
mod broker_log;
mod cpu;
mod db_path;
mod gateway;
mod phases;
mod reference;
mod setup;
mod wal;

use std::process::ExitCode;

/// The shipped `trio-gateway` binary's allocator (see its `main.rs`), so that the gateway this
/// binary runs as a child process is the one that ships.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(gateway::GATEWAY_ARG) {
        return report(gateway::run_child());
    }
    let mut quick = false;
    let mut messages: Option<u64> = None;
    let mut half_load_seconds: Option<f64> = None;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            "--messages" => match args.next().and_then(|n| n.parse().ok()) {
                Some(n) if n > 0 => messages = Some(n),
                _ => {
                    eprintln!("trio-bench: --messages takes a positive count");
                    return ExitCode::from(2);
                }
            },
            "--half-load-seconds" => match args.next().and_then(|s| s.parse::<f64>().ok()) {
                Some(s) if s.is_finite() && s > 0.0 => half_load_seconds = Some(s),
                _ => {
                    eprintln!("trio-bench: --half-load-seconds takes a positive number");
                    return ExitCode::from(2);
                }
            },
            "-h" | "--help" => {
                println!(
                    "trio-bench [--quick] [--messages N] [--half-load-seconds S]\n\nBenchmarks the TRIO gateway (release `serve`, default \
                     settings, as a child process) against a plain lapin relay, in a fresh vhost \
                     and database. Services: TRIO_AMQP_URL, TRIO_DATABASE_URL, TRIO_AMQP_ADMIN_URL \
                     (local defaults).\n\n--quick                small counts (a smoke check)\n--messages N           \
                     trajet.upsert count of the 1:1, scale and two-process phases (e.g. a longer \
                     1:1 phase to profile)\n--half-load-seconds S  length of the half-load \
                     phase in seconds (60, about one cycle of the broker's log; 2 with --quick, \
                     too short to say much about its tail)"
                );
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("trio-bench: unknown argument {other:?} (try --help)");
                return ExitCode::from(2);
            }
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return report(Err(e.into())),
    };
    report(runtime.block_on(phases::run(quick, messages, half_load_seconds)))
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trio-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
