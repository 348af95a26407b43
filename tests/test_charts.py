"""The operators' view (charts/): Grafana dashboards, Prometheus scrape config,
recording and alert rules, the agent's systemd unit and the RabbitMQ config,
each checked by the tool that will run it.

* Static: the dashboards are import-ready Grafana JSON; ``promtool check
  config`` / ``check rules`` pass; ``promtool test rules`` fires every alert
  with one series and not with another; ``systemd-analyze verify`` passes on
  the unit (and catches a typo); the RabbitMQ config boots a node of our own.
* Live (one module-scoped run, ~1 minute): a real Prometheus (Debian's
  package; its own process, config, port and data dir) scrapes a real control
  plane with three agents and the shared RabbitMQ's rabbitmq_prometheus,
  while the run goes through a rollout with one device away, alerts, outbox
  drops, forged bundles, refused telemetry and heartbeats, and a device
  going offline. Then every PromQL expression of the dashboards and rules
  must parse in that Prometheus and return data, the metric names are
  cross-checked against what the code exports (both ways), the alerts that
  the run should raise are pending, and each dashboard is drawn from the
  run's data.

Prometheus and promtool come from ``scripts/ensure-prometheus`` (``make
test`` runs it); a test that needs them runs it itself when they are missing
and skips only if they still are. ``EDGEWARD_RENDER_DASHBOARDS=1`` writes the
drawings to docs/dashboard-<name>.png (otherwise they go to a temp dir).
"""

from __future__ import annotations

import configparser
import json
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pika
import pytest
import yaml
from brokerkit import BrokerAdmin, amqp_url, free_port, wait_until
from fleetkit import Fleet, Proc

from edgeward.simulator.cluster import LocalCluster, rabbitmq_bin_dir
from edgeward.transport import topology
from edgeward.transport.signing import Signer
from edgeward.transport.wire import Bundle, Heartbeat, SignedBundle

REPO = Path(__file__).resolve().parent.parent
CHARTS = REPO / "charts"
DASHBOARDS = {p.stem: p for p in sorted((CHARTS / "grafana").glob("*.json"))}
PROMETHEUS_DIR = CHARTS / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
ALERT_TESTS = PROMETHEUS_DIR / "tests" / "alerts.test.yml"
UNIT = CHARTS / "systemd" / "edgeward-agent.service"
RABBITMQ_CONF = CHARTS / "rabbitmq" / "rabbitmq.conf"
OPERATORS_DOC = REPO / "docs" / "operators.md"
METRICS_MODULE = REPO / "actors" / "metrics.py"
DOCS = REPO / "docs"

#: Exported series with no dashboard panel, and why (docs/operators.md too).
NO_PANEL: dict[str, str] = {}

#: What Grafana puts in for its own variables when the run is queried.
RATE_INTERVAL = "20s"
STEP_SECONDS = 2

# Broker users are global and allow one connection each: names of this run's
# own, so that no other test (or test run) on the shared broker logs in as them.
_RUN = secrets.token_hex(2)
DEVICES = tuple(f"pos-charts{_RUN}-{i}" for i in (1, 2, 3))
LATE, STOPPED, DROPPER = DEVICES  # away during the rollout; offline at the end; drops alerts
OFFLINE_AFTER = 12.0
TOOLS_DIR = "/opt/pos/tools/"


#: The agent's command line as the unit's NoNewPrivileges= and
#: MemoryDenyWriteExecute= leave it: the same prctl()s (PR_SET_NO_NEW_PRIVS,
#: PR_SET_MDWE, Linux 6.3+), which hold across exec, so the run shows that the
#: agent works under them; it prints what the kernel granted.
HARDENED = [
    sys.executable,
    "-c",
    "import ctypes, os, sys; prctl = ctypes.CDLL(None, use_errno=True).prctl; "
    "nnp = prctl(38, 1, 0, 0, 0) == 0; mdwe = prctl(65, 1, 0, 0, 0) == 0; "
    "print(f'hardening: no_new_privs={nnp:d} mdwe={mdwe:d}', flush=True); "
    "os.execv(sys.executable, [sys.executable, '-m', 'edgeward.actors.cli', *sys.argv[1:]])",
]


# -- tools ------------------------------------------------------------------------


_ensured: dict[str, str] = {}


