//! Token estimates for when a provider's usage report never arrives.
//!
//! One token per 4 characters (Unicode scalar values), plus OpenAI's chat overheads of
//! 4 tokens per message and 3 per prompt. This is the mock provider's tokenizer
//! (`mock/src/tokens.rs`), so tests can compare exactly; real BPE tokenizers differ, and
//! for English text the estimate is typically within about ±25%. Code, non-Latin scripts
//! and images are estimated worse (images count nothing).

use super::ResponseShape;
use serde_json::Value;

const PER_MESSAGE: u64 = 4;
const PER_PROMPT: u64 = 3;

/// `ceil(chars / 4)`.
pub fn estimate_tokens_from_chars(chars: u64) -> u64 {
    chars.div_ceil(4)
}

fn text_tokens(text: &str) -> u64 {
    estimate_tokens_from_chars(text.chars().count() as u64)
}

/// Estimated prompt tokens of a request body, with the API guessed from its fields:
/// `messages` (chat, Anthropic), else `input` (embeddings when it is a list of strings or
/// token ids, or a string for a model whose name contains `embed`; else Responses).
/// Prefer [`estimate_prompt_tokens_for`] when the API is known. 0 if the body is not JSON.
pub fn estimate_prompt_tokens(request_body: &[u8]) -> u64 {
    let Ok(body) = serde_json::from_slice::<Value>(request_body) else {
        return 0;
    };
    let shape = if body.get("messages").is_some() {
        ResponseShape::ChatCompletions
    } else if looks_like_embeddings(&body) {
        ResponseShape::Embeddings
    } else {
        ResponseShape::Responses
    };
    prompt_tokens(shape, &body)
}

/// Estimated prompt tokens of a request body for a known API. 0 if the body is not JSON.
pub fn estimate_prompt_tokens_for(shape: ResponseShape, request_body: &[u8]) -> u64 {
    match serde_json::from_slice::<Value>(request_body) {
        Ok(body) => prompt_tokens(shape, &body),
        Err(_) => 0,
    }
}

fn looks_like_embeddings(body: &Value) -> bool {
    match body.get("input") {
        Some(Value::Array(items)) => items.iter().all(|item| !item.is_object()),
        Some(Value::String(_)) => body
            .get("model")
            .and_then(Value::as_str)
            .is_some_and(|model| model.to_ascii_lowercase().contains("embed")),
        _ => false,
    }
}

fn prompt_tokens(shape: ResponseShape, body: &Value) -> u64 {
    match shape {
        ResponseShape::ChatCompletions | ResponseShape::AnthropicMessages => {
            let messages = match body.get("messages") {
                Some(Value::Array(messages)) => messages.as_slice(),
                _ => &[],
            };
            // Anthropic's `system` counts as one more message.
            let system = match body.get("system") {
                None | Some(Value::Null) => 0,
                Some(system) => content_tokens(system).saturating_add(PER_MESSAGE),
            };
            messages
                .iter()
                .map(|m| message_tokens(m.get("content")))
                .fold(PER_PROMPT.saturating_add(system), u64::saturating_add)
        }
        ResponseShape::Responses => {
            let mut total = PER_PROMPT;
            if let Some(Value::String(instructions)) = body.get("instructions") {
                total = total.saturating_add(text_tokens(instructions) + PER_MESSAGE);
            }
            match body.get("input") {
                Some(Value::String(input)) => {
                    total = total.saturating_add(text_tokens(input) + PER_MESSAGE);
                }
                Some(Value::Array(items)) => {
                    for item in items {
                        let content = item.get("content").or_else(|| item.get("output"));
                        total = total.saturating_add(message_tokens(content));
                    }
                }
                _ => {}
            }
            total
        }
        ResponseShape::Embeddings => match body.get("input") {
            Some(Value::Array(items)) if items.iter().all(Value::is_number) => items.len() as u64,
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| match item {
                    Value::String(s) => text_tokens(s),
                    Value::Array(ids) => ids.len() as u64,
                    _ => 0,
                })
                .fold(0, u64::saturating_add),
            Some(Value::String(s)) => text_tokens(s),
            _ => 0,
        },
    }
}

