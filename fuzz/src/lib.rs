//! Invariants checked by the fuzz targets, one function per target.
//!
//! The `fuzz_targets/*.rs` binaries only call these functions, so the same checks also run
//! as ordinary `#[test]`s (stable toolchain) that replay every seed file and every saved
//! crash input in `regressions/<target>/` (see `make fuzz-check` and docs/fuzzing.md).

use sluice::body::{
    inject_include_usage, parse_request, replace_model, replace_model_reserialized,
};
use sluice::usage::{
    MeterResult, Passthrough, ResponseShape, UsageMeter, MAX_METER_HELD_BYTES, MAX_REPORTED_TOKENS,
};

/// A target's check: panics if an invariant does not hold.
pub type Check = fn(&[u8]);

/// Every target, by name (the names of the `fuzz_targets/*.rs` binaries).
pub const TARGETS: [(&str, Check); 6] = [
    ("config", config),
    ("request_body", request_body),
    ("usage_openai_json", usage_openai_json),
    ("usage_openai_sse", usage_openai_sse),
    ("usage_anthropic_json", usage_anthropic_json),
    ("usage_anthropic_sse", usage_anthropic_sse),
];

// ---------------------------------------------------------------------------------------
// config

/// `config::compile` on arbitrary bytes: an error is fine, a panic is not. Every provider
/// key variable resolves, so the fuzzer can get past the environment check.
pub fn config(data: &[u8]) {
    let env = |name: &str| Some(format!("key-for-{name}"));
    match sluice::config::compile(data, &env) {
        Ok(policy) => {
            // A compiled configuration is one `parse` accepts too.
            assert!(sluice::config::parse(data).is_ok());
            assert!(!policy.providers.is_empty() && !policy.catalog.models.is_empty());
        }
        Err(e) => {
            // The error is what Envoy logs: rendering it must not panic either.
            let shown = e.to_string();
            assert!(shown.starts_with("invalid sluice configuration"), "{shown}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// request_body

/// Replacement model names: a plain one, and one that needs JSON escaping.
const NEW_MODELS: [&str; 2] = ["m-x", "q\"\\/é\u{1F600}"];

/// `parse_request`, then the three body rewrites on the same bytes.
///
/// * Nothing panics, whatever the bytes.
/// * `parse_request` "validates the whole body as JSON": when it accepts a body, a plain
///   JSON parser (serde_json, ignoring the values) accepts it too.
/// * When the body parses and a rewrite returns `Some(out)`, `out` parses, with the new
///   model (`replace_model`, `replace_model_reserialized`) or `include_usage` true
///   (`inject_include_usage`), and every other field the gateway reads unchanged.
///   `replace_model` is byte-exact, so the prompt estimate is unchanged too.
/// * The rewrites may return `None` (documented: e.g. an escaped key name, or a body
///   serde_json's tree parser refuses); the gateway then falls back or refuses.
pub fn request_body(data: &[u8]) {
    let parsed = parse_request(data);
    for model in NEW_MODELS {
        let exact = replace_model(data, model);
        let reserialized = replace_model_reserialized(data, model);
        let Ok(before) = &parsed else { continue };
        for (how, out) in [("replace_model", exact), ("reserialized", reserialized)] {
            let Some(out) = out else { continue };
            let after = parse_request(&out).unwrap_or_else(|e| {
                panic!(
                    "{how}: the rewritten body does not parse: {}\n{}",
                    e.message,
                    String::from_utf8_lossy(&out)
                )
            });
            assert_eq!(after.model, model, "{how}");
            assert_eq!(after.stream, before.stream, "{how}: stream");
            assert_eq!(after.include_usage, before.include_usage, "{how}");
            assert_eq!(after.max_output_tokens, before.max_output_tokens, "{how}");
            if how == "replace_model" {
                assert_eq!(after.prompt, before.prompt, "{how}: prompt estimate");
            }
        }
    }
    let injected = inject_include_usage(data);
    let Ok(before) = &parsed else { return };
    assert!(
        serde_json::from_slice::<serde::de::IgnoredAny>(data).is_ok(),
        "parse_request accepted a body that is not one JSON value: {:?}",
        String::from_utf8_lossy(data)
    );
    if let Some(out) = injected {
        let after = parse_request(&out).unwrap_or_else(|e| {
            panic!(
                "inject_include_usage: the rewritten body does not parse: {}\n{}",
                e.message,
                String::from_utf8_lossy(&out)
            )
        });
        assert!(after.include_usage, "inject_include_usage: include_usage");
        assert_eq!(after.model, before.model, "inject_include_usage: model");
        assert_eq!(after.stream, before.stream, "inject_include_usage: stream");
        assert_eq!(after.max_output_tokens, before.max_output_tokens);
    }
}

// ---------------------------------------------------------------------------------------
// usage meters

/// Stands in for the request's prompt estimate.
const PROMPT_ESTIMATE: u64 = 11;
/// Bodies up to this size are also fed one byte at a time when the header asks for it.
const ONE_BYTE_CHUNKS_MAX: usize = 4096;

/// Inputs of the usage targets: a 17-byte header, then the response body.
///
/// * byte 0, flags: bits 0-1 the shape for the OpenAI targets (0 chat completions,
///   1 embeddings, 2 responses, 3 chat completions); bit 2 `strip_usage_chunk`; bit 3 end
///   of stream as a separate empty chunk in the split run; bit 4 also feed the body one
///   byte at a time (bodies up to 4 KiB).
/// * bytes 1-16: four little-endian u32, each taken modulo `body.len() + 1`: where the
///   body is cut. The first also ends the prefix fed without end of stream (a reset).
///
/// A short input is padded with zeros (and an empty body).
pub struct UsageInput<'a> {
    pub flags: u8,
    pub cuts: [usize; 4],
    pub body: &'a [u8],
}

pub const USAGE_HEADER_LEN: usize = 17;

impl<'a> UsageInput<'a> {
    pub fn parse(data: &'a [u8]) -> Self {
        let mut header = [0u8; USAGE_HEADER_LEN];
        let n = data.len().min(USAGE_HEADER_LEN);
        header[..n].copy_from_slice(&data[..n]);
        let body = &data[n..];
        let mut cuts = [0usize; 4];
        for (i, cut) in cuts.iter_mut().enumerate() {
            let b = &header[1 + 4 * i..5 + 4 * i];
            let v = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
            *cut = v % (body.len() + 1);
        }
        UsageInput {
            flags: header[0],
            cuts,
            body,
        }
    }

    fn openai_shape(&self) -> ResponseShape {
        match self.flags & 3 {
            1 => ResponseShape::Embeddings,
            2 => ResponseShape::Responses,
            _ => ResponseShape::ChatCompletions,
        }
    }

    fn strip(&self) -> bool {
        self.flags & 4 != 0
    }

    fn eos_alone(&self) -> bool {
        self.flags & 8 != 0
    }

    fn one_byte_chunks(&self) -> bool {
        self.flags & 16 != 0
    }
}

pub fn usage_openai_json(data: &[u8]) {
    let input = UsageInput::parse(data);
    check_meter(input.openai_shape(), false, &input);
}

pub fn usage_openai_sse(data: &[u8]) {
    let input = UsageInput::parse(data);
    check_meter(input.openai_shape(), true, &input);
}

pub fn usage_anthropic_json(data: &[u8]) {
    let input = UsageInput::parse(data);
    check_meter(ResponseShape::AnthropicMessages, false, &input);
}

pub fn usage_anthropic_sse(data: &[u8]) {
    let input = UsageInput::parse(data);
    check_meter(ResponseShape::AnthropicMessages, true, &input);
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    /// `end_of_stream` on the last chunk.
    OnLastChunk,
    /// `end_of_stream` on an extra empty chunk, as Envoy sometimes sends it.
    Alone,
    /// No `end_of_stream`: the stream was reset; `result()` is read anyway.
    Reset,
}

#[derive(Debug, PartialEq, Eq)]
struct Run {
    result: MeterResult,
    usage_seen: bool,
    /// Everything the client received (`Passthrough::Unchanged` is the chunk itself).
    output: Bytes,
}

/// Bytes shown as text in assertion messages.
#[derive(PartialEq, Eq)]
struct Bytes(Vec<u8>);

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.0))
    }
}

