//! [`UsageMeter`]: one per upstream response, fed every body chunk in order.

use super::estimate::estimate_tokens_from_chars;
use super::json_scan::{JsonScanner, ScanRules, UsagePath};
use super::report::{self, AnthropicTally};
use super::sse::{SseFramer, SseStep, StreamEnd};
use super::{MeterResult, Passthrough, ResponseShape, TokenUsage, MAX_HELD_EVENT_BYTES};

/// What the provider has reported so far.
#[derive(Clone, Copy, Debug)]
enum Reported {
    Nothing,
    /// Part of the usage (Anthropic `message_start`); the final numbers never came.
    Partial(TokenUsage),
    Final(TokenUsage),
}

/// Holding back the current event, to drop it if it is the usage-only chunk.
struct Strip {
    held: Vec<u8>,
    /// The current event was already (partly) sent: it will not be dropped.
    released: bool,
}

/// Meters one 2xx response body. Feed every chunk in order, including an empty final
/// one carrying `end_of_stream`; read [`UsageMeter::result`] whenever the stream ends,
/// normally or not. Without stripping, `feed` never changes the body. With stripping,
/// the concatenated outputs are the input minus the usage-only event; bytes still held
/// when a stream is reset without `end_of_stream` are never sent (the stream is broken).
pub struct UsageMeter {
    shape: ResponseShape,
    sse: bool,
    prompt_estimate: u64,
    scanner: JsonScanner,
    framer: SseFramer,
    strip: Option<Strip>,
    anthropic: AnthropicTally,
    reported: Reported,
    suspicious: bool,
    /// The stream carried an error event (Anthropic or Responses `event: error`, an OpenAI
    /// chunk with an `error` object): the provider, or Sluice's relay for it, gave up on
    /// the answer. Anthropic usage after it is not trusted.
    stream_error: bool,
}

impl UsageMeter {
    /// `sse`: the response is `text/event-stream`. `strip_usage_chunk` only applies to
    /// chat completions streams (ignored otherwise): the gateway asked for usage the client
    /// did not, so the usage-only chunk is removed from what the client receives.
    /// `prompt_estimate` stands in for the input tokens if usage never arrives.
    pub fn new(
        shape: ResponseShape,
        sse: bool,
        strip_usage_chunk: bool,
        prompt_estimate: u64,
    ) -> Self {
        let strip =
            (strip_usage_chunk && sse && shape == ResponseShape::ChatCompletions).then(|| Strip {
                held: Vec::new(),
                released: false,
            });
        Self {
            shape,
            sse,
            prompt_estimate,
            scanner: JsonScanner::new(scan_rules(shape, sse)),
            framer: SseFramer::new(),
            strip,
            anthropic: AnthropicTally::default(),
            reported: Reported::Nothing,
            suspicious: false,
            stream_error: false,
        }
    }

    /// Feeds the next body chunk. Returns what to send to the client instead of `chunk`:
    /// always [`Passthrough::Unchanged`] unless stripping the usage chunk.
    pub fn feed(&mut self, chunk: &[u8], end_of_stream: bool) -> Passthrough {
        if !self.sse {
            self.scan(chunk);
            return Passthrough::Unchanged;
        }
        let mut out = self.strip.is_some().then(|| Output::new(chunk));
        self.feed_events(chunk, end_of_stream, out.as_mut());
        match out {
            Some(out) => out.finish(),
            None => Passthrough::Unchanged,
        }
    }

    /// The usage so far: final once the provider reported it, else (partly) estimated.
    /// A report with invalid values is not trusted at all: a provider that says -5 or
    /// 10^30 tokens would otherwise make a request free or lock its tenant out of its
    /// limits. It is counted as if absent (the estimate) and flagged.
    /// Call at end of stream, or when the stream is aborted.
    pub fn result(&self) -> MeterResult {
        let suspicious = self.suspicious || self.scanner.capture_overflowed();
        let text_output = estimate_tokens_from_chars(self.scanner.text_chars());
        let reported = if suspicious {
            Reported::Nothing
        } else {
            self.reported
        };
        match reported {
            Reported::Final(usage) => MeterResult {
                usage,
                estimated: false,
                suspicious,
            },
            Reported::Partial(mut usage) => {
                usage.output_tokens = usage.output_tokens.max(text_output);
                MeterResult {
                    usage,
                    estimated: true,
                    suspicious,
                }
            }
            Reported::Nothing => MeterResult {
                usage: TokenUsage {
                    input_tokens: self.prompt_estimate,
                    output_tokens: text_output,
                    ..TokenUsage::default()
                },
                estimated: true,
                suspicious,
            },
        }
    }

