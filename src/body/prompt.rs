//! The prompt-token estimate of a request, counted while its body is parsed: no JSON tree
//! is built and the body is read once.
//!
//! One token per 4 characters of text ([`estimate_tokens_from_chars`], the mock provider's
//! tokenizer), plus OpenAI's chat overheads of 4 tokens per message and 3 per prompt.
//! Real BPE tokenizers differ: for English text the estimate is typically within about
//! ±25%; code, non-Latin scripts and images are estimated worse (images count nothing).

use crate::routing::Api;
use crate::usage::estimate_tokens_from_chars;
use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use std::fmt;
use std::marker::PhantomData;

const PER_MESSAGE: u64 = 4;
const PER_PROMPT: u64 = 3;

fn text_tokens(text: &str) -> u64 {
    estimate_tokens_from_chars(text.chars().count() as u64)
}

/// The parts of a request body the prompt estimate needs. Fields of the request probe
/// (`body::parse_request`); every field accepts any JSON value.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PromptParts {
    pub messages: Messages,
    pub system: Content,
    pub instructions: TextOnly,
    pub input: Input,
}

impl PromptParts {
    /// Estimated prompt tokens for a request to `api`.
    pub fn tokens(&self, api: Api) -> u64 {
        match api {
            Api::ChatCompletions | Api::Messages | Api::CountTokens => {
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
            Api::Responses => {
                let instructions = self
                    .instructions
                    .0
                    .map_or(0, |t| t.saturating_add(PER_MESSAGE));
                PER_PROMPT
                    .saturating_add(instructions)
                    .saturating_add(self.input.as_responses)
            }
            Api::Embeddings => self.input.as_embeddings,
        }
    }
}

/// What one JSON value counts, by the kind of value: each counter below says what it makes
/// of a string, a boolean or number, null, an array and an object.
trait Count<'de>: Sized {
    fn string(s: &str) -> Self;
    /// A boolean (`number` false) or a number.
    fn scalar(number: bool) -> Self;
    fn null() -> Self;
    fn array<A: SeqAccess<'de>>(seq: A) -> Result<Self, A::Error>;
    fn object<A: MapAccess<'de>>(map: A) -> Result<Self, A::Error>;
}

/// The one visitor behind every counter: hands each kind of value to [`Count`].
struct Counting<T>(PhantomData<T>);

impl<'de, T: Count<'de>> Visitor<'de> for Counting<T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_str<E>(self, s: &str) -> Result<T, E> {
        Ok(T::string(s))
    }
    fn visit_bool<E>(self, _: bool) -> Result<T, E> {
        Ok(T::scalar(false))
    }
    fn visit_i64<E>(self, _: i64) -> Result<T, E> {
        Ok(T::scalar(true))
    }
    fn visit_u64<E>(self, _: u64) -> Result<T, E> {
        Ok(T::scalar(true))
    }
    fn visit_f64<E>(self, _: f64) -> Result<T, E> {
        Ok(T::scalar(true))
    }
    fn visit_unit<E>(self) -> Result<T, E> {
        Ok(T::null())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<T, A::Error> {
        T::array(seq)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
        T::object(map)
    }
}

/// Deserializes each listed type through its [`Count`].
macro_rules! deserialize_by_counting {
    ($($counter:ty),*) => {$(
        impl<'de> Deserialize<'de> for $counter {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_any(Counting(PhantomData))
            }
        }
    )*};
}

deserialize_by_counting!(TextOnly, Content, Item, Element, List);

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

impl<'de> Count<'de> for TextOnly {
    fn string(s: &str) -> Self {
        TextOnly(Some(text_tokens(s)))
    }
    fn scalar(_: bool) -> Self {
        TextOnly(None)
    }
    fn null() -> Self {
        TextOnly(None)
    }
    fn array<A: SeqAccess<'de>>(seq: A) -> Result<Self, A::Error> {
        drain_seq(seq).map(|()| TextOnly(None))
    }
    fn object<A: MapAccess<'de>>(map: A) -> Result<Self, A::Error> {
        drain_map(map).map(|()| TextOnly(None))
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
    fn of(tokens: u64) -> Self {
        Content {
            tokens,
            present: true,
            null: false,
            scalar: false,
        }
    }
}

