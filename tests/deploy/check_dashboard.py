#!/usr/bin/env python3
"""Checks the Grafana dashboard (ops/grafana/sluice-dashboard.json) without Grafana.

Run from anywhere, with promtool on PATH or in $SLUICE_PROMTOOL (`make ops` installs it):
    python3 tests/deploy/check_dashboard.py

1. The file is JSON with a uid, a title and an integer schemaVersion; its templating has a
   Prometheus `datasource` variable whose default is the uid provisioned in
   ops/grafana/provisioning/datasources/, and `tenant` and `model` query variables.
2. Every panel but rows has a Prometheus datasource (the variable or the provisioned uid),
   targets, and each target a datasource, a unique refId and an expression; panels sit on
   the 24-column grid without overlapping.
3. Every PromQL expression (panel targets and the variables' label_values selectors, with
   Grafana's variables replaced by sample values) parses: each becomes a recording rule in a
   temporary rule file that `promtool check rules` must accept.
4. Every metric an expression reads is one Sluice exports (the names in src/metrics.rs; a
   histogram's as _bucket, _sum and _count), one of the few Envoy stats listed below (checked
   by hand against Envoy 1.40's /stats/prometheus), or a series recorded by
   ops/prometheus/*.yml; every label it names is one those series carry. The same check runs
   over the expressions of ops/prometheus/*.yml themselves, which promtool cannot do (it
   accepts any metric name).

Exits 1 naming what is wrong; prints what it checked on success.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "ops" / "grafana" / "sluice-dashboard.json"
DATASOURCES = ROOT / "ops" / "grafana" / "provisioning" / "datasources"
RULES_DIR = ROOT / "ops" / "prometheus"
METRICS_RS = ROOT / "src" / "metrics.rs"

# Envoy's own series the dashboard and rules may read (names as Envoy 1.40 exports them with
# the shipped configs: the HTTP connection manager's stat_prefix is `sluice`, and so is the
# Wasm plugin's name in envoy_wasm_sluice_*), and Prometheus's `up`.
ENVOY_METRICS = {
    "envoy_http_downstream_rq_completed",
    "envoy_wasm_sluice_vm_reload_success",
    "envoy_wasm_sluice_vm_reload_failure",
    "up",
}
# Labels besides Sluice's stats_tags: Prometheus's target labels, histogram buckets, Envoy's
# tag on its HTTP stats, and the `kind` the token recording rules add.
OTHER_LABELS = {"job", "instance", "le", "envoy_http_conn_manager_prefix", "kind", "__name__"}

# Sample values for Grafana's variables, so that expressions parse as PromQL.
GRAFANA_VARIABLES = {
    "__rate_interval": "1m",
    "__interval": "1m",
    "__range": "1h",
    "__range_s": "3600",
    "__interval_ms": "60000",
}
PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "offset", "bool", "atan2", "inf", "nan", "Inf", "NaN", "start", "end",
}

checked = []


def fail(message):
    print(f"check_dashboard: FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def ok(message):
    checked.append(message)


def rel(path):
    return str(Path(path).resolve().relative_to(ROOT))


# ---------------------------------------------------------------- what exists


def sluice_metrics():
    """Metric names and label names Sluice exports, read from src/metrics.rs."""
    text = METRICS_RS.read_text()
    names = set(re.findall(r'"(sluice_[a-z0-9_]+)', text))
    if "sluice_requests_total" not in names:
        fail(f"found no metric names in {rel(METRICS_RS)} (expected \"sluice_requests_total\" ...)")
    labels = set(re.findall(r'\("([a-z_]+)", "\(;\1=', text))
    if not {"tenant", "model", "provider"} <= labels:
        fail(f"found no STATS_TAGS label names in {rel(METRICS_RS)}")
    series = set(names)
    # Histograms are the _ms series (src/host/metrics.rs defines them as MetricType::Histogram).
    for name in names:
        if name.endswith("_ms"):
            series |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return series, labels


def rule_files():
    return sorted(p for p in RULES_DIR.glob("*.yml") if p.name != "prometheus.yml")


def recorded_series():
    """record: names, and the static labels they add, from ops/prometheus/*.yml."""
    names = set()
    for path in rule_files():
        names |= set(re.findall(r"^\s*-?\s*record:\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*$",
                                path.read_text(), flags=re.M))
    if not names:
        fail(f"found no recording rules in {rel(RULES_DIR)}/*.yml")
    return names


def rule_expressions():
    """(where, expr) for each rule of ops/prometheus/*.yml, read without a YAML library:
    `expr: <one line>` or `expr: |` followed by an indented block."""
    found = []
    for path in rule_files():
        lines = path.read_text().splitlines()
        i = 0
        name = "?"
        while i < len(lines):
            m = re.match(r"^\s*-?\s*(record|alert):\s*(\S+)", lines[i])
            if m:
                name = m.group(2)
            m = re.match(r"^(\s*)expr:\s*(.*)$", lines[i])
            if m:
                indent, value = len(m.group(1)), m.group(2).strip()
                if value in ("|", ">", "|-", ">-"):
                    block = []
                    i += 1
                    while i < len(lines) and (not lines[i].strip() or
                                              len(lines[i]) - len(lines[i].lstrip()) > indent):
                        block.append(lines[i].strip())
                        i += 1
                    found.append((f"{path.name}: {name}", " ".join(b for b in block if b)))
                    continue
                found.append((f"{path.name}: {name}", value))
            i += 1
    return found


# ---------------------------------------------------------------- PromQL


def substitute(expr, variables):
    """Grafana's $var, ${var} and ${var:fmt} replaced by sample values."""
    def value(name):
        if name in GRAFANA_VARIABLES:
            return GRAFANA_VARIABLES[name]
        if name in variables:
            return ".*"
        fail(f"expression uses ${name}, which is neither a dashboard variable nor Grafana's: {expr}")
    expr = re.sub(r"\$\{(\w+)(?::\w+)?\}", lambda m: value(m.group(1)), expr)
    expr = re.sub(r"\[\[(\w+)\]\]", lambda m: value(m.group(1)), expr)
    return re.sub(r"\$(\w+)", lambda m: value(m.group(1)), expr)


def names_in(expr):
    """(metric names, label names) an expression reads. A lexer, not a parser: good enough
    for the expressions here, which promtool parses anyway."""
    labels = set()
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    for block in re.findall(r"\{([^}]*)\}", text):
        labels |= set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", block))
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    for clause in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", text):
        labels |= {label.strip() for label in clause.split(",") if label.strip()}
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    metrics = set()
    for m in re.finditer(r"(?<![\w.:])([A-Za-z_:][A-Za-z0-9_:]*)", text):
        word = m.group(1)
        if word in PROMQL_KEYWORDS or re.match(r"\s*\(", text[m.end():]):
            continue
        metrics.add(word)
    return metrics, labels


def promtool():
    path = os.environ.get("SLUICE_PROMTOOL") or shutil.which("promtool")
    if not path or not Path(path).is_file():
        fail("promtool not found (on PATH or in $SLUICE_PROMTOOL): run `make ops`, which installs "
             "it with scripts/install-promtool.sh")
    return path


def check_parses(expressions):
    """Each (where, expr) as a recording rule of its own group; promtool names the group of
    every expression that does not parse. JSON is YAML, so no YAML library is needed."""
    groups = [{"name": where, "rules": [{"record": "dashboard:check", "expr": expr}]}
              for where, expr in expressions]
    with tempfile.TemporaryDirectory(prefix="sluice-dashboard-") as tmp:
        path = Path(tmp) / "dashboard-exprs.yml"
        path.write_text(json.dumps({"groups": groups}, indent=1))
        run = subprocess.run([promtool(), "check", "rules", str(path)],
                             capture_output=True, text=True, timeout=120)
    if run.returncode != 0:
        fail(f"`promtool check rules` rejects dashboard expressions:\n"
             f"{(run.stdout + run.stderr).strip()}")
    ok(f"promtool parses all {len(expressions)} PromQL expressions of the dashboard")


# ---------------------------------------------------------------- the dashboard


def provisioned_uid():
    uids = []
    for path in sorted(DATASOURCES.glob("*.y*ml")):
        text = path.read_text()
        if re.search(r"^\s*type:\s*prometheus\s*$", text, flags=re.M):
            uids += re.findall(r"^\s*uid:\s*(\S+)\s*$", text, flags=re.M)
    if len(uids) != 1:
        fail(f"expected one provisioned Prometheus datasource with a uid in {rel(DATASOURCES)}, "
             f"found {uids}")
    return uids[0]


def check_dashboard():
    try:
        dash = json.loads(DASHBOARD.read_text())
    except (OSError, json.JSONDecodeError) as e:
        fail(f"{rel(DASHBOARD)} is not valid JSON: {e}")
    for key in ("uid", "title"):
        if not isinstance(dash.get(key), str) or not dash[key]:
            fail(f"{rel(DASHBOARD)}: no `{key}`")
    if not isinstance(dash.get("schemaVersion"), int):
        fail(f"{rel(DASHBOARD)}: no integer `schemaVersion`")
    ok(f"{rel(DASHBOARD)} is JSON: \"{dash['title']}\" (uid {dash['uid']}, "
       f"schemaVersion {dash['schemaVersion']})")

    uid = provisioned_uid()
    variables = {v.get("name"): v for v in (dash.get("templating") or {}).get("list", [])}
    source = variables.get("datasource")
    if not source or source.get("type") != "datasource" or source.get("query") != "prometheus":
        fail("templating: needs a `datasource` variable of type datasource, query prometheus")
    if (source.get("current") or {}).get("value") != uid:
        fail(f"templating: the datasource variable defaults to "
             f"{(source.get('current') or {}).get('value')!r}, not the provisioned uid {uid!r}")
    allowed_sources = {"${datasource}", "$datasource", uid}
    expressions = []
    for name in ("tenant", "model"):
        var = variables.get(name)
        if not var or var.get("type") != "query":
            fail(f"templating: no query variable `{name}`")
        query = var.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", query or "")
        if not m or m.group(2) != name:
            fail(f"templating: variable {name} should be label_values(<selector>, {name}), "
                 f"found {query!r}")
        if (var.get("datasource") or {}).get("uid") not in allowed_sources:
            fail(f"templating: variable {name} does not use the Prometheus datasource")
        expressions.append((f"variable {name}", m.group(1)))
    ok(f"templating: datasource (default {uid}, as provisioned), tenant and model "
       f"(label_values, multi-value: {variables['tenant'].get('multi')})")

    panels = []
    for panel in dash.get("panels") or []:
        panels.append(panel)
        panels += panel.get("panels") or []  # panels inside collapsed rows
    if not panels:
        fail(f"{rel(DASHBOARD)} has no panels")
    cells = {}
    count = 0
    for panel in panels:
        title = f"panel {panel.get('id')} \"{panel.get('title')}\""
        grid = panel.get("gridPos") or {}
        if not all(isinstance(grid.get(k), int) for k in "xywh") or grid["x"] + grid["w"] > 24:
            fail(f"{title}: gridPos {grid} is not on the 24-column grid")
        for cx in range(grid["x"], grid["x"] + grid["w"]):
            for cy in range(grid["y"], grid["y"] + grid["h"]):
                if (cx, cy) in cells:
                    fail(f"{title} overlaps {cells[(cx, cy)]}")
                cells[(cx, cy)] = title
        if panel.get("type") == "row":
            continue  # a row is a heading: no datasource, no queries
        count += 1
        ds = panel.get("datasource") or {}
        if ds.get("type") != "prometheus" or ds.get("uid") not in allowed_sources:
            fail(f"{title}: datasource {ds} is not the Prometheus datasource ({allowed_sources})")
        targets = panel.get("targets") or []
        if not targets:
            fail(f"{title}: no targets")
        refs = set()
        for target in targets:
            if (target.get("datasource") or {}).get("uid") not in allowed_sources:
                fail(f"{title}: target {target.get('refId')} has no Prometheus datasource")
            if not target.get("refId") or target["refId"] in refs:
                fail(f"{title}: target refId {target.get('refId')!r} missing or repeated")
            refs.add(target["refId"])
            if not isinstance(target.get("expr"), str) or not target["expr"].strip():
                fail(f"{title}: target {target['refId']} has no expr")
            expressions.append((f"{title} {target['refId']}", target["expr"]))
    ok(f"{count} panels (and {len(panels) - count} rows): each has the Prometheus datasource "
       f"and targets; none overlap")
    return [(where, substitute(expr, variables)) for where, expr in expressions]


def check_names(expressions, what):
    metrics, labels = sluice_metrics()
    recorded = recorded_series()
    known = metrics | recorded | ENVOY_METRICS
    known_labels = labels | OTHER_LABELS
    used = set()
    for where, expr in expressions:
        names, label_names = names_in(expr)
        unknown = sorted(names - known)
        if unknown:
            fail(f"{where}: {', '.join(unknown)} is not a series Sluice exports "
                 f"({rel(METRICS_RS)}), an Envoy stat this check knows, or a recorded series "
                 f"of {rel(RULES_DIR)}/: {expr}")
        unknown = sorted(label_names - known_labels)
        if unknown:
            fail(f"{where}: label {', '.join(unknown)} is not one the series carry "
                 f"({', '.join(sorted(known_labels))}): {expr}")
        used |= names
    raw = sorted(used & metrics)
    ok(f"{what}: every metric is Sluice's, Envoy's or recorded; Sluice's read: "
       f"{', '.join(raw)}; recorded: {len(used & recorded)}; Envoy's: "
       f"{', '.join(sorted(used & ENVOY_METRICS)) or 'none'}")


def main():
    expressions = check_dashboard()
    check_parses(expressions)
    check_names(expressions, "dashboard")
    check_names(rule_expressions(), f"{rel(RULES_DIR)}/*.yml")
    print("check_dashboard: OK")
    for line in checked:
        print(f"  ok  {line}")


if __name__ == "__main__":
    main()
