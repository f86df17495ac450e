"""The Prometheus rules (deploy/prometheus/rules.yml) and the Grafana dashboard
(deploy/grafana/markets.json) against the real daemons' /metrics.

Every metric a rule or a panel expression selects must be one the daemons expose (a histogram's
_bucket, _sum and _count series count as its family; `up` is Prometheus's own), on the daemon
its `job` matcher names; every label a selector matches on must be one that metric carries, and
the literal values it names (result="error", route="/api/markets/price"...) ones the daemon
really reports; every label a by/without/on/ignoring clause names must exist. Labels that
Prometheus adds at scrape time (job, instance, and namespace, pod on Kubernetes) are not in
/metrics and are only checked against the scrape configurations' job names.

The dashboard's structure and the alerts' severity, annotations and `for:` are checked without
daemons. promtool checks the syntax and runs the rules' unit tests (tests/deploy/run.sh).
"""
import json
import os
import re
import uuid

import pytest
import yaml

from conftest import SOURCE_DIR, free_port, http_request
from test_notifier import notifier_env

RULES = os.path.join(SOURCE_DIR, "deploy", "prometheus", "rules.yml")
DASHBOARD = os.path.join(SOURCE_DIR, "deploy", "grafana", "markets.json")

JOBS = ("price-service", "order-notifier")
# Added by Prometheus, not in /metrics: the scrape's own series and the target labels.
SYNTHETIC_METRICS = {"up"}
TARGET_LABELS = {"job", "instance", "namespace", "pod"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
                "bottomk", "topk", "quantile", "limitk", "limit_ratio"}
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = AGGREGATIONS | GROUPING | {"and", "or", "unless", "offset", "bool", "atan2", "inf",
                                      "nan", "start", "end"}


# ---- /metrics ----------------------------------------------------------------------------------

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+\S+')
LABEL_PAIR = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_exposition(text):
    """{family: {"type": t, "labels": {label: {values}}}} from the text format."""
    families = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(None, 3)
            families[name] = {"type": kind.strip(), "labels": {}}
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if not m:
            continue
        name = m.group(1)
        family = name if name in families else None
        if family is None:
            for suffix in HISTOGRAM_SUFFIXES:
                base = name[: -len(suffix)]
                if name.endswith(suffix) and families.get(base, {}).get("type") in ("histogram", "summary"):
                    family = base
        assert family, f"sample {name} has no # TYPE line"
        for label, value in LABEL_PAIR.findall(m.group(2) or ""):
            families[family]["labels"].setdefault(label, set()).add(value)
    return families


def resolve(name, families):
    """The family a series name in PromQL belongs to, or None: a counter or gauge by its own
    name, a histogram only through _bucket/_sum/_count (its bare name is no series)."""
    f = families.get(name)
    if f is not None and f["type"] not in ("histogram", "summary"):
        return name
    for suffix in HISTOGRAM_SUFFIXES:
        base = name[: -len(suffix)]
        if name.endswith(suffix) and families.get(base, {}).get("type") in ("histogram", "summary"):
            if suffix != "_bucket" or families[base]["type"] == "histogram":
                return base
    return None


# ---- PromQL ------------------------------------------------------------------------------------

MATCHER = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*'
                     r'("(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`)\s*,?')
TOKEN = re.compile(r'''
    (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<var>\$\{?[A-Za-z_][A-Za-z0-9_]*(?::[A-Za-z_]+)?\}?)
  | (?P<number>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?:[a-z]+)?|0x[0-9a-fA-F]+|\.\d+)
  | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<other>.)
''', re.X | re.S)
REGEX_SPECIAL = set(".*+?()[]{}^$\\")


def unquote(s):
    return s[1:-1].replace('\\"', '"').replace("\\\\", "\\") if s[0] != "`" else s[1:-1]


def closing(expr, i, open_ch, close_ch):
    """Index just past the bracket that closes expr[i] (strings skipped)."""
    depth, j = 0, i
    while j < len(expr):
        c = expr[j]
        if c in "\"'`":
            m = TOKEN.match(expr, j)
            j = m.end()
            continue
        if c == open_ch:
            depth += 1
        elif c == close_ch:
            depth -= 1
            if depth == 0:
                return j + 1
        j += 1
    raise AssertionError(f"unbalanced {open_ch} in {expr!r}")


