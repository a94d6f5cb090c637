//! The HTTP layer: one POST path per operation of the wire contract, JSON in and out,
//! HTTP/1.1 and HTTP/2 with prior knowledge (h2c) on one port, as Envoy calls it over an
//! HTTP/2 cluster. The cache's lookups answer bytes (a status byte, then the entry), and its
//! stores send them (a JSON header line, then the entry).

use crate::engine::{CacheAnswer, Engine, Error};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use serde::de::DeserializeOwned;
use serde::Serialize;
use sluice::global::wire::{
    cache_answer, AdmitBatch, AdmitRequest, CacheLookup, CacheRelease, CacheStoreHeader,
    ErrorReply, PeekRequest, RenewRequest, SettleRequest, ADMIT_BATCH_PATH, ADMIT_PATH,
    CACHE_LOOKUP_PATH, CACHE_RELEASE_PATH, CACHE_STORE_PATH, HEALTH_PATH, PEEK_PATH, RENEW_PATH,
    SETTLE_PATH,
};
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

/// Far above any real request (a few limits, or a batch of settlements).
const MAX_BODY_BYTES: usize = 1 << 20;
/// A cache store carries a whole response: its header line and the entry.
const MAX_STORE_BYTES: usize = 64 << 20;
/// How long requests in flight may take to finish after a shutdown signal.
const DRAIN: Duration = Duration::from_secs(5);

type Reply = Response<Full<Bytes>>;

/// Serves `listener` until `shutdown` completes, then lets requests in flight finish.
pub async fn serve(listener: TcpListener, engine: Arc<Engine>, shutdown: impl Future<Output = ()>) {
    let graceful = GracefulShutdown::new();
    let connections = auto::Builder::new(TokioExecutor::new());
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let engine = engine.clone();
                    let service = service_fn(move |request| handle(engine.clone(), request));
                    let connection = connections
                        .serve_connection(TokioIo::new(stream), service)
                        .into_owned();
                    let connection = graceful.watch(connection);
                    tokio::spawn(async move {
                        let _ = connection.await;
                    });
                }
                // Out of file descriptors, say: wait rather than spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    let _ = tokio::time::timeout(DRAIN, graceful.shutdown()).await;
}

async fn handle(engine: Arc<Engine>, request: Request<Incoming>) -> Result<Reply, Infallible> {
    let arrived = Instant::now();
    let path = request.uri().path().to_string();
    let reply = match path.as_str() {
        HEALTH_PATH => health(&engine, request.method()).await,
        ADMIT_PATH => match body::<AdmitRequest>(request).await {
            Ok(call) => answer(engine.admit(&call).await),
            Err(refused) => refused,
        },
        ADMIT_BATCH_PATH => match body::<AdmitBatch>(request).await {
            Ok(batch) => answer(Ok::<_, Error>(engine.admit_batch(&batch).await)),
            Err(refused) => refused,
        },
        SETTLE_PATH => match body::<SettleRequest>(request).await {
            Ok(call) => {
                let settled = engine.settle(&call).await;
                if let Some(delay) = faults::slow_settle() {
                    tokio::time::sleep(delay).await;
                }
                answer(settled)
            }
            Err(refused) => refused,
        },
        RENEW_PATH => match body::<RenewRequest>(request).await {
            Ok(call) => answer(engine.renew(&call).await),
            Err(refused) => refused,
        },
        PEEK_PATH => match body::<PeekRequest>(request).await {
            Ok(call) => answer(engine.peek(&call).await),
            Err(refused) => refused,
        },
        CACHE_LOOKUP_PATH => match body::<CacheLookup>(request).await {
            Ok(call) => looked(engine.cache_lookup(&call, arrived).await),
            Err(refused) => refused,
        },
        CACHE_STORE_PATH => match store_body(request).await {
            Ok((header, entry)) => answer(engine.cache_store(&header, &entry).await),
            Err(refused) => refused,
        },
        CACHE_RELEASE_PATH => match body::<CacheRelease>(request).await {
            Ok(call) => answer(
                engine
                    .cache_release(&call)
                    .await
                    .map(|released| serde_json::json!({ "released": released })),
            ),
            Err(refused) => refused,
        },
        _ => error(StatusCode::NOT_FOUND, format!("no such path {path:?}")),
    };
    Ok(reply)
}

/// Fault injection for the system tests, off unless its environment variable is set:
/// `SLUICE_QUOTA_FAULT_SLOW_SETTLES=N:MS` answers the first N settlements MS late, after
/// they were applied, as a lost answer looks to the filter (which then retries).
mod faults {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    use std::time::Duration;

    pub(super) const SLOW_SETTLES: &str = "SLUICE_QUOTA_FAULT_SLOW_SETTLES";

    struct Slow {
        left: AtomicU64,
        delay: Duration,
    }

