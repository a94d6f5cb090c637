//! Request recording.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;

/// Normalized usage the mock reported (ground truth).
///
/// * `input_tokens`: uncached prompt tokens (OpenAI: `prompt_tokens -
///   cached_tokens`; Anthropic: `input_tokens`).
/// * `cached_tokens`: prompt tokens read from cache (OpenAI
///   `prompt_tokens_details.cached_tokens`; Anthropic `cache_read_input_tokens`).
/// * `cache_creation_tokens`: Anthropic `cache_creation_input_tokens` (0 on OpenAI).
/// * `output_tokens`: all output tokens, reasoning included (OpenAI
///   `completion_tokens`; Anthropic `output_tokens`).
/// * `reasoning_tokens`: the reasoning part of `output_tokens`.
///
/// So `input_tokens + cached_tokens + cache_creation_tokens` is the total
/// prompt size computed from the request.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_tokens: u64,
    pub reasoning_tokens: u64,
    pub cache_creation_tokens: u64,
}

/// One request as received by a mock provider.
#[derive(Clone, Debug, Serialize)]
pub struct RecordedRequest {
    /// Provider name from the spec ("openai", "anthropic", ...).
    pub provider: String,
    pub method: String,
    /// Path and query as received.
    pub path: String,
    /// Header names lowercased, in the order received.
    pub headers: Vec<(String, String)>,
    /// Lossy UTF-8 of the raw request body.
    pub body: String,
    /// Status the mock answered; 0 when it dropped the connection before
    /// sending any response (`x-mock-fault: reset` on a non-stream request).
    pub status: u16,
    /// Usage reported by (or, for streams without usage, implied by) a
    /// successful response; `None` for errors and non-stream resets.
    pub usage: Option<Usage>,
    /// `true` once the whole response body was handed to the connection;
    /// `false` if the mock reset the connection or the client went away.
    pub completed: bool,
}

impl RecordedRequest {
    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON, if it is JSON.
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_str(&self.body).ok()
    }
}

struct Entry {
    id: u64,
    req: RecordedRequest,
}

/// Shared, append-only (until cleared) log of requests.
pub(crate) struct Recorder {
    name: String,
    entries: Mutex<Vec<Entry>>,
    next_id: AtomicU64,
    log: AtomicBool,
}

impl Recorder {
    pub(crate) fn new(name: String) -> Self {
        Recorder {
            name,
            entries: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
            log: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn set_logging(&self, on: bool) {
        self.log.store(on, Ordering::Relaxed);
    }

    /// Appends a record; returns its id.
    pub(crate) fn push(&self, req: RecordedRequest) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if self.log.load(Ordering::Relaxed) {
            eprintln!("{}", log_line(&req));
        }
        self.lock().push(Entry { id, req });
        id
    }

    pub(crate) fn set_completed(&self, id: u64) {
        if let Some(e) = self.lock().iter_mut().find(|e| e.id == id) {
            e.req.completed = true;
        }
    }

    /// Called when a response body is dropped before it finished.
    pub(crate) fn aborted(&self, id: u64) {
        if !self.log.load(Ordering::Relaxed) {
            return;
        }
        let what = self
            .lock()
            .iter()
            .find(|e| e.id == id)
            .map(|e| format!("{} {}", e.req.method, e.req.path));
        if let Some(what) = what {
            eprintln!(
                "sluice-mock: {} {what} response not completed (reset or client went away)",
                self.name
            );
        }
    }

    pub(crate) fn snapshot(&self) -> Vec<RecordedRequest> {
        self.lock().iter().map(|e| e.req.clone()).collect()
    }

    pub(crate) fn clear(&self) -> usize {
        let mut g = self.lock();
        let n = g.len();
        g.clear();
        n
    }
}

fn log_line(r: &RecordedRequest) -> String {
    let usage = match &r.usage {
        Some(u) => format!(
            " usage in={} cached={} cache_write={} out={} reasoning={}",
            u.input_tokens,
            u.cached_tokens,
            u.cache_creation_tokens,
            u.output_tokens,
            u.reasoning_tokens
        ),
        None => String::new(),
    };
    let status = if r.status == 0 {
        "reset".to_string()
    } else {
        r.status.to_string()
    };
    format!(
        "sluice-mock: {} {} {} -> {status}{usage}",
        r.provider, r.method, r.path
    )
}

/// Marks a record completed when the response body finishes.
pub(crate) struct Completion {
    rec: Arc<Recorder>,
    id: u64,
}

impl Completion {
    pub(crate) fn new(rec: Arc<Recorder>, id: u64) -> Self {
        Completion { rec, id }
    }

    pub(crate) fn complete(self) {
        self.rec.set_completed(self.id);
    }

    pub(crate) fn abort(self) {
        self.rec.aborted(self.id);
    }
}