def tool(name: str) -> str:
    """The path of ``name``; runs scripts/ensure-prometheus once if it is
    missing, and skips the test only when it still is."""
    found = shutil.which(name, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
    if found is None and "tried" not in _ensured:
        done = subprocess.run(
            ["bash", str(REPO / "scripts" / "ensure-prometheus")],
            capture_output=True,
            text=True,
            timeout=600,
        )
        _ensured["tried"] = (done.stdout + done.stderr)[-2000:]
        found = shutil.which(name, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
    if found is None:
        pytest.skip(
            f"{name} is missing and scripts/ensure-prometheus could not install it:\n"
            f"{_ensured.get('tried', '')}"
        )
    return found


def run_tool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120, cwd=cwd)


# -- what the charts hold ------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    """One PromQL expression of a dashboard or a rule file."""

    where: str  # "fleet.json: Devices by state [A]", "edgeward-alerts.yml: EdgewardDevicesOffline"
    expr: str
    kind: str  # panel | stat | variable | record | alert


def load_dashboards() -> dict[str, dict[str, Any]]:
    return {name: json.loads(path.read_text()) for name, path in DASHBOARDS.items()}


def load_rule_groups() -> list[tuple[str, dict[str, Any]]]:
    return [(p.name, g) for p in RULE_FILES for g in yaml.safe_load(p.read_text())["groups"]]


def dashboard_queries() -> list[Query]:
    queries = []
    for name, board in load_dashboards().items():
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                where = f"{name}.json: {panel['title']} [{target['refId']}]"
                queries.append(Query(where, target["expr"], panel["type"]))
        for var in board["templating"]["list"]:
            if var["type"] == "query":
                # label_values(METRIC, LABEL): Grafana asks for METRIC's series.
                metric = re.fullmatch(r"label_values\((.+),\s*\w+\)", var["definition"])
                assert metric, f"{name}.json: variable {var['name']}: {var['definition']}"
                queries.append(Query(f"{name}.json: ${var['name']}", metric[1], "variable"))
    return queries


def rule_queries() -> list[Query]:
    return [
        Query(
            f"{file}: {rule.get('record') or rule.get('alert')}",
            rule["expr"],
            "record" if "record" in rule else "alert",
        )
        for file, group in load_rule_groups()
        for rule in group["rules"]
    ]


def alert_rules() -> dict[str, dict[str, Any]]:
    return {
        rule["alert"]: rule
        for _, group in load_rule_groups()
        for rule in group["rules"]
        if "alert" in rule
    }


def recorded_names() -> set[str]:
    return set(recording_rules())


def recording_rules() -> dict[str, str]:
    return {
        r["record"]: r["expr"] for _, g in load_rule_groups() for r in g["rules"] if "record" in r
    }


def expanded(expr: str) -> str:
    """The expression followed by the expressions of the recording rules it
    reads (and theirs): what it reads in the end."""
    rules, seen, out = recording_rules(), set(), [expr]
    todo = list(recorded_refs(expr))
    while todo:
        name = todo.pop()
        if name in rules and name not in seen:
            seen.add(name)
            out.append(rules[name])
            todo += recorded_refs(rules[name])
    return " ".join(out)


def grafana_expr(expr: str, revision: int, range_s: int) -> str:
    """The expression as Grafana sends it for this run (its variables filled in)."""
    for var, value in (
        ("$__rate_interval", RATE_INTERVAL),
        ("$__interval", f"{STEP_SECONDS}s"),
        ("$__range", f"{range_s}s"),
        ("$revision", str(revision)),
        ("$instance", ".*"),
    ):
        expr = expr.replace(var, value)
    assert "$" not in expr, f"a variable this test does not know: {expr}"
    return expr


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_METRIC = re.compile(r"(?<![\w:])((?:edgeward|rabbitmq|erlang)_[A-Za-z0-9_]*)(?![\w:(])")
_RECORDED = re.compile(r"(?<![\w:])([a-z]+:[A-Za-z0-9_:]+)(?![\w:])")


def metric_names(expr: str) -> set[str]:
    """edgeward_*, rabbitmq_* and erlang_* series an expression reads."""
    return set(_METRIC.findall(_STRING.sub('""', expr)))


def recorded_refs(expr: str) -> set[str]:
    """Recording-rule series (``level:metric:operation``) an expression reads."""
    return set(_RECORDED.findall(_STRING.sub('""', re.sub(r"\[[^\]]*\]", "[]", expr))))


def with_bool(expr: str) -> str:
    """An alert condition made to keep its series: ``a > 1`` becomes
    ``a > bool 1`` (0 or 1 instead of nothing), comparisons inside label
    matchers left alone."""
    out, depth, i = [], 0, 0
    while i < len(expr):
        if expr[i] == '"':
            string = _STRING.match(expr, i)
            assert string, expr
            out.append(string[0])
            i = string.end()
            continue
        depth += {"{": 1, "}": -1}.get(expr[i], 0)
        op = re.match(r"==|!=|>=|<=|>|<", expr[i:]) if depth == 0 else None
        if op:
            out.append(f"{op[0]} bool")
            i += len(op[0])
            continue
        out.append(expr[i])
        i += 1
    return "".join(out)


def exported_by_the_code() -> set[str]:
    """The series actors/metrics.py's docstring table lists, as Prometheus
    names them (a histogram as its _bucket, _sum and _count)."""
    names: set[str] = set()
    for line in METRICS_MODULE.read_text().splitlines():
        found = re.match(r"``(edgeward_[a-z_]+)(?:\{[^}]*\})?``\s+(.*)", line)
        if not found:
            continue
        name = found[1]
        if name == "edgeward_telemetry_confirm_seconds":  # the table calls it a histogram
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        else:
            names.add(name)
    assert len(names) >= 14, f"could not read the table in {METRICS_MODULE}: {names}"
    return names


def doc_anchors() -> set[str]:
    """GitHub's anchors of docs/operators.md's headings."""
    anchors = set()
    for line in OPERATORS_DOC.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^a-z0-9 _-]", "", title).replace(" ", "-"))
    return anchors


# == static checks ====================================================================


def test_every_dashboard_is_import_ready_grafana_json_with_a_datasource_variable() -> None:
    boards = load_dashboards()
    # Given the four dashboards the issue asks for
    assert sorted(boards) == ["broker", "fleet", "rollout", "telemetry-pipeline"]
    uids = set()
    for name, board in boards.items():
        # Then each is a Grafana 9+ dashboard with a uid of its own and no instance id
        assert board["schemaVersion"] >= 36 and board["id"] is None, name
        assert board["uid"] not in uids and board["title"].startswith("edgeward / ")
        uids.add(board["uid"])
        # And its datasource is a variable the importer picks, never a fixed uid
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        for var in variables.values():
            if var["type"] == "query":
                assert var["datasource"]["uid"] == "${datasource}", (name, var["name"])
        ids, cells = set(), set()
        for panel in board["panels"]:
            where = f"{name}.json: {panel['title']}"
            assert panel["id"] not in ids, where
            ids.add(panel["id"])
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
            assert panel["type"] in ("timeseries", "stat"), where
            assert panel.get("description"), f"{where}: say what the panel shows"
            # And panels sit on Grafana's 24-column grid without overlapping
            pos = panel["gridPos"]
            assert pos["x"] + pos["w"] <= 24, where
            cell = {
                (x, y)
                for x in range(pos["x"], pos["x"] + pos["w"])
                for y in range(pos["y"], pos["y"] + pos["h"])
            }
            assert not cell & cells, f"{where} overlaps another panel"
            cells |= cell
            refs = [t["refId"] for t in panel["targets"]]
            assert refs and len(set(refs)) == len(refs), where
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "${datasource}", where
                assert target["expr"].strip(), where


