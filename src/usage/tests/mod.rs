//! Fixture and chunking-property tests for [`UsageMeter`]; how each response shape maps
//! and what a meter does with bad providers in `shapes.rs`; stripping the injected usage
//! chunk in `strip.rs`.
//!
//! Fixtures live in `tests/fixtures/usage/`: `NAME.sse` or `NAME.json` is a response body,
//! `NAME.expected.json` the meter's expected result (and, for chat streams, the name of
//! the expected client output when the usage chunk is stripped).

mod shapes;
mod strip;

use super::*;
use crate::shared::testing::Rng;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Uniform in `1..=max`: a chunk size.
fn chunk_size(rng: &mut Rng, max: usize) -> usize {
    rng.below(max as u64) as usize + 1
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
            let mut at = chunk_size(&mut rng, max);
            while at < f.body.len() {
                cuts.push(at);
                at += chunk_size(&mut rng, max);
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

pub(super) fn meter_all(
    shape: ResponseShape,
    sse: bool,
    body: &[u8],
    prompt_estimate: u64,
) -> MeterResult {
    let mut meter = UsageMeter::new(shape, sse, false, prompt_estimate);
    assert_eq!(meter.feed(body, true), Passthrough::Unchanged);
    meter.result()
}

pub(super) fn usage(
    input: u64,
    cached: u64,
    creation: u64,
    output: u64,
    reasoning: u64,
) -> TokenUsage {
    TokenUsage {
        input_tokens: input,
        cached_input_tokens: cached,
        cache_creation_tokens: creation,
        output_tokens: output,
        reasoning_tokens: reasoning,
    }
}

pub(super) fn reported(usage: TokenUsage) -> MeterResult {
    MeterResult {
        usage,
        estimated: false,
        suspicious: false,
    }
}
