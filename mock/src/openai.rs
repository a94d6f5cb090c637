//! OpenAI-flavoured endpoints: chat completions, embeddings, Responses API,
//! models. Also used for Anthropic's OpenAI-compatible chat endpoint.

use base64::Engine as _;
use bytes::Bytes;
use serde_json::{json, Value};

use crate::exchange::{sse_data, sse_event, Ctx, Flavour, Outcome, Reply, StreamPlan};
use crate::knobs::Fault;
use crate::record::Usage;
use crate::tokens::{
    content_tokens, count_tokens, messages_tokens, mock_chunks, PER_MESSAGE, PER_PROMPT,
};

/// Which server is answering an OpenAI-shaped request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Compat {
    OpenAi,
    /// Anthropic's OpenAI-compatible endpoint (overloaded = 529).
    Anthropic,
}

const FINGERPRINT: &str = "fp_mock";

const OBFUSCATION_CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// Stand-in for OpenAI's stream obfuscation (random characters that normalize
/// payload sizes): deterministic, 1..=16 chars, so that `text` plus it fills a
/// 16-char block. `salt` varies the characters between events.
fn obfuscation(text: &str, salt: u64) -> String {
    let n = 16 - text.chars().count() % 16;
    let len = OBFUSCATION_CHARS.len() as u64;
    (0..n as u64)
        .map(|i| {
            char::from(
                OBFUSCATION_CHARS[(salt.wrapping_mul(7).wrapping_add(i * 13) % len) as usize],
            )
        })
        .collect()
}

/// Whether streamed events carry an `obfuscation` field: OpenAI itself (not
/// DeepSeek, Gemini or Anthropic's compatible endpoint) unless the request set
/// `stream_options.include_obfuscation: false`.
fn obfuscates(ctx: &Ctx<'_>, compat: Compat, v: &Value) -> bool {
    compat == Compat::OpenAi
        && !matches!(ctx.provider, "deepseek" | "gemini")
        && v.get("stream_options")
            .and_then(|o| o.get("include_obfuscation"))
            .and_then(Value::as_bool)
            != Some(false)
}

pub(crate) fn error(
    status: u16,
    message: impl Into<String>,
    typ: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> Outcome {
    Outcome::json(
        Flavour::OpenAi,
        status,
        json!({"error": {"message": message.into(), "type": typ, "param": param, "code": code}}),
    )
}

fn invalid(message: impl Into<String>, param: Option<&str>, code: Option<&str>) -> Outcome {
    error(400, message, "invalid_request_error", param, code)
}

pub(crate) fn not_found(ctx: &Ctx<'_>) -> Outcome {
    let _ = ctx;
    error(
        404,
        "Invalid URL (the mock does not serve this path)",
        "invalid_request_error",
        None,
        Some("unknown_url"),
    )
}

pub(crate) fn method_not_allowed(ctx: &Ctx<'_>) -> Outcome {
    error(
        405,
        format!("Invalid method for URL ({})", ctx.method),
        "invalid_request_error",
        None,
        None,
    )
}

/// Masks a presented key the way OpenAI does: `sk-...abcd`.
pub(crate) fn mask_key(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.len() < 12 {
        return "*".repeat(chars.len().max(3));
    }
    let head: String = chars[..3].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}...{tail}")
}

fn check_auth(ctx: &Ctx<'_>) -> Option<Outcome> {
    match ctx.bearer() {
        Some(k) if k == ctx.api_key => None,
        Some(k) => Some(error(
            401,
            format!(
                "Incorrect API key provided: {}. You can find your API key at https://platform.openai.com/account/api-keys.",
                mask_key(k)
            ),
            "invalid_request_error",
            None,
            Some("invalid_api_key"),
        )),
        None => Some(error(
            401,
            "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            "invalid_request_error",
            None,
            Some("invalid_api_key"),
        )),
    }
}

