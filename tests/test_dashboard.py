"""The Grafana dashboard and the Prometheus alert rules only query metrics the project exports.

Every PromQL expression of ``configs/grafana/dashboards/claimwatch.json`` (panel targets and
template-variable queries) and of ``configs/prometheus/rules/*.yml`` is tokenised here; each
series name it selects must be a series of a collector registered in ``stream.metrics.REGISTRY``
(with the suffixes its type produces: ``_total``/``_created`` for counters,
``_bucket``/``_count``/``_sum``/``_created`` for histograms), a recording rule defined in the
shipped rule files, or a standard Prometheus series (``up``). Label names used in matchers and
``by``/``without`` clauses must be labels of the metrics that expression selects. When
``promtool`` is installed, Prometheus' own parser checks every expression too.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from stream import metrics as M

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "configs" / "grafana" / "dashboards" / "claimwatch.json"
RULES_DIR = ROOT / "configs" / "prometheus" / "rules"

#: series every Prometheus has without the project exporting them
STANDARD_SERIES = {"up": {"job", "instance"}}
#: labels Prometheus attaches to every scraped series, and the histogram bucket label
TARGET_LABELS = {"job", "instance", "__name__"}

FUNCTIONS = {
    "abs", "absent", "absent_over_time", "acos", "acosh", "asin", "asinh", "atan", "atanh", "avg_over_time",
    "ceil", "changes", "clamp", "clamp_max", "clamp_min", "cos", "cosh", "count_over_time", "day_of_month",
    "day_of_week", "day_of_year", "days_in_month", "deg", "delta", "deriv", "exp", "floor", "histogram_quantile",
    "holt_winters", "hour", "idelta", "increase", "irate", "label_join", "label_replace", "last_over_time", "ln",
    "log10", "log2", "max_over_time", "min_over_time", "minute", "month", "pi", "predict_linear",
    "present_over_time", "quantile_over_time", "rad", "rate", "resets", "round", "scalar", "sgn", "sin", "sinh",
    "sort", "sort_desc", "sqrt", "stddev_over_time", "stdvar_over_time", "sum_over_time", "tan", "tanh", "time",
    "timestamp", "vector", "year",
}
AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
                "topk", "quantile"}
LABEL_LIST_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"} | LABEL_LIST_KEYWORDS

#: Grafana's built-in and dashboard variables, replaced before parsing
GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$instance": ".*"}

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<comment>\#[^\n]*)
  | (?P<str>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<num>0[xX][0-9a-fA-F]+|(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?(?:(?:ms|[smhdwy])(?:\d+(?:ms|[smhdwy]))*)?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>==|!=|>=|<=|=~|!~|[-+*/%^<>=(){}\[\],:@])
""", re.X)


class PromQLError(ValueError):
    pass


