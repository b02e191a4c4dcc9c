//! What every Berth binary does at start: structured logging, private files and the shutdown
//! signal.

use std::future::Future;

/// Logs through `tracing`, filtered by `BERTH_LOG` (or `RUST_LOG`), `info` by default.
pub fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("BERTH_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
}

/// Makes every file and directory this process creates from now on private to its own user
/// (umask 077: files 0600, directories 0700 unless a mode is set explicitly), as a systemd unit's
/// `UMask=0077` would: the store, journals, run output and credentials hold secrets. Call first
/// thing in `main` (the umask is shared by all of the process's threads and its children).
pub fn private_files() {
    use nix::sys::stat::{umask, Mode};
    umask(Mode::S_IRWXG | Mode::S_IRWXO);
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed now, not on first poll, so a
/// signal that arrives during start-up is not fatal.
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}
