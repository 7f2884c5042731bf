//! `/metrics` against what Postgres holds.

use std::collections::HashMap;
use std::time::Duration;

use kafka_pg_ingest::pipeline::Pipeline;
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

/// Samples of a scrape: `name{labels}` -> value.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter_map(|(k, v)| v.parse().ok().map(|v| (k.to_owned(), v)))
        .collect()
}

/// The lag gauges of the topic's two partitions in a scrape.
fn lags(scraped: &HashMap<String, f64>, topic: &str) -> Vec<Option<f64>> {
    (0..2)
        .map(|p| {
            let key =
                format!("kafka_pg_ingest_partition_lag{{topic=\"{topic}\",partition=\"{p}\"}}");
            scraped.get(&key).copied()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_equal_what_postgres_holds_and_lag_rises_then_falls_to_zero() {
    let db = TestDb::new().await;
    // Each COPY takes 100 ms: ingest spans several of librdkafka's once-a-second
    // statistics, so lag is seen above 0 before it falls.
    sqlx::raw_sql(
        "CREATE FUNCTION public.slow() RETURNS trigger LANGUAGE plpgsql AS \
           $$BEGIN PERFORM pg_sleep(0.1); RETURN NULL; END$$; \
         CREATE TRIGGER slow AFTER INSERT ON web_metrics.metrics \
           FOR EACH STATEMENT EXECUTE FUNCTION public.slow();",
    )
    .execute(&db.pool)
    .await
    .expect("slow trigger");
    let kafka = TestKafka::new(2);
    let mut payloads = valid_messages(0, 1_000);
    for i in 0..6 {
        let bad: &[u8] = if i % 2 == 0 {
            b"<html>"
        } else {
            br#"{"url": "u"}"#
        };
        payloads.insert(i * 100, Some(bad.to_vec()));
    }
    kafka.produce(payloads);
    let mut config = kafka.config(&db);
    config.batch.max_records = 40;
    config.run.metrics_addr = Some("127.0.0.1:0".into());
    config.postgres.lock_timeout_ms = 200;
    let mut pipeline = Pipeline::connect(config).await.expect("starts");
    let stop = CancellationToken::new();
    let addr = serve_endpoints(&pipeline, stop.clone()).await;

    // librdkafka reports high watermarks once a second; step until lag has been seen
    // above 0 and then falls to 0 with everything stored.
    let token = CancellationToken::new();
    drive_until_caught_up(
        &mut pipeline,
        &db.pool,
        &kafka,
        200,
        Duration::from_secs(60),
    )
    .await;
    // Then the offset rows are locked for a second: compare-and-sets time out and are
    // retried.
    let mut lock = db.pool.begin().await.expect("begin");
    sqlx::raw_sql("LOCK TABLE ingest.offsets IN EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .expect("lock");
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        lock.rollback().await.expect("release");
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let mut highest_lag = 0.0f64;
    let scraped = loop {
        pipeline.step(&token).await.expect("step");
        let (status, body) = http_get(addr, "/metrics").await;
        assert_eq!(status, 200);
        let s = samples(&body);
        let lag = lags(&s, &kafka.topic);
        highest_lag = lag.iter().flatten().fold(highest_lag, |a, b| a.max(*b));
        let stored = stored_total(&db.pool, &kafka.group, &kafka.topic).await;
        if stored == 1_006 && lag.iter().all(|l| *l == Some(0.0)) {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "lag never reached 0:\n{body}"
        );
    };
    release.await.expect("lock released");
    assert!(highest_lag > 0.0, "lag was seen above 0 while ingesting");

    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM web_metrics.metrics")
        .fetch_one(&db.pool)
        .await
        .expect("rows");
    assert_eq!(scraped["kafka_pg_ingest_rows_written_total"], rows as f64);
    assert_eq!(scraped["kafka_pg_ingest_records_consumed_total"], 1_006.0);
    let dead: Vec<(String, i64)> =
        sqlx::query_as("SELECT reason_code, count(*) FROM ingest.dead_letters GROUP BY 1")
            .fetch_all(&db.pool)
            .await
            .expect("dead letters");
    assert_eq!(dead.len(), 2);
    for code in kafka_pg_ingest::decode::ReasonCode::ALL {
        let reason = code.as_str();
        let count = dead
            .iter()
            .find(|(r, _)| r == reason)
            .map_or(0, |(_, n)| *n);
        let key = format!("kafka_pg_ingest_dead_letters_total{{reason_code=\"{reason}\"}}");
        assert_eq!(scraped.get(&key), Some(&(count as f64)), "{key}");
    }
    for p in 0..2 {
        let key = format!(
            "kafka_pg_ingest_partition_next_offset{{topic=\"{}\",partition=\"{p}\"}}",
            kafka.topic
        );
        assert_eq!(scraped.get(&key), Some(&503.0), "{key}");
    }
    let stats = pipeline.stats().clone();
    assert!(
        stats.retries >= 1,
        "the locked rows made commits retry: {stats:?}"
    );
    assert_eq!(
        scraped["kafka_pg_ingest_retries_total{class=\"transient\"}"],
        stats.retries as f64
    );
    assert_eq!(
        scraped["kafka_pg_ingest_batch_commit_duration_seconds_count"],
        stats.batches as f64
    );
    assert!(scraped["kafka_pg_ingest_rebalances_total"] >= 1.0);

    // A stranger claims partition 0 while a batch of it is in flight (its compare-and-set
    // now waits a second before it runs): the batch is fenced and counted.
    sqlx::raw_sql(
        "CREATE FUNCTION public.slow_cas() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN \
           IF current_query() LIKE 'UPDATE ingest.offsets AS o SET next_offset = u.end_offset%' \
           THEN PERFORM pg_sleep(1); END IF; RETURN NULL; END$$; \
         CREATE TRIGGER slow_cas BEFORE UPDATE ON ingest.offsets \
           FOR EACH STATEMENT EXECUTE FUNCTION public.slow_cas();",
    )
    .execute(&db.pool)
    .await
    .expect("slow compare-and-set");
    kafka.produce(valid_messages(1_000, 10));
    pipeline.step(&token).await.expect("step");
    sqlx::query(
        "UPDATE ingest.offsets SET epoch = epoch + 1, owner = 'stranger' WHERE partition = 0",
    )
    .execute(&db.pool)
    .await
    .expect("claim by hand");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while pipeline.stats().fenced == 0 {
        assert!(std::time::Instant::now() < deadline, "never fenced");
        pipeline.step(&token).await.expect("step");
    }
    let (_, body) = http_get(addr, "/metrics").await;
    let scraped = samples(&body);
    assert_eq!(
        scraped["kafka_pg_ingest_fencing_conflicts_total"],
        pipeline.stats().fenced as f64
    );
    assert_dashboard_queries_exported_metrics(&body);
    let (status, _) = http_get(addr, "/healthz").await;
    assert_eq!(status, 200);
    stop.cancel();
    pipeline.close().await;
    db.drop().await;
}

/// Every metric `deploy/grafana-dashboard.json` queries is one the worker exports (a
/// family may have no series yet, e.g. retries, so families count by their TYPE line).
fn assert_dashboard_queries_exported_metrics(scrape: &str) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("dashboard file"))
            .expect("dashboard is JSON");
    let families: Vec<&str> = scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let family = |name: &str| {
        ["_total", "_bucket", "_count", "_sum"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name)
            .to_owned()
    };
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut queried = 0;
    for target in panels
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
    {
        let expr = target["expr"].as_str().expect("expr");
        for name in expr
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("kafka_pg_ingest_"))
        {
            queried += 1;
            assert!(
                families.contains(&family(name).as_str()),
                "the dashboard queries {name}, which /metrics does not export:\n{scrape}"
            );
        }
    }
    assert!(queried >= 9, "the dashboard queries the worker's metrics");
}
