//! Isolation benchmark: commits batches of 5,000 website-metrics records of which a
//! share violates a CHECK constraint, against the Postgres at `DATABASE_URL` (a database
//! of its own, created and dropped), and prints the median commit time, with the time
//! of the same batches with nothing rejected beside it.
//!
//!     cargo run --release --example isolation_speed [-- REJECTED_SHARE [RUNS]]

use std::time::{Duration, Instant};

use kafka_pg_ingest::config::Overrides;
use kafka_pg_ingest::record::Record;
use kafka_pg_ingest::store::{self, Batch, CommitOutcome, PartitionRange, Store};
use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, PgPool};

const RECORDS: i64 = 5_000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let share: f64 = args.next().map_or(Ok(0.25), |a| a.parse())?;
    let runs: usize = args.next().map_or(Ok(5), |a| a.parse())?;
    let admin_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&admin_url)
        .await?;
    let name = format!("kpi_isolation_{}", uuid::Uuid::new_v4().simple());
    sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&admin)
        .await?;
    let url = format!(
        "{}/{name}",
        &admin_url[..admin_url.rfind('/').unwrap_or(admin_url.len())]
    );
    let result = measure(&url, share, runs).await;
    sqlx::raw_sql(AssertSqlSafe(format!("DROP DATABASE {name} WITH (FORCE)")))
        .execute(&admin)
        .await?;
    let (rejecting, clean) = result?;
    println!(
        "{RECORDS} records, {:.0}% rejected by a CHECK constraint: median commit {:.2} s; \
         nothing rejected: {:.3} s ({runs} runs each)",
        share * 100.0,
        rejecting.as_secs_f64(),
        clean.as_secs_f64()
    );
    Ok(())
}

/// Median commit times of batches with `share` rejected and with none.
async fn measure(url: &str, share: f64, runs: usize) -> anyhow::Result<(Duration, Duration)> {
    let overrides = Overrides {
        database_url: Some(url.to_owned()),
        ..Overrides::default()
    };
    let config = kafka_pg_ingest::load_config(None, Vec::new(), &overrides)?;
    let pool = store::connect_pool(&config).await?;
    store::migrate(&pool, &kafka_pg_ingest::routes::Routes::new(&config)?).await?;
    sqlx::raw_sql("ALTER TABLE web_metrics.metrics ADD CONSTRAINT ok CHECK (status_code < 500)")
        .execute(&pool)
        .await?;
    let store = Store::for_pool(pool.clone(), &config).await?;
    let mut rejecting = Vec::new();
    let mut clean = Vec::new();
    for run in 0..runs {
        rejecting.push(commit(&store, &pool, run, share).await?);
        clean.push(commit(&store, &pool, run, 0.0).await?);
    }
    Ok((median(rejecting), median(clean)))
}

/// Commits one batch of a partition of its own (by `run`, and whether it rejects) and
/// times it.
async fn commit(store: &Store, pool: &PgPool, run: usize, share: f64) -> anyhow::Result<Duration> {
    let topic = "website-metrics".to_owned();
    let partition = 2 * run as i32 + i32::from(share > 0.0);
    let claim = store
        .claim("isolation-bench", &[((topic.clone(), partition), 0)])
        .await?
        .remove(0);
    store
        .store_starts(&[(&topic, partition, claim.epoch, 0)])
        .await?;
    let every = if share > 0.0 {
        (1.0 / share).round() as i64
    } else {
        i64::MAX
    };
    let records = (0..RECORDS)
        .map(|i| {
            let code = if share > 0.0 && i % every == 0 { 503 } else { 200 };
            Record {
                topic: topic.clone(),
                partition,
                offset: i,
                key: None,
                value: Some(
                    format!(
                        r#"{{"request_timestamp": "2021-01-01T00:00:00Z", "url": "https://example.com/{i}", "resp_status_code": {code}}}"#
                    )
                    .into_bytes(),
                ),
                headers: Vec::new(),
                timestamp_ms: None,
            }
        })
        .collect();
    let range = PartitionRange {
        topic: topic.clone(),
        partition,
        epoch: claim.epoch,
        start: 0,
        end: RECORDS,
        gap: None,
    };
    let batch = Batch::decode(records, store.routes(), vec![range]);
    let started = Instant::now();
    let outcome = store.commit(&batch).await?;
    let elapsed = started.elapsed();
    anyhow::ensure!(
        matches!(outcome, CommitOutcome::Committed { .. }),
        "the batch did not commit: {outcome:?}"
    );
    let dead: i64 =
        sqlx::query_scalar("SELECT count(*) FROM ingest.dead_letters WHERE partition = $1")
            .bind(partition)
            .fetch_one(pool)
            .await?;
    let expected = if share > 0.0 {
        (RECORDS + every - 1) / every
    } else {
        0
    };
    anyhow::ensure!(dead == expected, "{dead} dead letters, expected {expected}");
    Ok(elapsed)
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort_unstable();
    samples[samples.len() / 2]
}