def parse_promql(expr):
    """(selectors, grouping labels): selectors as (metric, [(label, op, value)]), grouping
    labels from by/without/on/ignoring/group_left/group_right. Function names, keywords,
    numbers, durations, ranges ([5m], [$__rate_interval]) and dashboard variables are skipped."""
    selectors, grouping = [], set()
    i = 0
    while i < len(expr):
        m = TOKEN.match(expr, i)
        kind, text = m.lastgroup, m.group()
        i = m.end()
        if kind == "other" and text == "[":
            i = closing(expr, i - 1, "[", "]")
        elif kind == "other" and text == "{":  # a selector without a name: {__name__="..."}
            j = closing(expr, i - 1, "{", "}")
            matchers = parse_matchers(expr[i:j - 1])
            names = [v for (l, op, v) in matchers if l == "__name__" and op == "="]
            selectors.append((names[0] if names else None, matchers))
            i = j
        elif kind == "ident":
            k = i
            while k < len(expr) and expr[k].isspace():
                k += 1
            nxt = expr[k] if k < len(expr) else ""
            if text in GROUPING:
                if nxt == "(":
                    j = closing(expr, k, "(", ")")
                    grouping.update(x.strip() for x in expr[k + 1:j - 1].split(",") if x.strip())
                    i = j
            elif text in KEYWORDS or nxt == "(":
                continue  # an operator, an aggregation, a function
            elif nxt == "{":
                j = closing(expr, k, "{", "}")
                selectors.append((text, parse_matchers(expr[k + 1:j - 1])))
                i = j
            else:
                selectors.append((text, []))
    return selectors, grouping


def parse_matchers(body):
    out, pos = [], 0
    while pos < len(body.strip()):
        m = MATCHER.match(body, pos)
        assert m, f"cannot parse label matchers {body!r}"
        out.append((m.group(1), m.group(2), unquote(m.group(3))))
        pos = m.end()
    return out


def literal_alternatives(value):
    """['a', 'b'] for a regex that is only literal alternatives (a|b), else None."""
    if any(c in REGEX_SPECIAL for c in value):
        return None
    return value.split("|")


def test_promql_parser():
    sel, grp = parse_promql(
        'histogram_quantile(0.99, sum by (job, le) (rate(foo_bucket{job="x", a=~"b|c"}[5m])))'
        ' > 0.1 and on (job) sum without (instance) (bar) unless baz offset 5m'
        ' / ignoring(a) group_left(b) qux{c!="$v"}[$__rate_interval]')
    assert sel == [("foo_bucket", [("job", "=", "x"), ("a", "=~", "b|c")]), ("bar", []),
                   ("baz", []), ("qux", [("c", "!=", "$v")])]
    assert grp == {"job", "le", "instance", "a", "b"}
    assert literal_alternatives("hit|miss") == ["hit", "miss"]
    assert literal_alternatives("5..") is None


# ---- the expressions -----------------------------------------------------------------------

def load_rules():
    with open(RULES) as f:
        doc = yaml.safe_load(f)
    return [r for g in doc["groups"] for r in g["rules"]]


def load_dashboard():
    with open(DASHBOARD) as f:
        return json.load(f)


def dashboard_panels(dash):
    """Every panel, rows' nested panels included."""
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def expressions():
    """(where, expr) of every rule and every panel target."""
    out = []
    for r in load_rules():
        out.append((f"rules.yml {r.get('alert') or r.get('record')}", r["expr"]))
    for p in dashboard_panels(load_dashboard()):
        for t in p.get("targets", []):
            out.append((f"markets.json panel {p['id']} \"{p['title']}\" {t['refId']}", t["expr"]))
    return out


