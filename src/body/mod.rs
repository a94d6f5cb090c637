//! The request body, read once: the few fields the gateway needs (`model`, streaming,
//! the output cap) and the prompt-token estimate ([`prompt`]), checked strictly so that a
//! body a provider would refuse is refused here; and the byte-exact rewrites forwarding
//! needs ([`rewrite`]). Everything request-side lives here; `usage/` reads responses.

mod prompt;
mod rewrite;

pub use prompt::{Content, Input, Messages, PromptParts, TextOnly};
pub use rewrite::{
    inject_include_usage, replace_model, replace_model_reserialized, set_output_cap,
};

use crate::errors::{ApiError, ErrorKind};
use serde::Deserialize;
use std::borrow::Cow;

/// Longest model name accepted from a client.
pub const MAX_MODEL_LEN: usize = 256;
/// Deepest JSON nesting accepted (serde_json's own recursion limit); deeper bodies are
/// refused here rather than passed to a provider's parser.
pub const MAX_DEPTH: usize = 128;

/// What the gateway reads from a request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestFields {
    pub model: String,
    pub stream: bool,
    /// `stream_options.include_usage` is true: the client wants the usage chunk.
    pub include_usage: bool,
    /// The output cap the client set (`max_tokens`, `max_completion_tokens` or
    /// `max_output_tokens`; the largest if several), used to reserve tokens.
    pub max_output_tokens: Option<u64>,
    /// The field `max_output_tokens` came from.
    pub max_output_field: Option<&'static str>,
    /// What the prompt-token estimate needs, counted during the same parse.
    pub prompt: PromptParts,
}

#[derive(Deserialize)]
struct Probe<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptionsProbe>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    max_output_tokens: Option<u64>,
    // Counted, not stored: the prompt estimate without a second parse of the body.
    #[serde(default)]
    messages: Messages,
    #[serde(default)]
    system: Content,
    #[serde(default)]
    instructions: TextOnly,
    #[serde(default)]
    input: Input,
}

#[derive(Deserialize)]
struct StreamOptionsProbe {
    #[serde(default)]
    include_usage: Option<bool>,
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorKind::InvalidRequest, message)
}

const MAX_TOKEN_FIELDS: [&str; 3] = ["max_tokens", "max_completion_tokens", "max_output_tokens"];

/// Validates the whole body as JSON and extracts the routing fields.
pub fn parse_request(raw: &[u8]) -> Result<RequestFields, ApiError> {
    match raw.iter().find(|b| !b.is_ascii_whitespace()) {
        None => return Err(invalid("The request body is empty; send a JSON object.")),
        Some(b'{') => {}
        Some(_) => return Err(invalid("The request body must be a JSON object.")),
    }
    // serde_json skips the strings it ignores without checking them; the rewrites and the
    // provider parse them all. One pass here turns such a body into a 400, not a 500 later.
    if std::str::from_utf8(raw).is_err() {
        return Err(invalid("The request body is not valid UTF-8."));
    }
    if exceeds_depth(raw, MAX_DEPTH) {
        return Err(invalid(format!(
            "The JSON body is nested deeper than {MAX_DEPTH} levels."
        )));
    }
    let de = &mut serde_json::Deserializer::from_slice(raw);
    let probe: Probe = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_data() && path == "model" {
            invalid(format!("Invalid type for 'model': {inner}")).with_param("model")
        } else if inner.is_data() && path == "stream" {
            invalid(format!("Invalid type for 'stream': {inner}")).with_param("stream")
        } else if let (true, Some(field)) = (
            inner.is_data(),
            MAX_TOKEN_FIELDS.iter().find(|f| **f == path),
        ) {
            invalid(format!(
                "Invalid '{field}': {inner}; it must be a non-negative integer."
            ))
            .with_param(field)
        } else if inner.is_data() && path.starts_with("stream_options") {
            invalid(format!("Invalid type for '{path}': {inner}")).with_param("stream_options")
        } else {
            invalid(format!(
                "We could not parse the JSON body of your request: {inner}"
            ))
        }
    })?;
    // The deserializer stops after the object: bytes after it (but whitespace) are refused
    // here, not forwarded to the provider.
    de.end().map_err(|e| {
        invalid(format!(
            "We could not parse the JSON body of your request: {e}"
        ))
    })?;
    // Wrong types the provider would refuse anyway: refused here, before any limit or
    // provider is involved.
    if probe.messages.present && !probe.messages.well_formed {
        return Err(
            invalid("Invalid type for 'messages': expected an array of objects.")
                .with_param("messages"),
        );
    }
    if probe.system.scalar {
        return Err(invalid(
            "Invalid type for 'system': expected a string or an array of content blocks.",
        )
        .with_param("system"));
    }
    let model = probe
        .model
        .ok_or_else(|| invalid("You must provide a model parameter.").with_param("model"))?;
    if model.is_empty() || model.len() > MAX_MODEL_LEN || model.chars().any(char::is_control) {
        return Err(invalid(format!(
            "The model parameter must be 1-{MAX_MODEL_LEN} characters without control characters."
        ))
        .with_param("model"));
    }
    let cap = MAX_TOKEN_FIELDS
        .into_iter()
        .zip([
            probe.max_tokens,
            probe.max_completion_tokens,
            probe.max_output_tokens,
        ])
        .filter_map(|(field, n)| Some((field, n?)))
        .max_by_key(|(_, n)| *n);
    Ok(RequestFields {
        model: model.into_owned(),
        stream: probe.stream.unwrap_or(false),
        include_usage: probe
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        max_output_tokens: cap.map(|(_, n)| n),
        max_output_field: cap.map(|(field, _)| field),
        prompt: PromptParts {
            messages: probe.messages,
            system: probe.system,
            instructions: probe.instructions,
            input: probe.input,
        },
    })
}

