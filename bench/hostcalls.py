"""make bench-hostcalls: the price of each kind of Proxy-Wasm host call Sluice makes.

The probe filter (bench/noop, configured with `op=count` words) makes exactly the listed
host calls per request and nothing else. Every variant runs in its own Envoy (1 worker)
against the same direct_response upstream used by run.py; all are started together and
measured round-robin, so drift on the noisy 2-core machine spreads over every variant.
Each variant's CPU us/request minus its base variant's, divided by the call count, is the
price of one call.

Usage: hostcalls.py OUT_DIR [--reps N] [--seconds S]
"""
import argparse
import json
from pathlib import Path

import run
from run import med, spread

SLUICE_CALLS = run.SLUICE_CALLS

# name: (probe plan, base variant, calls counted); the plan always includes the base's.
VARIANTS = {
    # Plain Envoy, no filter: the floor the ratios below are taken against.
    "plain": (None, None, 0),
    "noop": ("", None, 0),
    "body": ("body=1", "noop", 1),
    "header_map": ("header_map=4", "noop", 4),
    "header_get": ("header_get=8", "noop", 8),
    "time": ("time=8", "noop", 8),
    "metric": ("metric=8", "noop", 8),
    "shared": ("shared=8", "noop", 8),
    "body_header_set": ("body=1 body_header_set=8", "body", 8),
    "body_replace": ("body=1 body_replace=1", "body", 1),
    "response_header_get": ("response_header_get=8", "noop", 8),
    "response_header_set": ("response_header_set=8", "noop", 8),
    "response_body": ("response_body=4", "noop", 4),
    "property": ("property=4", "noop", 4),
    # Sluice's calls on the bench request: gold tier, 3 limits taken at admission, 2 settled
    # (requests/min needs no settlement), 5 metric updates.
    "sluice_shaped": (SLUICE_CALLS, "noop", 0),
    # The same probe inside Sluice's own Envoy configuration (routes, access log, stats
    # tags), then Sluice itself: the steps from the no-op filter to Sluice's full path.
    "sluice_shaped_demo_config": (SLUICE_CALLS + " cluster=1", "noop", 0),
    "sluice": (None, "noop", 0),
}

WHAT = {
    "body": "pause for the request body, read it (Envoy buffers it)",
    "header_map": "read all request headers (`get_map_bytes`)",
    "header_get": "read one request header",
    "time": "read the clock",
    "metric": "increment a counter",
    "shared": "shared-data get + compare-and-set of one key",
    "body_header_set": "set a request header in the body callback",
    "body_replace": "replace the request body (same bytes)",
    "response_header_get": "read one response header",
    "response_header_set": "set a response header",
    "response_body": "read the response body",
    "property": "write a filter-state property in `on_log`",
}


