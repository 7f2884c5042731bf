//! Least privilege: a worker role holding only the grants of `deploy/grants.sql` (the
//! "Least privilege" section of docs/security.md) ingests and replays exactly once, and without one
//! of them it stops with a permission error instead of losing a record.

use std::time::{Duration, Instant};

use kafka_pg_ingest::pipeline::{Pipeline, PipelineError};
use kafka_pg_ingest::retry::ErrorClass;
use kafka_pg_ingest::sample::MALFORMED_KINDS;
use kafka_pg_ingest::store::admin;
use kafka_pg_ingest::store::quote_ident;
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

/// A login role of its own for one test, holding the grants of `deploy/grants.sql`.
pub struct WorkerRole {
    pub name: String,
    password: String,
}

impl WorkerRole {
    async fn create(db: &TestDb) -> Self {
        let role = Self::login(db).await;
        role.grant(db).await;
        role
    }

    /// The role without grants: what step 2 of the least-privilege setup makes.
    pub async fn login(db: &TestDb) -> Self {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let role = Self {
            name: format!("kpi_worker_{}", &suffix[..12]),
            password: suffix,
        };
        // As in a hardened database, nothing comes from PUBLIC's default CONNECT and
        // TEMPORARY: the grants must hold on their own.
        exec(
            &db.pool,
            &format!(
                "REVOKE ALL ON DATABASE {} FROM PUBLIC; CREATE ROLE {} LOGIN PASSWORD '{}'",
                quote_ident(&db.name),
                quote_ident(&role.name),
                role.password
            ),
        )
        .await;
        role
    }

    /// Runs `deploy/grants.sql` for this role as an operator does: `psql -v worker=..`.
    async fn grant(&self, db: &TestDb) {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grants.sql");
        let output = tokio::process::Command::new("psql")
            .args(["-q", "-v", "ON_ERROR_STOP=1", "-v"])
            .arg(format!("worker={}", self.name))
            .args(["-f", path])
            .arg(&db.url)
            .output()
            .await
            .expect("psql runs");
        assert!(
            output.status.success(),
            "deploy/grants.sql failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// The URL of `db` logging in as this role.
    pub fn url(&self, db: &TestDb) -> String {
        let (scheme, rest) = db.url.split_once("://").expect("URL has a scheme");
        let server_and_database = rest.rsplit_once('@').map_or(rest, |(_, s)| s);
        format!(
            "{scheme}://{}:{}@{server_and_database}",
            self.name, self.password
        )
    }

    /// A worker configuration logging in as this role, which cannot migrate.
    fn config(&self, db: &TestDb, kafka: &TestKafka) -> kafka_pg_ingest::config::Config {
        let mut config = kafka.config_for_url(&self.url(db));
        config.postgres.migrate_on_start = false;
        config
    }

    /// Drops the role with the privileges it holds (and any temporary table it left).
    pub async fn drop(self, db: &TestDb) {
        let name = quote_ident(&self.name);
        exec(&db.pool, &format!("DROP OWNED BY {name}; DROP ROLE {name}")).await;
    }
}

/// Ids of the target rows of one partition, in offset order.
async fn row_ids(db: &TestDb, kafka: &TestKafka, partition: i32) -> Vec<i64> {
    sqlx::query_scalar(
        "SELECT id FROM web_metrics.metrics WHERE kafka_topic = $1 AND kafka_partition = $2 \
         ORDER BY kafka_offset",
    )
    .bind(&kafka.topic)
    .bind(partition)
    .fetch_all(&db.pool)
    .await
    .expect("read row ids")
}

/// `valid` valid messages with every kind of malformed message in front.
fn malformed_then_valid(valid: u64) -> Vec<Option<Vec<u8>>> {
    let mut payloads: Vec<Option<Vec<u8>>> = MALFORMED_KINDS
        .iter()
        .map(|(_, bytes)| Some(bytes.to_vec()))
        .collect();
    payloads.extend(valid_messages(0, valid));
    payloads
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worker_role_with_only_the_documented_grants_ingests_and_replays_exactly_once() {
    let db = TestDb::new().await;
    let role = WorkerRole::create(&db).await;
    let kafka = TestKafka::new(2);
    let dead = MALFORMED_KINDS.len() as i64;
    kafka.produce(malformed_then_valid(40));

    let pipeline = Pipeline::connect(role.config(&db, &kafka))
        .await
        .expect("the worker role starts without migrating");
    ingest_all_and_assert_exactly_once(pipeline, &db, &kafka, 40, dead).await;

    // Replays use the rest of the grants: partition 0 replaces its rows (DELETE), partition
    // 1 keeps them (a temporary table, then INSERT .. SELECT); both re-decide their dead
    // letters (DELETE, INSERT).
    let (replaced, kept) = (row_ids(&db, &kafka, 0).await, row_ids(&db, &kafka, 1).await);
    admin::rewind(&db.pool, &kafka.group, &kafka.topic, &[(0, 0)], false)
        .await
        .expect("rewind partition 0");
    admin::rewind(&db.pool, &kafka.group, &kafka.topic, &[(1, 0)], true)
        .await
        .expect("rewind partition 1, keeping its rows");
    let pipeline = Pipeline::connect(role.config(&db, &kafka))
        .await
        .expect("the worker role starts again");
    ingest_all_and_assert_exactly_once(pipeline, &db, &kafka, 40, dead).await;
    let replaced_again = row_ids(&db, &kafka, 0).await;
    assert_eq!(replaced_again.len(), replaced.len());
    assert!(
        replaced_again.iter().all(|id| !replaced.contains(id)),
        "partition 0's rows were written again"
    );
    assert_eq!(
        row_ids(&db, &kafka, 1).await,
        kept,
        "partition 1's rows stayed"
    );

    role.drop(&db).await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worker_role_without_insert_on_dead_letters_stops_with_a_permission_error_and_loses_nothing()
 {
    let db = TestDb::new().await;
    let role = WorkerRole::create(&db).await;
    exec(
        &db.pool,
        &format!(
            "REVOKE INSERT ON ingest.dead_letters FROM {}",
            quote_ident(&role.name)
        ),
    )
    .await;
    // One partition, a malformed record first: every batch holds a dead letter.
    let kafka = TestKafka::new(1);
    let dead = MALFORMED_KINDS.len() as i64;
    kafka.produce(malformed_then_valid(20));

    let mut pipeline = Pipeline::connect(role.config(&db, &kafka))
        .await
        .expect("the worker role starts");
    let token = CancellationToken::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let err = loop {
        match pipeline.step(&token).await {
            Ok(_) => assert!(Instant::now() < deadline, "the worker never failed"),
            Err(e) => break e,
        }
    };
    pipeline.close().await;
    let PipelineError::Store(store_error) = &err else {
        panic!("expected a Postgres error, got: {err}");
    };
    assert_eq!(store_error.class(), ErrorClass::Fatal, "{err}");
    assert!(
        err.to_string()
            .contains("permission denied for table dead_letters"),
        "{err}"
    );
    Landed::read(&db.pool, &kafka.topic)
        .await
        .assert_exactly_once(0, 0);
    assert_eq!(stored_total(&db.pool, &kafka.group, &kafka.topic).await, 0);

    // With the grant back, the same records land: nothing was skipped.
    role.grant(&db).await;
    let pipeline = Pipeline::connect(role.config(&db, &kafka))
        .await
        .expect("the worker role starts again");
    ingest_all_and_assert_exactly_once(pipeline, &db, &kafka, 20, dead).await;

    role.drop(&db).await;
    db.drop().await;
}
