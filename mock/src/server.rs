//! Listener, connection handling, dispatch, recording and delivery.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

use crate::body::MockBody;
use crate::exchange::{Ctx, Flavour, Outcome, Reply, StreamPlan};
use crate::knobs::Knobs;
use crate::record::{Completion, RecordedRequest, Recorder};
use crate::{anthropic, lies, openai, ProviderKind, ProviderSpec};

/// Reserved admin path (not recorded, no credential).
pub(crate) const ADMIN_PATH: &str = "/__mock/requests";

pub(crate) struct State {
    pub name: String,
    pub kind: ProviderKind,
    pub api_key: String,
    pub prefix: String,
    pub recorder: Arc<Recorder>,
    seq: AtomicU64,
    /// Requests seen per `x-request-id`, for `x-mock-fault-times`.
    faults_by_request_id: std::sync::Mutex<std::collections::HashMap<String, u64>>,
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A running mock provider. Dropping it stops the listener and aborts its
/// connections.
pub struct MockServer {
    addr: SocketAddr,
    state: Arc<State>,
    task: Option<JoinHandle<()>>,
}

/// Binds `spec.listen` and starts serving in the background (needs a tokio
/// runtime).
pub async fn start(spec: ProviderSpec) -> io::Result<MockServer> {
    let listener = TcpListener::bind(spec.listen).await?;
    let addr = listener.local_addr()?;
    let state = Arc::new(State {
        recorder: Arc::new(Recorder::new(spec.name.clone())),
        name: spec.name,
        kind: spec.kind,
        api_key: spec.api_key,
        prefix: spec.path_prefix.trim_end_matches('/').to_string(),
        seq: AtomicU64::new(0),
        faults_by_request_id: Default::default(),
    });
    let task = tokio::spawn(accept_loop(listener, state.clone()));
    Ok(MockServer {
        addr,
        state,
        task: Some(task),
    })
}

impl MockServer {
    /// The bound address (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn name(&self) -> &str {
        &self.state.name
    }

    /// Snapshot of the recorded requests, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state.recorder.snapshot()
    }

    pub fn clear(&self) {
        self.state.recorder.clear();
    }

    /// Log one line per request (and per unfinished response) to stderr.
    /// Credentials are never logged.
    pub fn set_logging(&self, on: bool) {
        self.state.recorder.set_logging(on);
    }

    /// Stops accepting and aborts open connections.
    pub async fn shutdown(mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    // Connection tasks live in the JoinSet so aborting this task aborts them.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            res = listener.accept() => match res {
                Ok((stream, _)) => {
                    conns.spawn(serve_conn(stream, state.clone()));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn serve_conn(stream: TcpStream, state: Arc<State>) {
    let _ = stream.set_nodelay(true);
    let svc = service_fn(move |req| handle(state.clone(), req));
    let _ = auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(stream), svc)
        .await;
}

/// Error returned to hyper to drop the connection without a response.
#[derive(Debug)]
struct MockReset;

impl std::fmt::Display for MockReset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("sluice-mock: injected connection reset")
    }
}

impl std::error::Error for MockReset {}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<MockBody>, MockReset> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let path_query = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str().to_string())
        .unwrap_or_else(|| path.clone());

    if path == ADMIN_PATH {
        return Ok(admin(&state, &parts.method));
    }

    let body = match body.collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => return Err(MockReset),
    };
    let mut knobs = Knobs::from_headers(&parts.headers);
    // `x-mock-fault-on`: only the named providers fault (one request can reach several, a
    // gateway falling back from one to the next).
    if knobs
        .fault_on
        .as_ref()
        .is_some_and(|names| !names.iter().any(|n| n == &state.name))
    {
        knobs.fault = None;
    }
    if let (Some(_), Some(times)) = (knobs.fault, knobs.fault_times) {
        let id = parts
            .headers
            .get("x-request-id")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default();
        let seen = match state.faults_by_request_id.lock() {
            Ok(mut m) => {
                let n = m.entry(id).or_insert(0);
                *n += 1;
                *n
            }
            Err(_) => 1,
        };
        if seen > times {
            knobs.fault = None;
        }
    }
    let seq = state.seq.fetch_add(1, Ordering::Relaxed) + 1;
    let ctx = Ctx {
        provider: &state.name,
        api_key: &state.api_key,
        method: &parts.method,
        headers: &parts.headers,
        body: &body,
        knobs: &knobs,
        seq,
        now: unix_now(),
    };
    let mut outcome = route(&state, &ctx, &path);
    if outcome.status == 200 {
        outcome.reply = lies::apply(outcome.reply, knobs.usage.as_ref(), knobs.body);
    }

    let id = state.recorder.push(RecordedRequest {
        provider: state.name.clone(),
        method: parts.method.to_string(),
        path: path_query,
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: String::from_utf8_lossy(&body).into_owned(),
        status: outcome.status,
        usage: outcome.usage.clone(),
        completed: false,
    });
    let done = Some(Completion::new(state.recorder.clone(), id));

    if knobs.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(knobs.latency_ms)).await;
    }

    let mut builder = Response::builder()
        .status(StatusCode::from_u16(outcome.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR));
    if let Some(h) = builder.headers_mut() {
        let req_id = format!("req_mock_{seq}");
        let mut add = |name: &str, value: &str| {
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) {
                h.append(n, v);
            }
        };
        match outcome.flavour {
            Flavour::OpenAi => {
                add("x-request-id", &req_id);
                add("openai-processing-ms", &knobs.latency_ms.to_string());
                add("openai-version", "2020-10-01");
            }
            Flavour::Anthropic => add("request-id", &req_id),
        }
        for (k, v) in &outcome.headers {
            add(k, v);
        }
    }

    let resp = match outcome.reply {
        Reply::Reset => return Err(MockReset),
        Reply::Json(v) => builder
            .header(CONTENT_TYPE, "application/json")
            .body(MockBody::full(Bytes::from(v.to_string()), done)),
        Reply::Raw(bytes) => builder
            .header(CONTENT_TYPE, "application/json")
            .body(MockBody::full(bytes, done)),
        Reply::Stream { plan, reset } => {
            let (tx, rx) = mpsc::channel(8);
            tokio::spawn(produce(plan, reset, knobs, tx));
            builder
                .header(CONTENT_TYPE, "text/event-stream; charset=utf-8")
                .header("cache-control", "no-cache")
                .body(MockBody::channel(rx, done))
        }
    };
    Ok(resp.unwrap_or_else(|_| Response::new(MockBody::full(Bytes::new(), None))))
}

