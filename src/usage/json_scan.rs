//! Incremental JSON scanner: consumes a JSON document in arbitrary pieces and keeps only
//! what metering needs: the raw bytes of a `usage` object at an accepted path, the
//! document's top-level `"type"`, whether it is an OpenAI usage-only chunk, and the number
//! of characters in generated-text strings. Memory is fixed except the usage capture,
//! which is capped. It never validates: malformed input only yields nothing.

use super::MAX_USAGE_OBJECT_BYTES;

/// Containers deeper than this are still balanced, but their kind (object or array) is
/// not tracked, so nothing inside them is recognized. Provider JSON is far shallower.
const TRACKED_DEPTH: u32 = 256;
/// Longest key compared with the names below (`reasoning_content` is 17 bytes).
const KEY_CAP: usize = 24;
/// Longest `type` value kept (`response.function_call_arguments.delta` is 38).
pub(crate) const TYPE_CAP: usize = 64;

/// Where an accepted `usage` object was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum UsagePath {
    /// `usage` in the top-level object.
    TopLevel,
    /// `message.usage` (Anthropic `message_start`).
    InMessage,
    /// `response.usage` (Responses API stream events).
    InResponse,
}

/// Which usage paths and which generated-text keys count, per API and framing.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ScanRules {
    pub usage_top_level: bool,
    pub usage_in_message: bool,
    pub usage_in_response: bool,
    /// String values of these keys are generated text (counted for estimates).
    pub text_keys: &'static [&'static [u8]],
    /// Count text keys only in the top-level object.
    pub text_top_level_only: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Key {
    None,
    Other,
    Usage,
    Message,
    Response,
    Type,
    Choices,
    Error,
    Text,
}

/// What the bytes of the current string are for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Key,
    Type,
    Text,
    Other,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lex {
    Outside,
    Str(Role),
    Escape(Role),
    Unicode { role: Role, digits: u8, value: u32 },
}

/// The top-level `usage` value of the document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TopUsage {
    Absent,
    Object,
    Other,
}

/// The top-level `choices` value of the document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Choices {
    Absent,
    /// `[` seen, waiting for the first significant byte.
    Probe,
    Empty,
    NonEmpty,
}

/// A fixed-capacity byte buffer that remembers overflowing instead of growing.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SmallBuf<const N: usize> {
    bytes: [u8; N],
    len: usize,
    overflow: bool,
}

impl<const N: usize> SmallBuf<N> {
    pub(crate) const fn new() -> Self {
        Self {
            bytes: [0; N],
            len: 0,
            overflow: false,
        }
    }

    pub(crate) fn clear(&mut self) {
        self.len = 0;
        self.overflow = false;
    }

    pub(crate) fn push(&mut self, data: &[u8]) {
        if self.overflow {
            return;
        }
        match self.bytes.get_mut(self.len..self.len + data.len()) {
            Some(dest) => {
                dest.copy_from_slice(data);
                self.len += data.len();
            }
            None => self.overflow = true,
        }
    }

    /// The contents, or `None` if they did not fit.
    pub(crate) fn get(&self) -> Option<&[u8]> {
        if self.overflow {
            None
        } else {
            self.bytes.get(..self.len)
        }
    }
}

pub(crate) struct JsonScanner {
    rules: ScanRules,
    lex: Lex,
    depth: u32,
    /// Bit `d - 1` is set when the container at depth `d` is an array.
    arrays: [u64; (TRACKED_DEPTH / 64) as usize],
    expect_key: bool,
    /// After `:`: the next significant byte starts the value of `key`.
    value_pending: bool,
    /// The key whose value is being read at the current depth.
    key: Key,
    /// The last key read in the top-level object (the parent of depth-2 values).
    depth1_key: Key,
    key_buf: SmallBuf<KEY_CAP>,
    type_buf: SmallBuf<TYPE_CAP>,
    type_seen: bool,
    capture: Vec<u8>,
    /// Capturing a usage object: the depth outside it, and where it was found.
    capture_from: Option<(u32, UsagePath)>,
    /// A capture just completed; its bytes are in `capture` until the next `feed`.
    captured: Option<UsagePath>,
    capture_overflowed: bool,
    top_usage: TopUsage,
    choices: Choices,
    /// Sticky: something proved this document is not a usage-only chunk.
    not_usage_only: bool,
    /// The document has a top-level `error` object (an OpenAI stream's error chunk).
    top_error: bool,
    text_chars: u64,
}