def test_the_dashboards_have_the_panels_the_issue_lists() -> None:
    titles = {name: [p["title"] for p in b["panels"]] for name, b in load_dashboards().items()}
    exprs = {
        name: " ".join(expanded(t["expr"]) for p in b["panels"] for t in p["targets"])
        for name, b in load_dashboards().items()
    }
    # Fleet: devices by state over time, revision adoption as a stacked area,
    # offline devices, alerts per minute by severity and by policy
    fleet = {p["title"]: p for p in load_dashboards()["fleet"]["panels"]}
    assert "sum by (state) (edgeward_devices)" in fleet["Devices by state"]["targets"][0]["expr"]
    adoption = fleet["Revision adoption"]
    assert adoption["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"
    assert adoption["fieldConfig"]["defaults"]["custom"]["fillOpacity"] > 0
    assert "Offline devices" in titles["fleet"]
    assert "by (severity)" in fleet["Alerts per minute by severity"]["targets"][0]["expr"]
    assert "by (policy)" in fleet["Alerts per minute by policy"]["targets"][0]["expr"]
    # Rollout: one revision's adoption curve and time to 50/90/99/100%
    assert '{revision="$revision"}' in exprs["rollout"]
    for pct in (50, 90, 99, 100):
        assert f"Time to {pct}%" in titles["rollout"]
    # Telemetry pipeline: records in, duplicates, rejected by reason, lag, drops
    for series in (
        "edgeward_telemetry_stored_total",
        "edgeward_telemetry_duplicates_total",
        "edgeward_telemetry_rejected_total",
        "edgeward_collector_lag",
        "edgeward_outbox_dropped",
    ):
        assert series in exprs["telemetry-pipeline"], series
    # Broker: connections, memory, file descriptors, stream/queue message rates
    for series in (
        "rabbitmq_connections",
        "rabbitmq_process_resident_memory_bytes",
        "rabbitmq_process_open_fds",
        "rabbitmq_global_messages_delivered_total",
    ):
        assert series in exprs["broker"], series
    assert "queue_type" in exprs["broker"]


def test_promtool_checks_the_scrape_config_and_every_rule_file() -> None:
    promtool = tool("promtool")
    # When promtool checks the config (which loads the rule files) and the rules
    config = run_tool(promtool, "check", "config", str(PROMETHEUS_CONFIG))
    rules = run_tool(promtool, "check", "rules", *map(str, RULE_FILES))
    # Then both pass, and the config scrapes the control plane and the broker
    assert config.returncode == 0, config.stdout + config.stderr
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert f"{len(RULE_FILES)} rule files found" in config.stdout
    jobs = {j["job_name"] for j in yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]}
    assert jobs == {"edgeward-control-plane", "rabbitmq"}


def test_promtool_unit_tests_fire_each_alert_with_one_series_and_not_with_another() -> None:
    promtool = tool("promtool")
    spec = yaml.safe_load(ALERT_TESTS.read_text())
    # Given the unit tests, which load exactly the chart's rule files
    assert sorted(spec["rule_files"]) == sorted(f"../rules/{p.name}" for p in RULE_FILES)
    fires: dict[str, int] = {}
    quiet: dict[str, int] = {}
    for case in spec["tests"]:
        for check in case.get("alert_rule_test", []):
            bucket = fires if check["exp_alerts"] else quiet
            bucket[check["alertname"]] = bucket.get(check["alertname"], 0) + 1
    # Then every alert has a series that fires it and one that does not
    alerts = set(alert_rules())
    assert alerts - set(fires) == set(), "alerts no unit test fires"
    assert alerts - set(quiet) == set(), "alerts no unit test shows quiet"
    assert set(fires) | set(quiet) <= alerts, "unit tests of alerts that do not exist"
    # And promtool agrees with every one of them
    done = run_tool(promtool, "test", "rules", ALERT_TESTS.name, cwd=ALERT_TESTS.parent)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_waits_has_a_severity_and_tells_the_operator_what_to_do() -> None:
    anchors = doc_anchors()
    for name, rule in alert_rules().items():
        # Each alert has a for: duration, a severity, a summary and a description
        assert "for" in rule, name
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        notes = rule["annotations"]
        assert notes["summary"] and len(notes["description"]) > 120, name
        # And a runbook section in docs/operators.md
        assert notes["runbook"] == f"docs/operators.md#{name.lower()}", name
        assert name.lower() in anchors, f"docs/operators.md has no section {name}"
    # And the issue's alerts are all there
    exprs = " ".join(r["expr"] for r in alert_rules().values())
    for series in (
        "edgeward:devices_offline:ratio",
        'edgeward_devices{state="drifted"}',
        'edgeward_devices{state="failed"}',
        "edgeward:devices_in_sync:ratio",
        "edgeward_collector_lag",
        "edgeward_outbox_dropped",
        "edgeward_bundles_rejected",
        "rabbitmq:memory_used:ratio",
        "rabbitmq:fds_used:ratio",
    ):
        assert series in exprs, series


def test_every_recording_rule_the_charts_read_is_defined() -> None:
    defined = recorded_names()
    for query in dashboard_queries() + rule_queries():
        missing = recorded_refs(query.expr) - defined
        assert not missing, f"{query.where} reads undefined {missing}"


# -- the agent's unit --------------------------------------------------------------


def unit_settings() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser


def verify_root(tmp_path: Path, unit_text: str) -> Path:
    """A file-system root for systemd-analyze: the host's system units, the
    unit under test, and a stand-in for the binary it runs (verify checks
    that ExecStart's program exists)."""
    root = tmp_path / "root"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "etc/systemd/system" / UNIT.name).write_text(unit_text)
    program = unit_settings()["Service"]["ExecStart"].split()[0]
    binary = root / program.lstrip("/")
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    return root


