//! One relayed request, as plain Rust: the provider call made by the relay, its retries
//! before anything reached the client, its timeouts, and how it ends. Envoy's callbacks
//! arrive as events; what to do goes out through [`Host`]. The FFI layer (`host.rs`)
//! only translates.
//!
//! Why the relay exists: once Envoy's router has sent response headers, an upstream reset
//! or timeout resets the client's stream too, and no Proxy-Wasm filter can add a byte. The
//! relay owns the response instead, so a stream the provider broke off ends with an error
//! event in the client's API and a clean end of stream, which every SDK reports as an API
//! error (and Sluice's filter, before the relay, meters as a failed stream).
//!
//! Fallback (issue 18): [`CLUSTER_HEADER`] may name a chain of clusters. Attempt n goes to
//! the chain's n-th cluster (its last once the attempts outnumber it) and carries
//! [`ATTEMPT_HEADER`]` = n`. With a chain of several clusters, each cluster gets one
//! attempt: a reset or connect failure before response headers, or a status in
//! `retry.statuses`, moves to the next one at once (no back-off, no `retry-after`: that was
//! the failing deployment's). With one cluster, `retry` alone decides, as before.

use crate::chain::{self, ATTEMPT_HEADER};
use crate::config::RelayConfig;
use sluice::errors::{ApiError, ApiFlavour, ErrorKind};
use sluice::headers::{CLUSTER_HEADER, MAX_RETRIES_HEADER, RELAY_HEADER};
use std::sync::Arc;

pub type Header = (Vec<u8>, Vec<u8>);

/// Why Envoy could not even start the provider call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartFailure {
    ClusterNotFound,
    /// No healthy host, or the request could not be created.
    CannotCreate,
    /// Missing `:path`, `:method` or host: a bug upstream of the relay.
    MissingHeaders,
}

/// Why a provider stream ended early (Envoy's `AsyncClient::StreamResetReason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetReason {
    ConnectionFailure,
    ConnectionTermination,
    LocalReset,
    LocalRefusedStreamReset,
    Overflow,
    RemoteReset,
    RemoteRefusedStreamReset,
    ProtocolError,
}

impl ResetReason {
    pub fn from_abi(code: u32) -> Self {
        match code {
            0 => ResetReason::ConnectionFailure,
            1 => ResetReason::ConnectionTermination,
            2 => ResetReason::LocalReset,
            3 => ResetReason::LocalRefusedStreamReset,
            4 => ResetReason::Overflow,
            5 => ResetReason::RemoteReset,
            6 => ResetReason::RemoteRefusedStreamReset,
            _ => ResetReason::ProtocolError,
        }
    }

    /// Envoy's own spelling, as in its response code details.
    pub fn as_str(self) -> &'static str {
        match self {
            ResetReason::ConnectionFailure => "connection_failure",
            ResetReason::ConnectionTermination => "connection_termination",
            ResetReason::LocalReset => "local_reset",
            ResetReason::LocalRefusedStreamReset => "local_refused_stream_reset",
            ResetReason::Overflow => "overflow",
            ResetReason::RemoteReset => "remote_reset",
            ResetReason::RemoteRefusedStreamReset => "remote_refused_stream_reset",
            ResetReason::ProtocolError => "protocol_error",
        }
    }
}

/// What the relay asks of Envoy.
pub trait Host {
    /// Starts the provider call with the whole request; returns the stream's id.
    fn start_stream(
        &mut self,
        cluster: &[u8],
        headers: &[Header],
        body: &[u8],
    ) -> Result<u64, StartFailure>;
    fn reset_stream(&mut self, stream: u64);
    fn send_headers(&mut self, headers: &[Header], end_stream: bool);
    fn send_data(&mut self, data: &[u8], end_stream: bool);
    fn send_trailers(&mut self, trailers: &[Header]);
    /// Calls [`Exchange::on_timer`] at or after `at_ms` (earlier calls are harmless).
    fn wake_at(&mut self, at_ms: u64);
    /// Why the relay ended the exchange itself, for the access log (dynamic metadata),
    /// and how many provider attempts it made.
    fn note(&mut self, cause: &str, attempts: u32);
}