impl JsonScanner {
    pub(crate) fn new(rules: ScanRules) -> Self {
        Self {
            rules,
            lex: Lex::Outside,
            depth: 0,
            arrays: [0; (TRACKED_DEPTH / 64) as usize],
            expect_key: false,
            value_pending: false,
            key: Key::None,
            depth1_key: Key::None,
            key_buf: SmallBuf::new(),
            type_buf: SmallBuf::new(),
            type_seen: false,
            capture: Vec::new(),
            capture_from: None,
            captured: None,
            capture_overflowed: false,
            top_usage: TopUsage::Absent,
            choices: Choices::Absent,
            not_usage_only: false,
            top_error: false,
            text_chars: 0,
        }
    }

    /// Starts a new document (the next SSE event). Counters survive.
    pub(crate) fn reset_document(&mut self) {
        let rules = self.rules;
        let text_chars = self.text_chars;
        let capture_overflowed = self.capture_overflowed;
        let mut capture = std::mem::take(&mut self.capture);
        capture.clear();
        *self = Self::new(rules);
        self.capture = capture;
        self.text_chars = text_chars;
        self.capture_overflowed = capture_overflowed;
    }

    /// Consumes bytes until a usage capture completes (then [`Self::completed_capture`]
    /// returns it) or `bytes` ends. Returns how many bytes were consumed; at least one
    /// when `bytes` is not empty.
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> usize {
        if self.captured.take().is_some() {
            self.capture.clear();
        }
        let mut i = 0;
        while let Some(&b) = bytes.get(i) {
            match self.lex {
                Lex::Outside => {
                    i += 1;
                    self.outside(b);
                    if self.captured.is_some() {
                        return i;
                    }
                }
                Lex::Str(role) => {
                    let rest = bytes.get(i..).unwrap_or_default();
                    let run_len = rest
                        .iter()
                        .position(|&c| c == b'"' || c == b'\\')
                        .unwrap_or(rest.len());
                    self.string_bytes(role, rest.get(..run_len).unwrap_or_default());
                    i += run_len;
                    if let Some(&c) = rest.get(run_len) {
                        i += 1;
                        self.record(&[c]);
                        if c == b'"' {
                            self.end_string(role);
                        } else {
                            self.role_bytes(role, &[c]);
                            self.lex = Lex::Escape(role);
                        }
                    }
                }
                Lex::Escape(role) => {
                    i += 1;
                    self.record(&[b]);
                    self.role_bytes(role, &[b]);
                    if b == b'u' {
                        self.lex = Lex::Unicode {
                            role,
                            digits: 0,
                            value: 0,
                        };
                    } else {
                        self.count_chars(role, 1);
                        self.lex = Lex::Str(role);
                    }
                }
                Lex::Unicode {
                    role,
                    digits,
                    value,
                } => match char::from(b).to_digit(16) {
                    Some(h) => {
                        i += 1;
                        self.record(&[b]);
                        self.role_bytes(role, &[b]);
                        let value = (value << 4) | h;
                        if digits == 3 {
                            // A low surrogate completes a pair already counted at the high one.
                            if !(0xDC00..=0xDFFF).contains(&value) {
                                self.count_chars(role, 1);
                            }
                            self.lex = Lex::Str(role);
                        } else {
                            self.lex = Lex::Unicode {
                                role,
                                digits: digits + 1,
                                value,
                            };
                        }
                    }
                    None => {
                        // Malformed escape: count it, and read this byte as string content.
                        self.count_chars(role, 1);
                        self.lex = Lex::Str(role);
                    }
                },
            }
        }
        i
    }

