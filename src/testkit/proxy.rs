//! A TCP proxy that makes the network faults a test server cannot be told to make: a link
//! that stalls with a command half-delivered, a slow link, a cut connection, a refused one.
//!
//! It runs on plain threads, so it works the same under a current-thread or multi-thread
//! tokio runtime, or from sync code, and none of its methods needs a runtime.
//!
//! # How a connection is carried
//! Each accepted connection gets its own upstream connection and two pipes, one per
//! [`Direction`]. A pipe is a reader thread and a writer thread around a queue of chunks:
//! the reader takes bytes from the source socket while the queue holds less than
//! [`TcpProxy::HOLD_LIMIT`], and the writer sends them on in order once they are due (the delay) and
//! the direction is not paused. The bound is what makes a paused link look like a stalled
//! network: once it is reached the proxy stops reading, the kernel buffers between the
//! sender and the proxy fill, and the sender's own writes block, as they would if the
//! peer stopped acknowledging.
//!
//! The end of a stream is forwarded as a half-close after the bytes before it; an error on
//! either socket closes the whole connection, both sides.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// The most bytes taken from a socket by one read, and so the largest chunk.
const CHUNK: usize = 16 * 1024;

/// How long the upstream server gets to accept a connection.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long `cut` and `drop` wait for the connections they close to finish. Closing wakes
/// every thread of a connection at once, so this bound is only reached if something is
/// badly wrong; it keeps a test from hanging then.
const CLOSE_PATIENCE: Duration = Duration::from_secs(5);

/// Which way bytes flow through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the client that connected to the proxy, to the upstream server.
    ToServer,
    /// From the upstream server back to the client.
    ToClient,
}

impl Direction {
    const BOTH: [Direction; 2] = [Direction::ToServer, Direction::ToClient];

    fn index(self) -> usize {
        match self {
            Direction::ToServer => 0,
            Direction::ToClient => 1,
        }
    }
}

/// A fault-injecting TCP proxy in front of one upstream server, listening on 127.0.0.1.
///
/// Point the client at [`addr`](Self::addr) instead of the server; every connection it
/// makes is forwarded to the upstream address given to [`start`](Self::start), byte for
/// byte, until a fault is switched on. Faults apply to all connections, current and new.
///
/// Dropping it stops the listener and closes every connection, both sides, discarding
/// whatever it held.
pub struct TcpProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

/// What the control methods, the acceptor and every connection share.
struct Shared {
    upstream: SocketAddr,
    /// Per [`Direction::index`]: whether forwarding is paused.
    paused: [AtomicBool; 2],
    refuse: AtomicBool,
    /// Added to every chunk's due time, in nanoseconds.
    delay_nanos: AtomicU64,
    /// Per [`Direction::index`]: bytes written to their destination so far.
    bytes: [AtomicU64; 2],
    registry: Mutex<Registry>,
    /// Signalled whenever a connection leaves `registry`.
    registry_changed: Condvar,
}

struct Registry {
    /// Connections whose threads have not all finished.
    open: Vec<Arc<Conn>>,
    /// How many times every connection was closed (`cut`, and once more by `drop`). A
    /// connection accepted before the latest closing but registered after it (it was
    /// still connecting upstream) is closed at once instead of escaping it.
    closings: u64,
    stopping: bool,
}

/// One client connection and its upstream connection.
struct Conn {
    client: TcpStream,
    server: TcpStream,
    state: Mutex<ConnState>,
    /// Signalled on every change a pipe thread may wait for: a chunk queued or taken, the
    /// end of a stream, a resume, the connection closing.
    changed: Condvar,
}

struct ConnState {
    /// Per [`Direction::index`].
    pipes: [Pipe; 2],
    /// Set once, when the connection is being torn down: every thread stops, held bytes
    /// are dropped.
    closed: bool,
    /// Pipe threads not yet finished; the last one to finish unregisters the connection.
    threads_left: usize,
}

#[derive(Default)]
struct Pipe {
    held: VecDeque<Chunk>,
    held_bytes: usize,
    /// The source has ended its stream; once `held` is empty the destination is
    /// half-closed.
    ended: bool,
}

struct Chunk {
    /// When the writer may send it: when it was read, plus the delay then in force.
    due: Instant,
    data: Vec<u8>,
}

impl TcpProxy {
    /// The most bytes one direction of one connection holds (paused or delayed) before
    /// the proxy stops reading from its sender. Small next to the kernel's socket
    /// buffers, so a pause stalls the sender instead of swallowing what it sends.
    pub const HOLD_LIMIT: usize = 64 * 1024;

