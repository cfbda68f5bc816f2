"""The deployment files, checked against the code without running a container or a cluster.

- Alert rules: ``promtool check rules`` and ``promtool test rules`` (unit tests for every alert,
  firing and not firing); the Prometheus config with ``promtool check config``.
- Grafana dashboard: its shape, and every panel query parses as PromQL (``promtool``).
- Every metric name in a panel query or an alert expression is one the code exports (the
  collectors in ``prometheus_client``'s default registry after importing the metric modules).
- ``docker-compose.yml``: each service's command is a real ``winback`` subcommand, each
  ``WINBACK_*`` name one the settings read (and the values load), ports and health checks match
  the settings, ``depends_on`` conditions are satisfiable, mounted files exist.
- ``deploy/helm/winback``: ``helm lint`` and ``helm template``, then the rendered manifests:
  environment names, probes and ports, labels and selectors, HPA/PDB targets, non-root with a
  read-only root filesystem, the migration hook, and that the PrometheusRule and the dashboard
  ConfigMap carry the same files as deploy/. Default values and ``ci/full-values.yaml``
  (everything on) are validated offline against the Kubernetes schemas (``kubernetes-validate``)
  and the CRD schemas in tests/fixtures/k8s; ``values.schema.json`` refuses typos and wrong
  types; the Ingress and HTTPRoute expose only the public routes; the monitoring objects need
  ``monitoring.coreos.com/v1``.
- Alerts link their section of docs/runbooks.md; the dashboard's job/namespace/instance
  variables filter every query; its MRR is in each currency's own precision.

promtool comes from the Debian package ``prometheus`` and helm from ``go install``: both are put
in place by ``bash scripts/ci-tools``; a missing tool fails the test (never skipped).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from prometheus_client import REGISTRY
from pydantic import BaseModel, SecretStr

from services.cli import parser
from shared.settings import ENV_PREFIX, NESTED, HttpSettings, Settings, load_settings

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
# the KPI alert's tests step by the hour (their window is 14 days)
ALERT_TESTS = (ALERTS_TEST, ROOT / "deploy" / "prometheus" / "alerts_kpi_test.yml")
RUNBOOKS = ROOT / "docs" / "runbooks.md"
RUNBOOK_URL = "https://github.com/example/winback/blob/main/docs/runbooks.md#"
# series Prometheus itself writes for every target
PROMETHEUS_SERIES = {"up"}
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboard.json"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
CHART = ROOT / "deploy" / "helm" / "winback"
METRIC_MODULES = (
    "shared.metrics",
    "services.scheduler.metrics",
    "services.dispatcher.metrics",
    "services.ingest.billing.routes",  # winback_billing_webhooks_total
)
SERVICES = ("ingest", "scheduler", "dispatcher")
TOOL_TIMEOUT = 120


# --- tools ----------------------------------------------------------------------------------------
def _tool(name: str) -> str:
    """The path of ``name``: on PATH, or where ``go install`` puts it (scripts/ci-tools)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = [Path.home() / "go" / "bin" / name]
    go = shutil.which("go")
    if go is not None:
        for var in ("GOBIN", "GOPATH"):
            out = subprocess.run(
                [go, "env", var], capture_output=True, text=True, check=False, timeout=60
            ).stdout.strip()
            if out:
                candidates.insert(
                    0, Path(out) / name if var == "GOBIN" else Path(out) / "bin" / name
                )
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    pytest.fail(
        f"{name} is not installed: run `bash scripts/ci-tools` (it installs promtool from the "
        "Debian package `prometheus` and builds helm with `go install`)",
        pytrace=False,
    )


def _run(*args: str | Path, cwd: Path = ROOT) -> str:
    proc = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        timeout=TOOL_TIMEOUT,
    )
    assert proc.returncode == 0, (
        f"`{' '.join(str(a) for a in args)}` exited {proc.returncode}:\n"
        f"{proc.stdout}\n{proc.stderr}"
    )
    return proc.stdout + proc.stderr


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


# --- what the code exports and reads --------------------------------------------------------------
_SUFFIXES: Mapping[str, tuple[str, ...]] = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "info": ("_info",),
}


def exported_metric_names() -> set[str]:
    """Every series name the services' /metrics can carry: the families of the default registry
    (which /metrics serves) once the metric modules are imported, with the type's suffixes."""
    for module in METRIC_MODULES:
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)
    names: set[str] = set()
    for family in REGISTRY.collect():
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType or origin is typing.Annotated:
        return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]
    return []


def _walk_settings(model: type[BaseModel], prefix: str) -> Iterator[tuple[str, Any]]:
    for name, field in model.model_fields.items():
        env = prefix + name.upper()
        nested = _models_in(field.annotation)
        if nested:
            for sub in nested:
                yield from _walk_settings(sub, env + NESTED)
        else:
            yield env, field.annotation


def valid_env_names() -> set[str]:
    """The environment variables the settings read: one per leaf field, plus the YAML file."""
    return {name for name, _ in _walk_settings(Settings, ENV_PREFIX)} | {f"{ENV_PREFIX}CONFIG_FILE"}


def secret_env_names() -> set[str]:
    """Settings that hold secrets: every SecretStr field, and the database URL (a password)."""
    names = {f"{ENV_PREFIX}DATABASE{NESTED}URL"}
    for name, annotation in _walk_settings(Settings, ENV_PREFIX):
        if "SecretStr" in repr(annotation) or annotation is SecretStr:
            names.add(name)
    return names


def winback_commands() -> set[str]:
    sub = next(
        a for a in parser()._actions if isinstance(a, argparse._SubParsersAction)
    )  # argparse has no public accessor for the subcommands
    return set(sub.choices)


def parses_as_winback(argv: list[str]) -> str | None:
    """None when ``winback ARGV`` parses, else argparse's complaint."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parser().parse_args(argv)
    except SystemExit:
        return err.getvalue().strip() or "exited"
    return None


def default_port(service: str) -> int:
    port = HttpSettings.model_fields[f"{service}_port"].default
    assert isinstance(port, int)
    return port


@contextlib.contextmanager
def settings_env(env: Mapping[str, str]) -> Iterator[None]:
    """Exactly ``env`` as the WINBACK_* environment (the process's own ones set aside)."""
    saved = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIX)}
    for key in saved:
        del os.environ[key]
    os.environ.update(env)
    try:
        yield
    finally:
        for key in env:
            os.environ.pop(key, None)
        os.environ.update(saved)


