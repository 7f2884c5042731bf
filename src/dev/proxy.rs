//! A TCP proxy (to Postgres, or to a broker) that faults can take down: when down it cuts every open
//! connection and refuses new ones. It can also cut a connection right after relaying a
//! `COMMIT`, before the server's answer gets back, or instead of relaying it: ambiguous
//! commits that did and did not apply.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A TCP proxy (to Postgres, or to a broker) that faults can take down: when down it cuts every open
/// connection and refuses new ones. It can also cut a connection right after relaying a
/// `COMMIT`, before the server's answer gets back, or instead of relaying it: ambiguous
/// commits that did and did not apply.
pub struct Proxy {
    pub port: u16,
    up: Arc<AtomicBool>,
    /// Where new connections go.
    target: Arc<Mutex<SocketAddr>>,
    /// Each open connection's client port, with the local port of its connection to the
    /// target (which Postgres shows as the backend's `client_port`).
    links: Arc<Mutex<HashMap<u16, u16>>>,
    generation: watch::Sender<u64>,
    /// How many of the next `COMMIT`s to cut: `applied` ones reach the server first,
    /// `dropped` ones never do (the server rolls the transaction back). Only the
    /// integration tests cut commits.
    #[cfg_attr(not(feature = "internals"), allow(dead_code))]
    pub commits_to_cut: Arc<Cuts>,
}

/// COMMITs to cut, by whether the server gets them.
#[derive(Debug, Default)]
pub struct Cuts {
    pub applied: AtomicUsize,
    pub dropped: AtomicUsize,
}

impl Cuts {
    /// Takes one cut for a COMMIT: `Some(true)` relays it first, `Some(false)` drops it.
    fn take(&self) -> Option<bool> {
        let one = |c: &AtomicUsize| {
            c.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        };
        if one(&self.applied) {
            Some(true)
        } else if one(&self.dropped) {
            Some(false)
        } else {
            None
        }
    }
}

/// A simple-protocol `Query` message holding `COMMIT`, as sqlx sends it.
const COMMIT_MESSAGE: &[u8] = b"Q\0\0\0\x0bCOMMIT\0";

impl Proxy {
    /// Listens on an ephemeral port of 127.0.0.1 and relays to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let up = Arc::new(AtomicBool::new(true));
        let commits_to_cut = Arc::new(Cuts::default());
        let (generation, _) = watch::channel(0u64);
        let target = Arc::new(Mutex::new(target));
        let links = Arc::new(Mutex::new(HashMap::new()));
        let (accept_up, accept_generation, accept_cuts, accept_target, accept_links) = (
            up.clone(),
            generation.clone(),
            commits_to_cut.clone(),
            target.clone(),
            links.clone(),
        );
        tokio::spawn(async move {
            while let Ok((client, peer)) = listener.accept().await {
                if !accept_up.load(Ordering::SeqCst) {
                    continue; // dropping the socket refuses the connection
                }
                let mut cut = accept_generation.subscribe();
                let cuts = accept_cuts.clone();
                let target = *accept_target.lock().unwrap_or_else(|p| p.into_inner());
                let links = accept_links.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    if let Ok(local) = server.local_addr() {
                        links
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(peer.port(), local.port());
                    }
                    tokio::select! {
                        () = relay(client, server, cuts) => {}
                        _ = cut.changed() => {}
                    }
                    links
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&peer.port());
                });
            }
        });
        Ok(Self {
            port,
            up,
            target,
            links,
            generation,
            commits_to_cut,
        })
    }

    /// The local ports of the target-side connections of the clients at `ports`.
    pub fn upstream_ports(&self, ports: &[i32]) -> Vec<i32> {
        let links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        ports
            .iter()
            .filter_map(|p| links.get(&u16::try_from(*p).ok()?))
            .map(|p| i32::from(*p))
            .collect()
    }

    /// Sends new connections to `target`, cutting every open one.
    pub fn retarget(&self, target: SocketAddr) {
        *self.target.lock().unwrap_or_else(|p| p.into_inner()) = target;
        self.generation.send_modify(|g| *g += 1);
    }

    /// Takes the proxy down (cutting every connection) or brings it back.
    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
        if !up {
            self.generation.send_modify(|g| *g += 1);
        }
    }
}

/// Relays both ways until either side closes, or until a `COMMIT` is to be cut.
async fn relay(client: TcpStream, server: TcpStream, commits_to_cut: Arc<Cuts>) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let answers =
        tokio::spawn(async move { tokio::io::copy(&mut server_read, &mut client_write).await });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match client_read.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let is_commit = buf[..n]
            .windows(COMMIT_MESSAGE.len())
            .any(|w| w == COMMIT_MESSAGE);
        let cut = if is_commit {
            commits_to_cut.take()
        } else {
            None
        };
        if cut.is_some() {
            // Stop relaying answers first: every earlier answer has arrived (the client
            // waited for it), and the COMMIT's own answer must be lost.
            answers.abort();
        }
        if cut == Some(false) {
            // The server never sees the COMMIT: the closed connection rolls it back.
            break;
        }
        if server_write.write_all(&buf[..n]).await.is_err() {
            break;
        }
        if cut == Some(true) {
            // Let the server apply the COMMIT before the connection goes.
            tokio::time::sleep(Duration::from_millis(200)).await;
            break;
        }
    }
    answers.abort();
}
