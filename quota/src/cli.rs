//! Command line and environment.

use std::net::SocketAddr;

pub const USAGE: &str = "\
usage: sluice-quota [--listen ADDR] [--redis URL | --redis-cluster URL,URL,...]

Sluice's quota service: decides global limits with Redis scripts; holds no state.

  --listen ADDR  where to serve HTTP/1.1 and h2c (env SLUICE_QUOTA_LISTEN,
                 default 127.0.0.1:18090; port 0 picks a free port)
  --redis URL    the Redis (or Valkey) to use (env SLUICE_REDIS_URL,
                 default redis://127.0.0.1:6379/)
  --redis-cluster URL,URL,...
                 a Redis Cluster instead, by some of its nodes (env
                 SLUICE_REDIS_CLUSTER); calls are split by hash slot
  -h, --help     this text

Flags override the environment. Starts while Redis is down, answering 503 until it is up.

Tests only: SLUICE_QUOTA_FAULT_SLOW_SETTLES=N:MS answers the first N settlements MS late
(after applying them), to show that a retried settlement counts once.";

pub const DEFAULT_LISTEN: &str = "127.0.0.1:18090";
pub const DEFAULT_REDIS: &str = "redis://127.0.0.1:6379/";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub listen: SocketAddr,
    pub redis_url: String,
    /// Nodes of a Redis Cluster to use instead of `redis_url`.
    pub redis_cluster: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Run(Options),
    Help,
}

/// `args` without the program name; `env` reads an environment variable.
pub fn parse(args: &[String], env: impl Fn(&str) -> Option<String>) -> Result<Command, String> {
    let mut listen = env("SLUICE_QUOTA_LISTEN").unwrap_or_else(|| DEFAULT_LISTEN.to_string());
    let mut redis_url = env("SLUICE_REDIS_URL").unwrap_or_else(|| DEFAULT_REDIS.to_string());
    let mut cluster = env("SLUICE_REDIS_CLUSTER").unwrap_or_default();
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag, Some(value.to_string())),
            _ => (arg.as_str(), None),
        };
        let target = match flag {
            "-h" | "--help" => return Ok(Command::Help),
            "--listen" => &mut listen,
            "--redis" => &mut redis_url,
            "--redis-cluster" => &mut cluster,
            other => return Err(format!("unknown argument {other:?}")),
        };
        *target = match inline.or_else(|| rest.next().cloned()) {
            Some(value) => value,
            None => return Err(format!("{flag} needs a value")),
        };
    }
    let listen = listen
        .parse()
        .map_err(|problem| format!("listen address {listen:?}: {problem}"))?;
    let nodes: Vec<String> = cluster
        .split(',')
        .map(str::trim)
        .filter(|node| !node.is_empty())
        .map(str::to_string)
        .collect();
    Ok(Command::Run(Options {
        listen,
        redis_url,
        redis_cluster: (!nodes.is_empty()).then_some(nodes),
    }))
}

/// The URL without its password, for logs.
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.split_once('@') {
        Some((_, host)) => format!("{scheme}://***@{host}"),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|arg| arg.to_string()).collect()
    }

    #[test]
    fn flags_override_env_and_defaults_apply() {
        let none = |_: &str| None;
        assert_eq!(
            parse(&[], none),
            Ok(Command::Run(Options {
                listen: DEFAULT_LISTEN.parse().unwrap(),
                redis_url: DEFAULT_REDIS.into(),
                redis_cluster: None,
            }))
        );
        let env = |name: &str| match name {
            "SLUICE_QUOTA_LISTEN" => Some("127.0.0.1:1".to_string()),
            "SLUICE_REDIS_URL" => Some("redis://env/".to_string()),
            _ => None,
        };
        assert_eq!(
            parse(&[], env),
            Ok(Command::Run(Options {
                listen: "127.0.0.1:1".parse().unwrap(),
                redis_url: "redis://env/".into(),
                redis_cluster: None,
            }))
        );
        assert_eq!(
            parse(
                &args(&["--listen", "127.0.0.1:2", "--redis=redis://flag/"]),
                env
            ),
            Ok(Command::Run(Options {
                listen: "127.0.0.1:2".parse().unwrap(),
                redis_url: "redis://flag/".into(),
                redis_cluster: None,
            }))
        );
        let Ok(Command::Run(options)) = parse(
            &args(&["--redis-cluster", "redis://a:1/, redis://b:2/"]),
            none,
        ) else {
            panic!("a cluster by its nodes");
        };
        assert_eq!(
            options.redis_cluster,
            Some(vec!["redis://a:1/".to_string(), "redis://b:2/".to_string()])
        );
        assert_eq!(parse(&args(&["--help"]), none), Ok(Command::Help));
        assert!(parse(&args(&["--listen"]), none).is_err());
        assert!(parse(&args(&["--listen", "nowhere"]), none).is_err());
        assert!(parse(&args(&["--port", "1"]), none).is_err());
    }

    #[test]
    fn passwords_stay_out_of_logs() {
        assert_eq!(
            redacted("redis://user:secret@host:6379/0"),
            "redis://***@host:6379/0"
        );
        assert_eq!(redacted("redis://host:6379/"), "redis://host:6379/");
    }
}