    /// The usage object completed by the last `feed`, with where it was found.
    pub(crate) fn completed_capture(&self) -> Option<(UsagePath, &[u8])> {
        self.captured.map(|path| (path, self.capture.as_slice()))
    }

    /// Characters of generated-text strings seen so far, across documents.
    pub(crate) fn text_chars(&self) -> u64 {
        self.text_chars
    }

    /// A usage object was larger than [`MAX_USAGE_OBJECT_BYTES`] and was ignored.
    pub(crate) fn capture_overflowed(&self) -> bool {
        self.capture_overflowed
    }

    /// The top-level `"type"` string of this document, if seen and short.
    pub(crate) fn type_value(&self) -> Option<&[u8]> {
        if self.type_seen {
            self.type_buf.get()
        } else {
            None
        }
    }

    /// This document has a top-level `usage` object and `choices` empty or absent.
    pub(crate) fn is_usage_only(&self) -> bool {
        !self.not_usage_only
            && self.top_usage == TopUsage::Object
            && matches!(self.choices, Choices::Absent | Choices::Empty)
    }

    /// This document has a top-level `error` object.
    pub(crate) fn has_top_level_error(&self) -> bool {
        self.top_error
    }

    /// Already certain that this document is not a usage-only chunk.
    pub(crate) fn known_not_usage_only(&self) -> bool {
        self.not_usage_only
    }

    pub(crate) fn held_bytes(&self) -> usize {
        self.capture.capacity()
    }

