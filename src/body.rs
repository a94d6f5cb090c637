//! The few request-body fields the gateway needs, and a byte-exact model rewrite.

use crate::errors::{ApiError, ErrorKind};
use crate::usage::{Content, Input, Messages, PromptParts, TextOnly};
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
    Ok(RequestFields {
        model: model.into_owned(),
        stream: probe.stream.unwrap_or(false),
        include_usage: probe
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        max_output_tokens: [
            probe.max_tokens,
            probe.max_completion_tokens,
            probe.max_output_tokens,
        ]
        .into_iter()
        .flatten()
        .max(),
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

/// Returns `raw` with the top-level `"model"` value replaced, every other byte unchanged.
/// `None` when the key cannot be located by the byte scanner (e.g. an escaped key name);
/// callers then fall back to re-serializing.
pub fn replace_model(raw: &[u8], model: &str) -> Option<Vec<u8>> {
    let span = top_level_value_span(raw, b"model")?;
    let quoted = serde_json::to_string(model).ok()?;
    let mut out = Vec::with_capacity(raw.len() + quoted.len());
    out.extend_from_slice(raw.get(..span.0)?);
    out.extend_from_slice(quoted.as_bytes());
    out.extend_from_slice(raw.get(span.1..)?);
    Some(out)
}

/// Returns `raw` with `stream_options.include_usage` set to true, so a stream reports usage.
/// Without a `stream_options` key (the usual case) the field is inserted byte-exactly after
/// the opening brace; an existing `stream_options` object (or any top-level key written
/// with escapes) is merged by re-serializing.
pub fn inject_include_usage(raw: &[u8]) -> Option<Vec<u8>> {
    const FIELD: &[u8] = br#""stream_options":{"include_usage":true}"#;
    // A key written with escapes (`"stream_option\u0073"`) may name `stream_options` too:
    // inserting another would send a duplicate key, whose `include_usage: false` the
    // provider may keep. Only a real parse can merge it.
    let existing = top_level_value_span(raw, b"stream_options")
        .or_else(|| top_level_span_where(raw, |k| k.contains(&b'\\')));
    match existing {
        None => {
            let open = skip_ws(raw, 0);
            if raw.get(open) != Some(&b'{') {
                return None;
            }
            let after = skip_ws(raw, open + 1);
            let empty = raw.get(after) == Some(&b'}');
            let mut out = Vec::with_capacity(raw.len() + FIELD.len() + 1);
            out.extend_from_slice(raw.get(..=open)?);
            out.extend_from_slice(FIELD);
            if !empty {
                out.push(b',');
            }
            out.extend_from_slice(raw.get(open + 1..)?);
            Some(out)
        }
        Some(_) => {
            let mut value: serde_json::Value = serde_json::from_slice(raw).ok()?;
            let obj = value.as_object_mut()?;
            let options = obj
                .entry("stream_options")
                .or_insert_with(|| serde_json::Value::Object(Default::default()));
            if !options.is_object() {
                *options = serde_json::Value::Object(Default::default());
            }
            options
                .as_object_mut()?
                .insert("include_usage".into(), true.into());
            serde_json::to_vec(&value).ok()
        }
    }
}

/// Re-serializing fallback for [`replace_model`]; keeps every field, may reorder keys.
pub fn replace_model_reserialized(raw: &[u8], model: &str) -> Option<Vec<u8>> {
    let mut value: serde_json::Value = serde_json::from_slice(raw).ok()?;
    value.as_object_mut()?.insert("model".into(), model.into());
    serde_json::to_vec(&value).ok()
}

/// Byte range of the value of top-level `key` in a JSON object already known to be valid.
fn top_level_value_span(raw: &[u8], key: &[u8]) -> Option<(usize, usize)> {
    top_level_span_where(raw, |k| k == key)
}

/// Byte range of the value of the first top-level key whose bytes (as written, escapes
/// and all) satisfy `matches`, in a JSON object already known to be valid.
fn top_level_span_where(raw: &[u8], matches: impl Fn(&[u8]) -> bool) -> Option<(usize, usize)> {
    let mut i = skip_ws(raw, 0);
    if raw.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    loop {
        i = skip_ws(raw, i);
        match raw.get(i)? {
            b'}' => return None,
            b',' => {
                i += 1;
                continue;
            }
            b'"' => {}
            _ => return None,
        }
        let key_end = skip_string(raw, i)?;
        let this_key = raw.get(i + 1..key_end - 1)?;
        i = skip_ws(raw, key_end);
        if raw.get(i) != Some(&b':') {
            return None;
        }
        i = skip_ws(raw, i + 1);
        let value_end = skip_value(raw, i)?;
        if matches(this_key) {
            return Some((i, value_end));
        }
        i = value_end;
    }
}

fn skip_ws(raw: &[u8], mut i: usize) -> usize {
    while matches!(raw.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

/// `i` at an opening quote; returns the index after the closing quote.
fn skip_string(raw: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    loop {
        match raw.get(j)? {
            b'"' => return Some(j + 1),
            b'\\' => j += 2,
            _ => j += 1,
        }
    }
}

/// Skips one JSON value iteratively (no recursion, so nesting depth costs no stack).
fn skip_value(raw: &[u8], i: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut j = i;
    loop {
        match raw.get(j)? {
            b'"' => j = skip_string(raw, j)?,
            b'{' | b'[' => {
                depth += 1;
                j += 1;
            }
            b'}' | b']' => {
                if depth == 0 {
                    return Some(j);
                }
                depth -= 1;
                j += 1;
            }
            b',' if depth == 0 => return Some(j),
            b' ' | b'\t' | b'\n' | b'\r' if depth == 0 => return Some(j),
            _ => j += 1,
        }
        if depth == 0 && matches!(raw.get(j.wrapping_sub(1)), Some(b'"' | b'}' | b']')) && j > i {
            return Some(j);
        }
    }
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
    fn the_prompt_is_counted_in_the_same_parse_as_the_standalone_estimate() {
        use crate::usage::{estimate_prompt_tokens_for, ResponseShape};
        let bodies: [&[u8]; 4] = [
            br#"{"model":"m","system":"be brief","messages":[{"role":"user","content":[{"type":"text","text":"hello there"}]},{"role":"assistant","content":"hi"}]}"#,
            br#"{"model":"m","instructions":"x","input":[{"role":"user","content":"abcdefgh"},{"type":"function_call_output","output":"ok"}]}"#,
            br#"{"model":"m","input":["alpha beta",[1,2,3]]}"#,
            br#"{"model":"m","input":"one string","tools":[{"type":"function"}]}"#,
        ];
        for body in bodies {
            let parts = parse_request(body).unwrap().prompt;
            for shape in [
                ResponseShape::ChatCompletions,
                ResponseShape::Responses,
                ResponseShape::Embeddings,
            ] {
                assert_eq!(
                    parts.tokens(shape),
                    estimate_prompt_tokens_for(shape, body),
                    "{shape:?}"
                );
            }
        }
        assert_eq!(
            parse_request(bodies[0])
                .unwrap()
                .prompt
                .tokens(ResponseShape::ChatCompletions),
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

    #[test]
    fn replace_model_changes_only_the_model_bytes() {
        let raw = br#"{ "messages" : [{"content":"the \"model\": x", "n": {"model":"inner"}}], "model" : "claude-sonnet" , "stream":true}"#;
        let out = replace_model(raw, "claude-sonnet-4-5-20250929").unwrap();
        let expected = br#"{ "messages" : [{"content":"the \"model\": x", "n": {"model":"inner"}}], "model" : "claude-sonnet-4-5-20250929" , "stream":true}"#;
        assert_eq!(
            String::from_utf8(out).unwrap(),
            String::from_utf8(expected.to_vec()).unwrap()
        );
    }

    #[test]
    fn replace_model_at_end_and_start() {
        assert_eq!(
            replace_model(br#"{"model":"a"}"#, "b").unwrap(),
            br#"{"model":"b"}"#
        );
        assert_eq!(
            replace_model(br#"{"x":1.5e3,"y":[true,null],"model":"a"}"#, "b").unwrap(),
            br#"{"x":1.5e3,"y":[true,null],"model":"b"}"#
        );
        assert_eq!(
            replace_model(br#"{"x":-1,"model" :"a" }"#, "q\"").unwrap(),
            br#"{"x":-1,"model" :"q\"" }"#
        );
    }

    #[test]
    fn include_usage_is_injected_byte_exactly_when_absent() {
        let raw = br#"{"model":"m","stream":true,"messages":[]}"#;
        let out = inject_include_usage(raw).unwrap();
        assert_eq!(
            out,
            br#"{"stream_options":{"include_usage":true},"model":"m","stream":true,"messages":[]}"#
        );
        assert!(parse_request(&out).unwrap().include_usage);
        assert_eq!(
            inject_include_usage(b" { } ").unwrap(),
            br#" {"stream_options":{"include_usage":true} } "#
        );
    }

    #[test]
    fn include_usage_merges_into_existing_options() {
        for raw in [
            &br#"{"model":"m","stream_options":{"include_obfuscation":false}}"#[..],
            br#"{"model":"m","stream_options":null}"#,
            br#"{"model":"m","stream_options":{"include_usage":false}}"#,
        ] {
            let out = inject_include_usage(raw).unwrap();
            let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(
                v["stream_options"]["include_usage"],
                true,
                "{}",
                String::from_utf8_lossy(raw)
            );
            assert_eq!(v["model"], "m");
        }
        let out = inject_include_usage(
            br#"{"model":"m","stream_options":{"include_obfuscation":false}}"#,
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["stream_options"]["include_obfuscation"], false);
    }

    #[test]
    fn include_usage_merges_into_an_escaped_stream_options_key() {
        // Found writing the fuzz invariants: fuzz/regressions/request_body/
        // escaped_stream_options_key. The byte scanner did not see the escaped key and
        // inserted a second `stream_options`: a body parse_request refuses as a duplicate,
        // and upstream the client's `false` could win (no usage chunk: an estimate is billed).
        let raw = br#"{"model":"m","stream":true,"stream_option\u0073":{"include_usage":false}}"#;
        assert!(!parse_request(raw).unwrap().include_usage);
        let out = inject_include_usage(raw).unwrap();
        let f = parse_request(&out).unwrap();
        assert!(
            f.include_usage && f.stream,
            "{}",
            String::from_utf8_lossy(&out)
        );
        assert_eq!(f.model, "m");
        // Escapes in values (and no stream_options) keep the byte-exact insertion.
        let raw = br#"{"model":"m","messages":[{"role":"user","content":"a\"b\n"}]}"#;
        let out = inject_include_usage(raw).unwrap();
        assert_eq!(
            out[..41],
            br#"{"stream_options":{"include_usage":true},"#[..]
        );
        assert_eq!(out[41..], raw[1..]);
    }

    #[test]
    fn escaped_key_falls_back_to_reserialization() {
        let raw = br#"{"mod\u0065l":"a","n":1}"#;
        assert_eq!(parse_request(raw).unwrap().model, "a");
        assert!(replace_model(raw, "b").is_none());
        let out = replace_model_reserialized(raw, "b").unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["model"], "b");
        assert_eq!(v["n"], 1);
    }

    #[test]
    fn replace_model_agrees_with_parser_on_random_layouts() {
        // Every scalar/nesting layout the scanner can meet before the model key.
        let prefixes = [
            r#""a":1,"#,
            r#""a":"x,}]\\","#,
            r#""a":{"b":[1,{"c":"}"}]},"#,
            r#""a":[],"#,
            r#""a":{},"#,
            r#""a":true,"#,
            r#""a":null ,"#,
            r#""a": -0.5e-3 ,"#,
            "",
        ];
        for p in prefixes {
            let raw = format!("{{{p}\"model\":\"m1\",\"z\":[\"model\"]}}");
            let out = replace_model(raw.as_bytes(), "m2").unwrap();
            let v: serde_json::Value =
                serde_json::from_slice(&out).unwrap_or_else(|e| panic!("{raw}: {e}"));
            assert_eq!(v["model"], "m2", "{raw}");
            assert_eq!(v["z"][0], "model");
        }
    }
}
