//! A small HTTP/1.1 responder for Prometheus: `GET /metrics` (and `HEAD`), nothing else.
//!
//! One thread accepts connections on a std `TcpListener` and answers them one at a time,
//! each with `Connection: close`. The request head may be at most [`MAX_REQUEST_HEAD`]
//! bytes and must arrive within [`REQUEST_TIMEOUT`] of the connection (a deadline over the
//! whole head, not per read: a client trickling bytes is cut off too); the response must
//! be taken within the same time. So a slow or hostile client holds the responder for at
//! most a few seconds and never touches the data plane, which only ever sees its counters
//! read. Anything but `GET`/`HEAD` gets 405, another path 404, a malformed request 400, an
//! oversized one 431, a late one 408.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::export::Registry;

/// Largest request head accepted (request line and headers).
pub const MAX_REQUEST_HEAD: usize = 8192;
/// Time a client has to send its request head, and to take the response.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// The one path served.
pub const METRICS_PATH: &str = "/metrics";

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: io::Error },
    #[error("starting the metrics thread: {0}")]
    Thread(io::Error),
}

/// The metrics endpoint, running on its own thread until dropped.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Listen on `addr` (`HOST:PORT`; port 0 picks a free one, see
    /// [`local_addr`](Self::local_addr)) and serve `registry` at [`METRICS_PATH`].
    pub fn start(addr: &str, registry: Arc<Registry>) -> Result<Self, HttpError> {
        let listener = TcpListener::bind(addr).map_err(|source| HttpError::Bind { addr: addr.to_string(), source })?;
        let local = listener.local_addr().map_err(|source| HttpError::Bind { addr: addr.to_string(), source })?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let handle = std::thread::Builder::new()
            .name("vblk-metrics".into())
            .spawn(move || accept_loop(listener, &registry, &stop2))
            .map_err(HttpError::Thread)?;
        Ok(MetricsServer { addr: local, stop, handle: Some(handle) })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the blocking accept with a connection of our own.
        let mut wake = self.addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(if wake.is_ipv4() { [127, 0, 0, 1].into() } else { std::net::Ipv6Addr::LOCALHOST.into() });
        }
        if TcpStream::connect_timeout(&wake, Duration::from_secs(1)).is_ok() {
            if let Some(h) = self.handle.take() {
                let _ = h.join();
            }
        }
        // Otherwise the thread is left to end with the process.
    }
}

fn accept_loop(listener: TcpListener, registry: &Arc<Registry>, stop: &AtomicBool) {
    for conn in listener.incoming() {
        if stop.load(Ordering::Acquire) {
            return;
        }
        match conn {
            Ok(stream) => {
                let peer = stream.peer_addr().ok();
                if let Err(e) = handle(stream, registry) {
                    tracing::debug!(?peer, error = %e, "metrics request failed");
                }
            }
            Err(e) => {
                // EMFILE and the like: do not spin on them.
                tracing::warn!(error = %e, "metrics: accept failed");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

enum HeadError {
    TooLarge,
    Timeout,
    /// The client closed the connection before finishing its request.
    Closed,
    Io(io::Error),
}

/// Read the request head (up to the blank line) within the deadline.
fn read_head(stream: &mut TcpStream, deadline: Instant) -> Result<String, HeadError> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HeadError::Timeout);
        }
        stream.set_read_timeout(Some(left)).map_err(HeadError::Io)?;
        let n = match stream.read(&mut buf) {
            Ok(0) => return Err(HeadError::Closed),
            Ok(n) => n,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Err(HeadError::Timeout)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(HeadError::Io(e)),
        };
        // Look for the end from a little before the new bytes (a terminator split across reads).
        let from = head.len().saturating_sub(3);
        head.extend_from_slice(&buf[..n]);
        let tail = &head[from..];
        let end = tail
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|i| from + i)
            .or_else(|| tail.windows(2).position(|w| w == b"\n\n").map(|i| from + i));
        if let Some(end) = end {
            if end > MAX_REQUEST_HEAD {
                return Err(HeadError::TooLarge);
            }
            return Ok(String::from_utf8_lossy(&head[..end]).into_owned());
        }
        if head.len() > MAX_REQUEST_HEAD {
            return Err(HeadError::TooLarge);
        }
    }
}

/// A response: status line, extra headers, body.
struct Response {
    code: u16,
    reason: &'static str,
    content_type: &'static str,
    extra: &'static str,
    body: String,
    /// HEAD: headers only.
    head_only: bool,
}

impl Response {
    fn error(code: u16, reason: &'static str) -> Response {
        Response {
            code,
            reason,
            content_type: "text/plain; charset=utf-8",
            extra: "",
            body: format!("{code} {reason}\n"),
            head_only: false,
        }
    }
}

/// What to answer to a request head.
fn route(head: &str, registry: &Arc<Registry>) -> Response {
    let line = head.lines().next().unwrap_or("").trim_end_matches('\r');
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Response::error(400, "Bad Request");
    };
    if !version.starts_with("HTTP/1.") || method.is_empty() || !target.starts_with('/') {
        return Response::error(400, "Bad Request");
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Response { extra: "Allow: GET, HEAD\r\n", ..Response::error(405, "Method Not Allowed") },
    };
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    if path != METRICS_PATH {
        return Response { head_only, ..Response::error(404, "Not Found") };
    }
    match crate::prometheus::encode(registry) {
        Ok(body) => Response {
            code: 200,
            reason: "OK",
            content_type: crate::prometheus::CONTENT_TYPE,
            extra: "",
            body,
            head_only,
        },
        Err(_) => Response { head_only, ..Response::error(500, "Internal Server Error") },
    }
}