/// `body` cut at `cuts` (any order, duplicates and empty chunks allowed).
fn chunks<'b>(body: &'b [u8], cuts: &[usize]) -> Vec<&'b [u8]> {
    let mut cuts: Vec<usize> = cuts.iter().copied().filter(|&c| c <= body.len()).collect();
    cuts.sort_unstable();
    let mut out = Vec::with_capacity(cuts.len() + 1);
    let mut start = 0;
    for cut in cuts.into_iter().chain(std::iter::once(body.len())) {
        out.push(&body[start..cut]);
        start = cut;
    }
    out
}

fn run_meter(shape: ResponseShape, sse: bool, strip: bool, chunks: &[&[u8]], end: End) -> Run {
    // `strip_usage_chunk` applies only to chat completions streams.
    let may_replace = strip && sse && shape == ResponseShape::ChatCompletions;
    let mut meter = UsageMeter::new(shape, sse, strip, PROMPT_ESTIMATE);
    let mut output = Vec::new();
    let mut feed = |meter: &mut UsageMeter, chunk: &[u8], end_of_stream: bool| {
        match meter.feed(chunk, end_of_stream) {
            Passthrough::Unchanged => output.extend_from_slice(chunk),
            Passthrough::Replace(bytes) => {
                assert!(may_replace, "Replace without stripping a chat stream");
                output.extend_from_slice(&bytes);
            }
        }
        let held = meter.held_bytes();
        assert!(
            held <= MAX_METER_HELD_BYTES,
            "held_bytes {held} > {MAX_METER_HELD_BYTES}"
        );
    };
    let last = chunks.len().saturating_sub(1);
    for (i, chunk) in chunks.iter().enumerate() {
        feed(&mut meter, chunk, end == End::OnLastChunk && i == last);
    }
    if end == End::Alone || (end == End::OnLastChunk && chunks.is_empty()) {
        feed(&mut meter, &[], true);
    }
    let result = meter.result();
    let usage_seen = meter.usage_seen();
    check_result(&result, usage_seen);
    Run {
        result,
        usage_seen,
        output: Bytes(output),
    }
}