/// Pause before an injected mid-stream reset so the partial stream reaches
/// the client first.
const RESET_FLUSH_MS: u64 = 50;

/// Feeds a stream body: ttft, preamble + first content event, then the
/// remaining content events spaced by the chunk delay, then the epilogue.
/// With `reset`, stops after half the content events with an error, which
/// makes hyper abort the connection.
async fn produce(
    plan: StreamPlan,
    reset: bool,
    knobs: Knobs,
    tx: mpsc::Sender<Result<Bytes, io::Error>>,
) {
    let sleep = |ms: u64| tokio::time::sleep(Duration::from_millis(ms));
    if knobs.ttft_ms > 0 {
        sleep(knobs.ttft_ms).await;
    }
    for b in plan.preamble {
        if tx.send(Ok(b)).await.is_err() {
            return;
        }
    }
    let cut = if reset {
        plan.content.len() / 2
    } else {
        usize::MAX
    };
    for (i, b) in plan.content.into_iter().enumerate() {
        if i == cut {
            break;
        }
        if i > 0 && knobs.chunk_delay_ms > 0 {
            sleep(knobs.chunk_delay_ms).await;
        }
        if tx.send(Ok(b)).await.is_err() {
            return;
        }
    }
    if reset {
        // Let hyper flush what was sent (it only flushes once the body is
        // pending), then abort.
        sleep(RESET_FLUSH_MS).await;
        let _ = tx
            .send(Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "sluice-mock: injected mid-stream reset",
            )))
            .await;
        return;
    }
    for b in plan.epilogue {
        if tx.send(Ok(b)).await.is_err() {
            return;
        }
    }
}

fn admin(state: &State, method: &Method) -> Response<MockBody> {
    let (status, body) = match *method {
        Method::GET => {
            let reqs = state.recorder.snapshot();
            (
                StatusCode::OK,
                serde_json::to_vec(&reqs).unwrap_or_else(|_| b"[]".to_vec()),
            )
        }
        Method::DELETE => {
            let n = state.recorder.clear();
            (
                StatusCode::OK,
                serde_json::json!({ "cleared": n }).to_string().into_bytes(),
            )
        }
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            br#"{"error":"use GET or DELETE"}"#.to_vec(),
        ),
    };
    let mut resp = Response::new(MockBody::full(Bytes::from(body), None));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn route(st: &State, ctx: &Ctx<'_>, path: &str) -> Outcome {
    let rest = path.strip_prefix(st.prefix.as_str());
    let post = *ctx.method == Method::POST;
    match st.kind {
        ProviderKind::OpenAi => match rest {
            Some("/chat/completions") if post => openai::chat(ctx, openai::Compat::OpenAi),
            Some("/embeddings") if post => openai::embeddings(ctx),
            Some("/responses") if post => openai::responses(ctx),
            Some("/models") if *ctx.method == Method::GET => openai::models(ctx),
            Some("/chat/completions" | "/embeddings" | "/responses" | "/models") => {
                openai::method_not_allowed(ctx)
            }
            _ => openai::not_found(ctx),
        },
        ProviderKind::Anthropic => match rest {
            Some("/messages") if post => anthropic::messages(ctx),
            Some("/messages/count_tokens") if post => anthropic::count_tokens(ctx),
            Some("/chat/completions") if post => Outcome {
                // Anthropic's response headers (request-id) on its OpenAI-compatible endpoint.
                flavour: Flavour::Anthropic,
                ..openai::chat(ctx, openai::Compat::Anthropic)
            },
            Some("/messages" | "/messages/count_tokens" | "/chat/completions") => {
                anthropic::method_not_allowed(ctx)
            }
            _ => anthropic::not_found(ctx),
        },
    }
}