fn fault(ctx: &Ctx<'_>, compat: Compat) -> Option<Outcome> {
    match ctx.knobs.fault? {
        Fault::RateLimit => Some(
            error(
                429,
                "Rate limit reached for requests per min (RPM): Limit 3, Used 3, Requested 1. Please try again in 1s. (sluice-mock)",
                "requests",
                None,
                Some("rate_limit_exceeded"),
            )
            .with_header("retry-after", "1")
            .with_header("retry-after-ms", "1000")
            .with_header("x-ratelimit-remaining-requests", "0"),
        ),
        Fault::ServerError => Some(error(
            500,
            "The server had an error while processing your request. Sorry about that!",
            "server_error",
            None,
            None,
        )),
        Fault::Overloaded => Some(match compat {
            Compat::OpenAi => error(
                503,
                "The server is overloaded or not ready yet.",
                "server_error",
                None,
                None,
            ),
            Compat::Anthropic => error(529, "Overloaded", "overloaded_error", None, None),
        }),
        Fault::Reset => None,
    }
}

/// Auth, then JSON object body, then `model` string.
fn preamble(ctx: &Ctx<'_>) -> Result<(Value, String), Box<Outcome>> {
    if let Some(o) = check_auth(ctx) {
        return Err(Box::new(o));
    }
    let v = match ctx.json() {
        Some(v @ Value::Object(_)) => v,
        _ => {
            return Err(Box::new(invalid(
                "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON.)",
                None,
                None,
            )))
        }
    };
    let model = match v.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        _ => {
            return Err(Box::new(invalid(
                "you must provide a model parameter",
                Some("model"),
                Some("missing_required_parameter"),
            )))
        }
    };
    Ok((v, model))
}

/// First present (non-null) of `names`, which must be a non-negative integer.
fn max_param(v: &Value, names: &[&str]) -> Result<Option<u64>, Box<Outcome>> {
    for name in names {
        match v.get(*name) {
            None | Some(Value::Null) => continue,
            Some(x) => {
                return match x.as_u64() {
                    Some(n) => Ok(Some(n)),
                    None => Err(Box::new(invalid(
                        format!("Invalid type for '{name}': expected an integer."),
                        Some(name),
                        Some("invalid_type"),
                    ))),
                }
            }
        }
    }
    Ok(None)
}

fn is_stream(v: &Value) -> bool {
    v.get("stream").and_then(Value::as_bool) == Some(true)
}

/// Shared usage derivation: `prompt` total, cached capped at it.
fn usage_for(ctx: &Ctx<'_>, prompt: u64, visible: u64) -> Usage {
    let cached = ctx.knobs.cached_tokens.min(prompt);
    let reasoning = ctx.knobs.reasoning_tokens;
    Usage {
        input_tokens: prompt - cached,
        output_tokens: visible + reasoning,
        cached_tokens: cached,
        reasoning_tokens: reasoning,
        cache_creation_tokens: 0,
    }
}

fn chat_usage_json(ctx: &Ctx<'_>, u: &Usage) -> Value {
    let prompt = u.input_tokens + u.cached_tokens;
    let mut v = json!({
        "prompt_tokens": prompt,
        "completion_tokens": u.output_tokens,
        "total_tokens": prompt + u.output_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": u.reasoning_tokens,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0
        }
    });
    if ctx.provider == "deepseek" {
        v["prompt_cache_hit_tokens"] = json!(u.cached_tokens);
        v["prompt_cache_miss_tokens"] = json!(u.input_tokens);
    }
    v
}