fn check_result(r: &MeterResult, usage_seen: bool) {
    let u = &r.usage;
    for (name, v) in [
        ("input_tokens", u.input_tokens),
        ("cached_input_tokens", u.cached_input_tokens),
        ("cache_creation_tokens", u.cache_creation_tokens),
        ("output_tokens", u.output_tokens),
        ("reasoning_tokens", u.reasoning_tokens),
    ] {
        assert!(
            v <= MAX_REPORTED_TOKENS,
            "{name} = {v} > MAX_REPORTED_TOKENS"
        );
    }
    // A report with invalid values is not trusted: the result is the estimate, flagged
    // (src/usage/meter.rs `result`), although `usage_seen()` says a final report came.
    if r.suspicious && usage_seen {
        assert!(r.estimated, "a suspicious report was used as it is");
    } else {
        assert_eq!(
            usage_seen, !r.estimated,
            "usage_seen disagrees with estimated"
        );
    }
}

/// True if `small` can be obtained from `big` by deleting bytes.
fn is_subsequence(small: &[u8], big: &[u8]) -> bool {
    let mut it = big.iter();
    small.iter().all(|b| it.any(|c| c == b))
}

/// The differential checks: however the body is chunked (and wherever end of stream
/// comes), the meter reports the same result and the client receives the same bytes.
fn check_meter(shape: ResponseShape, sse: bool, input: &UsageInput) {
    let (body, strip) = (input.body, input.strip());
    let strippable = strip && sse && shape == ResponseShape::ChatCompletions;

    let whole = run_meter(shape, sse, strip, &[body], End::OnLastChunk);
    if strippable {
        // The input minus whole usage-only events: never more, never reordered.
        assert!(
            is_subsequence(&whole.output.0, body),
            "stripped output is not from the body"
        );
    } else {
        assert!(
            whole.output.0 == body,
            "the body was changed without stripping"
        );
    }

    let end = if input.eos_alone() {
        End::Alone
    } else {
        End::OnLastChunk
    };
    let split = run_meter(shape, sse, strip, &chunks(body, &input.cuts), end);
    assert_eq!(
        whole, split,
        "split at {:?} differs from one chunk",
        input.cuts
    );

    if input.one_byte_chunks() && body.len() <= ONE_BYTE_CHUNKS_MAX {
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        let tiny = run_meter(shape, sse, strip, &bytes, End::OnLastChunk);
        assert_eq!(whole, tiny, "1-byte chunks differ from one chunk");
    }

    // A reset after a prefix: the result so far, and what was sent so far, do not depend
    // on how the prefix was chunked either. (Bytes still held at a reset are never sent.)
    let prefix = &body[..input.cuts[0]];
    let reset_whole = run_meter(shape, sse, strip, &[prefix], End::Reset);
    let reset_split = run_meter(
        shape,
        sse,
        strip,
        &chunks(prefix, &input.cuts[1..]),
        End::Reset,
    );
    assert_eq!(
        reset_whole,
        reset_split,
        "reset after {} bytes: split at {:?} differs from one chunk",
        prefix.len(),
        &input.cuts[1..]
    );
    if strippable {
        assert!(is_subsequence(&reset_whole.output.0, prefix));
    } else {
        assert!(reset_whole.output.0 == prefix);
    }
}