    /// Listens on 127.0.0.1 on a port the kernel picks and forwards every accepted
    /// connection to `upstream`.
    ///
    /// Each accepted connection is connected to `upstream` at once, on its own thread; if
    /// that fails (the server is down, or does not accept within 5 s) the client's
    /// connection is closed, which the client sees as the server closing it.
    ///
    /// # Errors
    /// When the listening socket or its thread cannot be set up.
    pub fn start(upstream: SocketAddr) -> Result<TcpProxy> {
        let listener =
            TcpListener::bind("127.0.0.1:0").context("binding the proxy to 127.0.0.1:0")?;
        let addr = listener.local_addr().context("the proxy's local address")?;
        let shared = Arc::new(Shared {
            upstream,
            paused: [AtomicBool::new(false), AtomicBool::new(false)],
            refuse: AtomicBool::new(false),
            delay_nanos: AtomicU64::new(0),
            bytes: [AtomicU64::new(0), AtomicU64::new(0)],
            registry: Mutex::new(Registry {
                open: Vec::new(),
                closings: 0,
                stopping: false,
            }),
            registry_changed: Condvar::new(),
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name(format!("proxy-{}-accept", addr.port()))
                .spawn(move || accept_loop(&listener, &shared))
                .context("starting the proxy's accept thread")?
        };
        Ok(TcpProxy {
            addr,
            shared,
            acceptor: Some(acceptor),
        })
    }

    /// The port the proxy listens on, on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The address the proxy listens on (127.0.0.1 and [`port`](Self::port)).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The upstream address every connection is forwarded to.
    pub fn upstream(&self) -> SocketAddr {
        self.shared.upstream
    }

    /// Stops forwarding in both directions; see [`pause_direction`](Self::pause_direction).
    pub fn pause(&self) {
        for direction in Direction::BOTH {
            self.pause_direction(direction);
        }
    }

    /// Stops forwarding in one direction, on every connection, current and new, until
    /// [`resume`](Self::resume).
    ///
    /// Once this returns, nothing more is written in that direction: every byte the proxy
    /// has read but not yet begun to write, and every byte it reads from now on, is held.
    /// (A chunk whose write had already begun still goes out whole; it was read before
    /// the call.) The proxy keeps reading from the sender until it holds [`TcpProxy::HOLD_LIMIT`]
    /// bytes for that connection, then stops reading, so the sender's writes soon block.
    /// Connections stay open, and new connections are still accepted and connected
    /// upstream. Pausing a paused direction does nothing.
    pub fn pause_direction(&self, direction: Direction) {
        // The writer checks the flag under its connection's lock before taking each
        // chunk, so no chunk is taken after this store.
        self.shared.paused[direction.index()].store(true, Ordering::SeqCst);
    }

    /// Resumes forwarding in both directions: the bytes held are delivered first, in the
    /// order they were read, then forwarding goes on as before the pause. Chunks that
    /// became due during the pause go out at once. Resuming a running proxy does nothing.
    pub fn resume(&self) {
        for direction in Direction::BOTH {
            self.shared.paused[direction.index()].store(false, Ordering::SeqCst);
        }
        // A writer that saw the flag set is waiting on its connection's condvar, or about
        // to under the lock taken here; so it cannot miss this wake-up.
        for conn in self.shared.registry().open.clone() {
            let _state = conn.lock();
            conn.changed.notify_all();
        }
    }

    /// Closes every current connection now, both sides, and keeps listening: new
    /// connections are forwarded as before.
    ///
    /// Both sockets of each connection are shut down, so the client and the server each
    /// see their connection end (end of stream, or a reset if they write on), and the
    /// bytes the proxy held for it are discarded. A connection accepted before the call
    /// that was still connecting upstream is closed as soon as that finishes. Returns once
    /// every connection it closed has finished (in practice at once; at most 5 s).
    pub fn cut(&self) {
        let closing = {
            let mut registry = self.shared.registry();
            registry.closings += 1;
            registry.open.clone()
        };
        for conn in &closing {
            conn.close();
        }
        self.shared.wait_until_gone(&closing);
    }

    /// While `refuse` is true, every new connection is accepted and closed at once,
    /// without connecting upstream: the client's TCP connect may succeed, but its first
    /// read sees the connection end. Current connections are not touched. Off by default.
    pub fn refuse_new(&self, refuse: bool) {
        self.shared.refuse.store(refuse, Ordering::SeqCst);
    }

    /// Makes the link slow: each chunk the proxy reads from now on, in either direction,
    /// is held until `delay` after it was read before it is written on. Chunks are still
    /// forwarded in order and several can be in flight, so this is latency, not a cap on
    /// throughput (beyond the one [`TcpProxy::HOLD_LIMIT`] sets: at most that many bytes per
    /// direction and connection in each `delay`). A request and its reply each cross the
    /// proxy once, so a round trip takes at least twice `delay`. `Duration::ZERO` turns it
    /// off for chunks read from then on; chunks already held keep their due time.
    pub fn set_delay(&self, delay: Duration) {
        let nanos = u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX);
        self.shared.delay_nanos.store(nanos, Ordering::SeqCst);
    }

