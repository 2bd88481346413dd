//! The daemon's HTTP endpoints, on `[metrics] listen`:
//!
//! - `GET /metrics`: Prometheus text format, from the process-wide recorder;
//! - `GET /healthz`: 200 while the run loop beats (liveness), else 503;
//! - `GET /readyz`: 200 while a session streams (readiness), else 503 with the last error.
//!
//! A tiny HTTP/1.1 responder (one request per connection, `Connection: close`) is all a
//! scraper and a probe need, so no web framework is pulled in. [`serve`] takes its listener
//! and a shutdown future, so a test can run it on port 0 and stop it at will.
//!
//! The endpoint may be reachable by more than Prometheus (containers bind it to all
//! interfaces), so clients cannot tie it up: at most [`Limits::max_connections`] are open at
//! once, a client has [`Limits::header_timeout`] to send its request and
//! [`Limits::request_timeout`] for the whole exchange, and when every slot is taken, the
//! oldest connection that has not sent its request yet is closed to make room. Thousands of
//! idle connections therefore cost a bounded number of file descriptors, and a probe, which
//! sends its request at once, still gets its answer.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::config::{self, redact, MetricsConfig};
use crate::metrics as m;
use crate::ops::health::Health;

/// Liveness limit. The run loop beats every 250 ms while a session runs; between sessions
/// it sleeps up to 30 s of reconnect backoff plus connect timeouts, during which it is
/// still alive. A probe that fails during an outage would restart a daemon that is
/// correctly waiting (G7), so the limit leaves room for the longest backoff.
pub const LIVENESS_LIMIT: Duration = Duration::from_secs(60);

/// How often histogram samples are folded into their buckets.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Request heads larger than this are refused; probes and scrapers send a few hundred bytes.
const MAX_HEAD: usize = 8 * 1024;

/// How long a new connection waits for a connection that was closed to make room for it
/// to let go of its slot (it only has to be scheduled once).
const EVICTION_WAIT: Duration = Duration::from_secs(1);

/// How many clients the endpoint serves at once and how long each may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once (`[metrics] max_connections`).
    pub max_connections: usize,
    /// Time to send the request head (`[metrics] header_timeout`).
    pub header_timeout: Duration,
    /// Time for the whole exchange, the response included (`[metrics] request_timeout`).
    pub request_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: config::DEFAULT_METRICS_MAX_CONNECTIONS,
            header_timeout: config::DEFAULT_METRICS_HEADER_TIMEOUT,
            request_timeout: config::DEFAULT_METRICS_REQUEST_TIMEOUT,
        }
    }
}

impl From<&MetricsConfig> for Limits {
    fn from(config: &MetricsConfig) -> Self {
        Limits {
            max_connections: config.max_connections,
            header_timeout: config.header_timeout,
            request_timeout: config.request_timeout,
        }
    }
}

/// Seconds: 1 ms to 5 min, for commit-to-EXEC latency.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];
/// Seconds: 0.5 ms to 5 s, for one MULTI/EXEC round trip.
const EXEC_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
/// Operations per batch: 1 to the largest default batch and beyond.
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 20000.0,
    50000.0, 100000.0,
];

/// The recorder can be installed once per process; later calls get the same handle.
static HANDLE: Mutex<Option<PrometheusHandle>> = Mutex::new(None);

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot install the Prometheus recorder: {0}")]
    Recorder(#[from] metrics_exporter_prometheus::BuildError),
    #[error("cannot listen on {addr} ([metrics] listen): {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Installs the process-wide Prometheus recorder with our histogram buckets (so `_bucket`
/// series exist) and registers the metric descriptions. Idempotent within a process.
///
/// # Errors
/// Another recorder was installed by someone else (an application embedding the daemon).
pub fn install_recorder() -> Result<PrometheusHandle, HttpError> {
    let mut slot = HANDLE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(handle) = slot.as_ref() {
        return Ok(handle.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(m::APPLY_LATENCY.into()), LATENCY_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(m::EXEC_SECONDS.into()), EXEC_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(m::BATCH_OPS.into()), BATCH_BUCKETS)?
        .install_recorder()?;
    // Descriptions go to the recorder installed at the time of the call, so after it.
    m::describe();
    *slot = Some(handle.clone());
    Ok(handle)
}

/// Binds `addr`.
///
/// # Errors
/// The address is taken or not ours.
pub async fn bind(addr: std::net::SocketAddr) -> Result<TcpListener, HttpError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })
}

