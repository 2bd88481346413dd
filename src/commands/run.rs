//! `pgcache run`: the daemon until SIGTERM/SIGINT, with its HTTP endpoints and its log.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::watch;

use super::load;
use crate::checkpoint::BackfillProgress;
use crate::config::{redact, Config, LogFormat};
use crate::daemon;
use crate::daemon::backfill::ProgressFn;
use crate::ops::http;

pub(crate) async fn run(path: &Path) -> ExitCode {
    let config = match load(path) {
        Ok(config) => Arc::new(config),
        Err(code) => return code,
    };
    init_logging(&config);
    let (stop, stopped) = watch::channel(false);
    let hooks = daemon::Hooks {
        on_backfill: progress_bar(),
        ..daemon::Hooks::default()
    };
    if let Some(addr) = config.metrics.listen {
        let started = async {
            let handle = http::install_recorder()?;
            let listener = http::bind(addr).await?;
            Ok::<_, http::HttpError>((handle, listener))
        };
        match started.await {
            Ok((handle, listener)) => {
                tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
                let mut stopped = stopped.clone();
                let limits = http::Limits::from(&config.metrics);
                tokio::spawn(http::serve(
                    listener,
                    handle,
                    limits,
                    hooks.health.clone(),
                    async move {
                        let _ = stopped.wait_for(|stop| *stop).await;
                    },
                ));
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot start the HTTP endpoints");
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received: finishing the batch in hand");
        let _ = stop.send(true);
    });
    match daemon::run(config, stopped, hooks).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let message = redact(&e.to_string());
            tracing::error!("{message}");
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// On a terminal, a progress bar per backfill (the log has a line every few seconds either
/// way).
fn progress_bar() -> Option<ProgressFn> {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return None;
    }
    let bars: Mutex<HashMap<String, indicatif::ProgressBar>> = Mutex::new(HashMap::new());
    Some(Arc::new(move |table: &str, p: &BackfillProgress| {
        let Ok(mut bars) = bars.lock() else {
            return;
        };
        let bar = bars.entry(table.to_string()).or_insert_with(|| {
            let bar = indicatif::ProgressBar::new(p.estimate.max(1));
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "backfill {msg} [{bar:30}] {pos}/{len} rows {per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar.set_message(table.to_string());
            bar
        });
        bar.set_length(p.estimate.max(p.rows));
        bar.set_position(p.rows);
        if p.is_done() {
            bar.finish();
            bars.remove(table);
        }
    }))
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Logs to stderr, human-readable or one JSON object per line (`[log] format`), filtered by
/// `RUST_LOG` or `[log] level`. Every line passes through [`redact`] on its way out, so a
/// connection string that some error message quotes never shows its password.
pub(crate) fn init_logging(config: &Config) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("warn,pgcache={}", config.log.level)));
    // Colours only on a terminal: a file, the journal or a container's log gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(|| RedactingWriter(std::io::stderr()));
    let _ = match config.log.format {
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .try_init(),
        LogFormat::Human => builder.try_init(),
    };
}

/// Hands each formatted log event (the formatter writes one event per `write`) to the
/// inner writer with passwords replaced by `***`.
struct RedactingWriter<W>(W);

impl<W: Write> Write for RedactingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        self.0.write_all(redact(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_lose_their_passwords() {
        let mut out = RedactingWriter(Vec::new());
        out.write_all(
            b"{\"error\":\"cannot connect to postgres://app:s3cret@db:5432/app\"} password=hunter2 x\n",
        )
        .unwrap();
        let text = String::from_utf8(out.0).unwrap();
        assert!(
            !text.contains("s3cret") && !text.contains("hunter2"),
            "{text}"
        );
        assert!(text.contains("postgres://app:***@db:5432/app"), "{text}");
    }
}