# --- PromQL: the metric names an expression reads -------------------------------------------------
_TOKEN = re.compile(
    r"""
      (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    | (?P<variable>\$\{[^}]*\}|\$[A-Za-z_]\w*|\[\[[^\]]*\]\])
    | (?P<range>\[[^\]]*\])
    | (?P<number>0[xX][0-9a-fA-F]+|(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?(?:ms|[smhdwy])*)
    | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
    | (?P<space>\s+)
    | (?P<comment>\#[^\n]*)
    | (?P<punct>.)
    """,
    re.VERBOSE | re.DOTALL,
)
_LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_KEYWORDS = {"bool", "and", "or", "unless", "offset", "atan2", "inf", "nan"}
_AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, aggregations,
    keywords, label names (in ``{…}`` or in ``by (…)``-style lists) or Grafana variables."""
    tokens = [
        (m.lastgroup, m.group())
        for m in _TOKEN.finditer(expr)
        if m.lastgroup not in ("space", "comment")
    ]
    names: set[str] = set()
    braces = 0
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if text == "{":
            braces += 1
        elif text == "}":
            braces -= 1
        elif kind == "ident" and braces == 0:
            word = text.lower()
            if word in _LABEL_LISTS:
                if following == "(":
                    while i < len(tokens) and tokens[i][1] != ")":
                        i += 1
            elif following == "(" or word in _KEYWORDS or word in _AGGREGATIONS:
                pass  # a function call, an aggregation (`sum by (…) (…)`) or a keyword
            else:
                names.add(text)
        i += 1
    return names


_GRAFANA_INTERVALS = re.compile(r"\$\{?__(rate_interval|interval|range)(?:_ms|_s)?\}?")


# the dashboard's own variables, each a regex matcher's value ("All" is .*)
DASHBOARD_VARIABLES = ("job", "namespace", "instance")
_DASHBOARD_VARIABLE = re.compile(r"\$\{?(" + "|".join(DASHBOARD_VARIABLES) + r")(?::\w+)?\}?")


def as_promql(expr: str) -> str:
    """A Grafana query as plain PromQL: its built-in interval variables as durations, the
    dashboard's variables as "All"."""
    expr = _GRAFANA_INTERVALS.sub(
        lambda m: {"rate_interval": "5m", "interval": "1m", "range": "1h"}[m.group(1)], expr
    )
    return _DASHBOARD_VARIABLE.sub(".*", expr)


def selectors(expr: str) -> list[tuple[str, str | None]]:
    """(metric name, the text between its braces or None) of each vector selector."""
    tokens = [
        (m.lastgroup, m.group())
        for m in _TOKEN.finditer(expr)
        if m.lastgroup not in ("space", "comment")
    ]
    names = metric_names(expr)
    out: list[tuple[str, str | None]] = []
    for i, (kind, text) in enumerate(tokens):
        if kind != "ident" or text not in names:
            continue
        if i + 1 < len(tokens) and tokens[i + 1][1] == "{":
            j = i + 2
            while j < len(tokens) and tokens[j][1] != "}":
                j += 1
            out.append((text, "".join(t for _, t in tokens[i + 2 : j])))
        else:
            out.append((text, None))
    return out


