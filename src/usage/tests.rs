//! Fixture, chunking-property and behaviour tests for [`UsageMeter`].
//!
//! Fixtures live in `tests/fixtures/usage/`: `NAME.sse` or `NAME.json` is a response body,
//! `NAME.expected.json` the meter's expected result (and, for chat streams, the name of
//! the expected client output when the usage chunk is stripped).

use super::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// splitmix64: reproducible pseudo-random chunkings without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `1..=max`.
    fn size(&mut self, max: usize) -> usize {
        1 + (self.next() % max as u64) as usize
    }
}

struct Fixture {
    name: String,
    body: Vec<u8>,
    shape: ResponseShape,
    sse: bool,
    prompt_estimate: u64,
    expected: MeterResult,
    /// Expected client output with `strip_usage_chunk` (chat streams only).
    stripped: Option<Vec<u8>>,
}

impl Fixture {
    fn strippable(&self) -> bool {
        self.sse && self.shape == ResponseShape::ChatCompletions
    }

    /// What the client must receive with `strip_usage_chunk`.
    fn expected_stripped(&self) -> &[u8] {
        self.stripped.as_deref().unwrap_or(&self.body)
    }
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/usage")
}

fn load_fixtures() -> Vec<Fixture> {
    let dir = fixture_dir();
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_suffix(".expected.json").map(str::to_string)
        })
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let spec: Value = serde_json::from_slice(
                &std::fs::read(dir.join(format!("{name}.expected.json"))).unwrap(),
            )
            .unwrap();
            let sse = spec["sse"].as_bool().unwrap();
            let body_path = dir.join(format!("{name}.{}", if sse { "sse" } else { "json" }));
            let shape = match spec["shape"].as_str().unwrap() {
                "chat_completions" => ResponseShape::ChatCompletions,
                "embeddings" => ResponseShape::Embeddings,
                "responses" => ResponseShape::Responses,
                "anthropic_messages" => ResponseShape::AnthropicMessages,
                other => panic!("{name}: unknown shape {other}"),
            };
            let u = &spec["usage"];
            let field = |k: &str| u[k].as_u64().unwrap_or_else(|| panic!("{name}: usage.{k}"));
            Fixture {
                body: std::fs::read(&body_path).unwrap_or_else(|e| panic!("{body_path:?}: {e}")),
                shape,
                sse,
                prompt_estimate: spec["prompt_estimate"].as_u64().unwrap(),
                expected: MeterResult {
                    usage: TokenUsage {
                        input_tokens: field("input_tokens"),
                        cached_input_tokens: field("cached_input_tokens"),
                        cache_creation_tokens: field("cache_creation_tokens"),
                        output_tokens: field("output_tokens"),
                        reasoning_tokens: field("reasoning_tokens"),
                    },
                    estimated: spec["estimated"].as_bool().unwrap(),
                    suspicious: spec["suspicious"].as_bool().unwrap(),
                },
                stripped: spec["stripped"]
                    .as_str()
                    .map(|file| std::fs::read(dir.join(file)).unwrap()),
                name,
            }
        })
        .collect()
}

struct Run {
    result: MeterResult,
    usage_seen: bool,
    /// Everything the client received.
    output: Vec<u8>,
}

/// Feeds `body` cut at `cuts` (ascending offsets); `eos_alone` sends end of stream as a
/// separate empty chunk, as Envoy sometimes does.
fn run(meter: &mut UsageMeter, body: &[u8], cuts: &[usize], strip: bool, eos_alone: bool) -> Run {
    let mut chunks = Vec::new();
    let mut start = 0;
    for &cut in cuts.iter().chain(std::iter::once(&body.len())) {
        chunks.push(&body[start..cut]);
        start = cut;
    }
    let mut output = Vec::new();
    let last = chunks.len() - 1;
    for (i, chunk) in chunks.iter().enumerate() {
        let end_of_stream = i == last && !eos_alone;
        match meter.feed(chunk, end_of_stream) {
            Passthrough::Unchanged => output.extend_from_slice(chunk),
            Passthrough::Replace(bytes) => {
                assert!(strip, "Replace without strip_usage_chunk");
                output.extend_from_slice(&bytes);
            }
        }
        assert!(meter.held_bytes() <= MAX_METER_HELD_BYTES);
    }
    if eos_alone {
        match meter.feed(&[], true) {
            Passthrough::Unchanged => {}
            Passthrough::Replace(bytes) => output.extend_from_slice(&bytes),
        }
    }
    Run {
        result: meter.result(),
        usage_seen: meter.usage_seen(),
        output,
    }
}

