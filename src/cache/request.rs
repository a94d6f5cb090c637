//! Which requests the cache may answer, and their keys.
//!
//! The key is SHA-256 over the tenant, the resolved model, the endpoint (API and query
//! string) and the body's canonical JSON (keys sorted, no insignificant whitespace,
//! without `model`, already in the key as the resolved model, and without
//! `stream_options.include_usage`, which changes only what the replay strips). Each part is
//! length-prefixed, so no choice of names or body can make two tenants' keys meet.
//!
//! Not cached (the request goes upstream as a bypass):
//! - the client says so: `cache-control: no-store` (`no-cache` refreshes instead: fetched
//!   upstream and stored, never read);
//! - sampled output: `temperature` above the rule's `max_temperature` (0 by default; a
//!   request without `temperature` is sampled at the APIs' default, 1); embeddings have no
//!   sampling;
//! - several choices: `n` above 1;
//! - tools run by the provider (`web_search`, `code_interpreter`, ...: any tool whose
//!   `type` is not `function` or `custom`): their results change with the world.

use super::{CacheKey, CacheRule};
use crate::routing::Api;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// What the client's `cache-control` asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Directive {
    #[default]
    Use,
    /// `no-cache`: do not answer from the cache, but store the fresh response.
    Refresh,
    /// `no-store`: neither read nor write.
    Bypass,
}

impl Directive {
    pub fn from_cache_control(value: Option<&str>) -> Directive {
        let mut directive = Directive::Use;
        for token in value.unwrap_or_default().split(',') {
            let token = token.trim();
            if token.eq_ignore_ascii_case("no-store") {
                return Directive::Bypass;
            }
            if token.eq_ignore_ascii_case("no-cache") {
                directive = Directive::Refresh;
            }
        }
        directive
    }
}

/// What the cache does for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    /// Neither read nor write.
    Bypass,
    /// Fetch upstream and store under the key.
    Refresh(CacheKey),
    /// Answer from the cache, or fetch (once) and store.
    Lookup(CacheKey),
}

/// The request's identity: whose, for which model, through which endpoint.
pub struct Identity<'a> {
    pub tenant: &'a str,
    pub model: &'a str,
    pub api: Api,
    pub query: &'a str,
}

/// What the cache does for `body` under `rule`.
pub fn assess(rule: &CacheRule, directive: Directive, who: &Identity, body: &[u8]) -> Ask {
    if directive == Directive::Bypass {
        return Ask::Bypass;
    }
    let Ok(Value::Object(mut fields)) = serde_json::from_slice::<Value>(body) else {
        return Ask::Bypass;
    };
    if !cacheable(rule, who.api, &fields) {
        return Ask::Bypass;
    }
    fields.remove("model");
    if let Some(Value::Object(options)) = fields.get_mut("stream_options") {
        options.remove("include_usage");
        if options.is_empty() {
            fields.remove("stream_options");
        }
    }
    // serde_json's map is sorted by key: this is the canonical form.
    let Ok(canonical) = serde_json::to_vec(&Value::Object(fields)) else {
        return Ask::Bypass;
    };
    let key = key(who, &canonical);
    match directive {
        Directive::Refresh => Ask::Refresh(key),
        _ => Ask::Lookup(key),
    }
}

fn cacheable(rule: &CacheRule, api: Api, fields: &serde_json::Map<String, Value>) -> bool {
    if fields
        .get("n")
        .and_then(Value::as_f64)
        .is_some_and(|n| n > 1.0)
    {
        return false;
    }
    if api != Api::Embeddings {
        let temperature = match fields.get("temperature") {
            None | Some(Value::Null) => 1.0,
            Some(t) => t.as_f64().unwrap_or(f64::INFINITY),
        };
        if temperature > rule.max_temperature {
            return false;
        }
    }
    let server_tool = |tool: &Value| {
        tool.get("type")
            .and_then(Value::as_str)
            .is_some_and(|t| t != "function" && t != "custom")
    };
    match fields.get("tools") {
        Some(Value::Array(tools)) => !tools.iter().any(server_tool),
        _ => true,
    }
}