// ---------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    fn fuzz_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
    }

    /// Every file in `dir` (none if it does not exist), sorted.
    fn files(dir: &Path) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut out: Vec<PathBuf> = entries
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file() && p.file_name().is_some_and(|n| n != ".gitkeep"))
            .collect();
        out.sort();
        out
    }

    fn replay(target: &str, f: Check, dir: &Path) -> usize {
        let inputs = files(&dir.join(target));
        for path in &inputs {
            let data = std::fs::read(path).unwrap();
            let result = std::panic::catch_unwind(|| f(&data));
            assert!(result.is_ok(), "{target}: {} fails", path.display());
        }
        inputs.len()
    }

    /// The seed corpora that `fuzz/seed.py` writes (make fuzz-check runs it first).
    #[test]
    fn every_seed_passes() {
        let seeds = fuzz_dir().join("seeds");
        for (target, f) in TARGETS {
            let n = replay(target, f, &seeds);
            assert!(
                n >= 2,
                "{target}: only {n} seeds in {}; run `python3 fuzz/seed.py` first",
                seeds.display()
            );
        }
    }

    /// The configurations taken from envoy/*.yaml are real ones: they compile.
    #[test]
    fn the_envoy_configurations_compile() {
        let env = |name: &str| Some(format!("key-for-{name}"));
        let seeds: Vec<PathBuf> = files(&fuzz_dir().join("seeds/config"))
            .into_iter()
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("envoy_"))
            })
            .collect();
        assert!(seeds.len() >= 2, "run `python3 fuzz/seed.py` first");
        for path in seeds {
            let data = std::fs::read(&path).unwrap();
            if let Err(e) = sluice::config::compile(&data, &env) {
                panic!("{}: {e}", path.display());
            }
        }
    }

    /// Inputs that once failed, kept in `fuzz/regressions/<target>/`.
    #[test]
    fn every_regression_input_passes() {
        let dir = fuzz_dir().join("regressions");
        let total: usize = TARGETS.iter().map(|(t, f)| replay(t, *f, &dir)).sum();
        println!("{total} regression inputs replayed");
    }

    #[test]
    fn header_parsing() {
        let mut data = vec![0b1_0110u8];
        data.extend(7u32.to_le_bytes());
        data.extend(100u32.to_le_bytes());
        data.extend([0; 8]);
        data.extend(b"hello");
        let input = UsageInput::parse(&data);
        assert_eq!(input.body, b"hello");
        assert_eq!(input.cuts, [1, 4, 0, 0]);
        assert_eq!(input.openai_shape(), ResponseShape::Responses);
        assert!(input.strip() && !input.eos_alone() && input.one_byte_chunks());
        assert_eq!(UsageInput::parse(&[3]).body, b"");
        assert_eq!(
            chunks(b"abcdef", &[4, 1, 4]),
            [&b"a"[..], b"bcd", b"", b"ef"]
        );
    }

    #[test]
    fn subsequence() {
        assert!(is_subsequence(b"ace", b"abcde"));
        assert!(is_subsequence(b"", b""));
        assert!(!is_subsequence(b"ea", b"abcde"));
    }
}