/// Runs a fixture both plain and (for chat streams) stripping, and checks everything.
fn check(f: &Fixture, cuts: &[usize], eos_alone: bool, what: &str) {
    let mut meter = UsageMeter::new(f.shape, f.sse, false, f.prompt_estimate);
    let plain = run(&mut meter, &f.body, cuts, false, eos_alone);
    assert_eq!(plain.result, f.expected, "{}: {what}", f.name);
    assert_eq!(
        plain.usage_seen, !f.expected.estimated,
        "{}: {what}",
        f.name
    );
    assert!(plain.output == f.body, "{}: {what}: output changed", f.name);
    if f.strippable() {
        let mut meter = UsageMeter::new(f.shape, f.sse, true, f.prompt_estimate);
        let stripped = run(&mut meter, &f.body, cuts, true, eos_alone);
        assert_eq!(stripped.result, f.expected, "{}: strip, {what}", f.name);
        assert!(
            stripped.output == f.expected_stripped(),
            "{}: strip, {what}:\n{}",
            f.name,
            String::from_utf8_lossy(&stripped.output)
        );
    }
}

#[test]
fn every_fixture_meters_as_expected() {
    let fixtures = load_fixtures();
    assert!(fixtures.len() >= 20, "fixtures missing: {}", fixtures.len());
    for f in &fixtures {
        check(f, &[], false, "whole body");
        check(f, &[], true, "whole body, separate end of stream");
    }
    // The strip expectations really remove something.
    let stripped = fixtures.iter().filter(|f| f.stripped.is_some()).count();
    assert!(stripped >= 4);
    for f in fixtures.iter().filter(|f| f.stripped.is_some()) {
        assert!(f.expected_stripped().len() < f.body.len(), "{}", f.name);
    }
}

#[test]
fn every_single_split_point_gives_the_same_result() {
    for f in &load_fixtures() {
        for cut in 0..=f.body.len() {
            check(f, &[cut], cut % 2 == 0, &format!("split at {cut}"));
        }
    }
}

#[test]
fn one_byte_chunks_give_the_same_result() {
    for f in &load_fixtures() {
        let cuts: Vec<usize> = (1..f.body.len()).collect();
        check(f, &cuts, false, "1-byte chunks");
        check(f, &cuts, true, "1-byte chunks, separate end of stream");
    }
}

/// Offsets that split something a naive parser would get wrong: inside `data:` and
/// `event:`, between `\r` and `\n`, inside multi-byte UTF-8, inside `\"` and `\uXXXX`.
fn tricky_cuts(body: &[u8]) -> Vec<usize> {
    let mut cuts = Vec::new();
    for i in 0..body.len() {
        let rest = &body[i..];
        if rest.starts_with(b"data:") || rest.starts_with(b"event:") {
            cuts.extend(i + 1..i + 5);
        }
        if rest.starts_with(b"\r\n") || rest.starts_with(b"\\\"") {
            cuts.push(i + 1);
        }
        if rest.starts_with(b"\\u") {
            cuts.extend(i + 1..i + 6);
        }
        if body[i] >= 0xC0 {
            cuts.extend((i + 1..(i + 4).min(body.len())).take_while(|&j| body[j] & 0xC0 == 0x80));
        }
    }
    cuts.sort_unstable();
    cuts.dedup();
    cuts.retain(|&c| c > 0 && c < body.len());
    cuts
}

#[test]
fn cutting_every_tricky_spot_at_once_gives_the_same_result() {
    let fixtures = load_fixtures();
    let mut kinds = [0usize; 3];
    for f in &fixtures {
        kinds[0] += f.body.windows(2).filter(|w| w == b"\r\n").count();
        kinds[1] += f.body.iter().filter(|&&b| b >= 0xC0).count();
        kinds[2] += f
            .body
            .windows(6)
            .filter(|w| w.starts_with(b"\\u00"))
            .count();
        let cuts = tricky_cuts(&f.body);
        check(f, &cuts, false, "every tricky spot cut");
        // And random subsets of them.
        let mut rng = Rng(f.body.len() as u64);
        for round in 0..50 {
            let subset: Vec<usize> = cuts
                .iter()
                .copied()
                .filter(|_| rng.next().is_multiple_of(3))
                .collect();
            check(
                f,
                &subset,
                round % 2 == 0,
                &format!("tricky subset {round}: {subset:?}"),
            );
        }
    }
    assert!(
        kinds.iter().all(|&n| n > 0),
        "fixtures lack CRLF / UTF-8 / escapes: {kinds:?}"
    );
}

