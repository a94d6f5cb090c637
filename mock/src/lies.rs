//! A misbehaving provider: `x-mock-usage` (usage that lies) and `x-mock-body` (a 200
//! whose body is broken). Applied to a finished reply, so every handler gets them.

use bytes::Bytes;
use serde_json::Value;

use crate::exchange::{Reply, StreamPlan};
use crate::knobs::BodyFault;

const GARBAGE: &[u8] = b"{\"usage\": {\"prompt_tokens\": \xff\xfe not json ]]";

/// Replaces every `usage` object in `v`, at any depth, with `lie`.
fn replace_usage(v: &mut Value, lie: &Value) {
    match v {
        Value::Object(map) => {
            for (k, child) in map.iter_mut() {
                if k == "usage" && child.is_object() {
                    *child = lie.clone();
                } else {
                    replace_usage(child, lie);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|c| replace_usage(c, lie)),
        _ => {}
    }
}

/// Rewrites the JSON payload of each `data:` line of one serialized SSE event.
fn map_event(event: &Bytes, f: &dyn Fn(&[u8]) -> Vec<u8>) -> Bytes {
    let mut out = Vec::with_capacity(event.len());
    for line in event.split_inclusive(|&b| b == b'\n') {
        match line.strip_prefix(b"data: ") {
            Some(payload) => {
                let (json, eol) = match payload.strip_suffix(b"\n") {
                    Some(j) => (j, &b"\n"[..]),
                    None => (payload, &b""[..]),
                };
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(&f(json));
                out.extend_from_slice(eol);
            }
            None => out.extend_from_slice(line),
        }
    }
    Bytes::from(out)
}

fn map_plan(plan: StreamPlan, f: &dyn Fn(&[u8]) -> Vec<u8>) -> StreamPlan {
    let map = |events: Vec<Bytes>| events.iter().map(|e| map_event(e, f)).collect();
    StreamPlan {
        preamble: map(plan.preamble),
        content: map(plan.content),
        epilogue: map(plan.epilogue),
    }
}

/// The reply as a lying or broken provider would send it.
pub(crate) fn apply(reply: Reply, usage: Option<&Value>, fault: Option<BodyFault>) -> Reply {
    let reply = match (reply, usage) {
        (Reply::Json(mut v), Some(lie)) => {
            replace_usage(&mut v, lie);
            Reply::Json(v)
        }
        (Reply::Stream { plan, reset }, Some(lie)) => {
            let lie = lie.clone();
            let f = move |json: &[u8]| match serde_json::from_slice::<Value>(json) {
                Ok(mut v) => {
                    replace_usage(&mut v, &lie);
                    v.to_string().into_bytes()
                }
                Err(_) => json.to_vec(),
            };
            Reply::Stream {
                plan: map_plan(plan, &f),
                reset,
            }
        }
        (other, _) => other,
    };
    match (reply, fault) {
        (Reply::Json(_), Some(BodyFault::Garbage)) => Reply::Raw(Bytes::from_static(GARBAGE)),
        (Reply::Json(v), Some(BodyFault::Truncate)) => {
            let text = v.to_string().into_bytes();
            Reply::Raw(Bytes::from(text[..text.len() / 2].to_vec()))
        }
        (Reply::Stream { plan, reset }, Some(BodyFault::Garbage)) => Reply::Stream {
            plan: map_plan(plan, &|_| GARBAGE.to_vec()),
            reset,
        },
        (Reply::Stream { mut plan, reset }, Some(BodyFault::Truncate)) => {
            plan.epilogue.clear();
            if let Some(last) = plan.content.pop() {
                plan.content.push(last.slice(..last.len() / 2));
            }
            Reply::Stream { plan, reset }
        }
        (other, _) => other,
    }
}
