//! Stripping the usage chunk the gateway asked for from a client's stream.

use super::*;

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
        let len = chunk_size(&mut rng, 3000);
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