#[test]
fn thousands_of_random_chunkings_give_the_same_result() {
    let fixtures = load_fixtures();
    let mut rng = Rng(0x5111_ce00);
    let mut runs = 0;
    for f in &fixtures {
        for round in 0..250 {
            // Mostly tiny chunks (the hard cases), some SSE-event-sized and larger ones.
            let max = [2, 3, 7, 16, 64, 300, 2048][(rng.next() % 7) as usize];
            let mut cuts = Vec::new();
            let mut at = rng.size(max);
            while at < f.body.len() {
                cuts.push(at);
                at += rng.size(max);
            }
            check(
                f,
                &cuts,
                rng.next().is_multiple_of(2),
                &format!("round {round}, cuts {cuts:?}"),
            );
            runs += 1;
        }
    }
    assert!(runs >= 5000);
}

fn meter_all(shape: ResponseShape, sse: bool, body: &[u8], prompt_estimate: u64) -> MeterResult {
    let mut meter = UsageMeter::new(shape, sse, false, prompt_estimate);
    assert_eq!(meter.feed(body, true), Passthrough::Unchanged);
    meter.result()
}

fn usage(input: u64, cached: u64, creation: u64, output: u64, reasoning: u64) -> TokenUsage {
    TokenUsage {
        input_tokens: input,
        cached_input_tokens: cached,
        cache_creation_tokens: creation,
        output_tokens: output,
        reasoning_tokens: reasoning,
    }
}

fn reported(usage: TokenUsage) -> MeterResult {
    MeterResult {
        usage,
        estimated: false,
        suspicious: false,
    }
}

#[test]
fn cached_and_reasoning_tokens_map_for_each_shape() {
    let chat = br#"{"id":"c","choices":[],"usage":{"prompt_tokens":100,"completion_tokens":50,"total_tokens":150,"prompt_tokens_details":{"cached_tokens":60},"completion_tokens_details":{"reasoning_tokens":20}}}"#;
    assert_eq!(
        meter_all(ResponseShape::ChatCompletions, false, chat, 0),
        reported(usage(40, 60, 0, 50, 20))
    );
    let chat_sse = [b"data: ".as_slice(), chat, b"\n\ndata: [DONE]\n\n"].concat();
    assert_eq!(
        meter_all(ResponseShape::ChatCompletions, true, &chat_sse, 0),
        reported(usage(40, 60, 0, 50, 20))
    );
    let embeddings =
        br#"{"object":"list","data":[],"model":"m","usage":{"prompt_tokens":7,"total_tokens":7}}"#;
    assert_eq!(
        meter_all(ResponseShape::Embeddings, false, embeddings, 0),
        reported(usage(7, 0, 0, 0, 0))
    );
    let responses = br#"{"id":"r","usage":{"input_tokens":100,"input_tokens_details":{"cached_tokens":64},"output_tokens":30,"output_tokens_details":{"reasoning_tokens":12},"total_tokens":130}}"#;
    assert_eq!(
        meter_all(ResponseShape::Responses, false, responses, 0),
        reported(usage(36, 64, 0, 30, 12))
    );
    let responses_sse = [
        b"event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":"
            .as_slice(),
        responses,
        b"}\n\n",
    ]
    .concat();
    assert_eq!(
        meter_all(ResponseShape::Responses, true, &responses_sse, 0),
        reported(usage(36, 64, 0, 30, 12))
    );
    let anthropic = br#"{"type":"message","usage":{"input_tokens":5,"cache_creation_input_tokens":100,"cache_read_input_tokens":900,"output_tokens":42}}"#;
    let result = meter_all(ResponseShape::AnthropicMessages, false, anthropic, 0);
    assert_eq!(result, reported(usage(5, 900, 100, 42, 0)));
    assert_eq!(result.usage.total_input(), 1005);
    assert_eq!(result.usage.total(), 1047);
}

