//! Postgres over TLS with `verify-full`: the worker binary against a cluster the test
//! starts itself (`initdb`, `ssl=on`), whose pg_hba accepts only TLS connections that
//! present a client certificate naming the user.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};

use crate::helpers::{
    Landed, Reaped, TestKafka, final_error, run_to_exit, stored_total, terminate, valid_messages,
    wait_for, worker_command_for,
};
use crate::pki::{Ca, PemDir};

/// A throwaway Postgres cluster serving TLS on 127.0.0.1, stopped when dropped.
struct TlsCluster {
    port: u16,
    server: Reaped,
    /// The cluster's directory (data, socket, server certificate); owned by the
    /// `postgres` account when the tests run as root, since Postgres refuses to.
    _dir: PemDir,
}

/// Where `initdb` and `postgres` live: on `PATH`, or Debian's versioned directory.
fn server_binary(name: &str) -> PathBuf {
    let on_path = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    if let Some(path) = on_path {
        return path;
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("the PostgreSQL server is installed (scripts/setup)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin").join(name)))
        .filter(|p| p.exists())
        .collect();
    versions.sort();
    versions.pop().expect("a PostgreSQL server binary")
}

/// The `postgres` account's uid and gid, when this process is root: Postgres refuses to
/// run as root, so the cluster is made and run as that account.
fn server_account() -> Option<(u32, u32)> {
    if !std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0) {
        return None;
    }
    let id = |flag: &str| {
        let out = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .expect("id runs");
        assert!(out.status.success(), "a postgres account exists");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<u32>()
            .expect("numeric id")
    };
    Some((id("-u"), id("-g")))
}

/// A server program, run as `account` (see [`server_account`]) when there is one.
fn server_command(name: &str, account: Option<(u32, u32)>) -> Command {
    use std::os::unix::process::CommandExt;
    let mut command = Command::new(server_binary(name));
    if let Some((uid, gid)) = account {
        command.uid(uid).gid(gid);
    }
    command
}

impl TlsCluster {
    /// Starts a cluster whose server certificate names only `localhost`, signed by `ca`,
    /// which also signs the client certificates it accepts.
    fn start(ca: &Ca) -> Self {
        let dir = PemDir::new();
        let server = ca.server(&["localhost"]);
        let cert = dir.write("server.crt", &server.cert);
        let key = dir.write("server.key", &server.key);
        let client_ca = dir.write("client-ca.pem", &ca.pem);
        let data = dir.path.join("data");
        let account = server_account();
        if let Some((uid, gid)) = account {
            let status = Command::new("chown")
                .args(["-R", &format!("{uid}:{gid}")])
                .arg(&dir.path)
                .status()
                .expect("chown runs");
            assert!(
                status.success(),
                "the cluster directory is handed to postgres"
            );
        }
        let initdb = server_command("initdb", account)
            .args(["--auth=trust", "--username=postgres", "--no-sync", "-D"])
            .arg(&data)
            .output()
            .expect("initdb runs");
        assert!(initdb.status.success(), "initdb: {initdb:?}");
        // TLS only, and only with a client certificate whose name is the user's.
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust clientcert=verify-full\n",
        )
        .expect("pg_hba.conf written");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let settings = [
            "listen_addresses=127.0.0.1".to_owned(),
            format!("port={port}"),
            format!("unix_socket_directories={}", dir.path.display()),
            "ssl=on".to_owned(),
            format!("ssl_cert_file={}", cert.display()),
            format!("ssl_key_file={}", key.display()),
            format!("ssl_ca_file={}", client_ca.display()),
            "fsync=off".to_owned(),
        ];
        let mut command = server_command("postgres", account);
        command.arg("-D").arg(&data);
        for setting in settings {
            command.args(["-c", &setting]);
        }
        let server = Reaped(
            command
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("postgres starts"),
        );
        Self {
            port,
            server,
            _dir: dir,
        }
    }

    /// Connect options for `host` with verify-full, the CA and a client certificate.
    fn options(&self, host: &str, tls: &TlsFiles) -> PgConnectOptions {
        PgConnectOptions::new()
            .host(host)
            .port(self.port)
            .username("postgres")
            .database("postgres")
            .ssl_mode(PgSslMode::VerifyFull)
            .ssl_root_cert(&tls.root)
            .ssl_client_cert(&tls.cert)
            .ssl_client_key(&tls.key)
    }

    /// The worker binary for `kafka`, reaching this cluster at `host` with verify-full.
    fn worker(&self, kafka: &TestKafka, host: &str, tls: &TlsFiles) -> Command {
        let url = format!("postgres://postgres@{host}:{}/postgres", self.port);
        let mut command = worker_command_for(&kafka.brokers, &kafka.topic, &kafka.group, &url);
        command.envs(tls.env());
        command
    }

    /// A pool over TLS once the server accepts connections.
    async fn pool(&self, tls: &TlsFiles) -> sqlx::PgPool {
        let options = self.options("localhost", tls);
        for _ in 0..100 {
            if options.connect().await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        PgPoolOptions::new()
            .max_connections(2)
            .connect_with(options)
            .await
            .expect("the test cluster accepts a verify-full connection")
    }
}

