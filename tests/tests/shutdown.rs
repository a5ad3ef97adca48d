//! A `serve` process stopped with SIGTERM closes its broker connections cleanly, and its log,
//! written to a file, is plain text.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;
use trio_tests::faults::GatewayProcess;
use trio_tests::{Options, TestEnv};

/// The shipped command line, built in this package.
const GATEWAY: &str = env!("CARGO_BIN_EXE_trio-test-gateway");

#[tokio::test]
async fn sigterm_closes_the_broker_connections_without_a_warning() {
    // The process runs with the default delivery limit, which the queues are declared with.
    let mut env = TestEnv::start_with(Options {
        delivery_limit: 5,
        ..Options::default()
    })
    .await;
    let mut operator = env.operator().await;
    env.stop_gateway().await.unwrap();
    // Whether a dropped connection's I/O thread still has a promise to resolve when the process
    // exits is a race, which six lives nearly always lose: before the fix, this test failed in
    // three runs of three.
    for life in 0..6 {
        let gateway =
            GatewayProcess::spawn(&env, Path::new(GATEWAY), &format!("life{life}")).unwrap();
        // A request and its reply: the process consumed, committed and published.
        env.organisation(&mut operator, "oa", "300", "json").await;
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let log: PathBuf = gateway.log_path().to_owned();
        gateway.terminate().await.unwrap();
        // A connection dropped instead of closed leaves lapin's I/O thread promises nobody
        // awaits any more, and it warns about each as the process exits.
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            !text.contains("promise has vanished"),
            "lapin warned about a connection the gateway dropped (life {life}):\n{text}"
        );
        // Every channel closed before its connection: a channel lapin closes in the background
        // while the connection closes makes it log a connection error on a clean stop.
        assert!(
            !text.contains("Connection error"),
            "lapin logged a connection error on a clean stop (life {life}):\n{text}"
        );
        // Written to a file, not a terminal: plain text, without colour escape codes.
        assert!(
            text.contains("trio-gateway stopped"),
            "the log has its lines:\n{text}"
        );
        assert!(
            !text.contains('\u{1b}'),
            "a log written to a file has terminal escape codes:\n{text}"
        );
    }
    env.finish().await;
}