/// SHA-256 over length-prefixed parts.
fn key(who: &Identity, canonical: &[u8]) -> CacheKey {
    let mut hash = Sha256::new();
    hash.update(b"sluice-cache-1");
    let api = match who.api {
        Api::ChatCompletions => "chat.completions",
        Api::Embeddings => "embeddings",
        Api::Responses => "responses",
        Api::Messages => "messages",
        Api::CountTokens => "count_tokens",
    };
    let parts: [&[u8]; 5] = [
        who.tenant.as_bytes(),
        who.model.as_bytes(),
        api.as_bytes(),
        who.query.as_bytes(),
        canonical,
    ];
    for part in parts {
        hash.update((part.len() as u64).to_le_bytes());
        hash.update(part);
    }
    CacheKey(hash.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule() -> CacheRule {
        CacheRule {
            models: vec![true],
            ttl_ms: 60_000,
            max_entry_bytes: 65_536,
            max_temperature: 0.0,
            hit_price_ppm: 0,
            wait_ms: 10_000,
        }
    }

    fn who(tenant: &str) -> Identity<'_> {
        Identity {
            tenant,
            model: "gpt-4.1",
            api: Api::ChatCompletions,
            query: "",
        }
    }

    fn lookup(tenant: &str, body: &str) -> Option<CacheKey> {
        match assess(&rule(), Directive::Use, &who(tenant), body.as_bytes()) {
            Ask::Lookup(key) => Some(key),
            _ => None,
        }
    }

    const BODY: &str =
        r#"{"model":"gpt-4.1","temperature":0,"messages":[{"role":"user","content":"hi"}]}"#;

    #[test]
    fn whitespace_key_order_model_alias_and_include_usage_do_not_change_the_key() {
        let key = lookup("acme", BODY).unwrap();
        let reordered = r#"{ "messages" : [ {"content":"hi", "role":"user"} ],
            "temperature": 0, "model": "my-alias" }"#;
        assert_eq!(lookup("acme", reordered), Some(key));
        let streamed = lookup(
            "acme",
            r#"{"model":"gpt-4.1","temperature":0,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
        )
        .unwrap();
        assert_ne!(streamed, key, "a stream is another response");
        let with_usage = lookup(
            "acme",
            r#"{"model":"gpt-4.1","temperature":0,"stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}"#,
        );
        assert_eq!(with_usage, Some(streamed));
        let other = lookup("acme", &BODY.replace("hi", "hello"));
        assert_ne!(other, Some(key));
    }

    #[test]
    fn another_tenant_model_endpoint_or_query_never_shares_a_key() {
        let key = lookup("acme", BODY).unwrap();
        assert_ne!(lookup("globex", BODY), Some(key));
        // Length prefixes: moving bytes between parts changes the key.
        let shifted = Identity {
            tenant: "acmeg",
            model: "pt-4.1",
            ..who("")
        };
        assert_ne!(
            assess(&rule(), Directive::Use, &shifted, BODY.as_bytes()),
            Ask::Lookup(key)
        );
        for changed in [
            Identity {
                model: "gpt-4.1-mini",
                ..who("acme")
            },
            Identity {
                api: Api::Responses,
                ..who("acme")
            },
            Identity {
                query: "?x=1",
                ..who("acme")
            },
        ] {
            assert_ne!(
                assess(&rule(), Directive::Use, &changed, BODY.as_bytes()),
                Ask::Lookup(key)
            );
        }
    }

    #[test]
    fn sampled_multiple_choice_and_server_tool_requests_bypass() {
        let bypass = |body: &str| assess(&rule(), Directive::Use, &who("a"), body.as_bytes());
        let msgs = r#""messages":[{"role":"user","content":"hi"}]"#;
        assert_eq!(bypass(&format!(r#"{{"model":"m",{msgs}}}"#)), Ask::Bypass);
        assert_eq!(
            bypass(&format!(r#"{{"model":"m","temperature":0.7,{msgs}}}"#)),
            Ask::Bypass
        );
        assert_eq!(
            bypass(&format!(r#"{{"model":"m","temperature":0,"n":2,{msgs}}}"#)),
            Ask::Bypass
        );
        let search = format!(
            r#"{{"model":"m","temperature":0,"tools":[{{"type":"web_search_20250305","name":"web_search"}}],{msgs}}}"#
        );
        assert_eq!(bypass(&search), Ask::Bypass);
        let function = format!(
            r#"{{"model":"m","temperature":0,"n":1,"tools":[{{"type":"function","function":{{"name":"f"}}}},{{"name":"g","input_schema":{{}}}}],{msgs}}}"#
        );
        assert!(matches!(bypass(&function), Ask::Lookup(_)));
        // A rule that allows sampling caches a request without a temperature.
        let sampled = CacheRule {
            max_temperature: 1.0,
            ..rule()
        };
        let plain = format!(r#"{{"model":"m",{msgs}}}"#);
        assert!(matches!(
            assess(&sampled, Directive::Use, &who("a"), plain.as_bytes()),
            Ask::Lookup(_)
        ));
        // Embeddings are not sampled.
        let embeddings = Identity {
            api: Api::Embeddings,
            ..who("a")
        };
        assert!(matches!(
            assess(
                &rule(),
                Directive::Use,
                &embeddings,
                br#"{"model":"e","input":"x"}"#
            ),
            Ask::Lookup(_)
        ));
    }

    #[test]
    fn cache_control_bypasses_or_refreshes() {
        assert_eq!(Directive::from_cache_control(None), Directive::Use);
        assert_eq!(
            Directive::from_cache_control(Some("max-age=0, No-Cache")),
            Directive::Refresh
        );
        assert_eq!(
            Directive::from_cache_control(Some("no-cache, no-store")),
            Directive::Bypass
        );
        let key = lookup("acme", BODY).unwrap();
        assert_eq!(
            assess(&rule(), Directive::Refresh, &who("acme"), BODY.as_bytes()),
            Ask::Refresh(key)
        );
        assert_eq!(
            assess(&rule(), Directive::Bypass, &who("acme"), BODY.as_bytes()),
            Ask::Bypass
        );
    }
}
