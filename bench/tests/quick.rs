//! CI smoke check of the benchmark: `trio-bench --quick` runs every phase with small counts
//! against the real broker and database, exits 0, prints the reference pipeline's ratios, the
//! gateway's 1:1 rate against the faster of them, how the half load's latency tail spread over
//! its seconds, what the database path alone costs per batch, and ends with the summary line
//! whose five figures are all positive, its `relay` the mean of the plain relay's runs before and
//! after the 1:1 phase. With a service down it fails, saying which.

use std::process::Command;

#[test]
fn quick_benchmark_runs_every_phase_and_prints_the_summary() {
    let output = Command::new(env!("CARGO_BIN_EXE_trio-bench"))
        .arg("--quick")
        .output()
        .expect("starting trio-bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "trio-bench --quick failed ({}); are RabbitMQ (with rabbitmq_management) and PostgreSQL \
         running?\n--- stdout\n{stdout}\n--- stderr (end)\n{}",
        output.status,
        tail(&stderr, 40)
    );
    // The reference pipeline ran with 2 and with 4 batches in flight, each with its ratio.
    for in_flight in ["2", "4"] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("[1 reference pipeline] {in_flight} batches")))
            .unwrap_or_else(|| panic!("no reference pipeline line for {in_flight}:\n{stdout}"));
        let ratio =
            number_between(line, "(", "×").unwrap_or_else(|| panic!("no ratio in {line:?}"));
        assert!(ratio > 0.0, "{line}");
    }
    // The gateway's 1:1 phase compares it with the faster reference pipeline too (a rate of
    // that pipeline left unset would print `inf`).
    let one_to_one = stdout
        .lines()
        .find(|l| l.starts_with("[3 gateway 1:1]") && l.contains("trajet.updated"))
        .unwrap_or_else(|| panic!("no gateway 1:1 line:\n{stdout}"));
    let against_reference = number_between(one_to_one, "relay, ", "× the faster reference")
        .unwrap_or_else(|| panic!("no comparison with the reference pipeline in {one_to_one:?}"));
    assert!(
        against_reference.is_finite() && against_reference > 0.0,
        "{one_to_one}"
    );
    // The half load says, for the gateway and for the plain relay at the same pace, how its
    // tail spread over the phase's seconds, and whether the broker's log rolled over meanwhile.
    let spreads = stdout
        .lines()
        .filter(|l| {
            l.starts_with("[4 half load]")
                && l.contains("seconds had a latency over")
                && l.contains("the broker's quorum-queue log")
        })
        .count();
    assert_eq!(spreads, 2, "the half load's tail spreads:\n{stdout}");
    // The share of the gateway's messages over 50 ms agrees with its p99: over one per cent
    // exactly when p99 is over 50 ms (away from the boundary, where rounding may part them).
    let half_load = |has: &str, start: &str, end: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with("[4 half load]") && l.contains(has))
            .and_then(|l| number_between(l, start, end))
            .unwrap_or_else(|| panic!("the half load's {has:?} line:\n{stdout}"))
    };
    let p99 = half_load("paced at", "p99 ", " ms");
    let share = half_load("of the messages", "over 50 ms, ", " %");
    assert!(
        (share < 0.9 && p99 <= 50.0) || (share > 1.1 && p99 > 50.0) || (0.9..=1.1).contains(&share),
        "{share} % of the messages over 50 ms, and p99 {p99} ms:\n{stdout}"
    );
    // The database path alone, with the hot insured known (4b) and the cold ones added (5b): a
    // line per batch size with its time per batch, and the fixed and per-message costs they imply.
    let mut per_message_at_200 = Vec::new();
    for phase in ["[4b database path]", "[5b database path at scale]"] {
        let lines: Vec<&str> = stdout
            .lines()
            .filter(|l| l.starts_with(&format!("{phase} batches of")))
            .collect();
        let sizes: Vec<f64> = lines
            .iter()
            .map(|l| number_between(l, "batches of ", ":").unwrap_or(0.0))
            .collect();
        assert_eq!(sizes, [20.0, 200.0], "{phase}'s batches:\n{stdout}");
        for l in &lines {
            let ms: f64 = l
                .split(" ms each")
                .next()
                .and_then(|head| head.rsplit(' ').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0.0);
            assert!(ms > 0.0, "{l}");
        }
        per_message_at_200.push(
            lines[1]
                .split_once("PostgreSQL ")
                .and_then(|(_, rest)| rest.split_once(" per message"))
                .and_then(|(head, _)| head.rsplit_once('('))
                .and_then(|(_, n)| n.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("no PostgreSQL per message in {:?}", lines[1])),
        );
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(&format!("{phase} so a batch costs PostgreSQL"))),
            "no fixed and per-message cost of {phase}:\n{stdout}"
        );
    }
    // 5b says how much more a message cost PostgreSQL than in 4b, at 1:1's batch size.
    let line = stdout
        .lines()
        .find(|l| l.starts_with("[5b database path at scale] against 4b"))
        .unwrap_or_else(|| panic!("no comparison of 5b with 4b:\n{stdout}"));
    let printed = number_between(line, "batches of 200 ", " % (")
        .unwrap_or_else(|| panic!("no percentage in {line:?}"));
    let expected = (per_message_at_200[1] / per_message_at_200[0] - 1.0) * 100.0;
    assert!(
        (printed - expected).abs() <= 1.0,
        "{line:?} says {printed} %, the lines of 4b and 5b give {expected:.1} %"
    );
    let last = stdout.lines().last().unwrap_or_default();
    let fields: Vec<(&str, f64)> = last
        .split_whitespace()
        .filter_map(|field| {
            let (name, value) = field.split_once('=')?;
            Some((name, value.parse().ok()?))
        })
        .collect();
    let names: Vec<&str> = fields.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        names,
        ["ratio", "gateway", "relay", "p99_ms", "rss_mb"],
        "unexpected last line: {last:?}"
    );
    for (name, value) in &fields {
        assert!(*value > 0.0, "{name} is not positive in {last:?}");
    }
    // `relay` is the mean of the plain relay's two runs, before and after the 1:1 phase, and
    // `ratio` compares the gateway with it.
    let rate_of = |prefix: &str, start: &str| {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(prefix) && l.contains("msgs/s"))
            .unwrap_or_else(|| panic!("no {prefix} line:\n{stdout}"));
        let (_, rest) = line
            .split_once(start)
            .unwrap_or_else(|| panic!("no {start:?} in {line:?}"));
        rest.split_once(" msgs/s")
            .and_then(|(rate, _)| rate.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no rate in {line:?}"))
    };
    let before = rate_of("[1 relay ceiling]", "ack after confirm: ");
    let after = rate_of("[3r relay again]", "as in 1: ");
    let value = |name: &str| fields.iter().find(|(n, _)| *n == name).map(|(_, v)| *v);
    let (relay, gateway, ratio) = (value("relay"), value("gateway"), value("ratio"));
    let (Some(relay), Some(gateway), Some(ratio)) = (relay, gateway, ratio) else {
        panic!("{last:?}");
    };
    assert!(
        (relay - (before + after) / 2.0).abs() <= 1.0,
        "relay={relay} is not the mean of {before} and {after}"
    );
    assert!(
        (ratio - gateway / relay).abs() <= 0.01,
        "ratio={ratio} is not {gateway} ÷ {relay}"
    );
    // Phase 5r reads the scale phase against the plain relay run right after it: the gateway's
    // cost per message as a multiple of the relay's, phase 5's over phase 3's.
    let scaled = rate_of("[5 scale] ", "insured known: ");
    let relay_scaled = rate_of("[5r relay again]", "as in 1: ");
    let line = stdout
        .lines()
        .find(|l| l.starts_with("[5r relay again]") && l.contains(" % vs "))
        .unwrap_or_else(|| panic!("no [5r relay again] comparison:\n{stdout}"));
    let printed: f64 = line
        .split_once(" % vs ")
        .and_then(|(head, _)| head.rsplit_once(' '))
        .and_then(|(_, number)| number.parse().ok())
        .unwrap_or_else(|| panic!("no percentage in {line:?}"));
    let expected = ((relay_scaled / scaled) / (relay / gateway) - 1.0) * 100.0;
    assert!(
        (printed - expected).abs() <= 0.2,
        "{line:?} says {printed} %, the rates printed give {expected:.2} %"
    );
}

/// The number between the last `start` of `line` and the `end` that follows it.
fn number_between(line: &str, start: &str, end: &str) -> Option<f64> {
    let (_, rest) = line.rsplit_once(start)?;
    let (number, _) = rest.split_once(end)?;
    number.parse().ok()
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