def analyze_verify(root: Path) -> subprocess.CompletedProcess:
    analyze = tool("systemd-analyze")
    return run_tool(
        analyze, "verify", "--man=no", f"--root={root}", f"/etc/systemd/system/{UNIT.name}"
    )


def test_the_agent_unit_enforces_the_budget_restarts_and_is_hardened() -> None:
    service = unit_settings()["Service"]
    # The talk's budget, enforced by the kernel
    assert service["MemoryMax"] == "500M" and service["CPUQuota"] == "50%"
    # A restart policy that never gives up
    assert service["Restart"] == "always" and service["RestartSec"]
    assert unit_settings()["Unit"]["StartLimitIntervalSec"] == "0"
    # Hardening, with the agent's state dir the one writable place
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
        "PrivateDevices": "yes",
        "CapabilityBoundingSet": "",
        "StateDirectory": "edgeward",
        "ReadWritePaths": "/var/lib/edgeward",
    }.items():
        assert service[key] == value, key
    assert "agent run --config" in service["ExecStart"]


def test_systemd_analyze_verifies_the_unit_and_rates_it_well_hardened(tmp_path: Path) -> None:
    # Given a root with the system's units and the unit as shipped
    root = verify_root(tmp_path, UNIT.read_text())
    # When systemd-analyze verifies it
    done = analyze_verify(root)
    # Then it passes with nothing to say (it warns on stderr and exits 0 on a typo)
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), (
        done.stdout + done.stderr
    )
    # And its security review puts the exposure at 2.0 ("OK") or below
    review = run_tool(
        tool("systemd-analyze"),
        "security",
        "--offline=yes",
        f"--root={root}",
        "--threshold=20",
        UNIT.name,
    )
    assert review.returncode == 0, review.stdout[-3000:] + review.stderr


def test_systemd_analyze_verify_would_catch_a_typo_in_the_unit(tmp_path: Path) -> None:
    # Given the unit with its memory limit misspelt
    text = UNIT.read_text().replace("MemoryMax=500M", "MemoryMaxx=500M")
    # When it is verified the same way
    done = analyze_verify(verify_root(tmp_path, text))
    # Then the typo is named (so the clean verify above means something)
    assert "MemoryMaxx" in done.stdout + done.stderr


# -- the broker's config -------------------------------------------------------------


@pytest.mark.broker
@pytest.mark.skipif(
    not (rabbitmq_bin_dir() / "rabbitmq-server").exists(), reason="needs Debian's rabbitmq-server"
)
def test_the_rabbitmq_config_boots_a_node_of_our_own_that_serves_the_dashboards_metrics(
    tmp_path: Path,
) -> None:
    # Given a node of the test's own (own name, ports, data dir) with charts/rabbitmq/rabbitmq.conf
    cluster = LocalCluster(
        1, tmp_path, config_file=RABBITMQ_CONF, name_prefix=f"edgechart{secrets.token_hex(3)}"
    )
    # When it starts
    cluster.start(progress=lambda _line: None, timeout=120)
    try:
        # Then the settings are in force
        def env(key: str) -> str:
            done = cluster.ctl(1, "eval", f"application:get_env(rabbit, {key}).")
            assert done.returncode == 0, done.stderr
            return done.stdout.strip()

        assert env("heartbeat") == "{ok,60}"
        assert env("channel_max") == "{ok,128}"
        assert env("collect_statistics_interval") == "{ok,60000}"
        assert "{backlog,4096}" in env("tcp_listen_options")
        # And its rabbitmq_prometheus serves every rabbitmq_ series the charts read
        text = urllib.request.urlopen(cluster.prometheus_urls[0], timeout=10).read().decode()
        served = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}
        used = set().union(*(metric_names(q.expr) for q in dashboard_queries() + rule_queries()))
        assert {n for n in used if n.startswith("rabbitmq_")} - served == set()
    finally:
        cluster.stop()


# == the live run =====================================================================


