#!/usr/bin/env python3
"""Checks the Istio manifests in envoy/istio/ and the wasm image script, without a cluster.

Run from the repository root:

    SLUICE_ENVOY=.venv/bin/envoy SLUICE_WASM=target/wasm32-wasip1/release/sluice.wasm \\
        SLUICE_RELAY=target/release/libsluice_relay.so .venv/bin/python tests/deploy/check_istio.py

1. Parses every YAML document under envoy/istio/ and checks kinds, apiVersions and the
   fields the setup relies on: the global limits' wiring (with more than one gateway replica
   the Sluice JSON must have a `global` section; its cluster is Istio's outbound cluster of a
   Service with an HTTP/2 port, selecting the quota Deployment that listens there, whose
   --redis names a Service of the manifests); the EnvoyFilter's ECDS wiring (EXTENSION_CONFIG ADD +
   HTTP_FILTER INSERT_BEFORE the router through config_discovery), FAIL_CLOSED,
   allow_on_headers_stop_iteration, the remote wasm source; that the provider key
   variables agree between the filter (host_env_keys and each provider's api_key_env), the
   example Secret and the gateway Deployment; that the VirtualService routes exactly the
   `cluster` values of the providers in the embedded Sluice configuration, to the
   providers' `authority` hosts, removing x-sluice-cluster and x-sluice-relay; that each
   DestinationRule originates TLS with SNI equal to its host; selectors and gateway injection.
   Sluice's stream relay: each EnvoyFilter inserts the dynamic-module filter right after
   Sluice's (INSERT_AFTER the ECDS filter, same listener match), loading the .so from the
   path Dockerfile.proxy copies it to; its configuration is a JSON object with only the
   relay's fields, of the right types (as relay/src/config.rs parses it), and repeats the
   routes' timeout and retries (the relay takes the place of the router for streams); every
   provider `cluster` is a cluster the relay can call by that name (Istio's
   outbound|PORT||HOST of the route's destination, or a CLUSTER ADD of the same
   EnvoyFilter); the gateway pods run the proxy image with the .so (annotation
   sidecar.istio.io/proxyImage) and Dockerfile.proxy builds it FROM Istio's proxyv2.
   Sluice's fallback.retries equals the routes' retries (Sluice's x-envoy-max-retries
   overrides them), and the relay's fallback_statuses Sluice's fallback.statuses.
   Fallback across deployments (when a model has `deployments`, or the patches exist): an
   HTTP_ROUTE INSERT_FIRST patch on the Gateway's route configuration matching only chains
   (x-sluice-cluster contains ","), whose cluster comes from Sluice's cluster specifier (the
   relay's .so, wrapped in a udpa TypedStruct, which istiod can parse) with the routes'
   timeout, the retry policy fallback needs (connect-failure, reset, retriable statuses ==
   fallback.statuses, enough retries, refresh_cluster_on_retry, no
   rate_limited_retry_back_off) and the header removal; an EXTENSION_CONFIG with Sluice's
   upstream filter (root id sluice_upstream, FAIL_CLOSED) whose vm_config is the Sluice
   filter's, also after the istio-agent's rewrite of remote code; and, for every cluster a
   deployment reaches (Istio's names, DestinationRule subsets included), CLUSTER MERGE
   patches that give it that filter over ECDS then upstream_codec, only on provider
   clusters, repeating the HttpProtocolOptions istiod derives from the DestinationRule
   (the merge replaces that entry whole).
2. Transplants each EnvoyFilter's Wasm config into a minimal Envoy bootstrap (the listener,
   access log, router and stats patches applied; routes translated from the
   VirtualService; the quota service's cluster added as Istio would generate it; the wasm
   code switched to `local: {filename: $SLUICE_WASM}`, the relay's .so to $SLUICE_RELAY, the
   EnvoyFilter's added clusters included; the provider clusters as istiod builds them, after
   the CLUSTER MERGE patches, with the upstream filter inline; the route for chains first)
   and runs `$SLUICE_ENVOY --mode validate`. Validation loads the VM and runs Sluice's
   configure step, and loads the relay with its configuration, so this proves both accept
   the embedded JSON. As controls, the same bootstrap with one unknown field added to the
   Sluice JSON, to the relay's, or to the cluster specifier's TypedStruct must FAIL
   validation.
3. Runs scripts/wasm_oci.py into a temporary directory and verifies the OCI layout:
   index -> manifest -> config and layer digests and sizes match the blob files, the layer
   is one tar.gz holding plugin.wasm whose bytes equal $SLUICE_WASM, the build is
   reproducible, and the digests the script reports are the layout's.

Options: --live also runs the gateway configuration in a real Envoy against the mock
providers (needs target/release/sluice-mock or $SLUICE_MOCK: `make mock`; streamed requests
go through the relay, to the clusters named as Istio names them; both ECDS resources, the
Sluice filter and its upstream filter, come from files as the istio-agent would hand them;
fallback with the mock's fault knobs: a 429 from one account served by the other and
remembered, every first-rank account failing with 503 served by the next rank, for a
request and a stream, with each attempt rewritten for its deployment and the usage
record's attempts; and, as a control, an upstream filter with another vm_config finds no
plan and sends no credentials), and, when the
configuration has a `global` section, against a real quota service and Redis (needs
target/release/sluice-quota or $SLUICE_QUOTA, and redis-server on PATH or
$SLUICE_REDIS_SERVER: `make quota redis`); --dir DIR checks
another copy of the manifests; --keep leaves the work files (bootstraps, logs) in /tmp.

Exit status 0 when every check passes, 1 otherwise (each failure is printed), 2 when a
prerequisite (PyYAML, Envoy, the wasm, the relay) is missing.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ISTIO_DIR = ROOT / "envoy" / "istio"

try:
    import yaml
except ImportError:
    print("check_istio: PyYAML is not installed in this Python; run `make sdk` "
          "(it installs PyYAML into .venv) and use .venv/bin/python", file=sys.stderr)
    sys.exit(2)

WASM_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
STRING_VALUE_TYPE = "type.googleapis.com/google.protobuf.StringValue"
HCM_NAME = "envoy.filters.network.http_connection_manager"
HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER_NAME = "envoy.filters.http.router"
ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
ROUTING_HEADER = "x-sluice-cluster"
RELAY_HEADER = "x-sluice-relay"
RELAY_TYPE = "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter"
RELAY_SO = "libsluice_relay.so"
# The relay's configuration (relay/src/config.rs): field -> accepted JSON type.
RELAY_FIELDS = {"timeout_ms": "u64", "idle_timeout_ms": "u64", "retry": "object", "fallback_statuses": "statuses"}
RELAY_RETRY_FIELDS = {"num_retries": "u32", "on_reset": "bool", "on_connect_failure": "bool", "statuses": "statuses",
                      "base_interval_ms": "u64", "max_interval_ms": "u64", "retry_after_max_ms": "u64"}
RELAY_DEFAULT_IDLE_TIMEOUT_MS = 300_000
# What Istio does where the manifests say nothing (istio/istio, pilot/pkg/networking/core):
# a gateway's stream idle timeout defaults to 5 minutes (connection_settings.go, Istio >=
# 1.31), a sidecar has none (listener_builder.go); an inbound route has no timeout and
# retries twice, reset-before-request (route/route.go BuildDefaultHTTPInboundRoute,
# route/retry/retry.go).
ISTIO_GATEWAY_STREAM_IDLE_MS = 300_000
ISTIO_INBOUND = {"timeout_ms": 0, "idle_timeout_ms": 0, "num_retries": 2}
PROXY_IMAGE_ANNOTATION = "sidecar.istio.io/proxyImage"
SHA256_PLACEHOLDER = "REPLACE_WITH_MANIFEST_DIGEST"
HEX64 = re.compile(r"^[0-9a-f]{64}$")
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
# Fallback across deployments (README "Fallback across deployments and accounts"): Sluice's
# defaults (src/config), the relay's (relay/src/config.rs), and what the gateway needs.
DEFAULT_FALLBACK_STATUSES = (429, 500, 502, 503, 529)
DEFAULT_FALLBACK_MAX_ATTEMPTS = 3
DEFAULT_FALLBACK_RETRIES = 0
UPSTREAM_ROOT_ID = "sluice_upstream"
UPSTREAM_CODEC = "envoy.filters.http.upstream_codec"
UPSTREAM_CODEC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"
HTTP_OPTIONS_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
HTTP_OPTIONS_TYPE = "type.googleapis.com/" + HTTP_OPTIONS_KEY
SPECIFIER_TYPE = ("type.googleapis.com/envoy.extensions.router.cluster_specifiers.dynamic_modules.v3."
                  "DynamicModuleClusterSpecifier")
# istiod resolves these (pilot/pkg/model/config.go links udpa's), not the specifier's type.
TYPED_STRUCT_TYPE = "type.googleapis.com/udpa.type.v1.TypedStruct"

KNOWN_KINDS = {
    ("v1", "Namespace"), ("v1", "Secret"), ("v1", "ServiceAccount"), ("v1", "Service"),
    ("apps/v1", "Deployment"), ("apps/v1", "StatefulSet"), ("policy/v1", "PodDisruptionBudget"),
    ("rbac.authorization.k8s.io/v1", "Role"), ("rbac.authorization.k8s.io/v1", "RoleBinding"),
    ("networking.istio.io/v1alpha3", "EnvoyFilter"),
    ("networking.istio.io/v1", "Gateway"), ("networking.istio.io/v1", "VirtualService"),
    ("networking.istio.io/v1", "DestinationRule"), ("networking.istio.io/v1", "ServiceEntry"),
}


class Checks:
    def __init__(self) -> None:
        self.passed = 0
        self.failures: list[str] = []

    def ok(self, cond: bool, what: str, why: str = "") -> bool:
        if cond:
            self.passed += 1
            print(f"  ok    {what}")
        else:
            self.failures.append(f"{what}{': ' + why if why else ''}")
            print(f"  FAIL  {what}{': ' + why if why else ''}")
        return cond

    def section(self, title: str) -> None:
        print(f"\n== {title}")


C = Checks()


def rel(p: Path) -> str:
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        return str(p)


def dig(obj, *path, default=None):
    for key in path:
        if isinstance(obj, dict) and key in obj:
            obj = obj[key]
        elif isinstance(obj, list) and isinstance(key, int) and -len(obj) <= key < len(obj):
            obj = obj[key]
        else:
            return default
    return obj


# ---------------------------------------------------------------------------------------
# 1. Parse and cross-check the manifests
# ---------------------------------------------------------------------------------------

def load_docs() -> list[dict]:
    docs = []
    files = sorted(p for p in ISTIO_DIR.rglob("*") if p.suffix in (".yaml", ".yml"))
    C.ok(bool(files), f"YAML files under {rel(ISTIO_DIR)}", "none found")
    for path in files:
        text = path.read_text()
        # tests/system/config.rs validates every YAML under envoy/ that contains this word
        # as a plain Envoy bootstrap; Kubernetes manifests must not trigger that.
        C.ok("static_resources" not in text, f"{rel(path)}: does not contain the word static_resources",
             "tests/system/config.rs would treat it as an Envoy bootstrap")
        try:
            parsed = [d for d in yaml.safe_load_all(text) if d is not None]
        except yaml.YAMLError as e:
            C.ok(False, f"{rel(path)}: parses as YAML", str(e))
            continue
        problems, names = [], []
        for i, d in enumerate(parsed):
            where = f"{rel(path)}#{i + 1}"
            if not isinstance(d, dict):
                problems.append(f"{where}: not a mapping")
                continue
            key = (d.get("apiVersion"), d.get("kind"))
            if key not in KNOWN_KINDS:
                problems.append(f"{where}: unexpected apiVersion/kind {key}")
            if not dig(d, "metadata", "name"):
                problems.append(f"{where}: no metadata.name")
            if d.get("kind") != "Namespace" and not dig(d, "metadata", "namespace"):
                problems.append(f"{where}: no metadata.namespace")
            d["__file"] = path
            d["__where"] = f"{rel(path)} {d.get('kind')}/{dig(d, 'metadata', 'name')}"
            names.append(f"{d.get('apiVersion')} {d.get('kind')}/{dig(d, 'metadata', 'name')}")
            docs.append(d)
        C.ok(bool(parsed) and not problems,
             f"{rel(path)}: {len(parsed)} documents, known kinds/apiVersions, name and namespace set",
             "; ".join(problems) or "no documents")
        for n in names:
            print(f"          {n}")
    return docs


def by_kind(docs, kind, namespace=None):
    return [d for d in docs if d.get("kind") == kind
            and (namespace is None or dig(d, "metadata", "namespace") == namespace)]


def patches(ef, apply_to):
    return [p for p in dig(ef, "spec", "configPatches", default=[]) or [] if p.get("applyTo") == apply_to]


def parse_relay_config(text: str) -> tuple[dict | None, str]:
    """The relay's JSON as relay/src/config.rs reads it: (config with defaults, "") or
    (None, why). Unknown fields and wrong types are errors, as there."""
    try:
        raw = json.loads(text) if text.strip() else {}
    except ValueError as e:
        return None, f"not JSON: {e}"

    def typed(value, kind) -> bool:
        if kind == "bool":
            return isinstance(value, bool)
        if kind in ("u64", "u32"):
            return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2 ** (64 if kind == "u64" else 32)
        if kind == "statuses":
            return isinstance(value, list) and all(typed(v, "u32") and 100 <= v <= 599 for v in value)
        return isinstance(value, dict)

    def fields(obj, known, where) -> str:
        if not isinstance(obj, dict):
            return f"{where or 'the configuration'} is not a JSON object"
        for k, v in obj.items():
            if k not in known:
                return f"{where}{k}: unknown field, expected one of {', '.join(known)}"
            if v is not None and not typed(v, known[k]):
                return f"{where}{k}: {v!r} is not a {known[k]}"
        return ""

    why = fields(raw, RELAY_FIELDS, "")
    if why:
        return None, why
    retry = raw.get("retry")
    if retry is not None:
        why = fields(retry, RELAY_RETRY_FIELDS, "retry.")
        if why:
            return None, why
        if retry.get("num_retries") is None:
            return None, "retry.num_retries: missing (required in a retry section)"
        base = retry.get("base_interval_ms") if retry.get("base_interval_ms") is not None else 25
        top = retry.get("max_interval_ms") if retry.get("max_interval_ms") is not None else base * 10
        if base == 0 or top < base:
            return None, "retry: base_interval_ms must be at least 1 and at most max_interval_ms"
        retry = {"num_retries": retry["num_retries"],
                 "on_reset": retry.get("on_reset") if retry.get("on_reset") is not None else False,
                 "on_connect_failure": (retry.get("on_connect_failure")
                                        if retry.get("on_connect_failure") is not None else True),
                 "statuses": retry.get("statuses") or [], "base_interval_ms": base, "max_interval_ms": top,
                 "retry_after_max_ms": retry.get("retry_after_max_ms") or 0}
    else:
        retry = {"num_retries": 0, "on_reset": False, "on_connect_failure": False, "statuses": [], "base_interval_ms": 25,
                 "max_interval_ms": 250, "retry_after_max_ms": 0}
    timeout = raw.get("timeout_ms")
    idle = raw.get("idle_timeout_ms")
    fallback_statuses = raw.get("fallback_statuses")
    if fallback_statuses is None:
        fallback_statuses = list(DEFAULT_FALLBACK_STATUSES)
    if any(not 400 <= s <= 599 for s in fallback_statuses):
        return None, "fallback_statuses: every status must be an HTTP error status (400-599)"
    return {"timeout_ms": timeout or 0,
            "idle_timeout_ms": RELAY_DEFAULT_IDLE_TIMEOUT_MS if idle is None else idle,
            "retry": retry, "fallback_statuses": fallback_statuses}, ""


def check_relay_patch(ef, sluice_name: str, sluice_http) -> dict | None:
    """Sluice's stream relay in one EnvoyFilter: an inline dynamic-module filter inserted
    right after Sluice's, on the same listener; returns what later checks need."""
    w = ef["__where"]
    http_patches = patches(ef, "HTTP_FILTER")
    relays = [p for p in http_patches if dig(p, "patch", "value", "typed_config", "@type") == RELAY_TYPE]
    if not C.ok(len(relays) == 1, f"{w}: exactly one HTTP_FILTER patch adds Sluice's stream relay ({RELAY_TYPE.rsplit('.', 1)[1]})",
                f"found {len(relays)}; without it a provider failing mid-stream resets the client's stream"):
        return None
    patch = relays[0]
    C.ok(dig(patch, "patch", "operation") == "INSERT_AFTER"
         and dig(patch, "match", "listener", "filterChain", "filter", "subFilter", "name") == sluice_name,
         f"{w}: the relay is inserted right after the Sluice filter (INSERT_AFTER subFilter {sluice_name})",
         f"operation {dig(patch, 'patch', 'operation')}, subFilter {dig(patch, 'match', 'listener', 'filterChain', 'filter', 'subFilter', 'name')}")
    position = {id(p): i for i, p in enumerate(http_patches)}
    C.ok(position[id(patch)] > position[id(sluice_http)],
         f"{w}: the relay patch comes after the patch that inserts Sluice (istiod applies them in order)")

    def listener_without_subfilter(p):
        m = copy.deepcopy(dig(p, "match", default={}))
        dig(m, "listener", "filterChain", "filter", default={}).pop("subFilter", None)
        return m
    C.ok(listener_without_subfilter(patch) == listener_without_subfilter(sluice_http),
         f"{w}: the relay patch matches the same context and listener as Sluice's HTTP filter")
    value = dig(patch, "patch", "value", default={})
    tc = value.get("typed_config", {})
    C.ok(bool(value.get("name")) and value.get("name") != sluice_name, f"{w}: the relay filter has its own name ({value.get('name')})")
    C.ok(tc.get("filter_name") == "relay", f"{w}: the relay's filter_name is relay (the module's only filter)",
         f"found {tc.get('filter_name')!r}")
    filename = dig(tc, "dynamic_module_config", "module", "local", "filename", default="")
    C.ok(filename.startswith("/") and filename.endswith("/" + RELAY_SO),
         f"{w}: the relay loads an absolute path to {RELAY_SO} in the proxy image ({filename})")
    conf = tc.get("filter_config", {})
    C.ok(conf.get("@type") == STRING_VALUE_TYPE, f"{w}: the relay's filter_config is a google.protobuf.StringValue")
    config, why = parse_relay_config(str(conf.get("value", "")))
    if not C.ok(config is not None, f"{w}: the relay's configuration is a JSON object with only the relay's fields "
                f"({', '.join(RELAY_FIELDS)}; retry: {', '.join(RELAY_RETRY_FIELDS)}), of the right types", why):
        return None
    return {"patch": patch, "name": value.get("name"), "filename": filename, "config": config}


