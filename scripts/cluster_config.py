#!/usr/bin/env python3
"""Envoy config for one gateway of a Sluice cluster (global limits), generated from envoy/demo.yaml.

Usage: scripts/cluster_config.py [--base FILE] [--listener-port N] [--admin-port N]
                                 [--access-log PATH] [--quota-host HOST] [--quota-port N]
                                 [--on-engine-failure deny|local] [--timeout-ms N]
                                 [--lease-ms N] [--settle-attempts N]
                                 [--cache-store global|local] [--out FILE]

Prints (or writes to --out) the base Envoy config (default envoy/demo.yaml) with:
  - a `global` section in the Sluice JSON: the quota service's cluster `sluice_quota`, every
    tenant and tenant-model limit global and every provider limit global (requests_per_minute,
    tokens_per_minute, concurrent_requests, monthly_tokens, monthly_budget_usd),
    on_engine_failure (default deny), timeout_ms 50, lease_ms 30000, settle_attempts 3;
  - a `cache_store` section: the response cache in Redis, shared by every gateway
    (--cache-store global, default) or in each gateway's shared data (local);
  - the cluster `sluice_quota`: HTTP/2 (h2c) to the quota service, STATIC on --quota-host
    (default 127.0.0.1) port --quota-port (default 18090);
  - only if given: the listener's port (--listener-port), the admin port (--admin-port) and
    the access log's path (--access-log). Without them those parts are kept as they are, so a
    base whose ports are already substituted (a test's rendered demo config) only gains the
    cluster and the `global` section:
        python3 scripts/cluster_config.py --base rendered.yaml --quota-port 40123 > out.yaml

Used by scripts/demo-cluster.sh (two gateways, 10000/9901 and 10001/9902), by
scripts/compose_config.py (the docker-compose gateway) and by the system tests. Each change is
a substitution whose anchor must match exactly as often as expected: a base the generator does
not understand (already has a `global` section or a sluice_quota cluster, no plugin JSON, two
listeners, ...) fails here, loudly, naming the part. Standard library only.
"""
import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BASE = ROOT / "envoy" / "demo.yaml"

QUOTA_CLUSTER = "sluice_quota"
LIMITS = ["requests_per_minute", "tokens_per_minute", "concurrent_requests",
          "monthly_tokens", "monthly_budget_usd"]


class GeneratorError(Exception):
    pass


def expect(condition, message):
    """An assert that survives `python -O` and names what did not match."""
    if not condition:
        raise GeneratorError(message)


def sub_exact(text, pattern, replacement, count, what, source):
    """re.subn that must replace exactly `count` times."""
    out, found = re.subn(pattern, replacement, text, flags=re.M)
    expect(found == count, f"{what}: expected {count} match(es) of /{pattern}/ in {source}, "
                           f"found {found}")
    return out


def global_section(on_engine_failure="deny", timeout_ms=50, lease_ms=30000, settle_attempts=3,
                   cluster=QUOTA_CLUSTER, authority=None, limits=None, provider_limits=None):
    section = {"cluster": cluster}
    if authority is not None:
        section["authority"] = authority
    section.update({
        "timeout_ms": timeout_ms,
        "limits": list(LIMITS if limits is None else limits),
        "provider_limits": list(LIMITS if provider_limits is None else provider_limits),
        "on_engine_failure": on_engine_failure,
        "lease_ms": lease_ms,
        "settle_attempts": settle_attempts,
    })
    return section


def add_global(text, section, source, cache_store=None):
    """Adds `"global": {...}` (and `"cache_store": {...}` if given) as the first members of the
    plugin's JSON (the `value: |` block).

    Inserted as text, so the rest of the JSON (and its layout) is kept byte for byte; the result
    is parsed again and must equal the original plus the section."""
    anchor = re.compile(
        r'^( *)"@type": type\.googleapis\.com/google\.protobuf\.StringValue\n\1value: \|\n', re.M)
    found = anchor.findall(text)
    expect(len(found) == 1, f"plugin configuration: expected one StringValue `value: |` block "
                            f"in {source}, found {len(found)}")
    match = anchor.search(text)
    lines = text[match.end():].split("\n")
    expect(lines and lines[0].strip(), f"plugin configuration: the `value: |` block in {source} "
                                       "is empty")
    indent = len(lines[0]) - len(lines[0].lstrip(" "))
    block = []
    for line in lines:
        if line.strip() and len(line) - len(line.lstrip(" ")) < indent:
            break
        block.append(line)
    while block and not block[-1].strip():
        block.pop()
    json_text = "\n".join(block)
    try:
        config = json.loads(json_text)
    except ValueError as e:
        raise GeneratorError(f"plugin configuration in {source} is not JSON: {e}") from e
    expect(isinstance(config, dict), f"plugin configuration in {source} is not a JSON object")
    expect("global" not in config, f"plugin configuration in {source} already has a `global` "
                                   "section")
    expect("cache_store" not in config or cache_store is None,
           f"plugin configuration in {source} already has a `cache_store` section")
    brace = json_text.index("{")
    added = {"global": section}
    if cache_store is not None:
        added["cache_store"] = cache_store
    member = ""
    for name, value in added.items():
        # One member per line, aligned under the first: {"cluster": ...,\n  "timeout_ms": ...}
        opening = " " * (indent + 2) + json.dumps(name) + ": {"
        members = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in value.items()]
        member += "\n" + opening + (",\n" + " " * len(opening)).join(members) + "},"
    if not re.match(r"[ \t]*\n", json_text[brace + 1:]):
        # One-line JSON ({"max_body_bytes":...}): the rest goes on its own, deeper line.
        member += "\n" + " " * (indent + 2)
    new_json = json_text[:brace + 1] + member + json_text[brace + 1:]
    expect(json.loads(new_json) == {**added, **config},
           f"plugin configuration in {source}: adding `global` changed something else")
    start = match.end()
    return text[:start] + new_json + text[start + len(json_text):]