# --- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported() -> set[str]:
    return exported_metric_names()


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard_queries(dashboard: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(where, expression) of every panel target and every query variable."""
    out = []
    for panel in _panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            out.append(
                (f"panel {panel['id']} {panel['title']!r} {target['refId']}", target["expr"])
            )
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var.get("query")
            text = query.get("query", "") if isinstance(query, dict) else str(query)
            inner = re.fullmatch(r"\s*(?:label_values|query_result)\((.*?)(?:,\s*\w+)?\)\s*", text)
            if inner and inner.group(1).strip():
                out.append((f"variable {var['name']}", inner.group(1)))
    return out


@pytest.fixture(scope="module")
def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in _yaml(ALERTS)["groups"] for rule in group["rules"]]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = _yaml(COMPOSE)
    assert isinstance(data, dict)
    assert isinstance(data.get("services"), dict)
    return data


# --- the extractor itself -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("up", {"up"}),
        (
            'sum by (le, consumer) (rate(a_bucket{job=~"x|y", le!="1"}[$__rate_interval]))',
            {"a_bucket"},
        ),
        (
            "histogram_quantile(0.99, sum without (instance) (rate(b_bucket[5m] offset 1h)))",
            {"b_bucket"},
        ),
        ("c / on (channel) group_left (provider) d > bool 0.5", {"c", "d"}),
        ('max(e{group="contacted"}) - max(f{group="holdout"}) or vector(0)', {"e", "f"}),
        ("topk(3, g) unless ignoring (x) h and i", {"g", "h", "i"}),
        ('count_values("v", j) * 1e3 + k:recorded[1h:5m]', {"j", "k:recorded"}),
        ("# just a comment\nl", {"l"}),
    ],
)
def test_metric_names_are_read_from_promql(expr: str, expected: set[str]) -> None:
    assert metric_names(expr) == expected


def test_exported_metric_names_come_from_the_code(exported: set[str]) -> None:
    for name in (
        "winback_events_consumed_total",
        "winback_batch_handling_seconds_bucket",
        "winback_consumer_lag_records",
        "winback_steps_overdue_seconds",
    ):
        assert name in exported
    assert "winback_events_consumed" not in exported  # a counter is read as …_total
    assert "winback_no_such_metric" not in exported


# --- (a) alert rules ------------------------------------------------------------------------------
def test_promtool_check_rules() -> None:
    out = _run(_tool("promtool"), "check", "rules", ALERTS)
    assert "SUCCESS" in out


def test_promtool_test_rules() -> None:
    out = _run(_tool("promtool"), "test", "rules", *ALERT_TESTS, cwd=ALERTS_TEST.parent)
    assert out.count("SUCCESS") == len(ALERT_TESTS), out
    assert "SUCCESS" in out


def test_prometheus_config_checks_and_scrapes_every_service(compose: dict[str, Any]) -> None:
    _run(_tool("promtool"), "check", "config", PROMETHEUS_CONFIG, cwd=PROMETHEUS_CONFIG.parent)
    config = _yaml(PROMETHEUS_CONFIG)
    targets = {
        target
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    }
    for service in SERVICES:
        env = _environment(compose["services"][service])
        port = int(env.get(f"WINBACK_HTTP__{service.upper()}_PORT", default_port(service)))
        assert f"{service}:{port}" in targets, f"prometheus.yml does not scrape {service}:{port}"
    mounts = [v.split(":")[:2] for v in compose["services"]["prometheus"]["volumes"]]
    mounted = {Path(container).name: host for host, container in mounts}
    for rule_file in config["rule_files"]:
        assert rule_file in mounted, f"{rule_file} is not mounted into the Prometheus container"
        assert (ROOT / mounted[rule_file]).resolve() == (PROMETHEUS_CONFIG.parent / rule_file)


def test_every_alert_has_for_severity_and_annotations(alert_rules: list[dict[str, Any]]) -> None:
    names = [rule["alert"] for rule in alert_rules if "alert" in rule]
    assert len(names) == len(set(names)), "alert names repeat"
    for rule in alert_rules:
        where = rule.get("alert", rule.get("record"))
        assert "alert" in rule, f"{where}: only alerting rules belong here"
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), f"{where}: needs `for:`"
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, where
        assert rule["annotations"]["summary"].strip(), where
        assert rule["annotations"]["description"].strip(), where


def test_alerts_cover_the_operational_signals(alert_rules: list[dict[str, Any]]) -> None:
    used = {name for rule in alert_rules for name in metric_names(rule["expr"])}
    for signal in (
        "winback_consumer_lag_records",  # consumer lag
        "winback_dead_letters_total",  # dead-letter growth
        "winback_steps_overdue_seconds",  # overdue steps
        "winback_dispatcher_provider_errors_total",  # provider failure ratio
        "winback_dispatcher_provider_request_seconds_count",
        "winback_dispatcher_circuit_state",  # circuit open
        "winback_outbox_oldest_age_seconds",  # outbox age
        "winback_outbox_parked_rows",  # outbox rows the broker refuses for good
        "up",  # a service down
        "winback_dispatcher_webhook_signature_failures_total",  # provider webhooks refused
        "winback_billing_webhooks_total",  # billing webhooks refused
        "winback_dispatcher_messages_total",  # message failure ratio
        "winback_reactivation_targeted_cases",  # the KPI: contacted vs holdout
        "winback_reactivation_returned_cases",
    ):
        assert signal in used, f"no alert reads {signal}"
    # a service with no target at all is noticed, each by its job
    absent = " ".join(rule["expr"] for rule in alert_rules if "absent(" in rule["expr"])
    for service in SERVICES:
        assert f'absent(up{{job="{service}"}})' in absent, f"nothing notices no {service} at all"
    signature = " ".join(
        rule["expr"] for rule in alert_rules if "winback_billing_webhooks_total" in rule["expr"]
    )
    # the billing connector's outcomes for a refused signature (services/ingest/billing)
    matcher = re.search(r'outcome=~"([^"]+)"', signature)
    assert matcher, signature
    for outcome in ("signature_invalid", "signature_stale", "signature_missing", "not_configured"):
        assert re.fullmatch(matcher.group(1), outcome), f"{outcome} is not counted"
    assert not re.fullmatch(matcher.group(1), "bad_payload")


def _github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a document's headings (lower case, punctuation dropped, spaces
    as hyphens, repeats numbered)."""
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", markdown, re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in anchors:
            n += 1
            candidate = f"{slug}-{n}"
        anchors.add(candidate)
    return anchors


def test_every_alert_links_its_runbook_section(alert_rules: list[dict[str, Any]]) -> None:
    anchors = _github_anchors(RUNBOOKS.read_text())
    for rule in alert_rules:
        url = rule["annotations"].get("runbook_url", "")
        assert url.startswith(RUNBOOK_URL), f"{rule['alert']}: runbook_url {url!r}"
        anchor = url.removeprefix(RUNBOOK_URL)
        assert anchor in anchors, f"{rule['alert']}: docs/runbooks.md has no #{anchor}"
        section = RUNBOOKS.read_text().split(f"\n## {rule['alert']}\n", 1)
        assert len(section) == 2, f"docs/runbooks.md: no `## {rule['alert']}` section"
        body = section[1].split("\n## ", 1)[0]
        for part in ("What it means", "How to look", "How to fix"):
            assert f"**{part}**" in body, f"docs/runbooks.md#{anchor}: no **{part}**"


def test_github_anchors() -> None:
    text = "# Runbooks\n## WinbackServiceDown\n### How to look: `up`!\n## Runbooks\n"
    assert _github_anchors(text) == {
        "runbooks",
        "winbackservicedown",
        "how-to-look-up",
        "runbooks-1",
    }


def test_every_alert_has_a_firing_and_a_quiet_unit_test(alert_rules: list[dict[str, Any]]) -> None:
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in (c for path in ALERT_TESTS for c in _yaml(path)["tests"]):
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    for rule in alert_rules:
        assert rule["alert"] in fired, f"alerts_test.yml never shows {rule['alert']} firing"
        assert rule["alert"] in quiet, f"alerts_test.yml never shows {rule['alert']} quiet"


# --- (b) metric names in the dashboard and the alerts ---------------------------------------------
def test_alert_expressions_use_only_exported_metrics(
    alert_rules: list[dict[str, Any]], exported: set[str]
) -> None:
    unknown = {
        f"{rule['alert']}: {name}"
        for rule in alert_rules
        for name in metric_names(rule["expr"])
        if name not in exported | PROMETHEUS_SERIES
    }
    assert not unknown, f"alert expressions read metrics no service exports: {sorted(unknown)}"


def test_dashboard_queries_use_only_exported_metrics(
    dashboard: dict[str, Any], exported: set[str]
) -> None:
    queries = dashboard_queries(dashboard)
    assert queries
    unknown = {
        f"{where}: {name}"
        for where, expr in queries
        for name in metric_names(expr)
        if name not in exported
    }
    assert not unknown, f"dashboard queries read metrics no service exports: {sorted(unknown)}"


def test_dashboard_queries_are_valid_promql(dashboard: dict[str, Any], tmp_path: Path) -> None:
    rules = []
    for n, (where, expr) in enumerate(dashboard_queries(dashboard)):
        promql = as_promql(expr)
        assert "$" not in promql, f"{where}: unknown Grafana variable in {expr!r}"
        rules.append({"record": f"dashboard:query_{n}", "expr": promql})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    _run(_tool("promtool"), "check", "rules", path)


def test_dashboard_shape(dashboard: dict[str, Any]) -> None:
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["uid"]
    assert dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    ds = [v for v in variables.values() if v["type"] == "datasource"]
    assert len(ds) == 1, "one datasource variable"
    assert ds[0]["query"] == "prometheus", "a Prometheus datasource variable"
    ref = "${" + ds[0]["name"] + "}"
    panels = list(_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    rows = [p["title"] for p in panels if p["type"] == "row"]
    for wanted in ("pipeline", "kpi", "messag"):
        assert any(wanted in r.lower() for r in rows), f"no row for {wanted!r}: {rows}"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": ref}, panel["title"]
        assert panel["targets"], f"{panel['title']}: no query"
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": ref}, panel["title"]
            assert target["expr"].strip(), panel["title"]


def test_dashboard_shows_the_pipeline_kpis_and_messaging(dashboard: dict[str, Any]) -> None:
    used = {name for _, expr in dashboard_queries(dashboard) for name in metric_names(expr)}
    wanted = {
        # pipeline health
        "winback_events_consumed_total",
        "winback_dead_letters_total",
        "winback_consumer_lag_records",
        "winback_batch_handling_seconds_bucket",
        "winback_outbox_backlog",
        "winback_outbox_oldest_age_seconds",
        "winback_steps_due",
        "winback_steps_overdue_seconds",
        "winback_steps_fired_total",
        # win-back KPIs
        "winback_reactivation_rate",
        "winback_won_back_mrr_minor",
        "winback_time_to_winback_days",
        "winback_second_churn_rate",
        "winback_won_back_customers",
        # messaging
        "winback_dispatcher_messages_total",
        "winback_dispatcher_provider_request_seconds_bucket",
        "winback_dispatcher_circuit_state",
        "winback_dispatcher_provider_retries_total",
    }
    assert not wanted - used, f"the dashboard misses {sorted(wanted - used)}"


def _variables(dashboard: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard["templating"]["list"]}


def _variable_query(var: Mapping[str, Any]) -> str:
    query = var["query"]
    return str(query["query"] if isinstance(query, dict) else query)


def test_dashboard_has_job_namespace_and_instance_variables(dashboard: dict[str, Any]) -> None:
    variables = _variables(dashboard)
    (ds,) = [v["name"] for v in variables.values() if v["type"] == "datasource"]
    for name in DASHBOARD_VARIABLES:
        assert name in variables, f"no ${name} variable"
        var = variables[name]
        assert var["type"] == "query", name
        assert var["datasource"] == {"type": "prometheus", "uid": "${" + ds + "}"}, name
        assert re.fullmatch(rf"label_values\(.*,\s*{name}\)", _variable_query(var)), name
        # "All" must also match series without the label (docker compose has no namespace)
        assert var["includeAll"] is True, name
        assert var["allValue"] == ".*", name
        assert var["multi"] is True, name
    # each narrows the next: namespace -> job -> instance
    assert "$namespace" in _variable_query(variables["job"])
    assert {"$namespace", "$job"} <= set(
        re.findall(r"\$\w+", _variable_query(variables["instance"]))
    )


def test_every_panel_query_is_filtered_by_the_variables(dashboard: dict[str, Any]) -> None:
    wanted = [f'{name}=~"${name}"' for name in DASHBOARD_VARIABLES]
    checked = 0
    for panel in _panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            where = f"panel {panel['id']} {panel['title']!r} {target['refId']}"
            found = selectors(target["expr"])
            assert found, f"{where}: no metric"
            for name, matchers in found:
                missing = [w for w in wanted if w not in (matchers or "")]
                assert not missing, f"{where}: {name} is not filtered by {missing}"
                checked += 1
    assert checked > 30


def test_variable_filter_check_can_fail() -> None:
    assert selectors('sum(rate(a{job=~"$job"}[5m])) / b') == [("a", 'job=~"$job"'), ("b", None)]


# --- MRR in each currency's own precision ---------------------------------------------------------
MRR_PANEL = "Win-back MRR by currency"
_MRR_TARGET = re.compile(
    r"max by \(currency\) \(winback_won_back_mrr_minor"
    r'\{[^}]*currency(?P<op>=~|!~)"(?P<codes>[^"]*)"\}\)\s*/\s*(?P<divisor>\d+)'
)


def _mrr_targets(dashboard: Mapping[str, Any]) -> list[tuple[str, bool, str, int]]:
    """(refId, positive match?, currency regex, divisor) of each MRR panel query."""
    (panel,) = [p for p in _panels(dashboard["panels"]) if p["title"] == MRR_PANEL]
    out = []
    for target in panel["targets"]:
        m = _MRR_TARGET.fullmatch(target["expr"].strip())
        assert m, f"{MRR_PANEL} {target['refId']}: not max by (currency) (…) / 10^n"
        out.append((target["refId"], m["op"] == "=~", m["codes"], int(m["divisor"])))
    return out


def test_dashboard_mrr_divides_each_currency_by_its_precision(dashboard: dict[str, Any]) -> None:
    """Every currency babel knows (the dispatcher renders amounts with its precision), plus the
    scheduler's ``unknown``, is shown by exactly one query, divided by 10^its exponent, with as
    many decimals."""
    from babel.numbers import get_currency_precision, list_currencies

    targets = _mrr_targets(dashboard)
    (panel,) = [p for p in _panels(dashboard["panels"]) if p["title"] == MRR_PANEL]
    decimals = {
        o["matcher"]["options"]: {p["id"]: p["value"] for p in o["properties"]}["decimals"]
        for o in panel["fieldConfig"]["overrides"]
        if o["matcher"]["id"] == "byFrameRefID"
    }
    for currency in [*sorted(list_currencies()), "unknown"]:
        exponent = get_currency_precision(currency) if currency != "unknown" else 2
        showing = [
            (ref, divisor)
            for ref, positive, codes, divisor in targets
            if bool(re.fullmatch(codes, currency)) == positive
        ]
        assert len(showing) == 1, f"{currency} is shown by {showing}"
        ref, divisor = showing[0]
        assert divisor == 10**exponent, f"{currency}: / {divisor}, its exponent is {exponent}"
        assert decimals[ref] == exponent, f"{currency}: {decimals[ref]} decimals"


def test_dashboard_mrr_queries_evaluate_to_major_units(
    dashboard: dict[str, Any], tmp_path: Path
) -> None:
    minor = {"JPY": 5000, "KWD": 12345, "EUR": 1999, "CLF": 10000, "USD": 250, "unknown": 100}
    major = {"JPY": 5000, "KWD": 12.345, "EUR": 19.99, "CLF": 1, "USD": 2.5, "unknown": 1}
    (panel,) = [p for p in _panels(dashboard["panels"]) if p["title"] == MRR_PANEL]
    union = " or ".join(f"({as_promql(t['expr'])})" for t in panel["targets"])
    series = [
        {
            "series": f'winback_won_back_mrr_minor{{currency="{c}",job="scheduler",'
            f'instance="scheduler-{r}:8082"}}',
            "values": f"{v}x5",
        }
        for c, v in minor.items()
        for r in ("a", "b")  # two replicas export the same sums: counted once
    ]
    tests = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "promql_expr_test": [
                    {
                        "expr": union,
                        "eval_time": "2m",
                        "exp_samples": [
                            {"labels": f'{{currency="{c}"}}', "value": v} for c, v in major.items()
                        ],
                    }
                ],
            }
        ],
    }
    path = tmp_path / "mrr_test.yml"
    path.write_text(yaml.safe_dump(tests))
    _run(_tool("promtool"), "test", "rules", path, cwd=tmp_path)


