use std::process::ExitCode;

use clap::Parser;
use ctwatchd::config::{Cli, Config};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::{layer::SubscriberExt, util::SubscriberInitExt, EnvFilter};

fn init_logging(level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let registry = tracing_subscriber::registry().with(filter);
    // Under systemd, stderr is the journal stream: log natively so fields stay structured.
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        if let Ok(journald) = tracing_journald::layer() {
            registry
                // Fields keep their names (message_id → MESSAGE_ID), as journald tools expect.
                .with(
                    journald
                        .with_syslog_identifier("ctwatchd".into())
                        .with_field_prefix(None),
                )
                .init();
            return;
        }
    }
    registry
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_target(false),
        )
        .init();
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                e.exit();
            }
            let first = e.to_string();
            let line = first.lines().next().unwrap_or("bad arguments");
            eprintln!(
                "ctwatchd: {} (see ctwatchd --help)",
                line.trim_start_matches("error: ")
            );
            return ExitCode::from(2);
        }
    };
    if cli.generate_man {
        use clap::CommandFactory;
        let mut out = Vec::new();
        let man = clap_mangen::Man::new(Cli::command()).section("8");
        if man.render(&mut out).is_err()
            || std::io::Write::write_all(&mut std::io::stdout(), &out).is_err()
        {
            return ExitCode::FAILURE;
        }
        return ExitCode::SUCCESS;
    }
    let config = match Config::load(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ctwatchd: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.check_config {
        println!(
            "{}: ok",
            config
                .source
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "defaults (no config file)".into())
        );
        return ExitCode::SUCCESS;
    }
    // The state directory first, before anything is touched: a second ctwatchd on the same one
    // is refused with one line naming the holder.
    let state = ctwatchd::state::claim(&config.state_dir);
    if let Err(e) = &state {
        if !e.is_transient() {
            eprintln!("ctwatchd: {e}");
            return ExitCode::FAILURE;
        }
    }
    init_logging(&config.log_level);
    match start(config, state) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("ctwatchd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn start(
    config: Config,
    state: Result<ctwatchd::state::StateDir, ctwatchd::state::StateError>,
) -> anyhow::Result<()> {
    // Before any thread exists: every thread the runtime starts inherits the namespace.
    if let Some(ns) = &config.netns {
        ctwatchd::enter_netns(ns)?;
    }
    ctwatchd::check_net_admin()?;
    // The runtime's threads answer clients: they run below the reader's priority, and their
    // number is bounded (two workers, a small blocking pool for heavy requests and the store).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(8)
        .enable_all()
        .thread_name("ctwatchd-rt")
        .on_thread_start(|| ctwatchd::supervise::lower_priority(ctwatchd::supervise::NICE_CLIENTS))
        .build()?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let trigger = shutdown.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                return;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::info!("shutting down");
            trigger.cancel();
        });
        ctwatchd::run(config, state, shutdown).await
    })
}