    fn parse(value: &str) -> Option<(u64, u64)> {
        let (n, ms) = value.split_once(':')?;
        Some((n.trim().parse().ok()?, ms.trim().parse().ok()?))
    }

    pub(super) fn slow_settle() -> Option<Duration> {
        static SLOW: OnceLock<Option<Slow>> = OnceLock::new();
        let slow = SLOW
            .get_or_init(|| {
                let (n, ms) = parse(&std::env::var(SLOW_SETTLES).ok()?)?;
                Some(Slow {
                    left: AtomicU64::new(n),
                    delay: Duration::from_millis(ms),
                })
            })
            .as_ref()?;
        let took = slow
            .left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        took.is_ok().then_some(slow.delay)
    }

    #[cfg(test)]
    #[test]
    fn the_setting_parses() {
        assert_eq!(parse("1:1000"), Some((1, 1000)));
        assert_eq!(parse("x"), None);
    }
}

async fn health(engine: &Engine, method: &Method) -> Reply {
    if method != Method::GET && method != Method::HEAD {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{HEALTH_PATH} takes GET"),
        );
    }
    match engine.ping().await {
        Ok(()) => text(StatusCode::OK, "ok"),
        Err(Error::Redis(message) | Error::BadRequest(message)) => {
            error(StatusCode::SERVICE_UNAVAILABLE, message)
        }
    }
}

/// The request's JSON body, or the answer refusing it.
async fn body<T: DeserializeOwned>(request: Request<Incoming>) -> Result<T, Reply> {
    let bytes = posted(request, MAX_BODY_BYTES).await?;
    serde_json::from_slice(&bytes)
        .map_err(|problem| error(StatusCode::BAD_REQUEST, format!("body: {problem}")))
}

/// A cache store's header (its first line, JSON) and entry (every byte after that line's
/// `\n`, which may hold any byte, `\n` included), or the answer refusing them.
async fn store_body(request: Request<Incoming>) -> Result<(CacheStoreHeader, Bytes), Reply> {
    let mut bytes = posted(request, MAX_STORE_BYTES).await?;
    let Some(newline) = bytes.iter().position(|&b| b == b'\n') else {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "body: no newline after the JSON header line".into(),
        ));
    };
    let entry = bytes.split_off(newline + 1);
    let header = serde_json::from_slice(&bytes[..newline])
        .map_err(|problem| error(StatusCode::BAD_REQUEST, format!("header: {problem}")))?;
    Ok((header, entry))
}

/// The body of a POST, at most `limit` bytes, or the answer refusing it.
async fn posted(request: Request<Incoming>, limit: usize) -> Result<Bytes, Reply> {
    if request.method() != Method::POST {
        return Err(error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{} takes POST", request.uri().path()),
        ));
    }
    match Limited::new(request.into_body(), limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(problem) => Err(error(
            StatusCode::BAD_REQUEST,
            format!("body: {problem} (at most {limit} bytes)"),
        )),
    }
}

/// A lookup's answer: its status byte, then a hit's entry.
fn looked(result: Result<CacheAnswer, Error>) -> Reply {
    let body = match result {
        Ok(CacheAnswer::Hit(entry)) => {
            let mut body = Vec::with_capacity(1 + entry.len());
            body.push(cache_answer::HIT);
            body.extend_from_slice(&entry);
            body
        }
        Ok(CacheAnswer::Fill) => vec![cache_answer::FILL],
        Ok(CacheAnswer::Busy) => vec![cache_answer::BUSY],
        Err(problem) => return answer::<()>(Err(problem)),
    };
    with_type(StatusCode::OK, body, "application/octet-stream")
}

fn answer<T: Serialize>(result: Result<T, Error>) -> Reply {
    match result {
        Ok(reply) => match serde_json::to_vec(&reply) {
            Ok(json) => with_type(StatusCode::OK, json, "application/json"),
            Err(problem) => error(StatusCode::INTERNAL_SERVER_ERROR, problem.to_string()),
        },
        Err(Error::BadRequest(message)) => error(StatusCode::BAD_REQUEST, message),
        Err(Error::Redis(message)) => error(StatusCode::SERVICE_UNAVAILABLE, message),
    }
}

fn error(status: StatusCode, message: String) -> Reply {
    let json = serde_json::to_vec(&ErrorReply { error: message })
        .unwrap_or_else(|_| br#"{"error":"unprintable"}"#.to_vec());
    with_type(status, json, "application/json")
}

fn text(status: StatusCode, body: &'static str) -> Reply {
    with_type(status, body.as_bytes().to_vec(), "text/plain")
}

fn with_type(status: StatusCode, body: Vec<u8>, content_type: &'static str) -> Reply {
    let mut reply = Response::new(Full::new(Bytes::from(body)));
    *reply.status_mut() = status;
    reply
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    reply
}
