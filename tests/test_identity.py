"""Device identity against the real broker: `edgeward enroll` makes each
device a broker user of its own, RabbitMQ itself refuses everything else
that login tries, the control plane believes a record or heartbeat only from
the login of the device it names, and `edgeward revoke` shuts a device out.

Every refusal here is the broker's (or the collector's) answer to a real
attempt, not a reading of the permission table.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest
from brokerkit import free_port, wait_until
from fleetkit import CLI, Fleet, Proc
from test_collector import alert
from test_metrics_endpoint import scrape

from edgeward.transport import topology
from edgeward.transport.admin import ManagementAPI, device_grants, vhost_of
from edgeward.transport.wire import CONTENT_TYPE, Heartbeat

DEVICE = "pos-0001"


@pytest.fixture
def fleet(tmp_path: Path, broker_url: str):
    fleet = Fleet(tmp_path / "home", broker_url)
    fleet.metrics_port = free_port()
    fleet.start_control_plane("--metrics-port", str(fleet.metrics_port))
    yield fleet
    fleet.close()


def device_url(config: Path) -> str:
    return json.loads(config.read_text())["broker_url"]


def props(**kw: Any) -> pika.BasicProperties:
    return pika.BasicProperties(content_type=CONTENT_TYPE, delivery_mode=2, **kw)


def refusal(url: str, attempt) -> tuple[int, str] | None:
    """Run ``attempt(channel)`` on a fresh connection with confirms on; the
    broker's (code, text) if it refused, None if it let it through."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = conn.channel()
        channel.confirm_delivery()
        try:
            attempt(channel)
        except pika.exceptions.ChannelClosedByBroker as exc:
            return exc.reply_code, exc.reply_text
        return None
    finally:
        if conn.is_open:
            conn.close()


def publish(channel: Any, exchange: str, key: str, body: bytes = b"x", **kw: Any) -> None:
    channel.basic_publish(exchange, key, body, props(**kw), mandatory=True)


def audit_status(fleet: Fleet) -> dict[str, Any]:
    return json.loads(fleet.cli("audit", "status", "--json"))


def heartbeats_refused(port: int) -> float:
    return scrape(port).get(("edgeward_heartbeats_refused_total", ()), 0)


# == enrolment ====================================================================


def test_enroll_makes_a_broker_user_that_may_do_only_what_a_device_needs(
    fleet: Fleet, broker_url: str
) -> None:
    # When a device is enrolled
    config = fleet.enroll(DEVICE, "store=berlin")
    # Then its config file is readable by its owner only, and holds its own login
    assert stat.S_IMODE(os.stat(config).st_mode) == 0o600
    url = pika.URLParameters(device_url(config))
    assert url.credentials.username == DEVICE and len(url.credentials.password) >= 32
    assert url.credentials.password not in (fleet.run_cli("devices", "--json").stdout)
    # And the broker knows that user with exactly the device's grants and no tags
    admin = ManagementAPI.for_amqp_url(broker_url)
    assert admin.user(DEVICE)["tags"] in ("", [])
    assert admin.user_grants(vhost_of(broker_url), DEVICE) == device_grants()
    # And enrolling again gives it a new secret: the old one no longer logs in
    fleet.enroll(DEVICE, "store=berlin")
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        pika.BlockingConnection(url)


def test_with_a_device_login_the_broker_refuses_everything_but_its_own_telemetry(
    fleet: Fleet,
) -> None:
    config = fleet.enroll(DEVICE, "store=berlin")
    url = device_url(config)
    ex = topology.TELEMETRY_EXCHANGE
    # Its own records, stamped with its own login, go through
    assert (
        refusal(url, lambda ch: publish(ch, ex, f"telemetry.{DEVICE}.alert", user_id=DEVICE))
        is None
    )
    # and it may read the policy stream
    assert (
        refusal(
            url,
            lambda ch: (
                ch.basic_qos(prefetch_count=10),
                ch.basic_consume(
                    topology.POLICY_STREAM, lambda *a: None, arguments={"x-stream-offset": "first"}
                ),
            ),
        )
        is None
    )
    # But each of these the broker refuses, with the code that says why
    attempts = {
        "publish a bundle": (
            lambda ch: publish(ch, topology.POLICY_EXCHANGE, ""),
            403,
        ),
        "publish as another device": (
            lambda ch: publish(ch, ex, "telemetry.pos-0002.alert"),
            403,
        ),
        "claim another user_id": (
            lambda ch: publish(ch, ex, f"telemetry.{DEVICE}.alert", user_id="pos-0002"),
            406,
        ),
        "read the audit trail": (
            lambda ch: (
                ch.basic_qos(prefetch_count=10),
                ch.basic_consume(
                    topology.TELEMETRY_STREAM,
                    lambda *a: None,
                    arguments={"x-stream-offset": "first"},
                ),
            ),
            403,
        ),
        "read the heartbeats": (
            lambda ch: ch.basic_get(topology.HEARTBEAT_QUEUE),
            403,
        ),
        "declare a queue": (lambda ch: ch.queue_declare("mine", durable=True), 403),
        "declare an exchange": (lambda ch: ch.exchange_declare("mine", "fanout"), 403),
        "delete the policy stream": (lambda ch: ch.queue_delete(topology.POLICY_STREAM), 403),
        "delete the telemetry exchange": (
            lambda ch: ch.exchange_delete(topology.TELEMETRY_EXCHANGE),
            403,
        ),
        "purge the heartbeats": (lambda ch: ch.queue_purge(topology.HEARTBEAT_QUEUE), 403),
        "bind the audit trail to the policy exchange": (
            lambda ch: ch.queue_bind(topology.TELEMETRY_STREAM, topology.POLICY_EXCHANGE),
            403,
        ),
    }
    answers = {what: refusal(url, attempt) for what, (attempt, _) in attempts.items()}
    assert {what: a and a[0] for what, a in answers.items()} == {
        what: code for what, (_, code) in attempts.items()
    }, answers
    # And it may hold one connection at a time
    first = pika.BlockingConnection(pika.URLParameters(url))
    try:
        with pytest.raises(pika.exceptions.ProbableAccessDeniedError, match="connection limit"):
            pika.BlockingConnection(pika.URLParameters(url))
    finally:
        first.close()


