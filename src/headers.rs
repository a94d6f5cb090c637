//! Request headers as the host hands them over: lowercase names, raw byte values.
//!
//! Values stay bytes because a client may send non-UTF-8 header values, and the SDK's
//! string accessors would trap on them.

/// Headers the gateway sets for Envoy and must never accept from a client.
pub const INTERNAL_PREFIX: &str = "x-sluice-";
/// Route header: the clusters of the request's attempts, in order, comma-separated (one
/// without fallback). The route's cluster specifier (the relay module) picks attempt n's.
pub const CLUSTER_HEADER: &str = "x-sluice-cluster";
/// The stream relay's attempt number, read (and removed) by Sluice's upstream filter.
pub const ATTEMPT_HEADER: &str = "x-sluice-attempt";
/// Envoy's own: the most retries of this request (each a fallback to its next deployment).
pub const MAX_RETRIES_HEADER: &str = "x-envoy-max-retries";
/// Marks a streamed request for Sluice's stream relay (the native `sluice-relay` filter after
/// this one), naming the API whose error event ends a stream the provider broke off:
/// `openai` or `anthropic`. The relay removes it; configurations without the relay drop it
/// with the routing header.
pub const RELAY_HEADER: &str = "x-sluice-relay";

#[derive(Debug, Default, Clone)]
pub struct RequestHeaders {
    pairs: Vec<(String, Vec<u8>)>,
}

impl RequestHeaders {
    pub fn from_pairs(pairs: Vec<(String, Vec<u8>)>) -> Self {
        RequestHeaders { pairs }
    }

    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.pairs
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    pub fn get_str(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.pairs
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// Distinct names of client-sent headers that only the gateway may set.
    pub fn internal_names(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for (n, _) in &self.pairs {
            let lower = n.to_ascii_lowercase();
            if lower.starts_with(INTERNAL_PREFIX) && !names.contains(&lower) {
                names.push(lower);
            }
        }
        names
    }
}