class Prometheus:
    """A Prometheus process of the test's own: config, port and data dir under tmp."""

    def __init__(self, binary: str, config: dict[str, Any], workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config_file = workdir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log = workdir / "prometheus.log"
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config_file}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1h",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(self._ready, timeout=30, interval=0.2, message="Prometheus never got ready")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"Prometheus exited:\n{self.log.read_text()[-3000:]}")
        try:
            return urllib.request.urlopen(f"{self.url}/-/ready", timeout=2).status == 200
        except (urllib.error.URLError, OSError):
            return False

    def api(self, path: str, **params: Any) -> dict[str, Any]:
        """The JSON answer of ``/api/v1/<path>`` (a POST form): ``status``,
        ``data`` or ``errorType``/``error``."""
        body = urllib.parse.urlencode(params, doseq=True).encode()
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}", body, timeout=30) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:  # 400/422: bad_data, execution errors
            return json.loads(exc.read())

    def query(self, expr: str) -> list[dict[str, Any]]:
        answer = self.api("query", query=expr)
        assert answer["status"] == "success", f"{expr}\n{answer}"
        return answer["data"]["result"]

    def query_range(self, expr: str, start: float, end: float) -> list[dict[str, Any]]:
        answer = self.api("query_range", query=expr, start=start, end=end, step=STEP_SECONDS)
        assert answer["status"] == "success", f"{expr}\n{answer}"
        return answer["data"]["result"]

    def value(self, expr: str) -> float | None:
        """The single value of an expression now (None: no series)."""
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def get(self, path: str, **params: Any) -> Any:
        """The ``data`` of ``GET /api/v1/<path>?<params>``."""
        query = urllib.parse.urlencode(params, doseq=True)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=30) as r:
            return json.loads(r.read())["data"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def prometheus_config_for(metrics_port: int) -> dict[str, Any]:
    """charts/prometheus/prometheus.yml pointed at this run: its jobs and rule
    files as shipped, the targets on this machine, every second."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s", scrape_timeout="1s")
    config.pop("alerting", None)  # no Alertmanager here; /api/v1/alerts shows them
    config["rule_files"] = [str(PROMETHEUS_DIR / f) for f in config["rule_files"]]
    targets = {
        "edgeward-control-plane": [f"127.0.0.1:{metrics_port}"],
        "rabbitmq": ["127.0.0.1:15692"],  # the shared broker (scripts/ensure-broker)
    }
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": targets[job["job_name"]]}]
    return config


@dataclass
class Run:
    prom: Prometheus
    fleet: Fleet
    revision: int  # the rollout's revision
    started: float = field(default_factory=time.time)
    ended: float = 0.0
    marks: list[tuple[float, str]] = field(default_factory=list)
    all_agents: list[Proc] = field(default_factory=list)  # every agent process started

    def mark(self, what: str) -> None:
        self.marks.append((time.time(), what))

    @property
    def range_s(self) -> int:
        return int(time.time() - self.started) + 5


def policy(name: str, severity: int, action: str, match: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "security.kubearmor.com/v1",
        "kind": "KubeArmorHostPolicy",
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"matchLabels": {"store": "berlin"}},
            "process": match,
            "action": action,
            "severity": severity,
        },
    }


def alert_events(n: int, first: int) -> str:
    """``n`` events the policies turn into alerts: tools (Block, severity 7
    or 8) and curl (Audit, severity 3), alternately."""
    lines = []
    for i in range(first, first + n):
        path = f"{TOOLS_DIR}tool-{i}" if i % 2 else "/usr/bin/curl"
        lines.append(json.dumps({"op": "exec", "path": path, "source": "/bin/sh"}) + "\n")
    return "".join(lines)


def publish(url: str, exchange: str, routing_key: str, body: bytes, **props: Any) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = conn.channel()
        channel.confirm_delivery()
        channel.basic_publish(exchange, routing_key, body, pika.BasicProperties(**props))
    finally:
        conn.close()


def forged_bundle(key_id: str | None) -> bytes:
    """A bundle signed by a key no device trusts (``key_id`` None), or
    claiming the fleet's key with a signature that does not verify."""
    bundle = Bundle(revision=99, issued_at=time.time(), mode="snapshot", policies=(), sha256="0")
    signed = Signer.generate().sign(bundle)
    if key_id is not None:
        signed = SignedBundle(key_id=key_id, sig=signed.sig, body=signed.body)
    return signed.encode()


@pytest.fixture(scope="module")
def module_broker_url(broker_admin: BrokerAdmin) -> Iterator[str]:
    """A vhost of the module's own (like conftest's ``vhost``, for one module)."""
    name = f"edgeward-test-{secrets.token_hex(6)}"
    broker_admin.create_vhost(name)
    try:
        broker_admin.set_permissions(name, "guest", ".*", ".*", ".*")
        yield amqp_url(name)
    finally:
        try:
            broker_admin.delete_users_of(name)
            broker_admin.close_connections(name)
        finally:
            broker_admin.delete_vhost(name)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, module_broker_url: str) -> Iterator[Run]:
    """One control plane, three agents and a Prometheus, through a rollout,
    alerts, outbox drops, forged bundles, a refused message and an offline device."""
    binary = tool("prometheus")
    home = tmp_path_factory.mktemp("charts")
    metrics_port = free_port()
    url = module_broker_url
    # Given Prometheus scraping the control plane's port and the broker, before either has data
    prom = Prometheus(binary, prometheus_config_for(metrics_port), home / "prometheus")
    fleet = Fleet(home / "home", url)
    state = Run(prom, fleet, revision=2)
    try:
        fleet.start_control_plane(
            "--metrics-port", str(metrics_port), "--offline-after", str(OFFLINE_AFTER)
        )
        state.mark("control plane")

        def start_agent(device: str) -> None:
            args = ["agent", "run", "--config", str(fleet.configs[device])]
            args += ["--events-from", str(home / f"{device}.events.jsonl")]
            fleet.agents[device] = Proc([*HARDENED, *args], fleet.env, device)
            state.all_agents.append(fleet.agents[device])

        # And three agents judging events from a file each; one with a 2-record outbox
        events = {}
        for device in DEVICES:
            config_path = fleet.enroll(device, "store=berlin", heartbeat=1.0)
            config = json.loads(config_path.read_text())
            config["telemetry_drain_jitter_s"] = 0.2
            if device == DROPPER:
                config["outbox_max_records"] = 2
            config_path.write_text(json.dumps(config))
            events[device] = home / f"{device}.events.jsonl"
            events[device].touch()
            start_agent(device)
        trusted_key = next(iter(config["trusted_keys"]))

        def wait_fleet(condition: Any, message: str) -> None:
            """Wait for the fleet; on a timeout, say what each agent printed."""
            try:
                wait_until(condition, timeout=60, interval=0.3, message=message)
            except AssertionError as exc:
                said = "\n".join(f"--- {p.name}:\n{p.output[-3000:]}" for p in state.all_agents)
                raise AssertionError(f"{exc}\ndevices: {fleet.devices()}\n{said}") from None

        def applied(revision: int) -> bool:
            rows = fleet.devices()
            return all(
                rows[d]["state"] == "in_sync" and rows[d]["reported_revision"] == revision
                for d in DEVICES
            )

        def prom_at_least(expr: str, floor: float, message: str) -> float:
            return wait_until(
                lambda: (v := prom.value(expr)) is not None and v >= floor and v,
                timeout=30,
                interval=0.5,
                message=message,
            )

        # When revision 1 (block the tools, audit curl) reaches every device
        policies = home / "policies"
        policies.mkdir()
        tools = {"matchDirectories": [{"dir": TOOLS_DIR, "recursive": True}]}
        curl = {"matchPaths": [{"path": "/usr/bin/curl"}]}
        (policies / "tools.yaml").write_text(
            yaml.safe_dump(policy("block-tools", 7, "Block", tools))
        )
        (policies / "curl.yaml").write_text(yaml.safe_dump(policy("audit-curl", 3, "Audit", curl)))
        fleet.cli("policy", "apply", str(policies / "tools.yaml"), str(policies / "curl.yaml"))
        wait_fleet(lambda: applied(1), "revision 1 not in force")
        state.mark("revision 1")
        # And every device sees alerts; the small outbox drops some
        for device in DEVICES:
            with events[device].open("a") as fh:
                fh.write(alert_events(6, 0))
        dropped = prom_at_least(
            'sum(edgeward_outbox_dropped{type="alert"})', 1, "no drops reached Prometheus"
        )
        # And revision 2 (the tools at severity 8) rolls out while one device is away
        fleet.stop_agent(LATE)
        (policies / "tools.yaml").write_text(
            yaml.safe_dump(policy("block-tools", 8, "Block", tools))
        )
        fleet.cli("policy", "apply", str(policies / "tools.yaml"))
        state.mark("revision 2")
        prom_at_least('edgeward_devices{state="pending"}', 1, f"{LATE} never showed pending")
        # And that device comes back (before it counts as offline) and catches up
        start_agent(LATE)
        wait_fleet(lambda: applied(2), "revision 2 not in force")
        state.mark(f"{LATE} back")
        prom_at_least(
            'edgeward:revision_adoption:ratio{revision="2"}', 1, "adoption never reached 100%"
        )
        # And a bundle signed by an unknown key reaches the policy stream
        publish(url, topology.POLICY_EXCHANGE, "", forged_bundle(None), delivery_mode=2)
        wait_fleet(
            lambda: all("unknown_key" in r["rejected"] for r in fleet.devices().values()),
            "the devices did not refuse the unknown key's bundle",
        )
        state.mark("forged bundle")
        # And more alerts: more drops
        for device in DEVICES:
            with events[device].open("a") as fh:
                fh.write(alert_events(6, 100))
        prom_at_least(
            'sum(edgeward_outbox_dropped{type="alert"})', dropped + 1, "no more drops seen"
        )
        # And a bundle claiming the fleet's key with a bad signature
        publish(url, topology.POLICY_EXCHANGE, "", forged_bundle(trusted_key), delivery_mode=2)
        wait_fleet(
            lambda: all("bad_signature" in r["rejected"] for r in fleet.devices().values()),
            "the devices did not refuse the badly signed bundle",
        )
        state.mark("bad signature")
        # And someone on the broker publishes telemetry without a device login
        publish(url, topology.TELEMETRY_EXCHANGE, f"telemetry.{DEVICES[0]}.alert", b"\xa0")
        prom_at_least("sum(edgeward_telemetry_rejected_total)", 1, "no refusal seen")
        # And heartbeats without a device login, and one that does not decode
        hb = Heartbeat(DEVICES[0], time.time(), 2, 2, "", "ok").encode()
        publish(url, topology.TELEMETRY_EXCHANGE, topology.heartbeat_routing_key(DEVICES[0]), hb)
        publish(url, topology.TELEMETRY_EXCHANGE, topology.heartbeat_routing_key(DEVICES[0]), b"?")
        prom_at_least("edgeward_heartbeats_malformed_total", 1, "no malformed heartbeat seen")
        prom_at_least("edgeward_heartbeats_refused_total", 1, "no refused heartbeat seen")
        # And one device goes away
        fleet.stop_agent(STOPPED)
        state.mark(f"{STOPPED} stopped")
        prom_at_least(
            'min_over_time(edgeward_devices{state="offline"}[6s])', 1, f"{STOPPED} not offline"
        )
        # Then the run is over once the lag was measured and the offline alert is pending
        prom_at_least("count(edgeward_collector_lag)", 1, "the collector lag was never measured")
        wait_until(
            lambda: "EdgewardDevicesOffline" in pending_or_firing(prom),
            timeout=30,
            interval=0.5,
            message="EdgewardDevicesOffline never went pending",
        )
        state.ended = time.time()
        yield state
    finally:
        fleet.close()
        prom.stop()