# == what the control plane believes ==============================================


def test_the_collector_stores_a_record_only_from_the_login_of_the_device_it_names(
    fleet: Fleet, broker_url: str
) -> None:
    config = fleet.enroll(DEVICE, "store=berlin")
    fleet.enroll("pos-0002", "store=berlin")
    url = device_url(config)
    ex = topology.TELEMETRY_EXCHANGE
    # Given: pos-0001 publishes a record of its own, and one whose body
    # claims to be pos-0002 (under its own key and login: all it can do)
    mine = alert(DEVICE, 1)
    forged = alert("pos-0002", 1)
    key = f"telemetry.{DEVICE}.alert"
    assert refusal(url, lambda ch: publish(ch, ex, key, mine.encode(), user_id=DEVICE)) is None
    assert refusal(url, lambda ch: publish(ch, ex, key, forged.encode(), user_id=DEVICE)) is None
    # and the shared guest login publishes one as pos-0002 with no user_id
    assert (
        refusal(broker_url, lambda ch: publish(ch, ex, "telemetry.pos-0002.alert", forged.encode()))
        is None
    )
    # Then only the first is stored; the others are refused, each with its reason
    status = wait_until(
        lambda: (s := audit_status(fleet)).get("stored") == 1 and len(s["refused"]) == 2 and s,
        timeout=30,
        message="the collector never sorted the three records",
    )
    assert status["refused"] == {"device_mismatch": 1, "no_user_id": 1}
    rows = json.loads(fleet.cli("alerts", "--json"))
    assert [(r["device"], r["seq"]) for r in rows] == [(DEVICE, 1)]


def test_a_heartbeat_from_another_login_does_not_change_the_device_it_names(
    fleet: Fleet, broker_url: str
) -> None:
    # Given a device in sync, its agent running with its own login
    config = fleet.enroll(DEVICE, "store=berlin")
    fleet.start_agent(DEVICE)
    wait_until(
        lambda: fleet.devices()[DEVICE]["last_seen"],
        timeout=30,
        message="the device never reported",
    )
    # When the shared login publishes a heartbeat saying it failed
    fake = Heartbeat(DEVICE, 0.0, 0, 0, "", "failed", error="forged")
    key = topology.heartbeat_routing_key(DEVICE)
    assert (
        refusal(broker_url, lambda ch: publish(ch, topology.TELEMETRY_EXCHANGE, key, fake.encode()))
        is None
    )
    # Then the mirror refuses it, and the device is not shown failed
    wait_until(
        lambda: heartbeats_refused(fleet.metrics_port) >= 1,
        timeout=30,
        message="the forged heartbeat was not refused",
    )
    row = fleet.devices()[DEVICE]
    assert row["state"] != "failed" and row["error"] != "forged"
    assert config.exists()


# == revocation ===================================================================


