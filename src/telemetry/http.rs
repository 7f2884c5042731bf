//! `/metrics`, `/healthz` and `/readyz` on `--metrics-addr`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::metrics::{Health, Metrics};

/// What the endpoints read.
#[derive(Clone)]
pub struct Endpoints {
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub pool: PgPool,
    /// `/healthz` fails when no step finished for this long (the loop is stuck).
    pub stuck_after: Duration,
}

/// Binds `addr` and serves until `shutdown`; returns the bound address.
pub async fn serve(
    addr: &str,
    endpoints: Endpoints,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tracing::info!(addr = %bound, "serving /metrics, /healthz and /readyz");
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(endpoints);
    let task = tokio::spawn(async move {
        let server = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await });
        if let Err(e) = server.await {
            tracing::error!(error = %e, "metrics endpoint failed");
        }
    });
    Ok((bound, task))
}

async fn metrics(State(e): State<Endpoints>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        e.metrics.encode(),
    )
}

async fn healthz(State(e): State<Endpoints>) -> impl IntoResponse {
    if e.health.stepped_within(e.stuck_after) {
        (StatusCode::OK, "ok\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("no loop step for over {:?}\n", e.stuck_after),
        )
    }
}

async fn readyz(State(e): State<Endpoints>) -> impl IntoResponse {
    let check = sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&e.pool);
    let database = matches!(
        tokio::time::timeout(Duration::from_secs(2), check).await,
        Ok(Ok(1))
    );
    let group = e.health.in_group();
    let status = if database && group {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        format!("database {}\nconsumer group {}\n", up(database), up(group)),
    )
}

fn up(ok: bool) -> &'static str {
    if ok { "up" } else { "down" }
}