    fn outside(&mut self, b: u8) {
        if matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            self.record(&[b]);
            return;
        }
        if self.choices == Choices::Probe {
            self.choices = if b == b']' {
                Choices::Empty
            } else {
                self.not_usage_only = true;
                Choices::NonEmpty
            };
        }
        let is_key = b == b'"' && self.expect_key && self.in_object();
        if self.value_pending && !is_key && !matches!(b, b'}' | b']' | b',' | b':') {
            self.value_start(b);
        }
        self.record(&[b]);
        match b {
            b'{' | b'[' => {
                self.depth = self.depth.saturating_add(1);
                self.set_container(b == b'[');
                self.expect_key = b == b'{';
                self.value_pending = false;
                self.key = Key::None;
                if self.depth == 1 {
                    self.depth1_key = Key::None;
                }
            }
            b'}' | b']' => {
                if let Some((outer, path)) = self.capture_from {
                    if self.depth <= outer.saturating_add(1) {
                        self.capture_from = None;
                        if b == b'}' && self.depth == outer.saturating_add(1) {
                            self.captured = Some(path);
                        } else {
                            self.capture.clear();
                        }
                    }
                }
                self.depth = self.depth.saturating_sub(1);
                self.expect_key = false;
                self.value_pending = false;
                self.key = Key::None;
            }
            b',' => {
                self.expect_key = self.in_object();
                self.value_pending = false;
                self.key = Key::None;
            }
            b':' => {
                self.expect_key = false;
                self.value_pending = true;
            }
            b'"' => {
                let role = if is_key {
                    self.key_buf.clear();
                    Role::Key
                } else {
                    self.value_role()
                };
                if role == Role::Type {
                    self.type_buf.clear();
                }
                self.lex = Lex::Str(role);
            }
            _ => {}
        }
    }

    /// The first byte of the value of `self.key` (depth not yet changed by it).
    fn value_start(&mut self, b: u8) {
        self.value_pending = false;
        if self.depth == 1 {
            match self.key {
                Key::Usage if b == b'{' => self.top_usage = TopUsage::Object,
                Key::Usage => {
                    self.top_usage = TopUsage::Other;
                    self.not_usage_only = true;
                }
                Key::Choices if b == b'[' => self.choices = Choices::Probe,
                Key::Choices => {
                    self.choices = Choices::NonEmpty;
                    self.not_usage_only = true;
                }
                Key::Error if b == b'{' => self.top_error = true,
                _ => {}
            }
        }
        if b == b'{' && self.key == Key::Usage && self.capture_from.is_none() {
            if let Some(path) = self.usage_path() {
                self.capture.clear();
                self.capture_from = Some((self.depth, path));
            }
        }
    }

    fn usage_path(&self) -> Option<UsagePath> {
        match (self.depth, self.depth1_key) {
            (1, _) if self.rules.usage_top_level => Some(UsagePath::TopLevel),
            (2, Key::Message) if self.rules.usage_in_message => Some(UsagePath::InMessage),
            (2, Key::Response) if self.rules.usage_in_response => Some(UsagePath::InResponse),
            _ => None,
        }
    }

    fn value_role(&self) -> Role {
        if !self.in_object() {
            return Role::Other;
        }
        match self.key {
            Key::Type if self.depth == 1 => Role::Type,
            Key::Text if !self.rules.text_top_level_only || self.depth == 1 => Role::Text,
            _ => Role::Other,
        }
    }

    fn end_string(&mut self, role: Role) {
        self.lex = Lex::Outside;
        match role {
            Role::Key => {
                self.key = self.classify_key();
                if self.depth == 1 {
                    self.depth1_key = self.key;
                }
                self.expect_key = false;
            }
            Role::Type => self.type_seen = true,
            Role::Text | Role::Other => {}
        }
    }

    fn classify_key(&self) -> Key {
        // Keys are compared raw: providers never escape the ASCII names we look for.
        match self.key_buf.get() {
            None => Key::Other,
            Some(b"usage") => Key::Usage,
            Some(b"message") => Key::Message,
            Some(b"response") => Key::Response,
            Some(b"type") => Key::Type,
            Some(b"choices") => Key::Choices,
            Some(b"error") => Key::Error,
            Some(name) if self.rules.text_keys.contains(&name) => Key::Text,
            Some(_) => Key::Other,
        }
    }

    /// Unescaped string content.
    fn string_bytes(&mut self, role: Role, run: &[u8]) {
        self.record(run);
        if role == Role::Text {
            // One char per byte that does not continue a UTF-8 sequence.
            let chars = run.iter().filter(|&&c| c & 0xC0 != 0x80).count();
            self.count_chars(role, chars as u64);
        } else {
            self.role_bytes(role, run);
        }
    }

    /// Raw string bytes for the key and type buffers (escapes kept as written).
    fn role_bytes(&mut self, role: Role, bytes: &[u8]) {
        match role {
            Role::Key => self.key_buf.push(bytes),
            Role::Type => self.type_buf.push(bytes),
            Role::Text | Role::Other => {}
        }
    }

    fn count_chars(&mut self, role: Role, n: u64) {
        if role == Role::Text {
            self.text_chars = self.text_chars.saturating_add(n);
        }
    }

    /// Appends to the usage capture when one is in progress; gives up past the cap.
    fn record(&mut self, bytes: &[u8]) {
        if self.capture_from.is_none() {
            return;
        }
        if self.capture.len().saturating_add(bytes.len()) > MAX_USAGE_OBJECT_BYTES {
            self.capture_from = None;
            self.capture.clear();
            self.capture_overflowed = true;
            return;
        }
        self.capture.extend_from_slice(bytes);
    }

    fn in_object(&self) -> bool {
        match self.depth.checked_sub(1) {
            Some(bit) if bit < TRACKED_DEPTH => self
                .arrays
                .get((bit / 64) as usize)
                .is_some_and(|word| word & (1 << (bit % 64)) == 0),
            _ => false,
        }
    }

    fn set_container(&mut self, array: bool) {
        let Some(bit) = self.depth.checked_sub(1) else {
            return;
        };
        if let Some(word) = self.arrays.get_mut((bit / 64) as usize) {
            if array {
                *word |= 1 << (bit % 64);
            } else {
                *word &= !(1 << (bit % 64));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: ScanRules = ScanRules {
        usage_top_level: true,
        usage_in_message: true,
        usage_in_response: false,
        text_keys: &[b"content", b"text"],
        text_top_level_only: false,
    };

    /// Feeds everything; returns every completed capture.
    fn scan_all(scanner: &mut JsonScanner, mut bytes: &[u8]) -> Vec<(UsagePath, String)> {
        let mut found = Vec::new();
        while !bytes.is_empty() {
            let n = scanner.feed(bytes);
            if let Some((path, raw)) = scanner.completed_capture() {
                found.push((path, String::from_utf8(raw.to_vec()).unwrap()));
            }
            bytes = &bytes[n..];
        }
        found
    }

    #[test]
    fn captures_top_level_and_message_usage_only() {
        let doc = br#"{"a":{"usage":{"x":1}},"message":{"usage":{"input_tokens":5, "n":{"k":"}"}},"z":[{"usage":{"q":1}}]},"usage" : {"prompt_tokens":3}}"#;
        let mut s = JsonScanner::new(RULES);
        let found = scan_all(&mut s, doc);
        assert_eq!(
            found,
            vec![
                (
                    UsagePath::InMessage,
                    r#"{"input_tokens":5, "n":{"k":"}"}}"#.to_string()
                ),
                (UsagePath::TopLevel, r#"{"prompt_tokens":3}"#.to_string()),
            ]
        );
    }

    #[test]
    fn counts_chars_of_text_values_only() {
        // é is 2 bytes, \u00e9 one char, \ud83d\ude00 one char (surrogate pair), \" one.
        let doc = r#"{"content":"h\u00e9 \"\ud83d\ude00\" é","role":"content","list":["text"],"text":5,"x":{"text":"abc"}}"#;
        let mut s = JsonScanner::new(RULES);
        scan_all(&mut s, doc.as_bytes());
        assert_eq!(s.text_chars(), "hé \"😀\" é".chars().count() as u64 + 3);
    }

    #[test]
    fn type_and_usage_only_detection() {
        let mut s = JsonScanner::new(RULES);
        scan_all(
            &mut s,
            br#"{"id":"c","choices": [ ],"type":"chunk","usage":{"prompt_tokens":1}}"#,
        );
        assert!(s.is_usage_only());
        assert_eq!(s.type_value(), Some(&b"chunk"[..]));
        s.reset_document();
        scan_all(
            &mut s,
            br#"{"choices":[{"delta":{}}],"usage":{"prompt_tokens":1}}"#,
        );
        assert!(!s.is_usage_only() && s.known_not_usage_only());
        s.reset_document();
        scan_all(&mut s, br#"{"choices":[],"usage":null}"#);
        assert!(!s.is_usage_only() && s.known_not_usage_only());
        s.reset_document();
        scan_all(&mut s, b"[DONE]");
        assert!(!s.is_usage_only() && s.type_value().is_none());
    }

    #[test]
    fn oversized_usage_is_dropped_and_flagged() {
        let doc = format!(
            r#"{{"usage":{{"pad":"{}","prompt_tokens":1}}}}"#,
            "x".repeat(MAX_USAGE_OBJECT_BYTES)
        );
        let mut s = JsonScanner::new(RULES);
        assert!(scan_all(&mut s, doc.as_bytes()).is_empty());
        assert!(s.capture_overflowed());
        assert!(s.held_bytes() <= 2 * MAX_USAGE_OBJECT_BYTES);
    }

    #[test]
    fn deep_and_malformed_input_is_harmless() {
        let mut s = JsonScanner::new(RULES);
        let mut doc = "[".repeat(10_000);
        doc.push_str(r#"{"usage":{"a":1}}"#);
        doc.push_str(&"]".repeat(10_000));
        assert!(scan_all(&mut s, doc.as_bytes()).is_empty());
        for junk in [
            &b"}}}]]]\"\\u12\"{{\"usage\":{"[..],
            b"<html>\"unterminated",
            b"\\\\\\\"",
        ] {
            let mut s = JsonScanner::new(RULES);
            scan_all(&mut s, junk);
        }
    }
}
