"""make bench-scaling: how Sluice's cost grows with tenants, workers, concurrent streams and
body size (issue 17), each against plain Envoy where it has one. Loopback only, about 6 min.

  tenants  10, 1,000 and 100,000 tenants (one key each) in the gold tier: configuration size,
           time to ready, time to compile the configuration in each VM (Sluice logs it),
           RSS after start, CPU per request and saturation (interleaved), and the time a
           configuration update takes: the listener comes from a file (LDS), one tenant is
           added, and the clock runs from the file's move until the new tenant's key is served.
  workers  plain Envoy and Sluice with 1, 2 and 4 workers at saturation (interleaved): CPU
           per request, compare-and-set retries per request (sluice_shared_data_cas_retries_total)
           and limiter_busy refusals, with limits set high.
  streams  1,000 and 5,000 slow SSE streams (20 chunks 500 ms apart) held open at once
           through plain Envoy and Sluice: RSS when all are open, memory per stream, CPU per
           streamed chunk, and that Sluice metered every stream exactly.
  bodies   1 KiB, 64 KiB and 1 MiB requests and responses: CPU per request (saturation,
           interleaved) and the time to forward one (median latency at a low fixed rate).

Usage: scaling.py OUT_DIR [--reps N] [--seconds S] [--only tenants,workers,streams,bodies]
"""
import argparse
import asyncio
import hashlib
import json
import re
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

import run as B
from run import med, spread

STUDIES = ("tenants", "workers", "streams", "bodies")
AUTH = [f"authorization: Bearer {B.KEY}"]


# --- configuration edits -------------------------------------------------------------------

def plugin_config(text):
    """(line index, indent, parsed JSON) of Sluice's configuration in B.sluice_yaml()'s text,
    which holds it on one line."""
    lines = text.splitlines()
    at = next(i for i, l in enumerate(lines) if l.strip().startswith("{") and '"providers"' in l)
    return lines, at, len(lines[at]) - len(lines[at].lstrip()), json.loads(lines[at])


def with_plugin_config(text, edit):
    lines, at, indent, cfg = plugin_config(text)
    edit(cfg)
    lines[at] = " " * indent + json.dumps(cfg)
    return "\n".join(lines) + "\n"


def tenant_key(i):
    return f"sk-bench-tenant-{i}"


def add_tenants(cfg, n, first=0):
    """Gold tenants `first`..`n`-1 (the demo's own count towards `n` when `first` is 0)."""
    start = len(cfg["tenants"]) if first == 0 else 0
    cfg["tenants"] += [{"id": f"t{i:06d}", "tier": "gold",
                        "keys": [{"id": "k", "sha256": hashlib.sha256(tenant_key(i).encode()).hexdigest()}]}
                       for i in range(first + start, n)]


def with_circuit_breakers(text, n):
    """Every cluster allows `n` connections and requests (Envoy's default is 1,024)."""
    doc = yaml.safe_load(text)
    for c in doc["static_resources"]["clusters"]:
        # A burst of new connections can outrun the upstream's accept queue: a SYN retried
        # after 1 s must not fail the stream.
        c["connect_timeout"] = "5s"
        c["circuit_breakers"] = {"thresholds": [{"max_connections": n, "max_pending_requests": n,
                                                 "max_requests": n}]}
    return yaml.safe_dump(doc, width=1 << 30, sort_keys=False)


def split_listeners(text, lds_path):
    """The bootstrap with its listeners moved to an LDS file Envoy watches: (bootstrap, lds)."""
    doc = yaml.safe_load(text)
    listeners = doc["static_resources"].pop("listeners")
    doc["node"] = {"id": "sluice-bench", "cluster": "sluice-bench"}
    doc["dynamic_resources"] = {"lds_config": {"resource_api_version": "V3",
                                               "path_config_source": {"path": str(lds_path)}}}
    lds = {"resources": [dict({"@type": "type.googleapis.com/envoy.config.listener.v3.Listener"}, **l)
                         for l in listeners]}
    return (yaml.safe_dump(doc, width=1 << 30, sort_keys=False),
            yaml.safe_dump(lds, width=1 << 30, sort_keys=False))


