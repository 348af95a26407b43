"""The kubearmor backend against a daemon double that speaks the real wire
(a grpcio server on a loopback port; see kubearmor_double.py)."""

from __future__ import annotations

import datetime
import ipaddress
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from brokerkit import free_port, wait_until
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from kubearmor_double import QUEUE_SIZE, KubeArmorDouble

from edgeward.actors.config import AgentConfig
from edgeward.enforcement.digest import EMPTY_DIGEST, state_digest
from edgeward.enforcement.kubearmor import kubearmor_pb2, policy_pb2, policy_pb2_grpc
from edgeward.enforcement.kubearmor.backend import (
    AlertSeen,
    DaemonDown,
    DaemonUp,
    KubeArmorBackend,
    KubeArmorRefused,
    LogSeen,
    Watch,
)
from edgeward.enforcement.kubearmor.settings import KubeArmorSettings


def policy(name: str, path: str = "/usr/bin/nc", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "security.kubearmor.com/v1",
        "kind": "KubeArmorHostPolicy",
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"matchLabels": {"kubearmor.io/hostname": "*"}},
            "process": {"matchPaths": [{"path": path}]},
            "action": "Block",
            **spec,
        },
    }


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[KubeArmorDouble]:
    double = KubeArmorDouble(tmp_path / "kubearmor").start()
    yield double
    double.stop()


@pytest.fixture
def backend(daemon: KubeArmorDouble) -> Iterator[KubeArmorBackend]:
    ka = KubeArmorBackend(KubeArmorSettings(address=daemon.address, timeout_s=2.0))
    yield ka
    ka.close()


class Events:
    """What a watch handed over, collected from its threads."""

    def __init__(self) -> None:
        self.seen: list[Any] = []

    def __call__(self, event: Any) -> None:
        self.seen.append(event)

    def of(self, kind: type) -> list[Any]:
        return [e for e in list(self.seen) if isinstance(e, kind)]


@pytest.fixture
def watched(backend: KubeArmorBackend) -> Iterator[tuple[Watch, Events]]:
    events = Events()
    watch = Watch(backend, events, backoff_base=0.05, backoff_cap=0.5).start()
    yield watch, events
    watch.stop()


# -- the wire ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "field", "number"),
    [
        (policy_pb2.response, "status", 1),
        (policy_pb2.policy, "policy", 1),
        (policy_pb2.ContainerData, "policyDataList", 3),
        (policy_pb2.HostSecurityPolicies, "policyDataList", 2),
        (policy_pb2.ProbeResponse, "hostMap", 3),
        (policy_pb2.ProbeResponse, "networkMap", 4),
        (kubearmor_pb2.RequestMessage, "Filter", 1),
        (kubearmor_pb2.Alert, "PolicyName", 13),
        (kubearmor_pb2.Alert, "Tags", 15),
        (kubearmor_pb2.Alert, "ATags", 30),
        (kubearmor_pb2.Alert, "EventData", 43),
        (kubearmor_pb2.Alert, "UserName", 44),
        (kubearmor_pb2.Log, "Type", 13),
        (kubearmor_pb2.Log, "UserName", 34),
        (kubearmor_pb2.Message, "Message", 8),
    ],
)
def test_messages_carry_kubearmors_field_numbers(message: Any, field: str, number: int) -> None:
    assert message.DESCRIPTOR.fields_by_name[field].number == number


