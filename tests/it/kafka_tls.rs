//! Kafka over mutual TLS: the worker binary against a broker that accepts only TLS
//! connections carrying a client certificate its CA signed.
//!
//! The broker is librdkafka's mock cluster behind a TLS front the test starts: the front
//! terminates TLS (requiring and verifying the client certificate) and forwards the
//! plaintext to the mock's listener, and the mock advertises the front's address in its
//! metadata, so every connection the worker makes goes through the front.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rustls::pki_types::{PrivateKeyDer, pem::PemObject};
use rustls::server::WebPkiClientVerifier;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::helpers::{
    Landed, Reaped, TestDb, final_error, run_to_exit, stored_group_total, stored_total, terminate,
    valid_messages, wait_for, worker_command_for,
};
use crate::pki::{Ca, PemDir, certs};

/// A TLS-only broker: the mock cluster, reachable only through a mutual-TLS front.
struct TlsBroker {
    /// Owns the mock cluster (created with `test.mock.num.brokers`).
    _host: BaseProducer,
    front: TlsFront,
    topic: String,
    group: String,
}

impl TlsBroker {
    /// Starts the broker with `records` already on a fresh topic of `partitions`. Its
    /// server certificate (for 127.0.0.1) and the client CA it trusts both come from `ca`.
    async fn start(ca: &Ca, pem: &PemDir, partitions: i32, records: Vec<Vec<u8>>) -> Self {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let topic = format!("tls-{}", &suffix[..12]);
        let host: BaseProducer = ClientConfig::new()
            .set("test.mock.num.brokers", "1")
            .set("linger.ms", "5")
            .create()
            .expect("mock cluster starts");
        let plaintext = {
            let cluster = host.client().mock_cluster().expect("a mock cluster");
            cluster
                .create_topic(&topic, partitions, 1)
                .expect("topic created");
            cluster.bootstrap_servers()
        };
        // Produced in plaintext, before the mock advertises the TLS front.
        let count = records.len();
        for (i, payload) in records.iter().enumerate() {
            let partition = i as i32 % partitions;
            host.send(
                BaseRecord::<(), _>::to(&topic)
                    .payload(payload)
                    .partition(partition),
            )
            .expect("record queued");
        }
        host.flush(Duration::from_secs(30))
            .expect("records acknowledged");
        assert!(count > 0, "a test broker holds records");

        let server = ca.server(&["127.0.0.1", "localhost"]);
        let front = TlsFront::start(
            &pem.write("broker.pem", &server.cert),
            &pem.write("broker.key", &server.key),
            &pem.write("client-ca.pem", &ca.pem),
            plaintext.clone(),
        )
        .await;
        let host_name = std::ffi::CString::new("127.0.0.1").expect("no NUL");
        // SAFETY: the mock cluster belongs to `host`, which is alive; librdkafka copies
        // the host name under the cluster's lock.
        unsafe {
            let mock = rdkafka::bindings::rd_kafka_handle_mock_cluster(host.client().native_ptr());
            assert!(!mock.is_null(), "the producer hosts a mock cluster");
            rdkafka::bindings::rd_kafka_mock_broker_set_host_port(
                mock,
                1,
                host_name.as_ptr(),
                i32::from(front.addr.port()),
            );
        }
        Self {
            _host: host,
            front,
            topic,
            group: format!("tls-group-{}", &suffix[..12]),
        }
    }

    fn bootstrap(&self) -> String {
        self.front.addr.to_string()
    }
}

