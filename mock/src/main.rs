//! `sluice-mock`: run mock providers as a standalone process.

use std::process::ExitCode;

use sluice_mock::{start, ProviderKind, ProviderSpec};

const USAGE: &str = "\
usage: sluice-mock --provider NAME,KIND,ADDR,PREFIX,KEY_ENV [--provider ...]

  NAME     provider name recorded with each request (openai, deepseek, gemini, anthropic, ...)
  KIND     openai | anthropic (response shapes)
  ADDR     listen address, e.g. 127.0.0.1:18001 (port 0 = any free port)
  PREFIX   path prefix: /v1 (OpenAI, Anthropic), empty (DeepSeek), /v1beta/openai (Gemini)
  KEY_ENV  name of the environment variable holding the credential this provider expects

example:
  sluice-mock --provider openai,openai,127.0.0.1:18001,/v1,OPENAI_API_KEY \\
              --provider deepseek,openai,127.0.0.1:18003,,DEEPSEEK_API_KEY";

struct Arg {
    name: String,
    kind: ProviderKind,
    listen: std::net::SocketAddr,
    prefix: String,
    key_env: String,
}

fn parse_provider(s: &str) -> Result<Arg, String> {
    let parts: Vec<&str> = s.split(',').collect();
    let [name, kind, addr, prefix, key_env] = parts.as_slice() else {
        return Err(format!(
            "--provider expects 5 comma-separated fields NAME,KIND,ADDR,PREFIX,KEY_ENV, got {:?}",
            s
        ));
    };
    if name.is_empty() {
        return Err("provider NAME must not be empty".into());
    }
    let kind = match kind.to_ascii_lowercase().as_str() {
        "openai" => ProviderKind::OpenAi,
        "anthropic" => ProviderKind::Anthropic,
        other => {
            return Err(format!(
                "unknown KIND {other:?} (expected openai or anthropic)"
            ))
        }
    };
    let listen = addr
        .parse()
        .map_err(|e| format!("bad ADDR {addr:?}: {e}"))?;
    if !prefix.is_empty() && !prefix.starts_with('/') {
        return Err(format!("PREFIX {prefix:?} must be empty or start with '/'"));
    }
    if key_env.is_empty() {
        return Err("KEY_ENV must not be empty".into());
    }
    Ok(Arg {
        name: name.to_string(),
        kind,
        listen,
        prefix: prefix.to_string(),
        key_env: key_env.to_string(),
    })
}

fn parse_args(args: &[String]) -> Result<Vec<Arg>, String> {
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--provider" | "-p" => match it.next() {
                Some(v) => out.push(parse_provider(v)?),
                None => return Err("--provider needs a value".into()),
            },
            other => match other.strip_prefix("--provider=") {
                Some(v) => out.push(parse_provider(v)?),
                None => return Err(format!("unexpected argument {other:?}")),
            },
        }
    }
    if out.is_empty() {
        return Err("at least one --provider is required".into());
    }
    Ok(out)
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn run(args: Vec<Arg>) -> ExitCode {
    // Resolve every credential before binding anything.
    let mut specs = Vec::with_capacity(args.len());
    for a in args {
        let api_key = match std::env::var(&a.key_env) {
            Ok(k) if !k.is_empty() => k,
            _ => {
                eprintln!(
                    "sluice-mock: environment variable {} (credential for provider {}) is not set or empty",
                    a.key_env, a.name
                );
                return ExitCode::FAILURE;
            }
        };
        specs.push(ProviderSpec {
            name: a.name,
            kind: a.kind,
            listen: a.listen,
            api_key,
            path_prefix: a.prefix,
        });
    }
    let mut servers = Vec::with_capacity(specs.len());
    for spec in specs {
        let (name, kind, listen) = (spec.name.clone(), spec.kind, spec.listen);
        match start(spec).await {
            Ok(s) => {
                s.set_logging(true);
                let kind = match kind {
                    ProviderKind::OpenAi => "openai",
                    ProviderKind::Anthropic => "anthropic",
                };
                println!("sluice-mock: {name} ({kind}) listening on {}", s.addr());
                servers.push(s);
            }
            Err(e) => {
                eprintln!("sluice-mock: {name}: cannot listen on {listen}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    wait_for_signal().await;
    eprintln!("sluice-mock: shutting down");
    for s in servers {
        s.shutdown().await;
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let parsed = match parse_args(&args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("sluice-mock: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sluice-mock: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(run(parsed))
}