/// `POST {prefix}/chat/completions`
pub(crate) fn chat(ctx: &Ctx<'_>, compat: Compat) -> Outcome {
    let (v, model) = match preamble(ctx) {
        Ok(x) => x,
        Err(o) => return *o,
    };
    let messages = match v.get("messages") {
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(Value::Array(_)) => {
            return invalid(
                "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array instead.",
                Some("messages"),
                Some("empty_array"),
            )
        }
        Some(_) => {
            return invalid(
                "Invalid type for 'messages': expected an array of objects.",
                Some("messages"),
                Some("invalid_type"),
            )
        }
        None => {
            return invalid(
                "Missing required parameter: 'messages'.",
                Some("messages"),
                Some("missing_required_parameter"),
            )
        }
    };
    let max = match max_param(&v, &["max_completion_tokens", "max_tokens"]) {
        Ok(m) => m,
        Err(o) => return *o,
    };
    if let Some(o) = fault(ctx, compat) {
        return o;
    }

    let prompt = messages_tokens(messages);
    let (visible, capped) = ctx.knobs.output(max);
    let usage = usage_for(ctx, prompt, visible);
    let usage_json = chat_usage_json(ctx, &usage);
    let finish = if capped { "length" } else { "stop" };
    let id = format!("chatcmpl-mock-{}", ctx.seq);
    let flavour = Flavour::OpenAi;

    if !is_stream(&v) {
        let body = json!({
            "id": id,
            "object": "chat.completion",
            "created": ctx.now,
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": mock_chunks(visible, 1).concat(), "refusal": null, "annotations": []},
                "logprobs": null,
                "finish_reason": finish
            }],
            "usage": usage_json,
            "service_tier": "default",
            "system_fingerprint": FINGERPRINT
        });
        return Outcome::success(flavour, ctx.knobs, usage, Reply::Json(body));
    }

    let include_usage = v
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        == Some(true);
    let obfuscate = obfuscates(ctx, compat, &v);
    let salt = std::cell::Cell::new(ctx.seq);
    // `text`: the chunk's content, which its obfuscation pads.
    let chunk = |choices: Value, usage: Option<Value>, text: &str| -> Bytes {
        let mut c = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": ctx.now,
            "model": model,
            "service_tier": "default",
            "system_fingerprint": FINGERPRINT,
            "choices": choices
        });
        if include_usage {
            c["usage"] = usage.unwrap_or(Value::Null);
        }
        if obfuscate {
            salt.set(salt.get().wrapping_add(1));
            c["obfuscation"] = json!(obfuscation(text, salt.get()));
        }
        sse_data(&c)
    };
    let choice = |delta: Value, finish: Option<&str>| json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]);
    let mut plan = StreamPlan::default();
    plan.preamble.push(chunk(
        choice(
            json!({"role": "assistant", "content": "", "refusal": null}),
            None,
        ),
        None,
        "",
    ));
    for text in mock_chunks(visible, ctx.knobs.chunks) {
        plan.content
            .push(chunk(choice(json!({"content": text}), None), None, &text));
    }
    plan.epilogue
        .push(chunk(choice(json!({}), Some(finish)), None, ""));
    if include_usage {
        plan.epilogue.push(chunk(json!([]), Some(usage_json), ""));
    }
    plan.epilogue.push(Bytes::from_static(b"data: [DONE]\n\n"));
    Outcome::success(
        flavour,
        ctx.knobs,
        usage,
        Reply::Stream { plan, reset: false },
    )
}

enum EmbInput {
    Text(String),
    Tokens(Vec<u64>),
}

fn parse_embedding_input(v: Option<&Value>) -> Option<Vec<EmbInput>> {
    let tokens = |a: &Vec<Value>| -> Option<Vec<u64>> {
        let t: Option<Vec<u64>> = a.iter().map(Value::as_u64).collect();
        t.filter(|t| !t.is_empty())
    };
    match v? {
        Value::String(s) if !s.is_empty() => Some(vec![EmbInput::Text(s.clone())]),
        Value::Array(a) if !a.is_empty() => {
            if a.iter().all(Value::is_string) {
                a.iter()
                    .map(|x| match x.as_str() {
                        Some(s) if !s.is_empty() => Some(EmbInput::Text(s.to_string())),
                        _ => None,
                    })
                    .collect()
            } else if a.iter().all(Value::is_number) {
                Some(vec![EmbInput::Tokens(tokens(a)?)])
            } else {
                a.iter()
                    .map(|x| match x {
                        Value::Array(inner) => tokens(inner).map(EmbInput::Tokens),
                        _ => None,
                    })
                    .collect()
            }
        }
        _ => None,
    }
}

fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Deterministic unit vector seeded by the input.
fn embed(seed: u64, dim: usize) -> Vec<f32> {
    let raw: Vec<f64> = (0..dim as u64)
        .map(|i| {
            (splitmix(seed ^ i.wrapping_mul(0x1000_0000_01b3)) >> 11) as f64 / (1u64 << 53) as f64
                * 2.0
                - 1.0
        })
        .collect();
    let norm = raw.iter().map(|x| x * x).sum::<f64>().sqrt();
    let norm = if norm > 0.0 { norm } else { 1.0 };
    raw.iter().map(|x| (x / norm) as f32).collect()
}

/// `POST {prefix}/embeddings`
pub(crate) fn embeddings(ctx: &Ctx<'_>) -> Outcome {
    let (v, model) = match preamble(ctx) {
        Ok(x) => x,
        Err(o) => return *o,
    };
    let inputs = match v.get("input") {
        None | Some(Value::Null) => {
            return invalid(
                "Missing required parameter: 'input'.",
                Some("input"),
                Some("missing_required_parameter"),
            )
        }
        x => match parse_embedding_input(x) {
            Some(i) => i,
            None => return invalid("'$.input' is invalid. Please check the API reference: https://platform.openai.com/docs/api-reference.", Some("input"), None),
        },
    };
    let base64 = match v.get("encoding_format") {
        None | Some(Value::Null) => false,
        Some(Value::String(s)) if s == "float" => false,
        Some(Value::String(s)) if s == "base64" => true,
        Some(_) => {
            return invalid(
                "Invalid value for 'encoding_format': expected 'float' or 'base64'.",
                Some("encoding_format"),
                Some("invalid_value"),
            )
        }
    };
    let dim = match v.get("dimensions") {
        None | Some(Value::Null) => 8,
        Some(x) => match x.as_u64() {
            Some(d) if (1..=8192).contains(&d) => d as usize,
            _ => {
                return invalid(
                    "Invalid value for 'dimensions': expected an integer between 1 and 8192.",
                    Some("dimensions"),
                    Some("invalid_value"),
                )
            }
        },
    };
    if let Some(o) = fault(ctx, Compat::OpenAi) {
        return o;
    }
    let mut tokens = 0;
    let mut data = Vec::with_capacity(inputs.len());
    for (index, input) in inputs.iter().enumerate() {
        let (n, seed) = match input {
            EmbInput::Text(s) => (count_tokens(s), fnv1a(s.bytes())),
            EmbInput::Tokens(t) => (
                t.len() as u64,
                fnv1a(t.iter().flat_map(|x| x.to_le_bytes())),
            ),
        };
        tokens += n;
        let vec = embed(seed, dim);
        let embedding = if base64 {
            let bytes: Vec<u8> = vec.iter().flat_map(|f| f.to_le_bytes()).collect();
            json!(base64::engine::general_purpose::STANDARD.encode(bytes))
        } else {
            json!(vec)
        };
        data.push(json!({"object": "embedding", "index": index, "embedding": embedding}));
    }
    let usage = Usage {
        input_tokens: tokens,
        ..Usage::default()
    };
    let body = json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens}
    });
    Outcome::success(Flavour::OpenAi, ctx.knobs, usage, Reply::Json(body))
}