/// What the filter does with the request after its headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadersVerdict {
    /// Not a relayed request: Envoy's router takes it.
    Pass,
    /// The relay takes it: hold the request until its body is complete.
    Take,
}

struct Request {
    /// The clusters in attempt order, at least one.
    chain: Vec<Vec<u8>>,
    /// What the provider gets, [`ATTEMPT_HEADER`] included (set for each attempt).
    headers: Vec<Header>,
    body: Vec<u8>,
}

/// What follows a provider attempt that failed before anything reached the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Next {
    /// The next cluster of the chain, at once.
    MoveOn,
    /// The same cluster again, after a back-off.
    BackOff,
    /// No further attempt.
    GiveUp,
}

enum Phase {
    Start,
    Passing,
    Collecting,
    /// A provider attempt is open and nothing reached the client yet.
    Attempting {
        request: Request,
        stream: u64,
        last_activity_ms: u64,
    },
    /// Waiting before the next attempt.
    BackingOff {
        request: Request,
        until_ms: u64,
    },
    /// Response headers reached the client: from here on, nothing is retried.
    Streaming {
        stream: u64,
        last_activity_ms: u64,
    },
    Done,
}

/// Headers that describe one hop's connection, never forwarded by a proxy.
const HOP_BY_HOP: [&[u8]; 6] = [
    b"connection",
    b"transfer-encoding",
    b"keep-alive",
    b"proxy-connection",
    b"upgrade",
    b"te",
];

pub struct Exchange {
    config: Arc<RelayConfig>,
    phase: Phase,
    flavour: ApiFlavour,
    /// Provider attempts started so far.
    attempts: u32,
    /// Clusters in the request's chain (0 until the request is complete).
    chain_len: u32,
    deadline_ms: Option<u64>,
    /// The wake last asked of the host, so it is not asked twice.
    armed_ms: Option<u64>,
    jitter: u64,
}

impl Exchange {
    /// `seed` varies the back-off jitter between requests.
    pub fn new(config: Arc<RelayConfig>, seed: u64) -> Self {
        Exchange {
            config,
            phase: Phase::Start,
            flavour: ApiFlavour::OpenAi,
            attempts: 0,
            chain_len: 0,
            deadline_ms: None,
            armed_ms: None,
            jitter: seed | 1,
        }
    }

    /// The request's headers arrived; `marker` is Sluice's [`RELAY_HEADER`], if set.
    pub fn on_request_headers(&mut self, marker: Option<&[u8]>, now_ms: u64) -> HeadersVerdict {
        if !matches!(self.phase, Phase::Start) {
            return HeadersVerdict::Pass;
        }
        match marker.and_then(ApiFlavour::from_name) {
            None => {
                self.phase = Phase::Passing;
                HeadersVerdict::Pass
            }
            Some(flavour) => {
                self.flavour = flavour;
                self.phase = Phase::Collecting;
                if self.config.timeout_ms > 0 {
                    self.deadline_ms = Some(now_ms.saturating_add(self.config.timeout_ms));
                }
                HeadersVerdict::Take
            }
        }
    }

    pub fn is_taken(&self) -> bool {
        !matches!(self.phase, Phase::Start | Phase::Passing)
    }

