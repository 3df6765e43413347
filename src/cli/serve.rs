//! `warden serve`: run until SIGTERM or SIGINT, then drain and flush.

use std::path::Path;

use anyhow::Context;

use crate::config::Config;
use crate::gateway::Gateway;

pub fn run(config_path: &Path) -> anyhow::Result<()> {
    super::init_logging("info");
    let config = Config::load(config_path)?;
    super::runtime()?.block_on(async move {
        let gateway = Gateway::start(config).await?;
        let released = crate::resident::release_startup_code();
        tracing::debug!(
            released_mb = released >> 20,
            "dropped the code pages only starting used"
        );
        eprintln!(
            "warden: agents -> http://{}/v1   operators -> http://{}",
            gateway.proxy_addr(),
            gateway.admin_addr()
        );
        wait_for_signal()
            .await
            .context("cannot listen for shutdown signals")?;
        tracing::info!("shutting down: draining in-flight calls");
        gateway.shutdown().await;
        Ok(())
    })
}

async fn wait_for_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
