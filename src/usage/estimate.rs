//! Token estimates for when a provider's usage report never arrives.
//!
//! One token per 4 characters (Unicode scalar values), plus OpenAI's chat overheads of
//! 4 tokens per message and 3 per prompt. This is the mock provider's tokenizer
//! (`mock/src/tokens.rs`), so tests can compare exactly; real BPE tokenizers differ, and
//! for English text the estimate is typically within about ±25%. Code, non-Latin scripts
//! and images are estimated worse (images count nothing).

use super::ResponseShape;
use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use std::borrow::Cow;
use std::fmt;

const PER_MESSAGE: u64 = 4;
const PER_PROMPT: u64 = 3;

/// `ceil(chars / 4)`.
pub fn estimate_tokens_from_chars(chars: u64) -> u64 {
    chars.div_ceil(4)
}

fn text_tokens(text: &str) -> u64 {
    estimate_tokens_from_chars(text.chars().count() as u64)
}

/// The parts of a request body the prompt estimate needs, counted while the body is
/// deserialized: no JSON tree is built and the body is read once. Fields of a request
/// probe (see `body::parse_request`); every field accepts any JSON value.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PromptParts {
    pub messages: Messages,
    pub system: Content,
    pub instructions: TextOnly,
    pub input: Input,
}

impl PromptParts {
    /// Estimated prompt tokens for a request of `shape`.
    pub fn tokens(&self, shape: ResponseShape) -> u64 {
        match shape {
            ResponseShape::ChatCompletions | ResponseShape::AnthropicMessages => {
                // Anthropic's `system` counts as one more message.
                let system = if self.system.present && !self.system.null {
                    self.system.tokens.saturating_add(PER_MESSAGE)
                } else {
                    0
                };
                PER_PROMPT
                    .saturating_add(system)
                    .saturating_add(self.messages.tokens)
            }
            ResponseShape::Responses => {
                let instructions = self
                    .instructions
                    .0
                    .map_or(0, |t| t.saturating_add(PER_MESSAGE));
                PER_PROMPT
                    .saturating_add(instructions)
                    .saturating_add(self.input.as_responses)
            }
            ResponseShape::Embeddings => self.input.as_embeddings,
        }
    }
}

/// The body fields the estimate reads, for estimating from raw bytes.
#[derive(serde::Deserialize)]
struct PromptProbe<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    messages: Messages,
    #[serde(default)]
    system: Content,
    #[serde(default)]
    instructions: TextOnly,
    #[serde(default)]
    input: Input,
}

impl PromptProbe<'_> {
    fn parts(&self) -> PromptParts {
        PromptParts {
            messages: self.messages,
            system: self.system,
            instructions: self.instructions,
            input: self.input,
        }
    }
}

/// Estimated prompt tokens of a request body, with the API guessed from its fields:
/// `messages` (chat, Anthropic), else `input` (embeddings when it is a list of strings or
/// token ids, or a string for a model whose name contains `embed`; else Responses).
/// Prefer [`estimate_prompt_tokens_for`] when the API is known. 0 if the body is not JSON.
pub fn estimate_prompt_tokens(request_body: &[u8]) -> u64 {
    let Ok(probe) = serde_json::from_slice::<PromptProbe>(request_body) else {
        return 0;
    };
    let embeddings = match probe.input.kind {
        InputKind::List => true,
        InputKind::Text => probe
            .model
            .as_deref()
            .is_some_and(|model| model.to_ascii_lowercase().contains("embed")),
        InputKind::Absent | InputKind::Other => false,
    };
    let shape = if probe.messages.present {
        ResponseShape::ChatCompletions
    } else if embeddings {
        ResponseShape::Embeddings
    } else {
        ResponseShape::Responses
    };
    probe.parts().tokens(shape)
}

/// Estimated prompt tokens of a request body for a known API. 0 if the body is not JSON.
pub fn estimate_prompt_tokens_for(shape: ResponseShape, request_body: &[u8]) -> u64 {
    serde_json::from_slice::<PromptProbe>(request_body).map_or(0, |p| p.parts().tokens(shape))
}

fn drain_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<IgnoredAny>()?.is_some() {}
    Ok(())
}

fn drain_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
}

/// Object keys the counters look at; anything else is skipped without allocating.
enum Key {
    Text,
    Content,
    Output,
    Other,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_str<E>(self, key: &str) -> Result<Key, E> {
                Ok(match key {
                    "text" => Key::Text,
                    "content" => Key::Content,
                    "output" => Key::Output,
                    _ => Key::Other,
                })
            }
        }
        d.deserialize_str(V)
    }
}

/// The tokens of a string value; other values count nothing.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TextOnly(pub Option<u64>);