impl<'de> Count<'de> for Content {
    fn string(s: &str) -> Self {
        Content::of(text_tokens(s))
    }
    fn scalar(_: bool) -> Self {
        Content {
            scalar: true,
            ..Content::of(0)
        }
    }
    fn null() -> Self {
        Content {
            null: true,
            ..Content::of(0)
        }
    }
    fn array<A: SeqAccess<'de>>(mut seq: A) -> Result<Self, A::Error> {
        let mut tokens = 0u64;
        while let Some(part) = seq.next_element::<Content>()? {
            tokens = tokens.saturating_add(part.tokens);
        }
        Ok(Content::of(tokens))
    }
    fn object<A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
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

/// One item of `messages` (or of a Responses `input` list): the tokens of its `content`
/// (for Responses, else `output`); only objects are items.
#[derive(Default)]
struct Item {
    tokens: u64,
    object: bool,
}

impl<'de> Count<'de> for Item {
    fn string(_: &str) -> Self {
        Item::default()
    }
    fn scalar(_: bool) -> Self {
        Item::default()
    }
    fn null() -> Self {
        Item::default()
    }
    fn array<A: SeqAccess<'de>>(seq: A) -> Result<Self, A::Error> {
        drain_seq(seq).map(|()| Item::default())
    }
    fn object<A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
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

/// `input`, counted both ways: as embeddings input and as Responses API input.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Input {
    pub as_embeddings: u64,
    pub as_responses: u64,
}

impl<'de> Deserialize<'de> for Input {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let list = List::deserialize(d)?;
        Ok(match list.shape {
            ListShape::Text(tokens) => Input {
                as_embeddings: tokens,
                as_responses: tokens.saturating_add(PER_MESSAGE),
            },
            ListShape::Array => Input {
                // Token ids only: one token each; else strings, or arrays of token ids.
                as_embeddings: if list.all_numbers {
                    list.len
                } else {
                    list.embedding_tokens
                },
                as_responses: list.items_tokens,
            },
            ListShape::Other => Input::default(),
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
            all_objects: true,
            items_tokens: 0,
            embedding_tokens: 0,
        }
    }
}

impl<'de> Count<'de> for List {
    fn string(s: &str) -> Self {
        List {
            shape: ListShape::Text(text_tokens(s)),
            ..List::other()
        }
    }
    fn scalar(_: bool) -> Self {
        List::other()
    }
    fn null() -> Self {
        List::other()
    }
    fn array<A: SeqAccess<'de>>(mut seq: A) -> Result<Self, A::Error> {
        let mut list = List {
            shape: ListShape::Array,
            ..List::other()
        };
        while let Some(e) = seq.next_element::<Element>()? {
            list.len = list.len.saturating_add(1);
            list.all_numbers &= e.number;
            list.all_objects &= e.item.object;
            list.items_tokens = list
                .items_tokens
                .saturating_add(e.item.tokens)
                .saturating_add(PER_MESSAGE);
            list.embedding_tokens = list.embedding_tokens.saturating_add(e.embedding_tokens);
        }
        Ok(list)
    }
    fn object<A: MapAccess<'de>>(map: A) -> Result<Self, A::Error> {
        drain_map(map).map(|()| List::other())
    }
}

/// One element of a `List`, seen as chat/Responses item and as embeddings input at once.
struct Element {
    item: Item,
    number: bool,
    embedding_tokens: u64,
}

impl Element {
    fn of(number: bool, embedding_tokens: u64) -> Self {
        Element {
            item: Item::default(),
            number,
            embedding_tokens,
        }
    }
}