/// Responses API prompt tokens: `instructions` and a string `input` each
/// count as one message; array items count `content` (string or parts with
/// `text`) or, failing that, `output` (tool outputs); each message/item
/// adds 4, plus 3 per prompt.
fn responses_prompt(v: &Value) -> u64 {
    let mut total = PER_PROMPT;
    if let Some(Value::String(s)) = v.get("instructions") {
        total += count_tokens(s) + PER_MESSAGE;
    }
    match v.get("input") {
        Some(Value::String(s)) => total += count_tokens(s) + PER_MESSAGE,
        Some(Value::Array(items)) => {
            for item in items {
                let c = item
                    .get("content")
                    .or_else(|| item.get("output"))
                    .unwrap_or(&Value::Null);
                total += content_tokens(c) + PER_MESSAGE;
            }
        }
        _ => {}
    }
    total
}

/// `POST {prefix}/responses`
pub(crate) fn responses(ctx: &Ctx<'_>) -> Outcome {
    let (v, model) = match preamble(ctx) {
        Ok(x) => x,
        Err(o) => return *o,
    };
    match v.get("input") {
        Some(Value::String(_) | Value::Array(_)) => {}
        Some(_) => {
            return invalid(
                "Invalid type for 'input': expected a string or an array of input items.",
                Some("input"),
                Some("invalid_type"),
            )
        }
        None => {
            return invalid(
                "Missing required parameter: 'input'.",
                Some("input"),
                Some("missing_required_parameter"),
            )
        }
    }
    let max = match max_param(&v, &["max_output_tokens"]) {
        Ok(m) => m,
        Err(o) => return *o,
    };
    if let Some(o) = fault(ctx, Compat::OpenAi) {
        return o;
    }

    let prompt = responses_prompt(&v);
    let (visible, capped) = ctx.knobs.output(max);
    let usage = usage_for(ctx, prompt, visible);
    let usage_json = json!({
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens},
        "output_tokens": usage.output_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": prompt + usage.output_tokens
    });
    let resp_id = format!("resp_mock_{}", ctx.seq);
    let item_id = format!("msg_mock_{}", ctx.seq);
    let chunks = mock_chunks(visible, ctx.knobs.chunks);
    let text = chunks.concat();
    let (final_status, incomplete) = if capped {
        ("incomplete", json!({"reason": "max_output_tokens"}))
    } else {
        ("completed", Value::Null)
    };
    let part =
        |t: &str| json!({"type": "output_text", "annotations": [], "logprobs": [], "text": t});
    let item = |status: &str, content: Value| json!({"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content});
    let echo = |name: &str| v.get(name).cloned().unwrap_or(Value::Null);
    // The tier asked for (`auto` by default) until the answer is done, then the one
    // that served it.
    let requested_tier = match v.get("service_tier") {
        Some(Value::String(t)) => t.clone(),
        _ => "auto".to_string(),
    };
    let response = |status: &str, incomplete: Value, output: Value, usage: Value| {
        let done = status != "in_progress";
        let tier = if done && matches!(requested_tier.as_str(), "auto" | "default") {
            "default"
        } else {
            requested_tier.as_str()
        };
        json!({
            "id": resp_id,
            "object": "response",
            "created_at": ctx.now,
            "status": status,
            "background": false,
            "error": null,
            "incomplete_details": incomplete,
            "instructions": echo("instructions"),
            "max_output_tokens": max,
            "max_tool_calls": echo("max_tool_calls"),
            "model": model,
            "output": output,
            "parallel_tool_calls": true,
            "previous_response_id": echo("previous_response_id"),
            "prompt_cache_key": echo("prompt_cache_key"),
            "reasoning": {"effort": null, "summary": null},
            "safety_identifier": echo("safety_identifier"),
            "service_tier": tier,
            "store": v.get("store").and_then(Value::as_bool).unwrap_or(true),
            "temperature": 1.0,
            "text": {"format": {"type": "text"}, "verbosity": "medium"},
            "tool_choice": "auto",
            "tools": [],
            "top_logprobs": 0,
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": usage,
            "user": null,
            "metadata": {}
        })
    };
    let done_item = item(final_status, json!([part(&text)]));
    let full = response(final_status, incomplete, json!([done_item]), usage_json);

    if !is_stream(&v) {
        return Outcome::success(Flavour::OpenAi, ctx.knobs, usage, Reply::Json(full));
    }

    let mut seq = 0u64;
    let mut ev = |typ: &str, mut body: Value| -> Bytes {
        body["type"] = json!(typ);
        body["sequence_number"] = json!(seq);
        seq += 1;
        sse_event(typ, &body)
    };
    let pending = response("in_progress", Value::Null, json!([]), Value::Null);
    let mut plan = StreamPlan::default();
    plan.preamble
        .push(ev("response.created", json!({"response": pending})));
    plan.preamble
        .push(ev("response.in_progress", json!({"response": pending})));
    plan.preamble.push(ev(
        "response.output_item.added",
        json!({"output_index": 0, "item": item("in_progress", json!([]))}),
    ));
    plan.preamble.push(ev(
        "response.content_part.added",
        json!({"item_id": item_id, "output_index": 0, "content_index": 0, "part": part("")}),
    ));
    let obfuscate = obfuscates(ctx, Compat::OpenAi, &v);
    for (i, delta) in chunks.iter().enumerate() {
        let mut body = json!({"item_id": item_id, "output_index": 0, "content_index": 0, "delta": delta, "logprobs": []});
        if obfuscate {
            body["obfuscation"] = json!(obfuscation(delta, ctx.seq.wrapping_add(i as u64)));
        }
        plan.content.push(ev("response.output_text.delta", body));
    }
    plan.epilogue.push(ev(
        "response.output_text.done",
        json!({"item_id": item_id, "output_index": 0, "content_index": 0, "text": text, "logprobs": []}),
    ));
    plan.epilogue.push(ev(
        "response.content_part.done",
        json!({"item_id": item_id, "output_index": 0, "content_index": 0, "part": part(&text)}),
    ));
    plan.epilogue.push(ev(
        "response.output_item.done",
        json!({"output_index": 0, "item": done_item}),
    ));
    let last = if capped {
        "response.incomplete"
    } else {
        "response.completed"
    };
    plan.epilogue.push(ev(last, json!({"response": full})));
    Outcome::success(
        Flavour::OpenAi,
        ctx.knobs,
        usage,
        Reply::Stream { plan, reset: false },
    )
}

/// `GET {prefix}/models`
pub(crate) fn models(ctx: &Ctx<'_>) -> Outcome {
    if let Some(o) = check_auth(ctx) {
        return o;
    }
    let ids: &[&str] = match ctx.provider {
        "openai" => &["gpt-4o", "gpt-4o-mini", "o3-mini", "text-embedding-3-small"],
        "deepseek" => &["deepseek-chat", "deepseek-reasoner"],
        "gemini" => &["gemini-2.0-flash", "gemini-2.5-pro", "text-embedding-004"],
        _ => &["mock-model", "mock-embedding"],
    };
    let data: Vec<Value> = ids
        .iter()
        .map(|id| json!({"id": id, "object": "model", "created": 1_700_000_000u64, "owned_by": ctx.provider}))
        .collect();
    Outcome::json(
        Flavour::OpenAi,
        200,
        json!({"object": "list", "data": data}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn obfuscation_pads_to_a_block() {
        for text in [
            "",
            "a",
            "the sly fox",
            "sixteen chars!!!",
            "seventeen chars!!",
        ] {
            let o = obfuscation(text, 3);
            assert!((1..=16).contains(&o.len()), "{text:?}");
            assert_eq!((text.chars().count() + o.len()) % 16, 0, "{text:?}");
            assert!(o.bytes().all(|b| b.is_ascii_alphanumeric()));
            assert_eq!(o, obfuscation(text, 3));
        }
        assert_ne!(obfuscation("", 1), obfuscation("", 2));
    }
}