# --- (c) docker-compose.yml -----------------------------------------------------------------------
def _environment(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _winback_services(compose: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: svc
        for name, svc in compose["services"].items()
        if "build" in svc or str(svc.get("image", "")).startswith("winback")
    }


def test_compose_has_the_whole_system(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("kafka", "postgres", "migrate", *SERVICES, "prometheus", "grafana"):
        assert name in services, f"docker-compose.yml has no {name}"
    assert set(_winback_services(compose)) == {"migrate", *SERVICES}
    images = {svc.get("image") for svc in _winback_services(compose).values()}
    assert len(images) == 1, f"one image for every winback service, got {images}"
    roles = _environment(services["kafka"])["KAFKA_PROCESS_ROLES"].split(",")
    assert {"broker", "controller"} == set(roles), "one KRaft node: broker and controller"


def test_compose_commands_are_winback_subcommands(compose: dict[str, Any]) -> None:
    commands = winback_commands()
    for name, svc in _winback_services(compose).items():
        command = svc.get("command")
        assert isinstance(command, list), f"{name}: command must be a list"
        assert command, f"{name}: no command"
        assert command[0] in commands, f"{name}: `winback {command[0]}` is not a command"
        problem = parses_as_winback([str(c) for c in command])
        assert problem is None, f"{name}: `winback {' '.join(command)}`: {problem}"
        expected = "migrate" if name == "migrate" else name
        assert command[0] == expected, f"{name} runs `winback {command[0]}`"


def test_compose_environment_names_are_settings(compose: dict[str, Any]) -> None:
    valid = valid_env_names()
    for name, svc in compose["services"].items():
        env = _environment(svc)
        unknown = sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in valid)
        assert not unknown, f"{name}: no setting reads {unknown}"
    for name, svc in _winback_services(compose).items():
        env = _environment(svc)
        assert env.get("WINBACK_DATABASE__URL"), f"{name}: needs WINBACK_DATABASE__URL"
        if name != "migrate":
            assert env.get("WINBACK_KAFKA__BOOTSTRAP_SERVERS"), f"{name}: needs Kafka"
            assert env.get("WINBACK_HTTP__HOST") == "0.0.0.0", f"{name}: listen on all addresses"


def test_compose_environment_values_load(compose: dict[str, Any]) -> None:
    for name, svc in _winback_services(compose).items():
        with settings_env(_environment(svc)):
            settings = load_settings()
        assert settings.database.url.startswith("postgresql"), name


def test_compose_ports_and_health_checks_match_the_settings(compose: dict[str, Any]) -> None:
    for name in SERVICES:
        svc = compose["services"][name]
        env = _environment(svc)
        port = int(env.get(f"WINBACK_HTTP__{name.upper()}_PORT", default_port(name)))
        published = [str(p).rsplit(":", 1)[-1].split("/")[0] for p in svc.get("ports", [])]
        assert str(port) in published, f"{name} listens on {port}, publishes {published}"
        test = " ".join(str(t) for t in svc["healthcheck"]["test"])
        assert f":{port}/health" in test, f"{name}: health check does not hit :{port}/health"


def test_compose_depends_on_conditions_can_be_met(compose: dict[str, Any]) -> None:
    services = compose["services"]
    seen = set()
    for name, svc in services.items():
        depends = svc.get("depends_on") or {}
        if isinstance(depends, list):
            depends = {d: {"condition": "service_started"} for d in depends}
        for target, spec in depends.items():
            assert target in services, f"{name} depends on unknown {target}"
            condition = spec.get("condition", "service_started")
            seen.add(condition)
            if condition == "service_healthy":
                check = services[target].get("healthcheck") or {}
                assert check.get("test"), f"{name} waits for {target}, which has no health check"
                assert not check.get("disable"), f"{name} waits for {target}: check disabled"
            elif condition == "service_completed_successfully":
                assert services[target].get("restart", "no") == "no", (
                    f"{name} waits for {target} to finish, but it restarts"
                )
            else:
                assert condition == "service_started", f"{name}: unknown condition {condition}"
    assert {"service_healthy", "service_completed_successfully"} <= seen
    for name in SERVICES:
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully", name
        assert depends["kafka"]["condition"] == "service_healthy", name
        assert depends["postgres"]["condition"] == "service_healthy", name


def test_compose_mounts_existing_files_and_provisions_the_dashboard(
    compose: dict[str, Any],
) -> None:
    for name, svc in compose["services"].items():
        for volume in svc.get("volumes", []):
            host = str(volume).split(":")[0]
            if host.startswith((".", "/")):
                assert (ROOT / host).exists(), f"{name} mounts missing {host}"
    grafana = compose["services"]["grafana"]
    mounts = {
        str(v).split(":")[1]: str(v).split(":")[0]
        for v in grafana["volumes"]
        if str(v).startswith(".")
    }
    dashboard_in = [c for c, h in mounts.items() if (ROOT / h).resolve() == DASHBOARD]
    assert dashboard_in, "Grafana does not mount deploy/grafana/dashboard.json"
    providers_dir = next(c for c in mounts if c.endswith("/provisioning/dashboards"))
    providers = [
        p
        for f in sorted((ROOT / mounts[providers_dir]).glob("*.y*ml"))
        for p in _yaml(f)["providers"]
    ]
    paths = [p["options"]["path"] for p in providers]
    assert any(dashboard_in[0].startswith(p.rstrip("/") + "/") for p in paths), paths
    datasources_dir = next(c for c in mounts if c.endswith("/provisioning/datasources"))
    sources = [
        d
        for f in sorted((ROOT / mounts[datasources_dir]).glob("*.y*ml"))
        for d in _yaml(f)["datasources"]
    ]
    assert [d["url"] for d in sources if d["type"] == "prometheus"] == ["http://prometheus:9090"]


def test_dockerfile_is_multi_stage_non_root_with_health_check() -> None:
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM\s+\S+(?:\s+AS\s+(\S+))?", text, re.MULTILINE | re.IGNORECASE)
    assert len(stages) >= 3, stages
    assert "builder" in stages, stages
    assert "runtime" in stages, stages
    assert re.search(r"uv sync --frozen --no-dev", text), "dependencies come from uv.lock"
    runtime = text.split("AS runtime", 1)[1]
    users = re.findall(r"^USER\s+(\S+)", runtime, re.MULTILINE)
    assert users, "the runtime stage sets no USER"
    assert users[-1].split(":")[0] not in ("root", "0"), users
    health = re.search(r"^HEALTHCHECK .*$", runtime, re.MULTILINE)
    assert health, "no HEALTHCHECK in the runtime stage"
    assert "/health" in health.group(), "HEALTHCHECK must hit /health"
    assert re.search(r'^ENTRYPOINT \["winback"\]', runtime, re.MULTILINE)
    ignored = (ROOT / ".dockerignore").read_text()
    for needed in ("pyproject.toml", "uv.lock", "shared", "services"):
        assert f"!{needed}" in ignored, f".dockerignore keeps {needed} out of the build"


# --- (d) the Helm chart ---------------------------------------------------------------------------
FULL_VALUES = CHART / "ci" / "full-values.yaml"
MONITORING_API = ("--api-versions", "monitoring.coreos.com/v1")
GATEWAY_API = ("--api-versions", "gateway.networking.k8s.io/v1")
SCENARIOS: Mapping[str, list[str]] = {
    "defaults": [],
    "full": ["--values", str(FULL_VALUES), *MONITORING_API, *GATEWAY_API],
    "relay, no autoscaling, no monitoring": [
        "--set", "services.relay.enabled=true",
        "--set", "services.ingest.autoscaling.enabled=false",
        "--set", "services.scheduler.port=9182",
        "--set", "serviceMonitor.enabled=false",
        "--set", "prometheusRule.enabled=false",
        "--set", "grafanaDashboard.enabled=false",
    ],
}  # fmt: skip


def _render(*extra: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [_tool("helm"), "template", "rel", str(CHART), "--namespace", "winback", *extra],
        capture_output=True,
        text=True,
        check=False,
        timeout=TOOL_TIMEOUT,
    )
    assert out.returncode == 0, f"helm template failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module", params=list(SCENARIOS))
