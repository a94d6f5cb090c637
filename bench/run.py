"""make bench: Sluice against plain Envoy, a no-op Proxy-Wasm filter and LiteLLM, side by side.

Loopback only, bounded in time. Every gateway talks to the same fast upstream (an Envoy
direct_response serving a chat completion with usage) with the same request body:
  (a) plain Envoy routing to the upstream            -- the floor
  (b) Envoy + a no-op Proxy-Wasm filter              -- the Proxy-Wasm tax
  (c) Envoy + Sluice, full path (auth, body routing, limits set high, usage on JSON)
  (d) streaming: time to first byte through (a), (c) and (c) without the stream relay, from
      a paced SSE mock, paired request by request (STREAM_PAIRS rounds; --only-streaming)
  (e) LiteLLM proxy with an equivalent key and model (skipped with --no-litellm)
  (f) Portkey's open-source gateway (npm @portkey-ai/gateway, Node.js), proxying to the same
      upstream through its custom-host header (skipped with --no-portkey)
For each: saturation throughput, latency p50/p99/p99.9 at 25% and 50% of (a)'s saturation,
the gateway's CPU microseconds per request (from /proc, robust on a noisy machine) and
peak memory. Several repetitions; medians with min-max spread; ratios against (a).
For (g) also the CPU per request of the quota service and of Redis, and what (g) adds to (c):
latency p50/p99 and Envoy CPU per request, against the targets of issue 14; (c) and (g) are
also measured at 10% of (a)'s saturation, where (g) is far from its own.

With --baseline-wasm PATH (make bench-compare), (c0) is (c) loading another build of Sluice,
e.g. the previous revision: (c0) and (c) run side by side, their repetitions interleaved in
alternating order (c0 c, c c0, ...) so that the machine's drift falls on both alike, and
results.md reports CPU per request and saturation throughput current/baseline.

With --only-global (make bench-global), only (a), (c) and (g), their repetitions interleaved,
and two saturation-only variants that split (g)'s extra Envoy CPU: the probe filter
(bench/noop) making Sluice's host calls, without and with one callout to the quota service.

The response cache, in every full run and alone with --only-cache (make bench-cache): (a) and
(c) again, and (h) and (m), (c) with the cache on for the bench tenant and model, their
repetitions interleaved, all four sending the same body with "temperature": 0. (h) sends that
one body over and over: after a warm-up request every request is a hit, answered by Sluice
from shared data. (m) sends it to a random query string per request (oha --rand-regex-url):
the query string is part of the cache key, so every request is a real miss (lookup, fill
claimed, upstream, response captured and stored) with the same body bytes as (h). Envoy CPU
per request and saturation throughput, and latency p50/p99 at 10% of (a)'s saturation. The
run fails unless (h) was answered from the cache (every request a hit, none upstream) and (m)
missed and stored (every request a miss and upstream, none a hit; a sampled miss is then a
hit). (c) runs without the cache here and everywhere (the demo configuration caches acme's
gpt-4.1 family; the bench strips it), so (m) - (c) is what the cache adds to a miss.

Usage: run.py OUT_DIR [--reps N] [--seconds S] [--no-litellm] [--no-portkey]
              [--only-ablation | --only-global | --only-cache | --only-streaming] [--cache-seconds S]
              [--baseline-wasm PATH [--baseline-label TEXT]]
"""
import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import cluster_config  # noqa: E402  (the one home of the `global` section and the sluice_quota cluster)
VENV = ROOT / ".venv"
ENVOY = VENV / "bin" / "envoy"
WASM = ROOT / "target/wasm32-wasip1/release/sluice.wasm"
RELAY = ROOT / "target/release/libsluice_relay.so"
NOOP_WASM = ROOT / "target/wasm32-wasip1/release/sluice_bench_noop.wasm"
MOCK = ROOT / "target/release/sluice-mock"
QUOTA = ROOT / "target/release/sluice-quota"
CLK_TCK = os.sysconf("SC_CLK_TCK")
KEY = "sk-sluice-demo-acme"
BODY = json.dumps(
    {
        "model": "gpt-4.1-mini",
        "max_tokens": 64,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Summarise the benefits of running an LLM gateway inside Envoy."},
        ],
    }
)
# The cache configurations' request: BODY, deterministic (temperature 0), so cacheable.
CACHE_BODY = json.dumps(dict(json.loads(BODY), temperature=0))
# (h) and (m): the gold tier caches the bench model; hits are free. The store is the default.
CACHE_RULE = {"models": ["gpt-4.1-mini"], "ttl_s": 3600, "max_entry_bytes": 65536, "max_temperature": 0,
              "hit_price": 0, "wait_ms": 30000}
CACHE_STORE = {"engine": "local", "slots": 1024}
UPSTREAM_BODY = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-4.1-mini",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Envoy gateways are fast. " * 8},
             "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 31, "completion_tokens": 48, "total_tokens": 79,
                  "prompt_tokens_details": {"cached_tokens": 0},
                  "completion_tokens_details": {"reasoning_tokens": 0}},
    }
)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def need(path, how):
    if not Path(path).exists():
        sys.exit(f"bench: {path} is missing: {how}")


def wait_http(url, seconds=30):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status < 500:
                    return
        except Exception:
            time.sleep(0.1)
    raise RuntimeError(f"{url} not ready")


class Proc:
    """A child process started in its own session, killed with its children."""

    def __init__(self, args, log, env=None, cwd=ROOT):
        self.log = open(log, "w")
        self.p = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                  start_new_session=True)

    def cpu_ticks(self):
        """User + system ticks of the process and all its descendants."""
        total = 0
        for pid in [self.p.pid] + descendants(self.p.pid):
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
            except (FileNotFoundError, IndexError, ValueError):
                pass
        return total

    def peak_rss_kb(self):
        total = 0
        for pid in [self.p.pid] + descendants(self.p.pid):
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1])
            except FileNotFoundError:
                pass
        return total

    def stop(self):
        if self.p.returncode is not None and self.log.closed:
            return  # stopped before
        try:
            os.killpg(self.p.pid, signal.SIGTERM)
            self.p.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()


def descendants(pid):
    out = []
    for child in Path("/proc").iterdir():
        if not child.name.isdigit():
            continue
        try:
            ppid = int((child / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, IndexError, ValueError):
            continue
        if ppid == pid:
            out.append(int(child.name))
            out.extend(descendants(int(child.name)))
    return out


def envoy_yaml(listen, admin, filters, clusters, routes_to, extra=""):
    return f"""
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}
{extra}
static_resources:
  listeners:
  - name: bench
    address: {{socket_address: {{address: 127.0.0.1, port_value: {listen}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                {routes_to}
          http_filters:
{filters}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
              suppress_envoy_headers: true
  clusters:
{clusters}
"""


def wait_tcp(port, what, seconds=30):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} on port {port} not ready")


def redis_server():
    """redis-server as the tests find it: $SLUICE_REDIS_SERVER, else the one on PATH."""
    path = os.environ.get("SLUICE_REDIS_SERVER") or shutil.which("redis-server")
    if not path:
        sys.exit("bench: redis-server not found: run `make redis` (or set SLUICE_REDIS_SERVER)")
    return path


class GlobalEngine:
    """(g)'s engine on this machine: one sluice-quota process and its private redis-server.

    Redis runs without persistence (--save "" --appendonly no): no fork for snapshots and no
    append-only file written per command, so the bench measures the decisions and not the
    disk. A production Redis keeps AOF on (appendfsync everysec), which costs Redis more."""

    def __init__(self, tmp):
        data = Path(tmp) / "redis"
        data.mkdir(exist_ok=True)
        self.redis_port, self.quota_port = free_port(), free_port()
        exe = redis_server()
        version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
        self.redis_version = next((f"Redis {w[2:]}" for w in version.split() if w.startswith("v=")), version.strip())
        self.redis = Proc([exe, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
                           "--appendonly", "no", "--dir", str(data), "--logfile", ""], Path(tmp) / "redis.log")
        self.quota = None
        try:
            wait_tcp(self.redis_port, "redis-server")
            self.quota = Proc([str(QUOTA), "--listen", f"127.0.0.1:{self.quota_port}",
                               "--redis", f"redis://127.0.0.1:{self.redis_port}/"], Path(tmp) / "quota.log")
            # 200 only once the service reaches Redis.
            wait_http(f"http://127.0.0.1:{self.quota_port}/healthz")
        except BaseException:
            self.stop()
            raise

    def procs(self):
        """The processes whose CPU (g) also reports, by name."""
        return {"quota": self.quota, "redis": self.redis}

    def stop(self):
        for p in (self.quota, self.redis):
            if p is not None:
                p.stop()