impl Drop for TlsCluster {
    fn drop(&mut self) {
        // SIGINT: Postgres' fast shutdown; one still running after it is killed by
        // `Reaped`, so no server outlives the test.
        if self.server.signal("INT").is_ok() {
            for _ in 0..100 {
                if self.server.exited() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// The client's side: the CA it trusts and its certificate (CN = postgres).
struct TlsFiles {
    root: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    _dir: PemDir,
}

impl TlsFiles {
    fn new(ca: &Ca) -> Self {
        let dir = PemDir::new();
        let client = ca.client("postgres");
        Self {
            root: dir.write("root.crt", &ca.pem),
            cert: dir.write("client.crt", &client.cert),
            key: dir.write("client.key", &client.key),
            _dir: dir,
        }
    }

    /// The worker's environment for verify-full with these files.
    fn env(&self) -> Vec<(String, String)> {
        [
            ("SSLMODE", "verify-full".to_owned()),
            ("SSLROOTCERT", self.root.display().to_string()),
            ("SSLCERT", self.cert.display().to_string()),
            ("SSLKEY", self.key.display().to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (format!("KAFKA_PG_INGEST__POSTGRES__{k}"), v))
        .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_over_verify_full_tls_with_a_client_certificate_lands_exactly_once() {
    let ca = Ca::new("postgres test CA");
    let cluster = TlsCluster::start(&ca);
    let tls = TlsFiles::new(&ca);
    let pool = cluster.pool(&tls).await;
    // Migrated first, so the test can read the offsets while the worker starts.
    kafka_pg_ingest::store::migrate(&pool, &crate::helpers::default_routes())
        .await
        .expect("migrations apply");
    let kafka = TestKafka::new(2);
    kafka.produce(valid_messages(0, 200));

    let mut command = cluster.worker(&kafka, "localhost", &tls);
    let mut worker = Reaped(command.spawn().expect("worker starts"));
    let (p, group, topic) = (pool.clone(), kafka.group.clone(), kafka.topic.clone());
    wait_for("every record over TLS", Duration::from_secs(90), || {
        let (p, group, topic) = (p.clone(), group.clone(), topic.clone());
        async move { stored_total(&p, &group, &topic).await == 200 }
    })
    .await;
    // pg_hba admits only TLS; this shows the sessions are the worker's own.
    let tls_sessions: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
         WHERE a.application_name LIKE 'kafka-pg-ingest %' AND s.ssl",
    )
    .fetch_one(&pool)
    .await
    .expect("sessions");
    assert!(terminate(&mut worker).success(), "the worker stops cleanly");

    assert!(tls_sessions >= 1, "the worker's sessions use TLS");
    Landed::read(&pool, &kafka.topic)
        .await
        .assert_exactly_once(200, 0);
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_verify_full_to_a_host_the_certificate_does_not_name_fails_at_once_with_a_clear_message()
 {
    let ca = Ca::new("postgres test CA");
    let cluster = TlsCluster::start(&ca);
    let tls = TlsFiles::new(&ca);
    let pool = cluster.pool(&tls).await;
    let kafka = TestKafka::new(1);
    kafka.produce(valid_messages(0, 10));

    // 127.0.0.1 reaches the same server, but its certificate names only localhost.
    let mut command = cluster.worker(&kafka, "127.0.0.1", &tls);
    command
        // Long enough that a retried certificate error would outlast the bounded wait.
        .env("KAFKA_PG_INGEST__POSTGRES__CONNECT_RETRY_SECS", "600");
    let (status, stderr) = run_to_exit(command).await;
    assert!(!status.success(), "a certificate for another host is fatal");
    assert!(
        final_error(&stderr).contains("not valid for name")
            && final_error(&stderr).contains("postgres.sslrootcert"),
        "the error says what failed and which keys to check: {stderr}"
    );
    let schemas: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_namespace WHERE nspname = 'ingest'")
            .fetch_one(&pool)
            .await
            .expect("schema count");
    assert_eq!(
        schemas, 0,
        "nothing was written through the refused connection"
    );
    pool.close().await;
}
