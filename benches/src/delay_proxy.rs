//! A TCP proxy that adds latency: every byte is delivered half a round trip after it arrived,
//! in each direction, so a request/response pays one round trip more and bandwidth is kept.
//! This kernel has no `netem` qdisc; a remote object store is only honest with remote latency.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A running proxy; stops accepting when dropped (open connections end with their peers).
pub struct DelayProxy {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl DelayProxy {
    /// Listens on a free loopback port, forwarding to `upstream` with `rtt` added per round trip.
    pub fn start(upstream: SocketAddr, rtt: Duration) -> io::Result<DelayProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        std::thread::Builder::new().name("delay-proxy".into()).spawn(move || {
            for client in listener.incoming() {
                if stopping.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(client) = client else { continue };
                if let Err(e) = connect(client, upstream, rtt / 2) {
                    eprintln!("delay proxy: {e}");
                }
            }
        })?;
        Ok(DelayProxy { addr, stop })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr); // wakes the accept loop
    }
}

fn connect(client: TcpStream, upstream: SocketAddr, one_way: Duration) -> io::Result<()> {
    let server = TcpStream::connect(upstream)?;
    for stream in [&client, &server] {
        stream.set_nodelay(true)?;
    }
    forward(client.try_clone()?, server.try_clone()?, one_way)?;
    forward(server, client, one_way)
}

/// Copies `from` to `to`, each read delivered `delay` after it arrived (a reader thread stamps
/// the bytes, a writer thread waits for their time).
fn forward(mut from: TcpStream, mut to: TcpStream, delay: Duration) -> io::Result<()> {
    let (sender, receiver) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::Builder::new().name("delay-read".into()).spawn(move || {
        let mut buf = vec![0u8; 256 << 10];
        while let Ok(n @ 1..) = from.read(&mut buf) {
            if sender.send((Instant::now() + delay, buf[..n].to_vec())).is_err() {
                break;
            }
        }
    })?;
    std::thread::Builder::new().name("delay-write".into()).spawn(move || {
        for (due, bytes) in receiver {
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            if to.write_all(&bytes).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_pass_through_unchanged_one_round_trip_later() {
        let echo = TcpListener::bind("127.0.0.1:0").expect("bind");
        let upstream = echo.local_addr().expect("addr");
        std::thread::spawn(move || {
            let (mut conn, _) = echo.accept().expect("accept");
            let mut buf = [0u8; 1024];
            while let Ok(n @ 1..) = conn.read(&mut buf) {
                conn.write_all(&buf[..n]).expect("echo");
            }
        });
        let proxy = DelayProxy::start(upstream, Duration::from_millis(20)).expect("proxy");
        let mut conn = TcpStream::connect(proxy.addr).expect("connect");
        let started = Instant::now();
        conn.write_all(b"ping").expect("write");
        let mut reply = [0u8; 4];
        conn.read_exact(&mut reply).expect("read");
        assert_eq!(&reply, b"ping");
        assert!(started.elapsed() >= Duration::from_millis(20), "{:?}", started.elapsed());
    }
}
