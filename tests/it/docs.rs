//! The shell examples of README.md and docs/, run as written: each test walks one block
//! (or a page's blocks in order) against its own database and its own `dev broker`, then
//! checks what Postgres holds. A block that no test walks fails
//! `every_shell_block_of_the_docs_is_walked_by_a_test_or_named_unrunnable`, so an example
//! cannot be added, or changed out from under its test, unnoticed.
//!
//! How a line runs: `cargo run --` is the built binary, and so is `kafka-pg-ingest` (on
//! `PATH`); the example addresses the docs show (`127.0.0.1:39617`, the `dev registry`
//! URL, the database URL) become the ones this test's processes printed; `export` sets the
//! environment of the lines after it; a line ending in `&` runs in the background. A
//! worker (`run`) runs until the stored offsets reach every record produced and every
//! replay is done (what a reader waits for), then gets SIGTERM and must exit 0.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use sqlx::PgPool;

use crate::helpers::*;
use crate::pages::{code_blocks, pages};
use crate::routes::{Msg, send_to};

/// Addresses the docs show as examples of what `dev broker` and `dev registry` print.
const EXAMPLE_BROKERS: &str = "127.0.0.1:39617";
const EXAMPLE_REGISTRY: &str = "http://127.0.0.1:40213";
/// The database URL the docs export.
const EXAMPLE_DATABASE: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// The password file the security page names.
const EXAMPLE_SECRET: &str = "/run/secrets/kafka-password";

/// Blocks that need what no test machine has, and what checks them instead.
const UNRUNNABLE: [(&str, &str, &str); 2] = [
    (
        "docs/operations.md",
        "docker compose -f deploy/compose.yaml up --build",
        "no Docker engine: the deploy tests parse deploy/compose.yaml and check its worker",
    ),
    (
        "docs/operations.md",
        "kubectl create secret generic kafka-pg-ingest-db",
        "no Kubernetes cluster: the deploy tests read the manifests",
    ),
];

/// The blocks the tests below walk: page and first line.
const WALKED: [(&str, &str); 10] = [
    ("README.md", "scripts/demo"),
    ("docs/operations.md", TRY_WITHOUT_KAFKA),
    ("docs/operations.md", DEAD_LETTER_WALKTHROUGH),
    ("docs/mapping.md", ORDERS),
    ("docs/mapping.md", TRY_WITHOUT_KAFKA),
    ("docs/mapping.md", CUSTOMERS),
    ("docs/security.md", SASL),
    ("docs/security.md", OWNER_MIGRATES),
    ("docs/security.md", OWNER_GRANTS),
    ("docs/security.md", WORKER_RUNS),
];
const TRY_WITHOUT_KAFKA: &str = "cargo run -- dev broker --topic website-metrics &";
const DEAD_LETTER_WALKTHROUGH: &str =
    "export DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres KAFKA_BROKERS=127.0.0.1:39617";
const ORDERS: &str =
    "kafka-pg-ingest schema --config examples/routes/orders.yaml | psql \"$DATABASE_URL\"";
const CUSTOMERS: &str =
    "kafka-pg-ingest schema --config examples/routes/customers.yaml | psql \"$DATABASE_URL\"";
const SASL: &str = "export KAFKA_PG_INGEST__KAFKA__SECURITY_PROTOCOL=sasl_ssl";
const OWNER_MIGRATES: &str = "kafka-pg-ingest migrate --database-url \"$OWNER_DATABASE_URL\"";
const OWNER_GRANTS: &str = "psql -v ON_ERROR_STOP=1 -v worker=kafka_pg_ingest -f deploy/grants.sql";
const WORKER_RUNS: &str = "DATABASE_URL=postgres://kafka_pg_ingest:...@db:5432/ingest";