    /// The provider's final usage report has arrived; `result()` uses it unless it was
    /// suspicious (then `result()` is the estimate).
    pub fn usage_seen(&self) -> bool {
        matches!(self.reported, Reported::Final(_))
    }

    /// The stream ended in an error event: whatever came before it, the answer is not
    /// complete.
    pub fn stream_failed(&self) -> bool {
        self.stream_error
    }

    /// Bytes currently allocated by the meter's buffers; at most
    /// [`super::MAX_METER_HELD_BYTES`].
    pub fn held_bytes(&self) -> usize {
        self.scanner.held_bytes() + self.strip.as_ref().map_or(0, |s| s.held.capacity())
    }

    fn feed_events(&mut self, chunk: &[u8], end_of_stream: bool, mut out: Option<&mut Output>) {
        let mut pos = 0;
        // Start of the part of `chunk` not yet released or held.
        let mut seg = 0;
        loop {
            match self.framer.step(chunk, &mut pos) {
                SseStep::Data(data) => {
                    self.scan(data);
                    if let (Some(out), Some(strip)) = (out.as_deref_mut(), self.strip.as_mut()) {
                        if !strip.released && self.scanner.known_not_usage_only() {
                            out.release_held(&mut strip.held);
                            out.release(seg, pos);
                            seg = pos;
                            strip.released = true;
                        }
                    }
                }
                SseStep::DataLineBreak => self.scan(b"\n"),
                SseStep::EventEnd { at } => {
                    self.end_event(out.as_deref_mut(), seg, at);
                    seg = at;
                }
                SseStep::NeedMore => break,
            }
        }
        if let (Some(out), Some(strip)) = (out.as_deref_mut(), self.strip.as_mut()) {
            let rest = chunk.get(seg..).unwrap_or_default();
            if strip.released || strip.held.len() + rest.len() > MAX_HELD_EVENT_BYTES {
                out.release_held(&mut strip.held);
                out.release(seg, chunk.len());
                strip.released = true;
            } else {
                strip.held.extend_from_slice(rest);
            }
        }
        if end_of_stream {
            match self.framer.finish() {
                StreamEnd::EventComplete => self.end_event(out, chunk.len(), chunk.len()),
                StreamEnd::Clean | StreamEnd::EventCut => {
                    // An unterminated event is released as it is.
                    if let (Some(out), Some(strip)) = (out, self.strip.as_mut()) {
                        out.release_held(&mut strip.held);
                        strip.released = false;
                    }
                    self.scanner.reset_document();
                }
            }
        }
    }

    /// The current event ended with `chunk[from..to]`.
    fn end_event(&mut self, out: Option<&mut Output>, from: usize, to: usize) {
        let event_type = self.framer.event_type().or(self.scanner.type_value());
        if event_type == Some(b"error") || self.scanner.has_top_level_error() {
            self.stream_error = true;
        }
        if let (Some(out), Some(strip)) = (out, self.strip.as_mut()) {
            let size = strip.held.len() + to.saturating_sub(from);
            let drop =
                !strip.released && size <= MAX_HELD_EVENT_BYTES && self.scanner.is_usage_only();
            if drop {
                // Not releasing `chunk[from..to]` drops it: later releases copy around it.
                strip.held.clear();
            } else {
                out.release_held(&mut strip.held);
                out.release(from, to);
            }
            strip.released = false;
        }
        self.scanner.reset_document();
    }