def added_clusters(ef, context) -> dict:
    """Clusters the EnvoyFilter adds (CLUSTER ADD) in `context`, by name."""
    return {dig(p, "patch", "value", "name"): dig(p, "patch", "value") for p in patches(ef, "CLUSTER")
            if dig(p, "patch", "operation") == "ADD" and dig(p, "match", "context") == context}


def check_envoyfilter(ef) -> dict | None:
    """Checks one EnvoyFilter; returns what later checks need, or None if unusable."""
    w = ef["__where"]
    C.ok(bool(dig(ef, "spec", "workloadSelector", "labels")), f"{w}: has a workloadSelector",
         "without one it applies to every proxy in the namespace")
    exts = patches(ef, "EXTENSION_CONFIG")
    http = [p for p in patches(ef, "HTTP_FILTER") if dig(p, "patch", "operation") == "INSERT_BEFORE"]
    if not C.ok(len(http) == 1, f"{w}: exactly one HTTP_FILTER INSERT_BEFORE patch", f"found {len(http)}"):
        return None
    http = http[0]
    name = dig(http, "patch", "value", "name")
    ext_names = [dig(p, "patch", "value", "name") for p in exts]
    C.ok(len(set(ext_names)) == len(ext_names) and all(ext_names),
         f"{w}: every EXTENSION_CONFIG patch has a name of its own ({', '.join(map(str, ext_names))})")
    ext = [p for p in exts if dig(p, "patch", "value", "name") == name]
    if not C.ok(len(ext) == 1, f"{w}: exactly one EXTENSION_CONFIG patch is the HTTP filter's ECDS resource ({name})",
                f"found {len(ext)}"):
        return None
    ext = ext[0]
    C.ok(all(dig(p, "patch", "operation") == "ADD" for p in exts), f"{w}: EXTENSION_CONFIG operations are ADD")
    context = dig(ext, "match", "context")
    C.ok(context in ("GATEWAY", "SIDECAR_INBOUND"), f"{w}: EXTENSION_CONFIG context is GATEWAY or SIDECAR_INBOUND ({context})")
    C.ok(all(dig(p, "match", "context") == context for p in exts),
         f"{w}: every EXTENSION_CONFIG patch has the context {context}")
    C.ok(dig(http, "match", "context") == context, f"{w}: HTTP_FILTER context equals the EXTENSION_CONFIG's ({context})")
    C.ok(bool(name), f"{w}: the extension config has a name")
    C.ok(dig(http, "match", "listener", "filterChain", "filter", "name") == HCM_NAME,
         f"{w}: HTTP_FILTER patch targets the HTTP connection manager")
    C.ok(dig(http, "match", "listener", "filterChain", "filter", "subFilter", "name") == ROUTER_NAME,
         f"{w}: HTTP_FILTER is inserted before {ROUTER_NAME}")
    hv = dig(http, "patch", "value", default={})
    C.ok(hv.get("name") == name, f"{w}: the HTTP filter's name equals the extension config's ({name})",
         f"HTTP filter is named {hv.get('name')!r}")
    C.ok("typed_config" not in hv, f"{w}: the HTTP filter has no inline typed_config (it comes from ECDS)")
    cd = hv.get("config_discovery", {})
    C.ok(dig(cd, "config_source", "ads") == {}, f"{w}: config_discovery uses config_source ads: {{}}")
    C.ok(dig(cd, "config_source", "initial_fetch_timeout") == "0s",
         f"{w}: initial_fetch_timeout is 0s (no traffic before Sluice is loaded)")
    C.ok(cd.get("type_urls") == [WASM_TYPE], f"{w}: config_discovery type_urls is [{WASM_TYPE}]")

    tc = dig(ext, "patch", "value", "typed_config", default={})
    C.ok(tc.get("@type") == WASM_TYPE, f"{w}: extension typed_config is {WASM_TYPE}")
    cfg = tc.get("config", {})
    C.ok(cfg.get("failure_policy") == "FAIL_CLOSED", f"{w}: failure_policy is FAIL_CLOSED",
         f"found {cfg.get('failure_policy')!r}; FAIL_OPEN would let unauthenticated requests through")
    C.ok(cfg.get("fail_open") in (None, False), f"{w}: the deprecated fail_open is not set")
    C.ok(cfg.get("allow_on_headers_stop_iteration") is True, f"{w}: allow_on_headers_stop_iteration is true",
         f"found {cfg.get('allow_on_headers_stop_iteration')!r}; without it body-based routing hangs")
    C.ok(bool(cfg.get("root_id")), f"{w}: root_id is set ({cfg.get('root_id')})")
    vm = cfg.get("vm_config", {})
    C.ok(vm.get("runtime") == "envoy.wasm.runtime.v8", f"{w}: vm_config.runtime is envoy.wasm.runtime.v8")
    C.ok(bool(vm.get("vm_id")), f"{w}: vm_config.vm_id is set ({vm.get('vm_id')})")
    remote = dig(vm, "code", "remote", default={})
    uri = dig(remote, "http_uri", "uri", default="")
    C.ok(uri.startswith("oci://") or uri.startswith("https://"),
         f"{w}: code is remote, oci:// or https:// ({uri})",
         "istio-agent downloads only http(s) and oci URLs (pkg/wasm/cache.go); use https or oci")
    C.ok(bool(dig(remote, "http_uri", "cluster")) and bool(dig(remote, "http_uri", "timeout")),
         f"{w}: http_uri has cluster and timeout (required by Envoy's proto)")
    sha = str(remote.get("sha256", ""))
    C.ok(sha == SHA256_PLACEHOLDER or bool(HEX64.match(sha)),
         f"{w}: sha256 is 64 lowercase hex characters or the placeholder {SHA256_PLACEHOLDER}",
         f"found {sha!r}")
    if sha == SHA256_PLACEHOLDER or "REGISTRY" in uri:
        print(f"        note: {rel(ef['__file'])} still has placeholders (REGISTRY / {SHA256_PLACEHOLDER}): "
              "fill them from scripts/wasm_oci.py before applying")
    env_keys = dig(vm, "environment_variables", "host_env_keys", default=[]) or []
    C.ok(bool(env_keys), f"{w}: host_env_keys lists the provider key variables ({', '.join(env_keys)})")
    C.ok(not dig(vm, "environment_variables", "key_values"),
         f"{w}: no inline environment key_values (keys come from the container's environment)")
    conf = cfg.get("configuration", {})
    C.ok(conf.get("@type") == STRING_VALUE_TYPE, f"{w}: configuration is a google.protobuf.StringValue")
    try:
        sluice = json.loads(conf.get("value", ""))
    except ValueError as e:
        C.ok(False, f"{w}: the Sluice configuration is JSON", str(e))
        return None
    C.ok(isinstance(sluice, dict), f"{w}: the Sluice configuration is a JSON object")
    providers = sluice.get("providers", [])
    key_envs = {p.get("api_key_env") for p in providers}
    C.ok(key_envs == set(env_keys), f"{w}: host_env_keys == the providers' api_key_env set",
         f"host_env_keys {sorted(env_keys)} vs api_key_env {sorted(k for k in key_envs if k)}")
    digests = [k.get("sha256", "") for t in sluice.get("tenants", []) for k in t.get("keys", [])]
    C.ok(bool(digests) and all(HEX64.match(d) for d in digests),
         f"{w}: tenant keys appear only as sha256 digests ({len(digests)} keys)")
    C.ok(len(set(digests)) == len(digests), f"{w}: tenant key digests are unique")
    C.ok(not re.search(r"sk-[A-Za-z0-9_-]{8,}", json.dumps(sluice)),
         f"{w}: no key-like string (sk-...) inside the Sluice configuration")

    relay = check_relay_patch(ef, name, http)
    if relay is None:
        return None
    fb = sluice.get("fallback") or {}
    statuses = sorted(fb.get("statuses") or DEFAULT_FALLBACK_STATUSES)
    C.ok(sorted(relay["config"]["fallback_statuses"]) == statuses,
         f"{w}: the relay's fallback_statuses == Sluice's fallback.statuses ({statuses}): a stream moves along its "
         "chain on the same statuses as the router's attempts")
    added = added_clusters(ef, context)
    if context != "GATEWAY":
        # No VirtualService: the relay calls the provider's `cluster` by name, so it must be
        # a cluster this EnvoyFilter adds (Istio's inbound cluster is an ORIGINAL_DST
        # passthrough, which an upstream call from a filter cannot use).
        for p in providers:
            C.ok(p.get("cluster") in added,
                 f"{w}: provider {p.get('name')}: cluster {p.get('cluster')!r} is a cluster this EnvoyFilter adds "
                 f"(CLUSTER ADD, context {context}), which the relay can call",
                 f"added: {sorted(added)}")
        cfg = relay["config"]
        got = {"timeout_ms": cfg["timeout_ms"], "idle_timeout_ms": cfg["idle_timeout_ms"],
               "num_retries": cfg["retry"]["num_retries"]}
        C.ok(got == ISTIO_INBOUND,
             f"{w}: the relay repeats Istio's inbound route for streams (no timeout, no stream idle timeout, 2 retries)",
             f"relay {got} vs Istio's inbound {ISTIO_INBOUND}")

    listener = [p for p in patches(ef, "LISTENER") if dig(p, "patch", "operation") == "MERGE"]
    limit = dig(listener, 0, "patch", "value", "per_connection_buffer_limit_bytes")
    max_body = sluice.get("max_body_bytes", DEFAULT_MAX_BODY_BYTES)
    C.ok(isinstance(limit, int) and limit > max_body,
         f"{w}: listener per_connection_buffer_limit_bytes ({limit}) > Sluice max_body_bytes ({max_body})",
         "Envoy, not Sluice, would answer large bodies")
    fallback = {"statuses": statuses,
                "max_attempts": fb.get("max_attempts", DEFAULT_FALLBACK_MAX_ATTEMPTS),
                "retries": fb.get("retries", DEFAULT_FALLBACK_RETRIES)}
    if context != "GATEWAY":
        # Sluice sets x-envoy-max-retries (fallback.retries for a model without deployments)
        # on every request it forwards, which overrides the inbound route's retries.
        C.ok(fallback["retries"] == ISTIO_INBOUND["num_retries"],
             f"{w}: Sluice's fallback.retries ({fallback['retries']}) == Istio's inbound route retries "
             f"({ISTIO_INBOUND['num_retries']}), which Sluice's x-envoy-max-retries overrides")
    return {"ef": ef, "context": context, "name": name, "ext": ext, "http": http, "sluice": sluice,
            "relay": relay, "added_clusters": added, "fallback": fallback, "exts": exts,
            "env_keys": list(env_keys), "selector": dig(ef, "spec", "workloadSelector", "labels", default={})}


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_gateway_setup(docs, f) -> dict:
    """Cross-checks the gateway EnvoyFilter with the Deployment, Secret, Gateway and routing."""
    ns = dig(f["ef"], "metadata", "namespace")
    sel = f["selector"]
    env_keys = set(f["env_keys"])
    out = {"routes": [], "clusters": {}}

    # Deployment (gateway injection) and its env.
    deps = [d for d in by_kind(docs, "Deployment", ns) if selects(sel, dig(d, "spec", "template", "metadata", "labels", default={}))]
    if C.ok(len(deps) == 1, f"one Deployment in {ns} runs the pods the EnvoyFilter selects ({sel})", f"found {len(deps)}"):
        dep = deps[0]
        w = dep["__where"]
        tmpl = dig(dep, "spec", "template", default={})
        labels = dig(tmpl, "metadata", "labels", default={})
        C.ok(dig(tmpl, "metadata", "annotations", "inject.istio.io/templates") == "gateway",
             f"{w}: annotation inject.istio.io/templates: gateway")
        proxy_image = str(dig(tmpl, "metadata", "annotations", PROXY_IMAGE_ANNOTATION, default=""))
        C.ok("/" in proxy_image and ":" in proxy_image.rsplit("/", 1)[-1],
             f"{w}: annotation {PROXY_IMAGE_ANNOTATION} names a full image with a tag ({proxy_image}): "
             "the proxy with the stream relay (Dockerfile.proxy)",
             "the gateway injection template takes the annotation only when it holds a '/'; "
             "without it the pods run Istio's image, which has no relay, and reject the listener")
        out["proxy_image"] = proxy_image
        if "REGISTRY" in proxy_image or "ISTIO_VERSION" in proxy_image:
            print(f"        note: {rel(dep['__file'])} still has placeholders in {PROXY_IMAGE_ANNOTATION} "
                  "(REGISTRY / ISTIO_VERSION): fill them with the image built from Dockerfile.proxy before applying")
        C.ok(labels.get("sidecar.istio.io/inject") == "true" or "istio.io/rev" in labels,
             f"{w}: label sidecar.istio.io/inject: \"true\" (or istio.io/rev)")
        C.ok(selects(dig(dep, "spec", "selector", "matchLabels", default={}), labels),
             f"{w}: spec.selector matches the pod labels")
        proxies = [c for c in dig(tmpl, "spec", "containers", default=[]) if c.get("name") == "istio-proxy"]
        if C.ok(len(proxies) == 1, f"{w}: has the istio-proxy container"):
            c = proxies[0]
            C.ok(c.get("image") == "auto", f"{w}: istio-proxy image is auto (filled in by the injector)")
            env = {e.get("name"): e for e in c.get("env", [])}
            secret_env = {n: e for n, e in env.items() if dig(e, "valueFrom", "secretKeyRef")}
            C.ok(set(secret_env) == env_keys, f"{w}: istio-proxy env from Secrets == host_env_keys",
                 f"env {sorted(secret_env)} vs host_env_keys {sorted(env_keys)}")
            C.ok(all("value" not in env[n] for n in env_keys if n in env),
                 f"{w}: no provider key given inline as an env value")
            refs = {(dig(e, "valueFrom", "secretKeyRef", "name"), dig(e, "valueFrom", "secretKeyRef", "key"), n)
                    for n, e in secret_env.items()}
            secret_names = {r[0] for r in refs}
            C.ok(len(secret_names) == 1, f"{w}: the provider keys come from one Secret ({', '.join(map(str, secret_names))})")
            C.ok(all(k == n for _, k, n in refs), f"{w}: each env var reads the Secret key of the same name")
            secrets = [s for s in by_kind(docs, "Secret", ns) if dig(s, "metadata", "name") in secret_names]
            if C.ok(len(secrets) == 1, f"the example Secret {', '.join(map(str, secret_names))} exists in {ns}"):
                s = secrets[0]
                data = s.get("stringData", {}) or {}
                C.ok(set(data) == env_keys, f"{s['__where']}: its keys == host_env_keys",
                     f"{sorted(data)} vs {sorted(env_keys)}")
                C.ok(all("PLACEHOLDER" in str(v) for v in data.values()),
                     f"{s['__where']}: every value is a clearly marked PLACEHOLDER")
                C.ok(s["__file"].parent != ISTIO_DIR,
                     f"{s['__where']}: not at the top level of envoy/istio/ "
                     "(kubectl apply -f envoy/istio/ must not overwrite the real Secret)")
        sa = dig(tmpl, "spec", "serviceAccountName")
        C.ok(any(dig(x, "metadata", "name") == sa for x in by_kind(docs, "ServiceAccount", ns)),
             f"{w}: its ServiceAccount {sa} is defined")
        svcs = [s for s in by_kind(docs, "Service", ns) if selects(dig(s, "spec", "selector", default={}), labels)]
        C.ok(len(svcs) == 1, f"a Service in {ns} selects the gateway pods", f"found {len(svcs)}")

    # Gateway.
    gws = [g for g in by_kind(docs, "Gateway", ns) if selects(dig(g, "spec", "selector", default={}), dig(deps[0], "spec", "template", "metadata", "labels", default={}) if deps else {})]
    gw_name = None
    if C.ok(len(gws) == 1, f"one Gateway in {ns} selects the gateway pods", f"found {len(gws)}"):
        g = gws[0]
        gw_name = dig(g, "metadata", "name")
        servers = dig(g, "spec", "servers", default=[])
        C.ok(bool(servers) and all(dig(s, "port", "protocol") == "HTTPS" and dig(s, "tls", "mode") == "SIMPLE"
                                   and dig(s, "tls", "credentialName") for s in servers),
             f"{g['__where']}: every server is HTTPS with a credentialName (tenant keys never in clear)")

    # Global limits: the quota service's cluster, Service, Deployment and Redis.
    out["quota"] = check_global(docs, f, deps[0] if deps else None)

    # ServiceEntry, DestinationRules, VirtualService.
    se_hosts, se_ports = {}, {}
    for se in by_kind(docs, "ServiceEntry", ns):
        C.ok(dig(se, "spec", "exportTo") == ["."], f"{se['__where']}: exportTo [\".\"]")
        C.ok(dig(se, "spec", "location") == "MESH_EXTERNAL" and dig(se, "spec", "resolution") == "DNS",
             f"{se['__where']}: MESH_EXTERNAL, resolution DNS")
        for h in dig(se, "spec", "hosts", default=[]):
            se_hosts[h] = se
            se_ports[h] = {p.get("number"): p for p in dig(se, "spec", "ports", default=[])}
    drs = {dig(d, "spec", "host"): d for d in by_kind(docs, "DestinationRule", ns)}
    # The gateway's clusters for these hosts, named as istiod names them: one per host and
    # port, and one per DestinationRule subset (outbound|PORT|SUBSET|HOST).
    for host, ports in se_ports.items():
        dr = drs.get(host)
        subsets = [s.get("name") for s in dig(dr, "spec", "subsets", default=[]) or []] if dr else []
        for port in ports:
            for subset in [""] + subsets:
                out["clusters"][f"outbound|{port}|{subset}|{host}"] = istio_cluster(host, port, subset, dr)
    vss = [v for v in by_kind(docs, "VirtualService", ns) if gw_name in (dig(v, "spec", "gateways", default=[]) or [])]
    if not C.ok(len(vss) == 1, f"one VirtualService in {ns} is bound to Gateway {gw_name}", f"found {len(vss)}"):
        return out
    vs = vss[0]
    w = vs["__where"]
    C.ok(dig(vs, "spec", "hosts") == ["*"], f"{w}: hosts [\"*\"] (Sluice rewrites :authority before the route is re-chosen)")
    C.ok("mesh" not in dig(vs, "spec", "gateways", default=[]), f"{w}: not bound to the mesh")
    C.ok(dig(vs, "spec", "exportTo") == ["."], f"{w}: exportTo [\".\"]")
    providers = f["sluice"].get("providers", [])
    by_cluster: dict[str, list[dict]] = {}
    for p in providers:
        by_cluster.setdefault(p.get("cluster"), []).append(p)
    http_routes = dig(vs, "spec", "http", default=[])
    routed: dict[str, tuple[str, int, str]] = {}
    for i, r in enumerate(http_routes):
        rn = r.get("name", f"http[{i}]")
        matches = r.get("match")
        if not matches:
            continue
        values = []
        for m in matches:
            hm = dig(m, "headers", ROUTING_HEADER, default={})
            C.ok(set(m) == {"headers"} and set(m["headers"]) == {ROUTING_HEADER} and set(hm) == {"exact"},
                 f"{w}: route {rn} matches only on {ROUTING_HEADER} (exact)")
            values.append(hm.get("exact"))
            C.ok("," not in str(hm.get("exact")), f"{w}: route {rn} matches one cluster, not a chain")
        dests = r.get("route", [])
        if not C.ok(len(dests) == 1, f"{w}: route {rn} has one destination"):
            continue
        host = dig(dests[0], "destination", "host")
        port = dig(dests[0], "destination", "port", "number")
        subset = dig(dests[0], "destination", "subset", default="") or ""
        removed = dig(r, "headers", "request", "remove", default=[]) or []
        C.ok(ROUTING_HEADER in removed and RELAY_HEADER in removed,
             f"{w}: route {rn} removes {ROUTING_HEADER} and {RELAY_HEADER} before forwarding", f"removes {removed}")
        for v in values:
            C.ok(v not in routed, f"{w}: {ROUTING_HEADER} value {v!r} is routed once")
            routed[v] = (host, port, subset)
        out["routes"].append({"name": rn, "values": values, "host": host, "port": port, "subset": subset,
                              "remove": removed, "timeout": r.get("timeout"), "retries": r.get("retries")})
        # The destination exists and TLS is originated with the right SNI.
        C.ok(host in se_hosts, f"{w}: route {rn} -> {host} is a ServiceEntry host")
        C.ok(port in se_ports.get(host, {}), f"{w}: route {rn} -> port {port} is a port of that ServiceEntry")
        dr = drs.get(host)
        if C.ok(dr is not None, f"a DestinationRule exists for {host}"):
            if subset:
                C.ok(f"outbound|{port}|{subset}|{host}" in out["clusters"],
                     f"{w}: route {rn} -> subset {subset} is a subset of {dr['__where']}")
            tls = traffic_policy(dr, port, subset).get("tls", {})
            where = f"{dr['__where']}{' subset ' + subset if subset else ''}"
            C.ok(tls.get("mode") == "SIMPLE", f"{where}: TLS origination (mode SIMPLE) on port {port}")
            C.ok(tls.get("sni") == host, f"{where}: sni equals the host ({tls.get('sni')} == {host})")
            C.ok(tls.get("subjectAltNames", [host]) == [host], f"{where}: subjectAltNames is [{host}]")
            C.ok(dig(dr, "spec", "exportTo") == ["."], f"{dr['__where']}: exportTo [\".\"]")
            C.ok(bool(dig(dr, "spec", "trafficPolicy", "connectionPool")) and bool(dig(dr, "spec", "trafficPolicy", "outlierDetection")),
                 f"{dr['__where']}: has connectionPool and outlierDetection")
    C.ok(set(routed) == set(by_cluster),
         f"{w}: the {ROUTING_HEADER} values routed == the providers' cluster values in the Sluice config",
         f"routed {sorted(map(str, routed))} vs providers' clusters {sorted(map(str, by_cluster))}")
    for cl, ps in by_cluster.items():
        if cl in routed:
            host, port, subset = routed[cl]
            for p in ps:
                C.ok(p.get("authority") == host,
                     f"provider {p.get('name')}: authority {p.get('authority')} == the host cluster {cl!r} routes to ({host})")
            # The relay calls the cluster by this name: it must be the one istiod generates
            # for the route's destination.
            istio_name = f"outbound|{port}|{subset}|{host}"
            C.ok(cl == istio_name,
                 f"provider {', '.join(str(p.get('name')) for p in ps)}: cluster {cl!r} is Istio's cluster for the "
                 f"route's destination ({istio_name}), which the stream relay calls by name",
                 "the relay would answer every streamed request with relay_cluster_not_found")
    check_relay_matches_routes(f, out["routes"])
    last = http_routes[-1] if http_routes else {}
    C.ok(not last.get("match") and "directResponse" in last and "route" not in last,
         f"{w}: the last route is a catch-all directResponse (nothing unrouted is forwarded)")
    C.ok(all(r.get("match") for r in http_routes[:-1]), f"{w}: only the last route is a catch-all")
    out["fallback"] = last.get("directResponse")
    out["gateway"] = f"{ns}/{gw_name}"
    out["gateway_ports"] = [dig(s, "port", "number") for g in gws for s in dig(g, "spec", "servers", default=[])]
    out["fallback_wiring"] = check_fallback(f, out)
    return out


