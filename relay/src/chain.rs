//! Fallback across provider deployments (issue 18), as plain Rust.
//!
//! Sluice sets [`CLUSTER_HEADER`](sluice::headers::CLUSTER_HEADER) to a chain of Envoy
//! cluster names in attempt order, comma-separated (`openai_a,openai_b,deepseek`; one name
//! when there is no fallback). Attempt n goes to `chain[min(n, len) - 1]`: the route's
//! cluster specifier (`specifier.rs`) picks it for each of the router's attempts, and the
//! relay for each of its own.
//!
//! The route removes the header when the router takes the request, before any retry: the
//! relay filter copies a chain into the dynamic metadata [`METADATA_NAMESPACE`]:[`METADATA_KEY`],
//! which the specifier reads first.

use serde::Deserialize;

/// Dynamic metadata namespace and key holding the chain for the router's retries.
pub const METADATA_NAMESPACE: &str = "sluice.route";
pub const METADATA_KEY: &str = "chain";
/// The relay's attempt number, for the cluster's upstream filter (which removes it).
pub use sluice::headers::ATTEMPT_HEADER;

/// The cluster names of a chain, in attempt order: comma-separated, blanks around a name
/// and empty entries ignored.
pub fn names(chain: &[u8]) -> Vec<&[u8]> {
    chain
        .split(|b| *b == b',')
        .map(|name| name.trim_ascii())
        .filter(|name| !name.is_empty())
        .collect()
}

/// The chain, when the header names more than one cluster: what the relay filter keeps in
/// the dynamic metadata for the router's retries.
pub fn route_metadata(header: &[u8]) -> Option<&[u8]> {
    (names(header).len() > 1).then_some(header)
}

/// The router's attempt number from the stream's attempt count (`upstream.request_attempt_count`):
/// Envoy sets it before it asks the specifier again for a retry (the request's
/// `x-envoy-attempt-count` still holds the previous attempt's number then), and has not set it
/// yet (0, or unavailable) for the first attempt.
pub fn attempt_number(count: Option<u64>) -> u32 {
    count
        .and_then(|n| u32::try_from(n).ok())
        .filter(|n| *n > 0)
        .unwrap_or(1)
}

/// Where attempt `attempt` (1-based) goes in a chain of `len` clusters: the n-th, or the
/// last once the attempts outnumber them; `None` for an empty chain.
pub fn cluster_index(len: usize, attempt: u32) -> Option<usize> {
    if len == 0 {
        return None;
    }
    let n = usize::try_from(attempt.max(1)).unwrap_or(usize::MAX);
    Some(n.min(len) - 1)
}

/// The cluster specifier's decision: the chain from the metadata if set, else from the
/// header; `attempt` from [`attempt_number`]. `None`: nothing to select.
pub fn select<'a>(
    metadata: Option<&'a [u8]>,
    header: Option<&'a [u8]>,
    attempt: u32,
) -> Option<&'a [u8]> {
    let chain = metadata
        .map(names)
        .filter(|names| !names.is_empty())
        .or_else(|| header.map(names))?;
    cluster_index(chain.len(), attempt).map(|i| chain[i])
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpecifierConfig {}

/// The cluster specifier's `specifier_config`: empty or `{}` (it has no settings yet; an
/// unknown field fails the configuration load, naming it).
pub fn parse_specifier_config(json: &[u8]) -> Result<(), String> {
    if json.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    let de = &mut serde_json::Deserializer::from_slice(json);
    serde_path_to_error::deserialize::<_, RawSpecifierConfig>(de)
        .map(|_| ())
        .map_err(|e| {
            let path = e.path().to_string();
            format!(
                "sluice-relay cluster specifier configuration: {path}: {}",
                e.into_inner()
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_is_split_on_commas() {
        assert_eq!(names(b"openai"), vec![b"openai".as_slice()]);
        assert_eq!(
            names(b"openai_a, openai_b ,,deepseek,"),
            vec![
                b"openai_a".as_slice(),
                b"openai_b".as_slice(),
                b"deepseek".as_slice()
            ]
        );
        assert!(names(b" , ").is_empty());
        assert!(names(b"").is_empty());
    }

    #[test]
    fn only_a_chain_of_several_goes_to_the_metadata() {
        assert_eq!(route_metadata(b"a,b"), Some(b"a,b".as_slice()));
        assert_eq!(route_metadata(b"openai"), None);
        assert_eq!(route_metadata(b"openai,"), None);
        assert_eq!(route_metadata(b""), None);
    }

    #[test]
    fn attempt_numbers() {
        // The first attempt: the count is not set yet.
        assert_eq!(attempt_number(None), 1);
        assert_eq!(attempt_number(Some(0)), 1);
        assert_eq!(attempt_number(Some(1)), 1);
        assert_eq!(attempt_number(Some(3)), 3);
        assert_eq!(attempt_number(Some(u64::MAX)), 1);
    }

    #[test]
    fn attempt_n_goes_to_the_nth_cluster_then_stays_on_the_last() {
        let chain = names(b"a,b,c");
        let pick = |n| cluster_index(chain.len(), n).map(|i| chain[i]);
        assert_eq!(pick(0), Some(b"a".as_slice()));
        assert_eq!(pick(1), Some(b"a".as_slice()));
        assert_eq!(pick(2), Some(b"b".as_slice()));
        assert_eq!(pick(3), Some(b"c".as_slice()));
        assert_eq!(pick(4), Some(b"c".as_slice()));
        assert_eq!(pick(u32::MAX), Some(b"c".as_slice()));
        assert_eq!(cluster_index(0, 1), None);
    }

    #[test]
    fn the_metadata_wins_over_the_header() {
        assert_eq!(select(Some(b"a,b"), Some(b"x,y"), 2), Some(b"b".as_slice()));
        // After the route removed the header, only the metadata is left.
        assert_eq!(select(Some(b"a,b"), None, 2), Some(b"b".as_slice()));
        // No chain in the metadata: the header (a single cluster, today's routing).
        assert_eq!(select(None, Some(b"openai"), 1), Some(b"openai".as_slice()));
        assert_eq!(select(None, Some(b"openai"), 3), Some(b"openai".as_slice()));
        assert_eq!(
            select(Some(b" , "), Some(b"openai"), 1),
            Some(b"openai".as_slice())
        );
        // Nothing to select from.
        assert_eq!(select(None, None, 1), None);
        assert_eq!(select(None, Some(b","), 1), None);
    }

    #[test]
    fn the_specifier_config_is_strict() {
        assert!(parse_specifier_config(b"").is_ok());
        assert!(parse_specifier_config(b" {} ").is_ok());
        let e = parse_specifier_config(br#"{"chain_header":"x"}"#).unwrap_err();
        assert!(e.contains("chain_header"), "{e}");
        assert!(parse_specifier_config(b"openai").is_err());
    }
}
