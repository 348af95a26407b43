"""A broker node restarted in the middle of a simulation, for real: a local
two-node cluster of the run's own (never the shared broker), a few dozen
devices, a rollout before the restart and one after it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    shutil.which("rabbitmq-server") is None, reason="needs Debian's rabbitmq-server"
)

SCENARIO = """
name = "node-restart-small"
devices = 40
duration = 8
heartbeat_interval = 5
alert_rate = 0.2
verify = "every"
baseline = false

[ramp]
rate = 100

[[timeline]]
at = 1
action = "apply"
policies = 5
changed = 5

[[timeline]]
at = 3
action = "restart-node"
node = 2

[[timeline]]
at = 4
action = "apply"
policies = 5
changed = 1
"""


@pytest.fixture(scope="module")
def restart_report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("node-restart")
    scenario = out / "scenario.toml"
    scenario.write_text(SCENARIO)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgeward.actors.cli",
            "simulate",
            str(scenario),
            "--local-cluster",
            "2",
            "--report",
            str(out / "report"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out / "report" / "report.json").read_text())


def test_the_devices_of_a_restarted_node_come_back_and_take_the_next_revision(
    restart_report: dict,
) -> None:
    r = restart_report
    assert r["completed"] is True and r["converged"] is True
    restart = [a for a in r["series"]["actions"] if a["kind"] == "restart-node"]
    assert len(restart) == 1 and restart[0]["detail"]["node"] == 2
    # every online device was connected again, and the report says how soon
    assert restart[0]["detail"]["all_connected_s"] > restart[0]["detail"]["restart_s"] > 0
    # a node going away on purpose is no unexpected close, and nothing was lost
    assert r["unexpected_closes"] == 0 and r["messages_lost"] == 0
    assert r["telemetry"]["balanced"] is True


def test_a_local_clusters_device_users_go_with_it(restart_report: dict) -> None:
    logins = restart_report["logins"]
    assert logins["mode"] == "device" and logins["users"] == 40
    assert logins["removed_with_cluster"] is True and logins["removed"] is None
