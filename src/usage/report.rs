//! Reads a captured usage object (a few hundred bytes) into normalized counts. Providers'
//! numbers are untrusted: anything that is not a non-negative integer up to
//! [`MAX_REPORTED_TOKENS`] is coerced (negative or non-numeric to 0, fractions truncated,
//! huge values clamped) and flagged suspicious; the meter then counts its own estimate
//! instead of the report.

use super::{TokenUsage, MAX_REPORTED_TOKENS};
use serde_json::{Map, Value};

pub(crate) type UsageObject = Map<String, Value>;

/// `None` when the bytes are not a JSON object (e.g. a number out of range).
pub(crate) fn parse_object(raw: &[u8]) -> Option<UsageObject> {
    serde_json::from_slice(raw).ok()
}

/// A counted result and whether anything about it was suspicious.
pub(crate) struct Reading<T> {
    pub value: T,
    pub suspicious: bool,
}

/// OpenAI chat completions and embeddings: `prompt_tokens` includes the cached tokens,
/// `completion_tokens` includes the reasoning tokens.
pub(crate) fn openai_chat(usage: &UsageObject) -> Reading<TokenUsage> {
    let mut suspicious = false;
    let prompt = required(usage, "prompt_tokens", &mut suspicious);
    let completion = count(usage.get("completion_tokens"), &mut suspicious).unwrap_or(0);
    // DeepSeek reports cache hits at the top level.
    let cached = nested(
        usage,
        "prompt_tokens_details",
        "cached_tokens",
        &mut suspicious,
    )
    .or_else(|| count(usage.get("prompt_cache_hit_tokens"), &mut suspicious))
    .unwrap_or(0);
    let reasoning = nested(
        usage,
        "completion_tokens_details",
        "reasoning_tokens",
        &mut suspicious,
    )
    .unwrap_or(0);
    openai_usage(prompt, cached, completion, reasoning, suspicious)
}

/// OpenAI Responses API: `input_tokens` includes cached, `output_tokens` reasoning.
pub(crate) fn openai_responses(usage: &UsageObject) -> Reading<TokenUsage> {
    let mut suspicious = false;
    let input = required(usage, "input_tokens", &mut suspicious);
    let output = required(usage, "output_tokens", &mut suspicious);
    let cached = nested(
        usage,
        "input_tokens_details",
        "cached_tokens",
        &mut suspicious,
    )
    .unwrap_or(0);
    let reasoning = nested(
        usage,
        "output_tokens_details",
        "reasoning_tokens",
        &mut suspicious,
    )
    .unwrap_or(0);
    openai_usage(input, cached, output, reasoning, suspicious)
}

fn openai_usage(
    prompt: u64,
    cached: u64,
    output: u64,
    reasoning: u64,
    mut suspicious: bool,
) -> Reading<TokenUsage> {
    // The parts cannot exceed their totals; keep the totals, which are what is billed.
    if cached > prompt || reasoning > output {
        suspicious = true;
    }
    let cached = cached.min(prompt);
    Reading {
        value: TokenUsage {
            input_tokens: prompt - cached,
            cached_input_tokens: cached,
            cache_creation_tokens: 0,
            output_tokens: output,
            reasoning_tokens: reasoning.min(output),
        },
        suspicious,
    }
}

/// Anthropic usage as reported so far. Stream events repeat fields cumulatively, so
/// each reported field replaces the previous value; nothing is added up.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct AnthropicTally {
    input: u64,
    cache_creation: u64,
    cache_read: u64,
    output: u64,
    /// `output_tokens_details.thinking_tokens`: the thinking part of `output_tokens`.
    thinking: u64,
}

impl AnthropicTally {
    /// Takes every field present (and not null) in `usage`; true if suspicious.
    pub(crate) fn merge(&mut self, usage: &UsageObject) -> bool {
        let mut suspicious = false;
        let mut take = |field: &mut u64, name: &str| {
            if let Some(v) = count(usage.get(name), &mut suspicious) {
                *field = v;
            }
        };
        take(&mut self.input, "input_tokens");
        take(&mut self.cache_creation, "cache_creation_input_tokens");
        take(&mut self.cache_read, "cache_read_input_tokens");
        take(&mut self.output, "output_tokens");
        if let Some(v) = nested(
            usage,
            "output_tokens_details",
            "thinking_tokens",
            &mut suspicious,
        ) {
            self.thinking = v;
        }
        suspicious
    }

    /// Anthropic's `input_tokens` excludes cache reads and writes already.
    pub(crate) fn usage(&self) -> TokenUsage {
        TokenUsage {
            input_tokens: self.input,
            cached_input_tokens: self.cache_read,
            cache_creation_tokens: self.cache_creation,
            output_tokens: self.output,
            reasoning_tokens: self.thinking.min(self.output),
        }
    }
}

fn required(usage: &UsageObject, name: &str, suspicious: &mut bool) -> u64 {
    count(usage.get(name), suspicious).unwrap_or_else(|| {
        *suspicious = true;
        0
    })
}

/// `usage[object][name]`; the details object may be absent or null.
fn nested(usage: &UsageObject, object: &str, name: &str, suspicious: &mut bool) -> Option<u64> {
    match usage.get(object) {
        None | Some(Value::Null) => None,
        Some(Value::Object(details)) => count(details.get(name), suspicious),
        Some(_) => {
            *suspicious = true;
            None
        }
    }
}