fn message_tokens(content: Option<&Value>) -> u64 {
    content
        .map_or(0, content_tokens)
        .saturating_add(PER_MESSAGE)
}

/// A string, or parts with `text` (or a nested `content`, e.g. Anthropic `tool_result`).
/// Recursion is bounded: request bodies were checked for nesting depth upstream, and
/// serde_json refuses documents nested deeper than 128 anyway.
fn content_tokens(content: &Value) -> u64 {
    match content {
        Value::String(s) => text_tokens(s),
        Value::Array(parts) => parts
            .iter()
            .map(content_tokens)
            .fold(0, u64::saturating_add),
        Value::Object(part) => match (part.get("text"), part.get("content")) {
            (Some(Value::String(text)), _) => text_tokens(text),
            (_, Some(nested)) => content_tokens(nested),
            _ => 0,
        },
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chars_round_up() {
        assert_eq!(estimate_tokens_from_chars(0), 0);
        assert_eq!(estimate_tokens_from_chars(1), 1);
        assert_eq!(estimate_tokens_from_chars(4), 1);
        assert_eq!(estimate_tokens_from_chars(5), 2);
        assert_eq!(estimate_tokens_from_chars(u64::MAX), u64::MAX / 4 + 1);
    }

    #[test]
    fn chat_and_anthropic_prompts() {
        // (ceil(8/4) + 4) + (ceil(3/4) + 4) + 3; the image part counts nothing.
        let chat = br#"{"model":"gpt-4.1","messages":[{"role":"system","content":"abcdefgh"},
            {"role":"user","content":[{"type":"text","text":"abc"},{"type":"image_url","image_url":{"url":"x"}}]}]}"#;
        assert_eq!(estimate_prompt_tokens(chat), 6 + 5 + 3);
        assert_eq!(
            estimate_prompt_tokens_for(ResponseShape::ChatCompletions, chat),
            14
        );
        // "héllo" is 5 chars (6 bytes): 2 tokens. System blocks count as one message.
        let anthropic = r#"{"model":"claude","max_tokens":5,"system":[{"type":"text","text":"abcd"}],
            "messages":[{"role":"user","content":"héllo"},
            {"role":"user","content":[{"type":"tool_result","tool_use_id":"t","content":[{"type":"text","text":"abcdefghi"}]}]}]}"#;
        assert_eq!(
            estimate_prompt_tokens(anthropic.as_bytes()),
            (1 + 4) + (2 + 4) + (3 + 4) + 3
        );
        assert_eq!(estimate_prompt_tokens(br#"{"model":"m","messages":[]}"#), 3);
    }

    #[test]
    fn responses_and_embeddings_prompts() {
        let responses =
            br#"{"model":"gpt-4.1","instructions":"Be brief","input":"Tell me a story"}"#;
        assert_eq!(estimate_prompt_tokens(responses), (2 + 4) + (4 + 4) + 3);
        let items = br#"{"model":"gpt-4.1","input":[{"role":"user","content":[{"type":"input_text","text":"abcde"}]},
            {"type":"function_call_output","call_id":"c","output":"abcd"}]}"#;
        assert_eq!(estimate_prompt_tokens(items), (2 + 4) + (1 + 4) + 3);
        let embeddings = br#"{"model":"text-embedding-3-small","input":["hello world","second"]}"#;
        assert_eq!(estimate_prompt_tokens(embeddings), 3 + 2);
        assert_eq!(
            estimate_prompt_tokens(br#"{"model":"text-embedding-3-small","input":"hello world"}"#),
            3
        );
        assert_eq!(
            estimate_prompt_tokens(br#"{"model":"e","input":[[1,2,3],[4]]}"#),
            4
        );
        assert_eq!(
            estimate_prompt_tokens(br#"{"model":"e","input":[1,2,3]}"#),
            3
        );
        assert_eq!(
            estimate_prompt_tokens_for(ResponseShape::Embeddings, br#"{"input":"abcdefgh"}"#),
            2
        );
        assert_eq!(estimate_prompt_tokens(b"not json"), 0);
    }
}
