//! Anthropic Messages API (`POST {prefix}/messages`) and token counting
//! (`POST {prefix}/messages/count_tokens`).

use serde_json::{json, Value};

use crate::exchange::{sse_event, Ctx, Flavour, Outcome, Reply, StreamPlan};
use crate::knobs::Fault;
use crate::record::Usage;
use crate::tokens::{content_tokens, messages_tokens, mock_chunks, PER_MESSAGE};

pub(crate) fn error(status: u16, typ: &str, message: impl Into<String>) -> Outcome {
    Outcome::json(
        Flavour::Anthropic,
        status,
        json!({"type": "error", "error": {"type": typ, "message": message.into()}}),
    )
}

fn invalid(message: impl Into<String>) -> Outcome {
    error(400, "invalid_request_error", message)
}

pub(crate) fn not_found(ctx: &Ctx<'_>) -> Outcome {
    let _ = ctx;
    error(404, "not_found_error", "Not found")
}

pub(crate) fn method_not_allowed(ctx: &Ctx<'_>) -> Outcome {
    error(
        405,
        "invalid_request_error",
        format!("Method {} not allowed", ctx.method),
    )
}

fn fault(ctx: &Ctx<'_>) -> Option<Outcome> {
    match ctx.knobs.fault? {
        Fault::RateLimit => Some(
            error(
                429,
                "rate_limit_error",
                "Number of request tokens has exceeded your per-minute rate limit (sluice-mock)",
            )
            .with_header("retry-after", "1")
            .with_header("anthropic-ratelimit-requests-remaining", "0"),
        ),
        Fault::ServerError => Some(error(500, "api_error", "Internal server error")),
        Fault::Overloaded => Some(error(529, "overloaded_error", "Overloaded")),
        Fault::Reset => None,
    }
}

/// Prompt tokens: chat rule over `messages`, plus `system` (string or
/// blocks) counted as one more message when present.
fn prompt_tokens(v: &Value, messages: &[Value]) -> u64 {
    let system = match v.get("system") {
        None | Some(Value::Null) => 0,
        Some(s) => content_tokens(s) + PER_MESSAGE,
    };
    messages_tokens(messages) + system
}

/// Credential, version header, JSON object body, `model` and `messages`: the checks
/// Messages and count_tokens share, in the real API's order.
fn common_checks(ctx: &Ctx<'_>) -> Result<(Value, String), Box<Outcome>> {
    match ctx.header("x-api-key") {
        Some(k) if k == ctx.api_key => {}
        _ => {
            return Err(Box::new(error(
                401,
                "authentication_error",
                "invalid x-api-key",
            )))
        }
    }
    if ctx.header("anthropic-version").is_none() {
        return Err(Box::new(invalid("anthropic-version: header is required")));
    }
    let v = match ctx.json() {
        Some(v @ Value::Object(_)) => v,
        _ => {
            return Err(Box::new(invalid(
                "There was an issue with the JSON in your request body",
            )))
        }
    };
    let model = match v.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        Some(_) => return Err(Box::new(invalid("model: Input should be a valid string"))),
        None => return Err(Box::new(invalid("model: Field required"))),
    };
    match v.get("messages") {
        Some(Value::Array(a)) if !a.is_empty() => {}
        Some(Value::Array(_)) => {
            return Err(Box::new(invalid(
                "messages: at least one message is required",
            )))
        }
        Some(_) => return Err(Box::new(invalid("messages: Input should be a valid list"))),
        None => return Err(Box::new(invalid("messages: Field required"))),
    }
    Ok((v, model))
}