impl<'de> Deserialize<'de> for TextOnly {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TextOnly;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E>(self, s: &str) -> Result<TextOnly, E> {
                Ok(TextOnly(Some(text_tokens(s))))
            }
            fn visit_bool<E>(self, _: bool) -> Result<TextOnly, E> {
                Ok(TextOnly(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<TextOnly, E> {
                Ok(TextOnly(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<TextOnly, E> {
                Ok(TextOnly(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<TextOnly, E> {
                Ok(TextOnly(None))
            }
            fn visit_unit<E>(self) -> Result<TextOnly, E> {
                Ok(TextOnly(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<TextOnly, A::Error> {
                drain_seq(seq).map(|()| TextOnly(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<TextOnly, A::Error> {
                drain_map(map).map(|()| TextOnly(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// Tokens of message content: a string, parts with `text`, or a nested `content`
/// (e.g. Anthropic `tool_result`); images and other parts count nothing.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Content {
    pub tokens: u64,
    /// The field was in the body (a `Default` stands for an absent field).
    pub present: bool,
    pub null: bool,
    /// A number or a boolean: no API takes one as content.
    pub scalar: bool,
}

impl Content {
    fn scalar() -> Self {
        Content {
            scalar: true,
            ..Content::of(0)
        }
    }

    fn of(tokens: u64) -> Self {
        Content {
            tokens,
            present: true,
            null: false,
            scalar: false,
        }
    }
}

impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Content;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E>(self, s: &str) -> Result<Content, E> {
                Ok(Content::of(text_tokens(s)))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Content, E> {
                Ok(Content::scalar())
            }
            fn visit_i64<E>(self, _: i64) -> Result<Content, E> {
                Ok(Content::scalar())
            }
            fn visit_u64<E>(self, _: u64) -> Result<Content, E> {
                Ok(Content::scalar())
            }
            fn visit_f64<E>(self, _: f64) -> Result<Content, E> {
                Ok(Content::scalar())
            }
            fn visit_unit<E>(self) -> Result<Content, E> {
                Ok(Content {
                    null: true,
                    ..Content::of(0)
                })
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Content, A::Error> {
                let mut tokens = 0u64;
                while let Some(part) = seq.next_element::<Content>()? {
                    tokens = tokens.saturating_add(part.tokens);
                }
                Ok(Content::of(tokens))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Content, A::Error> {
                // A string `text` wins over a nested `content`; the last duplicate counts.
                let (mut text, mut nested) = (None, None);
                while let Some(key) = map.next_key::<Key>()? {
                    match key {
                        Key::Text => text = map.next_value::<TextOnly>()?.0,
                        Key::Content => nested = Some(map.next_value::<Content>()?.tokens),
                        Key::Output | Key::Other => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(Content::of(text.or(nested).unwrap_or(0)))
            }
        }
        d.deserialize_any(V)
    }
}

/// One item of `messages` (or of a Responses `input` list): the tokens of its `content`
/// (for Responses, else `output`), plus the per-message overhead.
#[derive(Default)]
struct Item {
    tokens: u64,
    object: bool,
}

impl<'de> Deserialize<'de> for Item {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Item;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E>(self, _: &str) -> Result<Item, E> {
                Ok(Item::default())
            }
            fn visit_bool<E>(self, _: bool) -> Result<Item, E> {
                Ok(Item::default())
            }
            fn visit_i64<E>(self, _: i64) -> Result<Item, E> {
                Ok(Item::default())
            }
            fn visit_u64<E>(self, _: u64) -> Result<Item, E> {
                Ok(Item::default())
            }
            fn visit_f64<E>(self, _: f64) -> Result<Item, E> {
                Ok(Item::default())
            }
            fn visit_unit<E>(self) -> Result<Item, E> {
                Ok(Item::default())
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Item, A::Error> {
                drain_seq(seq).map(|()| Item::default())
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Item, A::Error> {
                let (mut content, mut output) = (None, None);
                while let Some(key) = map.next_key::<Key>()? {
                    match key {
                        Key::Content => content = Some(map.next_value::<Content>()?.tokens),
                        Key::Output => output = Some(map.next_value::<Content>()?.tokens),
                        Key::Text | Key::Other => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(Item {
                    tokens: content.or(output).unwrap_or(0),
                    object: true,
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// `messages`: the sum over items of content tokens plus the per-message overhead.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Messages {
    pub tokens: u64,
    /// The body has a `messages` field (any value): a chat or Anthropic request.
    pub present: bool,
    /// The field is an array of objects, as every API that has it requires.
    pub well_formed: bool,
}

impl<'de> Deserialize<'de> for Messages {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Only an array of messages counts; the content of each is read with `Item`,
        // which for chat messages only sees `content` (chat messages have no `output`).
        let list = List::deserialize(d)?;
        Ok(Messages {
            tokens: list.items_tokens,
            present: true,
            well_formed: matches!(list.shape, ListShape::Array) && list.all_objects,
        })
    }
}

/// What kind of value an `input` field holds (for guessing the API).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    #[default]
    Absent,
    Text,
    /// An array without objects: strings or token ids.
    List,
    Other,
}

/// `input`, counted both ways: as embeddings input and as Responses API input.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Input {
    pub as_embeddings: u64,
    pub as_responses: u64,
    pub kind: InputKind,
}

impl<'de> Deserialize<'de> for Input {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let list = List::deserialize(d)?;
        Ok(match list.shape {
            ListShape::Text(tokens) => Input {
                as_embeddings: tokens,
                as_responses: tokens.saturating_add(PER_MESSAGE),
                kind: InputKind::Text,
            },
            ListShape::Array => Input {
                // Token ids only: one token each; else strings, or arrays of token ids.
                as_embeddings: if list.all_numbers {
                    list.len
                } else {
                    list.embedding_tokens
                },
                as_responses: list.items_tokens,
                kind: if list.any_object {
                    InputKind::Other
                } else {
                    InputKind::List
                },
            },
            ListShape::Other => Input {
                kind: InputKind::Other,
                ..Input::default()
            },
        })
    }
}

enum ListShape {
    Text(u64),
    Array,
    Other,
}

/// A value that may be a list of items, read once and counted every way a caller needs.
struct List {
    shape: ListShape,
    len: u64,
    all_numbers: bool,
    any_object: bool,
    all_objects: bool,
    /// Sum over items of `Item` tokens plus the per-message overhead.
    items_tokens: u64,
    /// Sum over items of string tokens, or of the length of token-id arrays.
    embedding_tokens: u64,
}

impl List {
    fn other() -> Self {
        List {
            shape: ListShape::Other,
            len: 0,
            all_numbers: true,
            any_object: false,
            all_objects: true,
            items_tokens: 0,
            embedding_tokens: 0,
        }
    }
}

/// One element of a `List`, seen as chat/Responses item and as embeddings input at once.
struct Element {
    item: Item,
    number: bool,
    embedding_tokens: u64,
}

impl<'de> Deserialize<'de> for Element {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Element;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E>(self, s: &str) -> Result<Element, E> {
                Ok(Element {
                    item: Item::default(),
                    number: false,
                    embedding_tokens: text_tokens(s),
                })
            }
            fn visit_bool<E>(self, _: bool) -> Result<Element, E> {
                Ok(Element {
                    item: Item::default(),
                    number: false,
                    embedding_tokens: 0,
                })
            }
            fn visit_i64<E>(self, _: i64) -> Result<Element, E> {
                Ok(Element {
                    item: Item::default(),
                    number: true,
                    embedding_tokens: 0,
                })
            }
            fn visit_u64<E>(self, _: u64) -> Result<Element, E> {
                Ok(Element {
                    item: Item::default(),
                    number: true,
                    embedding_tokens: 0,
                })
            }
            fn visit_f64<E>(self, _: f64) -> Result<Element, E> {
                Ok(Element {
                    item: Item::default(),
                    number: true,
                    embedding_tokens: 0,
                })
            }
            fn visit_unit<E>(self) -> Result<Element, E> {
                Ok(Element {
                    item: Item::default(),
                    number: false,
                    embedding_tokens: 0,
                })
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Element, A::Error> {
                // A token-id array: one token per element.
                let mut n = 0u64;
                while seq.next_element::<IgnoredAny>()?.is_some() {
                    n = n.saturating_add(1);
                }
                Ok(Element {
                    item: Item::default(),
                    number: false,
                    embedding_tokens: n,
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Element, A::Error> {
                let item = Item::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(Element {
                    item,
                    number: false,
                    embedding_tokens: 0,
                })
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for List {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = List;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E>(self, s: &str) -> Result<List, E> {
                Ok(List {
                    shape: ListShape::Text(text_tokens(s)),
                    ..List::other()
                })
            }
            fn visit_bool<E>(self, _: bool) -> Result<List, E> {
                Ok(List::other())
            }
            fn visit_i64<E>(self, _: i64) -> Result<List, E> {
                Ok(List::other())
            }
            fn visit_u64<E>(self, _: u64) -> Result<List, E> {
                Ok(List::other())
            }
            fn visit_f64<E>(self, _: f64) -> Result<List, E> {
                Ok(List::other())
            }
            fn visit_unit<E>(self) -> Result<List, E> {
                Ok(List::other())
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<List, A::Error> {
                drain_map(map).map(|()| List::other())
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<List, A::Error> {
                let mut list = List {
                    shape: ListShape::Array,
                    ..List::other()
                };
                while let Some(e) = seq.next_element::<Element>()? {
                    list.len = list.len.saturating_add(1);
                    list.all_numbers &= e.number;
                    list.any_object |= e.item.object;
                    list.all_objects &= e.item.object;
                    list.items_tokens = list
                        .items_tokens
                        .saturating_add(e.item.tokens)
                        .saturating_add(PER_MESSAGE);
                    list.embedding_tokens =
                        list.embedding_tokens.saturating_add(e.embedding_tokens);
                }
                Ok(list)
            }
        }
        d.deserialize_any(V)
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
