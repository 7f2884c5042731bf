//! Outages are logged as state changes: the release worker facing its broker or its
//! database down for 20 s writes a bounded number of lines (a start, an end, and what
//! rejoining the group says), then ingests the rest exactly once.

use std::io::BufRead;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kafka_pg_ingest::dev::proxy::Proxy;

use crate::helpers::*;

/// How long each outage lasts.
const OUTAGE: Duration = Duration::from_secs(20);
/// The most lines an outage may cost, from its start until the worker caught up after it.
const MOST_LINES: usize = 10;

/// The stderr lines of a running worker, each with when it came.
type Lines = Arc<Mutex<Vec<(Instant, String)>>>;

/// Starts the worker `command` with its stderr read into [`Lines`].
fn start(mut command: std::process::Command) -> (Reaped, Lines) {
    command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        // The worker's own default filter: what an operator sees.
        .env_remove("RUST_LOG");
    let mut child = Reaped(command.spawn().expect("binary starts"));
    let stderr = child.stderr.take().expect("piped stderr");
    let lines: Lines = Arc::default();
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            sink.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((Instant::now(), line));
        }
    });
    (child, lines)
}

/// The lines written since `from`.
fn since(lines: &Lines, from: Instant) -> Vec<String> {
    lines
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|(at, _)| *at >= from)
        .map(|(_, line)| line.clone())
        .collect()
}

/// Runs a worker over 1,000 records, takes a dependency down for [`OUTAGE`] with `down`,
/// brings it back with `up`, and waits until 1,000 more landed: produced during the
/// outage, or after it when the broker is what is down, and until the worker logged
/// `end` (statistics come once a second). Hands back the lines written from the
/// outage's start until then.
async fn through_outage(
    db: &TestDb,
    kafka: &TestKafka,
    command: std::process::Command,
    broker_down: bool,
    end: &str,
    down: impl FnOnce(),
    up: impl FnOnce(),
) -> Vec<String> {
    kafka.produce(valid_messages(0, 1_000));
    let (mut child, lines) = start(command);
    wait_for("the first records", Duration::from_secs(60), || async {
        stored_total(&db.pool, &kafka.group, &kafka.topic).await >= 1_000
    })
    .await;
    let started = Instant::now();
    down();
    if !broker_down {
        kafka.produce(valid_messages(1_000, 1_000));
    }
    tokio::time::sleep(OUTAGE).await;
    up();
    if broker_down {
        kafka.produce(valid_messages(1_000, 1_000));
    }
    wait_for(
        "the records of the outage",
        Duration::from_secs(90),
        || async { stored_total(&db.pool, &kafka.group, &kafka.topic).await >= 2_000 },
    )
    .await;
    wait_for(
        "the end of the outage in the log",
        Duration::from_secs(15),
        || async { since(&lines, started).iter().any(|l| l.contains(end)) },
    )
    .await;
    let written = since(&lines, started);
    terminate(&mut child);
    assert_landed_once(db, kafka, 2_000, 0).await;
    written
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_down_for_20_s_costs_a_bounded_number_of_lines() {
    let db = TestDb::new().await;
    let kafka = TestKafka::new(4);
    let cluster = &kafka._cluster;
    let lines = through_outage(
        &db,
        &kafka,
        worker_command(&kafka, &db),
        true,
        "Kafka working again after",
        || cluster.broker_down(1).expect("broker down"),
        || cluster.broker_up(1).expect("broker up"),
    )
    .await;

    let all = lines.join("\n");
    eprintln!("{} lines:\n{all}", lines.len());
    assert!(lines.len() <= MOST_LINES, "{} lines:\n{all}", lines.len());
    assert!(all.contains("Kafka failing; retrying"), "the start: {all}");
    assert!(all.contains("Kafka working again after"), "the end: {all}");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_down_for_20_s_costs_a_bounded_number_of_lines() {
    let db = TestDb::new().await;
    let proxy = Proxy::start("127.0.0.1:5432".parse().expect("addr"))
        .await
        .expect("proxy starts");
    let kafka = TestKafka::new(4);
    let url = format!(
        "postgres://postgres@127.0.0.1:{}/{}?sslmode=disable",
        proxy.port, db.name
    );
    let lines = through_outage(
        &db,
        &kafka,
        worker_command_for(&kafka.brokers, &kafka.topic, &kafka.group, &url),
        false,
        "Batch commits working again after",
        || proxy.set_up(false),
        || proxy.set_up(true),
    )
    .await;

    let all = lines.join("\n");
    eprintln!("{} lines:\n{all}", lines.len());
    assert!(lines.len() <= MOST_LINES, "{} lines:\n{all}", lines.len());
    // The commits of the records produced during the outage fail, then go through (a
    // read of the stored offsets may fail too, as "Postgres").
    assert!(
        all.contains("Batch commits failing; retrying"),
        "the start: {all}"
    );
    assert!(
        all.contains("Batch commits working again after"),
        "the end: {all}"
    );
    db.drop().await;
}
