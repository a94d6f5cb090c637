//! How usage maps for each response shape, and what the meter makes of streams cut
//! short, decoys, absurd values and huge bodies.

use super::*;

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

#[test]
fn an_error_event_marks_the_stream_failed_in_every_shape() {
    let failed = |shape, stream: &str| {
        let mut meter = UsageMeter::new(shape, true, false, 10);
        meter.feed(stream.as_bytes(), true);
        meter.stream_failed()
    };
    let openai_ok = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: [DONE]\n\n";
    assert!(!failed(ResponseShape::ChatCompletions, openai_ok));
    // The chunk Sluice's relay (or OpenAI itself) ends a broken stream with.
    let openai_broken = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n\
        data: {\"error\":{\"message\":\"cut\",\"type\":\"server_error\",\"param\":null,\"code\":\"upstream_failed\"}}\n\n";
    assert!(failed(ResponseShape::ChatCompletions, openai_broken));
    // An `error` key inside a choice is content, not a failure.
    let nested = "data: {\"choices\":[{\"delta\":{\"content\":\"x\"},\"error\":{}}]}\n\n";
    assert!(!failed(ResponseShape::ChatCompletions, nested));
    let anthropic = [
        ANTHROPIC_START.to_string(),
        anthropic_text("Partial"),
        "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"api_error\",\"message\":\"cut\"}}\n\n".to_string(),
    ]
    .concat();
    assert!(failed(ResponseShape::AnthropicMessages, &anthropic));
    assert!(!failed(
        ResponseShape::AnthropicMessages,
        &[ANTHROPIC_START.to_string(), anthropic_text("Whole")].concat()
    ));
    let responses = "event: error\ndata: {\"type\":\"error\",\"code\":\"server_error\",\"message\":\"cut\"}\n\n";
    assert!(failed(ResponseShape::Responses, responses));
}