const ANTHROPIC_START: &str = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"content\":[],\"usage\":{\"input_tokens\":25,\"cache_read_input_tokens\":100,\"cache_creation_input_tokens\":0,\"output_tokens\":1}}}\n\n";

fn anthropic_text(text: &str) -> String {
    format!(
        "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":{}}}}}\n\n",
        serde_json::to_string(text).unwrap()
    )
}

fn anthropic_delta(usage_json: &str) -> String {
    format!("event: message_delta\ndata: {{\"type\":\"message_delta\",\"delta\":{{\"stop_reason\":\"end_turn\"}},\"usage\":{usage_json}}}\n\n")
}

#[test]
fn anthropic_cumulative_deltas_latest_wins() {
    let stream = [
        ANTHROPIC_START.to_string(),
        anthropic_text("Hello"),
        anthropic_delta(r#"{"output_tokens":10}"#),
        anthropic_delta(r#"{"output_tokens":25}"#),
        // A newer API version repeats the input fields: they replace, never add.
        anthropic_delta(r#"{"input_tokens":25,"cache_read_input_tokens":100,"output_tokens":31}"#),
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n".to_string(),
    ]
    .concat();
    let mut meter = UsageMeter::new(ResponseShape::AnthropicMessages, true, false, 999);
    let mut seen_after = Vec::new();
    for event in stream.split_inclusive("\n\n") {
        meter.feed(event.as_bytes(), false);
        seen_after.push((meter.usage_seen(), meter.result().usage.output_tokens));
    }
    meter.feed(b"", true);
    assert_eq!(meter.result(), reported(usage(25, 100, 0, 31, 0)));
    // message_start alone is partial (estimated); each delta is final so far.
    assert_eq!(
        seen_after,
        vec![
            (false, 1),
            (false, 2),
            (true, 10),
            (true, 25),
            (true, 31),
            (true, 31)
        ]
    );
}

#[test]
fn anthropic_usage_after_an_error_event_is_ignored() {
    let stream = [
        ANTHROPIC_START.to_string(),
        anthropic_text("Partial answer before the overload"),
        "event: error\ndata: {\"type\": \"error\", \"error\": {\"type\": \"overloaded_error\", \"message\": \"Overloaded\"}}\n\n".to_string(),
        anthropic_delta(r#"{"output_tokens":5000}"#),
    ]
    .concat();
    let result = meter_all(
        ResponseShape::AnthropicMessages,
        true,
        stream.as_bytes(),
        999,
    );
    // What arrived (message_start), plus the text estimate for output: 34 chars.
    assert_eq!(
        result,
        MeterResult {
            usage: usage(25, 100, 0, 9, 0),
            estimated: true,
            suspicious: false
        }
    );
    // The error type may come only from the data's `type`.
    let no_event_lines = stream.replace("event: error\n", "");
    assert_eq!(
        meter_all(
            ResponseShape::AnthropicMessages,
            true,
            no_event_lines.as_bytes(),
            999
        ),
        result
    );
}

#[test]
fn truncated_streams_are_estimated_from_what_passed() {
    // Reset after message_start and some text: input as reported, output from the text.
    let text = "x".repeat(103);
    let stream = [ANTHROPIC_START.to_string(), anthropic_text(&text)].concat();
    let mut meter = UsageMeter::new(ResponseShape::AnthropicMessages, true, false, 999);
    meter.feed(stream.as_bytes(), false);
    // Aborted: no end_of_stream, the host asks for the result anyway.
    assert!(!meter.usage_seen());
    assert_eq!(
        meter.result(),
        MeterResult {
            usage: usage(25, 100, 0, 26, 0),
            estimated: true,
            suspicious: false
        }
    );

    // Chat stream cut inside a content string with multi-byte chars: counted per
    // character, not per byte (14 chars, 25 bytes reach the client).
    let event = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"ééééé-ééé-\u{1F600}-abcdefg\"}}],\"usage\":null}\n\n";
    let cut = event.find("abc").unwrap() + 2; // "ab" passed
    let mut meter = UsageMeter::new(ResponseShape::ChatCompletions, true, false, 40);
    meter.feed(&event.as_bytes()[..cut], false);
    assert_eq!(
        meter.result(),
        MeterResult {
            usage: usage(40, 0, 0, 4, 0),
            estimated: true,
            suspicious: false
        }
    );

    // A JSON body cut before its usage: same rule over the body.
    let body = br#"{"id":"chatcmpl-1","choices":[{"index":0,"message":{"role":"assistant","content":"abcdefghi"}}],"usa"#;
    let result = meter_all(ResponseShape::ChatCompletions, false, body, 12);
    assert_eq!(result.usage, usage(12, 0, 0, 3, 0));
    assert!(result.estimated);

    // Embeddings without usage: the prompt estimate, no output.
    let result = meter_all(
        ResponseShape::Embeddings,
        false,
        br#"{"data":[{"embedding":[0.1]}]"#,
        8,
    );
    assert_eq!(result.usage, usage(8, 0, 0, 0, 0));
    assert!(result.estimated);
}

#[test]
fn usage_decoys_inside_strings_are_not_usage() {
    let body = br#"{"id":"chatcmpl-1","choices":[{"index":0,"message":{"role":"assistant","content":"A body ends with \"usage\": {\"prompt_tokens\": 999, \"completion_tokens\": 1}"}}],"note":"\"usage\":{\"prompt_tokens\":5}"}"#;
    let result = meter_all(ResponseShape::ChatCompletions, false, body, 20);
    assert!(result.estimated);
    assert_eq!(result.usage.input_tokens, 20);
    assert_eq!(result.usage.output_tokens, 18); // 72 chars of content
                                                // In a stream too, and a key named usage inside a string key is still a string.
    let stream = "data: {\"choices\":[{\"delta\":{\"content\":\"data: {\\\"usage\\\": {\\\"prompt_tokens\\\": 999}}\\n\\n\"}}],\"usage\":null}\n\ndata: [DONE]\n\n";
    let result = meter_all(ResponseShape::ChatCompletions, true, stream.as_bytes(), 20);
    assert!(result.estimated);
    assert_eq!(result.usage.input_tokens, 20);
}

#[test]
fn usage_at_unexpected_depths_is_ignored() {
    let nested = br#"{"choices":[{"message":{"content":"hi","usage":{"prompt_tokens":5,"completion_tokens":5}}}],"meta":{"usage":{"prompt_tokens":7}}}"#;
    assert!(meter_all(ResponseShape::ChatCompletions, false, nested, 1).estimated);
    // `message.usage` counts only in Anthropic streams, `response.usage` only in
    // Responses streams.
    let anthropic_json = br#"{"message":{"usage":{"input_tokens":5,"output_tokens":5}}}"#;
    assert!(meter_all(ResponseShape::AnthropicMessages, false, anthropic_json, 1).estimated);
    let responses_json = br#"{"response":{"usage":{"input_tokens":5,"output_tokens":5}}}"#;
    assert!(meter_all(ResponseShape::Responses, false, responses_json, 1).estimated);
    let chat_sse = b"data: {\"response\":{\"usage\":{\"prompt_tokens\":5}}}\n\n";
    assert!(meter_all(ResponseShape::ChatCompletions, true, chat_sse, 1).estimated);
    let responses_sse = b"event: x\ndata: {\"usage\":{\"input_tokens\":5,\"output_tokens\":5},\"item\":{\"response\":{\"usage\":{\"input_tokens\":1}}}}\n\n";
    assert!(meter_all(ResponseShape::Responses, true, responses_sse, 1).estimated);
    // `usage` that is not an object.
    let odd = br#"{"usage":null,"x":{"usage":[1,2]},"y":"usage"}"#;
    assert!(meter_all(ResponseShape::ChatCompletions, false, odd, 1).estimated);
}

#[test]
fn absurd_values_are_flagged_and_replaced_by_the_estimate() {
    let cases = [
        "-5",
        "1e30",
        "100000000000000000000000000000",
        "18446744073709551615",
        "\"lots\"",
        "12.75",
        "true",
        "{}",
    ];
    for value in cases {
        for sse in [false, true] {
            let object = format!(
                r#"{{"choices":[{{"message":{{"content":"abcdefgh"}}}}],"usage":{{"prompt_tokens":{value},"completion_tokens":3}}}}"#
            );
            let body = if sse {
                format!("data: {object}\n\ndata: [DONE]\n\n")
            } else {
                object
            };
            let result = meter_all(ResponseShape::ChatCompletions, sse, body.as_bytes(), 7);
            assert!(result.suspicious && result.estimated, "{value}");
            // The prompt estimate and the 8 generated characters, not the report.
            assert_eq!(result.usage, usage(7, 0, 0, 2, 0), "{value}");
        }
    }
    // Out of f64 range: the object cannot be read at all; estimated, flagged.
    let result = meter_all(
        ResponseShape::ChatCompletions,
        false,
        br#"{"usage":{"prompt_tokens":1e999}}"#,
        4,
    );
    assert!(result.suspicious && result.estimated);
    assert_eq!(result.usage.input_tokens, 4);
    // Saturating totals.
    let huge = usage(u64::MAX, u64::MAX, 1, u64::MAX, 0);
    assert_eq!(huge.total_input(), u64::MAX);
    assert_eq!(huge.total(), u64::MAX);
    // A usage object over the capture cap is ignored and flagged.
    let pad = "p".repeat(MAX_USAGE_OBJECT_BYTES);
    let body = format!(r#"{{"usage":{{"prompt_tokens":3,"pad":"{pad}"}}}}"#);
    let result = meter_all(ResponseShape::ChatCompletions, false, body.as_bytes(), 4);
    assert!(result.suspicious && result.estimated);
}

#[test]
fn a_multi_megabyte_body_is_metered_in_bounded_memory() {
    // ~6 MB of embeddings, usage at the very end, fed in 16 KiB chunks.
    let mut body = String::from("{\n  \"object\": \"list\",\n  \"data\": [\n");
    for i in 0..600 {
        if i > 0 {
            body.push_str(",\n");
        }
        body.push_str(&format!(
            "    {{\"object\": \"embedding\", \"index\": {i}, \"embedding\": ["
        ));
        for j in 0..1536 {
            if j > 0 {
                body.push(',');
            }
            body.push_str(&format!("{:.6}", ((i * 1536 + j) as f64).sin() * 0.05));
        }
        body.push_str("]}");
    }
    body.push_str("\n  ],\n  \"model\": \"text-embedding-3-small\",\n  \"usage\": {\"prompt_tokens\": 4800, \"total_tokens\": 4800}\n}\n");
    assert!(body.len() > 5_000_000);
    let mut meter = UsageMeter::new(ResponseShape::Embeddings, false, false, 1);
    let mut max_held = 0;
    let chunks: Vec<&[u8]> = body.as_bytes().chunks(16 * 1024).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        assert_eq!(
            meter.feed(chunk, i + 1 == chunks.len()),
            Passthrough::Unchanged
        );
        max_held = max_held.max(meter.held_bytes());
    }
    assert_eq!(meter.result(), reported(usage(4800, 0, 0, 0, 0)));
    assert!(max_held <= 2 * MAX_USAGE_OBJECT_BYTES, "held {max_held}");
}

fn chat_chunk(content: &str) -> String {
    format!(
        "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":{}}},\"finish_reason\":null}}],\"usage\":null}}\n\n",
        serde_json::to_string(content).unwrap()
    )
}

const USAGE_CHUNK: &str = "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2,\"total_tokens\":11}}\n\n";

fn output_of(p: Passthrough, chunk: &[u8]) -> Vec<u8> {
    match p {
        Passthrough::Unchanged => chunk.to_vec(),
        Passthrough::Replace(bytes) => bytes,
    }
}

#[test]
fn strip_holds_only_the_incomplete_event() {
    let mut meter = UsageMeter::new(ResponseShape::ChatCompletions, true, true, 1);
    // Whole events pass untouched, without copies.
    let first = chat_chunk("Hi");
    assert_eq!(meter.feed(first.as_bytes(), false), Passthrough::Unchanged);
    // An event split before anything shows it is not the usage chunk is held...
    let second = chat_chunk(" there");
    let (a, b) = second.split_at(20);
    assert_eq!(
        meter.feed(a.as_bytes(), false),
        Passthrough::Replace(Vec::new())
    );
    assert!(meter.held_bytes() >= 20);
    // ...and released once complete, with the next event's start held in turn.
    let next = format!("{b}{}", &USAGE_CHUNK[..30]);
    let out = output_of(meter.feed(next.as_bytes(), false), next.as_bytes());
    assert_eq!(out, second.as_bytes());
    // The usage-only chunk is dropped; [DONE] passes.
    let rest = format!("{}data: [DONE]\n\n", &USAGE_CHUNK[30..]);
    let out = output_of(meter.feed(rest.as_bytes(), true), rest.as_bytes());
    assert_eq!(out, b"data: [DONE]\n\n");
    assert_eq!(meter.result(), reported(usage(9, 0, 0, 2, 0)));
}

#[test]
fn strip_releases_an_event_early_once_it_cannot_be_the_usage_chunk() {
    let mut meter = UsageMeter::new(ResponseShape::ChatCompletions, true, true, 1);
    let event = chat_chunk(&"long text ".repeat(50));
    let cut = event.find("long").unwrap() + 4;
    // `choices` is non-empty: everything so far passes at once.
    assert_eq!(
        meter.feed(&event.as_bytes()[..cut], false),
        Passthrough::Unchanged
    );
    assert_eq!(
        meter.feed(&event.as_bytes()[cut..], false),
        Passthrough::Unchanged
    );
    assert_eq!(meter.held_bytes(), 0);
}

#[test]
fn strip_never_drops_a_huge_event_and_holds_at_most_the_limit() {
    // A usage-only-looking event over the hold limit is released, whatever the chunking.
    let big = format!(
        "data: {{\"id\":\"{}\",\"choices\":[],\"usage\":{{\"prompt_tokens\":9,\"completion_tokens\":2}}}}\n\n",
        "x".repeat(MAX_HELD_EVENT_BYTES)
    );
    for chunk_size in [1000, 4096, big.len()] {
        let mut meter = UsageMeter::new(ResponseShape::ChatCompletions, true, true, 1);
        let mut out = Vec::new();
        for chunk in big.as_bytes().chunks(chunk_size) {
            out.extend(output_of(meter.feed(chunk, false), chunk));
            assert!(meter.held_bytes() <= MAX_METER_HELD_BYTES);
        }
        out.extend(output_of(meter.feed(b"", true), b""));
        assert!(out == big.as_bytes(), "chunk size {chunk_size}");
        assert_eq!(meter.result().usage, usage(9, 0, 0, 2, 0));
    }
}

#[test]
fn strip_releases_an_unterminated_event_at_end_of_stream() {
    let mut meter = UsageMeter::new(ResponseShape::ChatCompletions, true, true, 1);
    let unterminated = USAGE_CHUNK.trim_end();
    assert_eq!(
        meter.feed(unterminated.as_bytes(), false),
        Passthrough::Replace(Vec::new())
    );
    assert_eq!(
        meter.feed(b"", true),
        Passthrough::Replace(unterminated.as_bytes().to_vec())
    );
}

#[test]
fn strip_applies_only_to_chat_streams() {
    let responses = b"event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":1,\"output_tokens\":1}},\"choices\":[]}\n\n";
    let mut meter = UsageMeter::new(ResponseShape::Responses, true, true, 1);
    assert_eq!(meter.feed(responses, true), Passthrough::Unchanged);
    let mut meter = UsageMeter::new(ResponseShape::ChatCompletions, false, true, 1);
    assert_eq!(
        meter.feed(&USAGE_CHUNK.as_bytes()[6..], true),
        Passthrough::Unchanged
    );
    assert!(meter.usage_seen());
}

#[test]
fn garbage_bodies_do_not_panic() {
    let mut rng = Rng(7);
    for round in 0..200 {
        let len = rng.size(3000);
        let alphabet = b"{}[]\":,\\u0aA \r\n\xc3\xa9data:event:usage";
        let body: Vec<u8> = (0..len)
            .map(|_| alphabet[(rng.next() % alphabet.len() as u64) as usize])
            .collect();
        for shape in [
            ResponseShape::ChatCompletions,
            ResponseShape::Embeddings,
            ResponseShape::Responses,
            ResponseShape::AnthropicMessages,
        ] {
            for (sse, strip) in [(false, false), (true, false), (true, true)] {
                let mut meter = UsageMeter::new(shape, sse, strip, 5);
                let r = run(
                    &mut meter,
                    &body,
                    &[len / 3, len / 2],
                    strip,
                    round % 2 == 0,
                );
                if strip && shape == ResponseShape::ChatCompletions {
                    // Output is always a subsequence of whole events of the input.
                    assert!(r.output.len() <= body.len());
                } else {
                    assert!(r.output == body);
                }
            }
        }
    }
}