    /// The whole request is here (Sluice's edits included): make the first attempt.
    pub fn on_request_complete(
        &mut self,
        host: &mut dyn Host,
        headers: Vec<Header>,
        body: Vec<u8>,
        now_ms: u64,
    ) {
        if !matches!(self.phase, Phase::Collecting) {
            return;
        }
        let mut cluster = None;
        let mut upstream: Vec<Header> = Vec::with_capacity(headers.len() + 2);
        for (name, value) in headers {
            if name == CLUSTER_HEADER.as_bytes() {
                cluster = Some(value);
            } else if name == RELAY_HEADER.as_bytes()
                || name == ATTEMPT_HEADER.as_bytes()
                // For Envoy's router; the relay makes its own attempts.
                || name == MAX_RETRIES_HEADER.as_bytes()
                || name == b"content-length"
                || HOP_BY_HOP.contains(&name.as_slice())
            {
                continue;
            } else {
                upstream.push((name, value));
            }
        }
        let chain: Vec<Vec<u8>> = cluster
            .as_deref()
            .map(chain::names)
            .unwrap_or_default()
            .into_iter()
            .map(<[u8]>::to_vec)
            .collect();
        if chain.is_empty() {
            let error = ApiError::new(
                ErrorKind::Internal,
                "The gateway relayed a request without a provider cluster.",
            );
            self.reply(host, &error, "relay_no_cluster");
            return;
        }
        self.chain_len = u32::try_from(chain.len()).unwrap_or(u32::MAX);
        upstream.push((
            b"content-length".to_vec(),
            body.len().to_string().into_bytes(),
        ));
        if chain.len() > 1 {
            // For the cluster's upstream filter, which rewrites attempts after the first.
            upstream.push((ATTEMPT_HEADER.as_bytes().to_vec(), b"1".to_vec()));
        }
        let request = Request {
            chain,
            headers: upstream,
            body,
        };
        self.attempt(host, request, now_ms);
    }

    fn attempt(&mut self, host: &mut dyn Host, mut request: Request, now_ms: u64) {
        self.attempts += 1;
        let n = self.attempts.to_string().into_bytes();
        for (_, value) in request
            .headers
            .iter_mut()
            .filter(|(name, _)| name == ATTEMPT_HEADER.as_bytes())
        {
            value.clone_from(&n);
        }
        let cluster = chain::cluster_index(request.chain.len(), self.attempts)
            .and_then(|i| request.chain.get(i))
            .map_or(&[][..], Vec::as_slice);
        let failure = match host.start_stream(cluster, &request.headers, &request.body) {
            Ok(stream) => {
                self.phase = Phase::Attempting {
                    request,
                    stream,
                    last_activity_ms: now_ms,
                };
                self.arm(host);
                return;
            }
            Err(failure) => failure,
        };
        if failure == StartFailure::CannotCreate {
            // No healthy host: the provider got nothing, as with a connect failure.
            let next = self.after_reset(ResetReason::ConnectionFailure);
            if next != Next::GiveUp {
                self.retry(host, request, next, None, now_ms);
                return;
            }
        }
        let (message, cause) = match failure {
            StartFailure::ClusterNotFound => (
                "The gateway has no upstream cluster for this provider.",
                "relay_cluster_not_found",
            ),
            StartFailure::MissingHeaders => (
                "The gateway could not build the provider request.",
                "relay_missing_headers",
            ),
            StartFailure::CannotCreate => (
                "The provider has no healthy upstream host.",
                "no_healthy_upstream",
            ),
        };
        self.reply(
            host,
            &ApiError::new(ErrorKind::UpstreamFailed, message),
            cause,
        );
    }

    /// A chain of several clusters gives each one attempt, in order.
    fn walks_chain(&self) -> bool {
        self.chain_len > 1
    }

    /// After a reset or connect failure before response headers: the next cluster of a
    /// chain whatever the reason; the same cluster as `retry` says.
    fn after_reset(&self, reason: ResetReason) -> Next {
        if self.walks_chain() {
            return if self.attempts < self.chain_len {
                Next::MoveOn
            } else {
                Next::GiveUp
            };
        }
        let retry = &self.config.retry;
        let allowed = retry.on_reset
            || (retry.on_connect_failure && reason == ResetReason::ConnectionFailure);
        if allowed && self.attempts <= retry.num_retries {
            Next::BackOff
        } else {
            Next::GiveUp
        }
    }