# --- small probes ---------------------------------------------------------------------------

def status_of(url, key, body=B.BODY):
    req = urllib.request.Request(url, data=body.encode(), method="POST",
                                 headers={"content-type": "application/json", "authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def rss_kb(proc):
    total = 0
    for pid in [proc.p.pid] + B.descendants(proc.p.pid):
        try:
            m = re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
            total += int(m.group(1)) if m else 0
        except FileNotFoundError:
            pass
    return total


def prometheus(admin):
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats/prometheus", timeout=10) as r:
        return r.read().decode()


def metric_sum(text, name, must=""):
    total = 0
    for line in text.splitlines():
        if line.startswith(name) and must in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def configure_ms(log_path):
    """Per VM, the milliseconds Sluice took to compile its configuration (its log line)."""
    return [int(m) for m in re.findall(r"sluice: configured .* in (\d+) ms", Path(log_path).read_text())]


def saturation(results, name):
    sat = results[name]["saturation"]
    ok = [x["ok"] / max(x["total"], 1) for x in sat]
    if min(ok) < 1:
        raise SystemExit(f"bench: {name} answered non-2xx at saturation ({min(ok):.4f} ok)")
    return [x["cpu_us_per_req"] for x in sat], [x["rps"] for x in sat]


# --- the studies ----------------------------------------------------------------------------

def study_tenants(tmp, up_port, args, procs):
    rows, gws = {}, {}
    for n in (10, 1000, 100_000):
        port, admin = B.free_port(), B.free_port()
        text = with_plugin_config(B.sluice_yaml(tmp, port, admin, up_port), lambda c: add_tenants(c, n))
        lds_path = Path(tmp) / f"tenants{n}-lds.yaml"
        boot, lds = split_listeners(text, lds_path)
        lds_path.write_text(lds)
        t0 = time.time()
        # Sluice logs the time each VM took to compile its configuration at info.
        gw = B.start_envoy(tmp, f"tenants{n}", boot, admin, extra_args=("--component-log-level", "wasm:info"))
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        while status_of(url, B.KEY) != 200:  # ready means the listener is warm too
            if time.time() - t0 > 120:
                raise SystemExit(f"bench: {n} tenants never served")
            time.sleep(0.05)
        ready = time.time() - t0
        procs.append(gw)
        rows[n] = {"yaml_bytes": len(lds), "ready_s": ready, "rss_mib": rss_kb(gw) / 1024,
                   "configure_ms": configure_ms(Path(tmp) / f"tenants{n}.log")}
        gws[n] = (gw, url, admin, lds_path, lds)
    res, _ = B.measure_interleaved({f"t{n}": g[:2] for n, g in gws.items()}, AUTH, args.seconds, args.reps, {})
    for n, (gw, url, admin, lds_path, lds) in gws.items():
        cpu, rps = saturation(res, f"t{n}")
        rows[n].update(cpu=cpu, rps=rps, peak_rss_mib=gw.peak_rss_kb() / 1024)
        # A configuration update: the same listener with one tenant more (only its key is new).
        before = len(configure_ms(Path(tmp) / f"tenants{n}.log"))
        doc = yaml.safe_load(lds)
        for f in doc["resources"][0]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]:
            if f["typed_config"].get("config", {}).get("name") == "sluice":
                value = f["typed_config"]["config"]["configuration"]
                cfg = json.loads(value["value"])
                add_tenants(cfg, 1_000_001, first=1_000_000)
                value["value"] = json.dumps(cfg)
        new_key = tenant_key(1_000_000)
        assert status_of(url, new_key) == 401
        staged = lds_path.with_suffix(".new")
        staged.write_text(yaml.safe_dump(doc, width=1 << 30, sort_keys=False))
        t0 = time.time()
        staged.rename(lds_path)
        while status_of(url, new_key) != 200:
            if time.time() - t0 > 120:
                raise SystemExit(f"bench: the update of {n} tenants never took")
            time.sleep(0.01)
        rows[n]["update_s"] = time.time() - t0
        rows[n]["update_configure_ms"] = configure_ms(Path(tmp) / f"tenants{n}.log")[before:]
        gw.stop()
    lines = ["### Tenants", "",
             f"Gold tenants, one key each, 1 worker; {args.reps} interleaved saturation runs of {args.seconds} s. "
             "Compile: Sluice's own log line for each VM Envoy configured (three with 1 worker). Update: one tenant "
             "added to the LDS file, from the file's move until the new key is served.", "",
             "| tenants | configuration | ready after | compile per VM | RSS after start | CPU µs/request | "
             "saturation req/s | update takes | compile per VM on update |",
             "|---|---|---|---|---|---|---|---|---|"]
    for n, r in rows.items():
        lines.append(f"| {n:,} | {r['yaml_bytes'] / 1e6:.2f} MB | {r['ready_s']:.2f} s | "
                     f"{', '.join(map(str, r['configure_ms']))} ms | {r['rss_mib']:.0f} MiB | "
                     f"{med(r['cpu']):.1f} [{spread(r['cpu'])}] | {med(r['rps']):.0f} | {r['update_s']:.2f} s | "
                     f"{', '.join(map(str, r['update_configure_ms']))} ms |")
    return rows, lines


def gateway_yaml(kind, tmp, port, admin, up_port):
    """Plain Envoy routing to the upstream, or Sluice's demo configuration pointed at it."""
    if kind == "plain":
        return B.envoy_yaml(port, admin, "", B.cluster("upstream", up_port),
                            "route: {cluster: upstream, timeout: 60s}")
    return B.sluice_yaml(tmp, port, admin, up_port)


def study_workers(tmp, up_port, args, procs):
    gws, admins = {}, {}
    for workers in (1, 2, 4):
        for kind in ("plain", "sluice"):
            port, admin = B.free_port(), B.free_port()
            text = gateway_yaml(kind, tmp, port, admin, up_port)
            name = f"{kind}{workers}"
            gw = B.start_envoy(tmp, name, text, admin, concurrency=workers)
            procs.append(gw)
            gws[name] = (gw, f"http://127.0.0.1:{port}/v1/chat/completions")
            admins[name] = admin
    res, _ = B.measure_interleaved(gws, AUTH, args.seconds, args.reps, {})
    rows = {}
    for workers in (1, 2, 4):
        plain_cpu, plain_rps = saturation(res, f"plain{workers}")
        cpu, rps = saturation(res, f"sluice{workers}")
        text = prometheus(admins[f"sluice{workers}"])
        requests = metric_sum(text, "sluice_requests_total{")
        rows[workers] = {"plain_cpu": plain_cpu, "plain_rps": plain_rps, "cpu": cpu, "rps": rps,
                         "requests": requests, "cas_retries": metric_sum(text, "sluice_shared_data_cas_retries_total"),
                         "limiter_busy": metric_sum(text, "sluice_requests_total{", 'reason="limiter_busy"')}
        gws[f"plain{workers}"][0].stop()
        gws[f"sluice{workers}"][0].stop()
    lines = ["### Workers", "",
             f"Saturation (oha, 32 connections), {args.reps} interleaved runs of {args.seconds} s per gateway; "
             "the gold tier's limits set high (3 checked and settled per request). This machine has 2 cores: "
             "the load generator and the upstream share them, so 2 workers is the most that can run at once and "
             "4 workers measure oversubscription (more preemption while holding nothing: shared data's "
             "compare-and-set takes no lock across a callback).", "",
             "| workers | plain Envoy CPU µs/request | Sluice CPU µs/request | ratio | plain req/s | Sluice req/s | "
             "compare-and-set retries per request | limiter_busy refusals |",
             "|---|---|---|---|---|---|---|---|"]
    for w, r in rows.items():
        lines.append(f"| {w} | {med(r['plain_cpu']):.1f} | {med(r['cpu']):.1f} [{spread(r['cpu'])}] | "
                     f"{med(r['cpu']) / med(r['plain_cpu']):.2f}x | {med(r['plain_rps']):.0f} | {med(r['rps']):.0f} | "
                     f"{r['cas_retries'] / max(r['requests'], 1):.5f} ({r['cas_retries']:.0f} in "
                     f"{r['requests']:.0f}) | {r['limiter_busy']:.0f} |")
    return rows, lines


STREAM_CHUNKS, STREAM_DELAY_MS, STREAM_TOKENS = 20, 500, 40


async def hold_streams(port, n, headers, on_all_open):
    """`n` SSE streams over their own connections, opened 200 at a time; calls
    `on_all_open()` once every stream has its first bytes. Returns per stream (status, data
    events seen, saw [DONE])."""
    body = json.dumps({"model": "gpt-4.1-mini", "stream": True,
                       "messages": [{"role": "user", "content": "hold this stream"}]})
    head = "".join(f"{h}\r\n" for h in headers)
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
               f"x-mock-chunks: {STREAM_CHUNKS}\r\nx-mock-chunk-delay-ms: {STREAM_DELAY_MS}\r\n"
               f"x-mock-output-tokens: {STREAM_TOKENS}\r\n{head}content-length: {len(body)}\r\n"
               f"connection: close\r\n\r\n{body}").encode()
    opening = asyncio.Semaphore(200)
    opened = {"n": 0}
    all_open = asyncio.Event()

    async def one():
        async with opening:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            await writer.drain()
            first = await reader.read(65536)
        opened["n"] += 1
        if opened["n"] == n:
            all_open.set()
        data = bytearray(first)
        while True:
            more = await reader.read(65536)
            if not more:
                break
            data += more
        writer.close()
        status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
        return status, data.count(b"data: "), b"data: [DONE]" in data

    async def watch():
        await all_open.wait()
        on_all_open()

    watcher = asyncio.create_task(watch())
    out = await asyncio.gather(*(one() for _ in range(n)))
    await watcher
    return out