def traffic_policy(dr, port: int, subset: str = "") -> dict:
    """The traffic policy istiod applies to a DestinationRule's cluster for `port` (and
    `subset`): the rule's, its port-level settings over it, then the subset's likewise
    (pilot/pkg/networking/core/cluster_traffic_policy.go, MergeTrafficPolicy), field by
    field at the top level (enough for these manifests)."""
    def for_port(policy: dict) -> dict:
        merged = {k: v for k, v in (policy or {}).items() if k != "portLevelSettings"}
        for pl in (policy or {}).get("portLevelSettings", []) or []:
            if dig(pl, "port", "number") == port:
                merged.update({k: v for k, v in pl.items() if k != "port"})
        return merged
    policy = for_port(dig(dr, "spec", "trafficPolicy", default={}))
    if subset:
        ss = next((s for s in dig(dr, "spec", "subsets", default=[]) or [] if s.get("name") == subset), {})
        policy.update(for_port(ss.get("trafficPolicy", {})))
    return policy


def istio_http_options(policy: dict) -> dict | None:
    """The HttpProtocolOptions istiod puts in a cluster for this traffic policy (HTTP/1.1 port):
    connectionPool's idle timeout, requests per connection and connection duration
    (cluster_traffic_policy.go applyConnectionPool), and explicit HTTP/1.1, which istiod
    fills in when it sets any (cluster_builder.go, clusterWrapper.build)."""
    pool = policy.get("connectionPool") or {}
    common = {}
    idle = dig(pool, "http", "idleTimeout") or dig(pool, "tcp", "idleTimeout")
    if idle:
        common["idle_timeout"] = idle
    if dig(pool, "http", "maxRequestsPerConnection"):
        common["max_requests_per_connection"] = dig(pool, "http", "maxRequestsPerConnection")
    if dig(pool, "tcp", "maxConnectionDuration"):
        common["max_connection_duration"] = dig(pool, "tcp", "maxConnectionDuration")
    if not common:
        return None
    return {"@type": HTTP_OPTIONS_TYPE, "common_http_protocol_options": common,
            "explicit_http_config": {"http_protocol_options": {}}}


def istio_cluster(host: str, port: int, subset: str, dr) -> dict:
    """What the check needs of a cluster istiod generates for a ServiceEntry host and port."""
    policy = traffic_policy(dr, port, subset) if dr else {}
    return {"name": f"outbound|{port}|{subset}|{host}", "host": host, "port": port, "subset": subset,
            "tls": policy.get("tls", {}), "http_options": istio_http_options(policy)}


