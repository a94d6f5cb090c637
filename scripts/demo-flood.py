#!/usr/bin/env python3
"""make demo-flood: one tenant floods a provider while a gold tenant keeps sending.

Run it against a running `make demo` (start that in another terminal first):

    make demo-flood                      # or: python3 scripts/demo-flood.py [options]

The demo's openai provider takes 8 requests at once (`max_in_flight` in envoy/demo.yaml);
more wait in Sluice's fair queue, highest tier priority first. The script

  1. sends acme's requests alone (gold tier, priority 3), one every 100 ms: the baseline;
  2. floods with tyrell (batch tier, priority 0, at most 20 requests waiting, 3 s queue
     wait limit): many clients, each sending gpt-4.1-mini requests that take 300-700 ms at
     the mock provider (its x-mock-latency-ms knob), again as soon as one is answered (after
     the retry-after of a refusal), while acme keeps sending one request every 100 ms;
  3. prints acme's latency before and during the flood, what happened to the flood (served,
     429 queue_full, 503 queue timeout), the queue waits from the usage records
     (queue_wait_ms in .run/access.log), and where to look in Prometheus.

Standard library only. Options: --gateway, --admin, --access-log, --seconds, --flooders.
"""
import argparse
import http.client
import json
import random
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

ACME = "sk-sluice-demo-acme"  # gold tier
TYRELL = "sk-sluice-demo-tyrell"  # batch tier: the demo's bulk tenant
MODEL = "gpt-4.1-mini"  # served by the demo's openai provider (max_in_flight 8)


class Client:
    """One keep-alive HTTP connection to the gateway."""

    def __init__(self, gateway):
        url = urllib.parse.urlsplit(gateway)
        self.host, self.port = url.hostname, url.port or 80
        self.conn = None

    def chat(self, key, text, latency_ms=None):
        """POSTs one chat completion: (status, seconds, request id, x-sluice-reason, retry ms)."""
        body = json.dumps({"model": MODEL, "max_tokens": 16,
                           "messages": [{"role": "user", "content": text}]})
        headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
        if latency_ms is not None:
            headers["x-mock-latency-ms"] = str(latency_ms)
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
            start = time.monotonic()
            try:
                self.conn.request("POST", "/v1/chat/completions", body, headers)
                resp = self.conn.getresponse()
                resp.read()
            except (OSError, http.client.HTTPException):
                self.conn.close()
                self.conn = None
                if attempt == 2:
                    raise
                continue
            took = time.monotonic() - start
            retry = resp.getheader("retry-after-ms") or str(int(resp.getheader("retry-after") or 0) * 1000)
            return (resp.status, took, resp.getheader("x-request-id"), resp.getheader("x-sluice-reason"),
                    int(retry or 0))