def study_streams(tmp, mock_port, args, procs):
    rows = {}
    for n in (1000, 5000):
        for kind in ("plain", "sluice"):
            port, admin = B.free_port(), B.free_port()
            if kind == "plain":
                text = B.envoy_yaml(port, admin, "", B.cluster("upstream", mock_port),
                                    "route: {cluster: upstream, timeout: 0s}")
                headers = ["authorization: Bearer sk-bench"]
            else:
                text = B.sluice_yaml(tmp, port, admin, mock_port)
                headers = AUTH
            name = f"streams-{kind}{n}"
            gw = B.start_envoy(tmp, name, with_circuit_breakers(text, 20000), admin)
            procs.append(gw)
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            log = Path(tmp) / "access.log"
            if log.exists():
                log.write_text("")
            for _ in range(20):  # warm: the VM, the connections' first buffers
                status_of(url, B.KEY if kind == "sluice" else "sk-bench")
            time.sleep(0.5)
            idle_kb = rss_kb(gw)
            seen = {}
            t0 = gw.cpu_ticks()
            started = time.time()
            out = asyncio.run(hold_streams(port, n, headers,
                                           lambda: seen.update(rss_kb=rss_kb(gw), at_s=time.time() - started)))
            ticks = gw.cpu_ticks() - t0
            elapsed = time.time() - started
            ok = sum(1 for s, _, done in out if s == 200 and done)
            chunks = sum(c for s, c, _ in out if s == 200)
            row = {"streams": n, "ok": ok, "chunks": chunks, "idle_rss_mib": idle_kb / 1024,
                   "open_rss_mib": seen.get("rss_kb", 0) / 1024, "all_open_after_s": seen.get("at_s"),
                   "per_stream_kib": (seen.get("rss_kb", 0) - idle_kb) / n, "elapsed_s": elapsed,
                   "cpu_us_per_chunk": ticks * 1e6 / B.CLK_TCK / max(chunks, 1),
                   "cpu_us_per_stream": ticks * 1e6 / B.CLK_TCK / max(ok, 1)}
            if ok != n:
                raise SystemExit(f"bench: {name}: {n - ok} streams did not end well "
                                 f"({sorted(set(s for s, _, _ in out))})")
            if kind == "sluice":
                records, deadline = [], time.time() + 10
                while len(records) < n and time.time() < deadline:
                    time.sleep(0.5)  # Envoy flushes the access log every second
                    records = [rec for rec in (json.loads(line).get("sluice") or {}
                                               for line in log.read_text().splitlines()) if rec.get("stream")]
                mine = records[-n:]
                exact = [r for r in mine if r.get("outcome") == "success" and not r.get("estimated")
                         and r.get("output_tokens") == STREAM_TOKENS]
                row["metered_exactly"] = len(exact)
                if len(exact) != n:
                    odd = [r for r in mine if r not in exact]
                    raise SystemExit(f"bench: {name}: {len(exact)} of {n} streams metered exactly, "
                                     f"{len(mine)} records (e.g. {odd[:2]})")
            rows[name] = row
            gw.stop()
    lines = ["### Concurrent streams", "",
             f"Streams of {STREAM_CHUNKS} chunks {STREAM_DELAY_MS} ms apart from the mock, each on its own "
             "connection, opened 200 at a time, all open at once for several seconds (1 worker; circuit "
             "breakers raised to 20,000, Envoy's default allows 1,024 requests per cluster). Memory per "
             "stream: RSS when every stream has its first bytes minus RSS before, divided by the streams. CPU "
             "per chunk: Envoy's CPU over the whole run (connections, admissions, settlements included) "
             "divided by the chunks delivered.", "",
             "| streams | gateway | RSS before → all open | memory per stream | CPU µs per chunk | CPU µs per stream "
             "| metered exactly |", "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {r['streams']:,} | {'Sluice' if 'sluice' in name else 'plain Envoy'} | "
                     f"{r['idle_rss_mib']:.0f} → {r['open_rss_mib']:.0f} MiB | {r['per_stream_kib']:.1f} KiB | "
                     f"{r['cpu_us_per_chunk']:.1f} | {r['cpu_us_per_stream']:.0f} | "
                     f"{r.get('metered_exactly', '-') if 'sluice' in name else '-'} |")
    return rows, lines


