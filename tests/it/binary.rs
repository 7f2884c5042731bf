//! The real binary: SIGKILL at random moments, configuration errors, startup retries.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use crate::helpers::*;

fn worker(kafka: &TestKafka, db: &TestDb, log: &std::path::Path) -> Reaped {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    let mut command = worker_command(kafka, db);
    command
        // Small batches: many commits per wave, so a kill can land between any two.
        .env("KAFKA_PG_INGEST__BATCH__MAX_RECORDS", "200")
        .env("RUST_LOG", "info,librdkafka=warn")
        .stdout(Stdio::null())
        .stderr(log);
    Reaped(command.spawn().expect("worker starts"))
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
    let status = terminate(&mut child);
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

/// Runs `run --cycles 100` (polls of at most 100 ms: enough to join the group and ingest
/// a small topic, bounded in time) and returns its output.
async fn run_cycles(brokers: &str, database_url: &str, group: &str, topic: &str) -> Output {
    let mut args: Vec<String> = [
        "run",
        "--brokers",
        brokers,
        "--database-url",
        database_url,
        "--group",
        group,
        "--topic",
        topic,
        "--cycles",
        "100",
        "--sleep",
        "0",
    ]
    .map(str::to_owned)
    .to_vec();
    for (key, value) in fast_group_options() {
        args.extend(["--kafka-option".to_owned(), format!("{key}={value}")]);
    }
    let mut env = test_env();
    env.push(("KAFKA_PG_INGEST__BATCH__MAX_WAIT_MS".into(), "100".into()));
    env.push(("LOG_FORMAT".into(), "json".into()));
    tokio::task::spawn_blocking(move || {
        Command::new(BINARY)
            .args(&args)
            .envs(env)
            .output()
            .expect("binary runs")
    })
    .await
    .expect("joined")
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
fn config_prints_the_effective_configuration_with_each_keys_layer_and_secrets_masked() {
    let path = std::env::temp_dir().join(format!("kpi-layers-{}.yaml", uuid::Uuid::new_v4()));
    std::fs::write(
        &path,
        "batch:\n  max_records: 777\nkafka:\n  group: from-file\n",
    )
    .expect("write config");
    let file = path.to_str().expect("utf-8 path");
    let output = run_binary(
        &[
            "config",
            "--origin",
            "--config",
            file,
            "--brokers",
            "10.0.0.1:9092",
            "--database-url",
            "postgres://ingest:hunter2@db.example:5432/metrics",
            "--kafka-option",
            "fetch.wait.max.ms=50",
        ],
        &[
            ("KAFKA_PG_INGEST__RETRY__MAX_DELAY_MS", "4321"),
            (
                "KAFKA_PG_INGEST__KAFKA__OPTIONS__SESSION_TIMEOUT_MS",
                "6000",
            ),
        ],
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let line = |key: &str| {
        stdout
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{key}:")))
            .unwrap_or_else(|| panic!("no `{key}` in:\n{stdout}"))
            .trim()
            .to_owned()
    };
    assert_eq!(
        line("max_records"),
        format!("max_records: 777  # file {file}")
    );
    assert_eq!(line("group"), format!("group: from-file  # file {file}"));
    assert_eq!(
        line("max_delay_ms"),
        "max_delay_ms: 4321  # environment variable KAFKA_PG_INGEST__RETRY__MAX_DELAY_MS"
    );
    assert_eq!(
        line("session.timeout.ms"),
        "session.timeout.ms: 6000  # environment variable KAFKA_PG_INGEST__KAFKA__OPTIONS__SESSION_TIMEOUT_MS"
    );
    assert_eq!(
        line("fetch.wait.max.ms"),
        "fetch.wait.max.ms: '50'  # flag --kafka-option"
    );
    assert_eq!(
        line("brokers"),
        "brokers: 10.0.0.1:9092  # flag --brokers (or KAFKA_BROKERS)"
    );
    assert!(
        line("max_wait_ms").ends_with("# built-in defaults"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("hunter2"),
        "the password is masked: {stdout}"
    );
    assert!(line("url").contains("ingest:***@db.example"), "{stdout}");

    // Without --origin: the same values, no comments, and YAML that loads back.
    let plain = run_binary(&["config", "--config", file], &[]);
    let _ = std::fs::remove_file(&path);
    let text = String::from_utf8_lossy(&plain.stdout);
    assert!(plain.status.success());
    assert!(!text.contains(" # "), "{text}");
    let back: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).expect("valid YAML");
    assert_eq!(
        back["batch"]["max_records"],
        serde_yaml_ng::Value::from(777)
    );
}

#[test]
fn a_value_of_the_wrong_type_names_its_key_and_the_layer_that_set_it() {
    let output = run_binary(
        &["config"],
        &[("KAFKA_PG_INGEST__BATCH__MAX_RECORDS", "lots")],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        output.stdout.is_empty(),
        "nothing printed for an invalid configuration"
    );
    assert!(stderr.contains("`batch.max_records`"), "{stderr}");
    assert!(
        stderr.contains("environment variable KAFKA_PG_INGEST__BATCH__MAX_RECORDS"),
        "{stderr}"
    );

    let output = run_binary(&["config", "--sleep=-1"], &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("run.sleep_secs"), "{stderr}");
    assert!(stderr.contains("flag --sleep"), "{stderr}");
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
            ("RUST_LOG", "warn,kafka_pg_ingest::store=debug"),
        ],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    let retries = stderr.matches("connecting failed, retrying").count();
    assert!(retries >= 3, "retried with backoff: {stderr}");
    assert_eq!(
        stderr.matches("Postgres failing; retrying").count(),
        1,
        "the outage is one line, its retries debug lines: {stderr}"
    );
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
    let output = run_cycles(&kafka.brokers, &db.url, &kafka.group, &kafka.topic).await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_landed_once(&db, &kafka, 100, 0).await;

    // The same worker's JSON log (LOG_FORMAT): one object per line, counts as numbers,
    // partitions as text, no debug dumps of Rust values, no source file paths.
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let line = |message: &str| {
        lines
            .iter()
            .find(|l| {
                l["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(message))
            })
            .unwrap_or_else(|| panic!("no `{message}` line in {stderr}"))
    };
    assert_eq!(line("worker stopped")["fields"]["rows"], 100, "{stderr}");
    assert_eq!(
        line("worker started")["fields"]["topics"],
        kafka.topic.as_str()
    );
    let claimed = line("claimed 2 partition(s): no stored offsets")["fields"]["partitions"]
        .as_str()
        .expect("partitions as text");
    let mut claimed: Vec<&str> = claimed.split(", ").collect();
    claimed.sort_unstable();
    let topic = &kafka.topic;
    assert_eq!(
        claimed,
        [format!("{topic}/0@0"), format!("{topic}/1@0")],
        "{stderr}"
    );
    for l in &lines {
        let text = l.to_string();
        assert!(!text.contains("log.file"), "{text}");
        for value in l["fields"].as_object().expect("fields").values() {
            let value = value.as_str().unwrap_or_default();
            assert!(
                !(value.starts_with("Some(")
                    || value.starts_with("[(")
                    || value.starts_with("[\"")),
                "a debug dump: {text}"
            );
        }
    }
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dev_broker_and_dev_produce_feed_a_worker_that_lands_every_message_once() {
    let db = TestDb::new().await;
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let (topic, group) = (
        format!("dev-{}", &suffix[..8]),
        format!("dev-group-{}", &suffix[..8]),
    );
    let mut broker = Reaped(
        Command::new(BINARY)
            .args(["dev", "broker", "--topic", &topic, "--partitions", "4"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("broker starts"),
    );
    let brokers = first_line(&mut broker);
    assert!(
        brokers.starts_with("127.0.0.1:") || brokers.starts_with("localhost:"),
        "{brokers}"
    );

    let produced = run_binary(
        &[
            "dev",
            "produce",
            "--brokers",
            &brokers,
            "--topic",
            &topic,
            "--count",
            "2000",
            "--malformed-ratio",
            "0.05",
            "--seed",
            "9",
        ],
        &[],
    );
    let summary = String::from_utf8_lossy(&produced.stdout).into_owned();
    assert!(
        produced.status.success(),
        "{}",
        String::from_utf8_lossy(&produced.stderr)
    );
    let (valid, malformed) = produced_counts(&summary);
    assert_eq!(valid + malformed, 2000, "{summary}");
    assert!(malformed > 0, "{summary}");

    let worker = run_cycles(&brokers, &db.url, &group, &topic).await;
    assert!(
        worker.status.success(),
        "{}",
        String::from_utf8_lossy(&worker.stderr)
    );

    Landed::read(&db.pool, &topic)
        .await
        .assert_exactly_once(valid, malformed);
    assert_eq!(stored_total(&db.pool, &group, &topic).await, 2000);
    assert!(
        terminate(&mut broker).success(),
        "the broker stops cleanly on SIGTERM"
    );
    db.drop().await;
}

/// A password in the database URL, as a secret to look for in everything printed.
const PASSWORD: &str = "Pw-s3cret-7f3a";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn database_password_never_appears_in_trace_logs_or_errors() {
    let db = TestDb::new().await;
    let kafka = TestKafka::new(1);
    kafka.produce(valid_messages(0, 50));
    // Trust authentication ignores the password, so the run succeeds with it in the URL.
    let with_password = db
        .url
        .replacen("postgres@", &format!("postgres:{PASSWORD}@"), 1);
    let unreachable = format!("postgres://postgres:{PASSWORD}@127.0.0.1:1/nowhere");
    let mut outputs = Vec::new();
    for (url, should_succeed) in [(with_password, true), (unreachable, false)] {
        let mut args = vec![
            "run".to_owned(),
            "--brokers".into(),
            kafka.brokers.clone(),
            "--database-url".into(),
            url,
            "--group".into(),
            kafka.group.clone(),
            "--topic".into(),
            kafka.topic.clone(),
            "--cycles".into(),
            "40".into(),
        ];
        for (key, value) in fast_group_options() {
            args.extend(["--kafka-option".to_owned(), format!("{key}={value}")]);
        }
        let output = tokio::task::spawn_blocking(move || {
            Command::new(BINARY)
                .args(&args)
                .envs(test_env())
                .env("RUST_LOG", "trace")
                .env("KAFKA_PG_INGEST__POSTGRES__CONNECT_RETRY_SECS", "1")
                .output()
                .expect("binary runs")
        })
        .await
        .expect("joined");
        assert_eq!(output.status.success(), should_succeed, "{output:?}");
        outputs.push(output);
    }
    assert_landed_once(&db, &kafka, 50, 0).await;
    for output in &outputs {
        let printed = [&output.stdout[..], &output.stderr[..]].concat();
        let printed = String::from_utf8_lossy(&printed);
        assert!(!printed.contains(PASSWORD), "the password leaked");
    }
    let run_log = String::from_utf8_lossy(&outputs[0].stderr);
    assert!(run_log.contains(" TRACE "), "TRACE logging was on");
    let error = String::from_utf8_lossy(&outputs[1].stderr);
    assert!(
        error.contains("postgres://postgres:***@127.0.0.1:1/nowhere"),
        "the error names the masked URL: {error}"
    );
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_sasl_password_never_appears_at_trace_and_a_failed_authentication_stops_naming_the_keys()
 {
    const SASL_PASSWORD: &str = "Sasl-s3cret-91b";
    let db = TestDb::new().await;
    let kafka = TestKafka::new(1);
    kafka.produce(valid_messages(0, 10));
    let secret = std::env::temp_dir().join(format!("kpi-sasl-{}", uuid::Uuid::new_v4()));
    std::fs::write(&secret, format!("{SASL_PASSWORD}\n")).expect("secret file written");

    // The mock broker offers no SASL, so authentication fails after librdkafka has the
    // password; its own debug output of configuration and security is on too.
    let mut command = worker_command(&kafka, &db);
    command
        .args(["--kafka-option", "debug=conf,security,broker"])
        .envs([
            (
                "KAFKA_PG_INGEST__KAFKA__SECURITY_PROTOCOL",
                "sasl_plaintext",
            ),
            ("KAFKA_PG_INGEST__KAFKA__SASL__MECHANISM", "SCRAM-SHA-256"),
            ("KAFKA_PG_INGEST__KAFKA__SASL__USERNAME", "ingest"),
            ("RUST_LOG", "trace"),
        ])
        .env("KAFKA_PG_INGEST__KAFKA__SASL__PASSWORD_FILE", &secret);
    let (status, stderr) = run_to_exit(command).await;
    let _ = std::fs::remove_file(&secret);

    assert!(!status.success(), "a failed authentication is fatal");
    assert!(stderr.contains(" TRACE "), "TRACE logging was on");
    let error = final_error(&stderr);
    assert!(
        error.contains("kafka.sasl.mechanism") && error.contains("SCRAM-SHA-256"),
        "the error names the keys and the mechanism: {stderr}"
    );
    assert!(!stderr.contains(SASL_PASSWORD), "the SASL password leaked");
    assert_eq!(stored_group_total(&db.pool, &kafka.group).await, 0);
    db.drop().await;
}

#[test]
fn completions_and_man_pages_are_generated_from_the_command_line() {
    for shell in ["bash", "zsh", "fish", "powershell", "elvish"] {
        let output = run_binary(&["completions", shell], &[]);
        assert!(output.status.success(), "{shell}");
        let script = String::from_utf8_lossy(&output.stdout);
        for word in ["offsets", "rewind", "dlq", "to-earliest"] {
            assert!(script.contains(word), "{shell} completes `{word}`");
        }
    }
    let output = run_binary(&["completions", "tcsh"], &[]);
    assert!(!output.status.success(), "an unknown shell is refused");

    let output = run_binary(&["man"], &[]);
    let page = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success() && page.starts_with(".ie"), "{page}");
    assert!(page.contains("exactly once"), "{page}");
    let dir = std::env::temp_dir().join(format!("kpi-man-{}", uuid::Uuid::new_v4()));
    let output = run_binary(&["man", "--out-dir", dir.to_str().expect("UTF-8")], &[]);
    assert!(output.status.success());
    for page in [
        "kafka-pg-ingest.1",
        "kafka-pg-ingest-offsets-rewind.1",
        "kafka-pg-ingest-dlq-retry.1",
    ] {
        let text =
            std::fs::read_to_string(dir.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.contains(".TH"), "{page} is a man page");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_show_without_a_broker_fails_in_one_timeout_unless_told_to_skip_watermarks() {
    let db = TestDb::new().await;
    exec(
        &db.pool,
        "INSERT INTO ingest.offsets (consumer_group, topic, partition, next_offset, epoch, owner) \
         SELECT 'g', 't', p, 5, 1, 'w' FROM generate_series(0, 7) p",
    )
    .await;
    let args = [
        "offsets",
        "show",
        "--brokers",
        "127.0.0.1:1",
        "--database-url",
        &db.url,
    ];
    let started = Instant::now();
    let output = tokio::task::block_in_place(|| run_binary(&args, &[]));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("--no-watermarks"), "{stderr}");
    // One broker timeout (10 s), not one per partition (80 s).
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    let output = tokio::task::block_in_place(|| {
        run_binary(&[&args[..], &["--no-watermarks"]].concat(), &[])
    });
    assert!(output.status.success());
    let shown = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        shown.lines().filter(|l| l.starts_with("g ")).count(),
        8,
        "{shown}"
    );
    db.drop().await;
}

#[test]
fn check_against_an_unreachable_database_fails_in_seconds() {
    let started = Instant::now();
    let output = run_binary(
        &[
            "check",
            "--database-url",
            "postgres://postgres@127.0.0.1:1/x",
        ],
        &[],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("cannot reach Postgres"), "{stderr}");
    // The worker's own patience (postgres.connect_retry_secs, 60 s) is not a check's.
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
}