    /// Connections currently open: accepted and connected upstream, and not yet finished
    /// (both sides closed, or closed by [`cut`](Self::cut)). A refused connection, or one
    /// still connecting upstream, is not counted.
    pub fn connections(&self) -> usize {
        self.shared.registry().open.len()
    }

    /// Bytes written on in `direction` since the proxy started, over all connections,
    /// closed ones included. Bytes held (paused or delayed) are not counted until they are
    /// written.
    pub fn bytes(&self, direction: Direction) -> u64 {
        self.shared.bytes[direction.index()].load(Ordering::SeqCst)
    }
}

impl fmt::Debug for TcpProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpProxy")
            .field("addr", &self.addr)
            .field("upstream", &self.shared.upstream)
            .field("connections", &self.connections())
            .finish_non_exhaustive()
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        let closing = {
            let mut registry = self.shared.registry();
            registry.stopping = true;
            registry.closings += 1;
            registry.open.clone()
        };
        // The acceptor is blocked in accept(); a connection of our own wakes it, and it
        // sees `stopping` before handling it.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        for conn in &closing {
            conn.close();
        }
        self.shared.wait_until_gone(&closing);
    }
}

impl Shared {
    fn registry(&self) -> MutexGuard<'_, Registry> {
        // A panicking pipe thread leaves the data consistent (every change is one
        // statement), so a poisoned lock is still usable.
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn delay(&self) -> Duration {
        Duration::from_nanos(self.delay_nanos.load(Ordering::SeqCst))
    }

