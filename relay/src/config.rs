//! The relay's configuration (the filter's `filter_config`, a JSON string), parsed once and
//! strictly: an unknown field is an error naming it.
//!
//! The relay makes the provider call itself, so the route's `timeout`, `idle_timeout` and
//! `retry_policy` do not apply to the streams it carries: these fields take their place,
//! with the same meaning.

use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    idle_timeout_ms: Option<u64>,
    #[serde(default)]
    retry: Option<RawRetry>,
    #[serde(default)]
    fallback_statuses: Option<Vec<u16>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    num_retries: u32,
    #[serde(default)]
    on_reset: Option<bool>,
    #[serde(default)]
    on_connect_failure: Option<bool>,
    #[serde(default)]
    statuses: Option<Vec<u16>>,
    #[serde(default)]
    base_interval_ms: Option<u64>,
    #[serde(default)]
    max_interval_ms: Option<u64>,
    #[serde(default)]
    retry_after_max_ms: Option<u64>,
}

/// When a provider attempt that sent nothing downstream yet is tried again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts after the first.
    pub num_retries: u32,
    /// Any reset before response headers, including one after the provider got the
    /// request (Envoy's `reset`): a retried generation may be billed twice.
    pub on_reset: bool,
    /// Only a failure to connect (Envoy's `connect-failure`): the provider got nothing.
    pub on_connect_failure: bool,
    /// Response statuses tried again (Envoy's `retriable-status-codes`).
    pub statuses: Vec<u16>,
    /// Jittered exponential back-off: the n-th retry waits up to base × 2^(n-1), capped.
    pub base_interval_ms: u64,
    pub max_interval_ms: u64,
    /// A provider's `retry-after` (seconds) is waited out when at most this long;
    /// otherwise the regular back-off applies.
    pub retry_after_max_ms: u64,
}

impl RetryPolicy {
    pub const NONE: RetryPolicy = RetryPolicy {
        num_retries: 0,
        on_reset: false,
        on_connect_failure: false,
        statuses: Vec::new(),
        base_interval_ms: 25,
        max_interval_ms: 250,
        retry_after_max_ms: 0,
    };
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayConfig {
    /// The whole exchange, from the request's start to the response's end; 0: none.
    pub timeout_ms: u64,
    /// Longest wait for the provider's next bytes (headers or data); 0: none.
    pub idle_timeout_ms: u64,
    pub retry: RetryPolicy,
    /// Provider statuses that send a stream with a chain of clusters on to the next one
    /// (default 429, 500, 502, 503, 529, as Sluice's `fallback.statuses`).
    pub fallback_statuses: Vec<u16>,
}

/// Envoy's own default for a route is 15 s for the response to start, which a relayed
/// stream would rarely want: the relay's default is no overall limit and a 4-minute stall
/// limit, under Envoy's default 5-minute `stream_idle_timeout` (which would reset the
/// client's stream instead of ending it with an error event).
const DEFAULT_IDLE_TIMEOUT_MS: u64 = 240_000;

pub fn parse(json: &[u8]) -> Result<RelayConfig, String> {
    let json = if json.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        json
    };
    let de = &mut serde_json::Deserializer::from_slice(json);
    let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        format!("sluice-relay configuration: {path}: {}", e.into_inner())
    })?;
    let retry = match raw.retry {
        None => RetryPolicy::NONE,
        Some(r) => {
            let base = r.base_interval_ms.unwrap_or(25);
            let max = r.max_interval_ms.unwrap_or(base.saturating_mul(10));
            if base == 0 || max < base {
                return Err("sluice-relay configuration: retry: base_interval_ms must be at least 1 and at most max_interval_ms".into());
            }
            if let Some(s) = r
                .statuses
                .iter()
                .flatten()
                .find(|s| !(100..=599).contains(*s))
            {
                return Err(format!(
                    "sluice-relay configuration: retry.statuses: {s} is not an HTTP status"
                ));
            }
            RetryPolicy {
                num_retries: r.num_retries,
                on_reset: r.on_reset.unwrap_or(false),
                on_connect_failure: r.on_connect_failure.unwrap_or(true),
                statuses: r.statuses.unwrap_or_default(),
                base_interval_ms: base,
                max_interval_ms: max,
                retry_after_max_ms: r.retry_after_max_ms.unwrap_or(0),
            }
        }
    };
    let fallback_statuses = raw
        .fallback_statuses
        .unwrap_or_else(|| vec![429, 500, 502, 503, 529]);
    if let Some(s) = fallback_statuses.iter().find(|s| !(400..=599).contains(*s)) {
        return Err(format!(
            "sluice-relay configuration: fallback_statuses: {s} is not an HTTP error status"
        ));
    }
    Ok(RelayConfig {
        fallback_statuses,
        timeout_ms: raw.timeout_ms.unwrap_or(0),
        idle_timeout_ms: raw.idle_timeout_ms.unwrap_or(DEFAULT_IDLE_TIMEOUT_MS),
        retry,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_full_form() {
        let c = parse(b"").unwrap();
        assert_eq!(
            (c.timeout_ms, c.idle_timeout_ms, c.retry.num_retries),
            (0, 240_000, 0)
        );
        let c = parse(
            br#"{"timeout_ms":600000,"idle_timeout_ms":120000,"retry":{"num_retries":2,
                "statuses":[429,503],"base_interval_ms":250,"max_interval_ms":5000,
                "retry_after_max_ms":20000}}"#,
        )
        .unwrap();
        assert_eq!(c.timeout_ms, 600_000);
        assert_eq!(c.idle_timeout_ms, 120_000);
        assert!(!c.retry.on_reset, "a second bill is opt-in");
        assert!(c.retry.on_connect_failure);
        assert_eq!(c.retry.statuses, vec![429, 503]);
        assert_eq!(c.retry.retry_after_max_ms, 20_000);
    }

    #[test]
    fn strict() {
        let e = parse(br#"{"timeout":1}"#).unwrap_err();
        assert!(e.contains("timeout"), "{e}");
        let e = parse(br#"{"retry":{"num_retries":1,"on":["reset"]}}"#).unwrap_err();
        assert!(e.contains("retry"), "{e}");
        assert!(parse(br#"{"retry":{"num_retries":1,"statuses":[42]}}"#).is_err());
        assert!(parse(br#"{"retry":{"num_retries":1,"base_interval_ms":0}}"#).is_err());
        assert!(parse(br#"{"timeout_ms":-1}"#).is_err());
    }
}