def envoy_stats(admin, pattern):
    """Envoy's counters whose names match `pattern` (a regex), as name -> int."""
    query = urllib.parse.quote(pattern, safe="")
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats?usedonly&filter={query}", timeout=5).read().decode()
    out = {}
    for line in text.strip().splitlines():
        name, _, value = line.partition(": ")
        if value.strip().isdigit():
            out[name] = int(value)
    return out


def redis_script_calls(port):
    """Scripts Redis ran (EVALSHA and EVAL), from INFO commandstats (one RESP bulk string)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(b"*2\r\n$4\r\nINFO\r\n$12\r\ncommandstats\r\n")
        data = b""
        while b"\r\n" not in data or len(data) < data.index(b"\r\n") + 2 + int(data[1:data.index(b"\r\n")]):
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
    total = 0
    for line in data.decode(errors="replace").splitlines():
        if line.startswith(("cmdstat_evalsha:", "cmdstat_eval:")):
            total += int(line.split("calls=")[1].split(",")[0])
    return total


def check_global_calls(admin, redis_port):
    """Fails the run unless (g)'s requests were decided by the quota service: Redis ran at
    least one script per successful request (its admission; settlements run on top). The
    filter groups the admissions a worker has waiting into one call, so there are fewer
    calls than requests under load. Calls that failed or timed out, and requests that got
    no 2xx (refused when the quota service did not answer in time), are counted and reported."""
    stats = envoy_stats(admin, "^(cluster\\.sluice_quota\\.upstream_rq_.*|http\\.sluice\\.downstream_rq_[0-9]xx)$")
    requests = stats.get("http.sluice.downstream_rq_2xx", 0)
    calls = stats.get("cluster.sluice_quota.upstream_rq_2xx", 0)
    scripts = redis_script_calls(redis_port)
    failures = {k.rsplit(".", 1)[1]: v for k, v in stats.items() if v and k.startswith("cluster.sluice_quota.upstream_rq_")
                and (k[-3:] in ("4xx", "5xx") or "timeout" in k or "reset" in k or "cancelled" in k)}
    # A call that times out or is reset is answered 504/503 by Envoy, so 4xx + 5xx counts every
    # failed call once; the other counters say why.
    failed = failures.get("upstream_rq_4xx", 0) + failures.get("upstream_rq_5xx", 0)
    other = sum(v for k, v in stats.items() if k.startswith("http.sluice.downstream_rq_") and not k.endswith("2xx"))
    summary = {"requests_2xx": requests, "requests_other": other, "quota_calls_2xx": calls, "quota_calls_failed": failed,
               "quota_call_failures": failures, "redis_scripts": scripts}
    if requests == 0 or scripts < requests:
        sys.exit(f"bench: (g) was not decided by the quota service: {summary}")
    print(f"bench: (g) made {calls} answered quota service calls for {requests} requests; "
          f"{failed} calls failed, {other} requests not 2xx", flush=True)
    if failed or other:
        print("bench: WARNING: (g) had failed quota calls or refused requests (results.md says so)", flush=True)
    return summary


def upstream_yaml(port, admin):
    """The fast upstream: an Envoy direct_response with a chat completion and usage.

    It reads each request to its end before answering. Answering a POST before its body
    has arrived makes an HTTP/1.1 server close the connection, and every gateway then
    paid a new upstream connection per request, unlike with a real provider."""
    buffer = """          - name: envoy.filters.http.buffer
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer
              max_request_bytes: 1048576
"""
    yaml = envoy_yaml(port, admin, buffer, "  []", f"""direct_response:
                  status: 200
                  body: {{inline_string: {json.dumps(UPSTREAM_BODY)}}}
                response_headers_to_add: [{{header: {{key: content-type, value: application/json}}}}]""")
    return yaml.replace("  clusters:\n  []", "  clusters: []")


def assert_upstream_connections_reused(admin):
    """Fails the run if the gateways opened a connection per request to the upstream (the
    flaw upstream_yaml avoids): that cost would be measured as every gateway's own."""
    stats = urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats?filter=^http\\.bench\\.downstream_(cx|rq)_total$",
                                   timeout=5).read().decode()
    values = dict(line.split(": ") for line in stats.strip().splitlines())
    cx, rq = int(values["http.bench.downstream_cx_total"]), int(values["http.bench.downstream_rq_total"])
    if cx * 100 > rq:
        sys.exit(f"bench: the upstream saw {cx} connections for {rq} requests: connections are not reused")
    print(f"bench: upstream connections reused ({cx} connections, {rq} requests)", flush=True)


def cluster(name, port):
    return f"""  - name: {name}
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: {name}
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}}}]}}]
"""


def noop_filter():
    return f"""          - name: envoy.filters.http.wasm
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: noop
                root_id: noop
                failure_policy: FAIL_CLOSED
                vm_config:
                  vm_id: noop
                  runtime: envoy.wasm.runtime.v8
                  code: {{local: {{filename: {NOOP_WASM}}}}}
"""


# The gold tier's limits in (c) and (g): all checked and settled, set so high that they never
# reject. Tokens per minute stays within what a global rate can count exactly (rate x burst
# x 60 parts at most 2^52: 75,000,000,000 per minute at burst 1), so that (g) can take the
# very same limits.
HIGH_LIMITS = {"requests_per_minute": 1_000_000_000, "tokens_per_minute": 10_000_000_000,
               "concurrent_requests": 1_000_000}
# (g): every tenant limit global, none of the providers' (the demo's providers have none).
GLOBAL_SECTION = cluster_config.global_section(timeout_ms=50, limits=cluster_config.LIMITS, provider_limits=[])


def sluice_yaml(tmp, listen, admin, upstream_port, access_log=True, limits=True, wasm=WASM, quota_port=None,
                cache=None, relay=True, source=None):
    """The demo configuration, pointed at the bench upstream, limits out of the way, loading
    the Sluice build at `wasm`. The ablation variants drop the access log (Envoy's work) and
    the limits (shared data). With `quota_port`, (g): the same plus the `global` section and
    the sluice_quota cluster, added by scripts/cluster_config.py as for a real cluster.
    Without the response cache (the demo's gold tier has one), unless `cache` gives the gold
    tier's rule: (h) and (m), with the store CACHE_STORE. Without `relay`, the stream relay's
    filter is cut out (streams then go through Envoy's router, as before the relay). `source`:
    another revision's demo configuration (a baseline build needs the configuration it knew)."""
    text = (source or ROOT / "envoy/demo.yaml").read_text()
    for old, new in [("port_value: 9901", f"port_value: {admin}"), ("port_value: 10000", f"port_value: {listen}"),
                     ("filename: target/wasm32-wasip1/release/sluice.wasm", f"filename: {wasm}"),
                     ("path: .run/access.log", f"path: {tmp}/access.log")]:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    for port in (18001, 18002, 18003, 18004, 18005):
        text = text.replace(f"port_value: {port}", f"port_value: {upstream_port}")
    lines = text.splitlines()
    at = lines.index(next(l for l in lines if l.strip() == "value: |")) + 1
    indent = len(lines[at]) - len(lines[at].lstrip())
    end = at
    while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) >= indent):
        end += 1
    cfg = json.loads("\n".join(lines[at:end]))
    cfg["tiers"]["gold"]["limits"] = dict(HIGH_LIMITS) if limits else {}
    cfg["tiers"]["gold"].pop("cache", None)
    # The demo's provider capacity (a queue at 8 in flight) would turn saturation into queueing.
    for provider in cfg["providers"]:
        provider.pop("max_in_flight", None)
    if cache is not None:
        assert "cache_store" not in cfg
        cfg["tiers"]["gold"]["cache"] = dict(cache)
        cfg["cache_store"] = dict(CACHE_STORE)
    lines[at:end] = [" " * indent + json.dumps(cfg)]
    text = "\n".join(lines) + "\n"
    if not relay:
        start = text.index("          - name: sluice_relay\n")
        end = text.index("          - name: envoy.filters.http.router\n")
        text = text[:start] + text[end:]
    if not access_log:
        start = text.index("          access_log:")
        end = text.index("          route_config:")
        text = text[:start] + text[end:]
    if quota_port is not None:
        text = cluster_config.generate(text, "bench/run.py's (c)", quota_port=quota_port, section=GLOBAL_SECTION)
    return text