    /// Runs bytes through the scanner, applying each usage object as it completes.
    fn scan(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let consumed = self.scanner.feed(bytes);
            let completed = self
                .scanner
                .completed_capture()
                .map(|(path, raw)| (path, report::parse_object(raw)));
            match completed {
                Some((path, Some(usage))) => self.apply(path, &usage),
                Some((_, None)) => self.suspicious = true,
                None => {}
            }
            if consumed == 0 {
                break;
            }
            bytes = bytes.get(consumed..).unwrap_or_default();
        }
    }

    fn apply(&mut self, path: UsagePath, usage: &report::UsageObject) {
        let reading = match self.shape {
            ResponseShape::ChatCompletions | ResponseShape::Embeddings => {
                report::openai_chat(usage)
            }
            ResponseShape::Responses => report::openai_responses(usage),
            ResponseShape::AnthropicMessages => {
                if self.stream_error {
                    return;
                }
                self.suspicious |= self.anthropic.merge(usage);
                let tally = self.anthropic.usage();
                // `message.usage` opens a stream; the top-level one (JSON body or
                // `message_delta`) carries the final counts.
                self.reported = if path == UsagePath::InMessage {
                    match self.reported {
                        Reported::Final(_) => Reported::Final(tally),
                        _ => Reported::Partial(tally),
                    }
                } else {
                    Reported::Final(tally)
                };
                return;
            }
        };
        self.suspicious |= reading.suspicious;
        self.reported = Reported::Final(reading.value);
    }
}

/// Where usage lives and which strings are generated text, per API and framing.
fn scan_rules(shape: ResponseShape, sse: bool) -> ScanRules {
    let top_level = ScanRules {
        usage_top_level: true,
        usage_in_message: false,
        usage_in_response: false,
        text_keys: &[],
        text_top_level_only: false,
    };
    match (shape, sse) {
        (ResponseShape::ChatCompletions, _) => ScanRules {
            // `message.content` / `delta.content`, tool call `arguments`, DeepSeek's
            // `reasoning_content`.
            text_keys: &[b"content", b"arguments", b"refusal", b"reasoning_content"],
            ..top_level
        },
        (ResponseShape::Embeddings, _) => top_level,
        (ResponseShape::Responses, false) => ScanRules {
            text_keys: &[b"text", b"arguments"],
            ..top_level
        },
        // Only `*.delta` events: `*.done` events and `response.completed` repeat the text.
        (ResponseShape::Responses, true) => ScanRules {
            usage_top_level: false,
            usage_in_response: true,
            text_keys: &[b"delta"],
            text_top_level_only: true,
            ..top_level
        },
        (ResponseShape::AnthropicMessages, sse) => ScanRules {
            usage_in_message: sse,
            text_keys: &[b"text", b"thinking", b"partial_json"],
            ..top_level
        },
    }
}

/// The bytes to send for one chunk, copied only when they differ from the chunk.
struct Output<'a> {
    chunk: &'a [u8],
    /// While `copy` is `None`, the output so far is `chunk[..same_upto]`.
    same_upto: usize,
    copy: Option<Vec<u8>>,
}

impl<'a> Output<'a> {
    fn new(chunk: &'a [u8]) -> Self {
        Self {
            chunk,
            same_upto: 0,
            copy: None,
        }
    }

    fn copy(&mut self) -> &mut Vec<u8> {
        let (chunk, same_upto) = (self.chunk, self.same_upto);
        self.copy.get_or_insert_with(|| {
            let mut copy = Vec::with_capacity(chunk.len());
            copy.extend_from_slice(chunk.get(..same_upto).unwrap_or_default());
            copy
        })
    }

    /// Sends bytes held from earlier chunks.
    fn release_held(&mut self, held: &mut Vec<u8>) {
        if !held.is_empty() {
            self.copy().append(held);
        }
    }

    /// Sends `chunk[from..to]`.
    fn release(&mut self, from: usize, to: usize) {
        if from >= to {
            return;
        }
        if self.copy.is_none() && from == self.same_upto {
            self.same_upto = to;
        } else {
            let part = self.chunk.get(from..to).unwrap_or_default();
            self.copy().extend_from_slice(part);
        }
    }

    fn finish(self) -> Passthrough {
        match self.copy {
            None if self.same_upto == self.chunk.len() => Passthrough::Unchanged,
            None => Passthrough::Replace(
                self.chunk
                    .get(..self.same_upto)
                    .unwrap_or_default()
                    .to_vec(),
            ),
            Some(copy) => Passthrough::Replace(copy),
        }
    }
}