def tokens(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if not m:
            raise PromQLError(f"cannot tokenise {expr[pos:pos + 20]!r} in {expr!r}")
        pos = m.end()
        if m.lastgroup not in ("ws", "comment"):
            out.append((m.lastgroup, m.group()))
    return out


def analyse(expr: str) -> tuple[set[str], set[str], list[str]]:
    """(series names selected, label names used, functions called) of one PromQL expression."""
    toks = tokens(expr)
    names: set[str] = set()
    labels: set[str] = set()
    funcs: list[str] = []
    depth = {"{": 0, "[": 0, "(": 0}
    closing = {"}": "{", "]": "[", ")": "("}
    i = 0
    while i < len(toks):
        kind, val = toks[i]
        nxt = toks[i + 1][1] if i + 1 < len(toks) else ""
        if kind == "op" and val in depth:
            depth[val] += 1
        elif kind == "op" and val in closing:
            depth[closing[val]] -= 1
            if depth[closing[val]] < 0:
                raise PromQLError(f"unbalanced {val!r} in {expr!r}")
        elif kind == "ident" and depth["{"]:
            if nxt not in ("=", "!=", "=~", "!~"):
                raise PromQLError(f"label matcher without operator after {val!r} in {expr!r}")
            labels.add(val)
        elif kind == "ident" and depth["["]:
            pass  # only durations / subquery steps live in brackets
        elif kind == "ident" and val in LABEL_LIST_KEYWORDS:
            if nxt == "(":
                j = i + 2
                while j < len(toks) and toks[j][1] != ")":
                    if toks[j][0] == "ident":
                        labels.add(toks[j][1])
                    elif toks[j][1] != ",":
                        raise PromQLError(f"unexpected {toks[j][1]!r} in the label list of {val} in {expr!r}")
                    j += 1
                i = j + 1
                continue
            if val not in ("group_left", "group_right"):
                raise PromQLError(f"{val} needs a label list in {expr!r}")
        elif kind == "ident" and val.lower() in KEYWORDS:
            pass
        elif kind == "ident" and val in AGGREGATIONS and nxt in ("by", "without"):
            funcs.append(val)  # sum by (le) (...)
        elif kind == "ident" and nxt == "(":
            if val not in FUNCTIONS | AGGREGATIONS:
                raise PromQLError(f"unknown function {val}() in {expr!r}")
            funcs.append(val)
        elif kind == "ident":
            names.add(val)
        i += 1
    if any(depth.values()):
        raise PromQLError(f"unbalanced brackets in {expr!r}")
    return names, labels, funcs


def grafana_to_promql(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    if "$" in expr:
        raise PromQLError(f"unknown Grafana variable in {expr!r}")
    return expr


# --------------------------------------------------------------------------- what the project exports


def exported_series() -> dict[str, set[str]]:
    """{series name: label names} for every collector in ``stream.metrics.REGISTRY``."""
    labels_of = {}
    for obj in vars(M).values():
        if isinstance(obj, MetricWrapperBase):
            labels_of[obj._name] = set(obj._labelnames)  # the collector's declared label names
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
                "gauge": ("",), "summary": ("", "_count", "_sum", "_created"), "info": ("_info",),
                "untyped": ("",)}
    out: dict[str, set[str]] = {}
    for family in M.REGISTRY.collect():
        assert family.type in suffixes, f"{family.name}: metric type {family.type} not handled here"
        base = family.name
        assert base in labels_of, f"{base} is registered but not a module-level metric of stream.metrics"
        for sfx in suffixes[family.type]:
            out[base + sfx] = labels_of[base] | ({"le"} if sfx == "_bucket" else set())
    return out


def recorded_series() -> dict[str, set[str]]:
    """Recording rules of the shipped rule files: {name: labels their expression keeps}."""
    out = {}
    for f in sorted(RULES_DIR.glob("*.yml")):
        for g in yaml.safe_load(f.read_text(encoding="utf-8"))["groups"]:
            for r in g["rules"]:
                if "record" in r:
                    by = re.findall(r"\bby\s*\(([^)]*)\)", r["expr"])
                    out[r["record"]] = {x.strip() for b in by for x in b.split(",") if x.strip()}
    return out


# --------------------------------------------------------------------------- the files under test


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def all_panels(dash: dict) -> list[dict]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows hold their panels
    return out


def dashboard_exprs(dash: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and query variable."""
    out = []
    for p in all_panels(dash):
        for t in p.get("targets", []):
            out.append((f"panel {p['title']!r} target {t.get('refId')}", grafana_to_promql(t["expr"])))
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") != "query":
            continue
        q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        m = re.fullmatch(r"\s*label_values\((.*),\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*", q)
        if m:  # Grafana's label_values(<selector>, <label>): the selector is PromQL, the label must exist
            out.append((f"variable {v['name']}", m.group(1) + f" * on ({m.group(2)}) group_left () vector(1)"))
        else:
            out.append((f"variable {v['name']}", grafana_to_promql(q)))
    return out


def rule_exprs() -> list[tuple[str, str, dict]]:
    out = []
    for f in sorted(RULES_DIR.glob("*.yml")):
        for g in yaml.safe_load(f.read_text(encoding="utf-8"))["groups"]:
            for r in g["rules"]:
                out.append((f"{f.name} {g['name']}/{r.get('alert') or r.get('record')}", r["expr"], r))
    return out


# --------------------------------------------------------------------------- the parser itself


def test_the_extractor_finds_names_and_labels_in_tricky_expressions():
    names, labels, funcs = analyse(
        'sum by (le, topic) (rate(foo_bucket{a="x{y}", b=~"$instance"}[5m] offset 1d)) '
        '/ on () group_left () bar:ratio_rate1h > bool 1e-9 or vector(0) unless baz # comment up')
    assert names == {"foo_bucket", "bar:ratio_rate1h", "baz"}
    assert labels == {"le", "topic", "a", "b"}
    assert funcs == ["sum", "rate", "vector"]
    assert analyse("max(x) without (instance) and on(job) count(y)")[:2] == ({"x", "y"}, {"instance", "job"})
    for bad in ("sum(rate(x[5m])", "sum by le (x)", "nosuchfunc(x)", "x{a}"):
        with pytest.raises(PromQLError):
            analyse(bad)


def test_exported_series_account_for_type_suffixes():
    s = exported_series()
    assert {"claimwatch_settlements_processed_total", "claimwatch_settlements_processed_created",
            "claimwatch_batch_duration_seconds_bucket", "claimwatch_batch_duration_seconds_count",
            "claimwatch_batch_duration_seconds_sum", "claimwatch_consumergroup_lag"} <= set(s)
    assert "claimwatch_consumergroup_lag_total" not in s and "claimwatch_alerts_total_bucket" not in s
    assert s["claimwatch_alerts_total"] == {"rule", "severity"}
    assert s["claimwatch_processing_latency_seconds_bucket"] == {"le"}
    assert all(n.startswith("claimwatch_") for n in s)


# --------------------------------------------------------------------------- the dashboard


def test_dashboard_is_a_provisionable_grafana_dashboard(dashboard):
    assert dashboard["uid"] == "claimwatch" and dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int)
    assert dashboard.get("id") is None, "a provisioned dashboard must not pin a database id"
    panels = all_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    graphs = [p for p in panels if p["type"] != "row"]
    assert len(graphs) >= 20
    for p in graphs:
        where = f"panel {p['title']!r}"
        assert p["datasource"] == {"type": "prometheus", "uid": "prometheus"}, where
        assert p["targets"], f"{where} has no query"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), f"{where}: duplicate refId"
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "prometheus", where
        g = p["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and g["x"] + g["w"] <= 24, where
    for v in dashboard["templating"]["list"]:
        assert v["datasource"]["uid"] == "prometheus"


def test_every_dashboard_query_uses_exported_metrics_and_their_labels(dashboard):
    known = {**exported_series(), **recorded_series(), **STANDARD_SERIES}
    problems = []
    for where, expr in dashboard_exprs(dashboard):
        names, labels, funcs = analyse(expr)
        if not names:
            problems.append(f"{where}: selects no metric: {expr}")
        unknown = names - set(known)
        if unknown:
            problems.append(f"{where}: not exported by stream/metrics.py: {sorted(unknown)}")
            continue
        allowed = set().union(*(known[n] for n in names)) | TARGET_LABELS
        if labels - allowed:
            problems.append(f"{where}: labels {sorted(labels - allowed)} are not labels of {sorted(names)}")
        if "histogram_quantile" in funcs and not any(n.endswith("_bucket") for n in names):
            problems.append(f"{where}: histogram_quantile over no _bucket series")
    assert not problems, "\n".join(problems)


def test_the_dashboard_shows_what_operators_expect(dashboard):
    exprs = [e for _, e in dashboard_exprs(dashboard)]
    text = "\n".join(exprs)

    def some(pattern):
        return any(re.search(pattern, e) for e in exprs)

    assert some(r"rate\(claimwatch_settlements_processed_total"), "throughput"
    assert some(r"claimwatch_consumergroup_lag"), "lag"
    for h in ("processing_latency_seconds", "event_to_alert_latency_seconds", "redis_latency_seconds",
              "batch_duration_seconds", "batch_size", "model_score"):
        for q in ("0.5", "0.99"):
            assert f"histogram_quantile({q}, sum by (le) (rate(claimwatch_{h}_bucket" in text, f"p{q} of {h}"
    assert some(r"sum by \(rule\) \(rate\(claimwatch_alerts_total"), "alerts by rule"
    assert some(r"sum by \(reason\) \(rate\(claimwatch_settlements_invalid_total"), "DLQ by reason"
    assert some(r"claimwatch_redis_errors_total"), "Redis errors"


def test_every_exported_metric_is_on_the_dashboard(dashboard):
    """A metric added to stream/metrics.py must get a panel (or this test names it)."""
    used = set().union(*(analyse(e)[0] for _, e in dashboard_exprs(dashboard)))
    families = {f.name for f in M.REGISTRY.collect()}
    missing = {f for f in families if not any(u == f or u.startswith(f + "_") for u in used)}
    assert not missing, f"exported but on no dashboard panel: {sorted(missing)}"


# --------------------------------------------------------------------------- the alert rules


REQUIRED_ALERTS = {
    "ClaimwatchNoSettlements": "claimwatch_settlements_processed_total",
    "ClaimwatchConsumerLagGrowing": "claimwatch_consumergroup_lag",
    "ClaimwatchDeadLetterRateHigh": "claimwatch_settlements_invalid_total",
    "ClaimwatchWorkerDown": "up",
    "ClaimwatchAlertRateAbnormal": "claimwatch_alerts_total",
    "ClaimwatchRedisErrors": "claimwatch_redis_errors_total",
}


def test_every_rule_expression_uses_exported_metrics_and_their_labels():
    recorded = recorded_series()
    known = {**exported_series(), **recorded, **STANDARD_SERIES}
    problems = []
    rules = rule_exprs()
    assert rules
    for where, expr, _ in rules:
        names, labels, funcs = analyse(expr)
        unknown = names - set(known)
        if not names or unknown:
            problems.append(f"{where}: unknown or no metric {sorted(unknown)}: {expr}")
            continue
        allowed = set().union(*(known[n] for n in names)) | TARGET_LABELS
        if labels - allowed:
            problems.append(f"{where}: labels {sorted(labels - allowed)} are not labels of {sorted(names)}")
    assert not problems, "\n".join(problems)


def test_required_alerts_exist_with_severity_summary_and_runbook():
    alerts = {r["alert"]: r for _, _, r in rule_exprs() if "alert" in r}
    for name, metric in REQUIRED_ALERTS.items():
        assert name in alerts, f"missing alert rule {name}"
        assert metric in analyse(alerts[name]["expr"])[0], f"{name} does not look at {metric}"
    for name, r in alerts.items():
        assert r["labels"]["severity"] in ("critical", "warning"), name
        ann = r["annotations"]
        assert ann.get("summary") and ann.get("description"), name
        assert len(ann.get("runbook", "")) > 40, f"{name} needs a runbook annotation"
    # templated annotations may only use labels the expression keeps
    for name, r in alerts.items():
        for lab in re.findall(r"\$labels\.(\w+)", json.dumps(r["annotations"])):
            assert lab in r["expr"] or lab == "instance", f"{name}: annotation uses $labels.{lab}"


# --------------------------------------------------------------------------- Prometheus' own parser


def test_promtool_parses_every_dashboard_and_rule_expression(dashboard, tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package `prometheus`; `make system-deps` installs it)")
    exprs = [e for _, e in dashboard_exprs(dashboard)] + [e for _, e, _ in rule_exprs()]
    doc = {"groups": [{"name": "parse-check", "rules": [{"record": f"check:expr_{i}", "expr": e}
                                                       for i, e in enumerate(exprs)]}]}
    f = tmp_path / "exprs.yml"
    f.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    res = subprocess.run([promtool, "check", "rules", str(f)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in res.stdout
