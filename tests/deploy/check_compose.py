#!/usr/bin/env python3
"""Checks the docker-compose demo (envoy/docker-compose.yaml) as far as is possible without Docker.

Run from anywhere, with PyYAML installed (the project's .venv after `make sdk`):
    SLUICE_ENVOY=.venv/bin/envoy SLUICE_WASM=target/wasm32-wasip1/release/sluice.wasm \\
      SLUICE_RELAY=target/release/libsluice_relay.so .venv/bin/python tests/deploy/check_compose.py

1. The compose file parses, has no top-level `version:`, has the services mock, envoy, quota,
   redis, prometheus and grafana, and every build context, Dockerfile, bind-mount source and
   named volume it names exists (relative to the compose file).
2. Ports: the gateway (10000), Envoy admin (9901), Prometheus (9090) and Grafana (3000) are
   published, nothing else (not Redis, not the quota service), and all but the gateway only
   on loopback; the Envoy image is the official one, at the Makefile's ENVOY_VERSION minor.
3. Wiring: Envoy's -c, the wasm filename and the stream relay's filename are the mounted
   files (the relay's is the build output target/release/libsluice_relay.so, and its filter
   sits after Sluice's and before the router); every provider cluster
   names a compose service and a port that service's mock provider listens on (0.0.0.0); the
   provider keys Envoy's Sluice sends match the keys the mocks expect, with the same prefixes.
   Global limits: the Sluice JSON's `global.cluster` is a STRICT_DNS, HTTP/2 cluster on the
   compose service that runs sluice-quota, at the port of its `--listen 0.0.0.0:PORT`; that
   service's `--redis redis://HOST:PORT/` names the Redis service and its port; Redis runs
   with appendonly yes and keeps /data in a named volume; Envoy waits for the quota service
   and the quota service for Redis (depends_on ... service_healthy, with healthchecks).
4. The build stage of every service built here (the repository's Dockerfile, once per PACKAGE): its COPY
   lines are replayed (honouring .dockerignore) and `cargo fetch --locked` must load the
   workspace from exactly those files.
5. `scripts/compose_config.py --check`: envoy/compose/envoy.yaml is what envoy/demo.yaml generates.
6. Monitoring: Prometheus (official image, pinned tag) runs with the mounted
   ops/prometheus/prometheus.yml, loads every rule file of ops/prometheus/ from mounts, keeps
   at least 30 days (the budget rules look that far back), and its job `sluice` scrapes
   /stats/prometheus on the compose service envoy at the admin port of the generated Envoy
   config (bound to 0.0.0.0); `promtool check config` accepts the file (when promtool is
   installed: `make ops`). Grafana (official image, pinned tag) gets ops/grafana/provisioning's
   datasources and dashboards; its datasource is http://prometheus:<the port Prometheus
   listens on>, and the dashboard provider's path holds the mounted sluice-dashboard.json.
7. `$SLUICE_ENVOY --mode validate` on envoy/compose/envoy.yaml (wasm path pointed at
   $SLUICE_WASM, the relay's at $SLUICE_RELAY) with the compose file's Envoy environment: this
   runs the filter's on_configure and loads the relay with its configuration, so a missing
   provider key, a bad Sluice config or a bad relay config fails here.

Exits 1 with a message naming what is wrong; prints what it checked on success.
"""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "envoy" / "docker-compose.yaml"
GENERATED = ROOT / "envoy" / "compose" / "envoy.yaml"
GENERATOR = ROOT / "scripts" / "compose_config.py"
WASM_BUILD = ROOT / "target" / "wasm32-wasip1" / "release" / "sluice.wasm"
RELAY_BUILD = ROOT / "target" / "release" / "libsluice_relay.so"
RELAY_TYPE = "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter"
GATEWAY_PORT, ADMIN_PORT = 10000, 9901
PROMETHEUS_PORT, GRAFANA_PORT = 9090, 3000
QUOTA_SERVICE, REDIS_SERVICE = "quota", "redis"
PROMETHEUS_SERVICE, GRAFANA_SERVICE = "prometheus", "grafana"
OPS = ROOT / "ops"
PROMETHEUS_CONFIG = OPS / "prometheus" / "prometheus.yml"
DASHBOARD = OPS / "grafana" / "sluice-dashboard.json"
LOOPBACK = ("127.0.0.1", "[::1]", "::1")

checked = []


