//! `sluice-quota`: serve the quota API until SIGTERM or SIGINT.

use sluice_quota::cli::{self, Command, Options, USAGE};
use sluice_quota::{http, system_clock, Engine};
use std::process::ExitCode;
use std::sync::Arc;
use tokio::net::TcpListener;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let options = match cli::parse(&args, |name| std::env::var(name).ok()) {
        Ok(Command::Run(options)) => options,
        Ok(Command::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(problem) => {
            eprintln!("sluice-quota: {problem}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(problem) => {
            eprintln!("sluice-quota: cannot start the runtime: {problem}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(options))
}

async fn run(options: Options) -> ExitCode {
    let engine = match &options.redis_cluster {
        Some(nodes) => Engine::cluster(nodes, system_clock),
        None => Engine::new(&options.redis_url, system_clock),
    };
    let engine = match engine {
        Ok(engine) => engine,
        Err(problem) => {
            eprintln!("sluice-quota: {problem}");
            return ExitCode::from(2);
        }
    };
    let listener = match TcpListener::bind(options.listen).await {
        Ok(listener) => listener,
        Err(problem) => {
            eprintln!(
                "sluice-quota: cannot listen on {}: {problem}",
                options.listen
            );
            return ExitCode::FAILURE;
        }
    };
    let address = listener
        .local_addr()
        .map_or_else(|_| options.listen.to_string(), |bound| bound.to_string());
    let redis = match &options.redis_cluster {
        Some(nodes) => {
            let nodes: Vec<String> = nodes.iter().map(|n| cli::redacted(n)).collect();
            format!("redis cluster {}", nodes.join(","))
        }
        None => format!("redis {}", cli::redacted(&options.redis_url)),
    };
    println!("sluice-quota: listening on {address} (HTTP/1.1 and h2c), {redis}");
    http::serve(listener, Arc::new(engine), stop_signal()).await;
    eprintln!("sluice-quota: stopped");
    ExitCode::SUCCESS
}

/// SIGTERM (how orchestrators stop a service) or SIGINT (Ctrl-C).
async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