/// The open connections: a slot each, and a way to close those still waiting for their
/// request.
struct Slots {
    free: Arc<Semaphore>,
    /// Connections that have not sent their request head yet, oldest (lowest id) first.
    /// Dropping a sender closes that connection.
    waiting: Mutex<BTreeMap<u64, oneshot::Sender<()>>>,
}

impl Slots {
    fn new(max: usize) -> Slots {
        Slots {
            free: Arc::new(Semaphore::new(max.max(1))),
            waiting: Mutex::new(BTreeMap::new()),
        }
    }

    /// A slot for a new connection: a free one, or the one of the oldest connection still
    /// waiting for its request, which is closed. `None` when every slot is busy answering.
    async fn take(&self) -> Option<OwnedSemaphorePermit> {
        if let Ok(permit) = self.free.clone().try_acquire_owned() {
            return Some(permit);
        }
        let evicted = self.lock().pop_first();
        // Dropped here: the evicted connection's task ends and frees its slot.
        drop(evicted?);
        tokio::time::timeout(EVICTION_WAIT, self.free.clone().acquire_owned())
            .await
            .ok()?
            .ok()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, oneshot::Sender<()>>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Answers requests on `listener` until `shutdown` resolves, and keeps the histograms
/// folded meanwhile.
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    limits: Limits,
    health: Arc<Health>,
    shutdown: impl Future<Output = ()>,
) {
    let started = Instant::now();
    let slots = Arc::new(Slots::new(limits.max_connections));
    let mut next_id: u64 = 0;
    let mut upkeep = tokio::time::interval(UPKEEP_EVERY);
    upkeep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = upkeep.tick() => handle.run_upkeep(),
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Some(permit) = slots.take().await else {
                        tracing::debug!(%peer, "metrics endpoint busy: connection closed");
                        continue;
                    };
                    let id = next_id;
                    next_id += 1;
                    let (evict, evicted) = oneshot::channel();
                    slots.lock().insert(id, evict);
                    let handle = handle.clone();
                    let health = health.clone();
                    let slots = slots.clone();
                    tokio::spawn(async move {
                        let exchange = answer(stream, &handle, &health, started, limits, evicted, || {
                            slots.lock().remove(&id);
                        });
                        match tokio::time::timeout(limits.request_timeout, exchange).await {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => tracing::debug!(error = %e, "metrics request failed"),
                            Err(_) => tracing::debug!(%peer, "metrics request timed out"),
                        }
                        drop(permit);
                    });
                }
                Err(e) => {
                    // Out of file descriptors, typically: back off instead of spinning.
                    tracing::warn!(error = %e, "metrics listener cannot accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// One exchange. Until the request head is in, the connection can be closed for a newer
/// one (`evicted` resolves); `head_read` then takes it off the list of such connections.
async fn answer(
    mut stream: TcpStream,
    handle: &PrometheusHandle,
    health: &Health,
    started: Instant,
    limits: Limits,
    evicted: oneshot::Receiver<()>,
    head_read: impl FnOnce(),
) -> std::io::Result<()> {
    let head = tokio::select! {
        _ = evicted => return Ok(()),
        head = tokio::time::timeout(limits.header_timeout, read_head(&mut stream)) => head,
    };
    head_read();
    let head = match head {
        Ok(head) => head?,
        Err(_) => return Ok(()),
    };
    let response = match head {
        Some(head) => route(&head, health, started, || handle.render()),
        None => Response::text(400, "Bad Request", "malformed request\n"),
    };
    stream.write_all(&response.to_bytes()).await?;
    stream.shutdown().await
}

/// Reads up to the blank line that ends the request head; `None` when it is too large or
/// the client hangs up first.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = find(&buf, b"\r\n\r\n").or_else(|| find(&buf, b"\n\n")) {
            buf.truncate(end);
            return Ok(String::from_utf8(buf).ok());
        }
        if buf.len() > MAX_HEAD {
            return Ok(None);
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// An HTTP response; the body is left out for HEAD.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Response {
    status: u16,
    reason: &'static str,
    content_type: &'static str,
    body: String,
    head_only: bool,
    allow: bool,
}

impl Response {
    fn text(status: u16, reason: &'static str, body: impl Into<String>) -> Response {
        Response {
            status,
            reason,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
            head_only: false,
            allow: false,
        }
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n",
            self.status,
            self.reason,
            self.content_type,
            self.body.len()
        );
        if self.allow {
            out.push_str("Allow: GET, HEAD\r\n");
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        if !self.head_only {
            bytes.extend_from_slice(self.body.as_bytes());
        }
        bytes
    }
}

/// The response to a request head: pure, so it is tested without sockets.
fn route(
    head: &str,
    health: &Health,
    started: Instant,
    render: impl FnOnce() -> String,
) -> Response {
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Response::text(400, "Bad Request", "malformed request line\n");
    };
    let path = target.split(['?', '#']).next().unwrap_or(target);
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        let mut r = Response::text(405, "Method Not Allowed", "use GET\n");
        r.allow = true;
        return r;
    }
    let mut response = match path {
        "/metrics" => Response {
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            ..Response::text(200, "OK", render())
        },
        "/healthz" => liveness(health, started),
        "/readyz" => readiness(health),
        _ => Response::text(404, "Not Found", "try /metrics, /healthz or /readyz\n"),
    };
    response.head_only = head_only;
    response
}