    /// Waits (bounded by [`CLOSE_PATIENCE`]) until none of `conns` is open any more.
    fn wait_until_gone(&self, conns: &[Arc<Conn>]) {
        let deadline = Instant::now() + CLOSE_PATIENCE;
        let mut registry = self.registry();
        while registry
            .open
            .iter()
            .any(|open| conns.iter().any(|conn| Arc::ptr_eq(open, conn)))
        {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            registry = self
                .registry_changed
                .wait_timeout(registry, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

impl Conn {
    fn lock(&self) -> MutexGuard<'_, ConnState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(&self, state: MutexGuard<'a, ConnState>) -> MutexGuard<'a, ConnState> {
        self.changed.wait(state).unwrap_or_else(|p| p.into_inner())
    }

    /// Tears the connection down: drops what it holds, wakes its waiting threads, and
    /// shuts both sockets down, which also wakes a thread blocked reading or writing them.
    fn close(&self) {
        {
            let mut state = self.lock();
            if state.closed {
                return;
            }
            state.closed = true;
            state.pipes = Default::default();
            self.changed.notify_all();
        }
        let _ = self.client.shutdown(Shutdown::Both);
        let _ = self.server.shutdown(Shutdown::Both);
    }

    /// The sockets a pipe reads from and writes to.
    fn ends(&self, direction: Direction) -> (&TcpStream, &TcpStream) {
        match direction {
            Direction::ToServer => (&self.client, &self.server),
            Direction::ToClient => (&self.server, &self.client),
        }
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    loop {
        let accepted = listener.accept();
        if shared.registry().stopping {
            return;
        }
        let client = match accepted {
            Ok((client, _)) => client,
            Err(err) => {
                // Out of file descriptors and the like: back off instead of spinning; the
                // pending connection is accepted once the cause is gone.
                if err.kind() != io::ErrorKind::Interrupted {
                    thread::sleep(Duration::from_millis(10));
                }
                continue;
            }
        };
        if shared.refuse.load(Ordering::SeqCst) {
            drop(client);
            continue;
        }
        // Connecting upstream can take a while; the next client must not wait for it.
        let closings = shared.registry().closings;
        let shared_for_conn = Arc::clone(shared);
        let spawned = thread::Builder::new()
            .name("proxy-connect".into())
            .spawn(move || connect(client, closings, &shared_for_conn));
        // Without a thread the client is dropped with the closure, i.e. closed.
        drop(spawned);
    }
}

/// Connects an accepted client upstream and starts its four pipe threads.
fn connect(client: TcpStream, closings: u64, shared: &Arc<Shared>) {
    let Ok(server) = TcpStream::connect_timeout(&shared.upstream, UPSTREAM_CONNECT_TIMEOUT) else {
        return;
    };
    // Small writes (a command, a reply) must leave at once, not wait for Nagle's
    // algorithm, or every request pays a delayed-ACK pause the test did not ask for.
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let conn = Arc::new(Conn {
        client,
        server,
        state: Mutex::new(ConnState {
            pipes: Default::default(),
            closed: false,
            threads_left: 4,
        }),
        changed: Condvar::new(),
    });
    {
        let mut registry = shared.registry();
        if registry.stopping || registry.closings != closings {
            // Cut (or dropped) while connecting: it is one of the connections closed.
            return;
        }
        registry.open.push(Arc::clone(&conn));
    }
    for direction in Direction::BOTH {
        spawn_pipe_thread(shared, &conn, direction, "read", read_side);
        spawn_pipe_thread(shared, &conn, direction, "write", write_side);
    }
}

/// Marks one pipe thread finished when dropped, so a thread that panics, or one that was
/// never started, still counts.
struct ThreadDone {
    shared: Arc<Shared>,
    conn: Arc<Conn>,
}

impl Drop for ThreadDone {
    fn drop(&mut self) {
        let last = {
            let mut state = self.conn.lock();
            state.threads_left -= 1;
            state.threads_left == 0
        };
        if !last {
            return;
        }
        // The sockets close with the last reference: this guard's, or that of a `cut` or
        // `resume` in progress, which lets go of it right after.
        let mut registry = self.shared.registry();
        registry.open.retain(|open| !Arc::ptr_eq(open, &self.conn));
        self.shared.registry_changed.notify_all();
    }
}

fn spawn_pipe_thread(
    shared: &Arc<Shared>,
    conn: &Arc<Conn>,
    direction: Direction,
    role: &str,
    body: fn(&Shared, &Conn, Direction),
) {
    let done = ThreadDone {
        shared: Arc::clone(shared),
        conn: Arc::clone(conn),
    };
    let spawned = thread::Builder::new()
        .name(format!("proxy-{direction:?}-{role}"))
        .spawn(move || body(&done.shared, &done.conn, direction));
    if spawned.is_err() {
        // The closure, and with it `done`, was dropped: counted as finished. The rest of
        // the connection cannot work without this thread.
        conn.close();
    }
}

/// Reads from the direction's source into its queue while the queue has room; forwards
/// the end of the stream; closes the connection on a read error.
fn read_side(shared: &Shared, conn: &Conn, direction: Direction) {
    let index = direction.index();
    let (source, _) = conn.ends(direction);
    let mut buf = vec![0u8; CHUNK];
    loop {
        let room = {
            let mut state = conn.lock();
            while !state.closed && state.pipes[index].held_bytes >= TcpProxy::HOLD_LIMIT {
                state = conn.wait(state);
            }
            if state.closed {
                return;
            }
            TcpProxy::HOLD_LIMIT - state.pipes[index].held_bytes
        };
        let limit = room.min(CHUNK);
        let read = match (&*source).read(&mut buf[..limit]) {
            Ok(read) => read,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => {
                conn.close();
                return;
            }
        };
        let due = Instant::now() + shared.delay();
        let mut state = conn.lock();
        if state.closed {
            return;
        }
        let pipe = &mut state.pipes[index];
        if read == 0 {
            pipe.ended = true;
            conn.changed.notify_all();
            return;
        }
        pipe.held_bytes += read;
        pipe.held.push_back(Chunk {
            due,
            data: buf[..read].to_vec(),
        });
        conn.changed.notify_all();
    }
}

/// Writes the direction's queued chunks to its destination, in order, each once it is
/// due and while the direction is not paused; half-closes the destination after the end
/// of the stream; closes the connection on a write error.
fn write_side(shared: &Shared, conn: &Conn, direction: Direction) {
    let index = direction.index();
    let (_, destination) = conn.ends(direction);
    loop {
        let chunk = {
            let mut state = conn.lock();
            loop {
                if state.closed {
                    return;
                }
                if shared.paused[index].load(Ordering::SeqCst) {
                    state = conn.wait(state);
                    continue;
                }
                let pipe = &mut state.pipes[index];
                let Some(front) = pipe.held.front() else {
                    if pipe.ended {
                        drop(state);
                        // The other direction may still carry bytes (a reply to the last
                        // request), so only this one ends.
                        let _ = destination.shutdown(Shutdown::Write);
                        return;
                    }
                    state = conn.wait(state);
                    continue;
                };
                let now = Instant::now();
                if front.due > now {
                    let wait = front.due - now;
                    state = conn
                        .changed
                        .wait_timeout(state, wait)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                    continue;
                }
                let chunk = pipe.held.pop_front().expect("front() was Some");
                pipe.held_bytes -= chunk.data.len();
                // The reader may be waiting for room.
                conn.changed.notify_all();
                break chunk;
            }
        };
        if (&*destination).write_all(&chunk.data).is_err() {
            conn.close();
            return;
        }
        shared.bytes[index].fetch_add(chunk.data.len() as u64, Ordering::SeqCst);
    }
}
