//! The real binary: SIGKILL at random moments, configuration errors, startup retries.

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use crate::helpers::*;

const BINARY: &str = env!("CARGO_BIN_EXE_kafka-pg-ingest");

fn worker(kafka: &TestKafka, db: &TestDb, log: &std::path::Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    let mut command = Command::new(BINARY);
    command
        .args([
            "run",
            "--brokers",
            &kafka.brokers,
            "--database-url",
            &db.url,
            "--group",
            &kafka.group,
            "--topic",
            &kafka.topic,
        ])
        // Small batches: many commits per wave, so a kill can land between any two.
        .env("KAFKA_PG_INGEST__BATCH__MAX_RECORDS", "200")
        .env("RUST_LOG", "info,librdkafka=warn")
        .stdout(Stdio::null())
        .stderr(log);
    for (key, value) in fast_group_options() {
        command.args(["--kafka-option", &format!("{key}={value}")]);
    }
    command.envs(test_env());
    command.spawn().expect("worker starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn real_binary_killed_with_sigkill_at_random_moments_while_ingesting_50000_ends_exactly_once()
{
    let db = TestDb::new().await;
    let kafka = TestKafka::new(4);
    let seed: u64 = std::env::var("KPI_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("seed {seed} (KPI_TEST_SEED reproduces the kill moments)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let log = std::env::temp_dir().join(format!("{}.log", kafka.group));
    let progress = || stored_total(&db.pool, &kafka.group, &kafka.topic);

    let mut produced = 0u64;
    let mut mid_stream_kills = 0;
    let mut child = worker(&kafka, &db, &log);
    // Waves of 10,000 until five kills have landed mid-stream (a kill after a wave was
    // fully ingested does not count), at most ten waves.
    for _ in 0..10 {
        if mid_stream_kills == 5 {
            break;
        }
        let wave = valid_messages(produced, 10_000);
        let (k, p) = (&kafka, wave);
        tokio::task::block_in_place(|| k.produce(p));
        produced += 10_000;
        let before = progress().await;
        wait_for(
            "the worker committing this wave",
            Duration::from_secs(90),
            || async { progress().await > before },
        )
        .await;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..150))).await;
        let at_kill = progress().await;
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
        if at_kill < produced as i64 {
            mid_stream_kills += 1;
        }
        child = worker(&kafka, &db, &log);
    }
    wait_for(
        "the last worker catching up",
        Duration::from_secs(120),
        || async { progress().await >= produced as i64 },
    )
    .await;
    let pid = child.id().to_string();
    Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill runs");
    let status = child.wait().expect("reaped");
    assert!(
        status.success(),
        "SIGTERM exits 0, got {status}; log in {}",
        log.display()
    );

    assert!(
        produced >= 50_000 && mid_stream_kills >= 5,
        "kills landed mid-stream: {mid_stream_kills}; log in {}",
        log.display()
    );
    assert_landed_once(&db, &kafka, produced as i64, 0).await;
    let _ = std::fs::remove_file(&log);
    db.drop().await;
}

fn run_binary(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(BINARY)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("binary runs")
}

#[test]
fn bad_config_exits_non_zero_with_a_message_naming_the_key() {
    let path = std::env::temp_dir().join(format!("kpi-bad-{}.yaml", uuid::Uuid::new_v4()));
    std::fs::write(&path, "kafka:\n  brokerz: localhost:9092\n").expect("write config");
    let output = run_binary(
        &["run", "--config", path.to_str().expect("utf-8 path")],
        &[],
    );
    let _ = std::fs::remove_file(&path);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("unknown field `brokerz`"), "{stderr}");

    let output = run_binary(&["run", "--kafka-option", "enable.auto.commit=true"], &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("kafka.options.enable.auto.commit"),
        "{stderr}"
    );

    let output = run_binary(&["run"], &[("KAFKA_PG_INGEST__BATCH__MAX_RECORDS", "0")]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("batch.max_records"), "{stderr}");
}

#[test]
fn unreachable_database_at_startup_is_retried_with_backoff_then_exits_non_zero() {
    // Port 1 on loopback: nothing listens, the connection is refused at once.
    let started = Instant::now();
    let output = run_binary(
        &[
            "run",
            "--database-url",
            "postgres://postgres:hunter2@127.0.0.1:1/postgres",
        ],
        &[
            ("KAFKA_PG_INGEST__POSTGRES__CONNECT_RETRY_SECS", "3"),
            ("RUST_LOG", "warn"),
        ],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    let retries = stderr
        .matches("Postgres unreachable at startup, retrying")
        .count();
    assert!(retries >= 3, "retried with backoff: {stderr}");
    assert!(
        stderr.contains("postgres.connect_retry_secs = 3"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("hunter2"),
        "the password never appears: {stderr}"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "gave up only at the limit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cycles_flag_runs_that_many_polls_then_exits_zero_with_its_batches_committed() {
    let db = TestDb::new().await;
    let kafka = TestKafka::new(2);
    kafka.produce(valid_messages(0, 100));
    let mut args = vec![
        "run".to_owned(),
        "--brokers".into(),
        kafka.brokers.clone(),
        "--database-url".into(),
        db.url.clone(),
        "--group".into(),
        kafka.group.clone(),
        "--topic".into(),
        kafka.topic.clone(),
        "--cycles".into(),
        "100".into(),
        "--sleep".into(),
        "0".into(),
    ];
    for (key, value) in fast_group_options() {
        args.extend(["--kafka-option".to_owned(), format!("{key}={value}")]);
    }
    let mut env: Vec<(String, String)> = test_env();
    // 100 polls of at most 100 ms: enough to join the group and ingest, bounded in time.
    env.push(("KAFKA_PG_INGEST__BATCH__MAX_WAIT_MS".into(), "100".into()));
    let output = tokio::task::spawn_blocking(move || {
        Command::new(BINARY)
            .args(&args)
            .envs(env)
            .output()
            .expect("binary runs")
    })
    .await
    .expect("joined");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_landed_once(&db, &kafka, 100, 0).await;
    db.drop().await;
}