def duration_ms(value) -> int | None:
    """An Istio duration ("600s", "1.5s", "500ms", "1m", "1h") in milliseconds."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", str(value or "").strip())
    if not m:
        return None
    return round(float(m.group(1)) * {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}[m.group(2)])


def istio_cluster_match(cp, name: str) -> bool:
    """Whether a CLUSTER patch's match selects the cluster `name`, as istiod decides
    (pilot/pkg/networking/core/envoyfilter/cluster_patch.go, clusterMatch)."""
    m = dig(cp, "match", "cluster")
    if m is None:
        return True
    if m.get("name"):
        return m["name"] == name
    parts = name.split("|")
    if len(parts) != 4:
        return False
    _, port, subset, host = parts
    if m.get("subset") and m["subset"] != subset:
        return False
    if m.get("service") and m["service"] != host:
        return False
    return not m.get("portNumber") or int(m["portNumber"]) == int(port or 0)


def istio_merged_http_options(f, cluster: dict):
    """The cluster's HttpProtocolOptions after the EnvoyFilter's CLUSTER MERGE patches:
    istiod's merge replaces a typed_extension_protocol_options entry whole (pkg/proto/merge,
    mergeMap), it does not merge into it."""
    opts = copy.deepcopy(cluster["http_options"])
    for cp in patches(f["ef"], "CLUSTER"):
        if dig(cp, "patch", "operation") in ("MERGE", "MERGE_AND_REPLACE_LIST") and istio_cluster_match(cp, cluster["name"]):
            value = dig(cp, "patch", "value", "typed_extension_protocol_options", HTTP_OPTIONS_KEY)
            if value is not None:
                opts = copy.deepcopy(value)
    return opts


def agent_rewrite(vm: dict) -> dict:
    """vm_config as the istio-agent hands it to Envoy: remote code rewritten to the file its
    cache keeps (pkg/wasm/convert.go rewriteVMConfig; pkg/wasm/cache.go getModulePath:
    <dir>/<sha256 of the URL without tag or digest>/<checksum>.wasm, whatever the ECDS
    resource's name)."""
    vm = copy.deepcopy(vm)
    remote = dig(vm, "code", "remote")
    if remote:
        uri = str(dig(remote, "http_uri", "uri", default=""))
        name = "oci://" + re.sub(r"[:@][^/]*$", "", uri[len("oci://"):]) if uri.startswith("oci://") else uri
        checksum = remote.get("sha256", "")
        vm["code"] = {"local": {"filename": "/var/lib/istio/data/%s/%s.wasm" % (
            hashlib.sha256(name.encode()).hexdigest()[:12] + "...",
            "<digest>" if checksum == SHA256_PLACEHOLDER else checksum)}}
    return vm


def check_fallback(f, route_info) -> dict | None:
    """Fallback across a model's deployments in the gateway: the route for chains of
    clusters (Sluice's cluster specifier, the retry policy), and Sluice's upstream filter,
    over ECDS with the very vm_config of the Sluice filter, in every cluster a deployment
    reaches (as istiod would build them, after its merge)."""
    ef = f["ef"]
    w = ef["__where"]
    sluice = f["sluice"]
    fb = f["fallback"]
    providers = {p.get("name"): p for p in sluice.get("providers", [])}
    models = [m for m in sluice.get("models", []) if m.get("deployments")]
    targets: dict[str, list[str]] = {}
    for m in models:
        for d in m["deployments"]:
            p = providers.get(d.get("provider"), {})
            targets.setdefault(p.get("cluster"), [])
            if p.get("name") not in targets[p.get("cluster")]:
                targets[p.get("cluster")].append(p.get("name"))
    route_patches = patches(ef, "HTTP_ROUTE")
    upstream_exts = {dig(p, "patch", "value", "name"): p for p in f["exts"] if p is not f["ext"]}
    merges = [p for p in patches(ef, "CLUSTER") if dig(p, "patch", "operation") in ("MERGE", "MERGE_AND_REPLACE_LIST")]
    if not models and not route_patches and not upstream_exts and not merges:
        print(f"        note: no model has deployments: {w} needs no fallback wiring")
        return None
    print(f"        models with deployments: {', '.join(m['name'] for m in models) or 'none'}; "
          f"their clusters: {', '.join(map(str, targets)) or 'none'}")
    out = {"route": None, "targets": targets, "upstream": upstream_exts}

    # The route for chains.
    if C.ok(len(route_patches) == 1, f"{w}: one HTTP_ROUTE patch adds the route for chains of clusters (fallback)",
            f"found {len(route_patches)}; a chain matches none of the VirtualService's exact routes"):
        rp = route_patches[0]
        rc = dig(rp, "match", "routeConfiguration", default={})
        C.ok(dig(rp, "match", "context") == "GATEWAY" and dig(rp, "patch", "operation") == "INSERT_FIRST",
             f"{w}: the route is inserted first (INSERT_FIRST, context GATEWAY), before the VirtualService's routes")
        C.ok(rc.get("gateway") == route_info.get("gateway") and rc.get("portNumber") in route_info.get("gateway_ports", []),
             f"{w}: the route patch matches the gateway's route configuration ({rc.get('gateway')} port {rc.get('portNumber')})",
             f"the Gateway is {route_info.get('gateway')}, ports {route_info.get('gateway_ports')}")
        C.ok(not dig(rc, "vhost", "route"), f"{w}: the route patch has no route match (it is inserted whatever routes exist)")
        v = dig(rp, "patch", "value", default={})
        match = v.get("match", {})
        hdrs = match.get("headers", [])
        C.ok(match.get("prefix") == "/" and len(hdrs) == 1 and hdrs[0].get("name") == ROUTING_HEADER
             and hdrs[0].get("string_match") == {"contains": ","} and set(match) == {"prefix", "headers"},
             f"{w}: the route matches exactly the requests whose {ROUTING_HEADER} is a chain (contains \",\"); "
             "one cluster goes on to the VirtualService's routes", json.dumps(match))
        action = v.get("route", {})
        C.ok(not any(k in action for k in ("cluster", "cluster_header", "weighted_clusters", "cluster_specifier_plugin")),
             f"{w}: the route's cluster comes only from the inline cluster specifier")
        tc = dig(action, "inline_cluster_specifier_plugin", "extension", "typed_config", default={})
        C.ok(tc.get("@type") == TYPED_STRUCT_TYPE and tc.get("type_url") == SPECIFIER_TYPE,
             f"{w}: the cluster specifier is Sluice's DynamicModuleClusterSpecifier wrapped in a udpa TypedStruct",
             "istiod's Envoy API has no DynamicModuleClusterSpecifier: under its own @type istiod refuses the "
             f"EnvoyFilter (referenced type unknown); found @type {tc.get('@type')}, type_url {tc.get('type_url')}")
        val = tc.get("value", {}) or {}
        so = dig(val, "dynamic_module_config", "module", "local", "filename")
        C.ok(so == f["relay"]["filename"], f"{w}: the specifier loads the relay's .so ({so}), the module of the proxy image",
             f"the relay loads {f['relay']['filename']}")
        C.ok(val.get("specifier_name") == "chain" and set(val) <= {"dynamic_module_config", "specifier_name", "specifier_config"},
             f"{w}: specifier_name is chain (the module's specifier), no other field")
        timeouts = {duration_ms(r["timeout"]) if r["timeout"] else 0 for r in route_info["routes"]}
        C.ok(len(timeouts) == 1 and duration_ms(action.get("timeout")) in timeouts,
             f"{w}: the route's timeout ({action.get('timeout')}) == the VirtualService routes' ({sorted(timeouts)} ms)")
        rp_ = action.get("retry_policy", {}) or {}
        on = {x.strip() for x in str(rp_.get("retry_on", "")).split(",") if x.strip()}
        C.ok({"connect-failure", "reset", "retriable-status-codes"} <= on,
             f"{w}: retry_on has connect-failure, reset and retriable-status-codes ({rp_.get('retry_on')})")
        C.ok(sorted(rp_.get("retriable_status_codes", [])) == fb["statuses"],
             f"{w}: retriable_status_codes == Sluice's fallback.statuses ({fb['statuses']})",
             f"found {rp_.get('retriable_status_codes')}")
        need = fb["max_attempts"] - 1 + fb["retries"]
        C.ok(int(rp_.get("num_retries", 1)) >= need,
             f"{w}: num_retries ({rp_.get('num_retries')}) >= fallback.max_attempts - 1 + fallback.retries ({need}), "
             "the most x-envoy-max-retries Sluice sets")
        C.ok(rp_.get("refresh_cluster_on_retry") is True, f"{w}: refresh_cluster_on_retry: true (each retry asks the specifier)")
        C.ok("rate_limited_retry_back_off" not in rp_,
             f"{w}: no rate_limited_retry_back_off (it would wait out the failing account's retry-after)")
        removed = v.get("request_headers_to_remove", []) or []
        C.ok(ROUTING_HEADER in removed and RELAY_HEADER in removed,
             f"{w}: the route removes {ROUTING_HEADER} and {RELAY_HEADER} before forwarding", f"removes {removed}")
        out["route"] = rp

    # The upstream filter's ECDS resources: the Sluice filter's vm_config, exactly.
    down = dig(f["ext"], "patch", "value", "typed_config", "config", default={})
    for n, ep in upstream_exts.items():
        tc = dig(ep, "patch", "value", "typed_config", default={})
        cfg = tc.get("config", {})
        C.ok(tc.get("@type") == WASM_TYPE and cfg.get("root_id") == UPSTREAM_ROOT_ID,
             f"{w}: EXTENSION_CONFIG {n} is Sluice's upstream filter (Wasm, root_id {UPSTREAM_ROOT_ID})")
        C.ok(cfg.get("failure_policy") == "FAIL_CLOSED" and cfg.get("fail_open") in (None, False),
             f"{w}: {n}: failure_policy FAIL_CLOSED")
        C.ok(cfg.get("allow_on_headers_stop_iteration") is True, f"{w}: {n}: allow_on_headers_stop_iteration: true")
        same = cfg.get("vm_config") == down.get("vm_config")
        C.ok(same, f"{w}: {n}: vm_config identical to the Sluice filter's (vm_id, runtime, code, environment): "
                   "one VM per worker holds both, and the requests' plans",
             f"{json.dumps(cfg.get('vm_config'), sort_keys=True)}\n  vs {json.dumps(down.get('vm_config'), sort_keys=True)}")
        up_vm, down_vm = agent_rewrite(cfg.get("vm_config") or {}), agent_rewrite(down.get("vm_config") or {})
        C.ok(same and up_vm == down_vm,
             f"{w}: {n}: ... and still identical after the istio-agent rewrote both to local code "
             f"({dig(up_vm, 'code', 'local', 'filename') or 'no remote code'})")

    # Every cluster a deployment reaches carries the upstream filter, over ECDS.
    clusters = route_info.get("clusters", {})
    for cp in merges:
        hit = [n for n in clusters if istio_cluster_match(cp, n)]
        quota = route_info.get("quota") or {}
        C.ok(dig(cp, "match", "context") == "GATEWAY" and bool(dig(cp, "match", "cluster")) and hit
             and not (quota and istio_cluster_match(cp, quota["name"])),
             f"{w}: CLUSTER MERGE {json.dumps(dig(cp, 'match', 'cluster'))} selects provider clusters only: {', '.join(hit)}",
             "a patch without a cluster match would put Sluice's upstream filter in every cluster (the quota service's too)")
    for cl, names in targets.items():
        c = clusters.get(cl)
        if not C.ok(c is not None, f"deployments of {', '.join(map(str, names))}: cluster {cl} is one istiod generates"):
            continue
        opts = istio_merged_http_options(f, c) or {}
        filters = opts.get("http_filters", []) or []
        last = filters[-1] if filters else {}
        C.ok(last.get("name") == UPSTREAM_CODEC and dig(last, "typed_config", "@type") == UPSTREAM_CODEC_TYPE,
             f"{cl}: the upstream filter chain ends with {UPSTREAM_CODEC}", json.dumps(filters)[:300])
        sl = [x for x in filters[:-1] if x.get("name") in upstream_exts]
        if not C.ok(len(sl) == 1 and len(filters) == 2,
                    f"{cl}: carries Sluice's upstream filter ({', '.join(upstream_exts) or 'none defined'}), then the codec",
                    f"filters {[x.get('name') for x in filters]}: a fallback attempt there would find no plan"):
            continue
        cd = sl[0].get("config_discovery", {})
        C.ok("typed_config" not in sl[0] and dig(cd, "config_source", "ads") == {} and cd.get("type_urls") == [WASM_TYPE]
             and dig(cd, "config_source", "initial_fetch_timeout") == "0s",
             f"{cl}: the upstream filter comes over ECDS (config_discovery ads, initial_fetch_timeout 0s), "
             "where the istio-agent rewrites its remote code (it does not in CDS)")
        istio = c["http_options"] or {}
        common = istio.get("common_http_protocol_options", {})
        kept = all(dig(opts, "common_http_protocol_options", k) == v for k, v in common.items())
        proto = [k for k in ("explicit_http_config", "auto_config", "use_downstream_protocol_config") if k in opts]
        C.ok(kept and len(proto) == 1 and (not istio or opts.get(proto[0]) == istio.get(proto[0])),
             f"{cl}: the merged HttpProtocolOptions repeat istiod's ({json.dumps(common)}, "
             f"{proto[0] if proto else 'no protocol'}), which the merge replaces",
             f"istiod's {json.dumps(istio)} vs merged {json.dumps({k: v for k, v in opts.items() if k != 'http_filters'})}")
    if models:
        C.ok(out["route"] is not None and bool(upstream_exts),
             f"{w}: models with deployments ({', '.join(m['name'] for m in models)}) have the route for chains "
             "and the upstream filter")
    return out


def check_relay_matches_routes(f, routes) -> None:
    """The relay takes the router's place for streams: its timeouts and retries must be
    what the VirtualService gives every provider route."""
    w = f["ef"]["__where"]
    cfg = f["relay"]["config"]
    timeouts = {r["name"]: duration_ms(r["timeout"]) if r["timeout"] else 0 for r in routes}
    C.ok(len(set(timeouts.values())) == 1 and None not in timeouts.values(),
         f"{w}: every provider route has the same timeout, which one relay configuration can repeat", f"{timeouts}")
    want = next(iter(timeouts.values()), 0)
    C.ok(cfg["timeout_ms"] == want, f"{w}: the relay's timeout_ms ({cfg['timeout_ms']}) == the routes' timeout ({want} ms)")
    C.ok(cfg["idle_timeout_ms"] == ISTIO_GATEWAY_STREAM_IDLE_MS,
         f"{w}: the relay's idle_timeout_ms ({cfg['idle_timeout_ms']}) == Istio's stream idle timeout for gateway "
         f"streams ({ISTIO_GATEWAY_STREAM_IDLE_MS} ms; the routes set none)")
    hcm_idle = ISTIO_GATEWAY_STREAM_IDLE_MS
    for p in patches(f["ef"], "NETWORK_FILTER"):
        value = dig(p, "patch", "value", "typed_config", "stream_idle_timeout")
        if dig(p, "patch", "operation") == "MERGE" and value is not None:
            hcm_idle = duration_ms(value)
    C.ok(hcm_idle is not None and (hcm_idle == 0 or hcm_idle > cfg["idle_timeout_ms"] > 0),
         f"{w}: the gateway's stream_idle_timeout ({hcm_idle} ms) is above the relay's idle_timeout_ms "
         f"({cfg['idle_timeout_ms']} ms): a stalled stream is ended by the relay with an event, not reset by Envoy")
    retries = {r["name"]: json.dumps(r["retries"] or {}, sort_keys=True) for r in routes}
    C.ok(len(set(retries.values())) == 1,
         f"{w}: every provider route retries alike, which one relay configuration can repeat", f"{retries}")
    policy = (routes[0]["retries"] or {}) if routes else {}
    attempts = int(policy.get("attempts", 0) or 0)
    retry_on = [x.strip() for x in str(policy.get("retryOn", "")).split(",") if x.strip()]
    statuses = sorted(int(x) for x in retry_on if x.isdigit())
    # The relay's on_reset is Envoy's reset (any reset before headers); its
    # on_connect_failure is connect-failure. The narrower resets (refused-stream,
    # reset-before-request) have no relay equivalent and are not retried by it.
    on_reset = "reset" in retry_on
    on_connect = on_reset or any(x in ("connect-failure", "reset-before-request") for x in retry_on)
    r = cfg["retry"]
    C.ok(r["num_retries"] == attempts, f"{w}: the relay's retry.num_retries ({r['num_retries']}) == the routes' attempts ({attempts})")
    C.ok(f["fallback"]["retries"] == attempts,
         f"{w}: Sluice's fallback.retries ({f['fallback']['retries']}) == the routes' attempts ({attempts}): Sluice sets "
         "x-envoy-max-retries on every request it forwards (fallback.retries for one cluster), which overrides them")
    if attempts:
        C.ok(r["on_reset"] == on_reset,
             f"{w}: the relay's retry.on_reset ({r['on_reset']}) follows the routes' retryOn ({policy.get('retryOn')})")
        C.ok(r["on_connect_failure"] == on_connect or r["on_reset"],
             f"{w}: the relay's retry.on_connect_failure ({r['on_connect_failure']}) follows the routes' retryOn ({policy.get('retryOn')})")
        C.ok(sorted(r["statuses"]) == statuses,
             f"{w}: the relay's retry.statuses ({r['statuses']}) == the status codes in the routes' retryOn ({statuses})")


def check_proxy_image(f, route_info) -> None:
    """Dockerfile.proxy builds Istio's proxyv2 with the relay at the path the EnvoyFilter loads."""
    df = ISTIO_DIR / "Dockerfile.proxy"
    if not C.ok(df.is_file(), f"{rel(df)} exists (Istio's proxy image with the stream relay)"):
        return
    lines = [l.strip() for l in re.sub(r"\\\n", " ", df.read_text()).splitlines() if l.strip() and not l.strip().startswith("#")]
    args = {}
    for l in lines:
        m = re.fullmatch(r"ARG\s+(\w+)(?:=(.*))?", l)
        if m:
            args[m.group(1)] = m.group(2)
    froms = [l for l in lines if l.upper().startswith("FROM ")]
    C.ok(len(froms) == 1 and re.search(r"/proxyv2:\$\{ISTIO_VERSION\}", froms[0]) is not None,
         f"{rel(df)}: one stage, FROM Istio's proxyv2 at ${{ISTIO_VERSION}}", f"{froms}")
    C.ok("ISTIO_VERSION" in args and not args["ISTIO_VERSION"],
         f"{rel(df)}: ISTIO_VERSION is a build argument without a default (it must be the mesh's version)")
    steps = [l for l in lines if l.split()[0].upper() in ("COPY", "ADD", "RUN")]
    want = f["relay"]["filename"]
    copy_ok = len(steps) == 1 and steps[0].split()[0].upper() == "COPY" and steps[0].split()[-2:] == [RELAY_SO, want]
    C.ok(copy_ok, f"{rel(df)}: a single COPY of {RELAY_SO} to {want}, the path the EnvoyFilter loads", f"{steps}")
    if route_info and route_info.get("proxy_image"):
        C.ok(route_info["proxy_image"].rsplit(":", 1)[0].endswith("/sluice-proxyv2"),
             f"the gateway's {PROXY_IMAGE_ANNOTATION} is the image Dockerfile.proxy's instructions tag (REGISTRY/sluice-proxyv2:<version>)",
             route_info["proxy_image"])


OUTBOUND_CLUSTER = re.compile(r"^outbound\|(\d+)\|\|([a-z0-9.-]+)$")
GLOBAL_LIMITS = {"requests_per_minute", "tokens_per_minute", "concurrent_requests", "monthly_tokens",
                 "monthly_budget_usd"}


def service_for_host(docs, host: str):
    """The Service whose cluster-local name (name.namespace.svc.cluster.local) is `host`."""
    for svc in by_kind(docs, "Service"):
        name, ns = dig(svc, "metadata", "name"), dig(svc, "metadata", "namespace")
        if host in (f"{name}.{ns}.svc.cluster.local", f"{name}.{ns}.svc"):
            return svc
    return None


def istio_protocol(port: dict) -> str:
    """Istio's protocol selection for a Service port: appProtocol, else the name's prefix."""
    proto = port.get("appProtocol") or str(port.get("name", "")).split("-", 1)[0]
    return str(proto).lower()


def container_args(dep) -> list[str]:
    cs = dig(dep, "spec", "template", "spec", "containers", default=[]) or []
    return [str(a) for c in cs for a in (c.get("command") or []) + (c.get("args") or [])]


def flag_value(args: list[str], flag: str):
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def check_global(docs, f, gateway_dep) -> dict | None:
    """The `global` section's cluster is a quota Service/Deployment that reaches Redis."""
    ns = dig(f["ef"], "metadata", "namespace")
    g = f["sluice"].get("global")
    replicas = dig(gateway_dep, "spec", "replicas", default=1) if gateway_dep else 1
    if not C.ok(g is not None or replicas == 1,
                f"the gateway runs {replicas} replicas and the Sluice configuration has a `global` section",
                "without it every replica enforces the limits on its own (N times the limits)"):
        return None
    if g is None:
        return None
    w = f"{f['ef']['__where']}: global"
    cluster = str(g.get("cluster", ""))
    m = OUTBOUND_CLUSTER.match(cluster)
    if not C.ok(bool(m), f"{w}.cluster is an Istio outbound cluster, outbound|PORT||HOST ({cluster})",
                "the name must be exactly the one istiod generates for the quota Service"):
        return None
    port, host = int(m.group(1)), m.group(2)
    C.ok(g.get("authority") in (None, host), f"{w}.authority is the quota Service's host ({g.get('authority')})")
    C.ok(g.get("on_engine_failure") in ("deny", "local"), f"{w}.on_engine_failure is deny or local ({g.get('on_engine_failure')})",
         "never unlimited")
    C.ok(set(g.get("limits", [])) == GLOBAL_LIMITS, f"{w}.limits: every tenant limit is global",
         f"{sorted(set(g.get('limits', [])))}: the others would be per replica")
    svc = service_for_host(docs, host)
    if not C.ok(svc is not None, f"{w}.cluster's host {host} is a Service of these manifests"):
        return None
    sp = [p for p in dig(svc, "spec", "ports", default=[]) or [] if p.get("port") == port]
    if not C.ok(len(sp) == 1, f"{svc['__where']}: has port {port}"):
        return None
    C.ok(istio_protocol(sp[0]) in ("http2", "grpc"),
         f"{svc['__where']}: port {port} is HTTP/2 for Istio (appProtocol or name prefix http2/grpc: {istio_protocol(sp[0])})",
         "otherwise Istio's cluster speaks HTTP/1.1 and the callouts are not multiplexed")
    target = sp[0].get("targetPort", port)
    sel = dig(svc, "spec", "selector", default={})
    deps = [d for d in by_kind(docs, "Deployment", dig(svc, "metadata", "namespace"))
            if selects(sel, dig(d, "spec", "template", "metadata", "labels", default={}))]
    if not C.ok(len(deps) == 1, f"{svc['__where']}: selects one Deployment's pods (the quota service)", f"found {len(deps)}"):
        return None
    dep = deps[0]
    args = container_args(dep)
    C.ok(flag_value(args, "--listen") == f"0.0.0.0:{target}",
         f"{dep['__where']}: sluice-quota --listen 0.0.0.0:{target} (the Service's targetPort)",
         f"found --listen {flag_value(args, '--listen')!r}")
    ports = [p.get("containerPort") for c in dig(dep, "spec", "template", "spec", "containers", default=[]) for p in c.get("ports", [])]
    C.ok(target in ports, f"{dep['__where']}: declares containerPort {target}")
    C.ok(dig(dep, "spec", "replicas", default=1) >= 2, f"{dep['__where']}: at least 2 replicas (the gateways refuse requests without it)")
    probes = [c.get("readinessProbe") for c in dig(dep, "spec", "template", "spec", "containers", default=[])]
    C.ok(any(dig(p, "httpGet", "path") == "/healthz" for p in probes if p), f"{dep['__where']}: readiness probe GET /healthz")
    redis_url = flag_value(args, "--redis") or ""
    rm = re.fullmatch(r"redis://([^:/@]+)(?::(\d+))?/(\d*)", redis_url)
    if C.ok(bool(rm), f"{dep['__where']}: --redis is redis://HOST[:PORT]/ ({redis_url})"):
        rhost, rport = rm.group(1), int(rm.group(2) or 6379)
        rsvc = service_for_host(docs, rhost)
        if C.ok(rsvc is not None, f"{dep['__where']}: Redis host {rhost} is a Service of these manifests"):
            C.ok(any(p.get("port") == rport for p in dig(rsvc, "spec", "ports", default=[])),
                 f"{rsvc['__where']}: has port {rport}")
            C.ok(rsvc["__file"].parent != ISTIO_DIR,
                 f"{rsvc['__where']}: the trial Redis is not at the top level of envoy/istio/ (applied only on purpose)")
            sts = [d for d in by_kind(docs, "StatefulSet", dig(rsvc, "metadata", "namespace"))
                   if selects(dig(rsvc, "spec", "selector", default={}), dig(d, "spec", "template", "metadata", "labels", default={}))]
            if C.ok(len(sts) == 1, f"{rsvc['__where']}: selects one StatefulSet's pods"):
                rargs = container_args(sts[0])
                C.ok(flag_value(rargs, "--appendonly") == "yes" and flag_value(rargs, "--appendfsync") in ("everysec", "always"),
                     f"{sts[0]['__where']}: AOF on (--appendonly yes, --appendfsync everysec)")
                mounts = [m.get("mountPath") for c in dig(sts[0], "spec", "template", "spec", "containers", default=[])
                          for m in c.get("volumeMounts", [])]
                claims = dig(sts[0], "spec", "volumeClaimTemplates", default=[]) or []
                C.ok("/data" in mounts and bool(claims), f"{sts[0]['__where']}: /data on a PersistentVolumeClaim")
    return {"name": cluster, "host": host, "port": port}


# ---------------------------------------------------------------------------------------
# 2. Envoy --mode validate on a transplanted bootstrap
# ---------------------------------------------------------------------------------------

H2_OPTIONS = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
    "explicit_http_config": {"http2_protocol_options": {}}}}