def chat_response(n):
    base = json.loads(B.UPSTREAM_BODY)
    base["choices"][0]["message"]["content"] += "x" * max(n - len(B.UPSTREAM_BODY), 0)
    return json.dumps(base)


def chat_request(n):
    base = json.loads(B.BODY)
    base["messages"][-1]["content"] += "y" * max(n - len(B.BODY), 0)
    return json.dumps(base)


def sized_upstream(port, admin, n):
    """B.upstream_yaml's direct_response, answering a completion of `n` bytes after reading
    the whole request (the buffer filter)."""
    buffer = """          - name: envoy.filters.http.buffer
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer
              max_request_bytes: 4194304
"""
    text = B.envoy_yaml(port, admin, buffer, "  []", f"""direct_response:
                  status: 200
                  body: {{inline_string: {json.dumps(chat_response(n))}}}
                response_headers_to_add: [{{header: {{key: content-type, value: application/json}}}}]""")
    text = text.replace("          route_config:\n", "          route_config:\n            max_direct_response_body_size_bytes: 4194304\n")
    return text.replace("  clusters:\n  []", "  clusters: []")


def study_bodies(tmp, args, procs):
    rows = {}
    for n in (1024, 65536, 1 << 20):
        up_port, up_admin = B.free_port(), B.free_port()
        up = B.start_envoy(tmp, f"bodies-up{n}", sized_upstream(up_port, up_admin, n), up_admin)
        gws = {}
        for kind in ("plain", "sluice"):
            port, admin = B.free_port(), B.free_port()
            text = gateway_yaml(kind, tmp, port, admin, up_port)
            gw = B.start_envoy(tmp, f"bodies-{kind}{n}", text, admin)
            gws[kind] = (gw, f"http://127.0.0.1:{port}/v1/chat/completions", {}, {"body": chat_request(n)})
        res, _ = B.measure_interleaved(gws, AUTH, args.seconds, args.reps, {})
        # Time to forward: one request at a time, at 20 requests/s (the gateway idles between).
        lat, _ = B.measure_interleaved(gws, AUTH, args.seconds, 1, {"low": 20})
        for kind in gws:
            cpu, rps = saturation(res, kind)
            p50 = [r["p50_us"] for r in lat[kind]["latency"]["low"]]
            rows[(n, kind)] = {"cpu": cpu, "rps": rps, "p50_us": med(p50)}
        for g in gws.values():
            g[0].stop()
        up.stop()
    lines = ["### Body size", "",
             f"A request and a response of the same size (the last message and the completion's content "
             f"padded), {args.reps} interleaved saturation runs of {args.seconds} s, and the time to forward one: "
             f"median latency at 20 requests/s over {args.seconds} s (the upstream answers at once, so this is the "
             "gateways' own time on both bodies, plus the client's).", "",
             "| size | plain Envoy CPU µs/request | Sluice CPU µs/request | ratio | plain Envoy latency p50 | "
             "Sluice latency p50 | added |", "|---|---|---|---|---|---|---|"]
    for n in (1024, 65536, 1 << 20):
        a, c = rows[(n, "plain")], rows[(n, "sluice")]
        label = {1024: "1 KiB", 65536: "64 KiB", 1 << 20: "1 MiB"}[n]
        lines.append(f"| {label} | {med(a['cpu']):.1f} | {med(c['cpu']):.1f} [{spread(c['cpu'])}] | "
                     f"{med(c['cpu']) / med(a['cpu']):.2f}x | {a['p50_us']:.0f} µs | {c['p50_us']:.0f} µs | "
                     f"+{c['p50_us'] - a['p50_us']:.0f} µs |")
    return {f"{n}-{k}": v for (n, k), v in rows.items()}, lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--only", default=",".join(STUDIES))
    args = ap.parse_args()
    only = [s for s in args.only.split(",") if s]
    for s in only:
        if s not in STUDIES:
            raise SystemExit(f"bench: unknown study {s!r} (one of {', '.join(STUDIES)})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path, how in [(B.ENVOY, "run `make envoy`"), (B.WASM, "run `make wasm`"), (B.RELAY, "run `make relay`"),
                      (B.MOCK, "run `make mock`"), (B.OHA, "run `make bench` (installs oha)")]:
        B.need(path, how)
    tmp = tempfile.mkdtemp(prefix="sluice-scaling-")
    procs, results = [], {"machine": B.machine(), "reps": args.reps, "seconds": args.seconds}
    lines = [f"Run of {time.strftime('%Y-%m-%d %H:%M')}, {B.machine()}.", ""]
    started = time.time()
    try:
        up_port, up_admin = B.free_port(), B.free_port()
        procs.append(B.start_envoy(tmp, "upstream", B.upstream_yaml(up_port, up_admin), up_admin))
        mock_port = B.free_port()
        procs.append(B.Proc([str(B.MOCK), "--provider", f"openai,openai,127.0.0.1:{mock_port},/v1,OPENAI_API_KEY"],
                            Path(tmp) / "mock.log", env=B.ENV))
        B.wait_http(f"http://127.0.0.1:{mock_port}/__mock/requests")
        for study in only:
            t0 = time.time()
            if study == "tenants":
                rows, text = study_tenants(tmp, up_port, args, procs)
            elif study == "workers":
                rows, text = study_workers(tmp, up_port, args, procs)
            elif study == "streams":
                rows, text = study_streams(tmp, mock_port, args, procs)
            else:
                rows, text = study_bodies(tmp, args, procs)
            results[study] = {str(k): v for k, v in rows.items()}
            lines += text + ["", f"({study}: {time.time() - t0:.0f} s)", ""]
            print("\n".join(text), flush=True)
    finally:
        for p in procs:
            p.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    lines.append(f"Whole run: {time.time() - started:.0f} s.")
    (out / "scaling.md").write_text("\n".join(lines) + "\n")
    (out / "scaling.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"bench: wrote {out / 'scaling.md'}")


if __name__ == "__main__":
    main()