def pending_or_firing(prom: Prometheus) -> dict[str, str]:
    return {a["labels"]["alertname"]: a["state"] for a in prom.get("alerts")["alerts"]}


def exported_names(prom: Prometheus) -> set[str]:
    """Every series name Prometheus scraped from the control plane."""
    names = prom.get("label/__name__/values", **{"match[]": '{job="edgeward-control-plane"}'})
    return {n for n in names if n.startswith("edgeward_")}


# -- the run's checks ---------------------------------------------------------------------


def test_the_agents_ran_without_new_privileges_and_without_writable_executable_memory(
    run: Run,
) -> None:
    # The unit's NoNewPrivileges= and MemoryDenyWriteExecute=, as prctl()s the kernel
    # keeps across exec: every agent of the run (all did their work) ran under them
    lines = [p.matching("hardening:")[0] for p in run.all_agents]
    assert all("no_new_privs=1" in line for line in lines), lines
    if not all("mdwe=1" in line for line in lines):
        pytest.skip(f"this kernel has no PR_SET_MDWE (Linux 6.3+): {os.uname().release}")


def test_prometheus_scrapes_the_control_plane_and_the_broker(run: Run) -> None:
    # Given the chart's two jobs pointed at this machine
    targets = run.prom.get("targets")["activeTargets"]
    # Then both targets are up, with no scrape error
    health = {t["labels"]["job"]: (t["health"], t["lastError"]) for t in targets}
    assert health == {"edgeward-control-plane": ("up", ""), "rabbitmq": ("up", "")}


def test_every_rule_group_loads_and_evaluates_without_error(run: Run) -> None:
    # Given the rule files Prometheus loaded from the chart's config
    groups = run.prom.get("rules")["groups"]
    # Then every group of every rule file is there
    assert {g["name"] for g in groups} == {g["name"] for _, g in load_rule_groups()}
    # And no rule failed to evaluate on the run's data (e.g. duplicate label sets)
    broken = [
        (g["name"], r["name"], r.get("lastError"))
        for g in groups
        for r in g["rules"]
        if r["health"] != "ok"
    ]
    assert broken == []