def quota_cluster(quota: dict, address: str | None = None, port: int | None = None) -> dict:
    """The quota Service's cluster as Istio generates it (HTTP/2, by its name), on DNS."""
    return {"name": quota["name"], "type": "STRICT_DNS" if address is None else "STATIC",
            "connect_timeout": "1s", "typed_extension_protocol_options": copy.deepcopy(H2_OPTIONS),
            "load_assignment": {"cluster_name": quota["name"], "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {
                    "address": address or quota["host"], "port_value": port or quota["port"]}}}}]}]}}

def duration(s: str | None, default: str) -> str:
    return s if s else default


def envoy_routes(f, route_info, relay: Path) -> list[dict]:
    if route_info is None:
        # Sidecar inbound: every request goes to the local container.
        return [{"match": {"prefix": "/"}, "route": {"cluster": "inbound-local", "timeout": "600s"}}]
    routes = []
    for r in route_info["routes"]:
        for v in r["values"]:
            route = {"cluster": f"outbound|{r['port']}|{r.get('subset', '')}|{r['host']}",
                     "timeout": duration(r["timeout"], "0s")}
            if r.get("retries"):
                route["retry_policy"] = {"retry_on": r["retries"].get("retryOn", "connect-failure"),
                                         "num_retries": r["retries"].get("attempts", 1)}
            routes.append({
                "match": {"prefix": "/", "headers": [{"name": ROUTING_HEADER, "string_match": {"exact": v}}]},
                "route": route,
                "request_headers_to_remove": list(r["remove"]),
            })
    fb = route_info.get("fallback")
    if fb:
        routes.append({"match": {"prefix": "/"},
                       "direct_response": {"status": fb.get("status"),
                                           "body": {"inline_string": dig(fb, "body", "string", default="")}}})
    # HTTP_ROUTE INSERT_FIRST patches (the route for chains), each put at the head as istiod
    # does (rc_patch.go, patchHTTPRoutes), with the specifier's .so switched to this build's.
    for p in patches(f["ef"], "HTTP_ROUTE"):
        if dig(p, "patch", "operation") == "INSERT_FIRST":
            value = copy.deepcopy(dig(p, "patch", "value"))
            module = dig(value, "route", "inline_cluster_specifier_plugin", "extension", "typed_config", "value",
                         "dynamic_module_config", "module", "local")
            if isinstance(module, dict):
                module["filename"] = str(relay)
            routes.insert(0, value)
    return routes


def envoy_clusters(f, route_info, upstream) -> list[dict]:
    """The clusters istiod would give the gateway (the DestinationRules' TLS and
    HttpProtocolOptions), after the EnvoyFilter's CLUSTER MERGE patches. Sluice's upstream
    filter (config_discovery) is made inline by `upstream(name, filter)`, or left to ECDS."""
    if route_info is None:
        return [{"name": "inbound-local", "type": "STATIC", "connect_timeout": "1s",
                 "load_assignment": {"cluster_name": "inbound-local", "endpoints": [{"lb_endpoints": [
                     {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 8000}}}}]}]}}]
    clusters = []
    for name, c in route_info["clusters"].items():
        host, port, tls = c["host"], c["port"], c["tls"]
        cluster = {
            "name": name, "type": "LOGICAL_DNS", "connect_timeout": "5s", "dns_lookup_family": "V4_PREFERRED",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}]}]},
        }
        if tls:
            validation = {"match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": s}}
                                                            for s in tls.get("subjectAltNames", [host])]}
            ca = tls.get("caCertificates")
            if ca and Path(ca).is_file():  # the path is the proxy image's; use it if this machine has it
                validation["trusted_ca"] = {"filename": ca}
            cluster["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": tls.get("sni"), "common_tls_context": {"validation_context": validation}}}
        opts = istio_merged_http_options(f, c)
        if opts:
            opts = copy.deepcopy(opts)
            opts["http_filters"] = [upstream(x) if "config_discovery" in x else x for x in opts.get("http_filters", [])]
            if not opts["http_filters"]:
                del opts["http_filters"]
            cluster["typed_extension_protocol_options"] = {HTTP_OPTIONS_KEY: opts}
        clusters.append(cluster)
    if route_info.get("quota"):
        clusters.append(quota_cluster(route_info["quota"]))
    return clusters