fn handle(mut stream: TcpStream, registry: &Arc<Registry>) -> io::Result<()> {
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let response = match read_head(&mut stream, Instant::now() + REQUEST_TIMEOUT) {
        Ok(head) => route(&head, registry),
        Err(HeadError::TooLarge) => Response::error(431, "Request Header Fields Too Large"),
        Err(HeadError::Timeout) => Response::error(408, "Request Timeout"),
        Err(HeadError::Closed) => return Ok(()),
        Err(HeadError::Io(e)) => return Err(e),
    };
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n{}\r\n",
        response.code,
        response.reason,
        response.content_type,
        response.body.len(),
        response.extra
    );
    if !response.head_only {
        out.push_str(&response.body);
    }
    stream.write_all(out.as_bytes())?;
    stream.flush()?;
    stream.shutdown(Shutdown::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counters::Op;
    use crate::export::ExportMetrics;

    fn server() -> (MetricsServer, Arc<ExportMetrics>) {
        let reg = Arc::new(Registry::new());
        let m = Arc::new(ExportMetrics::new(1, 1));
        reg.register("t", Arc::clone(&m)).unwrap();
        (MetricsServer::start("127.0.0.1:0", reg).unwrap(), m)
    }

    /// Send `request` raw and return the whole response.
    fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(request).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    fn status(response: &str) -> &str {
        response.lines().next().unwrap_or("")
    }

    #[test]
    fn get_metrics_answers_with_the_counters() {
        let (srv, m) = server();
        let q = m.queue(0).unwrap();
        q.started();
        q.finished(Op::Flush, None, 0, Some(10));
        let r = exchange(srv.local_addr(), b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n");
        assert_eq!(status(&r), "HTTP/1.1 200 OK", "{r}");
        assert!(r.contains("Content-Type: text/plain; version=0.0.4"), "{r}");
        let (head, body) = r.split_once("\r\n\r\n").unwrap();
        let len: usize = head.lines().find_map(|l| l.strip_prefix("Content-Length: ")).unwrap().parse().unwrap();
        assert_eq!(len, body.len());
        assert!(body.contains("vblk_requests_total{export=\"t\",queue=\"0\",op=\"flush\"} 1\n"), "{body}");
        // A query string is ignored; HEAD has no body; bare LF line ends are accepted.
        let r = exchange(srv.local_addr(), b"GET /metrics?x=1 HTTP/1.0\n\n");
        assert_eq!(status(&r), "HTTP/1.1 200 OK");
        let r = exchange(srv.local_addr(), b"HEAD /metrics HTTP/1.1\r\n\r\n");
        assert_eq!(status(&r), "HTTP/1.1 200 OK");
        assert!(r.ends_with("\r\n\r\n"), "{r}");
    }

    #[test]
    fn bad_requests_get_error_statuses() {
        let (srv, _m) = server();
        let a = srv.local_addr();
        assert_eq!(status(&exchange(a, b"GET / HTTP/1.1\r\n\r\n")), "HTTP/1.1 404 Not Found");
        assert_eq!(status(&exchange(a, b"GET /metricsx HTTP/1.1\r\n\r\n")), "HTTP/1.1 404 Not Found");
        let r = exchange(a, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(status(&r), "HTTP/1.1 405 Method Not Allowed");
        assert!(r.contains("Allow: GET, HEAD\r\n"), "{r}");
        for garbage in [&b"hello\r\n\r\n"[..], b"GET /metrics\r\n\r\n", b"GET /metrics SPDY/3 x\r\n\r\n", b"\r\n\r\n"] {
            assert_eq!(status(&exchange(a, garbage)), "HTTP/1.1 400 Bad Request", "{garbage:?}");
        }
        let mut big = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_REQUEST_HEAD + 100, b'a');
        big.extend_from_slice(b"\r\n\r\n");
        assert_eq!(status(&exchange(a, &big)), "HTTP/1.1 431 Request Header Fields Too Large");
        // Still serving.
        assert_eq!(status(&exchange(a, b"GET /metrics HTTP/1.1\r\n\r\n")), "HTTP/1.1 200 OK");
    }

    #[test]
    fn a_silent_client_is_cut_off_and_the_next_one_served() {
        let (srv, _m) = server();
        let a = srv.local_addr();
        let t0 = Instant::now();
        let mut slow = TcpStream::connect(a).unwrap();
        slow.write_all(b"GET /met").unwrap();
        // Served after the slow client's deadline, not never.
        let r = exchange(a, b"GET /metrics HTTP/1.1\r\n\r\n");
        assert_eq!(status(&r), "HTTP/1.1 200 OK");
        assert!(t0.elapsed() < REQUEST_TIMEOUT * 3, "{:?}", t0.elapsed());
        let mut out = String::new();
        slow.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        slow.read_to_string(&mut out).unwrap();
        assert_eq!(status(&out), "HTTP/1.1 408 Request Timeout");
    }

    #[test]
    fn binding_a_port_in_use_fails_with_the_address() {
        let (srv, _m) = server();
        let addr = srv.local_addr().to_string();
        let e = MetricsServer::start(&addr, Arc::new(Registry::new())).unwrap_err();
        assert!(e.to_string().starts_with(&format!("cannot listen on {addr}:")), "{e}");
    }
}