def manifests(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return _render(*SCENARIOS[request.param])


def _kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def _matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _pod_specs(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"])
        for d in docs
        if d["kind"] in ("Deployment", "Job")
    ]


def test_helm_lint() -> None:
    out = _run(_tool("helm"), "lint", "--strict", CHART)
    assert "0 chart(s) failed" in out


def test_helm_template_renders_every_kind(manifests: list[dict[str, Any]]) -> None:
    kinds = {d["kind"] for d in manifests}
    assert {"Deployment", "Service", "ConfigMap", "Job", "PodDisruptionBudget"} <= kinds
    components = {
        d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
        for d in _kind(manifests, "Deployment")
    }
    assert set(SERVICES) <= components


def test_helm_default_render_has_autoscaling_and_monitoring_where_the_crds_are() -> None:
    kinds = {d["kind"] for d in _render(*MONITORING_API)}
    for kind in ("HorizontalPodAutoscaler", "ServiceMonitor", "PrometheusRule"):
        assert kind in kinds, f"the chart's defaults render no {kind}"


def test_helm_defaults_install_on_a_cluster_without_the_operator_or_gateway_crds() -> None:
    """A plain cluster serves no monitoring.coreos.com/v1: the chart must not ask for it (an
    object of an unknown kind fails the whole `helm install`), and nothing is public by default."""
    kinds = {d["kind"] for d in _render()}
    assert "HorizontalPodAutoscaler" in kinds
    for kind in ("ServiceMonitor", "PrometheusRule", "Ingress", "HTTPRoute"):
        assert kind not in kinds, f"the chart's defaults render {kind} without its API"


def _env_config(
    docs: list[dict[str, Any]], container: dict[str, Any]
) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """(plain settings a container sees, secret references by name)."""
    configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in _kind(docs, "ConfigMap")}
    plain: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source["configMapRef"]["name"]
        assert ref in configmaps, f"envFrom names the missing ConfigMap {ref}"
        plain.update(configmaps[ref])
    secrets: dict[str, dict[str, Any]] = {}
    for entry in container.get("env", []):
        if "value" in entry:
            plain[entry["name"]] = entry["value"]
        else:
            secrets[entry["name"]] = entry["valueFrom"]["secretKeyRef"]
    return plain, secrets