/// True if brackets outside strings nest deeper than `limit`. One pass, no allocation.
fn exceeds_depth(raw: &[u8], limit: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in raw {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extracts_model_and_stream() {
        let f = parse_request(
            br#"{"messages":[{"role":"user","content":"hi"}],"model":"gpt-4.1","stream":true}"#,
        )
        .unwrap();
        assert_eq!(
            f,
            RequestFields {
                model: "gpt-4.1".into(),
                stream: true,
                include_usage: false,
                max_output_tokens: None,
                max_output_field: None,
                prompt: f.prompt
            }
        );
        let f = parse_request(
            br#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#,
        )
        .unwrap();
        assert!(f.include_usage);
        let f = parse_request(br#"{"model":"m","stream":true,"stream_options":null}"#).unwrap();
        assert!(!f.include_usage);
        let f =
            parse_request(br#"{"model":"m","max_tokens":10,"max_completion_tokens":30}"#).unwrap();
        assert_eq!(f.max_output_tokens, Some(30));
        for bad in [
            r#"{"model":"m","max_tokens":-1}"#,
            r#"{"model":"m","max_output_tokens":"9"}"#,
            r#"{"model":"m","max_completion_tokens":1.5}"#,
        ] {
            let e = parse_request(bad.as_bytes()).unwrap_err();
            assert!(
                e.param.is_some_and(|p| p.starts_with("max_")),
                "{bad}: {e:?}"
            );
        }
        let f = parse_request(br#" {"model":"gpt\u002d4"}"#).unwrap();
        assert_eq!(f.model, "gpt-4");
    }

    #[test]
    fn the_prompt_is_counted_in_the_same_parse() {
        use crate::routing::Api;
        // Chat, Responses and embeddings counts of each body, as the separate estimate
        // probe (now gone) computed them.
        let bodies: [(&[u8], [u64; 3]); 4] = [
            (br#"{"model":"m","system":"be brief","messages":[{"role":"user","content":[{"type":"text","text":"hello there"}]},{"role":"assistant","content":"hi"}]}"#, [21, 3, 0]),
            (br#"{"model":"m","instructions":"x","input":[{"role":"user","content":"abcdefgh"},{"type":"function_call_output","output":"ok"}]}"#, [3, 19, 0]),
            (br#"{"model":"m","input":["alpha beta",[1,2,3]]}"#, [3, 11, 6]),
            (br#"{"model":"m","input":"one string","tools":[{"type":"function"}]}"#, [3, 10, 3]),
        ];
        for (body, expected) in bodies {
            let parts = parse_request(body).unwrap().prompt;
            let counted =
                [Api::ChatCompletions, Api::Responses, Api::Embeddings].map(|a| parts.tokens(a));
            assert_eq!(counted, expected, "{}", String::from_utf8_lossy(body));
        }
        assert_eq!(
            parse_request(bodies[0].0)
                .unwrap()
                .prompt
                .tokens(Api::ChatCompletions),
            (2 + 4) + (3 + 4) + (1 + 4) + 3
        );
    }

    #[test]
    fn refuses_bad_bodies_with_clear_messages() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "empty"),
            (b"   ", "empty"),
            (b"[1,2]", "JSON object"),
            (b"{\"model\":", "parse"),
            (b"{\"model\": 5}", "Invalid type for 'model'"),
            (b"{\"messages\": []}", "model parameter"),
            (b"{\"model\": null}", "model parameter"),
            (b"{\"model\": \"\"}", "1-256"),
            (b"{\"model\": \"a\\nb\"}", "control"),
            (b"{\"model\": \"a\", \"model\": \"b\"}", "duplicate"),
            (b"{\"model\": \"a\", \"stream\": \"yes\"}", "'stream'"),
            (b"{\"model\": \"\xff\"}", "UTF-8"),
            (b"{\"model\": \"a\", \"skipped\": \"\xff\"}", "UTF-8"),
            (b"{\"model\": \"a\", \"messages\": \"hi\"}", "'messages'"),
            (b"{\"model\": \"a\", \"messages\": [7]}", "'messages'"),
            (
                b"{\"model\": \"a\", \"messages\": [{}, \"x\"]}",
                "'messages'",
            ),
            (b"{\"model\": \"a\", \"messages\": null}", "'messages'"),
            (b"{\"model\": \"a\", \"system\": 5}", "'system'"),
            (b"{\"model\": \"a\", \"system\": true}", "'system'"),
        ];
        for (body, needle) in cases {
            let e = parse_request(body).unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidRequest);
            assert!(
                e.message.contains(needle),
                "{:?}: {}",
                String::from_utf8_lossy(body),
                e.message
            );
        }
        assert_eq!(
            parse_request(b"{\"model\": 5}").unwrap_err().param,
            Some("model")
        );
        assert_eq!(parse_request(b"{}").unwrap_err().param, Some("model"));
        // The types the APIs take pass.
        for ok in [
            &br#"{"model":"a","messages":[]}"#[..],
            br#"{"model":"a","messages":[{"role":"user","content":[{"type":"text","text":"x"}]}]}"#,
            br#"{"model":"a","system":"s","messages":[]}"#,
            br#"{"model":"a","system":[{"type":"text","text":"s"}],"messages":[]}"#,
            br#"{"model":"a","system":null,"input":"x"}"#,
        ] {
            assert!(parse_request(ok).is_ok(), "{}", String::from_utf8_lossy(ok));
        }
    }

    #[test]
    fn bytes_after_the_object_are_refused() {
        // Found by fuzzing: fuzz/regressions/request_body/trailing_bytes_after_object.
        for body in [
            &br#"{"model":"a"} {}"#[..],
            br#"{"model":"a"} x"#,
            br#"{"model":"a"}{"model":"b"}"#,
        ] {
            let e = parse_request(body).unwrap_err();
            assert!(
                e.message.contains("trailing characters"),
                "{:?}: {}",
                String::from_utf8_lossy(body),
                e.message
            );
        }
        assert_eq!(
            parse_request(b"{\"model\":\"a\"} \r\n\t").unwrap().model,
            "a"
        );
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let mut body = b"{\"model\":\"m\",\"x\":".to_vec();
        body.extend(std::iter::repeat_n(b'[', 10_000));
        body.extend(std::iter::repeat_n(b']', 10_000));
        body.push(b'}');
        let e = parse_request(&body).unwrap_err();
        assert!(e.message.contains("nested deeper"), "{}", e.message);
        // Brackets inside strings do not count; 128 levels are fine.
        let ok = format!(
            "{{\"model\":\"m\",\"s\":\"{}\",\"x\":{}{}}}",
            "[".repeat(500),
            "[".repeat(127),
            "]".repeat(127)
        );
        assert_eq!(parse_request(ok.as_bytes()).unwrap().model, "m");
    }
}
