//! A TCP proxy to Postgres that faults can take down: when down it cuts every open
//! connection and refuses new ones. It can also cut a connection right after relaying a
//! `COMMIT`, before the server's answer gets back: an ambiguous commit.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A TCP proxy to Postgres the test can take down: when down it cuts every open
/// connection and refuses new ones. It can also cut a connection right after relaying a
/// `COMMIT`, before the server's answer gets back: an ambiguous commit.
pub struct Proxy {
    pub port: u16,
    up: Arc<AtomicBool>,
    generation: watch::Sender<u64>,
    /// How many of the next `COMMIT`s to cut.
    pub commits_to_cut: Arc<AtomicUsize>,
}

/// A simple-protocol `Query` message holding `COMMIT`, as sqlx sends it.
const COMMIT_MESSAGE: &[u8] = b"Q\0\0\0\x0bCOMMIT\0";

impl Proxy {
    /// Listens on an ephemeral port of 127.0.0.1 and relays to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let up = Arc::new(AtomicBool::new(true));
        let commits_to_cut = Arc::new(AtomicUsize::new(0));
        let (generation, _) = watch::channel(0u64);
        let (accept_up, accept_generation, accept_cuts) =
            (up.clone(), generation.clone(), commits_to_cut.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if !accept_up.load(Ordering::SeqCst) {
                    continue; // dropping the socket refuses the connection
                }
                let mut cut = accept_generation.subscribe();
                let cuts = accept_cuts.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        () = relay(client, server, cuts) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Ok(Self {
            port,
            up,
            generation,
            commits_to_cut,
        })
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
async fn relay(client: TcpStream, server: TcpStream, commits_to_cut: Arc<AtomicUsize>) {
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
        let cut = is_commit
            && commits_to_cut
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| c.checked_sub(1))
                .is_ok();
        if cut {
            // Stop relaying answers first: every earlier answer has arrived (the client
            // waited for it), and the COMMIT's own answer must be lost.
            answers.abort();
        }
        if server_write.write_all(&buf[..n]).await.is_err() {
            break;
        }
        if cut {
            // Let the server apply the COMMIT before the connection goes.
            tokio::time::sleep(Duration::from_millis(200)).await;
            break;
        }
    }
    answers.abort();
}
