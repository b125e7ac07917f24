//! The `passerelle` binary: parse flags, load configuration, run.

use anyhow::Context;
use clap::Parser;
use passerelle::cli::{Cli, Command, effective_config, run_admin};
use passerelle::startup::Application;
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    // Threads with room for the deepest expression the server accepts (see `nesting`).
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(passerelle::nesting::THREAD_STACK_BYTES)
        .build()
        .context("starting the runtime")?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let Command::Serve(args) = &cli.command else {
        return run_admin(&cli).await;
    };
    let cfg = effective_config(&cli, args.config.as_ref(), Some(args))?;
    let app = Application::build(&cfg).await.context("starting the gateway")?;
    if cfg.demo.enabled {
        let keys = std::fs::read_to_string(
            cfg.data_dir
                .clone()
                .unwrap_or_else(|| cli.data_dir())
                .join("demo-keys.json"),
        )
        .context("reading demo-keys.json")?;
        let keys: serde_json::Value = serde_json::from_str(&keys).context("parsing demo-keys.json")?;
        let key = keys["trainer-de"]["key"].as_str().unwrap_or("<see demo-keys.json>");
        println!(
            "{}",
            passerelle::demo::snippet(&app.flight_addr().to_string(), key, cfg.tls.is_some())
        );
    }
    #[cfg(unix)]
    {
        // SIGHUP: re-read policy files and stored rules now (they are also picked up within a second).
        let node = app.node();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let Ok(mut hup) = signal(SignalKind::hangup()) else {
                return;
            };
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading policy");
                if let Err(e) = node.meta.request_reload().await {
                    tracing::error!(error = %e, "could not request a policy reload");
                }
                if let Err(e) = node.refresh().await {
                    tracing::error!(error = %e, "policy reload refused; the previous policy stays in force");
                }
            }
        });
    }
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        let _ = tx.send(true);
    });
    app.run_until_stopped(rx).await.context("serving")?;
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