def percentile(values, p):
    """The p-th percentile (nearest rank); None for no values."""
    if not values:
        return None
    values = sorted(values)
    rank = max(1, -(-len(values) * p // 100))
    return values[rank - 1]


def ms(seconds):
    return f"{seconds * 1000:.0f} ms"


def latency_line(samples):
    """'20 x 200, p50 4 ms, p90 6 ms, max 9 ms' for [(status, seconds, ...)]."""
    ok = [s[1] for s in samples if s[0] == 200]
    other = len(samples) - len(ok)
    line = f"{len(ok)} x 200" + (f" ({other} not 200!)" if other else "")
    if ok:
        line += f", latency p50 {ms(percentile(ok, 50))}, p90 {ms(percentile(ok, 90))}, max {ms(max(ok))}"
    return line


def prometheus(admin):
    with urllib.request.urlopen(f"{admin}/stats/prometheus", timeout=5) as resp:
        return resp.read().decode()


def gauge(text, name):
    """{labels: value} of one Prometheus series, e.g. {'provider="openai",priority="0"': 17}."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, _, value = line[len(name) + 1:].rpartition("} ")
            out[labels] = float(value)
    return out


def label(labels, key):
    for part in labels.split(","):
        k, _, v = part.partition("=")
        if k == key:
            return v.strip('"')
    return None


def sender(client, key, every_s, stop, samples, text, count=None):
    """Sends one request every `every_s` seconds until `stop` is set (or `count` are sent)."""
    n = 0
    next_at = time.monotonic()
    while not stop.is_set() and n != count:
        n += 1
        samples.append(client.chat(key, f"{text} {n}"))
        next_at += every_s
        time.sleep(max(0.0, next_at - time.monotonic()))


def flooder(client, stop, samples, rng):
    """Sends slow requests back to back; waits out a refusal's retry-after (as SDKs do)."""
    n = 0
    while not stop.is_set():
        n += 1
        result = client.chat(TYRELL, f"flood {n}", latency_ms=rng.randint(300, 700))
        samples.append(result)
        if result[0] != 200:
            stop.wait(min(result[4], 1000) / 1000 or 0.2)


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gateway", default="http://127.0.0.1:10000", help="the demo gateway")
    parser.add_argument("--admin", default="http://127.0.0.1:9901", help="Envoy's admin interface")
    parser.add_argument("--access-log", default=".run/access.log", type=Path,
                        help="the usage records (make demo writes .run/access.log)")
    parser.add_argument("--seconds", type=float, default=10, help="how long the flood lasts (10)")
    parser.add_argument("--flooders", type=int, default=48, help="concurrent flooding clients (48)")
    args = parser.parse_args(argv)

    try:
        urllib.request.urlopen(f"{args.admin}/ready", timeout=2).read()
        status = Client(args.gateway).chat(ACME, "are you there")[0]
    except OSError as e:
        print(f"demo-flood: no gateway at {args.gateway} / {args.admin} ({e}).\n"
              "Start the demo first, in another terminal: make demo", file=sys.stderr)
        return 1
    if status != 200:
        print(f"demo-flood: acme's first request got {status}, not 200: is this `make demo`?",
              file=sys.stderr)
        return 1

    print(f"Noisy neighbour against {args.gateway}: the openai provider takes 8 requests at once;"
          " more wait in Sluice's fair queue.\n")

    # 1. acme alone.
    print("1. acme (gold) alone: 20 requests, one every 100 ms")
    before = []
    sender(Client(args.gateway), ACME, 0.1, threading.Event(), before, "alone", count=20)
    print(f"   acme: {latency_line(before)}\n")

    # 2. The flood, with acme sending throughout.
    print(f"2. tyrell (batch) floods with {args.flooders} clients for {args.seconds:g} s (each request"
          " 300-700 ms at the provider); acme keeps sending every 100 ms")
    flood, during = [], []
    stop = threading.Event()
    rng = random.Random(7)
    threads = [threading.Thread(target=flooder, args=(Client(args.gateway), stop, flood,
                                                       random.Random(rng.random())))
               for _ in range(args.flooders)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # let the flood fill the provider first
    gold = threading.Thread(target=sender, args=(Client(args.gateway), ACME, 0.1, stop, during, "during"))
    gold.start()
    peak_waiting, started = {}, time.monotonic()
    while time.monotonic() - started < args.seconds:
        time.sleep(1)
        try:
            text = prometheus(args.admin)
        except OSError:
            continue
        waiting = gauge(text, "sluice_queue_waiting")
        in_flight = gauge(text, "sluice_queue_in_flight")
        for labels, value in waiting.items():
            peak_waiting[labels] = max(peak_waiting.get(labels, 0), value)
        openai = {label(l, "priority"): v for l, v in waiting.items() if label(l, "provider") == "openai"}
        queued = ", ".join(f"priority {p}: {v:.0f}" for p, v in sorted(openai.items(), reverse=True)) or "none"
        flying = sum(v for l, v in in_flight.items() if label(l, "provider") == "openai")
        last = during[-1][1] if during else None
        print(f"   t={time.monotonic() - started:4.1f} s  openai in flight {flying:.0f}, waiting {queued};"
              f"  acme's last request {ms(last) if last is not None else '-'}")
    stop.set()
    for t in threads + [gold]:
        t.join()

    # 3. What happened.
    outcomes = {}
    for status, _, _, reason, _ in flood:
        key = "200" if status == 200 else f"{status} {reason or ''}".strip()
        outcomes[key] = outcomes.get(key, 0) + 1
    print("\nResult")
    print(f"  acme (gold)     alone:  {latency_line(before)}")
    print(f"                  flood:  {latency_line(during)}")
    why = {"429 queue_full": "20 of its requests were already waiting",
           "503 queue_timeout": "waited its tier's 3 s"}
    print(f"  tyrell (batch)  {len(flood)} requests: " + ", ".join(
        f"{n} x {k}" + (f" ({why[k]})" if k in why else "")
        for k, n in sorted(outcomes.items(), key=lambda kv: -kv[1])))

    # Queue waits from the usage records (Envoy writes the access log within a second).
    time.sleep(1.5)
    ids = {s[2]: tenant for tenant, samples in (("acme", during), ("tyrell", flood)) for s in samples}
    waits = {"acme": [], "tyrell": []}
    try:
        for line in args.access_log.read_text().splitlines():
            try:
                record = json.loads(line).get("sluice") or {}
            except ValueError:
                continue
            tenant = ids.get(record.get("request_id"))
            if tenant and record.get("outcome") == "success":
                waits[tenant].append(record.get("queue_wait_ms") or 0)
    except OSError as e:
        print(f"  (cannot read {args.access_log}: {e}; run from the repository root, or pass --access-log)")
    if waits["acme"] or waits["tyrell"]:
        print(f"  queue_wait_ms of the served requests, from the usage records in {args.access_log}:")
        for tenant, values in waits.items():
            if values:
                print(f"    {tenant:<7} p50 {percentile(values, 50)} ms, p90 {percentile(values, 90)} ms,"
                      f" max {max(values)} ms  ({len(values)} requests)")
    if waits["acme"] and waits["tyrell"]:
        print("  (in one first-come first-served queue, acme would have waited about as long as tyrell)")
    if peak_waiting:
        print("  peak sluice_queue_waiting seen: " + ", ".join(
            f"{labels} {v:.0f}" for labels, v in sorted(peak_waiting.items())))
    print(f"""
Where to look
  curl -s {args.admin}/stats/prometheus | grep -E '^sluice_queue_(waiting|in_flight)'
      requests waiting per provider and priority, and requests in flight per provider
  curl -s {args.admin}/stats/prometheus | grep '^sluice_queue_wait_ms_' | grep -E 'tier="(gold|batch)"'
      the queue wait histogram per provider and tier
  curl -s {args.admin}/stats/prometheus | grep '^sluice_requests_total' | grep queue_
      shed requests: outcome="rejected", reason="queue_full" or "queue_timeout"
  grep '"tenant":"tyrell"' {args.access_log} | tail -3
      usage records: queue_wait_ms per request (null when it found a free slot at once)""")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