def test_services_and_statuses_are_named_as_the_daemon_names_them() -> None:
    methods = {
        f"/{service.full_name}/{method.name}"
        for module in (policy_pb2, kubearmor_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert {
        "/policy.PolicyService/hostPolicy",
        "/policy.PolicyService/containerPolicy",
        "/policy.PolicyService/networkPolicy",
        "/policy.ProbeService/getProbeData",
        "/feeder.LogService/WatchAlerts",
        "/feeder.LogService/WatchLogs",
        "/feeder.LogService/WatchMessages",
        "/feeder.LogService/HealthCheck",
    } == methods
    statuses = dict(policy_pb2.PolicyStatus.items())
    assert statuses == {
        "Failure": 0,
        "Applied": 1,
        "Deleted": 2,
        "Modified": 3,
        "NotExist": 4,
        "Invalid": 5,
        "NotEnabled": 6,
    }


# -- the double behaves like the daemon ------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [b"not json", b'{"type": "ADDED", "object": {"metadata": {"name": ""}, "spec": {}}}'],
    ids=["bad-json", "empty-name"],
)
def test_daemon_double_answers_invalid_to_bad_json_and_empty_names(
    daemon: KubeArmorDouble, raw: bytes
) -> None:
    with grpc.insecure_channel(daemon.address) as channel:
        answer = policy_pb2_grpc.PolicyServiceStub(channel).hostPolicy(
            policy_pb2.policy(policy=raw), timeout=5
        )
    assert answer.status == policy_pb2.PolicyStatus.Invalid
    assert daemon.names() == []


def test_daemon_double_queues_a_thousand_events_per_subscriber_and_drops_the_rest(
    daemon: KubeArmorDouble, watched: tuple[Watch, Events]
) -> None:
    # Given a subscriber that cannot keep up
    _, events = watched
    wait_until(lambda: daemon.subscribers("alerts") == 1, message="no alert subscriber")
    with daemon.held_back():
        # When 1005 alerts are emitted
        for i in range(QUEUE_SIZE + 5):
            daemon.emit_alert(PolicyName="p", Resource=f"/tmp/{i}")
        # Then five of them are dropped
        assert daemon.dropped["alerts"] == 5
    # And the thousand queued ones arrive, in order
    wait_until(lambda: len(events.of(AlertSeen)) == QUEUE_SIZE, message="queued alerts lost")
    assert [e.alert["Resource"] for e in events.of(AlertSeen)[:2]] == ["/tmp/0", "/tmp/1"]


# -- applying a set ------------------------------------------------------------------


def test_apply_adds_each_policy_with_the_revision_in_its_tags(
    daemon: KubeArmorDouble, backend: KubeArmorBackend
) -> None:
    # When two policies are applied at revision 42
    digest = backend.apply([policy("a", tags=["pci"]), policy("b")], revision=42)
    # Then the daemon holds both, each tagged with the revision (its own tags kept)
    assert daemon.names() == ["a", "b"]
    assert daemon.tags("a") == ["pci", "edgeward-rev:42"]
    assert daemon.tags("b") == ["edgeward-rev:42"]
    assert [(kind, name) for kind, name, _ in daemon.calls] == [("ADDED", "a"), ("ADDED", "b")]
    # And the backend reports the set's digest in force
    assert digest == backend.digest == state_digest([policy("a", tags=["pci"]), policy("b")])


def test_apply_sends_only_what_changed_and_deletes_what_left_the_set(
    daemon: KubeArmorDouble, backend: KubeArmorBackend
) -> None:
    # Given a, b and c in force at revision 1
    backend.apply([policy("a"), policy("b"), policy("c")], revision=1)
    daemon.calls.clear()
    # When revision 2 changes a, keeps b, drops c and adds d
    backend.apply([policy("a", "/bin/su"), policy("b"), policy("d")], revision=2)
    # Then a is sent again (Modified), d added, c deleted, and b left alone
    assert daemon.calls == [
        ("ADDED", "a", "Modified"),
        ("ADDED", "d", "Applied"),
        ("DELETED", "c", "Deleted"),
    ]
    assert daemon.names() == ["a", "b", "d"]
    assert daemon.tags("a") == ["edgeward-rev:2"] and daemon.tags("b") == ["edgeward-rev:1"]


def test_deleting_a_policy_the_daemon_no_longer_holds_is_success(
    daemon: KubeArmorDouble, backend: KubeArmorBackend
) -> None:
    # Given a and b in force, and b gone from the daemon behind our back
    backend.apply([policy("a"), policy("b")], revision=1)
    daemon.policies.pop("b")
    # When b leaves the set
    backend.apply([policy("a")], revision=2)
    # Then the daemon's NotExist counts as done
    assert daemon.calls[-1] == ("DELETED", "b", "NotExist")
    assert backend.names == ["a"] and backend.digest == state_digest([policy("a")])


@pytest.mark.parametrize("status", ["Invalid", "Failure", "NotEnabled"])
def test_a_refused_policy_fails_the_apply_and_the_previous_set_stays_in_force(
    daemon: KubeArmorDouble, backend: KubeArmorBackend, status: str
) -> None:
    # Given a and b in force at revision 1
    before = backend.apply([policy("a"), policy("b")], revision=1)
    # When revision 2 changes a, drops b and adds c, which the daemon refuses
    daemon.refuse("c", status)
    with pytest.raises(KubeArmorRefused) as refused:
        backend.apply([policy("a", "/bin/su"), policy("c")], revision=2)
    # Then the apply fails with the daemon's answer and the policy's name
    assert refused.value.status == status and refused.value.policy == "c"
    assert status in str(refused.value)
    # And the daemon holds revision 1's set again, as it was
    assert daemon.names() == ["a", "b"]
    assert daemon.policies["a"]["spec"]["process"] == {"matchPaths": [{"path": "/usr/bin/nc"}]}
    assert daemon.tags("a") == ["edgeward-rev:1"]
    assert backend.digest == before and backend.names == ["a", "b"]
    # And once the daemon accepts c, the same set goes in
    daemon.accept("c")
    backend.apply([policy("a", "/bin/su"), policy("c")], revision=2)
    assert daemon.names() == ["a", "c"]


def test_a_container_policy_goes_to_container_policy_and_not_enabled_fails_the_apply(
    daemon: KubeArmorDouble, backend: KubeArmorBackend
) -> None:
    # Given a host policy in force
    backend.apply([policy("a")], revision=1)
    # When a container policy joins the set, on a daemon without container support
    container = {**policy("web"), "kind": "KubeArmorPolicy"}
    with pytest.raises(KubeArmorRefused) as refused:
        backend.apply([policy("a"), container], revision=2)
    # Then it was sent to containerPolicy, whose NotEnabled fails the apply
    assert [json.loads(raw)["object"]["metadata"]["name"] for raw in daemon.container_calls] == [
        "web"
    ]
    assert refused.value.status == "NotEnabled" and refused.value.policy == "web"
    assert ("ADDED", "web", "Applied") not in daemon.calls
    assert daemon.names() == ["a"] and backend.names == ["a"]


def test_an_unreachable_daemon_fails_the_apply_at_once_naming_its_address() -> None:
    address = f"127.0.0.1:{free_port()}"
    backend = KubeArmorBackend(KubeArmorSettings(address=address, timeout_s=2.0))
    try:
        with pytest.raises(KubeArmorRefused) as refused:
            backend.apply([policy("a")], revision=1)
        assert refused.value.status == "UNAVAILABLE" and address in str(refused.value)
        assert backend.digest == EMPTY_DIGEST
    finally:
        backend.close()


def _certificate(
    name: str, key: Any, issuer: tuple[Any, Any] | None = None, *, ca: bool = False
) -> Any:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = (subject, key) if issuer is None else issuer
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(obj: Any) -> bytes:
    if isinstance(obj, ec.EllipticCurvePrivateKey):
        return obj.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    return obj.public_bytes(serialization.Encoding.PEM)


def test_mtls_daemon_takes_policies_from_an_agent_with_its_client_certificate_only(
    tmp_path: Path,
) -> None:
    # Given a CA, a daemon with a certificate from it that asks for client
    # certificates from it, and an agent certificate from it
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("edgeward test CA", ca_key, ca=True)
    server_key, agent_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    server = _certificate("kubearmor", server_key, (ca.subject, ca_key))
    agent = _certificate("pos-0001", agent_key, (ca.subject, ca_key))
    files = {"ca": ca, "cert": agent, "key": agent_key}
    for name, obj in files.items():
        (tmp_path / f"{name}.pem").write_bytes(_pem(obj))
    daemon = KubeArmorDouble(
        tmp_path / "kubearmor", tls=(_pem(server_key), _pem(server), _pem(ca))
    ).start()
    try:
        # When the agent applies over mTLS
        settings = KubeArmorSettings(
            address=daemon.address,
            ca=str(tmp_path / "ca.pem"),
            cert=str(tmp_path / "cert.pem"),
            key=str(tmp_path / "key.pem"),
            timeout_s=5.0,
        )
        backend = KubeArmorBackend(settings)
        try:
            backend.apply([policy("a")], revision=1)
        finally:
            backend.close()
        # Then the daemon holds the policy
        assert daemon.names() == ["a"]
        # And a client that trusts the CA but shows no certificate gets nothing in
        anonymous = KubeArmorBackend(KubeArmorSettings(address=daemon.address, ca=settings.ca))
        try:
            with pytest.raises(KubeArmorRefused) as refused:
                anonymous.apply([policy("b")], revision=2)
            assert refused.value.status == "UNAVAILABLE"
        finally:
            anonymous.close()
        assert daemon.names() == ["a"]
    finally:
        daemon.stop()


# -- reconciling ---------------------------------------------------------------------


def test_first_apply_removes_what_the_daemon_held_from_before(
    daemon: KubeArmorDouble, tmp_path: Path
) -> None:
    # Given a daemon that replayed a policy of its own at start
    daemon.put_on_disk({"metadata": {"name": "left-over"}, "spec": {}})
    daemon.restart()
    assert daemon.names() == ["left-over"]
    # When a fresh backend applies its set
    backend = KubeArmorBackend(KubeArmorSettings(address=daemon.address))
    try:
        backend.apply([policy("a")], revision=3)
    finally:
        backend.close()
    # Then the daemon holds exactly that set
    assert daemon.names() == ["a"]


def test_reconcile_after_a_restart_removes_stale_copies_and_sends_missing_ones_again(
    daemon: KubeArmorDouble, backend: KubeArmorBackend
) -> None:
    # Given a and b in force
    backend.apply([policy("a"), policy("b")], revision=1)
    # And a daemon restarting with a stale policy on its disk, b's copy lost,
    # and an old version of a
    daemon.put_on_disk({"metadata": {"name": "stale"}, "spec": {"action": "Allow"}})
    (daemon.state_dir / "b.json").unlink()
    daemon.put_on_disk({"metadata": {"name": "a"}, "spec": {"tags": ["edgeward-rev:0"]}})
    daemon.restart()
    # When the backend reconciles
    removed, added = backend.reconcile()
    # Then the stale one is gone and a and b are as we sent them
    assert removed == ["stale"] and added == ["a", "b"]
    assert daemon.names() == ["a", "b"]
    assert daemon.tags("a") == ["edgeward-rev:1"]
    # And a second reconcile finds nothing to do
    assert backend.reconcile() == ([], [])


def test_reconcile_before_any_apply_leaves_the_daemon_alone(
    daemon: KubeArmorDouble, backend: KubeArmorBackend
) -> None:
    # Given a daemon holding a policy from before, and a backend that applied nothing yet
    daemon.put_on_disk({"metadata": {"name": "from-before"}, "spec": {}})
    daemon.restart()
    # When the backend reconciles (the daemon appeared before the first apply)
    # Then nothing is removed: the set to hold it to is not known yet
    assert backend.reconcile() == ([], [])
    assert daemon.names() == ["from-before"]


# -- watching ------------------------------------------------------------------------


def test_alerts_reach_the_watch_with_the_revision_tag_and_logs_too(
    daemon: KubeArmorDouble, backend: KubeArmorBackend, watched: tuple[Watch, Events]
) -> None:
    # Given policy a in force at revision 7 and the watch subscribed
    _, events = watched
    backend.apply([policy("a")], revision=7)
    wait_until(lambda: daemon.subscribers("alerts") and daemon.subscribers("logs"))
    # When the daemon raises an alert for a and logs a system event
    daemon.emit_alert_for("a", Resource="/usr/bin/nc", ProcessName="/usr/bin/nc")
    daemon.emit_log(Operation="File", Resource="/etc/shadow")
    # Then both are handed over, the alert naming the revision
    alert = wait_until(lambda: events.of(AlertSeen), message="no alert")[0].alert
    log = wait_until(lambda: events.of(LogSeen), message="no log")[0].log
    assert alert["PolicyName"] == "a" and alert["Tags"] == "edgeward-rev:7"
    assert alert["ATags"] == ["edgeward-rev:7"] and isinstance(alert["Timestamp"], int)
    assert log["Operation"] == "File" and log["Resource"] == "/etc/shadow"
    assert events.of(DaemonUp) == [DaemonUp(daemon.address)]


def test_watch_says_when_the_daemon_goes_and_comes_back_and_subscribes_again(
    daemon: KubeArmorDouble, watched: tuple[Watch, Events]
) -> None:
    # Given a watch subscribed to a running daemon
    _, events = watched
    wait_until(lambda: daemon.subscribers("alerts") and daemon.subscribers("logs"))
    # When the daemon stops
    daemon.stop()
    # Then the watch says it is down
    wait_until(lambda: events.of(DaemonDown), message="the loss went unnoticed")
    # When it starts again
    daemon.start()
    # Then the watch says it is up, and both streams are subscribed again
    wait_until(lambda: len(events.of(DaemonUp)) == 2, message="the daemon's return went unnoticed")
    wait_until(lambda: daemon.subscribers("alerts") and daemon.subscribers("logs"))
    daemon.emit_alert(PolicyName="after-restart")
    wait_until(lambda: events.of(AlertSeen), message="no alert after the restart")


# -- configuration -------------------------------------------------------------------


def config(backend: Any) -> dict[str, Any]:
    return {
        "device": "pos-0001",
        "labels": {},
        "broker_url": "amqp://guest:guest@127.0.0.1:5672/%2F",
        "cache_dir": "/tmp/x",
        "trusted_keys": {},
        "backend": backend,
    }


def test_agent_config_defaults_to_the_builtin_backend_and_reads_kubearmor_settings(
    tmp_path: Path,
) -> None:
    path = tmp_path / "agent.json"
    for backend, kind in [("builtin", "builtin"), ({"kind": "builtin"}, "builtin")]:
        path.write_text(json.dumps(config(backend)))
        read = AgentConfig.read(path)
        assert read.backend_kind == kind and read.kubearmor_settings() is None
    path.write_text(json.dumps(config({"kind": "kubearmor"})))
    assert AgentConfig.read(path).kubearmor_settings() == KubeArmorSettings(
        address="127.0.0.1:32767", keepalive_s=300
    )
    path.write_text(
        json.dumps(
            config(
                {
                    "kind": "kubearmor",
                    "address": "unix:///run/kubearmor/policy.sock",
                    "ca": "/etc/edgeward/ka-ca.pem",
                    "cert": "/etc/edgeward/agent.pem",
                    "key": "/etc/edgeward/agent.key",
                    "keepalive_s": 600,
                }
            )
        )
    )
    settings = AgentConfig.read(path).kubearmor_settings()
    assert settings is not None and settings.tls and settings.keepalive_s == 600


@pytest.mark.parametrize(
    ("backend", "complaint"),
    [
        ({"kind": "kubearmor", "keepalive_s": 60}, "too_many_pings"),
        ({"kind": "kubearmor", "cert": "/c.pem"}, "cert and key"),
        ({"kind": "kubearmor", "cert": "/c.pem", "key": "/k.pem"}, "ca"),
        ({"kind": "kubearmor", "adress": "x"}, "unknown keys"),
        ({"kind": "ebpf"}, "unknown kind"),
        ({"kind": "builtin", "address": "x"}, "takes no settings"),
    ],
)
def test_agent_config_refuses_a_bad_backend_naming_the_file(
    tmp_path: Path, backend: dict[str, Any], complaint: str
) -> None:
    path = tmp_path / "agent.json"
    path.write_text(json.dumps(config(backend)))
    with pytest.raises(ValueError) as refused:
        AgentConfig.read(path)
    assert str(path) in str(refused.value) and complaint in str(refused.value)
