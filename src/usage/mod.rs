//! Token usage extraction from upstream response bodies, chunk by chunk.
//!
//! Providers report usage inside the response body: at the end of a JSON body, or in one
//! event of an SSE stream. [`UsageMeter`] sees the body as Envoy delivers it (arbitrary
//! chunk boundaries), finds the usage object with an incremental JSON scanner without
//! buffering the body, and normalizes it to [`TokenUsage`]. When a stream ends without
//! usage (reset, client abort, provider omission) it falls back to an estimate: the
//! request's prompt estimate plus the generated text that passed, at 4 characters per
//! token.
//!
//! Pure Rust, no proxy-wasm calls; the host layer feeds it.

mod estimate;
mod json_scan;
mod meter;
mod report;
mod sse;

#[cfg(test)]
mod tests;

pub use estimate::estimate_tokens_from_chars;
pub use meter::UsageMeter;

/// Largest token count accepted from a provider; larger values are clamped and flagged.
pub const MAX_REPORTED_TOKENS: u64 = 1_000_000_000_000;
/// Largest usage object captured; a larger one is ignored and flagged suspicious.
pub const MAX_USAGE_OBJECT_BYTES: usize = 8 * 1024;
/// With `strip_usage_chunk`, an event larger than this is released unexamined: the
/// usage-only chunk is a few hundred bytes.
pub const MAX_HELD_EVENT_BYTES: usize = 64 * 1024;
/// Upper bound of [`UsageMeter::held_bytes`] (allocator growth may double each buffer).
pub const MAX_METER_HELD_BYTES: usize = 2 * (MAX_USAGE_OBJECT_BYTES + MAX_HELD_EVENT_BYTES);

/// Provider-reported usage, normalized across APIs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct TokenUsage {
    /// Uncached input (OpenAI: prompt - cached; Anthropic: `input_tokens`).
    pub input_tokens: u64,
    /// Cache reads (OpenAI `cached_tokens`; Anthropic `cache_read_input_tokens`).
    pub cached_input_tokens: u64,
    /// Anthropic `cache_creation_input_tokens` (0 for OpenAI).
    pub cache_creation_tokens: u64,
    /// All output, including reasoning.
    pub output_tokens: u64,
    /// The reasoning part of `output_tokens`.
    pub reasoning_tokens: u64,
}

impl TokenUsage {
    /// Every input token: uncached, cache reads and cache writes.
    pub fn total_input(&self) -> u64 {
        self.input_tokens
            .saturating_add(self.cached_input_tokens)
            .saturating_add(self.cache_creation_tokens)
    }

    pub fn total(&self) -> u64 {
        self.total_input().saturating_add(self.output_tokens)
    }
}

/// The API whose response is being metered; decides where usage lives and what it means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseShape {
    ChatCompletions,
    Embeddings,
    Responses,
    AnthropicMessages,
}

/// What to send to the client in place of the chunk given to [`UsageMeter::feed`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Passthrough {
    /// Send the chunk as it is.
    Unchanged,
    /// Send these bytes instead (possibly none: bytes are being held back).
    Replace(Vec<u8>),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MeterResult {
    pub usage: TokenUsage,
    /// True unless the provider's final usage report arrived; then some or all of
    /// `usage` is estimated.
    pub estimated: bool,
    /// The provider reported values that were invalid (negative, non-integer, non-numeric,
    /// over [`MAX_REPORTED_TOKENS`], inconsistent) or a usage object that could not be read.
    pub suspicious: bool,
}