def test_dashboard_structure():
    dash = load_dashboard()
    assert dash.get("title") and dash.get("uid") and isinstance(dash.get("schemaVersion"), int)
    variables = {v["name"] for v in dash.get("templating", {}).get("list", [])}
    panels = dashboard_panels(dash)
    ids = [p.get("id") for p in panels]
    assert all(isinstance(i, int) for i in ids), ids
    assert len(ids) == len(set(ids)), f"panel ids not unique: {ids}"
    graphs = [p for p in panels if p.get("type") != "row"]
    assert len(graphs) >= 10
    cells = {}
    for p in graphs:
        where = f"panel {p['id']} ({p.get('title')})"
        assert p.get("type") and p.get("title"), where
        g = p["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and g["x"] >= 0 and g["y"] >= 0 and g["x"] + g["w"] <= 24, where
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{where} overlaps panel {cells[(x, y)]}"
                cells[(x, y)] = p["id"]
        assert p.get("datasource"), where
        targets = p.get("targets")
        assert targets, f"{where} has no targets"
        ref_ids = [t.get("refId") for t in targets]
        assert all(ref_ids) and len(ref_ids) == len(set(ref_ids)), f"{where}: refIds {ref_ids}"
        for t in targets:
            assert t.get("expr", "").strip(), f"{where} {t.get('refId')}: empty expr"
            for var in re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", t["expr"]):
                assert var.startswith("__") or var in variables, f"{where}: ${var} is not a dashboard variable"


def test_alerts_have_severity_annotations_and_for():
    alerts = [r for r in load_rules() if "alert" in r]
    names = [r["alert"] for r in alerts]
    assert len(names) == len(set(names)), names
    for r in alerts:
        assert r.get("labels", {}).get("severity") in ("critical", "warning"), r["alert"]
        annotations = r.get("annotations", {})
        assert annotations.get("summary") and annotations.get("description"), r["alert"]
        assert re.fullmatch(r"\d+[smh]", str(r.get("for", ""))), f"{r['alert']}: for: {r.get('for')}"


# ---- against the running daemons ---------------------------------------------------------

def scrape(daemon):
    status, _, body = http_request("GET", daemon.url + "/metrics")
    assert status == 200
    return parse_exposition(body.decode())


def merge(a, b):
    """Two replicas' families as one job's: the union of their label values."""
    out = {name: {"type": f["type"], "labels": {k: set(v) for k, v in f["labels"].items()}}
           for name, f in a.items()}
    for name, f in b.items():
        mine = out.setdefault(name, {"type": f["type"], "labels": {}})
        for k, v in f["labels"].items():
            mine["labels"].setdefault(k, set()).update(v)
    return out


@pytest.fixture
def exposed(start_daemon):
    """{job: families} of both daemons, after requests that create the per-route series: a
    price, an unknown market and a bad request, and (from a second price-service whose origin
    is a closed port) a 503."""
    price = start_daemon("price-service")
    no_origin = start_daemon("price-service", {
        "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/markets"})
    notifier = start_daemon("order-notifier", notifier_env())
    for path in ("/api/markets/price?market=BTC-USD", "/api/markets/price?market=NO-SUCH",
                 "/api/markets/price"):
        http_request("GET", price.url + path)
    status, _, _ = http_request("GET", no_origin.url + f"/api/markets/price?market=X-{uuid.uuid4().hex[:8]}")
    assert status == 503
    return {"price-service": merge(scrape(price), scrape(no_origin)), "order-notifier": scrape(notifier)}


def test_every_metric_and_label_in_rules_and_dashboard_is_exposed(exposed):
    exprs = expressions()
    assert len(exprs) > 40
    recorded = {r["record"] for r in load_rules() if "record" in r}
    all_labels = TARGET_LABELS | {l for fams in exposed.values() for f in fams.values() for l in f["labels"]}
    problems, used = [], set()
    for where, expr in exprs:
        selectors, grouping = parse_promql(expr)
        for label in grouping - all_labels:
            problems.append(f"{where}: groups by {label!r}, which no metric has")
        for name, matchers in selectors:
            if name is None:
                problems.append(f"{where}: a selector without a metric name")
                continue
            if name in recorded or name in SYNTHETIC_METRICS:
                continue
            jobs = list(JOBS)
            for label, op, value in matchers:
                if label == "job":
                    values = [value] if op in ("=", "!=") else literal_alternatives(value)
                    assert values and all(v in JOBS for v in values), f"{where}: job {op} {value!r}"
                    jobs = values if op in ("=", "=~") else [j for j in JOBS if j not in values]
            found = [(job, resolve(name, exposed[job])) for job in jobs]
            found = [(job, fam) for job, fam in found if fam]
            if not found:
                problems.append(f"{where}: {name} is not exposed by {' or '.join(jobs)}")
                continue
            used.add(found[0][1])
            for label, op, value in matchers:
                if label in TARGET_LABELS or label == "__name__" or "$" in value:
                    continue
                seen = set()
                for job, fam in found:
                    seen |= exposed[job][fam]["labels"].get(label, set())
                if not seen:
                    problems.append(f"{where}: {name} has no label {label!r}")
                    continue
                wanted = [value] if op in ("=", "!=") else literal_alternatives(value)
                if wanted is None:
                    if op == "=~" and not any(re.fullmatch(value, v) for v in seen):
                        problems.append(f"{where}: {name}{{{label}=~{value!r}}} matches none of {sorted(seen)}")
                    continue
                for v in wanted:
                    if v not in seen:
                        problems.append(f"{where}: {name}{{{label}{op}{value!r}}}: {v!r} is not among {sorted(seen)}")
    assert not problems, "\n".join(problems)
    # And the checks saw what the task is about (a parser that finds nothing passes anything).
    for family in ("redis_up", "price_cache_lookups_total", "origin_requests_total",
                   "http_request_duration_seconds", "notifier_leader", "order_event_delivery_seconds",
                   "ws_slow_consumer_closes_total", "pg_listener_up", "ws_connections"):
        assert family in used, f"{family} is used by no rule or panel"
