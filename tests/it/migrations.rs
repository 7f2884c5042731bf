//! The migrations own the `ingest` schema only; the website-metrics table belongs to the
//! default route.

use kafka_pg_ingest::config::Overrides;
use kafka_pg_ingest::routes::Routes;
use sqlx::PgPool;

use crate::helpers::*;

async fn relation_exists(pool: &PgPool, name: &str) -> bool {
    sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(name)
        .fetch_one(pool)
        .await
        .expect("read the catalog")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_creates_the_website_metrics_table_only_for_a_route_that_writes_into_it() {
    let db = TestDb::empty().await;
    let yaml = "routes:\n  - topic: orders\n    table: shop.orders\n    mode: upsert\n    \
                key: [id]\n    columns:\n      - { column: id, field: id, type: int8 }\n";
    let path = std::env::temp_dir().join(format!("kpi-migrate-{}.yaml", uuid::Uuid::new_v4()));
    std::fs::write(&path, yaml).expect("temp file is writable");
    let config = kafka_pg_ingest::load_config(Some(&path), Vec::new(), &Overrides::default())
        .expect("routes load");
    let _ = std::fs::remove_file(&path);
    let own_routes = Routes::new(&config).expect("valid routes");
    kafka_pg_ingest::store::migrate(&db.pool, &own_routes)
        .await
        .expect("migrations apply");
    assert!(relation_exists(&db.pool, "ingest.offsets").await);
    assert!(
        !relation_exists(&db.pool, "web_metrics.metrics").await,
        "no route writes website metrics"
    );

    kafka_pg_ingest::store::migrate(&db.pool, &default_routes())
        .await
        .expect("migrations apply again");
    assert!(relation_exists(&db.pool, "web_metrics.metrics").await);
    assert!(relation_exists(&db.pool, "web_metrics.metrics_time_stamp_idx").await);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_migrated_when_the_ingest_schema_held_the_website_metrics_table_migrates_and_keeps_its_rows()
 {
    let db = TestDb::new().await;
    sqlx::raw_sql(
        "INSERT INTO web_metrics.metrics (time_stamp, url, kafka_topic, kafka_partition, kafka_offset) \
         VALUES (now(), 'https://kept.example/', 't', 0, 0); \
         UPDATE _sqlx_migrations SET checksum = decode('2e81b33763b7c28f343b910df7eee2dc17f621f523aaf37c64079453e38e44561db51b799fb28125e09b8ac283cd16e9', 'hex') \
         WHERE version = 1",
    )
    .execute(&db.pool)
    .await
    .expect("the earlier version's state");
    kafka_pg_ingest::store::migrate(&db.pool, &default_routes())
        .await
        .expect("an earlier version's database migrates");
    let kept: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM web_metrics.metrics WHERE url = 'https://kept.example/'",
    )
    .fetch_one(&db.pool)
    .await
    .expect("read rows");
    assert_eq!(kept, 1);
    let checksum: Vec<u8> =
        sqlx::query_scalar("SELECT checksum FROM _sqlx_migrations WHERE version = 1")
            .fetch_one(&db.pool)
            .await
            .expect("read the recorded checksum");
    let current = sqlx::migrate!("./migrations")
        .iter()
        .find(|m| m.version == 1)
        .map(|m| m.checksum.to_vec())
        .expect("a first migration");
    assert_eq!(checksum, current, "recorded as the current first migration");
    db.drop().await;
}