def upstream_filter_config(f, name: str, wasm: Path) -> dict:
    """The typed_config of the EXTENSION_CONFIG `name` (Sluice's upstream filter), with its
    code local as the istio-agent hands it to Envoy."""
    ep = next(p for p in f["exts"] if dig(p, "patch", "value", "name") == name)
    tc = copy.deepcopy(dig(ep, "patch", "value", "typed_config"))
    tc["config"]["vm_config"]["code"] = {"local": {"filename": str(wasm)}}
    return tc


def transplant(f, route_info, wasm: Path, relay: Path, sluice_override: dict | None = None,
               relay_override: str | None = None, upstream=None) -> dict:
    ef = f["ef"]
    wasm_filter = copy.deepcopy(dig(f["ext"], "patch", "value", "typed_config"))
    wasm_filter["config"]["vm_config"]["code"] = {"local": {"filename": str(wasm)}}
    if sluice_override is not None:
        wasm_filter["config"]["configuration"]["value"] = json.dumps(sluice_override)
    if upstream is None:
        # Sluice's upstream filter inline, as ECDS would give it (for --mode validate).
        def upstream(x):
            return {"name": x["name"], "typed_config": upstream_filter_config(f, x["name"], wasm)}
    # The stream relay, from the proxy image's path to this build's .so.
    relay_filter = copy.deepcopy(dig(f["relay"]["patch"], "patch", "value"))
    relay_filter["typed_config"]["dynamic_module_config"]["module"]["local"]["filename"] = str(relay)
    if relay_override is not None:
        relay_filter["typed_config"]["filter_config"]["value"] = relay_override
    router = {"name": ROUTER_NAME, "typed_config": {"@type": ROUTER_TYPE}}
    for p in patches(ef, "HTTP_FILTER"):
        if dig(p, "patch", "operation") == "MERGE" and dig(p, "match", "listener", "filterChain", "filter", "subFilter", "name") == ROUTER_NAME:
            router["typed_config"].update(dig(p, "patch", "value", "typed_config", default={}))
    hcm = {"@type": HCM_TYPE, "stat_prefix": "sluice_check", "codec_type": "AUTO",
           "route_config": {"name": "check", "virtual_hosts": [{"name": "any", "domains": ["*"],
                                                                 "routes": envoy_routes(f, route_info, relay)}]},
           "http_filters": [{"name": f["name"], "typed_config": wasm_filter}, router]}
    # Filters put at the head of the chain (the gzip decompressor), in patch order.
    firsts = [copy.deepcopy(dig(p, "patch", "value")) for p in patches(ef, "HTTP_FILTER")
              if dig(p, "patch", "operation") == "INSERT_FIRST"]
    hcm["http_filters"][:0] = firsts[::-1]
    # Filters put right after another one (the relay after Sluice), in patch order.
    for p in patches(ef, "HTTP_FILTER"):
        if dig(p, "patch", "operation") == "INSERT_AFTER":
            after = dig(p, "match", "listener", "filterChain", "filter", "subFilter", "name")
            at = next(i for i, h in enumerate(hcm["http_filters"]) if h["name"] == after)
            inserted = relay_filter if p is f["relay"]["patch"] else copy.deepcopy(dig(p, "patch", "value"))
            hcm["http_filters"].insert(at + 1, inserted)
    for p in patches(ef, "NETWORK_FILTER"):
        if dig(p, "patch", "operation") == "MERGE":
            extra = copy.deepcopy(dig(p, "patch", "value", "typed_config", default={}))
            extra.pop("@type", None)
            for k, v in extra.items():
                hcm[k] = hcm.get(k, []) + v if isinstance(v, list) else v
    listener = {"name": "check", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 10443}},
                "filter_chains": [{"filters": [{"name": HCM_NAME, "typed_config": hcm}]}]}
    for p in patches(ef, "LISTENER"):
        if dig(p, "patch", "operation") == "MERGE":
            listener.update(dig(p, "patch", "value", default={}))
    clusters = envoy_clusters(f, route_info, upstream) + [copy.deepcopy(c) for c in f["added_clusters"].values()]
    bootstrap = {"node": {"id": "check-istio", "cluster": "check-istio"},
                 "static_resources": {"listeners": [listener], "clusters": clusters}}
    for p in patches(ef, "BOOTSTRAP"):
        if dig(p, "patch", "operation") == "MERGE":
            bootstrap.update(copy.deepcopy(dig(p, "patch", "value", default={})))
    return bootstrap


def run_validate(envoy: str, bootstrap: dict, env_keys, workdir: Path, label: str) -> tuple[bool, str]:
    path = workdir / f"{label}.yaml"
    path.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
    env = dict(os.environ)
    for k in env_keys:
        env[k] = f"sk-check-placeholder-{k.lower()}"  # Sluice refuses a missing or empty key
    try:
        p = subprocess.run([envoy, "--mode", "validate", "-c", str(path), "--log-level", "warn"],
                           env=env, cwd=workdir, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return False, "envoy --mode validate timed out"
    log = p.stdout + p.stderr
    return p.returncode == 0 and "OK" in log, log


def check_envoy_validate(envoy: str, wasm: Path, relay: Path, f, route_info, workdir: Path) -> None:
    w = f["ef"]["__where"]
    label = dig(f["ef"], "metadata", "name")
    bootstrap = transplant(f, route_info, wasm, relay)
    ok, log = run_validate(envoy, bootstrap, f["env_keys"], workdir, label)
    upstream = sum(1 for c in dig(bootstrap, "static_resources", "clusters")
                   for x in dig(c, "typed_extension_protocol_options", HTTP_OPTIONS_KEY, "http_filters", default=[]) or []
                   if dig(x, "typed_config", "config", "root_id") == UPSTREAM_ROOT_ID)
    C.ok(ok, f"{w}: transplanted into an Envoy bootstrap, `envoy --mode validate` accepts it "
             f"(Sluice configured with the embedded JSON, the relay loaded with its configuration, "
             f"{len(dig(bootstrap, 'static_resources', 'clusters'))} clusters ({upstream} with Sluice's upstream filter), "
             f"{len(dig(bootstrap, 'static_resources', 'listeners', 0, 'filter_chains', 0, 'filters', 0, 'typed_config', 'route_config', 'virtual_hosts', 0, 'routes'))} routes)",
         next((l.split("wasm log ", 1)[-1] for l in log.splitlines() if "invalid sluice configuration" in l), "see the log")
         + "\n" + "\n".join("        | " + l for l in log.strip().splitlines()[-25:]))
    # Control: the same bootstrap with a Sluice configuration error must be refused, which
    # shows validation really ran Sluice's configure step.
    broken = copy.deepcopy(f["sluice"])
    broken["providers"][0]["clustr"] = "typo"
    ok_broken, log_broken = run_validate(envoy, transplant(f, route_info, wasm, relay, broken), f["env_keys"], workdir, label + "-broken")
    C.ok(not ok_broken and "clustr" in log_broken,
         f"{w}: control - with an unknown field in the Sluice JSON, validation fails naming it",
         "validation passed or did not name the field: it may not run Sluice's configure step\n" + log_broken[-2000:])
    # And the relay's: validation loads the module and parses its configuration.
    relay_json = json.loads(dig(f["relay"]["patch"], "patch", "value", "typed_config", "filter_config", "value") or "{}")
    relay_json["idle_timout_ms"] = 1
    ok_broken, log_broken = run_validate(envoy, transplant(f, route_info, wasm, relay, relay_override=json.dumps(relay_json)),
                                         f["env_keys"], workdir, label + "-broken-relay")
    C.ok(not ok_broken and "idle_timout_ms" in log_broken,
         f"{w}: control - with an unknown field in the relay's JSON, validation fails naming it",
         "validation passed or did not name the field: it may not load the relay\n" + log_broken[-2000:])
    # And the cluster specifier's, wrapped in a TypedStruct: Envoy unwraps and checks it.
    if ((route_info or {}).get("fallback_wiring") or {}).get("route"):
        broken = transplant(f, route_info, wasm, relay)
        vhost = dig(broken, "static_resources", "listeners", 0, "filter_chains", 0, "filters", 0, "typed_config",
                    "route_config", "virtual_hosts", 0)
        for r in vhost["routes"]:
            value = dig(r, "route", "inline_cluster_specifier_plugin", "extension", "typed_config", "value")
            if isinstance(value, dict):
                value["specifier_nam"] = "chain"
        ok_broken, log_broken = run_validate(envoy, broken, f["env_keys"], workdir, label + "-broken-specifier")
        C.ok(not ok_broken and "specifier_nam" in log_broken,
             f"{w}: control - with an unknown field in the cluster specifier's TypedStruct, validation fails naming it",
             "validation passed or did not name the field: Envoy may not read the TypedStruct\n" + log_broken[-2000:])


# ---------------------------------------------------------------------------------------
# 3. The OCI image layout from scripts/wasm_oci.py
# ---------------------------------------------------------------------------------------

def blob(layout: Path, digest: str) -> bytes | None:
    algo, _, hexd = digest.partition(":")
    p = layout / "blobs" / algo / hexd
    return p.read_bytes() if p.is_file() else None


def check_descriptor(layout: Path, desc: dict, what: str) -> bytes | None:
    data = blob(layout, desc.get("digest", ""))
    if not C.ok(data is not None, f"OCI: {what} blob {desc.get('digest')} exists"):
        return None
    C.ok("sha256:" + hashlib.sha256(data).hexdigest() == desc.get("digest"), f"OCI: {what} blob's sha256 equals its digest")
    C.ok(len(data) == desc.get("size"), f"OCI: {what} blob's size equals the descriptor ({desc.get('size')} bytes)")
    return data


def check_oci(wasm: Path, workdir: Path) -> None:
    script = ROOT / "scripts" / "wasm_oci.py"
    wasm_bytes = wasm.read_bytes()
    tag = "9.9.9-check"
    results = []
    for run in (1, 2):
        out = workdir / f"oci-{run}"
        p = subprocess.run([sys.executable, str(script), "--wasm", str(wasm), "--tag", tag, "--out", str(out), "--json"],
                           capture_output=True, text=True, timeout=120)
        if not C.ok(p.returncode == 0, f"scripts/wasm_oci.py run {run} succeeds", p.stderr[-2000:]):
            return
        results.append((out, json.loads(p.stdout)))
    layout, reported = results[0]
    C.ok(results[0][1]["manifest_digest"] == results[1][1]["manifest_digest"],
         "OCI: two builds of the same wasm give the same manifest digest (reproducible)")
    C.ok(json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}, "OCI: oci-layout is imageLayoutVersion 1.0.0")
    index = json.loads((layout / "index.json").read_text())
    C.ok(index.get("schemaVersion") == 2, "OCI: index.json schemaVersion 2")
    mans = [m for m in index.get("manifests", []) if dig(m, "annotations", "org.opencontainers.image.ref.name") == tag]
    if not C.ok(len(mans) == 1, f"OCI: index.json has one manifest tagged {tag}"):
        return
    mdesc = mans[0]
    C.ok(mdesc.get("mediaType") == "application/vnd.oci.image.manifest.v1+json", "OCI: index entry is an OCI image manifest")
    mbytes = check_descriptor(layout, mdesc, "manifest")
    if mbytes is None:
        return
    manifest = json.loads(mbytes)
    C.ok(manifest.get("schemaVersion") == 2 and manifest.get("mediaType") == "application/vnd.oci.image.manifest.v1+json",
         "OCI: manifest is schemaVersion 2, application/vnd.oci.image.manifest.v1+json")
    C.ok(dig(manifest, "annotations", "module.wasm.image/variant") == "compat",
         "OCI: manifest annotation module.wasm.image/variant=compat (Wasm image spec, compat variant)")
    C.ok(dig(manifest, "config", "mediaType") == "application/vnd.oci.image.config.v1+json", "OCI: config media type is the OCI image config")
    cbytes = check_descriptor(layout, manifest.get("config", {}), "config")
    layers = manifest.get("layers", [])
    if not C.ok(len(layers) == 1, "OCI: exactly one layer (what Istio's compat fetcher requires)", f"found {len(layers)}"):
        return
    C.ok(layers[0].get("mediaType") == "application/vnd.oci.image.layer.v1.tar+gzip",
         "OCI: layer media type application/vnd.oci.image.layer.v1.tar+gzip")
    lbytes = check_descriptor(layout, layers[0], "layer")
    if lbytes is None or cbytes is None:
        return
    tar_bytes = gzip.decompress(lbytes)
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        members = tar.getmembers()
        C.ok([m.name for m in members] == ["plugin.wasm"] and members[0].isfile(),
             "OCI: the layer holds exactly one regular file, plugin.wasm", f"{[m.name for m in members]}")
        inner = tar.extractfile(members[0]).read() if members and members[0].isfile() else b""
    C.ok(inner == wasm_bytes, f"OCI: plugin.wasm in the layer is byte-identical to {rel(wasm)} ({len(wasm_bytes)} bytes)")
    config = json.loads(cbytes)
    C.ok(dig(config, "rootfs", "diff_ids") == ["sha256:" + hashlib.sha256(tar_bytes).hexdigest()],
         "OCI: config rootfs.diff_ids is the sha256 of the uncompressed layer")
    C.ok(reported.get("manifest_digest") == mdesc.get("digest"), "OCI: the digest the script prints is the manifest's")
    C.ok(reported.get("wasm_sha256") == hashlib.sha256(wasm_bytes).hexdigest(), "OCI: the wasm sha256 the script prints is correct")
    C.ok(reported.get("layer_digest") == layers[0].get("digest"), "OCI: the layer digest the script prints is the layer's")

    df = (ISTIO_DIR / "Dockerfile.wasm")
    if C.ok(df.is_file(), "envoy/istio/Dockerfile.wasm exists"):
        lines = [l.strip() for l in df.read_text().splitlines() if l.strip() and not l.strip().startswith("#")]
        C.ok(lines[:1] == ["FROM scratch"], "Dockerfile.wasm: FROM scratch")
        copies = [l for l in lines if l.upper().startswith(("COPY", "ADD", "RUN"))]
        C.ok(len(copies) == 1 and copies[0].startswith("COPY") and copies[0].endswith("plugin.wasm"),
             "Dockerfile.wasm: a single COPY to plugin.wasm (one layer)", f"{copies}")