/// A fenced shell block (```sh) of a page.
#[derive(Debug)]
struct Block {
    page: String,
    line: usize,
    commands: Vec<String>,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn shell_blocks() -> Vec<Block> {
    pages()
        .into_iter()
        .flat_map(|(page, text)| {
            code_blocks(&text)
                .0
                .into_iter()
                .filter(|b| b.info == "sh")
                .map(move |b| Block {
                    page: page.clone(),
                    line: b.line,
                    commands: b.lines,
                })
        })
        .collect()
}

/// The commands of the block of `page` whose first line starts with `first`.
fn block(page: &str, first: &str) -> Vec<String> {
    let mut found: Vec<Block> = shell_blocks()
        .into_iter()
        .filter(|b| b.page == page && b.commands.first().is_some_and(|c| c.starts_with(first)))
        .collect();
    assert_eq!(found.len(), 1, "{page}: one block starting `{first}`");
    found.remove(0).commands
}

/// `command` split after its leading `NAME=value` words: those words, then the rest.
fn assignments(command: &str) -> (&str, &str) {
    let mut rest = command.trim_start();
    while let Some((word, tail)) = rest.split_once(' ') {
        if !word.contains('=') || word.starts_with('-') {
            break;
        }
        rest = tail.trim_start();
    }
    (&command[..command.len() - rest.len()], rest)
}

/// What a `run` line is: the binary, then `run` or only flags.
fn is_worker(command: &str) -> bool {
    let mut words = assignments(command).1.split_whitespace();
    words.next() == Some("kafka-pg-ingest")
        && words.next().is_none_or(|w| {
            w == "run" || (w.starts_with("--") && !["--help", "--version"].contains(&w))
        })
}

/// How long a line in the foreground may take (a `--wait` or a `demo` included).
const LINE_LIMIT: Duration = Duration::from_secs(180);

/// A shell session following the docs: the environment so far, the processes left
/// running, and what was produced (per topic: valid and malformed records).
struct Shell {
    pool: PgPool,
    /// Logs, the `PATH` entry and the secret file; removed with the session.
    dir: PathBuf,
    env: BTreeMap<String, String>,
    examples: Vec<(String, String)>,
    workers: Vec<(Reaped, PathBuf)>,
    services: Vec<Reaped>,
    produced: BTreeMap<String, (i64, i64)>,
}

impl Shell {
    fn new(db: &TestDb) -> Self {
        let dir = std::env::temp_dir().join(format!("kpi-docs-{}", uuid::Uuid::new_v4().simple()));
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).expect("bin dir");
        std::os::unix::fs::symlink(BINARY, bin.join("kafka-pg-ingest")).expect("binary on PATH");
        let mut env: BTreeMap<String, String> = std::env::vars()
            .filter(|(k, _)| !k.starts_with("KAFKA_PG_INGEST__") && k != "KAFKA_BROKERS")
            .collect();
        let path = format!(
            "{}:{}",
            bin.display(),
            env.get("PATH").cloned().unwrap_or_default()
        );
        env.insert("PATH".into(), path);
        env.insert("DATABASE_URL".into(), db.url.clone());
        env.insert("RUST_LOG".into(), "info,librdkafka=warn".into());
        let secret = dir.join("kafka-password");
        std::fs::write(&secret, "walkthrough-secret\n").expect("secret file");
        // A script piped into psql exits 0 after a failed statement unless told to stop.
        let psqlrc = dir.join("psqlrc");
        std::fs::write(&psqlrc, "\\set ON_ERROR_STOP on\n").expect("psqlrc");
        env.insert("PSQLRC".into(), psqlrc.display().to_string());
        Self {
            pool: db.pool.clone(),
            examples: vec![
                (EXAMPLE_DATABASE.into(), db.url.clone()),
                (EXAMPLE_SECRET.into(), secret.display().to_string()),
            ],
            dir,
            env,
            workers: Vec::new(),
            services: Vec::new(),
            produced: BTreeMap::new(),
        }
    }

    /// `line` as this session runs it.
    fn rewrite(&self, line: &str) -> String {
        let mut line = line
            .replace("cargo run --release -- ", "kafka-pg-ingest ")
            .replace("cargo run -- ", "kafka-pg-ingest ");
        for (example, real) in &self.examples {
            line = line.replace(example, real);
        }
        // An example this session has no real value for would reach the shared server
        // or nothing: a line must not run with one.
        for example in [
            EXAMPLE_BROKERS,
            EXAMPLE_REGISTRY,
            EXAMPLE_DATABASE,
            "cargo run",
        ] {
            assert!(!line.contains(example), "`{line}` still holds `{example}`");
        }
        line
    }

