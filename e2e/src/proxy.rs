//! A delaying TCP proxy for tests and benchmarks: `tc netem` is not in
//! every kernel, so latency between sites is added here. Every byte is
//! held for the one-way delay in each direction (a delay line, not a rate
//! limit: throughput is bounded only by the bytes in flight, up to
//! [`MAX_IN_FLIGHT`] per direction). The link can be cut (connections
//! dropped, new ones refused) and restored, and the bytes forwarded are
//! counted.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
    time::Instant,
};

/// Bytes one direction of a connection may have in the delay line.
pub const MAX_IN_FLIGHT: usize = 64 << 20;
const PIECE: usize = 64 << 10;

#[derive(Debug)]
struct Shared {
    delay_us: AtomicU64,
    cut: AtomicBool,
    /// Bumped on every cut: connections from before end.
    epoch: watch::Sender<u64>,
    forwarded: AtomicU64,
}

/// A running proxy; stops when dropped.
#[derive(Debug)]
pub struct DelayProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.shared.epoch.send_modify(|e| *e += 1);
    }
}

impl DelayProxy {
    /// Listens on a free loopback port and forwards to `target`, adding
    /// `delay` each way.
    pub async fn start(target: SocketAddr, delay: Duration) -> std::io::Result<Self> {
        Self::start_on("127.0.0.1:0".parse().unwrap(), target, delay).await
    }

    /// As [`DelayProxy::start`], listening on `listen`.
    pub async fn start_on(
        listen: SocketAddr,
        target: SocketAddr,
        delay: Duration,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            delay_us: AtomicU64::new(delay.as_micros() as u64),
            cut: AtomicBool::new(false),
            epoch: watch::channel(0).0,
            forwarded: AtomicU64::new(0),
        });
        let task = tokio::spawn(accept_loop(listener, target, shared.clone()));
        Ok(DelayProxy { addr, shared, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The one-way delay from now on (bytes already in the line keep theirs).
    pub fn set_delay(&self, delay: Duration) {
        self.shared.delay_us.store(delay.as_micros() as u64, Ordering::SeqCst);
    }

    /// Cuts the link: open connections are dropped, new ones refused.
    pub fn cut(&self) {
        self.shared.cut.store(true, Ordering::SeqCst);
        self.shared.epoch.send_modify(|e| *e += 1);
    }

    pub fn restore(&self) {
        self.shared.cut.store(false, Ordering::SeqCst);
    }

    /// Bytes delivered, both directions.
    pub fn forwarded(&self) -> u64 {
        self.shared.forwarded.load(Ordering::SeqCst)
    }
}

async fn accept_loop(listener: TcpListener, target: SocketAddr, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else { continue };
        if shared.cut.load(Ordering::SeqCst) {
            drop(client);
            continue;
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(target).await else { return };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let mut ended = shared.epoch.subscribe();
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            // Both directions to their end (a half-close is passed on), or
            // until the link is cut.
            let both =
                async { tokio::join!(pump(cr, sw, shared.clone()), pump(sr, cw, shared.clone())) };
            tokio::select! {
                _ = both => {}
                _ = ended.changed() => {}
            }
        });
    }
}

/// Carries one direction through the delay line until either side closes.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    shared: Arc<Shared>,
) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(MAX_IN_FLIGHT / PIECE);
    let counted = shared.clone();
    let reader = async move {
        let mut buf = vec![0u8; PIECE];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let due =
                Instant::now() + Duration::from_micros(shared.delay_us.load(Ordering::SeqCst));
            if tx.send((due, buf[..n].to_vec())).await.is_err() {
                return;
            }
        }
    };
    let writer = async move {
        while let Some((due, piece)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&piece).await.is_err() {
                return;
            }
            counted.forwarded.fetch_add(piece.len() as u64, Ordering::SeqCst);
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.into_split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_round_trip_takes_twice_the_delay_and_bulk_data_still_flows() {
        let proxy =
            DelayProxy::start(echo_server().await, Duration::from_millis(40)).await.unwrap();
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        s.set_nodelay(true).unwrap();
        let t = std::time::Instant::now();
        s.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        let rtt = t.elapsed();
        assert_eq!(&buf, b"ping");
        assert!(rtt >= Duration::from_millis(80) && rtt < Duration::from_millis(300), "{rtt:?}");
        // 16 MiB echoed: a delay line, not a rate limit.
        let data: Vec<u8> = (0..16u32 << 20).map(|i| (i % 251) as u8).collect();
        let (mut r, mut w) = s.into_split();
        let sent = data.clone();
        let writer = tokio::spawn(async move { w.write_all(&sent).await.unwrap() });
        let t = std::time::Instant::now();
        let mut back = vec![0u8; data.len()];
        r.read_exact(&mut back).await.unwrap();
        writer.await.unwrap();
        assert!(back == data, "bytes arrive intact and in order");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?} for 16 MiB", t.elapsed());
        assert!(proxy.forwarded() >= 2 * data.len() as u64);
    }

    #[tokio::test]
    async fn a_cut_link_drops_connections_and_refuses_new_ones_until_restored() {
        let proxy = DelayProxy::start(echo_server().await, Duration::ZERO).await.unwrap();
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        s.write_all(b"a").await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        proxy.cut();
        let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut b)).await.unwrap();
        assert!(matches!(n, Ok(0) | Err(_)), "the open connection ends: {n:?}");
        let mut s2 = TcpStream::connect(proxy.addr()).await.unwrap();
        let _ = s2.write_all(b"x").await;
        let n = tokio::time::timeout(Duration::from_secs(2), s2.read(&mut b)).await.unwrap();
        assert!(matches!(n, Ok(0) | Err(_)), "a new one is refused: {n:?}");
        proxy.restore();
        let mut s3 = TcpStream::connect(proxy.addr()).await.unwrap();
        s3.write_all(b"y").await.unwrap();
        s3.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"y");
    }
}