def test_a_revoked_device_is_cut_off_shown_revoked_and_its_telemetry_refused(
    fleet: Fleet, broker_url: str
) -> None:
    # Given a device whose agent is connected with its own login
    config = fleet.enroll(DEVICE, "store=berlin")
    agent = fleet.start_agent(DEVICE)
    agent.wait_for_line("connected to", timeout=30)
    admin = ManagementAPI.for_amqp_url(broker_url)
    wait_until(
        lambda: any(c.get("user") == DEVICE for c in admin.request("GET", "/connections") or []),
        timeout=30,
        message="the broker never showed the device's connection",
    )
    # When it is revoked
    out = fleet.cli("revoke", DEVICE)
    # Then its user is gone and its live connection was closed
    assert "broker user deleted, 1 live connection closed" in out
    assert admin.user(DEVICE) is None
    agent.wait_for_line("connection lost", timeout=30)
    # And it cannot log in again
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        pika.BlockingConnection(pika.URLParameters(device_url(config)))
    wait_until(lambda: agent.matching("login_refused"), timeout=60, message="agent not refused")
    # And `devices` shows it revoked, and enrolling it again is refused
    assert fleet.devices()[DEVICE]["state"] == "revoked"
    done = fleet.run_cli("enroll", DEVICE, "--out", str(config))
    assert done.returncode == 2 and "revoked" in done.stderr
    # And a record naming it that is still on its way is refused as revoked
    ex = topology.TELEMETRY_EXCHANGE
    late = alert(DEVICE, 99).encode()
    assert (
        refusal(broker_url, lambda ch: publish(ch, ex, f"telemetry.{DEVICE}.alert", late)) is None
    )
    wait_until(
        lambda: audit_status(fleet)["refused"].get("revoked") == 1,
        timeout=30,
        message="the late record was not refused as revoked",
    )
    # And revoking again says so
    assert "already revoked" in fleet.cli("revoke", DEVICE)


def test_a_device_enrolled_with_the_shared_login_is_accepted_only_when_the_control_plane_allows_it(
    tmp_path: Path, broker_url: str
) -> None:
    fleet = Fleet(tmp_path / "home", broker_url)
    try:
        # Given a control plane that allows a shared login, and a device enrolled with it
        fleet.start_control_plane("--allow-shared-login")
        config = fleet.enroll(DEVICE, "store=berlin", extra=["--shared-login"])
        assert pika.URLParameters(device_url(config)).credentials.username == "guest"
        # When its agent reports
        fleet.start_agent(DEVICE)
        # Then its heartbeats are believed (no user_id: the login is not its own)
        wait_until(
            lambda: fleet.devices()[DEVICE]["last_seen"],
            timeout=30,
            message="heartbeats of a shared-login device were not accepted",
        )
    finally:
        fleet.close()
    # But a control plane that does not allow it believes none of them
    fleet = Fleet(tmp_path / "home", broker_url)
    try:
        port = free_port()
        fleet.start_control_plane("--metrics-port", str(port))
        before = fleet.devices()[DEVICE]["last_seen"]
        agent = Proc([*CLI, "agent", "run", "--config", str(config)], fleet.env, DEVICE)
        fleet.agents[DEVICE] = agent
        wait_until(
            lambda: heartbeats_refused(port) >= 2,
            timeout=30,
            message="heartbeats without a user_id were not refused",
        )
        assert fleet.devices()[DEVICE]["last_seen"] == before
    finally:
        fleet.close()


# == the control plane's own login ================================================


def test_the_control_plane_runs_on_a_login_limited_to_edgewards_names(
    tmp_path: Path, broker_url: str, broker_admin
) -> None:
    # Given a least-privilege user made for the control plane
    fleet = Fleet(tmp_path / "home", broker_url)
    out = tmp_path / "control-plane.env"
    said = fleet.cli("broker", "control-plane-user", "edgeward-cp-test", "--out", str(out))
    assert "edgeward.* only" in said and stat.S_IMODE(os.stat(out).st_mode) == 0o600
    cp_url = out.read_text().strip().split("=", 1)[1]
    assert pika.URLParameters(cp_url).credentials.username == "edgeward-cp-test"
    try:
        # When the control plane runs on it (devices enrolled with the admin's API login)
        fleet.env["EDGEWARD_BROKER_URL"] = cp_url
        fleet.start_control_plane()
        admin_api = "http://guest:guest@127.0.0.1:15672/api"
        config = fleet.enroll(DEVICE, "store=berlin", extra=["--management-url", admin_api])
        fleet.start_agent(DEVICE)
        doc = {
            "apiVersion": "security.kubearmor.com/v1",
            "kind": "KubeArmorHostPolicy",
            "metadata": {"name": "block-curl"},
            "spec": {
                "nodeSelector": {"matchLabels": {"store": "berlin"}},
                "process": {"matchPaths": [{"path": "/usr/bin/curl"}]},
                "action": "Block",
            },
        }
        (tmp_path / "p.json").write_text(json.dumps(doc))
        fleet.cli("policy", "apply", str(tmp_path / "p.json"))
        # Then the device comes in sync through it
        fleet.wait_states({DEVICE: "in_sync"}, timeout=60)
        assert config.exists()
        # But outside edgeward's names the broker refuses it
        assert refusal(cp_url, lambda ch: ch.queue_declare("other", durable=True))[0] == 403
        assert refusal(cp_url, lambda ch: publish(ch, "amq.topic", "x"))[0] == 403
        # And it cannot make users (no management tag)
        with pytest.raises(RuntimeError, match="401"):
            ManagementAPI.for_amqp_url(cp_url).put_device_user(vhost_of(cp_url), "x", "y")
    finally:
        fleet.close()
        broker_admin.request("DELETE", "/users/edgeward-cp-test")