def test_helm_environment_names_are_settings(manifests: list[dict[str, Any]]) -> None:
    valid = valid_env_names()
    secret_names = secret_env_names()
    referenced = set()
    for where, pod in _pod_specs(manifests):
        for container in pod["containers"]:
            for source in container.get("envFrom", []):
                referenced.add(source["configMapRef"]["name"])
            plain, secrets = _env_config(manifests, container)
            unknown = sorted((set(plain) | set(secrets)) - valid)
            assert not unknown, f"{where}: no setting reads {unknown}"
            leaked = sorted(set(plain) & secret_names)
            assert not leaked, f"{where}: secrets as plain values: {leaked}"
            for required in ("WINBACK_DATABASE__URL", "WINBACK_HTTP__API_KEYS"):
                assert required in secrets, f"{where}: {required} must come from a Secret"
            assert "WINBACK_KAFKA__BOOTSTRAP_SERVERS" in plain, where
    for cm in _kind(manifests, "ConfigMap"):
        if cm["metadata"]["name"] in referenced:
            unknown = sorted(set(cm.get("data", {})) - valid)
            assert not unknown, f"ConfigMap {cm['metadata']['name']}: no setting reads {unknown}"


def test_helm_settings_load_with_the_secrets_filled_in(manifests: list[dict[str, Any]]) -> None:
    fake = {
        "WINBACK_DATABASE__URL": "postgresql+asyncpg://winback:pw@db:5432/winback",
        "WINBACK_HTTP__API_KEYS": "k" * 32,
        "WINBACK_DISPATCHER__UNSUBSCRIBE_KEYS": "u" * 40,
    }
    for where, pod in _pod_specs(manifests):
        for container in pod["containers"]:
            plain, secrets = _env_config(manifests, container)
            env = dict(plain)
            for name, ref in secrets.items():
                if not ref.get("optional"):
                    assert name in fake, f"{where}: a required secret {name} the test lacks"
                    env[name] = fake[name]
            with settings_env(env):
                settings = load_settings()
            assert settings.environment == "production", where


def _container_ports(container: Mapping[str, Any]) -> dict[str | int, int]:
    ports: dict[str | int, int] = {}
    for port in container.get("ports", []):
        ports[port["containerPort"]] = port["containerPort"]
        if "name" in port:
            ports[port["name"]] = port["containerPort"]
    return ports


def test_helm_probes_hit_health_and_ready_on_the_service_port(
    manifests: list[dict[str, Any]],
) -> None:
    commands = winback_commands()
    for deploy in _kind(manifests, "Deployment"):
        pod = deploy["spec"]["template"]["spec"]
        for container in pod["containers"]:
            where = f"{deploy['metadata']['name']}/{container['name']}"
            args = container.get("args") or container.get("command")
            assert args, f"{where}: no args"
            assert args[0] in commands, f"{where}: `winback {args[0]}` is no command"
            assert parses_as_winback(list(args)) is None, where
            service = args[0]
            plain, _ = _env_config(manifests, container)
            port = int(plain.get(f"WINBACK_HTTP__{service.upper()}_PORT", default_port(service)))
            ports = _container_ports(container)
            assert port in ports.values(), f"{where} listens on {port}, declares {ports}"
            for probe, path in (("livenessProbe", "/health"), ("readinessProbe", "/ready")):
                get = container[probe]["httpGet"]
                assert get["path"] == path, f"{where}: {probe} on {get['path']}"
                assert get["port"] in ports, f"{where}: {probe} port {get['port']} undeclared"
                assert ports[get["port"]] == port, f"{where}: {probe} misses the service port"
            if "startupProbe" in container:
                assert container["startupProbe"]["httpGet"]["path"] == "/health", where
            assert container["resources"]["requests"], f"{where}: no resource requests"
            assert container["resources"]["limits"], f"{where}: no resource limits"