def fail(message):
    print(f"check_compose: FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def ok(message):
    checked.append(message)


def rel(path):
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


try:
    import yaml
except ImportError:
    fail(f"PyYAML is not installed for {sys.executable}: run `make sdk` (it installs PyYAML "
         "into .venv; use .venv/bin/python) or `pip install pyyaml`")


# ---------------------------------------------------------------- compose file, paths


def load_compose():
    try:
        compose = yaml.safe_load(COMPOSE.read_text())
    except (OSError, yaml.YAMLError) as e:
        fail(f"cannot parse {rel(COMPOSE)}: {e}")
    if not isinstance(compose, dict) or not isinstance(compose.get("services"), dict):
        fail(f"{rel(COMPOSE)} has no `services:` mapping")
    if "version" in compose:
        fail(f"{rel(COMPOSE)} has a top-level `version:`; the compose spec has none")
    for name in ("mock", "envoy", QUOTA_SERVICE, REDIS_SERVICE, PROMETHEUS_SERVICE, GRAFANA_SERVICE):
        if not isinstance(compose["services"].get(name), dict):
            fail(f"{rel(COMPOSE)} has no service `{name}`")
    ok(f"{rel(COMPOSE)} parses; services: {', '.join(compose['services'])}")
    return compose


def parse_volume(service, volume, named_volumes):
    """Returns (source Path or None for a named volume, target) of one `volumes:` entry."""
    if isinstance(volume, dict):
        source, target, kind = volume.get("source"), volume.get("target"), volume.get("type")
        if kind != "bind":
            if source not in named_volumes:
                fail(f"service {service}: volume {source!r} is not declared under top-level volumes")
            return None, target
    else:
        parts = str(volume).split(":")
        if len(parts) == 1:  # anonymous volume
            return None, parts[0]
        source, target = parts[0], parts[1]
        if not source.startswith((".", "/", "~")):
            if source not in named_volumes:
                fail(f"service {service}: volume {source!r} is not declared under top-level volumes")
            return None, target
    return (COMPOSE.parent / Path(source).expanduser()).resolve(), target


def check_paths(compose):
    """Build contexts, Dockerfiles, env files and bind-mount sources exist. Returns the mounts."""
    named_volumes = compose.get("volumes") or {}
    mounts = {}  # service -> {target: source}
    for name, service in compose["services"].items():
        build = service.get("build")
        if build is not None:
            if isinstance(build, str):
                build = {"context": build}
            context = (COMPOSE.parent / build.get("context", ".")).resolve()
            if not context.is_dir():
                fail(f"service {name}: build context {build.get('context')!r} "
                     f"({rel(context)}) is not a directory")
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            if not dockerfile.is_file():
                fail(f"service {name}: dockerfile {build.get('dockerfile')!r} not found in the "
                     f"build context ({rel(dockerfile)})")
            ok(f"service {name}: build context {rel(context) or '.'}/ and {rel(dockerfile)} exist")
        env_files = service.get("env_file") or []
        for env_file in [env_files] if isinstance(env_files, str) else env_files:
            path = env_file["path"] if isinstance(env_file, dict) else env_file
            if not (COMPOSE.parent / path).is_file():
                fail(f"service {name}: env_file {path!r} does not exist")
        mounts[name] = {}
        for volume in service.get("volumes") or []:
            source, target = parse_volume(name, volume, named_volumes)
            if source is None:
                continue
            if not source.exists():
                hint = ("; build it with `make wasm`" if source.name.endswith(".wasm")
                        else "; build it with `make relay`" if source.name.endswith(".so") else "")
                fail(f"service {name}: bind-mount source {rel(source)} does not exist "
                     f"(mounted at {target}){hint}")
            mounts[name][target] = source
            ok(f"service {name}: bind mount {rel(source)} -> {target} exists")
    return mounts


# ---------------------------------------------------------------- ports, image


def parse_port(service, port):
    """Returns (host_ip, published, target) of one `ports:` entry."""
    if isinstance(port, dict):
        return port.get("host_ip", ""), int(port.get("published", 0)), int(port["target"])
    text = str(port).split("/")[0]
    parts = text.rsplit(":", 2)
    if len(parts) == 3:
        host_ip, published, target = parts
    elif len(parts) == 2:
        host_ip, (published, target) = "", parts
    else:
        fail(f"service {service}: port {port!r} publishes a random host port")
    if "-" in published or "-" in target:
        fail(f"service {service}: port ranges are not expected ({port!r})")
    return host_ip, int(published), int(target)


def check_ports(compose):
    published = {}
    for name, service in compose["services"].items():
        for port in service.get("ports") or []:
            host_ip, host_port, target = parse_port(name, port)
            if host_port != target:
                fail(f"service {name}: port {port!r} maps host {host_port} to {target}; "
                     "the demo uses the same port on both sides")
            published[host_port] = (name, host_ip)
    expected = {GATEWAY_PORT: "envoy", ADMIN_PORT: "envoy", PROMETHEUS_PORT: PROMETHEUS_SERVICE,
                GRAFANA_PORT: GRAFANA_SERVICE}
    if sorted(published) != sorted(expected):
        fail(f"published ports are {sorted(published)}; expected exactly "
             f"{GATEWAY_PORT} (gateway), {ADMIN_PORT} (Envoy admin), {PROMETHEUS_PORT} (Prometheus) "
             f"and {GRAFANA_PORT} (Grafana)")
    for port, (name, _) in published.items():
        if name != expected[port]:
            fail(f"port {port} is published by service {name}, expected {expected[port]}")
    # Envoy's admin can stop the server and change runtime; Prometheus and Grafana show every
    # tenant's traffic and spend: never publish them beyond loopback.
    for port in (ADMIN_PORT, PROMETHEUS_PORT, GRAFANA_PORT):
        if published[port][1] not in LOOPBACK:
            fail(f"port {port} ({expected[port]}) is published on "
                 f"{published[port][1] or 'all interfaces'}; publish it on 127.0.0.1 only")
    shown = [f"{ip or '*'}:{port} ({name})" for port, (name, ip) in sorted(published.items())]
    ok(f"published ports: {', '.join(shown)}")


def check_image(compose):
    image = str(compose["services"]["envoy"].get("image", ""))
    makefile = (ROOT / "Makefile").read_text()
    wanted = re.search(r"^ENVOY_VERSION\s*:?=\s*(\d+)\.(\d+)\.\d+\s*$", makefile, flags=re.M)
    if not wanted:
        fail("cannot find `ENVOY_VERSION := X.Y.Z` in the Makefile")
    match = re.fullmatch(r"envoyproxy/envoy:v(\d+)\.(\d+)(?:\.\d+|-latest)", image)
    if not match:
        fail(f"envoy image is {image!r}; expected the official envoyproxy/envoy:vX.Y-latest "
             "or :vX.Y.Z")
    if match.groups() != wanted.groups():
        fail(f"envoy image {image!r} is not Envoy {'.'.join(wanted.groups())} "
             "(the Makefile's ENVOY_VERSION, which the tests use)")
    ok(f"envoy image {image} matches the Makefile's Envoy {'.'.join(wanted.groups())}")


# ---------------------------------------------------------------- wiring


def command_list(service):
    command = service.get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def environment(service):
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {k: (None if v is None else str(v)) for k, v in env.items()}


def mock_providers(compose):
    """port -> {service, name, kind, host, prefix, key_env} for every `--provider` of every service."""
    found = {}
    for name, service in compose["services"].items():
        args = command_list(service)
        values = [v for flag, v in zip(args, args[1:]) if flag in ("--provider", "-p")]
        values += [a.split("=", 1)[1] for a in args if a.startswith("--provider=")]
        for value in values:
            fields = value.split(",")
            if len(fields) != 5:
                fail(f"service {name}: --provider {value!r} is not NAME,KIND,ADDR,PREFIX,KEY_ENV")
            provider, kind, addr, prefix, key_env = fields
            host, _, port = addr.rpartition(":")
            found[int(port)] = dict(service=name, name=provider, kind=kind, host=host,
                                    prefix=prefix, key_env=key_env)
    return found


def check_wiring(compose, mounts):
    envoy = compose["services"]["envoy"]
    envoy_mounts = mounts.get("envoy", {})
    args = command_list(envoy)
    if "-c" not in args or args.index("-c") + 1 >= len(args):
        fail("service envoy: its command has no `-c <config>`")
    config_path = args[args.index("-c") + 1]
    if envoy_mounts.get(config_path) != GENERATED.resolve():
        fail(f"service envoy: -c {config_path} is not a bind mount of {rel(GENERATED)}")
    ok(f"service envoy: -c {config_path} is {rel(GENERATED)}")

    try:
        config = yaml.safe_load(GENERATED.read_text())
    except (OSError, yaml.YAMLError) as e:
        fail(f"cannot parse {rel(GENERATED)}: {e}")
    wasm, relay, chain_names = None, None, []
    for listener in config["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                for http_filter in network_filter["typed_config"].get("http_filters", []):
                    chain_names.append(http_filter["name"])
                    if http_filter["name"] == "envoy.filters.http.wasm":
                        wasm = http_filter["typed_config"]["config"]
                    if (http_filter.get("typed_config") or {}).get("@type") == RELAY_TYPE:
                        if relay is not None:
                            fail(f"{rel(GENERATED)} has more than one dynamic-module filter")
                        relay = http_filter
    if wasm is None:
        fail(f"{rel(GENERATED)} has no envoy.filters.http.wasm filter")
    filename = wasm["vm_config"]["code"]["local"]["filename"]
    if envoy_mounts.get(filename) != WASM_BUILD.resolve():
        fail(f"service envoy: the filter loads {filename}, which is not a bind mount of "
             f"{rel(WASM_BUILD)}")
    ok(f"service envoy: the filter loads {filename} = {rel(WASM_BUILD)}")

    # Sluice's stream relay: the mounted build output, right after Sluice, before the router.
    if relay is None:
        fail(f"{rel(GENERATED)} has no stream relay (a {RELAY_TYPE.rsplit('.', 1)[1]} filter)")
    module = relay["typed_config"].get("dynamic_module_config") or {}
    relay_file = ((module.get("module") or {}).get("local") or {}).get("filename")
    if not relay_file:
        fail(f"{rel(GENERATED)}: the relay filter {relay['name']} has no "
             "dynamic_module_config.module.local.filename")
    source = envoy_mounts.get(relay_file)
    if source != RELAY_BUILD.resolve() or not source.is_file():
        fail(f"service envoy: the stream relay loads {relay_file}, which is not a bind mount of "
             f"the file {rel(RELAY_BUILD)} (`make relay` builds it)")
    at = chain_names.index(relay["name"])
    if chain_names[at - 1:at + 2] != ["envoy.filters.http.wasm", relay["name"],
                                      "envoy.filters.http.router"]:
        fail(f"{rel(GENERATED)}: the relay filter {relay['name']} must come right after Sluice's "
             f"and right before the router; the chain is {chain_names}")
    ok(f"service envoy: the stream relay loads {relay_file} = {rel(RELAY_BUILD)}, between Sluice "
       "and the router")

    # Every provider cluster points at a compose service and a port its mock listens on.
    sluice = json.loads(wasm["configuration"]["value"])
    quota_cluster = (sluice.get("global") or {}).get("cluster")
    if not quota_cluster:
        fail(f"{rel(GENERATED)}: the Sluice configuration has no `global` section with a cluster "
             "(the compose demo runs with global limits)")
    mocks = mock_providers(compose)
    cluster_port = {}
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] == quota_cluster:
            continue
        for group in cluster["load_assignment"]["endpoints"]:
            for lb_endpoint in group["lb_endpoints"]:
                address = lb_endpoint["endpoint"]["address"]["socket_address"]
                host, port = address["address"], address["port_value"]
                if host not in compose["services"]:
                    fail(f"cluster {cluster['name']}: host {host!r} is not a compose service")
                if cluster.get("type") not in ("STRICT_DNS", "LOGICAL_DNS"):
                    fail(f"cluster {cluster['name']}: type {cluster.get('type')} cannot resolve "
                         f"the service name {host!r}; use STRICT_DNS")
                mock = mocks.get(port)
                if mock is None or mock["service"] != host:
                    fail(f"cluster {cluster['name']}: no --provider of service {host} listens "
                         f"on port {port}")
                if mock["host"] != "0.0.0.0":
                    fail(f"service {host}: provider {mock['name']} listens on {mock['host']}:{port}; "
                         "in a container it must listen on 0.0.0.0 for Envoy to reach it")
                cluster_port[cluster["name"]] = port
    ok("clusters -> mock providers: " + ", ".join(
        f"{c} -> {mocks[p]['service']}:{p} ({mocks[p]['name']})" for c, p in cluster_port.items()))

    # Sluice sends each provider's key from Envoy's environment; the mock behind that cluster
    # must expect the same value, at the same path prefix.
    envoy_env = environment(envoy)
    host_env_keys = wasm["vm_config"].get("environment_variables", {}).get("host_env_keys", [])
    for key in host_env_keys:
        if not envoy_env.get(key):
            fail(f"service envoy: {key} (in host_env_keys) is not set in its environment")
    for provider in sluice["providers"]:
        port = cluster_port.get(provider["cluster"])
        if port is None:
            fail(f"Sluice provider {provider['name']}: cluster {provider['cluster']} is not defined")
        mock = mocks[port]
        mock_env = environment(compose["services"][mock["service"]])
        key = provider["api_key_env"]
        if key not in host_env_keys:
            fail(f"Sluice provider {provider['name']}: {key} is not in host_env_keys")
        if mock_env.get(mock["key_env"]) != envoy_env.get(key):
            fail(f"Sluice provider {provider['name']} sends {key} from service envoy's environment, "
                 f"but mock provider {mock['name']} expects {mock['key_env']} from service "
                 f"{mock['service']}'s, and the two differ (or are unset)")
        if provider["path_prefix"] != mock["prefix"]:
            fail(f"Sluice provider {provider['name']} uses path prefix {provider['path_prefix']!r}, "
                 f"mock provider {mock['name']} serves {mock['prefix']!r}")
    ok(f"provider keys ({', '.join(host_env_keys)}) and path prefixes agree between envoy and mock")
    check_global(compose, config, sluice, quota_cluster)
    return envoy_env


def flag_value(args, flag):
    """The value of `--flag VALUE` or `--flag=VALUE` in a command list, or None."""
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def waits_for(compose, service, dependency):
    """`service` starts only once `dependency` is healthy, and `dependency` has a healthcheck."""
    depends = compose["services"][service].get("depends_on") or {}
    condition = depends.get(dependency, {}).get("condition") if isinstance(depends, dict) else None
    if condition != "service_healthy":
        fail(f"service {service}: needs `depends_on: {dependency}: condition: service_healthy` "
             f"(found {depends!r})")
    test = (compose["services"][dependency].get("healthcheck") or {}).get("test")
    if not test or test == ["NONE"]:
        fail(f"service {dependency}: has no healthcheck, so service_healthy never holds")


def check_global(compose, config, sluice, quota_cluster):
    """Envoy -> quota service -> Redis: names, ports, HTTP/2, durability, start order."""
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    cluster = clusters.get(quota_cluster)
    if cluster is None:
        fail(f"{rel(GENERATED)}: global.cluster {quota_cluster!r} is not a cluster")
    if cluster.get("type") not in ("STRICT_DNS", "LOGICAL_DNS"):
        fail(f"cluster {quota_cluster}: type {cluster.get('type')} cannot resolve a compose "
             "service name; use STRICT_DNS")
    options = (cluster.get("typed_extension_protocol_options") or {}).get(
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions") or {}
    if "http2_protocol_options" not in (options.get("explicit_http_config") or {}):
        fail(f"cluster {quota_cluster}: not HTTP/2 (explicit_http_config: "
             "{ http2_protocol_options: {} }); the filter's callouts expect h2c")
    endpoints = [lb["endpoint"]["address"]["socket_address"]
                 for group in cluster["load_assignment"]["endpoints"] for lb in group["lb_endpoints"]]
    if len(endpoints) != 1:
        fail(f"cluster {quota_cluster}: expected one endpoint, found {len(endpoints)}")
    host, port = endpoints[0]["address"], endpoints[0]["port_value"]
    if host != QUOTA_SERVICE:
        fail(f"cluster {quota_cluster}: endpoint host {host!r} is not the compose service "
             f"{QUOTA_SERVICE}")
    quota = compose["services"][QUOTA_SERVICE]
    args = command_list(quota)
    listen = flag_value(args, "--listen")
    if listen != f"0.0.0.0:{port}":
        fail(f"service {QUOTA_SERVICE}: --listen is {listen!r}; Envoy's cluster {quota_cluster} "
             f"expects it on 0.0.0.0:{port} (in a container, every interface)")
    build = quota.get("build") or {}
    dockerfile = (COMPOSE.parent / build.get("context", ".") / build.get("dockerfile", "Dockerfile"))
    package = (build.get("args") or {}).get("PACKAGE")
    if package != "sluice-quota" or '-p "$PACKAGE"' not in dockerfile.read_text():
        fail(f"service {QUOTA_SERVICE}: {rel(dockerfile)} with PACKAGE={package!r} does not build "
             "sluice-quota")
    ok(f"global limits: cluster {quota_cluster} (STRICT_DNS, HTTP/2) -> {host}:{port}, where "
       f"sluice-quota listens (--listen {listen})")

    redis_url = flag_value(args, "--redis") or ""
    match = re.fullmatch(r"redis://([^:/@]+)(?::(\d+))?/(\d*)", redis_url)
    if not match:
        fail(f"service {QUOTA_SERVICE}: --redis {redis_url!r} is not redis://HOST[:PORT]/[DB]")
    redis_host, redis_port = match.group(1), int(match.group(2) or 6379)
    if redis_host != REDIS_SERVICE:
        fail(f"service {QUOTA_SERVICE}: --redis names host {redis_host!r}, not the compose "
             f"service {REDIS_SERVICE}")
    redis = compose["services"][REDIS_SERVICE]
    image = str(redis.get("image", ""))
    if not re.fullmatch(r"(docker\.io/)?(library/)?redis:7(\.\d+)*(-\S+)?", image):
        fail(f"service {REDIS_SERVICE}: image {image!r} is not the official redis:7")
    redis_args = command_list(redis)
    if redis_args[:1] != ["redis-server"]:
        fail(f"service {REDIS_SERVICE}: command should start with redis-server, found {redis_args}")
    served_port = int(flag_value(redis_args, "--port") or 6379)
    if served_port != redis_port:
        fail(f"service {REDIS_SERVICE}: serves port {served_port}, the quota service's --redis "
             f"says {redis_port}")
    if flag_value(redis_args, "--appendonly") != "yes":
        fail(f"service {REDIS_SERVICE}: needs --appendonly yes (counters and monthly budgets "
             "must survive a restart)")
    fsync = flag_value(redis_args, "--appendfsync") or "everysec"
    if fsync not in ("everysec", "always"):
        fail(f"service {REDIS_SERVICE}: --appendfsync {fsync} may lose more than a second")
    named = compose.get("volumes") or {}
    data = [v for v in redis.get("volumes") or []
            if isinstance(v, str) and v.split(":")[1:2] == ["/data"] and v.split(":")[0] in named]
    if not data:
        fail(f"service {REDIS_SERVICE}: /data (where the AOF goes) is not a named volume, so "
             "the counters would vanish with the container")
    ok(f"global limits: sluice-quota -> {redis_url} = service {REDIS_SERVICE} ({image}, "
       f"appendonly yes, appendfsync {fsync}, /data in volume {data[0].split(':')[0]})")

    waits_for(compose, "envoy", QUOTA_SERVICE)
    waits_for(compose, QUOTA_SERVICE, REDIS_SERVICE)
    ok(f"start order: {REDIS_SERVICE} healthy -> {QUOTA_SERVICE} healthy -> envoy")


# ---------------------------------------------------------------- Prometheus and Grafana


def mounted(mounts, service, target):
    """The host path bind-mounted at `target` in `service`, or at a directory above it."""
    for mount_target, source in mounts.get(service, {}).items():
        mount_target = mount_target.rstrip("/")
        if target == mount_target:
            return source
        if target.startswith(mount_target + "/") and source.is_dir():
            return source / target[len(mount_target) + 1:]
    return None


def duration_days(text):
    """Prometheus retention (e.g. 35d, 6w, 1y, 720h) in days, or None."""
    units = {"y": 365, "w": 7, "d": 1, "h": 1 / 24, "m": 1 / 1440, "s": 1 / 86400}
    parts = re.findall(r"(\d+)(ms|[ywdhms])", text or "")
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(int(n) * (units[u] if u != "ms" else 0) for n, u in parts)


def check_prometheus(compose, mounts):
    """Prometheus: pinned official image, the mounted config and rules, enough retention, and a
    scrape job that reaches Envoy's admin listener. Returns the port it listens on."""
    service = compose["services"][PROMETHEUS_SERVICE]
    image = str(service.get("image", ""))
    if not re.fullmatch(r"(docker\.io/)?prom/prometheus:v\d+\.\d+\.\d+", image):
        fail(f"service {PROMETHEUS_SERVICE}: image {image!r} is not the official "
             "prom/prometheus at a pinned vX.Y.Z tag")
    args = command_list(service)
    config_path = flag_value(args, "--config.file")
    if not config_path:
        fail(f"service {PROMETHEUS_SERVICE}: its command has no --config.file")
    if mounted(mounts, PROMETHEUS_SERVICE, config_path) != PROMETHEUS_CONFIG.resolve():
        fail(f"service {PROMETHEUS_SERVICE}: --config.file {config_path} is not a bind mount of "
             f"{rel(PROMETHEUS_CONFIG)}")
    retention = flag_value(args, "--storage.tsdb.retention.time")
    days = duration_days(retention)
    if days is None or days < 30:
        fail(f"service {PROMETHEUS_SERVICE}: --storage.tsdb.retention.time is {retention!r}; the "
             "budget rules read 30 days back (tenant:sluice_cost_usd:increase30d): keep at least 30d")
    listen = flag_value(args, "--web.listen-address") or ":9090"
    port = int(listen.rsplit(":", 1)[1])
    published = [parse_port(PROMETHEUS_SERVICE, p)[2] for p in service.get("ports") or []]
    if port not in published:
        fail(f"service {PROMETHEUS_SERVICE}: listens on {port} but publishes {published}")
    ok(f"service {PROMETHEUS_SERVICE}: {image}, --config.file {config_path} = "
       f"{rel(PROMETHEUS_CONFIG)}, retention {retention}, port {port}")

    try:
        config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    except (OSError, yaml.YAMLError) as e:
        fail(f"cannot parse {rel(PROMETHEUS_CONFIG)}: {e}")
    loaded = {}
    for pattern in config.get("rule_files") or []:
        source = mounted(mounts, PROMETHEUS_SERVICE, pattern)
        if source is None or not source.is_file():
            fail(f"{rel(PROMETHEUS_CONFIG)}: rule file {pattern} is not a mounted file in service "
                 f"{PROMETHEUS_SERVICE}")
        loaded[pattern] = source
    wanted = sorted(p for p in (OPS / "prometheus").glob("*.yml") if p != PROMETHEUS_CONFIG)
    missing = [rel(p) for p in wanted if p.resolve() not in loaded.values()]
    if missing:
        fail(f"{rel(PROMETHEUS_CONFIG)}: does not load {', '.join(missing)}")
    ok(f"{rel(PROMETHEUS_CONFIG)} loads " + ", ".join(
        f"{rel(source)} (as {pattern})" for pattern, source in loaded.items()))

    # The scrape target is Envoy's admin listener, as the generated config binds it.
    envoy_config = yaml.safe_load(GENERATED.read_text())
    admin = envoy_config["admin"]["address"]["socket_address"]
    if admin["address"] != "0.0.0.0":
        fail(f"{rel(GENERATED)}: admin binds {admin['address']}; Prometheus in another container "
             "reaches it only on 0.0.0.0")
    jobs = {job.get("job_name"): job for job in config.get("scrape_configs") or []}
    job = jobs.get("sluice")
    if job is None:
        fail(f"{rel(PROMETHEUS_CONFIG)}: no scrape job `sluice` (the SluiceEnvoyDown alert selects "
             "up{job=\"sluice\"})")
    if job.get("metrics_path") != "/stats/prometheus":
        fail(f"{rel(PROMETHEUS_CONFIG)}: job sluice scrapes {job.get('metrics_path') or '/metrics'}; "
             "Envoy serves Prometheus text at /stats/prometheus")
    targets = [t for group in job.get("static_configs") or [] for t in group.get("targets") or []]
    expected = f"envoy:{admin['port_value']}"
    if targets != [expected]:
        fail(f"{rel(PROMETHEUS_CONFIG)}: job sluice scrapes {targets}; Envoy's admin listener is "
             f"{expected} (service envoy, admin port of {rel(GENERATED)})")
    ok(f"{rel(PROMETHEUS_CONFIG)}: job sluice scrapes http://{expected}/stats/prometheus = "
       f"Envoy's admin listener ({rel(GENERATED)} admin 0.0.0.0:{admin['port_value']})")

    # promtool validates the whole configuration, with the rule files at their host paths.
    promtool = os.environ.get("SLUICE_PROMTOOL") or shutil.which("promtool")
    if not promtool:
        ok("`promtool check config` skipped: promtool is not installed (`make ops` installs it)")
        return port
    text = PROMETHEUS_CONFIG.read_text()
    for pattern, source in loaded.items():
        text = text.replace(pattern, str(source))
    with tempfile.TemporaryDirectory(prefix="sluice-prometheus-") as tmp:
        path = Path(tmp) / "prometheus.yml"
        path.write_text(text)
        run = subprocess.run([promtool, "check", "config", str(path)], capture_output=True,
                             text=True, timeout=120)
    if run.returncode != 0:
        fail(f"`promtool check config` rejects {rel(PROMETHEUS_CONFIG)}:\n"
             f"{(run.stdout + run.stderr).strip()}")
    ok(f"`promtool check config` accepts {rel(PROMETHEUS_CONFIG)} and its rule files")
    return port


def check_grafana(compose, mounts, prometheus_port):
    """Grafana: pinned official image, provisioning from ops/grafana, a datasource on the
    Prometheus service, and the dashboard where the provider looks."""
    service = compose["services"][GRAFANA_SERVICE]
    image = str(service.get("image", ""))
    if not re.fullmatch(r"(docker\.io/)?grafana/grafana(-oss)?:\d+\.\d+\.\d+", image):
        fail(f"service {GRAFANA_SERVICE}: image {image!r} is not the official grafana/grafana at a "
             "pinned X.Y.Z tag")
    provisioning = OPS / "grafana" / "provisioning"
    for kind in ("datasources", "dashboards"):
        source = mounted(mounts, GRAFANA_SERVICE, f"/etc/grafana/provisioning/{kind}")
        if source is None or source.resolve() != (provisioning / kind).resolve():
            fail(f"service {GRAFANA_SERVICE}: /etc/grafana/provisioning/{kind} is not a bind mount "
                 f"of {rel(provisioning / kind)}")
    datasources = []
    for path in sorted((provisioning / "datasources").glob("*.y*ml")):
        datasources += yaml.safe_load(path.read_text()).get("datasources") or []
    urls = [d.get("url") for d in datasources if d.get("type") == "prometheus"]
    expected = f"http://{PROMETHEUS_SERVICE}:{prometheus_port}"
    if urls != [expected]:
        fail(f"{rel(provisioning / 'datasources')}: Prometheus datasource urls {urls}; expected "
             f"[{expected!r}] (the compose service and the port it listens on)")
    paths = []
    for path in sorted((provisioning / "dashboards").glob("*.y*ml")):
        for provider in yaml.safe_load(path.read_text()).get("providers") or []:
            paths.append((provider.get("options") or {}).get("path", ""))
    found = [p for p in paths if mounted(mounts, GRAFANA_SERVICE, f"{p.rstrip('/')}/{DASHBOARD.name}")
             == DASHBOARD.resolve()]
    if not found:
        fail(f"service {GRAFANA_SERVICE}: no dashboard provider path ({paths}) holds a bind mount "
             f"of {rel(DASHBOARD)}")
    ok(f"service {GRAFANA_SERVICE}: {image}, provisioning from {rel(provisioning)}; datasource "
       f"{expected}; provider path {found[0]} holds {rel(DASHBOARD)}")


# ---------------------------------------------------------------- Dockerfile build stage


def dockerignore_matcher(context):
    rules = []
    path = context / ".dockerignore"
    lines = path.read_text().splitlines() if path.exists() else []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((re.compile(regex + r"\Z"), negate))

    def excluded(relpath):
        parts = relpath.split("/")
        result = False
        for regex, negate in rules:
            # A pattern excludes a path when it matches the path or one of its parent directories.
            if any(regex.match("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
                result = not negate
        return result

    return excluded


def dockerfile_instructions(path):
    text = re.sub(r"\\\n", " ", path.read_text())
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            yield word.upper(), rest.strip()


def replay_build_stage(dockerfile, context):
    """Copies what the build stage's COPY lines would copy into a temp dir; runs cargo there."""
    excluded = dockerignore_matcher(context)
    workdir, copies, stages, cargo_workdir = "/", [], 0, None
    for word, rest in dockerfile_instructions(dockerfile):
        if word == "FROM":
            stages += 1
            if cargo_workdir is not None:
                break
        elif word == "WORKDIR":
            workdir = os.path.join(workdir, rest)
        elif word == "COPY":
            args = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
            if any(a.startswith("--from") for a in args):
                continue
            args = [a for a in args if not a.startswith("--")]
            copies.append((args[:-1], os.path.join(workdir, args[-1])))
        elif word == "ADD":
            fail(f"{rel(dockerfile)}: ADD is not replayed by this check; use COPY")
        elif word == "RUN" and "cargo build" in rest:
            cargo_workdir = workdir
            cargo_args = rest[rest.index("cargo build"):].split("&&")[0].split()
    if cargo_workdir is None:
        fail(f"{rel(dockerfile)}: found no `RUN ... cargo build` in its first stage")
    if "--locked" not in cargo_args:
        fail(f"{rel(dockerfile)}: `{' '.join(cargo_args)}` should build with --locked")

    with tempfile.TemporaryDirectory(prefix="sluice-docker-context-") as tmp:
        image = Path(tmp)
        copied = []
        for sources, dest in copies:
            for source in sources:
                src = (context / source).resolve()
                relsrc = src.relative_to(context).as_posix() if src.is_relative_to(context) else None
                if relsrc is None or not src.exists() or (relsrc != "." and excluded(relsrc)):
                    fail(f"{rel(dockerfile)}: COPY {source} — not in the build context "
                         f"(missing, or excluded by .dockerignore)")
                target = image / dest.lstrip("/")
                if src.is_dir():
                    for file in src.rglob("*"):
                        relfile = file.relative_to(context).as_posix()
                        if file.is_file() and not excluded(relfile):
                            out = target / file.relative_to(src)
                            out.parent.mkdir(parents=True, exist_ok=True)
                            shutil.copy2(file, out)
                else:
                    out = target / src.name if (dest.endswith("/") or len(sources) > 1) else target
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, out)
                copied.append(source)
        if shutil.which("cargo") is None:
            fail(f"cargo is not on PATH; it is needed to check {rel(dockerfile)}'s build stage")
        # `cargo fetch` loads every workspace member's manifest and targets, as `cargo build`
        # does, without compiling; --locked fails if Cargo.lock is missing or stale.
        run = subprocess.run(["cargo", "fetch", "--locked"], cwd=image / cargo_workdir.lstrip("/"),
                             capture_output=True, text=True, timeout=600)
        if run.returncode != 0:
            fail(f"{rel(dockerfile)}: the build stage's files ({', '.join(copied)}) do not load as "
                 f"a Cargo workspace, so `{' '.join(cargo_args)}` would fail in Docker:\n"
                 f"{run.stderr.strip()}")
    ok(f"{rel(dockerfile)}: build stage copies {', '.join(copied)}; "
       "`cargo fetch --locked` loads the workspace from exactly those")


# ---------------------------------------------------------------- generated config, validate


def check_generated():
    run = subprocess.run([sys.executable, str(GENERATOR), "--check"], capture_output=True, text=True)
    if run.returncode != 0:
        fail(f"{rel(GENERATOR)} --check failed:\n{run.stdout}{run.stderr}".rstrip())
    ok(run.stdout.strip())


def validate(envoy_env):
    envoy = os.environ.get("SLUICE_ENVOY")
    wasm = os.environ.get("SLUICE_WASM")
    relay = os.environ.get("SLUICE_RELAY")
    if not envoy or not Path(envoy).is_file():
        fail(f"SLUICE_ENVOY={envoy!r}: set it to the Envoy binary (`make envoy` installs .venv/bin/envoy)")
    if not wasm or not Path(wasm).is_file():
        fail(f"SLUICE_WASM={wasm!r}: set it to the built sluice.wasm (`make wasm` builds {rel(WASM_BUILD)})")
    if not relay or not Path(relay).is_file():
        fail(f"SLUICE_RELAY={relay!r}: set it to the built stream relay (`make relay` builds "
             f"{rel(RELAY_BUILD)})")
    text = GENERATED.read_text()
    anchor = "filename: /etc/sluice/sluice.wasm }"
    if text.count(anchor) != 1:
        fail(f"{rel(GENERATED)}: expected one `{anchor}` to point at $SLUICE_WASM")
    relay_anchor = "filename: /etc/sluice/libsluice_relay.so }"
    # The relay module is both the stream relay filter and the route's cluster specifier.
    if text.count(relay_anchor) != 2:
        fail(f"{rel(GENERATED)}: expected two `{relay_anchor}` (the stream relay and the "
             f"route's cluster specifier) to point at $SLUICE_RELAY")
    text = text.replace(relay_anchor, f"filename: {Path(relay).resolve()} }}")
    # The provider keys come from the compose file's envoy environment only: on_configure
    # (which validate mode runs) refuses a provider whose api_key_env is unset.
    env = {k: v for k, v in os.environ.items() if "_API_KEY" not in k}
    env.update({k: v for k, v in envoy_env.items() if v is not None})
    with tempfile.TemporaryDirectory(prefix="sluice-compose-validate-") as tmp:
        config = Path(tmp) / "envoy.yaml"
        config.write_text(text.replace(anchor, f"filename: {Path(wasm).resolve()} }}"))
        # Validate mode does not resolve DNS, so the STRICT_DNS clusters on the compose host
        # `mock` validate as they are, with no stand-in; check_wiring checks that `mock` is a
        # service and listens on each cluster's port, which validate cannot.
        run = subprocess.run([envoy, "--mode", "validate", "-c", str(config)], env=env,
                             capture_output=True, text=True, timeout=300)
    output = (run.stdout + run.stderr).strip()
    if run.returncode != 0:
        fail(f"`envoy --mode validate` rejects {rel(GENERATED)}:\n{output[-4000:]}")
    configured = re.findall(r"sluice: configured [^\n]*", output)
    ok(f"`{Path(envoy).name} --mode validate` accepts {rel(GENERATED)}"
       + (f" ({configured[-1]})" if configured else ""))


def main():
    compose = load_compose()
    mounts = check_paths(compose)
    check_ports(compose)
    check_image(compose)
    envoy_env = check_wiring(compose, mounts)
    check_grafana(compose, mounts, check_prometheus(compose, mounts))
    for service in compose["services"].values():
        build = service.get("build")
        if build is None:
            continue
        build = {"context": build} if isinstance(build, str) else build
        context = (COMPOSE.parent / build.get("context", ".")).resolve()
        replay_build_stage(context / build.get("dockerfile", "Dockerfile"), context)
    check_generated()
    validate(envoy_env)
    print("check_compose: OK (without Docker)")
    for line in checked:
        print(f"  ok  {line}")


if __name__ == "__main__":
    main()