# The host calls Sluice makes on the bench request, as the probe filter's plan (bench/noop):
# gold tier, 3 limits taken at admission, 2 settled (requests/min needs no settlement),
# 4 request headers set (2 removals fewer since 2026-12-01), 5 metric updates.
SLUICE_CALLS = ("body=1 header_map=1 body_header_set=4 shared=5 metric=5 time=4 "
                "response_header_get=2 response_header_set=6 response_body=1 property=1")


def probe_in_sluice_config(tmp, port, admin, upstream_port, plan, quota_port=None):
    """Configuration (c) with the probe filter (bench/noop) in Sluice's place, making the
    host calls of `plan`. With `quota_port`, also the sluice_quota cluster (for `callout`)."""
    text = sluice_yaml(tmp, port, admin, upstream_port)
    assert text.count(str(WASM)) == 1
    text = text.replace(str(WASM), str(NOOP_WASM))
    lines = text.splitlines()
    at = lines.index(next(l for l in lines if l.strip() == "value: |")) + 1
    lines[at - 1] = lines[at - 1].replace("value: |", f'value: "{plan}"')
    del lines[at]  # sluice_yaml put the whole JSON configuration on this one line
    text = "\n".join(lines) + "\n"
    if quota_port is not None:
        text = cluster_config.add_quota_cluster(text, "127.0.0.1", quota_port, "STATIC", "the probe's configuration")
    return text


ENV = dict(os.environ, OPENAI_API_KEY="sk-bench", OPENAI_API_KEY_B="sk-bench", ANTHROPIC_API_KEY="sk-bench",
           DEEPSEEK_API_KEY="sk-bench", GEMINI_API_KEY="sk-bench")


def start_envoy(tmp, name, yaml, admin, concurrency=1, extra_args=()):
    path = Path(tmp) / f"{name}.yaml"
    path.write_text(yaml)
    proc = Proc([str(ENVOY), "-c", str(path), "--concurrency", str(concurrency), "--disable-hot-restart",
                 "--log-level", "warn", "--base-id", str(free_port()), *extra_args], Path(tmp) / f"{name}.log",
                env=ENV)
    wait_http(f"http://127.0.0.1:{admin}/ready")
    return proc


