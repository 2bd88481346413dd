//! What `/healthz` and `/readyz` report: the daemon's liveness and whether it streams.
//!
//! The daemon updates a [`Health`] it is given (`daemon::Hooks`); the HTTP endpoints read
//! the same one. Live means the
//! process runs its loop; ready means a session is connected to both servers and streaming
//! (a standby waiting for the slot is live but not ready).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::clock::now_ms;

#[derive(Debug, Default)]
pub struct Health {
    streaming: AtomicBool,
    /// Wall clock (ms since the Unix epoch) of the last event or tick of the run loop.
    last_beat_ms: AtomicU64,
    /// Last error that ended a session, for `/readyz` bodies and `status`.
    last_error: std::sync::Mutex<Option<String>>,
}

impl Health {
    pub fn set_streaming(&self, streaming: bool) {
        self.streaming.store(streaming, Ordering::Relaxed);
        self.beat();
    }

    pub fn is_streaming(&self) -> bool {
        self.streaming.load(Ordering::Relaxed)
    }

    /// The run loop is alive.
    pub fn beat(&self) {
        self.last_beat_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Milliseconds since the last beat (u64::MAX before the first).
    pub fn since_beat_ms(&self) -> u64 {
        match self.last_beat_ms.load(Ordering::Relaxed) {
            0 => u64::MAX,
            at => now_ms().saturating_sub(at),
        }
    }

    pub fn set_error(&self, error: Option<String>) {
        if let Ok(mut slot) = self.last_error.lock() {
            *slot = error;
        }
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }
}