    /// After a provider's answer before the stream: along a chain, a status of
    /// `fallback_statuses` moves on; on one cluster, only a status in `retry.statuses` is
    /// tried again.
    fn after_status(&self, status: u16) -> Next {
        let retry = &self.config.retry;
        if self.walks_chain() {
            if self.config.fallback_statuses.contains(&status) && self.attempts < self.chain_len {
                Next::MoveOn
            } else {
                Next::GiveUp
            }
        } else if !retry.statuses.contains(&status) {
            Next::GiveUp
        } else if self.attempts <= retry.num_retries {
            Next::BackOff
        } else {
            Next::GiveUp
        }
    }

    fn retry(
        &mut self,
        host: &mut dyn Host,
        request: Request,
        next: Next,
        retry_after_ms: Option<u64>,
        now_ms: u64,
    ) {
        match next {
            Next::MoveOn => self.attempt(host, request, now_ms),
            Next::BackOff => self.back_off(host, request, retry_after_ms, now_ms),
            // Callers decide to give up before taking the request out of its phase.
            Next::GiveUp => self.phase = Phase::Done,
        }
    }

    /// Waits before the next attempt: the provider's `retry-after` when it is short enough,
    /// else a jittered exponential back-off (Envoy's).
    fn back_off(
        &mut self,
        host: &mut dyn Host,
        request: Request,
        retry_after_ms: Option<u64>,
        now_ms: u64,
    ) {
        let retry = &self.config.retry;
        let wait = match retry_after_ms {
            Some(ms) if ms <= retry.retry_after_max_ms => ms,
            _ => {
                let shift = self.attempts.saturating_sub(1).min(20);
                let ceiling = retry
                    .base_interval_ms
                    .saturating_mul(1 << shift)
                    .min(retry.max_interval_ms);
                self.next_random() % ceiling.max(1)
            }
        };
        self.phase = Phase::BackingOff {
            request,
            until_ms: now_ms.saturating_add(wait),
        };
        self.arm(host);
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64: jitter only, not security.
        let mut x = self.jitter;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.jitter = x;
        x
    }

