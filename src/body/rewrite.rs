//! Byte-exact rewrites of a request body that passed `parse_request`: the model name and
//! the streaming-usage option. Every byte the gateway does not mean to change is kept, so
//! the provider sees what the client wrote.

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

/// Returns `raw` with the output cap `field` (`max_tokens`, ...) set to `cap`: in place
/// (byte-exact) when the field is written plainly, else by re-serializing (added if absent).
pub fn set_output_cap(raw: &[u8], field: &str, cap: u64) -> Option<Vec<u8>> {
    if let Some((start, end)) = top_level_value_span(raw, field.as_bytes()) {
        let mut out = Vec::with_capacity(raw.len() + 20);
        out.extend_from_slice(raw.get(..start)?);
        out.extend_from_slice(cap.to_string().as_bytes());
        out.extend_from_slice(raw.get(end..)?);
        return Some(out);
    }
    let mut value: serde_json::Value = serde_json::from_slice(raw).ok()?;
    value.as_object_mut()?.insert(field.into(), cap.into());
    serde_json::to_vec(&value).ok()
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
    use crate::body::parse_request;

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
