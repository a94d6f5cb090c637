"""Drives the gateway with the official OpenAI and Anthropic Python SDKs.

Run by the system test `sdk.rs` against a live gateway: SLUICE_BASE=http://127.0.0.1:PORT.
Exits non-zero (with the failing check) if any SDK call misbehaves.
"""
import os
import sys

import anthropic
import openai

BASE = os.environ["SLUICE_BASE"]
ACME = "sk-sluice-demo-acme"
INITECH = "sk-sluice-demo-initech"

checks = []


def check(name, cond, detail=""):
    checks.append(name)
    if not cond:
        print(f"FAIL {name}: {detail}", file=sys.stderr)
        sys.exit(1)


oa = openai.OpenAI(base_url=f"{BASE}/v1", api_key=ACME, max_retries=0)

r = oa.chat.completions.create(model="gpt-4.1-mini", messages=[{"role": "user", "content": "Hello there"}])
check("openai chat", r.choices[0].message.content and r.usage.total_tokens > 0, r)

chunks = list(
    oa.chat.completions.create(
        model="deepseek-v3.2",
        messages=[{"role": "user", "content": "Stream to me"}],
        stream=True,
        stream_options={"include_usage": True},
    )
)
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
check("openai stream text", len(text) > 0, chunks)
check("openai stream usage", chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0, chunks[-1])

r = oa.chat.completions.create(model="claude-sonnet", messages=[{"role": "user", "content": "Hi Claude"}])
check("openai sdk to claude via openai-compatible endpoint", r.choices[0].message.content, r)

r = oa.chat.completions.create(model="gemini-2.5-flash", messages=[{"role": "user", "content": "Hi Gemini"}])
check("openai sdk to gemini", r.choices[0].message.content, r)

e = oa.embeddings.create(model="text-embedding-3-small", input=["one", "two"])
check("embeddings (SDK default base64 encoding)", len(e.data) == 2 and len(e.data[0].embedding) > 0, e)

resp = oa.responses.create(model="gpt-4.1-mini", input="Hello Responses")
check("responses api", resp.output_text and resp.usage.input_tokens > 0, resp)

ids = [m.id for m in oa.models.list()]
check("models list", "gpt-4.1" in ids and "claude-sonnet-4.5" in ids, ids)

try:
    openai.OpenAI(base_url=f"{BASE}/v1", api_key="sk-wrong", max_retries=0).chat.completions.create(
        model="gpt-4.1", messages=[{"role": "user", "content": "x"}]
    )
    check("openai bad key raises", False, "no exception")
except openai.AuthenticationError as err:
    check("openai bad key raises AuthenticationError", err.status_code == 401 and err.code == "invalid_api_key", err)

try:
    oa.chat.completions.create(model="gpt-7", messages=[{"role": "user", "content": "x"}])
    check("unknown model raises", False, "no exception")
except openai.NotFoundError as err:
    check("unknown model raises NotFoundError", err.code == "model_not_found", err)

try:
    openai.OpenAI(base_url=f"{BASE}/v1", api_key=INITECH, max_retries=0).chat.completions.create(
        model="gpt-4.1", messages=[{"role": "user", "content": "x"}]
    )
    check("allow-list raises", False, "no exception")
except openai.PermissionDeniedError as err:
    check("allow-list raises PermissionDeniedError", err.status_code == 403, err)

# The response cache (demo: acme's gpt-4.1 family, deterministic requests): a miss, then a hit
# with the same answer, read through the SDK's raw response; and a streamed hit the SDK parses.
cached = dict(model="gpt-4.1", temperature=0, messages=[{"role": "user", "content": "Cache me"}])
first = oa.chat.completions.with_raw_response.create(**cached)
again = oa.chat.completions.with_raw_response.create(**cached)
check("cache miss then hit",
      (first.headers.get("x-sluice-cache"), again.headers.get("x-sluice-cache")) == ("miss", "hit"),
      (first.headers, again.headers))
check("cache hit answers the same", again.parse().choices[0].message.content
      == first.parse().choices[0].message.content and again.parse().usage.total_tokens > 0)