def oha(url, seconds, conns, rate=None, headers=(), body=BODY, url_regex=False):
    """One oha run. With `url_regex`, `url` is a regex each request's URL is drawn from."""
    if len(body) > 65536:
        # Too long for a command line: oha reads it from a file.
        path = Path(tempfile.gettempdir()) / f"sluice-bench-body-{hashlib.sha256(body.encode()).hexdigest()[:16]}.json"
        path.write_text(body)
        given = ["-D", str(path)]
    else:
        given = ["-d", body]
    args = [OHA, "-z", f"{seconds}s", "-c", str(conns), "--no-tui", "--output-format", "json", "-m", "POST",
            "-H", "content-type: application/json", *given]
    for h in headers:
        args += ["-H", h]
    if rate:
        args += ["-q", str(rate)]
    if url_regex:
        args += ["--rand-regex-url"]
    out = subprocess.run(args + [url], capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def measure(gateway, url, headers, seconds, reps, rates, extras=None, request=None, saturation=True):
    """Saturation runs (throughput, CPU/request) and fixed-rate runs (latency), `reps` of
    each; without `saturation`, only the fixed-rate runs. `extras` maps a name to another
    process serving the gateway (the quota service, Redis): its CPU per request is reported
    as `<name>_cpu_us_per_req`. `request` is more of oha()'s arguments (`body`, `url_regex`)."""
    extras = extras or {}
    request = request or {}
    sat = []
    for _ in range(reps if saturation else 0):
        t0 = gateway.cpu_ticks()
        e0 = {n: p.cpu_ticks() for n, p in extras.items()}
        r = oha(url, seconds, 32, headers=headers, **request)
        if extras:
            # The last requests' settlements leave on the next 10 ms tick: count them too.
            time.sleep(0.1)
        ticks = gateway.cpu_ticks() - t0
        extra_ticks = {n: p.cpu_ticks() - e0[n] for n, p in extras.items()}
        ok = sum(v for k, v in r["statusCodeDistribution"].items() if k.startswith("2"))
        total = sum(r["statusCodeDistribution"].values())
        sat.append({"rps": r["summary"]["requestsPerSec"], "ok": ok, "total": total,
                    "cpu_us_per_req": ticks * 1e6 / CLK_TCK / max(ok, 1)})
        for n, t in extra_ticks.items():
            sat[-1][f"{n}_cpu_us_per_req"] = t * 1e6 / CLK_TCK / max(ok, 1)
    lat = {}
    for label, rate in rates.items():
        runs = []
        for _ in range(reps):
            r = oha(url, seconds, 32, rate=rate, headers=headers, **request)
            p = r["latencyPercentiles"]
            runs.append({"p50_us": p["p50"] * 1e6, "p99_us": p["p99"] * 1e6, "p999_us": p["p99.9"] * 1e6,
                         "ok_ratio": sum(v for k, v in r["statusCodeDistribution"].items() if k.startswith("2"))
                         / max(sum(r["statusCodeDistribution"].values()), 1)})
        lat[label] = runs
    out = {"saturation": sat, "latency": lat, "peak_rss_kb": gateway.peak_rss_kb()}
    for n, p in extras.items():
        out[f"{n}_peak_rss_kb"] = p.peak_rss_kb()
    return out


def measure_interleaved(gateways, headers, seconds, reps, rates, saturation_only=()):
    """measure() for several gateways running side by side, repetition by repetition: each
    repetition runs every gateway once, in an order rotated by one per repetition (for two:
    A B, B A, A B, ...; for three: A B C, B C A, C A B, ...), so that a slow drift of the
    machine falls on all of them alike. `gateways` maps a name to (gateway, url) or
    (gateway, url, extras) (measure()'s `extras`); the gateways named in `saturation_only`
    skip the fixed-rate runs. A fourth member, (gateway, url, extras, request), is measure()'s
    `request`. Returns name -> measure()'s result, plus the order of each repetition."""
    names = list(gateways)
    results = {n: {"saturation": [], "latency": {label: [] for label in rates}} for n in names}
    orders = []

    def run(n, rates):
        gw, url, *extras = gateways[n]
        # A fixed-rate run is that run alone (no saturation run before it).
        return measure(gw, url, headers, seconds, 1, rates, extras[0] if extras else None,
                       extras[1] if len(extras) > 1 else None, saturation=not rates)

    for i in range(reps):
        order = names[i % len(names):] + names[:i % len(names)]
        orders.append(order)
        for n in order:
            results[n]["saturation"] += run(n, {})["saturation"]
    for label, rate in rates.items():
        for i in range(reps):
            for n in orders[i]:
                if n not in saturation_only:
                    results[n]["latency"][label] += run(n, {label: rate})["latency"][label]
    for n in saturation_only:
        del results[n]["latency"]
    for n in names:
        gw, _, *extras = gateways[n]
        results[n]["peak_rss_kb"] = gw.peak_rss_kb()
        for e, p in ((extras[0] if extras else None) or {}).items():
            results[n][f"{e}_peak_rss_kb"] = p.peak_rss_kb()
    return results, orders


def med(values):
    return statistics.median(values)


def spread(values):
    return f"{min(values):.0f}-{max(values):.0f}"


STREAM_PAIRS = 100


def ttfb_once(url, headers):
    """Time to first byte and to last byte (µs) of one paced SSE stream (10 chunks 5 ms
    apart), via curl: a new connection, as a client's first request."""
    body = json.dumps({"model": "gpt-4.1-mini", "stream": True, "messages": [{"role": "user", "content": "stream"}]})
    args = ["curl", "-s", "-o", "/dev/null", "-w", "%{time_starttransfer} %{time_total}", url,
            "-H", "content-type: application/json", "-H", "x-mock-chunks: 10", "-H", "x-mock-chunk-delay-ms: 5",
            "-d", body]
    for h in headers:
        args += ["-H", h]
    a, b = subprocess.run(args, capture_output=True, text=True, check=True).stdout.split()
    return float(a) * 1e6, float(b) * 1e6


def ttfb_paired(targets, n):
    """(d): `n` rounds; each round sends one stream through every gateway of `targets` (name
    -> (url, headers)), in an order rotated each round, so that each gateway's i-th request
    is paired with the others' i-th, sent moments apart. Returns per gateway the median time
    to first and last byte, and the median over rounds of its first byte minus the first
    gateway's (the added time to first byte)."""
    names = list(targets)
    first = {name: [] for name in names}
    total = {name: [] for name in names}
    for i in range(n):
        for name in names[i % len(names):] + names[:i % len(names)]:
            a, b = ttfb_once(*targets[name])
            first[name].append(a)
            total[name].append(b)
    base = names[0]
    out = {}
    for name in names:
        added = [x - y for x, y in zip(first[name], first[base])]
        out[name] = {"ttfb_us": med(first[name]), "total_us": med(total[name]), "added_ttfb_us": med(added),
                     "added_ttfb_p25_p75_us": [statistics.quantiles(added, n=4)[0], statistics.quantiles(added, n=4)[2]],
                     "pairs": n}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--no-litellm", action="store_true")
    ap.add_argument("--no-portkey", action="store_true")
    only = ap.add_mutually_exclusive_group()
    only.add_argument("--only-ablation", action="store_true", help="(a), (c) and the ablation only")
    only.add_argument("--only-global", action="store_true",
                      help="(a), (c) and (g) only, their repetitions interleaved (make bench-global)")
    only.add_argument("--only-streaming", action="store_true",
                      help="(d) only: time to first byte through (a), (c) and (c) without the relay, paired")
    only.add_argument("--only-cache", action="store_true",
                      help="the response cache only: (a), (c), (h) and (m) interleaved (make bench-cache)")
    ap.add_argument("--cache-seconds", type=int, metavar="S",
                    help=f"seconds per run of the cache group (default: --seconds with --only-cache, "
                         f"else {CACHE_SECONDS_IN_FULL_RUN})")
    ap.add_argument("--baseline-wasm", type=Path, metavar="PATH",
                    help="also measure (c0): (c) loading this Sluice build, interleaved with (c), and compare")
    ap.add_argument("--baseline-label", metavar="TEXT", help="what the baseline build is (default: its path)")
    ap.add_argument("--baseline-config", type=Path, metavar="PATH",
                    help="the demo configuration the baseline build is run with (default: envoy/demo.yaml)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path, how in [(ENVOY, "run `make envoy`"), (WASM, "run `make wasm`"), (RELAY, "run `make relay`"), (MOCK, "run `make mock`"),
                      (OHA, "run `make bench` (installs oha)")]:
        need(path, how)
    if not (args.only_global or args.only_cache):
        need(NOOP_WASM, "run `make bench`")
    # (g) runs in `make bench` and `make bench-global`, not in the ablation-only or cache-only runs.
    with_global = not (args.only_ablation or args.only_cache or args.only_streaming)
    # The cache group runs in `make bench` and `make bench-cache`.
    with_cache = not (args.only_ablation or args.only_global or args.only_streaming)
    if with_global:
        need(QUOTA, "run `make quota`")
        redis_server()
    builds = None
    if args.baseline_wasm:
        args.baseline_wasm = args.baseline_wasm.resolve()
        need(args.baseline_wasm, "build it (`make bench-compare BASE=<revision>` does)")
        # Taken now, before the runs: what each of the two gateways will load.
        builds = {"baseline": {"config": "c0_sluice_baseline", "wasm": str(args.baseline_wasm),
                               "label": args.baseline_label or str(args.baseline_wasm),
                               "sha256": sha256(args.baseline_wasm)},
                  "current": {"config": "c_sluice", "wasm": str(WASM), "label": current_label(), "sha256": sha256(WASM)}}
    tmp = tempfile.mkdtemp(prefix="sluice-bench-")
    procs = []
    results = {"machine": machine(), "reps": args.reps, "seconds": args.seconds, "configs": {}}
    try:
        up_port, up_admin = free_port(), free_port()
        procs.append(start_envoy(tmp, "upstream", upstream_yaml(up_port, up_admin), up_admin))
        mock_port = free_port()
        procs.append(Proc([str(MOCK), "--provider", f"openai,openai,127.0.0.1:{mock_port},/v1,OPENAI_API_KEY"],
                          Path(tmp) / "mock.log", env=ENV))
        wait_http(f"http://127.0.0.1:{mock_port}/__mock/requests")

        def gateway(kind, upstream_port):
            port, admin = free_port(), free_port()
            if kind == "sluice":
                yaml = sluice_yaml(tmp, port, admin, upstream_port)
            elif kind == "sluice-global":
                yaml = sluice_yaml(tmp, port, admin, upstream_port, quota_port=engine.quota_port)
            elif kind == "probe":
                yaml = probe_in_sluice_config(tmp, port, admin, upstream_port, PROBE_PLAN)
            elif kind == "probe-callout":
                yaml = probe_in_sluice_config(tmp, port, admin, upstream_port, PROBE_PLAN + " callout=1",
                                              quota_port=engine.quota_port)
            elif kind == "sluice-baseline":
                yaml = sluice_yaml(tmp, port, admin, upstream_port, wasm=args.baseline_wasm,
                                   source=args.baseline_config)
            elif kind == "sluice-cache":
                yaml = sluice_yaml(tmp, port, admin, upstream_port, cache=CACHE_RULE)
            elif kind == "sluice-norelay":
                yaml = sluice_yaml(tmp, port, admin, upstream_port, relay=False)
            elif kind == "sluice-nolog":
                yaml = sluice_yaml(tmp, port, admin, upstream_port, access_log=False)
            elif kind == "sluice-nolog-nolimits":
                yaml = sluice_yaml(tmp, port, admin, upstream_port, access_log=False, limits=False)
            else:
                filters = noop_filter() if kind == "noop" else ""
                yaml = envoy_yaml(port, admin, filters, cluster("upstream", upstream_port),
                                  "route: {cluster: upstream, timeout: 60s}")
            gw = start_envoy(tmp, f"{kind}-{upstream_port}", yaml, admin)
            gw.admin = admin
            procs.append(gw)  # stopped by the caller; here in case of an error
            return gw, f"http://127.0.0.1:{port}"

        rates = None
        auth = [f"authorization: Bearer {KEY}"]
        group = {}  # gateways measured interleaved with (c): (a) with --only-global, (c0), (g)
        if args.only_cache:
            # Only the rate probe on (a): the cache group measures (a) itself.
            gw, base = gateway("plain", up_port)
            results["rate_probe_rps"] = measure(gw, f"{base}/v1/chat/completions", auth, args.seconds, 1,
                                                {})["saturation"][0]["rps"]
            gw.stop()
        main_configs = [] if (args.only_cache or args.only_streaming) else [("a_plain_envoy", "plain"), ("b_noop_wasm", "noop"),
                                                   ("c_sluice", "sluice")]
        for name, kind in main_configs:
            if (args.only_ablation or args.only_global) and kind == "noop":
                continue
            gw, base = gateway(kind, up_port)
            url = f"{base}/v1/chat/completions"
            if rates is None:
                probe = measure(gw, url, auth, args.seconds, 1, {})
                sat = probe["saturation"][0]["rps"]
                rates = {"25%": max(int(sat * 0.25), 1), "50%": max(int(sat * 0.5), 1)}
                results["rates"] = rates
                results["rate_probe_rps"] = sat
            if kind == "plain" and args.only_global:
                group[name] = (gw, url)  # kept up, measured with (c) and (g)
                continue
            if kind == "sluice" and (args.baseline_wasm or with_global):
                # (c) side by side with (c0) (listed first) and (g), repetitions interleaved.
                if args.baseline_wasm:
                    base_gw, base_base = gateway("sluice-baseline", up_port)
                    group["c0_sluice_baseline"] = (base_gw, f"{base_base}/v1/chat/completions")
                group[name] = (gw, url)
                if with_global:
                    engine = GlobalEngine(tmp)
                    procs += [engine.redis, engine.quota]
                    g_gw, g_base = gateway("sluice-global", up_port)
                    group["g_sluice_global"] = (g_gw, f"{g_base}/v1/chat/completions", engine.procs())
                probes = ()
                if args.only_global:
                    # Where (g)'s extra Envoy CPU goes: the probe filter making Sluice's host
                    # calls, without and with one admission-shaped callout to the quota service.
                    for pname, pkind in PROBES.items():
                        p_gw, p_base = gateway(pkind, up_port)
                        group[pname] = (p_gw, f"{p_base}/v1/chat/completions")
                    probes = tuple(PROBES)
                group_rates = rates
                if with_global:
                    # Also a rate low enough that (g), which shares the 2 cores with the quota
                    # service and Redis, is far from saturation: the round trip without queueing.
                    group_rates = {"10%": max(int(results["rate_probe_rps"] * 0.1), 1), **rates}
                    results["global_rates"] = group_rates
                print(f"bench: {', '.join(group)}, interleaved ...", flush=True)
                measured, orders = measure_interleaved(group, auth, args.seconds, args.reps, group_rates, probes)
                breakdown = {n: measured.pop(n) for n in probes}
                results["configs"].update(measured)
                if args.baseline_wasm:
                    results["compare"] = dict(builds, orders=orders)
                    for key in ("cpu_us_per_req", "rps"):
                        results["compare"][f"{key}_ratio"] = (med([x[key] for x in measured[name]["saturation"]])
                                                              / med([x[key] for x in measured["c0_sluice_baseline"]["saturation"]]))
                if with_global:
                    results["global"] = {"orders": orders, "section": GLOBAL_SECTION, "limits": HIGH_LIMITS,
                                         "redis": engine.redis_version + " (--save '' --appendonly no)",
                                         "calls": check_global_calls(g_gw.admin, engine.redis_port)}
                    if breakdown:
                        results["global"]["breakdown"] = dict(breakdown, plan=PROBE_PLAN)
                    g_gw.stop()
                    engine.stop()
                for other in group.values():
                    other[0].stop()
            else:
                print(f"bench: {name} ...", flush=True)
                results["configs"][name] = measure(gw, url, auth, args.seconds, args.reps, rates)
            gw.stop()

        if not (args.only_global or args.only_cache or args.only_streaming):
            # Ablation of (c): CPU per request without Envoy's access log, then without limits.
            ablation = {}
            for name, kind in [("c1_sluice_no_access_log", "sluice-nolog"),
                               ("c2_sluice_no_access_log_no_limits", "sluice-nolog-nolimits")]:
                gw, base = gateway(kind, up_port)
                print(f"bench: {name} ...", flush=True)
                ablation[name] = measure(gw, f"{base}/v1/chat/completions", auth, args.seconds, args.reps, {})
                gw.stop()
            results["ablation"] = ablation
        if with_cache:
            seconds = args.cache_seconds or (args.seconds if args.only_cache else CACHE_SECONDS_IN_FULL_RUN)
            results["cache"] = cache_group(gateway, up_port, auth, seconds, args.reps,
                                           max(int(results["rate_probe_rps"] * 0.1), 1))
        if not args.only_streaming:
            assert_upstream_connections_reused(up_admin)

        if not (args.only_global or args.only_cache):
            # (d) streaming through (a), (c) and (c) without the stream relay, from the paced
            # mock, paired request by request.
            targets, gws = {}, []
            for name, kind in [("a_plain_envoy", "plain"), ("c_sluice", "sluice"),
                               ("c_sluice_without_relay", "sluice-norelay")]:
                gw, base = gateway(kind, mock_port)
                gws.append(gw)
                # Plain Envoy forwards the client's header, so it carries the mock's own key.
                headers = auth if kind != "plain" else ["authorization: Bearer sk-bench"]
                targets[name] = (f"{base}/v1/chat/completions", headers)
            print(f"bench: (d) streaming, {STREAM_PAIRS} paired rounds ...", flush=True)
            results["streaming"] = ttfb_paired(targets, STREAM_PAIRS)
            for gw in gws:
                gw.stop()

        peers = not (args.only_ablation or args.only_global or args.only_cache or args.only_streaming)
        if peers and not args.no_litellm:
            results["configs"]["e_litellm"] = litellm(tmp, up_port, args)
        if peers and not args.no_portkey:
            results["configs"]["f_portkey"] = portkey(tmp, up_port, args)
    finally:
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    report(results, out)


def litellm(tmp, upstream_port, args):
    # Its own virtualenv: LiteLLM pins versions of the SDKs the tests use.
    exe = ROOT / ".venv-litellm" / "bin" / "litellm"
    need(exe, "run `make bench` (installs litellm[proxy])")
    port = free_port()
    cfg = Path(tmp) / "litellm.yaml"
    cfg.write_text(f"""model_list:
  - model_name: gpt-4.1-mini
    litellm_params:
      model: openai/gpt-4.1-mini
      api_base: http://127.0.0.1:{upstream_port}/v1
      api_key: sk-bench
general_settings:
  master_key: {KEY}
litellm_settings:
  drop_params: true
""")
    env = dict(ENV, LITELLM_LOG="ERROR", LITELLM_TELEMETRY="False")
    proc = Proc([str(exe), "--config", str(cfg), "--port", str(port), "--host", "127.0.0.1", "--num_workers", "1"],
                Path(tmp) / "litellm.log", env=env)
    try:
        wait_http(f"http://127.0.0.1:{port}/health/liveliness", seconds=120)
        print("bench: e_litellm ...", flush=True)
        # Saturation only: it saturates far below the fixed rates, which would only queue.
        return measure(proc, f"http://127.0.0.1:{port}/v1/chat/completions", [f"authorization: Bearer {KEY}"],
                       args.seconds, args.reps, {})
    finally:
        proc.stop()


PORTKEY = ROOT / ".tools/portkey/node_modules/@portkey-ai/gateway/build/start-server.js"


def portkey(tmp, upstream_port, args):
    """(f): Portkey's gateway, one Node.js process. It has no configuration file for this:
    each request names the provider and the upstream in headers, and carries the upstream's
    own key (Portkey checks no key of its own and enforces no limit)."""
    need(PORTKEY, "run `make bench` (installs @portkey-ai/gateway with npm)")
    port = free_port()
    proc = Proc(["node", str(PORTKEY), f"--port={port}", "--headless"], Path(tmp) / "portkey.log",
                env=dict(ENV, NODE_ENV="production"))
    try:
        wait_http(f"http://127.0.0.1:{port}/", seconds=60)
        print("bench: f_portkey ...", flush=True)
        headers = ["authorization: Bearer sk-bench", "x-portkey-provider: openai",
                   f"x-portkey-custom-host: http://127.0.0.1:{upstream_port}/v1"]
        # Saturation only, as (e).
        return measure(proc, f"http://127.0.0.1:{port}/v1/chat/completions", headers, args.seconds, args.reps, {})
    finally:
        proc.stop()


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def current_label():
    """The working tree's revision, "+dirty" when it has changes (best effort)."""
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        rev = git("rev-parse", "--short", "HEAD").strip()
        return f"working tree at {rev}" + ("+dirty" if git("status", "--porcelain", "--untracked-files=no").strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "working tree"


def compare_lines(results):
    """results.md's before/after section: (c0) baseline build vs (c) current build."""
    c = results["compare"]
    base = results["configs"][c["baseline"]["config"]]["saturation"]
    cur = results["configs"][c["current"]["config"]]["saturation"]
    rows = []
    for label, key, fmt in (("CPU us/request", "cpu_us_per_req", ".1f"), ("saturation req/s", "rps", ".0f")):
        b, k = [x[key] for x in base], [x[key] for x in cur]
        # Repetition i of each ran back to back: the ratio of each such pair shows the noise.
        paired = [y / x for x, y in zip(b, k)]
        rows.append(f"| {label} | {med(b):{fmt}} [{min(b):{fmt}}-{max(b):{fmt}}] | {med(k):{fmt}} [{min(k):{fmt}}-{max(k):{fmt}}] | "
                    f"**{med(k) / med(b):.3f}** | {med(paired):.3f} [{min(paired):.3f}-{max(paired):.3f}] |")
    same = " (byte-identical builds)" if c["baseline"]["sha256"] == c["current"]["sha256"] else ""
    return [
        "",
        f"Before/after, same run: (c0) c0_sluice_baseline = {c['baseline']['label']} "
        f"(sha256 {c['baseline']['sha256'][:12]}) vs (c) c_sluice = {c['current']['label']} "
        f"(sha256 {c['current']['sha256'][:12]}){same}. Both gateways up side by side, {results['reps']} saturation "
        "repetitions interleaved in alternating order (" + ", ".join(
            " ".join("c0" if n == c["baseline"]["config"] else "c" for n in o) for o in c["orders"]) + "); "
        "medians with min-max. Ratio above 1 means the current build costs more CPU (or serves more req/s).",
        "",
        "| metric | baseline (c0) | current (c) | current / baseline (medians) | current / baseline per repetition pair |",
        "|---|---|---|---|---|",
    ] + rows


# --only-global's breakdown of (g)'s Envoy CPU: the probe filter in (c)'s configuration making
# Sluice's host calls, then the same plus the quota service callout (saturation runs only).
PROBE_PLAN = SLUICE_CALLS + " cluster=1"
PROBES = {"p_probe_sluice_calls": "probe", "q_probe_sluice_calls_callout": "probe-callout"}

# Issue 14's targets for global limits, against local mode (c).
GLOBAL_P50_TARGET_US = 500
GLOBAL_ENVOY_CPU_TARGET_US = 25


def global_lines(results):
    """results.md's section on (g): what global limits add to (c), measured interleaved, and
    the targets of issue 14."""
    c, g, info = results["configs"]["c_sluice"], results["configs"]["g_sluice_global"], results["global"]

    def sat(r, key):
        return [x[key] for x in r["saturation"]]

    def cell(values, fmt=".1f"):
        return f"{med(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"

    def diff(cs, gs, fmt=".1f"):
        # Repetition i of (c) and of (g) ran in the same rotation: their difference shows the noise.
        pairs = [y - x for x, y in zip(cs, gs)]
        return f"**{med(gs) - med(cs):+{fmt}}** (per repetition {min(pairs):+{fmt}} to {max(pairs):+{fmt}})"

    c_cpu, g_cpu = sat(c, "cpu_us_per_req"), sat(g, "cpu_us_per_req")
    quota, redis = sat(g, "quota_cpu_us_per_req"), sat(g, "redis_cpu_us_per_req")
    g_all = [e + q + r for e, q, r in zip(g_cpu, quota, redis)]
    c_rps, g_rps = sat(c, "rps"), sat(g, "rps")
    calls = info["calls"]
    lines = [
        "",
        "Global limits (g) against local limits (c), same run: (g) is (c) with every tenant limit global "
        f"(`\"global\": {json.dumps(info['section'])}`), decided by one sluice-quota process over a private "
        f"{info['redis']}, both on this machine. Repetitions of (c) and (g) interleaved in rotating order ("
        + "; ".join(" ".join(n.split("_")[0] for n in o) for o in info["orders"]) + "). CPU per request is per "
        "successful request of the saturation runs, from /proc of each process.",
        "",
        "| metric | (c) local | (g) global | (g) - (c) |",
        "|---|---|---|---|",
        f"| Envoy CPU us/request | {cell(c_cpu)} | {cell(g_cpu)} | {diff(c_cpu, g_cpu)} |",
        f"| sluice-quota CPU us/request | - | {cell(quota)} | |",
        f"| Redis CPU us/request | - | {cell(redis)} | |",
        f"| Envoy + sluice-quota + Redis CPU us/request | {cell(c_cpu)} | {cell(g_all)} | {diff(c_cpu, g_all)} |",
        f"| saturation req/s | {cell(c_rps, '.0f')} | {cell(g_rps, '.0f')} | {med(g_rps) / med(c_rps):.2f}x |",
    ]
    added = {}
    rates = results.get("global_rates", results["rates"])
    for label, rate in rates.items():
        for key, what in (("p50_us", "p50"), ("p99_us", "p99")):
            cs = [x[key] for x in c["latency"][label]]
            gs = [x[key] for x in g["latency"][label]]
            errors = "" if min(x["ok_ratio"] for x in g["latency"][label]) > 0.999 else " (errors)"
            added[(label, what)] = med(gs) - med(cs)
            lines.append(f"| latency {what} us at {rate} req/s ({label}) | {cell(cs, '.0f')} | {cell(gs, '.0f')}{errors} | "
                         f"{diff(cs, gs, '.0f')} |")
    breakdown = info.get("breakdown")
    if breakdown:
        p_cpu = sat(breakdown["p_probe_sluice_calls"], "cpu_us_per_req")
        q_cpu = sat(breakdown["q_probe_sluice_calls_callout"], "cpu_us_per_req")
        callout = med(q_cpu) - med(p_cpu)
        extra = med(g_cpu) - med(c_cpu)
        lines += [
            "",
            "Where (g)'s extra Envoy CPU goes, same run, saturation: the probe filter (bench/noop) in (c)'s "
            f"configuration making Sluice's host calls (`{breakdown['plan']}`), then the same plus one "
            "admission-shaped call to the same quota service (`callout=1`: POST /v1/admit, about 400 bytes out and "
            "200 back, the request paused until the answer is read) and nothing else.",
            "",
            "| step | Envoy CPU us/request | added |",
            "|---|---|---|",
            f"| probe: Sluice's host calls | {cell(p_cpu)} | |",
            f"| probe: + the quota service callout | {cell(q_cpu)} | {diff(p_cpu, q_cpu)} |",
            f"| (c) Sluice, local limits | {cell(c_cpu)} | |",
            f"| (g) Sluice, global limits | {cell(g_cpu)} | {diff(c_cpu, g_cpu)} |",
            "",
            f"One call per request, as the probe makes, costs Envoy {callout:+.1f} us. (g) adds {extra:+.1f} us to "
            f"(c) because it makes far fewer calls than requests ({calls['quota_calls_2xx'] / max(calls['requests_2xx'], 1):.3f} "
            "per request, below): a worker sends an admission at once when fewer than 2 admission calls are in "
            "flight, and otherwise groups those waiting into the next call; settlements go in batches each tick. "
            "The rest is Sluice's code for global mode (encoding admissions, decoding decisions, settlements, "
            "lease bookkeeping), less what (g) no longer does: (c)'s limit checks and settlements in shared data.",
        ]
    lines += [
        "",
        f"Quota service calls answered: {calls['quota_calls_2xx']} for {calls['requests_2xx']} successful requests "
        f"({calls['quota_calls_2xx'] / max(calls['requests_2xx'], 1):.3f} per request: admissions grouped while "
        f"calls are in flight, settlement batches, lease renewals); Redis scripts run: "
        f"{calls.get('redis_scripts', 0)} ({calls.get('redis_scripts', 0) / max(calls['requests_2xx'], 1):.3f} per "
        f"request: one admission each, plus settlements); failed or timed out: {calls['quota_calls_failed']}"
        + (f" ({', '.join(f'{k} {v}' for k, v in calls.get('quota_call_failures', {}).items())})"
           if calls['quota_calls_failed'] else "")
        + f"; requests not 2xx: {calls['requests_other']} (an admission that fails is refused, "
        "on_engine_failure deny; a settlement that fails is retried).",
        "",
        "| target (issue 14) | result | verdict |",
        "|---|---|---|",
    ]
    for label, rate in rates.items():
        p50 = added[(label, "p50")]
        lines.append(f"| the global round trip adds at most {GLOBAL_P50_TARGET_US} us p50 on loopback, at {rate} req/s "
                     f"({label}) | {p50:+.0f} us p50 | **{'met' if p50 <= GLOBAL_P50_TARGET_US else 'missed'}** |")
    cpu = med(g_cpu) - med(c_cpu)
    lines.append(f"| Envoy CPU per request at most {GLOBAL_ENVOY_CPU_TARGET_US} us more than local mode | {cpu:+.1f} us | "
                 f"**{'met' if cpu <= GLOBAL_ENVOY_CPU_TARGET_US else 'missed'}** |")
    return lines


# The cache group's seconds per run in a full `make bench` (fewer than --seconds, to keep the
# whole run within about 10 minutes); `make bench-cache` uses --seconds.
CACHE_SECONDS_IN_FULL_RUN = 3
CACHE_NAMES = {"a_plain_envoy": "(a) plain Envoy", "c_sluice": "(c) Sluice, no cache",
               "h_sluice_cache_hit": "(h) Sluice, cache hit", "m_sluice_cache_miss": "(m) Sluice, cache miss"}


def sample(url, headers, body=CACHE_BODY):
    """One request: its status and its x-sluice-cache header (None when absent)."""
    req = urllib.request.Request(url, data=body.encode(), method="POST",
                                 headers=dict([("content-type", "application/json")]
                                              + [tuple(h.split(": ", 1)) for h in headers]))
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            r.read()
            return r.status, r.headers.get("x-sluice-cache")
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("x-sluice-cache")


def expect_samples(what, url, headers, expected):
    """Sends one request per expected x-sluice-cache value; fails the run on any other answer."""
    got = [sample(url, headers) for _ in expected]
    if got != [(200, e) for e in expected]:
        sys.exit(f"bench: {what}: expected x-sluice-cache {list(expected)} on {url}, got (status, header) {got}")
    return [h for _, h in got]


def cache_counters(admin):
    """What a Sluice gateway served: 2xx requests, requests sent upstream, cache outcomes."""
    stats = envoy_stats(admin, "^(http\\.sluice\\.downstream_rq_2xx|cluster\\.openai\\.upstream_rq_total|"
                               "wasmcustom\\.sluice_cache_requests_total;.*)$")
    out = {"requests_2xx": stats.get("http.sluice.downstream_rq_2xx", 0),
           "upstream": stats.get("cluster.openai.upstream_rq_total", 0)}
    for outcome in ("hit", "miss", "bypass"):
        out[outcome] = sum(v for k, v in stats.items() if k.startswith("wasmcustom.") and k.endswith(f";cache={outcome}"))
    return out


def cache_group(gateway, up_port, auth, seconds, reps, rate):
    """(a), (c), (h) and (m) side by side, repetitions interleaved; the checks that (h) hit and
    (m) missed and stored, before and after. Returns what results.json keeps under `cache`."""
    path = "/v1/chat/completions"
    wasm_sha256 = sha256(WASM)  # what (c), (h) and (m) load now
    gws = {"a_plain_envoy": gateway("plain", up_port), "c_sluice": gateway("sluice", up_port),
           "h_sluice_cache_hit": gateway("sluice-cache", up_port), "m_sluice_cache_miss": gateway("sluice-cache", up_port)}
    (a, a_base), (c, c_base), (h, h_base), (m, m_base) = gws.values()
    checks = {}
    # (c) runs without the cache: no header. (h): the first request fills, the next one hits.
    expect_samples("(c) must not cache", c_base + path, auth, [None])
    checks["h_warm_up"] = expect_samples("(h) warm-up", h_base + path, auth, ["miss", "hit"])
    # (m): a fresh query string misses and is stored (the same URL again hits).
    checks["m_before"] = expect_samples("(m) before the runs", f"{m_base}{path}?r=bench-check-before", auth,
                                        ["miss", "hit"])
    before = {"h": cache_counters(h.admin), "m": cache_counters(m.admin)}
    # oha --rand-regex-url takes the URL as a regex whose dots are literal; `?` must be escaped.
    assert all(ch.isalnum() or ch in ":/._-" for ch in m_base + path)
    regex = f"{m_base}{path}\\?r=[a-z0-9]{{24}}"
    group = {"a_plain_envoy": (a, a_base + path, None, {"body": CACHE_BODY}),
             "c_sluice": (c, c_base + path, None, {"body": CACHE_BODY}),
             "h_sluice_cache_hit": (h, h_base + path, None, {"body": CACHE_BODY}),
             "m_sluice_cache_miss": (m, regex, None, {"body": CACHE_BODY, "url_regex": True})}
    print(f"bench: {', '.join(group)}, interleaved, {reps} x {seconds} s ...", flush=True)
    measured, orders = measure_interleaved(group, auth, seconds, reps, {"10%": rate})
    after = {"h": cache_counters(h.admin), "m": cache_counters(m.admin)}
    delta = {g: {k: after[g][k] - before[g][k] for k in after[g]} for g in after}
    # Every (m) request stored its response unless its slot held another key's fill in progress:
    # the table still stores after the load (a new key misses, then hits).
    checks["m_after"] = expect_samples("(m) after the runs", f"{m_base}{path}?r=bench-check-after", auth,
                                       ["miss", "hit"])
    checks["during_runs"] = delta
    hd, md = delta["h"], delta["m"]
    # Exact in principle (every (h) request a hit, none upstream; every (m) request a miss and
    # upstream); 0.1% allows for a request cut off at a run's deadline.
    if not (hd["requests_2xx"] > 0 and hd["hit"] >= 0.999 * hd["requests_2xx"] and hd["upstream"] <= 0.001 * hd["requests_2xx"]
            and hd["miss"] + hd["bypass"] <= 0.001 * hd["requests_2xx"]):
        sys.exit(f"bench: (h) was not answered from the cache: {hd}")
    if not (md["requests_2xx"] > 0 and md["miss"] >= 0.999 * md["requests_2xx"] and md["hit"] == 0 and md["bypass"] == 0
            and md["upstream"] >= 0.999 * md["requests_2xx"]):
        sys.exit(f"bench: (m) did not miss on every request: {md}")
    print(f"bench: (h) {hd['hit']} hits for {hd['requests_2xx']} requests, {hd['upstream']} sent upstream; "
          f"(m) {md['miss']} misses for {md['requests_2xx']} requests, {md['upstream']} sent upstream, {md['hit']} hits",
          flush=True)
    for gw, _ in gws.values():
        gw.stop()
    return {"configs": measured, "orders": orders, "seconds": seconds, "reps": reps, "rates": {"10%": rate},
            "rule": CACHE_RULE, "store": CACHE_STORE, "body": CACHE_BODY, "checks": checks, "wasm_sha256": wasm_sha256}


def cache_lines(results):
    """results.md's section on the response cache: (h) and (m) against (a) and (c), same run."""
    info = results["cache"]
    cfg = info["configs"]
    label, rate = next(iter(info["rates"].items()))

    def sat(n, key):
        return [x[key] for x in cfg[n]["saturation"]]

    def lat(n, key):
        return [x[key] for x in cfg[n]["latency"][label]]

    def cell(values, fmt=".1f"):
        return f"{med(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"

    d = info["checks"]["during_runs"]
    lines = [
        "",
        f"Response cache, same run: (a), (c) without the cache, and (h) and (m), (c) with the gold tier caching "
        f"gpt-4.1-mini (`\"cache\": {json.dumps(info['rule'])}`, store `{json.dumps(info['store'])}`). All four send the "
        "bench body with `\"temperature\": 0`. (h) sends it again and again: every request a hit, answered by Sluice "
        "from shared data. (m) sends it to a random query string per request (`?r=` and 24 random characters, "
        "oha --rand-regex-url): the query string is part of the key, so every request misses, goes upstream and is "
        f"stored. {info['reps']} repetitions of {info['seconds']} s, interleaved in rotating order ("
        + "; ".join(" ".join(n.split("_")[0] for n in o) for o in info["orders"]) + "); medians, min-max in brackets. "
        f"Latency at {rate} req/s (10% of (a)'s saturation in the probe run).",
        "",
        f"| config | saturation req/s | Envoy CPU us/request | p50 us @{label} | p99 us @{label} | peak RSS MiB |",
        "|---|---|---|---|---|---|",
    ]
    for n, title in CACHE_NAMES.items():
        errors = "" if min(x["ok_ratio"] for x in cfg[n]["latency"][label]) > 0.999 else " (errors)"
        lines.append(f"| {title} | {cell(sat(n, 'rps'), '.0f')} | {cell(sat(n, 'cpu_us_per_req'))} | "
                     f"{cell(lat(n, 'p50_us'), '.0f')}{errors} | {cell(lat(n, 'p99_us'), '.0f')} | "
                     f"{cfg[n]['peak_rss_kb'] / 1024:.0f} |")
    lines += ["", "| ratio (medians) | Envoy CPU us/request | p50 | p99 | saturation req/s |", "|---|---|---|---|---|"]
    for num, den, what in (("h_sluice_cache_hit", "m_sluice_cache_miss", "hit / miss"),
                           ("h_sluice_cache_hit", "a_plain_envoy", "hit / plain Envoy"),
                           ("m_sluice_cache_miss", "c_sluice", "miss / Sluice without the cache")):
        cells = [med(sat(num, "cpu_us_per_req")) / med(sat(den, "cpu_us_per_req")),
                 med(lat(num, "p50_us")) / med(lat(den, "p50_us")), med(lat(num, "p99_us")) / med(lat(den, "p99_us")),
                 med(sat(num, "rps")) / med(sat(den, "rps"))]
        lines.append(f"| {what} | " + " | ".join(f"{x:.2f}" for x in cells) + " |")
    lines += [
        "",
        f"Checked during the run: (h) {d['h']['hit']} hits for {d['h']['requests_2xx']} requests, {d['h']['upstream']} sent "
        f"upstream; (m) {d['m']['miss']} misses for {d['m']['requests_2xx']} requests, {d['m']['upstream']} sent upstream, "
        f"{d['m']['hit']} hits; a fresh key on (m) missed, then hit, before and after the runs. A miss whose slot holds "
        "another key's fill in progress goes upstream without being stored and is not counted apart: with 32 "
        "requests in flight over 1024 slots, an estimated 3% at most of (m)'s saturation requests.",
    ]
    return lines


def plot(path, configs, labels):
    """CPU per request and p99 latency per configuration, on log scales."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(configs)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.bar(names, [med([x["cpu_us_per_req"] for x in configs[n]["saturation"]]) for n in names])
    ax1.set_ylabel("gateway CPU us per request (lower is better)")
    ax1.set_yscale("log")
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        shift = (i - (len(labels) - 1) / 2) * width
        ax2.bar([j + shift for j in range(len(names))],
                [med([x["p99_us"] for x in configs[n]["latency"][label]]) if configs[n]["latency"].get(label) else 0
                 for n in names], width=width,
                label=f"p99 @ {label} of (a)'s saturation")
    ax2.set_xticks(range(len(names)), names)
    ax2.set_ylabel("latency p99 (us)")
    ax2.set_yscale("log")
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def machine():
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), "unknown")
    envoy = subprocess.run([str(ENVOY), "--version"], capture_output=True, text=True).stdout.strip().split()[-1]
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": os.uname().release, "envoy": envoy}


def report(results, out):
    m = results["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, kernel {m['kernel']}, Envoy {m['envoy']} (1 worker per gateway)."
    ]
    if results["configs"]:
        main = main_lines(results)
        lines = [f"{lines[0]} {main[0]}"] + main[1:]
    if "streaming" in results:
        lines += streaming_lines(results)
    if "cache" in results:
        lines += cache_lines(results)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        if results["configs"]:
            plot(out / "results.png", results["configs"], ("25%", "50%"))
        if "cache" in results:
            # Alone (make bench-cache) the cache group is the run's plot.
            plot(out / ("cache.png" if results["configs"] else "results.png"), results["cache"]["configs"],
                 tuple(results["cache"]["rates"]))
    except ImportError:
        print("bench: matplotlib missing, no plot")


def streaming_lines(results):
    s = results["streaming"]
    lines = []
    if True:
        pairs = s["c_sluice"].get("pairs", 30)
        lines += ["", f"Streaming (d): {pairs} rounds, each one SSE request (10 chunks 5 ms apart, a new connection) "
                  "through every gateway, in rotating order; added = the median over rounds of the gateway's time "
                  "to first byte minus (a)'s in the same round.", "",
                  "| gateway | time to first byte, median us | added over (a), median [p25-p75] us | time to last byte, median ms |",
                  "|---|---|---|---|"]
        for name, r in s.items():
            spread_added = r.get("added_ttfb_p25_p75_us", [0, 0])
            lines.append(f"| {name} | {r['ttfb_us']:.0f} | {r.get('added_ttfb_us', 0):.0f} "
                         f"[{spread_added[0]:.0f}-{spread_added[1]:.0f}] | {r['total_us'] / 1000:.1f} |")
    return lines


def main_lines(results):
    base = results["configs"]["a_plain_envoy"]
    b_rps = med([r["rps"] for r in base["saturation"]])
    b_cpu = med([r["cpu_us_per_req"] for r in base["saturation"]])
    lines = [
        f"{results['reps']} repetitions of "
        f"{results['seconds']} s each; medians, with min-max in brackets. Fixed rates: {results['rates']['25%']} and "
        f"{results['rates']['50%']} requests/s (25% and 50% of (a)'s saturation in a probe run).",
        "",
        "| config | saturation req/s | vs (a) | CPU us/request | vs (a) | p50 / p99 / p99.9 us @25% | p50 / p99 / p99.9 us @50% | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["configs"].items():
        rps = [x["rps"] for x in r["saturation"]]
        cpu = [x["cpu_us_per_req"] for x in r["saturation"]]
        cells = []
        for label in ("25%", "50%"):
            runs = r["latency"].get(label)
            if not runs:
                # A peer far below these rates (saturation runs only): they would only queue.
                cells.append("-")
                continue
            cells.append(" / ".join(f"{med([x[k] for x in runs]):.0f}" for k in ("p50_us", "p99_us", "p999_us"))
                         + ("" if min(x["ok_ratio"] for x in runs) > 0.999 else " (errors)"))
        lines.append(f"| {name} | {med(rps):.0f} [{spread(rps)}] | {med(rps) / b_rps:.2f} | {med(cpu):.1f} [{spread(cpu)}] | "
                     f"{med(cpu) / b_cpu:.2f} | {cells[0]} | {cells[1]} | {r['peak_rss_kb'] / 1024:.0f} |")
    if results.get("ablation"):
        lines += ["", "Ablation of (c), saturation runs only (where Sluice's CPU goes):", "",
                  "| variant | saturation req/s | CPU us/request | vs (a) |", "|---|---|---|---|"]
    for name, r in results.get("ablation", {}).items():
        rps = [x["rps"] for x in r["saturation"]]
        cpu = [x["cpu_us_per_req"] for x in r["saturation"]]
        lines.append(f"| {name} | {med(rps):.0f} [{spread(rps)}] | {med(cpu):.1f} [{spread(cpu)}] | {med(cpu) / b_cpu:.2f} |")
    if "global" in results:
        lines += global_lines(results)
    if "compare" in results:
        lines += compare_lines(results)
    return lines


# Installed by `make bench` into the project (cargo install --root .tools).
OHA = str(ROOT / ".tools/bin/oha")

if __name__ == "__main__":
    main()
