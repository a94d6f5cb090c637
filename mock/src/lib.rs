//! Mock LLM provider servers for Sluice's whole-system tests and demo.
//!
//! Each [`MockServer`] imitates one provider — OpenAI-shaped (OpenAI,
//! DeepSeek, Gemini's OpenAI-compatible API) or Anthropic — with JSON and
//! SSE answers, usage, error shapes, credential checks, latency and fault
//! knobs, and records every request it receives. See `mock/README.md`.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use sluice_mock::{start, ProviderKind, ProviderSpec};
//! let openai = start(ProviderSpec {
//!     name: "openai".into(),
//!     kind: ProviderKind::OpenAi,
//!     listen: "127.0.0.1:0".parse().map_err(std::io::Error::other)?,
//!     api_key: "sk-test-openai-0001".into(),
//!     path_prefix: "/v1".into(),
//! })
//! .await?;
//! // ... send traffic through the gateway to openai.addr() ...
//! let reqs = openai.requests();
//! # let _ = reqs; Ok(()) }
//! ```

mod anthropic;
mod body;
mod exchange;
mod knobs;
mod lies;
mod openai;
mod record;
mod server;
mod tokens;

use std::net::SocketAddr;

pub use record::{RecordedRequest, Usage};
pub use server::{start, MockServer};
pub use tokens::{count_tokens, mock_text};

/// Reserved admin path served on every listener: `GET` lists the recorded
/// requests as JSON, `DELETE` clears them. Not recorded; no credential.
pub const ADMIN_PATH: &str = server::ADMIN_PATH;

/// Response shape family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProviderKind {
    /// OpenAI API shape: chat completions, embeddings, responses, models.
    OpenAi,
    /// Anthropic Messages API (plus its OpenAI-compatible chat endpoint).
    Anthropic,
}

/// What to start.
#[derive(Clone, Debug)]
pub struct ProviderSpec {
    /// "openai", "deepseek", "gemini", "anthropic", ... — recorded with each
    /// request. "deepseek" also adds DeepSeek's `prompt_cache_hit_tokens` /
    /// `prompt_cache_miss_tokens` usage fields.
    pub name: String,
    pub kind: ProviderKind,
    /// Port 0 picks a free port; see [`MockServer::addr`].
    pub listen: SocketAddr,
    /// The credential this provider expects.
    pub api_key: String,
    /// OpenAI kind: "/v1" (OpenAI), "" (DeepSeek), "/v1beta/openai" (Gemini).
    /// Anthropic kind: "/v1".
    pub path_prefix: String,
}
