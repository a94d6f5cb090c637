//! Server-sent events framing (WHATWG rules) over arbitrary chunks, without buffering
//! lines: `data` values are handed out as slices of the chunk as they arrive.

use super::json_scan::{SmallBuf, TYPE_CAP};

/// What the framer found next in a chunk.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SseStep<'a> {
    /// Part of the current `data` line's value.
    Data(&'a [u8]),
    /// A second or later `data` line began: its value joins the previous with `\n`.
    DataLineBreak,
    /// A blank line ended the event; `at` is the chunk offset just after it.
    EventEnd { at: usize },
    /// The chunk is consumed.
    NeedMore,
}

/// How the stream ended, for [`SseFramer::finish`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum StreamEnd {
    /// Between events.
    Clean,
    /// The last event's blank line ended with `\r` (a `\n` could still have followed).
    EventComplete,
    /// Inside an event that never got its blank line.
    EventCut,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    Data,
    Event,
    Other,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Line {
    Start,
    Name,
    /// After the colon: one space is skipped.
    ValueStart(Field),
    Value(Field),
}

pub(crate) struct SseFramer {
    line: Line,
    name: SmallBuf<8>,
    /// Last byte was `\r`: a following `\n` belongs to the same line ending.
    skip_lf: bool,
    /// A blank line ended with `\r`; the event ends after the optional `\n`.
    dispatch_pending: bool,
    /// The previous step ended an event; forget it on the next step.
    clear_event: bool,
    in_event: bool,
    data_lines: u32,
    event_type: SmallBuf<TYPE_CAP>,
    event_type_seen: bool,
}

impl SseFramer {
    pub(crate) fn new() -> Self {
        Self {
            line: Line::Start,
            name: SmallBuf::new(),
            skip_lf: false,
            dispatch_pending: false,
            clear_event: false,
            in_event: false,
            data_lines: 0,
            event_type: SmallBuf::new(),
            event_type_seen: false,
        }
    }

    /// The current (or just ended) event's `event:` value, if present and short.
    pub(crate) fn event_type(&self) -> Option<&[u8]> {
        if self.event_type_seen {
            self.event_type.get()
        } else {
            None
        }
    }