def test_helm_services_select_deployment_pods(manifests: list[dict[str, Any]]) -> None:
    deployments = _kind(manifests, "Deployment")
    for deploy in deployments:
        labels = deploy["spec"]["template"]["metadata"]["labels"]
        assert _matches(deploy["spec"]["selector"]["matchLabels"], labels), (
            f"{deploy['metadata']['name']}: selector does not match its pods"
        )
    services = _kind(manifests, "Service")
    assert len(services) == len(deployments)
    for svc in services:
        selector = svc["spec"]["selector"]
        chosen = [
            d
            for d in deployments
            if _matches(selector, d["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(chosen) == 1, f"Service {svc['metadata']['name']} selects {len(chosen)}"
        container = chosen[0]["spec"]["template"]["spec"]["containers"][0]
        ports = _container_ports(container)
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports, f"{svc['metadata']['name']}: {port}"


def test_helm_hpa_and_pdb_target_existing_deployments(manifests: list[dict[str, Any]]) -> None:
    deployments = {d["metadata"]["name"]: d for d in _kind(manifests, "Deployment")}
    for hpa in _kind(manifests, "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        assert target["kind"] == "Deployment", target
        assert target["name"] in deployments, target
        assert "replicas" not in deployments[target["name"]]["spec"], (
            f"{target['name']}: the HPA owns the replica count"
        )
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    pdbs = _kind(manifests, "PodDisruptionBudget")
    assert pdbs
    for pdb in pdbs:
        selector = pdb["spec"]["selector"]["matchLabels"]
        chosen = [
            name
            for name, d in deployments.items()
            if _matches(selector, d["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(chosen) == 1, f"PDB {pdb['metadata']['name']} selects {chosen}"


def test_helm_pods_run_non_root_with_a_read_only_root(manifests: list[dict[str, Any]]) -> None:
    for where, pod in _pod_specs(manifests):
        pod_ctx = pod.get("securityContext", {})
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in pod["containers"]:
            ctx = {**pod_ctx, **container.get("securityContext", {})}
            assert ctx.get("runAsNonRoot") is True, f"{where}: runAsNonRoot"
            assert ctx.get("runAsUser", 1) != 0, f"{where}: runs as root"
            assert ctx.get("readOnlyRootFilesystem") is True, f"{where}: writable root FS"
            assert ctx.get("allowPrivilegeEscalation") is False, where
            tmp = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            assert tmp, f"{where}: nothing mounted on /tmp"
            assert "emptyDir" in volumes[tmp[0]["name"]], f"{where}: /tmp is not an emptyDir"


def test_helm_migrations_run_as_a_pre_install_and_pre_upgrade_hook(
    manifests: list[dict[str, Any]],
) -> None:
    jobs = _kind(manifests, "Job")
    assert len(jobs) == 1
    job = jobs[0]
    hooks = job["metadata"]["annotations"]["helm.sh/hook"]
    assert {h.strip() for h in hooks.split(",")} == {"pre-install", "pre-upgrade"}
    container = job["spec"]["template"]["spec"]["containers"][0]
    args = list(container.get("args") or container.get("command"))
    # it waits a bounded time for the database (winback migrate --wait), within the deadline
    assert args[:2] == ["migrate", "--wait"]
    assert parses_as_winback(args) is None
    assert 0 < float(args[2]) < job["spec"]["activeDeadlineSeconds"]
    assert "envFrom" not in container, "the hook runs before the release's ConfigMap exists"
    assert job["spec"]["template"]["spec"]["restartPolicy"] in ("Never", "OnFailure")

    # the same settings as the services, inline
    def settings(container: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
        plain, secrets = _env_config(manifests, container)
        plain.pop("WINBACK_SERVICE_NAME", None)
        return plain, secrets

    for deploy in _kind(manifests, "Deployment"):
        theirs = settings(deploy["spec"]["template"]["spec"]["containers"][0])
        assert settings(container) == theirs, (
            f"the migration Job's settings differ from {deploy['metadata']['name']}'s"
        )


def test_helm_monitoring_objects_match_the_deploy_files() -> None:
    docs = _render(*MONITORING_API)
    services = _kind(docs, "Service")
    (monitor,) = _kind(docs, "ServiceMonitor")
    # job="ingest", ... as docker-compose's Prometheus names them: the alert rules use them
    assert monitor["spec"]["jobLabel"] == "app.kubernetes.io/component"
    for svc in services:
        assert svc["metadata"]["labels"]["app.kubernetes.io/component"] in SERVICES
    selector = monitor["spec"]["selector"]["matchLabels"]
    watched = [s for s in services if _matches(selector, s["metadata"]["labels"])]
    assert len(watched) == len(services) >= len(SERVICES)
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["path"] == "/metrics"
        for svc in watched:
            assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
    (rule,) = _kind(docs, "PrometheusRule")
    assert rule["spec"] == _yaml(ALERTS), "the PrometheusRule differs from alerts.yml"
    (board,) = [
        d for d in _kind(docs, "ConfigMap") if d["metadata"]["labels"].get("grafana_dashboard")
    ]
    (content,) = board["data"].values()
    assert json.loads(content) == json.loads(DASHBOARD.read_text())


@pytest.mark.parametrize(
    ("copy", "source"),
    [("files/alerts.yml", ALERTS), ("files/dashboard.json", DASHBOARD)],
)
def test_helm_chart_copies_are_identical_to_the_sources(copy: str, source: Path) -> None:
    assert (CHART / copy).read_bytes() == source.read_bytes(), (
        f"{CHART / copy} differs from {source}: copy it (`cp {source.relative_to(ROOT)} "
        f"{(CHART / copy).relative_to(ROOT)}`); the chart can only read files inside itself"
    )


# --- (e) the rendered chart against the Kubernetes schemas, offline -------------------------------
K8S_FIXTURES = ROOT / "tests" / "fixtures" / "k8s"
# the chart's kubeVersion floor and the newest release kubernetes-validate bundles
KUBE_VERSIONS = ("1.25", kubernetes_validate.latest_version())
# kinds of CustomResourceDefinitions: kubernetes-validate bundles only the built-in kinds; their
# openAPIV3Schema is vendored from the projects' releases (tests/fixtures/k8s/README.md)
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring.coreos.com-v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-monitoring.coreos.com-v1.json",
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): "httproute-gateway.networking.k8s.io-v1.json",
}


def _strict(schema: Any) -> Any:
    """A CRD's structural schema as the API server's strict field validation applies it: an
    object with declared properties takes no others (unless it preserves unknown fields)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def _crd_validator(api_version: str, kind: str) -> Any:
    schema = json.loads((K8S_FIXTURES / CRD_SCHEMAS[(api_version, kind)]).read_text())
    schema.pop("$comment", None)
    strict = _strict(schema)
    # metadata is ObjectMeta, which the CRD schema leaves open; the built-in kinds check it
    strict["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(strict)


def _validate_manifest(doc: dict[str, Any], version: str) -> list[str]:
    where = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')} on {version}"
    key = (doc["apiVersion"], doc["kind"])
    if key in CRD_SCHEMAS:
        errors = sorted(_crd_validator(*key).iter_errors(doc), key=lambda e: list(e.path))
        return [f"{where}: {'.'.join(map(str, e.path))}: {e.message}" for e in errors]
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{where}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError:
        return [f"{where}: no schema for {doc['apiVersion']} {doc['kind']}"]
    return []


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_helm_manifests_validate_against_the_kubernetes_schemas(
    manifests: list[dict[str, Any]], version: str
) -> None:
    assert manifests
    problems = [p for doc in manifests for p in _validate_manifest(doc, version)]
    assert problems == []


def test_helm_full_render_has_every_kind() -> None:
    kinds = {d["kind"] for d in _render(*SCENARIOS["full"])}
    assert {k for _, k in CRD_SCHEMAS} | {"Ingress", "HorizontalPodAutoscaler"} <= kinds, kinds


@pytest.mark.parametrize(
    ("doc", "wrong"),
    [
        (
            {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "x"},
             "spec": {"rules": [{"http": {"paths": [{"path": "/u/", "pathTyp": "Prefix"}]}}]}},
            "pathTyp",
        ),
        (
            {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
             "metadata": {"name": "x"},
             "spec": {"selector": {}, "endpoints": [{"port": "http", "intervall": "30s"}]}},
            "intervall",
        ),
        (
            {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
             "metadata": {"name": "x"},
             "spec": {"groups": [{"name": "g", "rules": [{"alert": "A", "expr": 1, "for": 5}]}]}},
            "5",
        ),
        (
            {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
             "metadata": {"name": "x"},
             "spec": {"rules": [{"matches": [{"path": {"type": "Glob", "value": "/u/"}}]}]}},
            "Glob",
        ),
    ],
)  # fmt: skip
def test_manifest_validation_catches_mistakes(doc: dict[str, Any], wrong: str) -> None:
    """The validation above can fail: a typo'd field, a wrong type, a value out of its enum."""
    problems = _validate_manifest(doc, KUBE_VERSIONS[-1])
    assert problems, f"{doc['kind']} with {wrong!r} passed"
    assert any(wrong in p for p in problems), problems


# --- (f) values.schema.json -----------------------------------------------------------------------
VALUES_SCHEMA = CHART / "values.schema.json"


def test_values_schema_is_draft_07_and_admits_the_chart_values() -> None:
    schema = json.loads(VALUES_SCHEMA.read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    for values in (CHART / "values.yaml", FULL_VALUES):
        errors = [e.message for e in validator.iter_errors(_yaml(values))]
        assert errors == [], f"{values.name}: {errors}"

    # our own objects refuse unknown keys, at every level
    def open_objects(node: Any, path: str) -> Iterator[str]:
        if isinstance(node, dict):
            if (
                node.get("type") == "object"
                and "properties" in node
                and node.get("additionalProperties") is not False
            ):
                yield path
            for key, value in node.items():
                yield from open_objects(value, f"{path}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                yield from open_objects(value, f"{path}/{i}")

    assert list(open_objects(schema, "#")) == []


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--set", "services.ingst.port=8081"], "'ingst' not allowed"),
        (["--set", "serviceMonitor.enabeld=false"], "'enabeld' not allowed"),
        (["--set", "ingress.host=winback.example.com"], "'host' not allowed"),
        (["--set", "replicas=3"], "'replicas' not allowed"),
        (["--set", "services.ingest.port=eighty"], "/services/ingest/port"),
        (["--set", "services.dispatcher.autoscaling.enabled=yes"], "/autoscaling/enabled"),
        (["--set-json", 'ingress.hosts="winback.example.com"'], "/ingress/hosts"),
        (["--set", "config.KAFKA_BOOTSTRAP=kafka:9092"], "/config"),
        (["--set", "image.pullPolicy=Sometimes"], "/image/pullPolicy"),
        # what the templates need once a switch is on
        (
            ["--set", "services.scheduler.autoscaling.enabled=false",
             "--set", "services.scheduler.replicas=null"],
            "missing property 'replicas'",
        ),
        (["--set", "services.ingest.autoscaling.maxReplicas=null"], "'maxReplicas'"),
        (["--set", "httpRoute.enabled=true"], "/httpRoute/parentRefs"),
    ],
)  # fmt: skip
def test_values_schema_refuses_typos_and_wrong_types(args: list[str], complaint: str) -> None:
    helm = _tool("helm")
    for command in (["lint", "--strict", str(CHART)], ["template", "rel", str(CHART)]):
        proc = subprocess.run(
            [helm, *command, *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=TOOL_TIMEOUT,
        )
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0, f"helm {command[0]} {args} passed:\n{out}"
        assert complaint in out, f"helm {command[0]} {args} does not say {complaint!r}:\n{out}"


def test_chart_refuses_kubernetes_older_than_its_kube_version() -> None:
    assert _yaml(CHART / "Chart.yaml")["kubeVersion"] == f">={KUBE_VERSIONS[0]}.0-0"
    proc = subprocess.run(
        [_tool("helm"), "template", "rel", str(CHART), "--kube-version", "1.24.0"],
        capture_output=True,
        text=True,
        check=False,
        timeout=TOOL_TIMEOUT,
    )
    assert proc.returncode != 0
    assert "kubeVersion" in proc.stderr, proc.stderr


def test_httproute_without_the_gateway_api_fails_with_a_clear_message() -> None:
    proc = subprocess.run(
        [_tool("helm"), "template", "rel", str(CHART), "--values", str(FULL_VALUES),
         *MONITORING_API],
        capture_output=True,
        text=True,
        check=False,
        timeout=TOOL_TIMEOUT,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "gateway.networking.k8s.io/v1" in proc.stderr, proc.stderr


# --- (g) what the Ingress and the HTTPRoute expose ------------------------------------------------
# path prefix -> the service that serves it; nothing else may be reachable from outside
PUBLIC_ROUTES = {"/u/": "dispatcher", "/v1/webhooks/": "dispatcher", "/v1/billing/": "ingest"}
PRIVATE_PATHS = (
    "/v1/events", "/v1/customers/cus_1", "/v1/customers/cus_1/messages", "/v1/cases",
    "/v1/dlq", "/v1/playbooks", "/metrics", "/health", "/ready", "/docs", "/openapi.json",
    "/", "/users", "/v1", "/v1/webhooksx", "/v1/billingx/stripe",
)  # fmt: skip
PUBLIC_PATHS = ("/u/abc.def", "/v1/webhooks/sendgrid", "/v1/webhooks/twilio", "/v1/billing/stripe")


def _prefix_matches(prefix: str, path: str) -> bool:
    """Kubernetes' and the Gateway API's path prefix match: element by element, so /u/ matches
    /u/x and /u but neither /users nor /ux."""
    want = [p for p in prefix.split("/") if p]
    have = [p for p in path.split("/") if p]
    return have[: len(want)] == want


def _routes(docs: list[dict[str, Any]]) -> dict[str, list[tuple[str, str, int | str]]]:
    """kind -> [(prefix, backend Service, port)] of the Ingress and the HTTPRoute."""
    out: dict[str, list[tuple[str, str, int | str]]] = {}
    for ingress in _kind(docs, "Ingress"):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                assert path["pathType"] == "Prefix", path
                backend = path["backend"]["service"]
                port = backend["port"].get("name", backend["port"].get("number"))
                out.setdefault("Ingress", []).append((path["path"], backend["name"], port))
    for route in _kind(docs, "HTTPRoute"):
        for rule in route["spec"]["rules"]:
            for match in rule["matches"]:
                assert match["path"]["type"] == "PathPrefix", match
                for ref in rule["backendRefs"]:
                    out.setdefault("HTTPRoute", []).append(
                        (match["path"]["value"], ref["name"], ref["port"])
                    )
    return out


def test_ingress_and_httproute_expose_only_the_public_routes() -> None:
    docs = _render(*SCENARIOS["full"])
    services = {s["metadata"]["name"]: s for s in _kind(docs, "Service")}
    routes = _routes(docs)
    assert set(routes) == {"Ingress", "HTTPRoute"}
    for kind, entries in routes.items():
        assert {prefix for prefix, _, _ in entries} == set(PUBLIC_ROUTES), kind
        for prefix, backend, port in entries:
            svc = services[backend]
            component = svc["metadata"]["labels"]["app.kubernetes.io/component"]
            assert component == PUBLIC_ROUTES[prefix], f"{kind}: {prefix} goes to {component}"
            ports = {p["name"] for p in svc["spec"]["ports"]} | {
                p["port"] for p in svc["spec"]["ports"]
            }
            assert port in ports, f"{kind}: {prefix} -> {backend}:{port}, not a Service port"
        for path in PRIVATE_PATHS:
            exposed = [p for p, _, _ in entries if _prefix_matches(p, path)]
            assert not exposed, f"{kind} exposes the private {path} through {exposed}"
        for path in PUBLIC_PATHS:
            assert any(_prefix_matches(p, path) for p, _, _ in entries), f"{kind}: {path}"
    (ingress,) = _kind(docs, "Ingress")
    assert {r["host"] for r in ingress["spec"]["rules"]} == {
        "winback.example.com",
        "hooks.example.com",
    }


@pytest.fixture(scope="module")
def app_paths() -> dict[str, set[str]]:
    """The paths each service's app serves (its OpenAPI document, from the same bootstrap the
    service runs; nothing connects)."""
    from services.dispatcher.bootstrap import bootstrap as dispatcher_bootstrap
    from services.ingest.bootstrap import bootstrap as ingest_bootstrap
    from services.scheduler.bootstrap import bootstrap as scheduler_bootstrap

    settings = load_settings(
        environment="test",
        database={"url": "postgresql+asyncpg://unused@127.0.0.1:9/unused"},
        kafka={"bootstrap_servers": "127.0.0.1:9"},
    )
    builders: dict[str, Callable[[Settings], Any]] = {
        "ingest": ingest_bootstrap,
        "scheduler": scheduler_bootstrap,
        "dispatcher": dispatcher_bootstrap,
    }
    return {name: set(build(settings).app.openapi()["paths"]) for name, build in builders.items()}


def test_public_routes_are_the_apps_public_paths_and_nothing_else(
    app_paths: dict[str, set[str]],
) -> None:
    docs = _render(*SCENARIOS["full"])
    component = {
        s["metadata"]["name"]: s["metadata"]["labels"]["app.kubernetes.io/component"]
        for s in _kind(docs, "Service")
    }
    for kind, entries in _routes(docs).items():
        for service, paths in app_paths.items():
            exposed = {
                path
                for path in paths
                for prefix, backend, _ in entries
                if _prefix_matches(prefix, path) and component[backend] == service
            }
            public = {
                path
                for path in paths
                for prefix, owner in PUBLIC_ROUTES.items()
                if owner == service and _prefix_matches(prefix, path)
            }
            assert exposed == public, f"{kind} exposes {sorted(exposed - public)} of {service}"
            misrouted = {
                (path, component[backend])
                for path in paths
                for prefix, backend, _ in entries
                if _prefix_matches(prefix, path) and component[backend] != service
            }
            assert not misrouted, f"{kind} sends {service}'s paths elsewhere: {misrouted}"
    # each public prefix leads to something its service serves
    for prefix, service in PUBLIC_ROUTES.items():
        served = [p for p in app_paths[service] if _prefix_matches(prefix, p)]
        assert served, f"{service} serves nothing under {prefix}: {sorted(app_paths[service])}"


def test_public_routes_follow_the_enabled_services() -> None:
    docs = _render(
        "--set", "ingress.enabled=true", "--set", "services.ingest.enabled=false"
    )  # fmt: skip
    assert {p for p, _, _ in _routes(docs)["Ingress"]} == {"/u/", "/v1/webhooks/"}