fn messages_of(v: &Value) -> &[Value] {
    v.get("messages")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

/// Whether the request turned extended thinking on (`thinking.type` other than
/// `disabled`).
fn thinking_on(v: &Value) -> bool {
    match v.get("thinking").and_then(|t| t.get("type")) {
        Some(Value::String(t)) => t != "disabled",
        _ => false,
    }
}

/// `POST {prefix}/messages/count_tokens`: `{"input_tokens": N}` with N the prompt
/// size the Messages endpoint would report (input + cache reads + cache writes).
/// Free: the recorded usage is all zeros.
pub(crate) fn count_tokens(ctx: &Ctx<'_>) -> Outcome {
    let v = match common_checks(ctx) {
        Ok((v, _)) => v,
        Err(o) => return *o,
    };
    if let Some(o) = fault(ctx) {
        return o;
    }
    let n = prompt_tokens(&v, messages_of(&v));
    Outcome::success(
        Flavour::Anthropic,
        ctx.knobs,
        Usage::default(),
        Reply::Json(json!({ "input_tokens": n })),
    )
}

/// `POST {prefix}/messages`
pub(crate) fn messages(ctx: &Ctx<'_>) -> Outcome {
    let (v, model) = match common_checks(ctx) {
        Ok(x) => x,
        Err(o) => return *o,
    };
    let messages = messages_of(&v);
    let max_tokens = match v.get("max_tokens") {
        None => return invalid("max_tokens: Field required"),
        Some(x) => match x.as_u64() {
            Some(n) => n,
            None => return invalid("max_tokens: Input should be a valid integer"),
        },
    };
    if let Some(o) = fault(ctx) {
        return o;
    }

    let prompt = prompt_tokens(&v, messages);
    let (visible, capped) = ctx.knobs.output(Some(max_tokens));
    let reasoning = ctx.knobs.reasoning_tokens;
    let cache_read = ctx.knobs.cached_tokens.min(prompt);
    let cache_creation = ctx.knobs.cache_creation_tokens.min(prompt - cache_read);
    let usage = Usage {
        input_tokens: prompt - cache_read - cache_creation,
        output_tokens: visible + reasoning,
        cached_tokens: cache_read,
        reasoning_tokens: reasoning,
        cache_creation_tokens: cache_creation,
    };
    // Thinking models report the reasoning part of output_tokens.
    let thinking_details = reasoning > 0 || thinking_on(&v);
    let stop_reason = if capped { "max_tokens" } else { "end_turn" };
    let id = format!("msg_mock_{}", ctx.seq);
    // The usage object of a message (JSON answer, or `message_start`'s opening
    // one with an interim `output_tokens`).
    let message_usage = |output_tokens: u64, details: bool| {
        let mut u = json!({
            "input_tokens": usage.input_tokens,
            "cache_creation_input_tokens": usage.cache_creation_tokens,
            "cache_read_input_tokens": usage.cached_tokens,
            "cache_creation": {
                // Writes are reported as the default 5-minute TTL.
                "ephemeral_5m_input_tokens": usage.cache_creation_tokens,
                "ephemeral_1h_input_tokens": 0
            },
            "output_tokens": output_tokens,
            "service_tier": "standard",
            "inference_geo": "not_available"
        });
        if details {
            u["output_tokens_details"] = json!({"thinking_tokens": usage.reasoning_tokens});
        }
        u
    };
    let message = |content: Value, stop: Option<&str>, usage: Value| {
        json!({
            "id": id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": stop,
            "stop_sequence": null,
            "stop_details": null,
            "usage": usage
        })
    };

    let stream = v.get("stream").and_then(Value::as_bool) == Some(true);
    if !stream {
        let body = message(
            json!([{"type": "text", "text": mock_chunks(visible, 1).concat()}]),
            Some(stop_reason),
            message_usage(usage.output_tokens, thinking_details),
        );
        return Outcome::success(Flavour::Anthropic, ctx.knobs, usage, Reply::Json(body));
    }

    let mut plan = StreamPlan::default();
    plan.preamble.push(sse_event(
        "message_start",
        &json!({"type": "message_start", "message": message(json!([]), None, message_usage(1, false))}),
    ));
    plan.preamble.push(sse_event(
        "content_block_start",
        &json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    ));
    plan.preamble
        .push(sse_event("ping", &json!({"type": "ping"})));
    for text in mock_chunks(visible, ctx.knobs.chunks) {
        plan.content.push(sse_event(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}),
        ));
    }
    plan.epilogue.push(sse_event(
        "content_block_stop",
        &json!({"type": "content_block_stop", "index": 0}),
    ));
    // One message_delta; its usage is cumulative: every count is the final total
    // (input and cache fields repeated, as the real API does).
    let mut delta_usage = json!({
        "input_tokens": usage.input_tokens,
        "cache_creation_input_tokens": usage.cache_creation_tokens,
        "cache_read_input_tokens": usage.cached_tokens,
        "output_tokens": usage.output_tokens
    });
    if thinking_details {
        delta_usage["output_tokens_details"] = json!({"thinking_tokens": usage.reasoning_tokens});
    }
    plan.epilogue.push(sse_event(
        "message_delta",
        &json!({
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": null, "stop_details": null},
            "usage": delta_usage
        }),
    ));
    plan.epilogue
        .push(sse_event("message_stop", &json!({"type": "message_stop"})));
    Outcome::success(
        Flavour::Anthropic,
        ctx.knobs,
        usage,
        Reply::Stream { plan, reset: false },
    )
}
