//! Freezing a worker process in the middle of a Postgres transaction (SIGSTOP while one
//! of its connections has a transaction open): what a VM pause or a stalled host does
//! to a worker that holds its offset rows' locks.

use std::collections::HashSet;
use std::time::Duration;

use sqlx::PgPool;

use super::reaped::Reaped;

/// Local TCP ports of `pid`'s connections to `server_port` (Linux `/proc`): the
/// `client_port` of its backends in `pg_stat_activity`.
pub fn client_ports(pid: u32, server_port: u16) -> Vec<i32> {
    let inodes: HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|fd| {
            let target = std::fs::read_link(fd.path()).ok()?;
            let target = target.to_str()?;
            Some(
                target
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_owned(),
            )
        })
        .collect();
    let mut ports = Vec::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(remote), Some(inode)) =
                (fields.get(1), fields.get(2), fields.get(9))
            else {
                continue;
            };
            let port = |addr: &str| {
                addr.rsplit_once(':')
                    .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
            };
            if port(remote) == Some(server_port) && inodes.contains(*inode) {
                ports.extend(port(local).map(i32::from));
            }
        }
    }
    ports
}

/// Stops `worker` (SIGSTOP) at a moment when one of its backends in `database` is
/// inside a batch's transaction past its compare-and-set, trying up to `attempts` times
/// (resuming it between tries).
/// `backend_ports` gives the `client_port`s of the worker's backends. Returns whether
/// it is now frozen mid-transaction; when not, it is left running.
pub async fn freeze_in_transaction(
    worker: &Reaped,
    pool: &PgPool,
    database: &str,
    backend_ports: impl Fn() -> Vec<i32>,
    attempts: u32,
) -> anyhow::Result<bool> {
    for attempt in 0..attempts {
        worker.signal("STOP")?;
        let ports = backend_ports();
        // A batch's transaction that has written (it holds its own transaction id): past
        // its compare-and-set, holding its offset rows' locks. A claim's is not one.
        let open: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity a WHERE a.datname = $1 \
             AND a.client_port = ANY($2) AND EXISTS (SELECT 1 FROM pg_locks l \
               WHERE l.pid = a.pid AND l.locktype = 'transactionid' AND l.granted) \
             AND a.query NOT LIKE 'INSERT INTO ingest.offsets%' \
             AND a.query NOT LIKE 'SELECT pg_backend_pid()%' \
             AND a.query NOT LIKE 'SET LOCAL lock_timeout%'",
        )
        .bind(database)
        .bind(&ports)
        .fetch_one(pool)
        .await?;
        if open > 0 {
            return Ok(true);
        }
        worker.signal("CONT")?;
        tokio::time::sleep(Duration::from_millis(7 + u64::from(attempt % 13))).await;
    }
    Ok(false)
}