impl<'de> Count<'de> for Element {
    fn string(s: &str) -> Self {
        Element::of(false, text_tokens(s))
    }
    fn scalar(number: bool) -> Self {
        Element::of(number, 0)
    }
    fn null() -> Self {
        Element::of(false, 0)
    }
    fn array<A: SeqAccess<'de>>(mut seq: A) -> Result<Self, A::Error> {
        // A token-id array: one token per element.
        let mut n = 0u64;
        while seq.next_element::<IgnoredAny>()?.is_some() {
            n = n.saturating_add(1);
        }
        Ok(Element::of(false, n))
    }
    fn object<A: MapAccess<'de>>(map: A) -> Result<Self, A::Error> {
        let item = Item::object(map)?;
        Ok(Element {
            item,
            ..Element::of(false, 0)
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::body::parse_request;
    use crate::routing::Api;

    /// The estimate of a whole body for `api`; 0 when the body is refused.
    fn estimate(api: Api, body: &[u8]) -> u64 {
        parse_request(body).map_or(0, |f| f.prompt.tokens(api))
    }

    #[test]
    fn chat_and_anthropic_prompts() {
        // (ceil(8/4) + 4) + (ceil(3/4) + 4) + 3; the image part counts nothing.
        let chat = br#"{"model":"gpt-4.1","messages":[{"role":"system","content":"abcdefgh"},
            {"role":"user","content":[{"type":"text","text":"abc"},{"type":"image_url","image_url":{"url":"x"}}]}]}"#;
        assert_eq!(estimate(Api::ChatCompletions, chat), 6 + 5 + 3);
        assert_eq!(estimate(Api::ChatCompletions, chat), 14);
        // "héllo" is 5 chars (6 bytes): 2 tokens. System blocks count as one message.
        let anthropic = r#"{"model":"claude","max_tokens":5,"system":[{"type":"text","text":"abcd"}],
            "messages":[{"role":"user","content":"héllo"},
            {"role":"user","content":[{"type":"tool_result","tool_use_id":"t","content":[{"type":"text","text":"abcdefghi"}]}]}]}"#;
        assert_eq!(
            estimate(Api::Messages, anthropic.as_bytes()),
            (1 + 4) + (2 + 4) + (3 + 4) + 3
        );
        assert_eq!(
            estimate(Api::ChatCompletions, br#"{"model":"m","messages":[]}"#),
            3
        );
    }

    #[test]
    fn responses_and_embeddings_prompts() {
        let responses =
            br#"{"model":"gpt-4.1","instructions":"Be brief","input":"Tell me a story"}"#;
        assert_eq!(estimate(Api::Responses, responses), (2 + 4) + (4 + 4) + 3);
        let items = br#"{"model":"gpt-4.1","input":[{"role":"user","content":[{"type":"input_text","text":"abcde"}]},
            {"type":"function_call_output","call_id":"c","output":"abcd"}]}"#;
        assert_eq!(estimate(Api::Responses, items), (2 + 4) + (1 + 4) + 3);
        let embeddings = br#"{"model":"text-embedding-3-small","input":["hello world","second"]}"#;
        assert_eq!(estimate(Api::Embeddings, embeddings), 3 + 2);
        assert_eq!(
            estimate(
                Api::Embeddings,
                br#"{"model":"text-embedding-3-small","input":"hello world"}"#
            ),
            3
        );
        assert_eq!(
            estimate(Api::Embeddings, br#"{"model":"e","input":[[1,2,3],[4]]}"#),
            4
        );
        assert_eq!(
            estimate(Api::Embeddings, br#"{"model":"e","input":[1,2,3]}"#),
            3
        );
        assert_eq!(
            estimate(Api::Embeddings, br#"{"model":"e","input":"abcdefgh"}"#),
            2
        );
        assert_eq!(estimate(Api::ChatCompletions, b"not json"), 0);
    }

    #[test]
    fn prompt_estimates_match_the_mock_tokenizer() {
        // Requests sent to sluice-mock for the mock_* fixtures; the mock's prompt totals
        // (input + cached + cache creation) are in their expected files.
        let cases: &[(Api, &[u8], u64)] = &[
            (Api::ChatCompletions, br#"{"model":"o4-mini","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Write a short line about a fox."}]}"#, 26),
            (Api::Responses, br#"{"model":"o4-mini","stream":true,"instructions":"Be brief","input":[{"role":"user","content":[{"type":"input_text","text":"Tell me about the fox."}]}]}"#, 19),
            (Api::Messages, br#"{"model":"claude-sonnet-4-5-20250929","max_tokens":256,"stream":true,"system":[{"type":"text","text":"You are terse and precise."}],"messages":[{"role":"user","content":"Describe the fox in one line."}]}"#, 26),
            (Api::ChatCompletions, br#"{"model":"gpt-4.1-mini","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"Tell me a fox story please"}]}"#, 14),
            (Api::Embeddings, r#"{"model":"text-embedding-3-small","input":["The quick brown fox","jumps over the lazy dog","héllo wörld"],"dimensions":4}"#.as_bytes(), 14),
        ];
        for (api, body, expected) in cases {
            assert_eq!(
                estimate(*api, body),
                *expected,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