    /// Advances through `chunk` from `*pos` to the next step.
    pub(crate) fn step<'a>(&mut self, chunk: &'a [u8], pos: &mut usize) -> SseStep<'a> {
        if self.clear_event {
            self.clear_event = false;
            self.in_event = false;
            self.data_lines = 0;
            self.event_type.clear();
            self.event_type_seen = false;
        }
        while let Some(&b) = chunk.get(*pos) {
            if self.skip_lf {
                self.skip_lf = false;
                if b == b'\n' {
                    *pos += 1;
                    if self.dispatch_pending {
                        return self.dispatch(*pos);
                    }
                    continue;
                }
            }
            if self.dispatch_pending {
                return self.dispatch(*pos);
            }
            match self.line {
                Line::Start => {
                    *pos += 1;
                    match b {
                        b'\n' => return self.dispatch(*pos),
                        b'\r' => {
                            self.skip_lf = true;
                            self.dispatch_pending = true;
                        }
                        b':' => {
                            // A comment line.
                            self.in_event = true;
                            self.line = Line::Value(Field::Other);
                        }
                        _ => {
                            self.in_event = true;
                            self.name.clear();
                            self.name.push(&[b]);
                            self.line = Line::Name;
                        }
                    }
                }
                Line::Name => {
                    *pos += 1;
                    match b {
                        b':' => self.line = Line::ValueStart(self.field()),
                        b'\n' | b'\r' => {
                            // A field name alone: its value is empty.
                            let field = self.field();
                            self.end_line(b);
                            if field == Field::Data && self.begin_data_line() {
                                return SseStep::DataLineBreak;
                            }
                        }
                        _ => self.name.push(&[b]),
                    }
                }
                Line::ValueStart(field) => {
                    if b == b' ' {
                        *pos += 1;
                    }
                    self.line = Line::Value(field);
                    if field == Field::Data && self.begin_data_line() {
                        return SseStep::DataLineBreak;
                    }
                    if field == Field::Event {
                        self.event_type.clear();
                        self.event_type_seen = true;
                    }
                }
                Line::Value(field) => {
                    let rest = chunk.get(*pos..).unwrap_or_default();
                    let run_len = rest
                        .iter()
                        .position(|&c| c == b'\n' || c == b'\r')
                        .unwrap_or(rest.len());
                    let run = rest.get(..run_len).unwrap_or_default();
                    *pos += run_len;
                    match field {
                        Field::Data if !run.is_empty() => return SseStep::Data(run),
                        Field::Event => self.event_type.push(run),
                        Field::Data | Field::Other => {}
                    }
                    if let Some(&end) = rest.get(run_len) {
                        *pos += 1;
                        self.end_line(end);
                    }
                }
            }
        }
        SseStep::NeedMore
    }

    /// At end of stream: reports how it ended and resets for reuse.
    pub(crate) fn finish(&mut self) -> StreamEnd {
        let end = if self.dispatch_pending {
            StreamEnd::EventComplete
        } else if self.in_event && !self.clear_event {
            StreamEnd::EventCut
        } else {
            StreamEnd::Clean
        };
        let event_type = self.event_type;
        let event_type_seen = self.event_type_seen;
        *self = Self::new();
        // The caller may still ask for the type of the event that just ended.
        self.event_type = event_type;
        self.event_type_seen = event_type_seen;
        self.clear_event = true;
        end
    }

    fn field(&self) -> Field {
        match self.name.get() {
            Some(b"data") => Field::Data,
            Some(b"event") => Field::Event,
            _ => Field::Other,
        }
    }

    /// Counts a data line; true when it is not the event's first.
    fn begin_data_line(&mut self) -> bool {
        let later = self.data_lines > 0;
        self.data_lines = self.data_lines.saturating_add(1);
        later
    }

    fn end_line(&mut self, end: u8) {
        self.line = Line::Start;
        self.skip_lf = end == b'\r';
    }

    fn dispatch<'a>(&mut self, at: usize) -> SseStep<'a> {
        self.dispatch_pending = false;
        self.clear_event = true;
        SseStep::EventEnd { at }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Renders the steps of a whole stream fed in pieces, as a readable transcript.
    fn transcript(pieces: &[&[u8]]) -> String {
        let mut framer = SseFramer::new();
        let mut out = String::new();
        let mut offset = 0;
        for piece in pieces {
            let mut pos = 0;
            loop {
                match framer.step(piece, &mut pos) {
                    SseStep::Data(d) => out.push_str(&String::from_utf8_lossy(d)),
                    SseStep::DataLineBreak => out.push('\n'),
                    SseStep::EventEnd { at } => {
                        let ty = framer
                            .event_type()
                            .map(|t| String::from_utf8_lossy(t).into_owned());
                        out.push_str(&format!("|end@{} {:?}|", offset + at, ty));
                    }
                    SseStep::NeedMore => break,
                }
            }
            offset += piece.len();
        }
        out.push_str(&format!("|{:?}", framer.finish()));
        out
    }

    #[test]
    fn frames_events_with_any_line_ending_and_split() {
        let stream: &[u8] = b": hi\nevent: message_start\r\ndata: {\"a\":\r\ndata:1}\r\nid: 7\r\n\r\ndata\ndata\n\nretry: 5\rdata: x\r\r[";
        let expected =
            "{\"a\":\n1}|end@58 Some(\"message_start\")|\n|end@69 None|x|end@87 None||EventCut";
        assert_eq!(transcript(&[stream]), expected);
        for split in 0..=stream.len() {
            let (a, b) = stream.split_at(split);
            assert_eq!(transcript(&[a, b]), expected, "split at {split}");
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(transcript(&bytes), expected);
    }

    #[test]
    fn trailing_cr_blank_line_completes_at_end() {
        assert_eq!(transcript(&[b"data: a\r\r"]), "a|EventComplete");
        assert_eq!(transcript(&[b"data: a\n\n"]), "a|end@9 None||Clean");
        assert_eq!(transcript(&[b""]), "|Clean");
    }
}