    fn command(&self, line: &str) -> Command {
        let mut command = Command::new("bash");
        command
            .args(["-c", &format!("set -o pipefail; {line}")])
            .current_dir(root())
            .env_clear()
            .envs(&self.env)
            .stdin(Stdio::null());
        command
    }

    /// Runs one line of a block as a reader would; hands back what it printed.
    async fn run(&mut self, line: &str) -> String {
        let line = self.rewrite(line);
        if let Some(exports) = line.strip_prefix("export ") {
            // The shell itself expands and unquotes; its environment afterwards is ours.
            let out = self
                .command(&format!("export {exports} && env -0"))
                .output()
                .expect("bash runs");
            assert!(out.status.success(), "`{line}` failed");
            self.env = out
                .stdout
                .split(|b| *b == 0)
                .filter_map(|kv| {
                    let kv = String::from_utf8_lossy(kv);
                    let (k, v) = kv.split_once('=')?;
                    Some((k.to_owned(), v.to_owned()))
                })
                .collect();
            return String::new();
        }
        let background = line.strip_suffix('&').map(str::trim_end);
        let command = background.unwrap_or(&line);
        if is_worker(command) {
            self.start_worker(command);
            self.caught_up().await;
            if background.is_none() {
                self.stop_workers();
            }
            return String::new();
        }
        if let Some(command) = background {
            self.start_service(command);
            return String::new();
        }
        let (status, stdout, stderr) = self.within_limit(&line).await;
        assert!(
            status.success(),
            "`{line}` exited {status}:\n{stdout}\n{stderr}"
        );
        if line.contains(" dev produce ") {
            self.count_produced(&line, &stdout);
        }
        stdout
    }

    /// Runs every line of the block of `page` starting with `first`.
    async fn walk(&mut self, page: &str, first: &str) {
        for line in block(page, first) {
            self.run(&line).await;
        }
    }