streamed_text = []
for cached_stream in range(2):
    parts = oa.chat.completions.create(**cached, stream=True, stream_options={"include_usage": True})
    chunks = list(parts)
    streamed_text.append("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
    check(f"cached stream {cached_stream} has usage", chunks[-1].usage is not None, chunks[-1])
check("cached stream replays the text", streamed_text[0] and streamed_text[0] == streamed_text[1],
      streamed_text)

an = anthropic.Anthropic(base_url=BASE, api_key=ACME, max_retries=0)
m = an.messages.create(model="claude-sonnet-4.5", max_tokens=32, messages=[{"role": "user", "content": "Hello"}])
check("anthropic messages", m.content[0].text and m.usage.input_tokens > 0, m)

with an.messages.stream(model="claude-sonnet", max_tokens=32, messages=[{"role": "user", "content": "Stream"}]) as s:
    streamed = "".join(s.text_stream)
    final = s.get_final_message()
check("anthropic stream", streamed and final.usage.output_tokens > 0, final)

# Anthropic's token counting, served through the gateway (forwarded: the count is the
# provider's), and the SDK's view of the gateway's own errors under /v1/messages.
counted = an.messages.count_tokens(model="claude-sonnet-4.5", messages=[{"role": "user", "content": "Count me"}])
check("anthropic count_tokens", counted.input_tokens > 0, counted)
try:
    an.messages.batches.list()
    check("anthropic unknown messages path raises", False, "no exception")
except anthropic.NotFoundError as err:
    check("anthropic unknown messages path is not_found_error", err.body["error"]["type"] == "not_found_error"
          and err.request_id, (err.body, err.request_id))
try:
    an.messages.create(model="no-such-model", max_tokens=8, messages=[{"role": "user", "content": "x"}])
    check("anthropic unknown model raises", False, "no exception")
except anthropic.NotFoundError as err:
    check("anthropic gateway error carries request_id", err.request_id is not None, err)

# A default output cap larger than the model produces (the AI SDK's 128000 for Claude) is
# refused as Anthropic refuses it, not reserved from the tenant's tokens per minute.
try:
    # An explicit timeout: the SDK itself refuses a long non-streamed call without one.
    an.messages.create(model="claude-sonnet-4.5", max_tokens=128000, timeout=30,
                       messages=[{"role": "user", "content": "x"}])
    check("anthropic max_tokens over the model's raises", False, "no exception")
except anthropic.BadRequestError as err:
    check("anthropic max_tokens over the model's is invalid_request_error",
          "64000" in str(err.body["error"]["message"]), err.body)

# A client's own organization and project never reach the provider (Sluice's key pays).
org = openai.OpenAI(base_url=f"{BASE}/v1", api_key=ACME, organization="org-client", project="proj-client",
                    max_retries=0)
r = org.chat.completions.create(model="gpt-4.1-mini", messages=[{"role": "user", "content": "Whose bill?"}])
check("openai sdk with organization and project", r.choices[0].message.content, r)

# A provider that breaks off a stream after it started: the gateway's stream relay ends it
# with an error event, which each SDK raises as an API error with the gateway's message, not
# as a transport error (APIConnectionError, RemoteProtocolError).
fault = {"x-mock-fault": "reset"}
received = []
try:
    for c in oa.chat.completions.create(model="gpt-4.1-mini", stream=True, extra_headers=fault,
                                        messages=[{"role": "user", "content": "Break off"}]):
        received.extend(x.delta.content or "" for x in c.choices)
    check("openai broken stream raises", False, "no exception")
except openai.APIConnectionError as err:
    check("openai broken stream is an API error, not a connection error", False, repr(err))
except openai.APIError as err:
    check("openai broken stream raises APIError with the gateway's message",
          received and "before the response was complete" in err.message, (received, err.message))
received = []
try:
    with an.messages.stream(model="claude-sonnet", max_tokens=64, extra_headers=fault,
                            messages=[{"role": "user", "content": "Break off"}]) as s:
        for t in s.text_stream:
            received.append(t)
    check("anthropic broken stream raises", False, "no exception")
except anthropic.APIConnectionError as err:
    check("anthropic broken stream is an API error, not a connection error", False, repr(err))
except anthropic.APIStatusError as err:
    check("anthropic broken stream raises an API error of type api_error",
          received and err.body["error"]["type"] == "api_error", (received, err.body))

models = [x.id for x in an.models.list()]
check("anthropic models list", "claude-sonnet-4.5" in models, models)

try:
    anthropic.Anthropic(base_url=BASE, api_key="sk-ant-wrong", max_retries=0).messages.create(
        model="claude-sonnet-4.5", max_tokens=8, messages=[{"role": "user", "content": "x"}]
    )
    check("anthropic bad key raises", False, "no exception")
except anthropic.AuthenticationError as err:
    check("anthropic bad key raises AuthenticationError", err.status_code == 401, err)

print(f"{len(checks)} SDK checks passed")
