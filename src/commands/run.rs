//! `pgcache run`: the daemon until SIGTERM/SIGINT.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use tokio::sync::watch;

use super::{init_logging, load};
use crate::daemon::{self, RunError};

pub(crate) async fn run(path: &Path) -> ExitCode {
    let config = match load(path) {
        Ok(config) => Arc::new(config),
        Err(code) => return code,
    };
    init_logging(&config);
    crate::metrics::describe();
    if let Some(addr) = config.metrics.listen {
        let installed = metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install();
        if let Err(e) = installed {
            eprintln!("error: metrics.listen {addr}: {e}");
            return ExitCode::FAILURE;
        }
    }
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received: finishing the batch in hand");
        let _ = stop.send(true);
    });
    match daemon::run(config, stopped).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(RunError::Fatal(message) | RunError::Transient(message)) => {
            tracing::error!("{message}");
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
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