    /// Runs `line` in the foreground; what it printed. A line still running after
    /// [`LINE_LIMIT`] fails the test.
    async fn within_limit(&self, line: &str) -> (std::process::ExitStatus, String, String) {
        use std::os::unix::process::CommandExt;
        // A group of its own: a line out of time is killed with every process it started.
        let mut child = Reaped(
            self.command(line)
                .process_group(0)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("bash runs"),
        );
        let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let _ = tx.send(pipe.map(std::io::read_to_string).and_then(Result::ok));
            });
            rx
        };
        let out = drain(child.stdout.take().map(|p| Box::new(p) as _));
        let err = drain(child.stderr.take().map(|p| Box::new(p) as _));
        let started = std::time::Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for the line") {
                break status;
            }
            if started.elapsed() >= LINE_LIMIT {
                let group = format!("-{}", child.id());
                let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
                panic!("`{line}` still ran after {LINE_LIMIT:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        // A process the line left behind may hold its output open: not past the limit.
        let text = |rx: std::sync::mpsc::Receiver<Option<String>>| {
            let left = LINE_LIMIT.saturating_sub(started.elapsed());
            rx.recv_timeout(left).ok().flatten().unwrap_or_default()
        };
        (status, text(out), text(err))
    }

    /// Adds what a `dev produce` line printed.
    fn count_produced(&mut self, line: &str, stdout: &str) {
        let topic = line
            .split_whitespace()
            .skip_while(|w| *w != "--topic")
            .nth(1)
            .unwrap_or("website-metrics")
            .to_owned();
        let (valid, malformed) = produced_counts(stdout);
        let entry = self.produced.entry(topic).or_default();
        entry.0 += valid;
        entry.1 += malformed;
    }

    /// A `dev broker` or `dev registry` in the background: what it prints first replaces
    /// the docs' example address in later lines.
    fn start_service(&mut self, command: &str) {
        let mut child = Reaped(
            self.command(&exec_form(command))
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("service starts"),
        );
        let address = first_line(&mut child);
        assert!(!address.is_empty(), "`{command}` printed no address");
        let example = if command.contains(" dev registry") {
            EXAMPLE_REGISTRY
        } else if command.contains(" dev broker") {
            EXAMPLE_BROKERS
        } else {
            panic!("no test knows what `{command}` in the background prints")
        };
        self.examples.push((example.into(), address));
        self.services.push(child);
    }

    fn start_worker(&mut self, command: &str) {
        let log = self.dir.join(format!("worker-{}.log", self.workers.len()));
        let file = std::fs::File::create(&log).expect("log file");
        let child = self
            .command(&exec_form(command))
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("worker starts");
        self.workers.push((Reaped(child), log));
    }

    /// Waits until the stored offsets of every topic add up to what was produced to it
    /// and no partition is still replaying; a worker that exits meanwhile fails the test.
    async fn caught_up(&mut self) {
        assert!(
            !self.produced.is_empty(),
            "a worker runs before anything was produced: nothing to wait for"
        );
        for _ in 0..1200 {
            let mut done = true;
            for (topic, (valid, malformed)) in &self.produced {
                let (stored, replaying): (i64, i64) = sqlx::query_as(
                    "SELECT coalesce(sum(next_offset), 0)::int8, count(replay_until) \
                     FROM ingest.offsets WHERE topic = $1",
                )
                .bind(topic)
                .fetch_one(&self.pool)
                .await
                .unwrap_or((-1, -1));
                done &= stored == valid + malformed && replaying == 0;
            }
            if done {
                return;
            }
            for (worker, log) in &mut self.workers {
                if let Ok(Some(status)) = worker.try_wait() {
                    panic!("a worker exited ({status}):\n{}", read(log));
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let logs: Vec<String> = self.workers.iter().map(|(_, log)| read(log)).collect();
        panic!(
            "not caught up in 120 s: {:?}\n{}",
            self.produced,
            logs.join("\n")
        );
    }

    /// SIGTERM to every worker: each must exit 0 (its partitions released).
    fn stop_workers(&mut self) {
        for (mut worker, log) in self.workers.drain(..) {
            let status = terminate(&mut worker);
            assert!(
                status.success(),
                "the worker exited {status}:\n{}",
                read(&log)
            );
        }
    }

    /// The reader's last step: wait for the workers, stop them and the services.
    async fn finish(&mut self) {
        self.caught_up().await;
        self.stop_workers();
        for mut service in self.services.drain(..) {
            assert!(
                terminate(&mut service).success(),
                "services stop on SIGTERM"
            );
        }
    }

    /// A broker for a page that assumes one: `KAFKA_BROKERS` names it.
    fn broker(&mut self, topic: &str) {
        self.start_service(&format!("kafka-pg-ingest dev broker --topic {topic}"));
        let brokers = self.rewrite(EXAMPLE_BROKERS);
        self.env.insert("KAFKA_BROKERS".into(), brokers);
    }

    /// Records the test itself produces (for pages that leave producing to the reader).
    fn produce(&mut self, topic: &str, msgs: &[Msg]) {
        let brokers = self.env["KAFKA_BROKERS"].clone();
        send_to(&brokers, topic, msgs);
        self.produced.entry(topic.to_owned()).or_default().0 += msgs.len() as i64;
    }
}

impl Drop for Shell {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `command` run by `exec`, so that the process the test signals is the program itself;
/// leading `NAME=value` words stay in front of it.
fn exec_form(command: &str) -> String {
    let (assignments, rest) = assignments(command);
    format!("{assignments}exec {rest}")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn every_shell_block_of_the_docs_is_walked_by_a_test_or_named_unrunnable() {
    // A runnable block under another label would escape the walk: shell is ```sh, and
    // an unlabelled block holds output or a usage synopsis, never a command to run.
    for (page, text) in pages() {
        assert!(
            !text.lines().any(|l| l.trim_start().starts_with("~~~")),
            "{page}: fence code with ```"
        );
        for b in code_blocks(&text).0 {
            assert!(
                ![
                    "bash",
                    "shell",
                    "console",
                    "zsh",
                    "sh-session",
                    "shell-session"
                ]
                .contains(&b.info.as_str()),
                "{page}:{}: label the block ```sh",
                b.line
            );
            let runnable = b.lines.first().is_some_and(|l| {
                ["kafka-pg-ingest ", "cargo ", "psql ", "scripts/", "export "]
                    .iter()
                    .any(|p| l.starts_with(p))
                    // A usage synopsis: `[--flag]`, `NAME...`.
                    && !l.contains(" [")
                    && !l.contains("...")
            });
            assert!(
                !(b.info.is_empty() && runnable),
                "{page}:{}: a command in an unlabelled block: label it ```sh",
                b.line
            );
        }
    }
    let blocks = shell_blocks();
    let known = |page: &str, first: &str| {
        WALKED
            .iter()
            .map(|(p, f)| (*p, *f))
            .chain(UNRUNNABLE.iter().map(|(p, f, _)| (*p, *f)))
            .any(|(p, f)| p == page && first.starts_with(f))
    };
    for b in &blocks {
        let first = b.commands.first().map(String::as_str).unwrap_or_default();
        assert!(
            known(&b.page, first),
            "{}:{}: no test walks the block starting `{first}`: add it to WALKED and a test",
            b.page,
            b.line
        );
    }
    for (page, first) in WALKED
        .iter()
        .copied()
        .chain(UNRUNNABLE.iter().map(|(p, f, _)| (*p, *f)))
    {
        let found = blocks
            .iter()
            .filter(|b| b.page == page && b.commands[0].starts_with(first))
            .count();
        assert_eq!(found, 1, "{page}: one block starts `{first}`");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_demo_lands_what_it_reports() {
    let db = TestDb::empty().await;
    let mut shell = Shell::new(&db);
    let commands = block("README.md", "scripts/demo");
    // `scripts/test` is the command running this test (CI runs it); `scripts/demo` is
    // setup, then the `demo` command, which runs here with the built binary.
    assert_eq!(commands, ["scripts/demo", "scripts/test"]);
    let script = std::fs::read_to_string(root().join("scripts/demo")).expect("scripts/demo");
    assert!(
        script
            .trim_end()
            .ends_with("cargo run --locked -- demo \"$@\""),
        "{script}"
    );
    let report = shell.run("cargo run -- demo").await;
    let number = |prefix: &str| -> i64 {
        let line = report.lines().find(|l| l.starts_with(prefix));
        line.and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no `{prefix}` in:\n{report}"))
    };
    let (rows, dead) = (
        number("rows in web_metrics.metrics:"),
        number("dead letters in ingest.dead_letters:"),
    );
    let topic = report
        .split_whitespace()
        .nth(1)
        .and_then(|t| t.strip_suffix(':'))
        .expect("topic in the report")
        .to_owned();
    let produced: i64 = report
        .split_whitespace()
        .nth(2)
        .and_then(|n| n.parse().ok())
        .expect("messages produced");
    assert!(rows > 0 && dead > 0, "{report}");
    assert_eq!(rows + dead, produced, "{report}");
    Landed::read(&db.pool, &topic)
        .await
        .assert_exactly_once(rows, dead);
    db.drop().await;
}

/// operations.md in order: "Trying the worker without Kafka", then the dead-letter
/// walkthrough on the same broker and database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operations_pages_blocks_run_in_order_and_land_every_record_once() {
    let db = TestDb::empty().await;
    let mut shell = Shell::new(&db);
    shell.walk("docs/operations.md", TRY_WITHOUT_KAFKA).await;
    let (valid, malformed) = shell.produced["website-metrics"];
    assert_eq!(valid + malformed, 10_000);
    Landed::read(&db.pool, "website-metrics")
        .await
        .assert_exactly_once(valid, malformed);

    let mut rejected = 0;
    let mut retried = String::new();
    let mut before_replay = None;
    for line in block("docs/operations.md", DEAD_LETTER_WALKTHROUGH) {
        if line.contains(" --wait") {
            before_replay = Some(scalar(&db.pool, "SELECT max(id) FROM web_metrics.metrics").await);
        }
        let out = shell.run(&line).await;
        if line.contains("dlq list --reason db_rejected") && !line.contains("dlq show") {
            rejected = scalar(
                &db.pool,
                "SELECT count(*) FROM ingest.dead_letters WHERE reason_code = 'db_rejected'",
            )
            .await;
            assert!(rejected > 0, "the constraint rejected the 503s");
            assert!(out.contains("db_rejected"), "{out}");
        }
        if line.contains(" dlq show ") {
            assert!(out.contains("sqlstate:        23514"), "{out}");
        }
        if line.contains(" dlq retry ") {
            retried = out;
        }
        if line.contains(" --wait") {
            let replaying =
                scalar(&db.pool, "SELECT count(replay_until) FROM ingest.offsets").await;
            assert_eq!(replaying, 0, "--wait returns once the replay is done");
        }
    }
    // The rewind to a time before every record replaced each row with its re-read.
    let kept: i64 = sqlx::query_scalar("SELECT count(*) FROM web_metrics.metrics WHERE id <= $1")
        .bind(before_replay.expect("the walkthrough rewinds with --wait"))
        .fetch_one(&db.pool)
        .await
        .expect("count");
    assert_eq!(kept, 0, "every row was written again by the replay");
    assert_eq!(
        retried.trim(),
        format!("{rejected} moved into web_metrics.metrics, 0 still failing")
    );
    shell.finish().await;
    // The replay of the rewind re-read every record: still each once, the malformed ones
    // dead letters again and the 503s rows.
    let (valid, malformed) = shell.produced["website-metrics"];
    assert_eq!(valid + malformed, 11_000);
    let landed = Landed::read(&db.pool, "website-metrics").await;
    // Both `dev produce` runs write comments from the same sequence: only the
    // coordinates tell records apart here.
    assert_eq!(
        (
            landed.rows,
            landed.distinct_coordinates,
            landed.dead_letters,
            landed.distinct_dead_offsets
        ),
        (valid, valid, malformed, malformed),
        "{landed:?}"
    );
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_walkthrough_lands_protobuf_records_once() {
    let db = TestDb::empty().await;
    let mut shell = Shell::new(&db);
    shell.walk("docs/mapping.md", TRY_WITHOUT_KAFKA).await;
    shell.finish().await;
    let (valid, malformed) = shell.produced["website-metrics"];
    assert_eq!(valid + malformed, 10_000);
    assert!(malformed > 0);
    Landed::read(&db.pool, "website-metrics")
        .await
        .assert_exactly_once(valid, malformed);
    // The produced values were framed Protobuf: the framing and the schema failures
    // are among the dead letters, the rest decoded.
    for reason in ["bad_protobuf", "not_framed"] {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM ingest.dead_letters WHERE reason_code = $1")
                .bind(reason)
                .fetch_one(&db.pool)
                .await
                .expect("count");
        assert!(n > 0, "{reason} dead letters");
    }
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_orders_example_upserts_each_orders_latest_version_and_deletes_tombstoned_ones() {
    let db = TestDb::empty().await;
    let mut shell = Shell::new(&db);
    shell.broker("shop.orders");
    let order = |id: &str, status: &str, total: &str| {
        Msg {
        key: Some(id.as_bytes().to_vec()),
        value: Some(
            format!(
                r#"{{"customer":{{"id":7}},"status":"{status}","amount":{{"total":"{total}","currency":"USD"}},"placed_at":1764806400000}}"#
            )
            .into_bytes(),
        ),
        headers: vec![("tenant".into(), b"acme".to_vec())],
        ..Msg::default()
    }
    };
    shell.produce(
        "shop.orders",
        &[
            order("1042", "placed", "99.90"),
            order("1043", "placed", "5"),
            order("1042", "shipped", "99.90"),
            Msg {
                key: Some(b"1043".to_vec()),
                ..Msg::default()
            },
        ],
    );
    shell.walk("docs/mapping.md", ORDERS).await;
    shell.finish().await;
    let orders: Vec<(i64, String, String, String)> = sqlx::query_as(
        "SELECT order_id, status, total::text, tenant FROM shop.orders ORDER BY order_id",
    )
    .fetch_all(&db.pool)
    .await
    .expect("orders");
    assert_eq!(
        orders,
        [(1042, "shipped".into(), "99.90".into(), "acme".into())],
        "order 1042's latest version; 1043 deleted by its tombstone"
    );
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_debezium_example_mirrors_the_fixtures_source_table() {
    let db = TestDb::empty().await;
    let mut shell = Shell::new(&db);
    let topic = "dbserver1.inventory.customers";
    shell.broker(topic);
    shell.produce(topic, &crate::debezium::fixture("debezium-postgres.jsonl"));
    shell.walk("docs/mapping.md", CUSTOMERS).await;
    shell.finish().await;
    let rows: Vec<(i32, String, Option<String>)> =
        sqlx::query_as("SELECT id, first_name, balance::text FROM mirror.customers ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .expect("mirror");
    // The source table after the fixture's stream (see tests/it/debezium.rs): the
    // truncate removed 901 and 902, 1002 was deleted.
    assert_eq!(
        rows,
        [
            (1001, "Sally".into(), Some("-99999999.99".into())),
            (1003, "Ed".into(), Some("10.10".into())),
            (1004, "Anne".into(), Some("9999999999.99".into())),
            (1005, "Carl".into(), Some("42.00".into())),
        ]
    );
    let letters = scalar(&db.pool, "SELECT count(*) FROM ingest.dead_letters").await;
    assert_eq!(letters, 0);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sasl_settings_the_security_page_exports_are_a_valid_configuration() {
    let db = TestDb::empty().await;
    let mut shell = Shell::new(&db);
    shell.walk("docs/security.md", SASL).await;
    // The page only sets variables: the configuration they make must load, secret masked.
    let shown = shell.run("kafka-pg-ingest config --origin").await;
    for expected in [
        "security_protocol: sasl_ssl",
        "mechanism: SCRAM-SHA-512",
        "username: ingest",
    ] {
        assert!(shown.contains(expected), "{expected} in:\n{shown}");
    }
    assert!(!shown.contains("walkthrough-secret"), "{shown}");
    db.drop().await;
}

/// security.md's least-privilege setup, steps 1 to 4: the owner migrates, a login role
/// (step 2, SQL, run here) gets the grants of `deploy/grants.sql`, and the worker runs as
/// that role without migrating.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_least_privilege_setup_runs_a_worker_that_lands_every_record_once() {
    let db = TestDb::empty().await;
    let mut shell = Shell::new(&db);
    shell
        .env
        .insert("OWNER_DATABASE_URL".into(), db.url.clone());
    shell.walk("docs/security.md", OWNER_MIGRATES).await;
    let role = crate::privileges::WorkerRole::login(&db).await;
    shell.examples.push((
        "worker=kafka_pg_ingest".into(),
        format!("worker={}", role.name),
    ));
    shell.examples.push((
        "postgres://kafka_pg_ingest:...@db:5432/ingest".into(),
        role.url(&db),
    ));
    shell.walk("docs/security.md", OWNER_GRANTS).await;
    shell.broker("website-metrics");
    let msgs: Vec<Msg> = valid_messages(0, 500)
        .into_iter()
        .map(|value| Msg {
            value,
            ..Msg::default()
        })
        .collect();
    shell.produce("website-metrics", &msgs);
    shell.walk("docs/security.md", WORKER_RUNS).await;
    shell.finish().await;
    Landed::read(&db.pool, "website-metrics")
        .await
        .assert_exactly_once(500, 0);
    role.drop(&db).await;
    db.drop().await;
}

#[test]
fn a_blocks_comments_are_cut_only_outside_quotes_and_escapes() {
    let page = "```sh\n\
        kafka-pg-ingest run   # a comment\n\
        psql -c \"SELECT 1 # inside quotes\"  # outside\n\
        echo it\\'s \\# not one # but this is\n\
        curl http://h/#fragment\n\
        # a whole line\n\
        kafka-pg-ingest dev produce \\\n  --count 5   # continued\n\
        ```\n";
    let (blocks, _) = code_blocks(page);
    assert_eq!(
        blocks[0].lines,
        [
            "kafka-pg-ingest run",
            "psql -c \"SELECT 1 # inside quotes\"",
            "echo it\\'s \\# not one",
            "curl http://h/#fragment",
            "kafka-pg-ingest dev produce   --count 5",
        ]
    );
}
