#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets into fuzz/seeds/<target>/ (not committed).

Sources: the plugin configurations embedded in envoy/**/*.yaml, hand-written request
bodies plus the raw JSON request bodies in src/body/*.rs (parsing, the prompt estimate,
the rewrites), and the response bodies in tests/fixtures/usage/. Standard library only; deterministic output.
"""

import hashlib
import json
import random
import re
import shutil
import struct
import sys
from pathlib import Path

FUZZ = Path(__file__).resolve().parent
ROOT = FUZZ.parent
SEEDS = FUZZ / "seeds"
FIXTURES = ROOT / "tests" / "fixtures" / "usage"


def write(target, name, data):
    d = SEEDS / target
    d.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    (d / name).write_bytes(data)


# --- config ----------------------------------------------------------------------------


def embedded_configs(path):
    """JSON values of `value: |` blocks (the wasm filter's `configuration:`) in a YAML file."""
    lines = path.read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        if not re.match(r"\s*value:\s*\|[-+]?\s*$", line):
            continue
        indent = len(line) - len(line.lstrip())
        block = []
        for nxt in lines[i + 1 :]:
            if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent:
                break
            block.append(nxt)
        text = "\n".join(block).strip()
        try:
            value = json.loads(text)
        except ValueError:
            continue
        if isinstance(value, dict) and "providers" in value:
            out.append(text + "\n")
    return out


def sha(key):
    return hashlib.sha256(key.encode()).hexdigest()


def config_seeds():
    n = 0
    for path in sorted((ROOT / "envoy").rglob("*.yaml")):
        for j, text in enumerate(embedded_configs(path)):
            name = str(path.relative_to(ROOT)).replace("/", "_")
            write("config", f"{name}.{j}.json", text)
            n += 1
    if n < 2:
        sys.exit("seed.py: found fewer than 2 configurations in envoy/*.yaml")
    # The base configuration of src/config/tests.rs, and variants that use every field.
    base = {
        "providers": [
            {"name": "openai", "api": "openai", "cluster": "openai", "path_prefix": "/v1",
             "authority": "api.openai.com", "api_key_env": "OPENAI_KEY"},
            {"name": "anthropic", "api": "anthropic", "cluster": "anthropic", "path_prefix": "/v1",
             "api_key_env": "ANTHROPIC_KEY"},
        ],
        "models": [
            {"name": "gpt-4.1", "providers": ["openai"],
             "price": {"input": 2.0, "cached_input": 0.5, "output": 8.0}},
            {"name": "claude-sonnet-4.5", "aliases": ["claude-sonnet", "claude-sonnet-4-5*"],
             "upstream_model": "claude-sonnet-4-5-20250929", "providers": ["anthropic"],
             "price": {"input": 3.0, "output": 15.0}},
        ],
        "tiers": {"gold": {"models": ["*"]}, "bronze": {"models": ["gpt-*"]}},
        "tenants": [
            {"id": "acme", "tier": "gold", "keys": [{"id": "main", "sha256": sha("sk-acme")}]}
        ],
    }
    write("config", "base.json", json.dumps(base))
    full = json.loads(json.dumps(base))
    full["max_body_bytes"] = 2097152
    full["default_max_output_tokens"] = 1024
    full["providers"][0].update(
        {"api_key_header": "Authorization", "max_in_flight": 8,
         "limits": {"requests_per_minute": 500, "tokens_per_minute": 90000, "burst": 1.5,
                    "concurrent_requests": 16, "monthly_tokens": 1000000000,
                    "monthly_budget_usd": 2500.5}})
    full["models"][0]["price"]["cache_write"] = 2.5
    full["tiers"]["gold"].update({"priority": 2, "weight": 5, "max_queue_wait_ms": 5000,
                                  "limits": {"requests_per_minute": 100, "burst": 2.0}})
    full["tenants"].append(
        {"id": "globex", "tier": "bronze", "models": ["gpt-4.1", "claude-*"],
         "keys": [{"id": "a", "sha256": sha("sk-globex-a")},
                  {"id": "b", "sha256": sha("sk-globex-b").upper()}],
         "limits": {"tokens_per_minute": 50, "monthly_budget_usd": 5.25},
         "model_limits": {"gpt-4.1": {"requests_per_minute": 3}},
         "max_queue_length": 10})
    write("config", "full.json", json.dumps(full, indent=2))
    write("config", "not_json.json", "{not json")


# --- request_body ----------------------------------------------------------------------

REQUESTS = {
    "chat": {"model": "gpt-4.1", "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Write a haiku about rivers."}]},
    "chat_stream": {"model": "gpt-4.1-mini", "stream": True,
                    "messages": [{"role": "user", "content": "stream please"}]},
    "chat_stream_usage": {"model": "o4-mini", "stream": True,
                          "stream_options": {"include_usage": True},
                          "max_completion_tokens": 512, "reasoning_effort": "low",
                          "messages": [{"role": "user", "content": "Tell me a fox story please"}]},
    "chat_stream_options_other": {"model": "gpt-4.1", "stream": True,
                                  "stream_options": {"include_obfuscation": False},
                                  "messages": [{"role": "user", "content": "hi"}]},
    "chat_tools": {"model": "gpt-4.1", "max_tokens": 256, "temperature": 0.2, "tool_choice": "auto",
                   "tools": [{"type": "function", "function": {
                       "name": "get_weather", "description": "Weather for a city",
                       "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                      "required": ["city"]}}}],
                   "messages": [
                       {"role": "user", "content": "Weather in Paris?"},
                       {"role": "assistant", "content": None, "tool_calls": [
                           {"id": "call_1", "type": "function",
                            "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
                       {"role": "tool", "tool_call_id": "call_1", "content": "18°C, clear"}]},
    "chat_image": {"model": "gpt-4.1", "max_completion_tokens": 300, "n": 1,
                   "response_format": {"type": "json_object"},
                   "messages": [{"role": "user", "content": [
                       {"type": "text", "text": "What is in this image? Answer in JSON."},
                       {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=",
                                                           "detail": "low"}}]}]},
    "embeddings": {"model": "text-embedding-3-small", "input": "The food was delicious.",
                   "encoding_format": "float"},
    "embeddings_batch": {"model": "text-embedding-3-small", "dimensions": 4,
                         "input": ["The quick brown fox", "jumps over the lazy dog", "héllo wörld"]},
    "embeddings_tokens": {"model": "text-embedding-3-small", "input": [[1212, 318, 257], [40, 1101]]},
    "responses": {"model": "o4-mini", "instructions": "Be brief", "max_output_tokens": 200,
                  "input": "Tell me about the fox."},
    "responses_items": {"model": "gpt-4.1", "stream": True, "store": False,
                        "input": [{"role": "user", "content": [
                            {"type": "input_text", "text": "Tell me about the fox."}]},
                            {"type": "function_call_output", "call_id": "c1", "output": "ok"}]},
    "anthropic": {"model": "claude-sonnet-4-5-20250929", "max_tokens": 1024,
                  "system": "You are terse and precise.",
                  "messages": [{"role": "user", "content": "Describe the fox in one line."}]},
    "anthropic_stream": {"model": "claude-sonnet", "max_tokens": 256, "stream": True,
                         "system": [{"type": "text", "text": "You are terse.",
                                     "cache_control": {"type": "ephemeral"}}],
                         "thinking": {"type": "enabled", "budget_tokens": 1024},
                         "messages": [
                             {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
                             {"role": "assistant", "content": [
                                 {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                  "input": {"city": "Oslo"}}]},
                             {"role": "user", "content": [
                                 {"type": "tool_result", "tool_use_id": "toolu_1",
                                  "content": "-3°C"}]}]},
}

# Layouts a JSON encoder would not produce, written by hand.
RAW_REQUESTS = {
    "escaped_model_key": r'{"mod\u0065l":"a","n":1}',
    "spaces": '  {\r\n\t"messages" : [ {"content":"the \\"model\\": x","n":{"model":"inner"}} ] ,\n'
              '  "model" : "claude-sonnet" , "stream" : true }  \n',
    "unicode_model": r'{"model":"gpt\u002d4","messages":[{"role":"user","content":"\ud83d\ude00 é"}]}',
    "stream_options_null": '{"model":"m","stream":true,"stream_options":null}',
    "stream_options_false": '{"model":"m","stream":true,"stream_options":{"include_usage":false}}',
    "empty_object": " { } ",
    "max_fields": '{"model":"m","max_tokens":10,"max_completion_tokens":30,"max_output_tokens":20}',
    "numbers": '{"x":1.5e3,"y":[true,null,-0,-0.5e-3],"model":"a","z":{"":[]}}',
    "deep": '{"model":"m","x":' + "[" * 127 + "]" * 127 + "}",
}


def raw_json_strings(path):
    """Raw string literals r#"{..}"# / br#"{..}"# of a Rust file that are JSON requests."""
    out = []
    for m in re.finditer(r'b?r#"(\{.*?\})"#', path.read_text(), re.S):
        text = m.group(1)
        try:
            value = json.loads(text)
        except ValueError:
            continue
        if isinstance(value, dict) and "model" in value:
            out.append(text)
    return out


def request_seeds():
    for name, body in REQUESTS.items():
        write("request_body", f"{name}.json", json.dumps(body, ensure_ascii=False))
    for name, body in RAW_REQUESTS.items():
        write("request_body", f"{name}.json", body)
    sources = sorted((ROOT / "src" / "body").glob("*.rs"))
    if not sources:
        sys.exit("seed.py: no request bodies in src/body/*.rs")
    for src in sources:
        for i, text in enumerate(raw_json_strings(src)):
            write("request_body", f"body_{src.stem}_rs_{i}.json", text)


# --- usage -----------------------------------------------------------------------------

SHAPES = {"chat_completions": 0, "embeddings": 1, "responses": 2}


def header(flags, rng):
    """The 17-byte header of fuzz/src/lib.rs `UsageInput`: flags, then four u32 cuts."""
    return bytes([flags]) + b"".join(struct.pack("<I", rng.getrandbits(32)) for _ in range(4))


def usage_seeds():
    rng = random.Random(0x51CE)
    bodies = sorted(FIXTURES.glob("*.json")) + sorted(FIXTURES.glob("*.sse"))
    bodies = [p for p in bodies if not p.name.endswith(".expected.json")]
    for path in bodies:
        body = path.read_bytes()
        stem = path.name.split(".")[0]
        sse = path.suffix == ".sse"
        if stem.startswith("anthropic") or stem.startswith("mock_anthropic"):
            target = "usage_anthropic_" + ("sse" if sse else "json")
            variants = [0, 4, 8 | 16]
        else:
            target = "usage_openai_" + ("sse" if sse else "json")
            spec = FIXTURES / f"{stem}.expected.json"
            shape = SHAPES[json.loads(spec.read_text())["shape"]] if spec.exists() else 0
            variants = [shape, shape | 8 | 16]
            if sse and shape == 0:
                variants += [4, 4 | 8 | 16]  # strip_usage_chunk
        for flags in variants:
            write(target, f"{path.name}.{flags:02x}", header(flags, rng) + body)
    for target, name, flags, body in large_bodies():
        write(target, f"large_{name}.{flags:02x}", header(flags, rng) + body)


def chat_event(obj):
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def large_bodies():
    """Bodies past the meter's limits, which the fuzzer's slowly growing length limit
    would not reach in minutes: an event over MAX_HELD_EVENT_BYTES (64 KiB, with and
    without stripping), a usage object over MAX_USAGE_OBJECT_BYTES (8 KiB). JSON bodies
    have no limit past the usage object's: no long JSON seed (it slows the target down)."""
    big = "x" * (66 * 1024)
    usage = {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}
    content = chat_event({"id": "c", "choices": [{"index": 0, "delta": {"content": big}}]})
    usage_only = chat_event({"id": "c", "choices": [], "usage": usage})
    # Looks like the usage-only chunk but is too big to hold: released, never dropped.
    big_usage_only = chat_event({"id": big, "choices": [], "usage": usage})
    done = b"data: [DONE]\n\n"
    pad = "p" * (9 * 1024)
    for flags in [4, 4 | 8]:
        yield "usage_openai_sse", "chat_event_over_hold_limit", flags, content + usage_only + done
        yield "usage_openai_sse", "usage_only_event_over_hold_limit", flags, big_usage_only + done
    yield "usage_openai_sse", "usage_object_over_capture_limit", 4, chat_event(
        {"choices": [], "usage": dict(usage, pad=pad)}) + done
    yield "usage_openai_json", "usage_object_over_capture_limit", 0, json.dumps(
        {"choices": [{"message": {"content": "hi"}}], "usage": dict(usage, pad=pad)}).encode()
    start = {"type": "message_start", "message": {"id": "msg_1", "type": "message",
             "role": "assistant", "content": [], "usage": {"input_tokens": 25, "output_tokens": 1}}}
    delta = {"type": "content_block_delta", "index": 0,
             "delta": {"type": "text_delta", "text": big}}
    end = {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
           "usage": {"output_tokens": 16900}}
    sse = b"".join(b"event: " + e["type"].encode() + b"\n" + chat_event(e) for e in [start, delta, end])
    yield "usage_anthropic_sse", "text_delta_over_hold_limit", 8, sse
    yield "usage_anthropic_json", "usage_object_over_capture_limit", 0, json.dumps(
        {"id": "msg_1", "type": "message", "content": [{"type": "text", "text": "hi"}],
         "usage": {"input_tokens": 3, "output_tokens": 1, "pad": pad}}).encode()


def main():
    if SEEDS.exists():
        shutil.rmtree(SEEDS)
    config_seeds()
    request_seeds()
    usage_seeds()
    for d in sorted(SEEDS.iterdir()):
        print(f"seed.py: {d.name}: {len(list(d.iterdir()))} seeds")


if __name__ == "__main__":
    main()