# ---------------------------------------------------------------------------------------
# 4. Optional (--live): the gateway config serving real requests in a real Envoy
# ---------------------------------------------------------------------------------------

LIVE_KEY = "sk-sluice-istio-live-check"


def mock_key(env_name: str) -> str:
    """The live run's provider key for a key variable: OPENAI_API_KEY_B -> sk-mock-openai-b."""
    return "sk-mock-" + env_name.lower().replace("_api_key", "").replace("_", "-")


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, headers=None, body=None, timeout=10.0):
    import urllib.error
    import urllib.request
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def wait_for(pred, seconds: float) -> bool:
    import time
    end = time.time() + seconds
    while time.time() < end:
        try:
            if pred():
                return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def write_ecds(path: Path, name: str, typed_config: dict, version: str) -> None:
    doc = {"version_info": version, "resources": [{
        "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
        "name": name, "typed_config": typed_config}]}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    os.replace(tmp, path)  # atomic: Envoy watches the directory for moves


def ecds_file(path: Path, f, wasm: Path, sluice: dict, version: str) -> None:
    """Writes the ECDS resource the istio-agent hands Envoy: the EnvoyFilter's Wasm config
    with the remote code rewritten to a local file (as pkg/wasm/convert.go does)."""
    tc = copy.deepcopy(dig(f["ext"], "patch", "value", "typed_config"))
    tc["config"]["vm_config"]["code"] = {"local": {"filename": str(wasm)}}
    tc["config"]["configuration"]["value"] = json.dumps(sluice)
    write_ecds(path, f["name"], tc, version)


def upstream_ecds_files(ecds_dir: Path, f, wasm: Path, version: str, vm_override: dict | None = None) -> None:
    """The upstream filter's ECDS resources, rewritten to the same local file as Sluice's
    (the agent's cache gives both the same path)."""
    for p in f["exts"]:
        if p is f["ext"]:
            continue
        name = dig(p, "patch", "value", "name")
        tc = upstream_filter_config(f, name, wasm)
        if vm_override:
            tc["config"]["vm_config"].update(vm_override)
        write_ecds(ecds_dir / f"{name}.yaml", name, tc, version)


def live_bootstrap(f, route_info, ecds: Path, relay: Path, mock_ports: dict, port: int, admin: int, log: Path,
                   quota_port: int | None = None) -> dict:
    def upstream(x):
        # Sluice's upstream filter from ECDS, as the cluster patch asks for it, from a file.
        cd = copy.deepcopy(x["config_discovery"])
        cd["config_source"].pop("ads")
        cd["config_source"]["path_config_source"] = {"path": str(ecds.parent / f"{x['name']}.yaml"),
                                                     "watched_directory": {"path": str(ecds.parent)}}
        return {"name": x["name"], "config_discovery": cd}
    b = transplant(f, route_info, Path("/unused"), relay, upstream=upstream)
    b["admin"] = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}}
    lst = b["static_resources"]["listeners"][0]
    lst["address"]["socket_address"]["port_value"] = port
    hcm = lst["filter_chains"][0]["filters"][0]["typed_config"]
    # The Sluice filter from ECDS, exactly as the HTTP_FILTER patch asks for it, but from a
    # file instead of istiod.
    cd = copy.deepcopy(dig(f["http"], "patch", "value", "config_discovery"))
    cd["config_source"].pop("ads")
    cd["config_source"]["path_config_source"] = {"path": str(ecds), "watched_directory": {"path": str(ecds.parent)}}
    at = next(i for i, h in enumerate(hcm["http_filters"]) if h["name"] == f["name"])
    hcm["http_filters"][at] = {"name": f["name"], "config_discovery": cd}
    for al in hcm.get("access_log", []):
        al["typed_config"]["path"] = str(log)
    # Provider clusters point at the mock providers, in plain HTTP; their upstream filters
    # (HttpProtocolOptions) stay.
    clusters = []
    for c in b["static_resources"]["clusters"]:
        if route_info.get("quota") and c["name"] == route_info["quota"]["name"]:
            # The quota service started by live_check, on loopback.
            clusters.append(quota_cluster(route_info["quota"], "127.0.0.1", quota_port))
            continue
        live = {"name": c["name"], "type": "STATIC", "connect_timeout": "1s", "load_assignment": {
            "cluster_name": c["name"], "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                # A cluster no provider names gets a port nothing listens on.
                "socket_address": {"address": "127.0.0.1", "port_value": mock_ports.get(c["name"], 9)}}}}]}]}}
        if "typed_extension_protocol_options" in c:
            live["typed_extension_protocol_options"] = c["typed_extension_protocol_options"]
        clusters.append(live)
    b["static_resources"]["clusters"] = clusters
    return b


def live_fallback(gw, admin, workdir, f, sluice, model, provider_of, mock_requests, clear, mock_ports, wasm, ecds) -> None:
    """Fallback with the mock providers' fault knobs, through the gateway of the manifests."""
    import time
    name = model["name"]
    by_name = {p["name"]: p for p in sluice["providers"]}
    cluster = {n: p["cluster"] for n, p in by_name.items()}
    deps = model["deployments"]
    ranks = sorted({d.get("rank", 0) for d in deps})
    first = [d["provider"] for d in deps if d.get("rank", 0) == ranks[0]]
    nxt = [d for d in deps if len(ranks) > 1 and d.get("rank", 0) == ranks[1]]

    def records():
        time.sleep(0.6)  # the access log is flushed every 200 ms
        out = []
        path = workdir / "access.log"
        for line in (path.read_text().splitlines() if path.exists() else []):
            try:
                rec = json.loads(line).get("sluice")
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("model") == name:
                out.append(rec)
        return out

    def ask(content, extra, stream=False):
        body = {"model": name, "max_tokens": 16, "messages": [{"role": "user", "content": content}]}
        if stream:
            body["stream"] = True
        hdrs = {"authorization": f"Bearer {LIVE_KEY}", "content-type": "application/json", **extra}
        try:
            return http("POST", gw + "/v1/chat/completions", hdrs, json.dumps(body).encode())
        except Exception as e:  # noqa: BLE001
            return repr(e), {}, b""

    def provider_keys(r) -> set:
        return set(re.findall(r"sk-mock-[a-z0-9-]+", json.dumps(r.get("headers"))))

    def clean(n):
        """Every request the mock of provider n saw carried its own key only, never the
        tenant's or another account's, and no x-sluice-* header."""
        own = mock_key(by_name[n]["api_key_env"])
        for r in mock_requests(cluster[n]):
            blob = json.dumps(r.get("headers"))
            if provider_keys(r) != {own} or LIVE_KEY in blob or "x-sluice-" in blob:
                return False
        return True

    def clear_all():
        for c in mock_ports:
            clear(c)

    # A 429 from one account of the first rank: the other serves; and within the 429's
    # retry-after (the mock's: 1 s) the next request skips the first one.
    if len(first) >= 2:
        a, b = first[0], first[1]
        ga = gb = []
        st = None
        for i in range(4):  # the first rank is shared by weight: until a is tried first
            clear_all()
            st, _, resp = ask(f"rate limited {i} {time.time()}", {"x-mock-fault": "429", "x-mock-fault-on": a})
            ga, gb = mock_requests(cluster[a]), mock_requests(cluster[b])
            if ga or st != 200:
                break
        C.ok(st == 200 and len(ga) == 1 and ga[0].get("status") == 429 and len(gb) == 1 and gb[0].get("status") == 200,
             f"live: {name}: {a} answers 429 -> the same request is served by {b} (its second account)",
             f"status {st}: {a} saw {[r.get('status') for r in ga]}, {b} saw {[r.get('status') for r in gb]}: {resp[:300]!r}")
        C.ok(clean(a) and clean(b), f"live: {a} and {b} each saw their own key only (never the other's or the tenant's)")
        rec = (records() or [{}])[-1]
        att = [(x.get("provider"), x.get("status")) for x in rec.get("attempts") or []]
        C.ok(rec.get("provider") == b and att == [(a, 429), (b, 200)],
             f"live: the usage record says {b} served, attempts {att}", json.dumps(rec)[:600])
        st, _, _ = ask(f"next {time.time()}", {})
        C.ok(st == 200 and len(mock_requests(cluster[a])) == 1 and len(mock_requests(cluster[b])) == 2,
             f"live: within {a}'s retry-after, the next request goes straight to {b}",
             f"status {st}; {a} saw {len(mock_requests(cluster[a]))}, {b} {len(mock_requests(cluster[b]))}")
        time.sleep(1.2)  # a's retry-after passes

    # Every account of the first rank fails (503): the next rank serves, under its own model
    # name, path, host and key; the router's attempts, then the relay's for a stream.
    if nxt:
        served = [d["provider"] for d in nxt]
        for stream in (False, True):
            what = "a stream (the relay's attempts)" if stream else "a request (the router's attempts)"
            clear_all()
            n0 = len(records())
            st, _, resp = ask(f"all down {stream} {time.time()}",
                              {"x-mock-fault": "503", "x-mock-fault-on": ",".join(first), "x-mock-chunks": "3"}, stream)
            tried = {n: mock_requests(cluster[n]) for n in first}
            got = [(n, r) for n in served for r in mock_requests(cluster[n])]
            ok = st == 200 and (not stream or resp.rstrip().endswith(b"data: [DONE]"))
            C.ok(ok and all(len(v) == 1 and v[0].get("status") == 503 for v in tried.values()) and len(got) == 1,
                 f"live: {name}: {what} with 503 from {', '.join(first)} -> each tried once, then served by "
                 f"{got[0][0] if got else served}",
                 f"status {st}; tried {({n: [r.get('status') for r in v] for n, v in tried.items()})}, "
                 f"next rank saw {len(got)}: {resp[-300:]!r}")
            if got:
                n, r = got[0]
                d = next(x for x in nxt if x["provider"] == n)
                want = d.get("upstream_model") or model.get("upstream_model") or name
                h = {k: v for k, v in r.get("headers", [])}
                try:
                    sent = json.loads(r.get("body") or "{}").get("model")
                except ValueError:
                    sent = None
                checks = {"model": sent == want, "host": h.get("host") == by_name[n].get("authority"),
                          "path": r.get("path", "").startswith(by_name[n]["path_prefix"] + "/chat/completions"),
                          "keys": clean(n) and all(clean(x) for x in first)}
                C.ok(all(checks.values()),
                     f"live: ... {n} got the request rewritten for it by the upstream filter: model {sent}, Host "
                     f"{h.get('host')}, path {r.get('path')}, its own key; no account saw another's key",
                     f"failed: {[k for k, v in checks.items() if not v]}: {json.dumps(r)[:600]}")
            recs = records()[n0:]
            rec = recs[-1] if recs else {}
            att = [(x.get("provider"), x.get("status")) for x in rec.get("attempts") or []]
            C.ok(rec.get("provider") in served and sorted(att[:-1]) == sorted((n, 503) for n in first)
                 and att[-1:] == [(rec.get("provider"), 200)],
                 f"live: ... the usage record names {rec.get('provider')} and its attempts {att}", json.dumps(rec)[:600])
    log = (workdir / "envoy.log").read_text()
    C.ok("without its plan" not in log,
         "live: every fallback attempt found its plan (the upstream filter ran in the Sluice filter's VM)",
         "\n".join(l for l in log.splitlines() if "without its plan" in l)[:600])
    stats = http("GET", f"http://127.0.0.1:{admin}/stats/prometheus")[2].decode()
    C.ok(f'sluice_fallbacks_total{{model="{name}"' in stats, f"live: sluice_fallbacks_total counts {name}'s fallbacks")

    # Control: the upstream filter's vm_config differs (another vm_id, so another VM): a
    # fallback attempt finds no plan and goes without credentials, never with another
    # account's key. This is why its vm_config must be the Sluice filter's.
    if nxt and first:
        upstream_ecds_files(ecds.parent, f, wasm, "2", {"vm_id": "sluice-control"})
        time.sleep(2)
        clear_all()
        st, _, _ = ask(f"control {time.time()}", {"x-mock-fault": "503", "x-mock-fault-on": ",".join(first)})
        later = [(n, r) for n in {*first, *(d["provider"] for d in nxt)} for r in mock_requests(cluster[n])]
        bare = [n for n, r in later if "authorization" not in {k for k, _ in r.get("headers", [])}
                and "x-api-key" not in {k for k, _ in r.get("headers", [])}]
        log = (workdir / "envoy.log").read_text()
        C.ok(st != 200 and bare and "without its plan" in log
             and all(provider_keys(r) <= {mock_key(by_name[n]["api_key_env"])} for n, r in later),
             f"live: control - with another vm_config in the upstream filter, the fallback attempt finds no plan and "
             f"reaches {', '.join(bare) or 'nobody'} without credentials (status {st}), never with another account's key",
             f"status {st}; requests: {[(n, r.get('status')) for n, r in later]}")
        upstream_ecds_files(ecds.parent, f, wasm, "3")
        time.sleep(1)