/// A token count; `None` when absent or null.
fn count(value: Option<&Value>, suspicious: &mut bool) -> Option<u64> {
    let number = match value? {
        Value::Null => return None,
        Value::Number(n) => n,
        _ => {
            *suspicious = true;
            return Some(0);
        }
    };
    if let Some(n) = number.as_u64() {
        if n > MAX_REPORTED_TOKENS {
            *suspicious = true;
        }
        return Some(n.min(MAX_REPORTED_TOKENS));
    }
    let f = number.as_f64().unwrap_or(0.0);
    // Integral floats (`12.0`) are fine; negatives, fractions and huge values are not.
    if !(f >= 0.0 && f.fract() == 0.0 && f <= MAX_REPORTED_TOKENS as f64) {
        *suspicious = true;
    }
    if f >= MAX_REPORTED_TOKENS as f64 {
        Some(MAX_REPORTED_TOKENS)
    } else if f > 0.0 {
        Some(f as u64)
    } else {
        Some(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> UsageObject {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn chat_maps_cached_and_reasoning() {
        let r = openai_chat(&obj(json!({
            "prompt_tokens": 2006, "completion_tokens": 300, "total_tokens": 2306,
            "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 192, "audio_tokens": 0}
        })));
        assert!(!r.suspicious);
        assert_eq!(
            r.value,
            TokenUsage {
                input_tokens: 86,
                cached_input_tokens: 1920,
                cache_creation_tokens: 0,
                output_tokens: 300,
                reasoning_tokens: 192
            }
        );
        let r = openai_chat(&obj(json!({
            "prompt_tokens": 10, "completion_tokens": 3,
            "prompt_tokens_details": null, "completion_tokens_details": null
        })));
        assert!(!r.suspicious);
        assert_eq!(r.value.input_tokens, 10);
        // DeepSeek's own field names.
        let r = openai_chat(&obj(json!({
            "prompt_tokens": 10, "completion_tokens": 3,
            "prompt_cache_hit_tokens": 8, "prompt_cache_miss_tokens": 2
        })));
        assert_eq!((r.value.input_tokens, r.value.cached_input_tokens), (2, 8));
    }

    #[test]
    fn invalid_numbers_are_coerced_and_flagged() {
        let cases = [
            (json!(-5), 0),
            (json!(1e30), MAX_REPORTED_TOKENS),
            (json!(u64::MAX), MAX_REPORTED_TOKENS),
            (json!(12.5), 12),
            (json!(-0.5), 0),
            (json!("12"), 0),
            (json!(true), 0),
            (json!([1]), 0),
            (json!({"n": 1}), 0),
        ];
        for (v, expected) in cases {
            let r = openai_chat(&obj(json!({"prompt_tokens": v, "completion_tokens": 1})));
            assert!(r.suspicious, "{v}");
            assert_eq!(r.value.input_tokens, expected, "{v}");
        }
        let r = openai_chat(&obj(json!({"prompt_tokens": 12.0})));
        assert!(!r.suspicious);
        assert_eq!(r.value.input_tokens, 12);
        // Missing required field, details of the wrong type, parts over totals.
        assert!(openai_chat(&obj(json!({"completion_tokens": 1}))).suspicious);
        assert!(
            openai_chat(&obj(
                json!({"prompt_tokens": 1, "prompt_tokens_details": 3})
            ))
            .suspicious
        );
        let r = openai_chat(&obj(json!({
            "prompt_tokens": 5, "completion_tokens": 2,
            "prompt_tokens_details": {"cached_tokens": 9},
            "completion_tokens_details": {"reasoning_tokens": 7}
        })));
        assert!(r.suspicious);
        assert_eq!(r.value.total_input(), 5);
        assert_eq!((r.value.output_tokens, r.value.reasoning_tokens), (2, 2));
        assert!(openai_responses(&obj(json!({"input_tokens": 1}))).suspicious);
        assert!(parse_object(b"{\"prompt_tokens\": 1e999}").is_none());
    }

    #[test]
    fn anthropic_fields_replace_never_add() {
        let mut tally = AnthropicTally::default();
        assert!(!tally.merge(&obj(json!({
            "input_tokens": 40, "cache_creation_input_tokens": 1000,
            "cache_read_input_tokens": 2000, "output_tokens": 1,
            "cache_creation": {"ephemeral_5m_input_tokens": 1000}, "service_tier": "standard"
        }))));
        tally.merge(&obj(json!({"output_tokens": 15})));
        tally.merge(&obj(json!({"output_tokens": 30, "input_tokens": null})));
        assert_eq!(
            tally.usage(),
            TokenUsage {
                input_tokens: 40,
                cached_input_tokens: 2000,
                cache_creation_tokens: 1000,
                output_tokens: 30,
                reasoning_tokens: 0
            }
        );
        assert_eq!(tally.usage().total_input(), 3040);
        // The current message_delta repeats every field, thinking tokens included.
        tally.merge(&obj(json!({
            "input_tokens": 40, "cache_creation_input_tokens": 1000,
            "cache_read_input_tokens": 2000, "output_tokens": 31,
            "output_tokens_details": {"thinking_tokens": 12}
        })));
        assert_eq!(
            (
                tally.usage().output_tokens,
                tally.usage().reasoning_tokens,
                tally.usage().total_input()
            ),
            (31, 12, 3040)
        );
    }
}