def probe_yaml(port, admin, upstream_port, plan):
    config = ""
    if plan:
        config = f"""                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: "{plan}"
"""
    filt = run.noop_filter().replace("                vm_config:", config + "                vm_config:")
    # As in Sluice's own config: pausing in the headers callback to read the body.
    filt = filt.replace("                vm_config:", "                allow_on_headers_stop_iteration: true\n                vm_config:")
    return run.envoy_yaml(port, admin, filt, run.cluster("upstream", upstream_port),
                          "route: {cluster: upstream, timeout: 60s}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=4)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path, how in [(run.ENVOY, "run `make envoy`"), (run.NOOP_WASM, "run `make bench-hostcalls`"),
                      (run.OHA, "run `make bench` (installs oha)")]:
        run.need(path, how)
    import tempfile, shutil
    tmp = tempfile.mkdtemp(prefix="sluice-hostcalls-")
    procs, gateways = [], {}
    samples = {name: [] for name in VARIANTS}
    rps = {name: [] for name in VARIANTS}
    try:
        up_port, up_admin = run.free_port(), run.free_port()
        procs.append(run.start_envoy(tmp, "upstream", run.upstream_yaml(up_port, up_admin), up_admin))
        for name, (plan, _, _) in VARIANTS.items():
            port, admin = run.free_port(), run.free_port()
            if name == "plain":
                yaml = run.envoy_yaml(port, admin, "", run.cluster("upstream", up_port),
                                      "route: {cluster: upstream, timeout: 60s}")
            elif name == "sluice":
                yaml = run.sluice_yaml(tmp, port, admin, up_port)
            elif name == "sluice_shaped_demo_config":
                yaml = run.probe_in_sluice_config(tmp, port, admin, up_port, plan)
            else:
                yaml = probe_yaml(port, admin, up_port, plan)
            gw = run.start_envoy(tmp, name, yaml, admin)
            procs.append(gw)
            gateways[name] = (gw, f"http://127.0.0.1:{port}/v1/chat/completions")
        for rep in range(args.reps):
            for name, (gw, url) in gateways.items():
                r = run.measure(gw, url, [f"authorization: Bearer {run.KEY}"], args.seconds, 1, {})["saturation"][0]
                if r["ok"] == 0 or r["ok"] != r["total"]:
                    raise SystemExit(f"bench: variant {name} answered {r['total'] - r['ok']} non-2xx")
                samples[name].append(r["cpu_us_per_req"])
                rps[name].append(r["rps"])
            print(f"bench: host calls, repetition {rep + 1}/{args.reps} done", flush=True)
        run.assert_upstream_connections_reused(up_admin)
    finally:
        for p in procs:
            p.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    cpu = {name: med(v) for name, v in samples.items()}
    lines = [f"{args.reps} round-robin repetitions of {args.seconds} s at saturation, 1 Envoy worker each; "
             "CPU us/request medians with min-max.", "",
             "| host call | variant CPU us/request | its base | calls/request | us per call |", "|---|---|---|---|---|"]
    for name, (plan, base, n) in VARIANTS.items():
        if base is None or n == 0:
            continue
        per = (cpu[name] - cpu[base]) / n
        lines.append(f"| {WHAT[name]} | {cpu[name]:.1f} [{spread(samples[name])}] | {base} {cpu[base]:.1f} | {n} | "
                     f"{per:.2f} |")
    lines += ["", f"No-op filter: {cpu['noop']:.1f} us/request [{spread(samples['noop'])}]. "
              f"A probe making Sluice's host calls and nothing else (`{VARIANTS['sluice_shaped'][0]}`): "
              f"{cpu['sluice_shaped']:.1f} us/request [{spread(samples['sluice_shaped'])}], "
              f"+{cpu['sluice_shaped'] - cpu['noop']:.1f} us over the no-op filter.", "",
              "From plain Envoy to Sluice, step by step:", "",
              "| step | CPU us/request | added | vs plain Envoy | saturation req/s | vs plain Envoy |",
              "|---|---|---|---|---|---|"]
    prev = None
    for name, what in [("plain", "plain Envoy, no filter"),
                       ("noop", "no-op Proxy-Wasm filter"),
                       ("sluice_shaped", "+ Sluice's host calls (probe)"),
                       ("sluice_shaped_demo_config", "+ Sluice's Envoy configuration (routes, access log, stats tags)"),
                       ("sluice", "+ Sluice's own code in V8 = Sluice, full path")]:
        added = "" if prev is None else f"{cpu[name] - cpu[prev]:+.1f}"
        lines.append(f"| {what} | {cpu[name]:.1f} [{spread(samples[name])}] | {added} | "
                     f"{cpu[name] / cpu['plain']:.2f}x | {med(rps[name]):.0f} | {med(rps[name]) / med(rps['plain']):.2f} |")
        prev = name
    (out / "hostcalls.md").write_text("\n".join(lines) + "\n")
    (out / "hostcalls.json").write_text(json.dumps({"samples": samples, "rps": rps, "variants": VARIANTS}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