def quota_cluster_yaml(host, port, cluster_type):
    return f"""\
  # The quota service (sluice-quota): Sluice's global limits, kept in Redis. Sluice calls it
  # from the filter (dispatch_http_call on this cluster, the `global` section of its
  # configuration), over HTTP/2 without TLS (h2c), one multiplexed connection per worker.
  - name: {QUOTA_CLUSTER}
    type: {cluster_type}
    connect_timeout: 0.25s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
    load_assignment:
      cluster_name: {QUOTA_CLUSTER}
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: {host}, port_value: {port} }} }} }}
"""


def add_quota_cluster(text, host, port, cluster_type, source):
    """Adds the sluice_quota cluster as the first entry of static_resources.clusters."""
    expect(f"- name: {QUOTA_CLUSTER}\n" not in text,
           f"clusters: {source} already defines a cluster {QUOTA_CLUSTER}")
    return sub_exact(text, r"^  clusters:\n", lambda m: m.group(0)
                     + quota_cluster_yaml(host, port, cluster_type), 1, "clusters", source)


def generate(base, source, listener_port=None, admin_port=None, access_log=None,
             quota_host="127.0.0.1", quota_port=18090, section=None, cache_store=None):
    out = base
    if admin_port is not None:
        out = sub_exact(out, r"^(admin:\n  address:\n    socket_address: \{ address: [^,]+, "
                             r"port_value: )\d+( \}\n)",
                        lambda m: f"{m.group(1)}{admin_port}{m.group(2)}", 1, "admin port", source)
    if listener_port is not None:
        out = sub_exact(out, r"^(  - name: \S+\n    address:\n      socket_address: \{ address: "
                             r"[^,]+, port_value: )\d+( \}\n)",
                        lambda m: f"{m.group(1)}{listener_port}{m.group(2)}", 1, "listener port",
                        source)
    if access_log is not None:
        out = sub_exact(out, r"^( +path: )\S+\.log\n",
                        lambda m: f"{m.group(1)}{access_log}\n", 1, "access log path", source)
    out = add_global(out, section or global_section(), source, cache_store)
    out = add_quota_cluster(out, quota_host, quota_port, "STATIC", source)
    return out


def header(args):
    parts = [f"quota service {args.quota_host}:{args.quota_port}",
             f"on_engine_failure {args.on_engine_failure}"]
    if args.listener_port is not None:
        parts.insert(0, f"listener {args.listener_port}")
    if args.admin_port is not None:
        parts.insert(1 if args.listener_port is not None else 0, f"admin {args.admin_port}")
    return (f"# generated by scripts/cluster_config.py from {args.source}; do not edit.\n"
            f"# One gateway of a Sluice cluster with global limits:\n# {', '.join(parts)}.\n")


def port(value):
    number = int(value)
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port")
    return number


def positive(value):
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return number


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="cluster_config.py",
        description=__doc__.split("\n\n", 2)[2].split("\n\nUsed by")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Used by scripts/demo-cluster.sh, scripts/compose_config.py and the system tests.")
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE,
                        help="Envoy config to start from (default: envoy/demo.yaml)")
    parser.add_argument("--listener-port", type=port, help="the gateway listener's port")
    parser.add_argument("--admin-port", type=port, help="Envoy admin's port")
    parser.add_argument("--access-log", help="the access log's path (usage records)")
    parser.add_argument("--quota-host", default="127.0.0.1",
                        help="the quota service's IP address (default 127.0.0.1)")
    parser.add_argument("--quota-port", type=port, default=18090,
                        help="the quota service's port (default 18090)")
    parser.add_argument("--on-engine-failure", choices=["deny", "local"], default="deny",
                        help="when the quota service does not answer: refuse (deny, default) "
                             "or decide on this gateway's own counters (local)")
    parser.add_argument("--timeout-ms", type=positive, default=50, help="per callout (default 50)")
    parser.add_argument("--lease-ms", type=positive, default=30000,
                        help="concurrency lease (default 30000)")
    parser.add_argument("--settle-attempts", type=positive, default=3,
                        help="settlement tries (default 3)")
    parser.add_argument("--cache-store", choices=["local", "global"], default="global",
                        help="where cached responses live: in Redis, shared by every gateway "
                             "(global, default), or in each gateway's own shared data (local)")
    parser.add_argument("--out", type=Path, help="write here instead of stdout")
    return parser.parse_args(argv)


def main(argv):
    args = parse_args(argv)
    base_path = args.base if args.base.is_absolute() else Path.cwd() / args.base
    try:
        args.source = str(base_path.resolve().relative_to(ROOT))
    except ValueError:
        args.source = str(args.base)
    try:
        base = base_path.read_text()
    except OSError as e:
        print(f"cluster_config.py: cannot read {args.base}: {e}", file=sys.stderr)
        return 1
    section = global_section(args.on_engine_failure, args.timeout_ms, args.lease_ms,
                             args.settle_attempts)
    try:
        out = generate(base, args.source, args.listener_port, args.admin_port, args.access_log,
                       args.quota_host, args.quota_port, section,
                       {"engine": args.cache_store})
    except GeneratorError as e:
        print(f"cluster_config.py: cannot generate from {args.source}: {e}", file=sys.stderr)
        return 1
    out = header(args) + out
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(out)
    else:
        sys.stdout.write(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