    pub fn on_stream_headers(
        &mut self,
        host: &mut dyn Host,
        stream: u64,
        headers: &[Header],
        end_stream: bool,
        now_ms: u64,
    ) {
        let Phase::Attempting {
            stream: current, ..
        } = &self.phase
        else {
            return;
        };
        if *current != stream {
            return;
        }
        let status = header(headers, b":status")
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.parse::<u16>().ok())
            .unwrap_or(0);
        if is_envoy_local_reply(status, headers) {
            // Not the provider's answer: the connection failed or was reset before headers.
            self.on_stream_reset(host, stream, ResetReason::ConnectionFailure, now_ms);
            return;
        }
        let next = self.after_status(status);
        if next != Next::GiveUp {
            let retry_after_ms = header(headers, b"retry-after")
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(|s| s.saturating_mul(1000));
            host.reset_stream(stream);
            if let Phase::Attempting { request, .. } =
                std::mem::replace(&mut self.phase, Phase::Done)
            {
                self.retry(host, request, next, retry_after_ms, now_ms);
            }
            return;
        }
        let forwarded: Vec<Header> = headers
            .iter()
            .filter(|(n, _)| !HOP_BY_HOP.contains(&n.as_slice()))
            .cloned()
            .collect();
        host.send_headers(&forwarded, end_stream);
        self.phase = if end_stream {
            Phase::Done
        } else {
            Phase::Streaming {
                stream,
                last_activity_ms: now_ms,
            }
        };
        self.arm(host);
    }

    pub fn on_stream_data(
        &mut self,
        host: &mut dyn Host,
        stream: u64,
        chunks: &[&[u8]],
        end_stream: bool,
        now_ms: u64,
    ) {
        let Phase::Streaming {
            stream: current,
            last_activity_ms,
        } = &mut self.phase
        else {
            return;
        };
        if *current != stream {
            return;
        }
        *last_activity_ms = now_ms;
        let last = chunks.len().saturating_sub(1);
        for (i, chunk) in chunks.iter().enumerate() {
            host.send_data(chunk, end_stream && i == last);
        }
        if end_stream {
            if chunks.is_empty() {
                host.send_data(b"", true);
            }
            self.phase = Phase::Done;
        }
    }

    pub fn on_stream_trailers(&mut self, host: &mut dyn Host, stream: u64, trailers: &[Header]) {
        if matches!(self.phase, Phase::Streaming { stream: s, .. } if s == stream) {
            host.send_trailers(trailers);
            self.phase = Phase::Done;
        }
    }

    /// The provider stream finished; if the client's stream is still open (no end seen),
    /// end it.
    pub fn on_stream_complete(&mut self, host: &mut dyn Host, stream: u64) {
        if matches!(self.phase, Phase::Streaming { stream: s, .. } if s == stream) {
            host.send_data(b"", true);
            self.phase = Phase::Done;
        }
    }

    pub fn on_stream_reset(
        &mut self,
        host: &mut dyn Host,
        stream: u64,
        reason: ResetReason,
        now_ms: u64,
    ) {
        match &self.phase {
            Phase::Attempting { stream: s, .. } if *s == stream => {
                // A local reply (see `is_envoy_local_reply`) leaves the stream open.
                host.reset_stream(stream);
                let next = self.after_reset(reason);
                if next != Next::GiveUp {
                    if let Phase::Attempting { request, .. } =
                        std::mem::replace(&mut self.phase, Phase::Done)
                    {
                        self.retry(host, request, next, None, now_ms);
                    }
                    return;
                }
                let error = ApiError::new(
                    ErrorKind::UpstreamFailed,
                    format!(
                        "The provider could not be reached or refused the connection ({}).",
                        reason.as_str()
                    ),
                );
                let cause = format!(
                    "upstream_reset_before_response_started{{{}}}",
                    reason.as_str()
                );
                self.reply(host, &error, &cause);
            }
            Phase::Streaming { stream: s, .. } if *s == stream => {
                let error = ApiError::new(
                    ErrorKind::UpstreamFailed,
                    format!(
                        "The provider ended the stream before the response was complete ({}).",
                        reason.as_str()
                    ),
                );
                let cause = format!(
                    "upstream_reset_after_response_started{{{}}}",
                    reason.as_str()
                );
                self.end_stream_with(host, &error, &cause);
            }
            _ => {}
        }
    }

    /// A wake asked with [`Host::wake_at`] (or a stale one): checks every deadline.
    pub fn on_timer(&mut self, host: &mut dyn Host, now_ms: u64) {
        self.armed_ms = None;
        let overall = self.deadline_ms.is_some_and(|d| now_ms >= d);
        let idle = self.config.idle_timeout_ms;
        let stalled = |last: u64| idle > 0 && now_ms >= last.saturating_add(idle);
        match &self.phase {
            Phase::Attempting {
                stream,
                last_activity_ms,
                ..
            } if overall || stalled(*last_activity_ms) => {
                host.reset_stream(*stream);
                let (error, cause) = self.timeout_error(overall, "upstream_response_timeout");
                self.reply(host, &error, cause);
            }
            Phase::BackingOff { .. } if overall => {
                let (error, cause) = self.timeout_error(true, "upstream_response_timeout");
                self.reply(host, &error, cause);
            }
            Phase::BackingOff { until_ms, .. } if now_ms >= *until_ms => {
                if let Phase::BackingOff { request, .. } =
                    std::mem::replace(&mut self.phase, Phase::Done)
                {
                    self.attempt(host, request, now_ms);
                }
            }
            Phase::Streaming {
                stream,
                last_activity_ms,
            } if overall || stalled(*last_activity_ms) => {
                host.reset_stream(*stream);
                let (error, cause) = self.timeout_error(overall, "stream_idle_timeout");
                self.end_stream_with(host, &error, cause);
            }
            _ => self.arm(host),
        }
    }

    /// The client went away (or Envoy ends the stream): stop the provider call, and make
    /// no further attempt (a wake may still arrive for a back-off).
    pub fn on_downstream_gone(&mut self, host: &mut dyn Host) {
        match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::Attempting { stream, .. } | Phase::Streaming { stream, .. } => {
                host.reset_stream(stream);
            }
            Phase::Start | Phase::Passing => self.phase = Phase::Passing,
            Phase::Collecting | Phase::BackingOff { .. } | Phase::Done => {}
        }
    }

    fn timeout_error(&self, overall: bool, idle_cause: &'static str) -> (ApiError, &'static str) {
        if overall {
            let secs = self.config.timeout_ms / 1000;
            let error = ApiError::new(
                ErrorKind::UpstreamTimeout,
                format!("The provider did not complete the response within the gateway's {secs} s limit."),
            );
            (error, "relay_timeout")
        } else {
            let secs = self.config.idle_timeout_ms / 1000;
            let error = ApiError::new(
                ErrorKind::UpstreamTimeout,
                format!("The provider sent nothing for {secs} s; the gateway stopped waiting."),
            );
            (error, idle_cause)
        }
    }

    /// Nothing reached the client yet: answer with a complete error in its API.
    fn reply(&mut self, host: &mut dyn Host, error: &ApiError, cause: &str) {
        let reply = error.reply(self.flavour);
        let mut headers: Vec<Header> =
            vec![(b":status".to_vec(), reply.status.to_string().into_bytes())];
        headers.extend(
            reply
                .headers
                .iter()
                .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec())),
        );
        // Noted first: the last send may complete the stream and write the access log.
        host.note(cause, self.attempts);
        host.send_headers(&headers, false);
        host.send_data(reply.body.as_bytes(), true);
        self.phase = Phase::Done;
    }

    /// The client's stream started: end it with an error event, then end of stream.
    fn end_stream_with(&mut self, host: &mut dyn Host, error: &ApiError, cause: &str) {
        host.note(cause, self.attempts);
        host.send_data(error.stream_event(self.flavour).as_bytes(), true);
        self.phase = Phase::Done;
    }

    /// Asks the host for a wake at the next deadline, if it is not already asked.
    fn arm(&mut self, host: &mut dyn Host) {
        let idle = self.config.idle_timeout_ms;
        let idle_at = |last: u64| (idle > 0).then(|| last.saturating_add(idle));
        let phase_at = match &self.phase {
            Phase::Attempting {
                last_activity_ms, ..
            }
            | Phase::Streaming {
                last_activity_ms, ..
            } => idle_at(*last_activity_ms),
            Phase::BackingOff { until_ms, .. } => Some(*until_ms),
            _ => return,
        };
        let next = match (phase_at, self.deadline_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Some(at) = next {
            if self.armed_ms.is_none_or(|armed| at < armed) {
                self.armed_ms = Some(at);
                host.wake_at(at);
            }
        }
    }
}

/// Envoy's async client answers a connect failure or a reset before response headers with
/// a local reply of its own router (`upstream connect error or disconnect/reset before
/// headers`), not a stream reset. It is plain text and, never having crossed a codec, has
/// no `date` header; a provider's 5xx always has one.
fn is_envoy_local_reply(status: u16, headers: &[Header]) -> bool {
    (502..=504).contains(&status)
        && header(headers, b"date").is_none()
        && header(headers, b"content-type").is_some_and(|v| v.starts_with(b"text/plain"))
}

fn header<'h>(headers: &'h [Header], name: &[u8]) -> Option<&'h [u8]> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_slice())
}

#[cfg(test)]
mod tests;