def test_every_promql_expression_of_the_dashboards_and_rules_parses(run: Run) -> None:
    bad = []
    # When every dashboard query (its Grafana variables filled in) and every rule is asked
    for query in dashboard_queries() + rule_queries():
        answer = run.prom.api("query", query=grafana_expr(query.expr, run.revision, run.range_s))
        if answer["status"] != "success":
            bad.append(f"{query.where}: {answer.get('error')}")
    # Then Prometheus parses and runs each of them
    assert bad == []


def test_the_run_produces_every_series_the_charts_read_and_every_expression_returns_data(
    run: Run,
) -> None:
    # Given every series name Prometheus holds after the run
    produced = set(run.prom.get("label/__name__/values"))
    queries = dashboard_queries() + rule_queries()
    # Then the run produced every series a dashboard or rule reads
    unproduced = {q.where: metric_names(q.expr) - produced for q in queries}
    assert {w: n for w, n in unproduced.items() if n} == {}
    # And every expression over them returns data now
    empty = []
    for query in queries:
        expr = grafana_expr(query.expr, run.revision, run.range_s)
        # (an alert's condition is asked with `bool`: its series, 0 when quiet)
        if not run.prom.query(with_bool(expr) if query.kind == "alert" else expr):
            empty.append(f"{query.where}: {expr}")
    assert empty == []


def test_alerts_go_pending_on_the_runs_data(run: Run) -> None:
    # Given the run: a third of the devices offline, drops, forged bundles, a refused heartbeat
    alerts = pending_or_firing(run.prom)
    expected = {
        "EdgewardDevicesOffline",
        "EdgewardDevicesOfflineCritical",
        "EdgewardOutboxDrops",
        "EdgewardBundleSignatureRejected",
        "EdgewardHeartbeatsRefused",
    }
    # Then their alerts are pending (or firing, past their for:)
    assert expected <= set(alerts), alerts
    # And nothing that did not happen is alerting
    assert set(alerts) - expected - {"EdgewardRolloutStalled"} == set(), alerts


def test_dashboards_and_rules_use_only_metrics_the_code_exports_and_every_export_has_a_panel(
    run: Run,
) -> None:
    # Given what Prometheus scraped from the control plane and from RabbitMQ
    scraped = exported_names(run.prom)
    broker = set(run.prom.get("label/__name__/values", **{"match[]": '{job="rabbitmq"}'}))
    queries = dashboard_queries() + rule_queries()
    used = set().union(*(metric_names(q.expr) for q in queries))
    # (a panel reads what the recording rules it shows read)
    on_panels = set().union(*(metric_names(expanded(q.expr)) for q in dashboard_queries()))
    # Then every series a dashboard or rule reads is one the control plane or RabbitMQ serves
    assert sorted(used - scraped - broker) == [], "dashboards/rules read series nobody exports"
    # And every series the control plane exports (scraped, or in metrics.py's table) has a panel
    homeless = sorted((scraped | exported_by_the_code()) - on_panels - set(NO_PANEL))
    assert homeless == [], "exported series without a dashboard panel (or a NO_PANEL reason)"


def test_each_dashboard_draws_every_panel_from_the_runs_data(run: Run, tmp_path: Path) -> None:
    # Given the PNGs go to docs/ only when asked (EDGEWARD_RENDER_DASHBOARDS=1)
    target = DOCS if os.environ.get("EDGEWARD_RENDER_DASHBOARDS") == "1" else tmp_path
    for name, board in load_dashboards().items():
        # When each dashboard is drawn from the run's Prometheus
        path = target / f"dashboard-{name}.png"
        drawn = render_dashboard(run, board, path)
        # Then every one of its panels drew data
        empty = [title for title, n in drawn.items() if n == 0]
        assert empty == [], f"{name}: panels that drew nothing"
        assert len(drawn) == len(board["panels"]) and path.stat().st_size > 50_000


# == drawing a dashboard with matplotlib ========================================================

BACKGROUND, PANEL, GRID, TEXT, MUTED = "#111217", "#181b1f", "#2c3235", "#d8d9da", "#8e8e8e"
PALETTE = ["#73bf69", "#f2cc0c", "#5794f2", "#ff9830", "#f2495c", "#b877d9", "#8ab8ff", "#fade2a"]
COLORS = {"green": "#73bf69", "orange": "#ff9830", "red": "#f2495c"}
ROW_INCHES = 0.42  # one row of Grafana's grid
HEAD_INCHES = 0.9  # the dashboard's title


def legend_text(fmt: str, labels: dict[str, str]) -> str:
    if fmt in ("", "__auto"):
        return ", ".join(f"{k}={v}" for k, v in sorted(labels.items()) if k != "__name__")
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m[1], ""), fmt)


def format_value(value: float, unit: str, decimals: int | None = None) -> str:
    """A value as Grafana shows it in ``unit`` (the few units the dashboards use)."""
    if math.isnan(value):
        return "NaN"
    if unit == "percentunit":
        return f"{value * 100:.{1 if decimals is None else decimals}f}%"
    if unit == "bytes":
        for size, suffix in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
            if abs(value) >= size:
                return f"{value / size:.1f} {suffix}"
        return f"{value:.0f} B"
    if unit == "s" and 0 < abs(value) < 1:
        return f"{value * 1000:.{0 if abs(value) >= 0.01 else 1}f} ms"
    digits = decimals if decimals is not None else (0 if value == int(value) else 2)
    suffix = {"s": " s", "reqps": "/s", "cps": "/s"}.get(unit, "")
    return f"{value:.{digits}f}{suffix}"