fn liveness(health: &Health, started: Instant) -> Response {
    let since = health.since_beat_ms();
    if since == u64::MAX {
        // No beat yet: the daemon is connecting for the first time.
        return if started.elapsed() < LIVENESS_LIMIT {
            Response::text(200, "OK", "starting\n")
        } else {
            Response::text(
                503,
                "Service Unavailable",
                format!(
                    "the run loop has not started in {}s\n",
                    started.elapsed().as_secs()
                ),
            )
        };
    }
    if since < LIVENESS_LIMIT.as_millis() as u64 {
        Response::text(200, "OK", format!("alive: last beat {since} ms ago\n"))
    } else {
        Response::text(
            503,
            "Service Unavailable",
            format!("the run loop has not beaten for {} s\n", since / 1000),
        )
    }
}

fn readiness(health: &Health) -> Response {
    if health.is_streaming() {
        return Response::text(200, "OK", "streaming\n");
    }
    let why = health
        .last_error()
        .map(|e| redact(&e))
        .unwrap_or_else(|| "no session is streaming yet".to_string());
    Response::text(
        503,
        "Service Unavailable",
        format!("not streaming: {why}\n"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path: &str, health: &Health) -> Response {
        route(
            &format!("GET {path} HTTP/1.1\r\nHost: x"),
            health,
            Instant::now(),
            || "pgcache_changes_total 1\n".to_string(),
        )
    }

    #[test]
    fn metrics_are_served_as_prometheus_text() {
        let r = get("/metrics?x=1", &Health::default());
        assert_eq!(r.status, 200);
        assert!(r.content_type.starts_with("text/plain; version=0.0.4"));
        assert_eq!(r.body, "pgcache_changes_total 1\n");
        let bytes = String::from_utf8(r.to_bytes()).unwrap();
        assert!(bytes.starts_with("HTTP/1.1 200 OK\r\n"), "{bytes}");
        assert!(bytes.contains("Content-Length: 24\r\n"), "{bytes}");
        assert!(
            bytes.ends_with("\r\n\r\npgcache_changes_total 1\n"),
            "{bytes}"
        );
    }

    #[test]
    fn health_follows_the_beat_and_readiness_the_stream() {
        let health = Health::default();
        // Before the first beat, within the limit: starting.
        assert_eq!(get("/healthz", &health).status, 200);
        let old = route(
            "GET /healthz HTTP/1.1",
            &health,
            Instant::now() - LIVENESS_LIMIT - Duration::from_secs(1),
            String::new,
        );
        assert_eq!(old.status, 503);
        health.beat();
        assert_eq!(get("/healthz", &health).status, 200);

        let r = get("/readyz", &health);
        assert_eq!(r.status, 503);
        assert!(r.body.contains("no session"), "{}", r.body);
        health.set_error(Some("postgres://u:hunter2@db/app refused".into()));
        let r = get("/readyz", &health);
        assert!(
            r.body.contains("refused") && !r.body.contains("hunter2"),
            "{}",
            r.body
        );
        health.set_streaming(true);
        assert_eq!(get("/readyz", &health).status, 200);
    }

    #[test]
    fn other_requests_are_refused_plainly() {
        let health = Health::default();
        assert_eq!(get("/", &health).status, 404);
        let r = route(
            "POST /metrics HTTP/1.1",
            &health,
            Instant::now(),
            String::new,
        );
        assert_eq!(r.status, 405);
        assert!(String::from_utf8(r.to_bytes())
            .unwrap()
            .contains("Allow: GET, HEAD"));
        assert_eq!(route("", &health, Instant::now(), String::new).status, 400);
        let head = route("HEAD /metrics HTTP/1.1", &health, Instant::now(), || {
            "x".into()
        });
        assert!(String::from_utf8(head.to_bytes())
            .unwrap()
            .ends_with("\r\n\r\n"));
    }
}