/// Terminates TLS for a plaintext upstream, requiring a client certificate.
struct TlsFront {
    addr: SocketAddr,
    /// Handshakes that completed with a verified client certificate.
    accepted: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl TlsFront {
    async fn start(cert: &Path, key: &Path, client_ca: &Path, upstream: String) -> Self {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for ca in certs(client_ca) {
            roots.add(ca).expect("CA certificate");
        }
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .expect("client verifier");
        let key = PrivateKeyDer::from_pem_file(key).expect("server key");
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs(cert), key)
            .expect("server certificate");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("bound");
        let accepted = Arc::new(AtomicU64::new(0));
        let counter = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, upstream, counter) =
                    (acceptor.clone(), upstream.clone(), counter.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut plain) = TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                    }
                });
            }
        });
        Self {
            addr,
            accepted,
            task,
        }
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The worker binary against `broker`, trusting `ca` and presenting `client` (certificate
/// and key files), if any.
fn tls_worker(
    broker: &TlsBroker,
    db: &TestDb,
    ca: &Path,
    client: Option<(&Path, &Path)>,
) -> std::process::Command {
    let mut command =
        worker_command_for(&broker.bootstrap(), &broker.topic, &broker.group, &db.url);
    command.envs([
        ("KAFKA_PG_INGEST__KAFKA__SECURITY_PROTOCOL", "ssl".as_ref()),
        ("KAFKA_PG_INGEST__KAFKA__SSL__CA_LOCATION", ca.as_os_str()),
    ]);
    if let Some((cert, key)) = client {
        command.envs([
            ("KAFKA_PG_INGEST__KAFKA__SSL__CERTIFICATE_LOCATION", cert),
            ("KAFKA_PG_INGEST__KAFKA__SSL__KEY_LOCATION", key),
        ]);
    }
    command
}

/// A client certificate signed by `ca`, as certificate and key files.
fn client_files(ca: &Ca, pem: &PemDir) -> (PathBuf, PathBuf) {
    let client = ca.client("kafka-pg-ingest");
    (
        pem.write("client.pem", &client.cert),
        pem.write("client.key", &client.key),
    )
}

fn records(count: u64) -> Vec<Vec<u8>> {
    valid_messages(0, count).into_iter().flatten().collect()
}

/// Runs `worker` to its exit and asserts that it failed with a message naming `key` and
/// quoting `cause`, with nothing stored and no handshake completed at the front.
async fn assert_refused(
    worker: std::process::Command,
    broker: &TlsBroker,
    db: &TestDb,
    key: &str,
    cause: &str,
) {
    let (status, stderr) = run_to_exit(worker).await;
    assert!(
        !status.success(),
        "a refused TLS connection is fatal: {stderr}"
    );
    let error = final_error(&stderr);
    assert!(
        error.contains(key) && error.contains(cause),
        "the error names {key} and says {cause:?}: {stderr}"
    );
    assert_eq!(stored_group_total(&db.pool, &broker.group).await, 0);
    assert_eq!(
        broker.front.accepted.load(Ordering::Relaxed),
        0,
        "no handshake completed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_over_mutual_tls_ingests_every_record_exactly_once() {
    let pem = PemDir::new();
    let ca = Ca::new("kafka test CA");
    let broker = TlsBroker::start(&ca, &pem, 2, records(300)).await;
    let (cert, key) = client_files(&ca, &pem);
    let ca_location = pem.write("ca.pem", &ca.pem);
    let db = TestDb::new().await;

    let mut command = tls_worker(&broker, &db, &ca_location, Some((&cert, &key)));
    let mut worker = Reaped(command.spawn().expect("worker starts"));
    let (pool, group, topic) = (db.pool.clone(), broker.group.clone(), broker.topic.clone());
    wait_for("every record over TLS", Duration::from_secs(90), || {
        let (pool, group, topic) = (pool.clone(), group.clone(), topic.clone());
        async move { stored_total(&pool, &group, &topic).await == 300 }
    })
    .await;
    assert!(terminate(&mut worker).success(), "the worker stops cleanly");

    Landed::read(&db.pool, &broker.topic)
        .await
        .assert_exactly_once(300, 0);
    assert!(
        broker.front.accepted.load(Ordering::Relaxed) >= 1,
        "the worker reached the broker through the mutual-TLS front"
    );
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_tls_with_a_wrong_ca_stops_naming_the_key_and_stores_nothing() {
    let pem = PemDir::new();
    let ca = Ca::new("kafka test CA");
    let broker = TlsBroker::start(&ca, &pem, 1, records(20)).await;
    let (cert, key) = client_files(&ca, &pem);
    let other = pem.write("other-ca.pem", &Ca::new("some other CA").pem);
    let db = TestDb::new().await;

    let worker = tls_worker(&broker, &db, &other, Some((&cert, &key)));
    assert_refused(
        worker,
        &broker,
        &db,
        "kafka.ssl.ca_location",
        "certificate verify failed",
    )
    .await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_tls_without_the_client_certificate_the_broker_requires_stops_naming_the_key() {
    let pem = PemDir::new();
    let ca = Ca::new("kafka test CA");
    let broker = TlsBroker::start(&ca, &pem, 1, records(20)).await;
    let ca_location = pem.write("ca.pem", &ca.pem);
    let db = TestDb::new().await;

    let worker = tls_worker(&broker, &db, &ca_location, None);
    assert_refused(
        worker,
        &broker,
        &db,
        "kafka.ssl.certificate_location",
        "certificate required",
    )
    .await;
    db.drop().await;
}
