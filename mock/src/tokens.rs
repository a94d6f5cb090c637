//! The mock's deterministic tokenizer and text generator.
//!
//! Rules (also in `mock/README.md`):
//! * `count_tokens(text) = ceil(chars / 4)` where `chars` is the number of
//!   Unicode scalar values (`str::chars`). Empty text is 0 tokens; any
//!   non-empty text is at least 1.
//! * Generated output text of `n` tokens is `n` three-letter words joined by
//!   single spaces (`4n - 1` chars), so `count_tokens(mock_text(n)) == n`.

use serde_json::Value;

/// Deterministic token count: `ceil(chars / 4)` over the UTF-8 char count.
pub fn count_tokens(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(4)
}

const WORDS: [&str; 8] = ["the", "sly", "fox", "ran", "far", "and", "hid", "out"];

fn word(i: u64) -> &'static str {
    WORDS[(i % WORDS.len() as u64) as usize]
}

/// The output text the mock generates for `n` tokens:
/// `count_tokens(&mock_text(n)) == n`.
pub fn mock_text(n: u64) -> String {
    mock_chunks(n, 1).concat()
}

/// The output text of `n` tokens split into at most `chunks` pieces (fewer
/// when there are fewer words than chunks; none when `n == 0`). The pieces
/// concatenate to exactly `mock_text(n)`.
pub(crate) fn mock_chunks(n: u64, chunks: usize) -> Vec<String> {
    if n == 0 {
        return Vec::new();
    }
    let k = (chunks.max(1) as u64).min(n);
    let base = n / k;
    let extra = n % k;
    let mut out = Vec::with_capacity(k as usize);
    let mut idx = 0u64;
    for c in 0..k {
        let len = base + u64::from(c < extra);
        let mut s = String::with_capacity(len as usize * 4);
        for _ in 0..len {
            if idx > 0 {
                s.push(' ');
            }
            s.push_str(word(idx));
            idx += 1;
        }
        out.push(s);
    }
    out
}

/// Tokens of a message `content`-like value: a string, or an array of parts
/// (strings or objects with a `text` string; objects with a nested `content`,
/// such as Anthropic `tool_result` blocks, are counted recursively). Each text
/// piece is counted separately and summed. Anything else counts 0.
pub(crate) fn content_tokens(v: &Value) -> u64 {
    match v {
        Value::String(s) => count_tokens(s),
        Value::Array(items) => items.iter().map(content_tokens).sum(),
        Value::Object(map) => {
            if let Some(Value::String(t)) = map.get("text") {
                count_tokens(t)
            } else if let Some(c) = map.get("content") {
                content_tokens(c)
            } else {
                0
            }
        }
        _ => 0,
    }
}

/// Per-message overhead added to each message's content tokens.
pub(crate) const PER_MESSAGE: u64 = 4;
/// Fixed overhead added once per prompt (chat, Anthropic, Responses).
pub(crate) const PER_PROMPT: u64 = 3;

/// Prompt tokens of a chat-style message list:
/// `sum(content_tokens(m.content) + 4) + 3`.
pub(crate) fn messages_tokens(messages: &[Value]) -> u64 {
    messages
        .iter()
        .map(|m| content_tokens(m.get("content").unwrap_or(&Value::Null)) + PER_MESSAGE)
        .sum::<u64>()
        + PER_PROMPT
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn counting() {
        assert_eq!(count_tokens(""), 0);
        assert_eq!(count_tokens("a"), 1);
        assert_eq!(count_tokens("abcd"), 1);
        assert_eq!(count_tokens("abcde"), 2);
        assert_eq!(count_tokens("héllo"), 2); // 5 chars, 6 bytes
    }

    #[test]
    fn text_matches_count() {
        for n in 0..100 {
            assert_eq!(count_tokens(&mock_text(n)), n, "n={n}");
            for k in 1..7 {
                let chunks = mock_chunks(n, k);
                assert_eq!(chunks.concat(), mock_text(n));
                assert_eq!(chunks.len() as u64, (k as u64).min(n));
            }
        }
        assert_eq!(mock_text(3), "the sly fox");
    }

    #[test]
    fn message_tokens() {
        let msgs = vec![
            json!({"role":"system","content":"abcdefgh"}),
            json!({"role":"user","content":[{"type":"text","text":"abc"},{"type":"image_url"}]}),
        ];
        assert_eq!(messages_tokens(&msgs), (2 + 4) + (1 + 4) + 3);
    }
}