def live_check(envoy: str, wasm: Path, relay: Path, f, route_info, workdir: Path, mock: str) -> None:
    import signal
    import time
    sluice = copy.deepcopy(f["sluice"])
    providers = sluice["providers"]
    # One mock provider per cluster, named after the Sluice provider that names the cluster
    # (x-mock-fault-on takes those names), with that provider's key.
    provider_of: dict[str, dict] = {}
    for p in providers:
        provider_of.setdefault(p["cluster"], p)
    host_of = {c: route_info["clusters"][c]["host"] for c in provider_of}
    cluster_of = {p["name"]: p["cluster"] for p in providers}
    mock_ports = {c: free_port() for c in provider_of}
    # A test tenant with a known key, in the first tier that allows every model.
    tier = next(t for t, v in sluice["tiers"].items() if v.get("models") == ["*"])
    sluice["tenants"].append({"id": "live-check", "tier": tier,
                              "keys": [{"id": "k", "sha256": hashlib.sha256(LIVE_KEY.encode()).hexdigest()}]})
    env = dict(os.environ, **{k: mock_key(k) for k in f["env_keys"]})
    args = []
    for c, p in provider_of.items():
        args += ["--provider", f"{p['name']},{p['api']},127.0.0.1:{mock_ports[c]},{p['path_prefix']},{p['api_key_env']}"]
    procs = []
    try:
        procs.append(subprocess.Popen([mock] + args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        quota_port = None
        if route_info.get("quota"):
            # Global limits: a scratch Redis and the quota service on free loopback ports.
            import shutil
            redis_bin = os.environ.get("SLUICE_REDIS_SERVER") or shutil.which("redis-server")
            quota_bin = os.environ.get("SLUICE_QUOTA") or str(ROOT / "target/release/sluice-quota")
            if not C.ok(bool(redis_bin) and Path(redis_bin).is_file() and Path(quota_bin).is_file(),
                        f"live: redis-server ({redis_bin}) and sluice-quota ({quota_bin}) for the global limits",
                        "run `make redis quota`, or set SLUICE_REDIS_SERVER and SLUICE_QUOTA"):
                return
            redis_port, quota_port = free_port(), free_port()
            procs.append(subprocess.Popen([redis_bin, "--port", str(redis_port), "--bind", "127.0.0.1",
                                           "--save", "", "--appendonly", "no", "--dir", str(workdir)],
                                          stdout=open(workdir / "redis.log", "w"), stderr=subprocess.STDOUT))
            procs.append(subprocess.Popen([quota_bin, "--listen", f"127.0.0.1:{quota_port}",
                                           "--redis", f"redis://127.0.0.1:{redis_port}/"],
                                          stdout=open(workdir / "quota.log", "w"), stderr=subprocess.STDOUT))
            up = wait_for(lambda: http("GET", f"http://127.0.0.1:{quota_port}/healthz", timeout=1)[0] == 200, 20)
            if not C.ok(up, "live: the quota service answers /healthz",
                        (workdir / "quota.log").read_text()[-2000:] + (workdir / "redis.log").read_text()[-1000:]):
                return
        ecds = workdir / "ecds" / "sluice.yaml"
        ecds.parent.mkdir()
        ecds_file(ecds, f, wasm, sluice, "1")
        upstream_ecds_files(ecds.parent, f, wasm, "1")
        def start_gateway(name, access_log, concurrency):
            """An Envoy on the live bootstrap, its log in workdir/<name>.log; returns its ports."""
            port, admin = free_port(), free_port()
            boot = workdir / f"{name}.yaml"
            boot.write_text(yaml.safe_dump(live_bootstrap(f, route_info, ecds, relay, mock_ports, port, admin,
                                                          workdir / access_log, quota_port), sort_keys=False))
            log = open(workdir / f"{name}.log", "w")
            procs.append(subprocess.Popen([envoy, "-c", str(boot), "--concurrency", str(concurrency),
                                           "--disable-hot-restart", "--use-dynamic-base-id", "--log-level", "info",
                                           "--file-flush-interval-msec", "200"],
                                          env=env, stdout=log, stderr=subprocess.STDOUT))
            return port, admin

        port, admin = start_gateway("envoy", "access.log", 2)
        gw = f"http://127.0.0.1:{port}"
        up = wait_for(lambda: http("GET", f"{gw}/v1/models", {"authorization": f"Bearer {LIVE_KEY}"})[0] == 200, 30)
        if not C.ok(up, "live: the gateway listener serves once the ECDS extension is loaded",
                    (workdir / "envoy.log").read_text()[-3000:]):
            return

        def mock_requests(cluster):
            return json.loads(http("GET", f"http://127.0.0.1:{mock_ports[cluster]}/__mock/requests")[2])

        def clear(cluster):
            http("DELETE", f"http://127.0.0.1:{mock_ports[cluster]}/__mock/requests")

        cases = [("openai", "/v1/chat/completions", "gpt-4.1-mini", {}),
                 ("deepseek", "/v1/chat/completions", "deepseek-chat", {}),
                 ("gemini", "/v1/chat/completions", "gemini-2.5-flash", {}),
                 ("anthropic", "/v1/messages", "claude-sonnet", {"anthropic-version": "2023-06-01"})]
        for name, path, model, extra in cases:
            cluster = cluster_of[name]
            host = host_of[cluster]
            clear(cluster)
            body = {"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": "hello"}]}
            # The client names some public host and tries to pick a cluster itself.
            spoof = cluster_of["anthropic"] if name != "anthropic" else cluster_of["openai"]
            hdrs = {"host": "llm.example.com", "authorization": f"Bearer {LIVE_KEY}", "content-type": "application/json",
                    ROUTING_HEADER: spoof, **extra}
            st, _, resp = http("POST", gw + path, hdrs, json.dumps(body).encode())
            got = mock_requests(cluster)
            seen = got[-1] if got else {}
            h = {k: v for k, v in seen.get("headers", [])}
            C.ok(st == 200 and len(got) == 1,
                 f"live: {model} via {path} -> 200 from the {name} mock (route re-chosen on {ROUTING_HEADER})",
                 f"status {st}, {len(got)} requests at the mock: {resp[:300]!r}")
            if seen:
                C.ok(h.get("host") == host, f"live: {name} received Host {host} (Sluice's :authority rewrite)", f"got {h.get('host')}")
                C.ok(ROUTING_HEADER not in h, f"live: {name} did not receive {ROUTING_HEADER} (removed by the route)")
                C.ok(LIVE_KEY not in json.dumps(seen), f"live: {name} never saw the tenant key")
                C.ok(not any(k.startswith("x-envoy-") for k in h), f"live: {name} saw no x-envoy-* headers (router patch)",
                     str([k for k in h if k.startswith("x-envoy-")]))
        openai = cluster_of["openai"]
        openai_host = host_of[openai]
        clear(openai)
        st, hd, _ = http("POST", gw + "/v1/chat/completions", {"authorization": "Bearer sk-wrong", "content-type": "application/json"},
                         b'{"model":"gpt-4.1-mini","messages":[]}')
        C.ok(st == 401 and not mock_requests(openai), "live: an unknown key gets 401 and reaches no provider")

        # Streams go through the stream relay, which calls the cluster x-sluice-cluster names
        # (Istio's outbound|443||host) itself: a complete stream arrives complete, and a
        # provider breaking off mid-stream ends the client's stream with an error chunk
        # instead of a reset (which urllib would raise as a transport error).
        stream_body = json.dumps({"model": "gpt-4.1-mini", "stream": True,
                                  "messages": [{"role": "user", "content": "hello"}]}).encode()
        stream_hdrs = {"authorization": f"Bearer {LIVE_KEY}", "content-type": "application/json", "x-mock-chunks": "3"}
        clear(openai)
        try:
            st, _, resp = http("POST", gw + "/v1/chat/completions", stream_hdrs, stream_body)
        except Exception as e:  # noqa: BLE001 - a reset stream is what this looks for
            st, resp = repr(e), b""
        got = mock_requests(openai)
        h = {k: v for k, v in (got[-1].get("headers", []) if got else [])}
        C.ok(st == 200 and resp.rstrip().endswith(b"data: [DONE]") and len(got) == 1,
             "live: a streamed request through the relay -> 200, complete ([DONE]), one request at the openai mock",
             f"status {st}, {len(got)} requests: {resp[-300:]!r}")
        C.ok(bool(h) and h.get("host") == openai_host and not any(k.startswith("x-sluice-") for k in h),
             f"live: the relayed request reached {openai_host} with Host {openai_host} and no x-sluice-* header",
             str(sorted(h)))
        try:
            st, _, resp = http("POST", gw + "/v1/chat/completions", {**stream_hdrs, "x-mock-fault": "reset"}, stream_body)
        except Exception as e:  # noqa: BLE001
            st, resp = repr(e), b""
        last = resp.decode(errors="replace").strip().rsplit("\n\n", 1)[-1]
        C.ok(st == 200 and last.startswith("data: {") and '"upstream_failed"' in last,
             "live: a provider breaking off mid-stream -> the relay ends the stream with an error chunk (not a reset)",
             f"status {st}: {resp[-400:]!r}")
        time.sleep(0.5)
        logged = (workdir / "access.log").read_text() if (workdir / "access.log").exists() else ""
        C.ok('"relay":"upstream_reset_after_response_started' in logged,
             "live: the access log's relay field names why the relay ended that stream",
             logged[-1000:])
        C.ok('"tenant":"live-check"' in logged, "live: the access log carries Sluice's usage record")
        if route_info.get("quota"):
            C.ok('"limits_engine":"global"' in logged,
                 "live: the limits were decided by the quota service (usage record limits_engine: global)",
                 logged[-1000:])
        stats = http("GET", f"http://127.0.0.1:{admin}/stats/prometheus")[2].decode()
        C.ok('sluice_requests_total{tenant="live-check"' in stats, "live: Prometheus stats carry tenant labels (BOOTSTRAP stats_tags patch)")

        # Fallback across a model's deployments: the route for chains, Sluice's cluster
        # specifier and upstream filter (over ECDS, sharing the Sluice filter's VM).
        model = next((m for m in sluice["models"] if len(m.get("deployments") or []) > 1), None)
        if (route_info.get("fallback_wiring") or {}).get("route") and model:
            live_fallback(gw, admin, workdir, f, sluice, model, provider_of, mock_requests, clear, mock_ports, wasm, ecds)

        # A bad configuration update is rejected and the working filter stays.
        broken = copy.deepcopy(sluice)
        broken["providers"][0]["clustr"] = "typo"
        ecds_file(ecds, f, wasm, broken, "2")
        time.sleep(2)
        st, _, _ = http("POST", gw + "/v1/chat/completions", {"authorization": f"Bearer {LIVE_KEY}", "content-type": "application/json"},
                        b'{"model":"gpt-4.1-mini","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}')
        C.ok(st == 200, "live: an invalid Sluice update is rejected and the previous filter keeps serving", f"status {st}")
        procs[-1].send_signal(signal.SIGTERM)
        procs[-1].wait(10)

        # Fail closed from the start: Envoy rejects the extension (the log names the field),
        # and the listener then answers every request itself with 500, response flag NFCF
        # ("no filter config found"); nothing reaches a provider.
        ecds_file(ecds, f, wasm, broken, "3")
        for h in mock_ports:
            clear(h)
        port2, admin2 = start_gateway("envoy-broken", "access2.log", 1)
        wait_for(lambda: http("GET", f"http://127.0.0.1:{admin2}/ready")[0] in (200, 503), 20)
        time.sleep(2)
        served = []
        for _ in range(5):
            try:
                served.append(http("POST", f"http://127.0.0.1:{port2}/v1/chat/completions",
                                   {"authorization": f"Bearer {LIVE_KEY}", "content-type": "application/json"},
                                   b'{"model":"gpt-4.1-mini","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}', timeout=2)[0])
            except OSError as e:
                served.append(type(e).__name__)
            time.sleep(0.2)
        time.sleep(0.5)
        reached = sum(len(mock_requests(h)) for h in mock_ports)
        log2 = (workdir / "envoy-broken.log").read_text()
        flags = (workdir / "access2.log").read_text() if (workdir / "access2.log").exists() else ""
        C.ok("invalid sluice configuration at `providers[0].clustr`" in log2,
             "live: an invalid Sluice config from the start is rejected, the log naming the field")
        C.ok(reached == 0 and all(s == 500 or not isinstance(s, int) for s in served)
             and (not any(isinstance(s, int) for s in served) or '"response_flags":"NFCF"' in flags),
             f"live: ... and nothing is forwarded: responses {served} (500 = NFCF, no filter config), {reached} requests at the providers",
             f"flags: {flags[:300]}")
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()

# ---------------------------------------------------------------------------------------

def main() -> int:
    global ISTIO_DIR
    args = sys.argv[1:]
    if "--dir" in args:  # check another copy of the manifests (used to try breaking them)
        ISTIO_DIR = Path(args[args.index("--dir") + 1]).resolve()
    envoy = os.environ.get("SLUICE_ENVOY") or str(ROOT / ".venv/bin/envoy")
    wasm = Path(os.environ.get("SLUICE_WASM") or ROOT / "target/wasm32-wasip1/release/sluice.wasm")
    if not Path(envoy).is_file():
        print(f"check_istio: Envoy not found at {envoy}; run `make envoy` or set SLUICE_ENVOY", file=sys.stderr)
        return 2
    if not wasm.is_file():
        print(f"check_istio: wasm not found at {wasm}; run `make wasm` or set SLUICE_WASM", file=sys.stderr)
        return 2
    relay = Path(os.environ.get("SLUICE_RELAY") or ROOT / "target/release" / RELAY_SO)
    if not relay.is_file():
        print(f"check_istio: the stream relay not found at {relay}; run `make relay` or set SLUICE_RELAY",
              file=sys.stderr)
        return 2
    wasm, relay = wasm.resolve(), relay.resolve()
    envoy = str(Path(envoy).resolve())  # validation runs in a scratch directory
    print(f"check_istio: {rel(ISTIO_DIR)} with envoy {rel(Path(envoy))}, wasm {rel(wasm)} and relay {rel(relay)}")

    C.section("manifests: parse, kinds, apiVersions")
    docs = load_docs()

    C.section("EnvoyFilters: ECDS wiring, FAIL_CLOSED, allow_on_headers_stop_iteration, Sluice config, stream relay")
    filters = []
    for ef in by_kind(docs, "EnvoyFilter"):
        f = check_envoyfilter(ef)
        if f:
            filters.append(f)
    gateway_filters = [f for f in filters if f["context"] == "GATEWAY"]
    C.ok(len(gateway_filters) == 1, "exactly one EnvoyFilter puts Sluice in a gateway", f"found {len(gateway_filters)}")
    C.ok(all(f["ef"]["__file"].parent == ISTIO_DIR for f in gateway_filters),
         "the gateway EnvoyFilter is at the top level (applied by kubectl apply -f envoy/istio/)")

    route_infos = {}
    for f in gateway_filters:
        C.section(f"gateway {dig(f['ef'], 'metadata', 'namespace')}: Deployment, Secret, Gateway, routing")
        route_infos[id(f)] = check_gateway_setup(docs, f)

    C.section("proxy image: Istio's proxyv2 with the stream relay (Dockerfile.proxy)")
    for f in gateway_filters:
        check_proxy_image(f, route_infos.get(id(f)))

    keep = "--keep" in sys.argv[1:]
    tmpdir = tempfile.mkdtemp(prefix="check-istio-")
    try:
        workdir = Path(tmpdir)
        C.section("Envoy: the EnvoyFilters' Wasm config in a real Envoy (--mode validate)")
        for f in filters:
            check_envoy_validate(envoy, wasm, relay, f, route_infos.get(id(f)), workdir)
        C.section("wasm image: scripts/wasm_oci.py -> OCI image layout")
        check_oci(wasm, workdir)
        if "--live" in sys.argv[1:]:
            mock = os.environ.get("SLUICE_MOCK") or str(ROOT / "target/release/sluice-mock")
            C.section(f"live: the gateway's config serving requests (Envoy + ECDS from a file + mock providers {rel(Path(mock))})")
            if C.ok(Path(mock).is_file(), f"mock providers binary at {mock}", "run `make mock` or set SLUICE_MOCK"):
                for f in gateway_filters:
                    live = workdir / "live"
                    live.mkdir()
                    try:
                        live_check(envoy, wasm, relay, f, route_infos[id(f)], live, mock)
                    except Exception as e:  # report, don't crash: the other results stand
                        import traceback
                        C.ok(False, "live: the live run completed", f"{e!r}\n{traceback.format_exc()}")
    finally:
        if keep:
            print(f"\n(--keep: work files left in {tmpdir})")
        else:
            import shutil
            shutil.rmtree(tmpdir, ignore_errors=True)

    print()
    if C.failures:
        print(f"check_istio: {len(C.failures)} FAILED, {C.passed} passed:")
        for f in C.failures:
            print(f"  - {f.splitlines()[0]}")
        return 1
    print(f"check_istio: all {C.passed} checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