def render_dashboard(run: Run, board: dict[str, Any], path: Path) -> dict[str, int]:
    """Draw every panel of ``board`` where its gridPos puts it, from the run's
    Prometheus: query_range for a time series, an instant query for a stat.
    Returns how many series (or values) each panel drew."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, PercentFormatter

    start, end = run.started, run.ended
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in board["panels"])
    height = rows * ROW_INCHES + HEAD_INCHES
    fig = plt.figure(figsize=(18, height), facecolor=BACKGROUND)
    fig.text(
        0.008, 1 - 0.3 / height, board["title"], color=TEXT, fontsize=16, weight="bold", va="top"
    )
    fig.text(
        0.008,
        1 - 0.62 / height,
        "Drawn with matplotlib from a real Prometheus's answers to the dashboard's own queries, "
        f"over {int(end - start)} s of a test run (tests/test_charts.py: a control plane, "
        "3 agents, the shared RabbitMQ). Dashed lines mark what the test did.",
        color=MUTED,
        fontsize=9,
        va="top",
    )
    clock = [mdates.date2num(datetime.fromtimestamp(t)) for t in (start, end)]
    drawn: dict[str, int] = {}
    for panel in board["panels"]:
        pos = panel["gridPos"]
        x0, width = pos["x"] / 24 + 0.003, pos["w"] / 24 - 0.006
        y1 = 1 - (HEAD_INCHES + pos["y"] * ROW_INCHES) / height - 0.003
        box = pos["h"] * ROW_INCHES / height - 0.006
        frame = fig.add_axes((x0, y1 - box, width, box))
        frame.set_facecolor(PANEL)
        frame.set_xticks([])
        frame.set_yticks([])
        for spine in frame.spines.values():
            spine.set_color(GRID)
        title = panel["title"].replace("$revision", str(run.revision))
        frame.text(
            0.008, 1 - 0.1 / (pos["h"] * ROW_INCHES), title, color=TEXT, fontsize=10,
            weight="bold", va="top", transform=frame.transAxes,
        )  # fmt: skip
        defaults = panel["fieldConfig"]["defaults"]
        unit, decimals = defaults.get("unit", "short"), defaults.get("decimals")
        range_s = int(end - start) + 5
        exprs = [grafana_expr(t["expr"], run.revision, range_s) for t in panel["targets"]]
        if panel["type"] == "stat":
            values = [float(r["value"][1]) for r in run.prom.query(exprs[0])]
            drawn[panel["title"]] = len(values)
            color = TEXT
            for step in defaults["thresholds"]["steps"]:
                if values and (step["value"] is None or sum(values) >= step["value"]):
                    color = COLORS.get(step["color"], step["color"])
            text = format_value(sum(values), unit, decimals) if values else "No data"
            frame.text(
                0.5, 0.42, text, color=color if values else MUTED, fontsize=28, weight="bold",
                ha="center", va="center", transform=frame.transAxes,
            )  # fmt: skip
            continue
        # A time series: the plot in the panel, the legend under it, as Grafana has them
        legend_rows = 0.0 if panel["options"]["legend"]["showLegend"] is False else 0.75
        below = (0.45 + legend_rows) * ROW_INCHES  # inches for the time axis and the legend
        plot_inches = pos["h"] * ROW_INCHES - 0.85 * ROW_INCHES - below
        ax = fig.add_axes(
            (x0 + 0.032, y1 - box + below / height, width - 0.04, plot_inches / height)
        )
        ax.set_facecolor("none")
        ax.tick_params(colors="#9fa7b3", labelsize=7, length=0)
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.grid(color=GRID, linewidth=0.6)
        grid = [start + i * STEP_SECONDS for i in range(int((end - start) / STEP_SECONDS) + 1)]
        xs = mdates.date2num([datetime.fromtimestamp(t) for t in grid])
        series: list[tuple[str, list[float]]] = []
        for target, expr in zip(panel["targets"], exprs, strict=True):
            for result in run.prom.query_range(expr, start, end):
                points = {round(float(t)): float(v) for t, v in result["values"]}
                ys = [points.get(round(t), math.nan) for t in grid]
                series.append((legend_text(target.get("legendFormat", ""), result["metric"]), ys))
        drawn[panel["title"]] = len(series)
        if not series:
            ax.text(
                0.5, 0.5, "No data", color=MUTED, ha="center", va="center", transform=ax.transAxes
            )
        elif defaults["custom"]["stacking"]["mode"] == "normal":
            series.sort(key=lambda s: s[0])
            ys = [[0.0 if math.isnan(v) else v for v in s[1]] for s in series]
            colors = [PALETTE[i % len(PALETTE)] for i in range(len(series))]
            ax.stackplot(xs, ys, labels=[s[0] for s in series], colors=colors, alpha=0.8, lw=0)
        else:
            for i, (label, ys) in enumerate(series):
                # The first series widest: a line that coincides with a later one still shows
                width = 3.0 if i == 0 and len(series) > 1 else 1.5
                ax.plot(xs, ys, label=label, color=PALETTE[i % len(PALETTE)], linewidth=width)
        for when, what in run.marks:
            x = mdates.date2num(datetime.fromtimestamp(when))
            ax.axvline(x, color=MUTED, linestyle="--", linewidth=0.7)
            ax.text(
                x, 0.97, f"{what} ", color=MUTED, fontsize=6.5, rotation=90, ha="right",
                va="top", transform=ax.get_xaxis_transform(),
            )  # fmt: skip
        ax.set_xlim(*clock)
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
        ax.xaxis.set_major_locator(mdates.AutoDateLocator(minticks=4, maxticks=8))
        if unit == "percentunit":
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        else:
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _, u=unit: format_value(v, u)))
        if defaults.get("min") == 0:
            ax.set_ylim(bottom=0)
        if series:
            ax.legend(
                loc="upper left", bbox_to_anchor=(0, -0.42 * ROW_INCHES / plot_inches),
                fontsize=7.5, frameon=False,
                labelcolor=TEXT, ncol=min(5, len(series)), handlelength=1.2, borderaxespad=0,
            )  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, facecolor=BACKGROUND)
    plt.close(fig)
    return drawn
