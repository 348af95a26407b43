"""The simulated devices' broker users: RabbitMQ's sha256 password hash
computed here, the definitions documents that make and grant them, and (on
the local broker) that a user made that way logs in with its derived
password and has exactly the device grants ``enroll`` gives."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
from dataclasses import replace
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest
from brokerkit import MANAGEMENT_URL, amqp_url

from edgeward.actors.shell import Link
from edgeward.simulator.logins import (
    HASHING_ALGORITHM,
    DeviceLogins,
    Stopped,
    check_password,
    device_password,
    grants_definitions,
    new_secret,
    password_hash,
    remove_quietly,
    revoke_paths,
    users_definitions,
)
from edgeward.simulator.report import _logins_figure
from edgeward.simulator.run import Runner
from edgeward.simulator.scenario import parse
from edgeward.simulator.shard import DeviceLink, Shard, ShardConfig
from edgeward.transport import topology
from edgeward.transport.admin import ManagementAPI, device_grants
from edgeward.transport.errors import BrokerUnreachable

# -- the hash and the passwords (no broker) ---------------------------------------


def test_password_hash_matches_rabbitmqs_documented_example() -> None:
    # RabbitMQ's docs ("Computing Password Hash"): "test12" with salt 908DC60A
    salt = bytes.fromhex("908DC60A")
    assert password_hash("test12", salt) == "kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR"


def test_password_hash_is_salt_then_sha256_of_salt_and_password() -> None:
    stored = password_hash("pässword")  # UTF-8
    raw = base64.b64decode(stored)
    assert len(raw) == 4 + 32
    assert raw[4:] == hashlib.sha256(raw[:4] + "pässword".encode()).digest()
    assert check_password("pässword", stored) and not check_password("password", stored)


def test_each_hash_has_a_fresh_salt() -> None:
    assert len({password_hash("same") for _ in range(20)}) == 20


def test_a_salt_must_be_four_bytes() -> None:
    with pytest.raises(ValueError, match="4 bytes"):
        password_hash("x", b"abc")


def test_device_passwords_derive_from_the_run_secret_and_the_name() -> None:
    secret = new_secret()
    assert device_password(secret, "sim-000001") == device_password(secret, "sim-000001")
    assert device_password(secret, "sim-000001") != device_password(secret, "sim-000002")
    assert device_password(new_secret(), "sim-000001") != device_password(secret, "sim-000001")
    assert len(device_password(secret, "sim-000001")) == 43


# -- the definitions documents (no broker) -----------------------------------------


def test_users_definitions_make_device_users_with_a_hash_no_tags_and_one_connection() -> None:
    secret = new_secret()
    doc = users_definitions(["sim-000000", "sim-000001"], secret)
    assert set(doc) == {"users"}  # grants come per vhost, once it exists
    assert [u["name"] for u in doc["users"]] == ["sim-000000", "sim-000001"]
    for user in doc["users"]:
        assert set(user) == {"name", "password_hash", "hashing_algorithm", "tags", "limits"}
        assert user["hashing_algorithm"] == HASHING_ALGORITHM == "rabbit_password_hashing_sha256"
        assert user["tags"] == ""
        assert user["limits"] == {"max-connections": device_grants()["max-connections"]}
        assert check_password(device_password(secret, user["name"]), user["password_hash"])


def test_grants_definitions_are_exactly_the_device_grants_in_the_vhost() -> None:
    doc = grants_definitions(["sim-000007"], "edgeward-sim-x")
    grants = device_grants()
    assert doc["permissions"] == [
        {
            "user": "sim-000007",
            "vhost": "edgeward-sim-x",
            "configure": grants["configure"],
            "write": grants["write"],
            "read": grants["read"],
        }
    ]
    assert doc["topic_permissions"] == [
        {"user": "sim-000007", "vhost": "edgeward-sim-x", **grants["topic"]}
    ]


def test_raw_queue_grants_add_server_named_queues_and_nothing_else() -> None:
    doc = grants_definitions(["sim-000007"], "v", raw_queues=True)
    perm = doc["permissions"][0]
    assert perm["configure"] == r"^amq\.gen-.*$"
    assert perm["write"] == r"^(edgeward\.uplink|amq\.gen-.*)$"
    assert perm["read"] == r"^(edgeward\.policy|amq\.gen-.*)$"
    assert doc["topic_permissions"] == grants_definitions(["sim-000007"], "v")["topic_permissions"]


def test_grants_without_the_topic_permission_for_the_raw_baseline() -> None:
    doc = grants_definitions(["sim-000007"], "v", topic=False)
    assert set(doc) == {"permissions"}
    assert doc["permissions"] == grants_definitions(["sim-000007"], "v")["permissions"]


def test_grants_are_revoked_each_by_its_full_key() -> None:
    assert revoke_paths(["sim-000001"], "edgeward-sim-x/y") == [
        "/permissions/edgeward-sim-x%2Fy/sim-000001",
        # with the exchange: RabbitMQ deletes by key instead of scanning the table
        "/topic-permissions/edgeward-sim-x%2Fy/sim-000001/edgeward.uplink",
    ]
    assert revoke_paths(["a", "b"], "v", topic=False) == ["/permissions/v/a", "/permissions/v/b"]


class FakeAPI:
    """The management API calls DeviceLogins makes, against a set of users."""

    def __init__(self, users: set[str] | None = None) -> None:
        self.users = set(users or ())
        self.imports: list[dict[str, Any]] = []
        self.deletes: list[list[str]] = []
        self.revoked: list[list[str]] = []
        self.fail: Exception | None = None

    def user_names(self) -> list[str]:
        if self.fail is not None:
            raise self.fail
        return sorted(self.users | {"guest"})

    def import_definitions(self, doc: dict[str, Any]) -> None:
        self.imports.append(doc)
        self.users |= {u["name"] for u in doc.get("users", ())}

    def user_limits(self, name: str) -> dict[str, Any]:
        return {"max-connections": 1} if name in self.users else {}

    def delete_each(self, paths: list[str], threads: int) -> None:
        self.revoked.append(list(paths))

    def delete_users(self, names: list[str]) -> None:
        missing = set(names) - self.users
        assert not missing, f"bulk-delete of missing users fails: {missing}"
        self.deletes.append(names)
        self.users -= set(names)


def test_users_and_grants_go_in_chunks_and_the_figures_add_up() -> None:
    api = FakeAPI()
    names = [f"sim-{i:06d}" for i in range(12)]
    logins = DeviceLogins(api, names, new_secret(), chunk=5)  # type: ignore[arg-type]
    logins.create()
    assert [len(d["users"]) for d in api.imports] == [5, 5, 2]
    logins.grant("v-raw", "raw")
    logins.grant("v", "edgeward")
    grants = api.imports[3:]
    assert [len(d["permissions"]) for d in grants] == [5, 5, 2, 5, 5, 2]
    assert {p["vhost"] for d in grants[:3] for p in d["permissions"]} == {"v-raw"}
    f = logins.figures
    assert f["mode"] == "device" and f["users"] == 12 and f["existing_before"] == 0
    assert f["limit_applied"] is True
    assert set(f["grants_s"]) == {"raw", "edgeward"}
    assert f["setup_s"] == pytest.approx(f["users_s"] + sum(f["grants_s"].values()), abs=0.05)


def test_grants_are_revoked_once_per_vhost_granted_with_or_without_topic() -> None:
    api = FakeAPI()
    names = ["sim-000000", "sim-000001"]
    logins = DeviceLogins(api, names, new_secret())  # type: ignore[arg-type]
    logins.create()
    logins.grant("v-raw", "raw", topic=False)
    logins.grant("v", "edgeward")
    assert logins.revoke("elsewhere") == 0.0 and api.revoked == []
    logins.revoke("v-raw")
    logins.revoke("v")
    logins.revoke("v")  # once only
    assert api.revoked == [revoke_paths(names, "v-raw", topic=False), revoke_paths(names, "v")]
    assert set(logins.figures["revoke_s"]) == {"raw", "edgeward"} and logins.granted == {}


def test_removal_deletes_only_the_runs_users_that_exist() -> None:
    api = FakeAPI({"someone-else", "sim-000099"})
    names = [f"sim-{i:06d}" for i in range(7)]
    logins = DeviceLogins(api, names, new_secret(), chunk=3)  # type: ignore[arg-type]
    # a chunk made, then Ctrl-C: the rest were never made
    calls = iter([False, True])
    logins.stop = lambda: next(calls)
    with pytest.raises(Stopped):
        logins.create()
    assert api.users == {"someone-else", "sim-000099", "sim-000000", "sim-000001", "sim-000002"}
    assert remove_quietly(logins, 1.0, print) == ""
    assert api.users == {"someone-else", "sim-000099"}
    assert logins.figures["removed"] == 3 and logins.figures["left"] == 0


def test_users_left_from_an_earlier_run_are_counted_then_removed() -> None:
    api = FakeAPI({"sim-000001"})
    logins = DeviceLogins(api, ["sim-000000", "sim-000001"], new_secret())  # type: ignore[arg-type]
    logins.create()
    assert logins.figures["existing_before"] == 1
    logins.remove()
    assert api.users == set() and logins.figures["removed"] == 2


def test_nothing_is_removed_when_no_user_was_ever_sent() -> None:
    api = FakeAPI({"sim-000000"})
    logins = DeviceLogins(api, ["sim-000000"], new_secret())  # type: ignore[arg-type]
    assert logins.remove() == 0 and api.users == {"sim-000000"}


def test_a_removal_that_fails_is_said_not_raised() -> None:
    api = FakeAPI()
    logins = DeviceLogins(api, ["sim-000000"], new_secret())  # type: ignore[arg-type]
    logins.create()
    api.fail = BrokerUnreachable(["http://x"], "management API: refused")
    problem = remove_quietly(logins, 0.0, lambda line: None)
    assert problem.startswith("device users were not removed")


# -- how a run chooses (no broker) --------------------------------------------------


def runner(tmp_path: Path, share: int = 0, **scenario: Any) -> Runner:
    return Runner(
        replace(parse("devices = 10\nduration = 5\n"), **scenario),
        tmp_path,
        brokers=["amqp://guest:guest@127.0.0.1:5672/%2F"],
        share_connections=share,
    )


def test_a_run_gives_each_device_a_user_unless_told_or_connections_are_shared(
    tmp_path: Path,
) -> None:
    assert runner(tmp_path)._shared_login_reason() is None
    assert "--shared-login" in (runner(tmp_path, shared_login=True)._shared_login_reason() or "")
    shared = runner(tmp_path, share=5)._shared_login_reason() or ""
    assert shared.startswith("--share-connections 5")


def test_the_scenario_and_the_cli_can_ask_for_the_shared_login() -> None:
    assert parse("devices = 1\nduration = 1\n").shared_login is False
    assert parse("devices = 1\nduration = 1\nshared_login = true\n").shared_login is True
    from edgeward.actors.cli import build_parser

    args = build_parser().parse_args(["simulate", "x.toml", "--report", "r", "--shared-login"])
    assert args.shared_login is True


def test_a_shard_refuses_per_device_logins_on_shared_connections() -> None:
    loop = asyncio.new_event_loop()
    try:
        config = ShardConfig(
            first=0,
            labels=[{}] * 4,
            urls=["amqp://x/"],
            mode="raw",
            share=2,
            login_secret=new_secret(),
        )
        with pytest.raises(ValueError, match="connection per device"):
            Shard(config, loop)
    finally:
        loop.close()


def test_a_device_link_logs_in_as_its_device_with_the_derived_password() -> None:
    loop = asyncio.new_event_loop()
    try:
        secret = new_secret()
        config = ShardConfig(
            first=41,
            labels=[{}] * 2,
            urls=["amqp://guest:guest@127.0.0.1:1/%2F"],
            mode="edgeward",
            login_secret=secret,
            telemetry=True,
        )
        shard = Shard(config, loop)
        link = shard.links[1]
        assert isinstance(link, DeviceLink)
        credentials = link.login()
        assert credentials.username == "sim-000042"
        assert credentials.password == device_password(secret, "sim-000042")
        device = shard.devices[1]
        assert device.user_id == "sim-000042"  # type: ignore[union-attr]
        assert device.sender.user_id == "sim-000042"  # type: ignore[union-attr]
        # without a secret: the URLs' login, no user_id
        plain = Shard(replace(config, login_secret=b""), loop)
        assert type(plain.links[0]) is Link and plain.links[0].login() is None
        assert plain.devices[0].user_id is None  # type: ignore[union-attr]
    finally:
        loop.close()


# -- on the local broker -------------------------------------------------------------


def api() -> ManagementAPI:
    return ManagementAPI(MANAGEMENT_URL.rstrip("/") + "/api", "guest", "guest", timeout=30)


def connect(vhost: str, user: str, password: str) -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.URLParameters(amqp_url(vhost, user, password)))


def test_a_user_made_by_definitions_import_logs_in_as_a_device_and_is_removed(
    broker_url: str, vhost: str
) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(broker_url))
    topology.declare(conn.channel())
    conn.close()
    secret = new_secret()
    names = [f"edgeward-test-{secrets.token_hex(4)}-{i}" for i in range(3)]
    admin = api()
    logins = DeviceLogins(admin, names, secret, chunk=2)
    try:
        logins.create()
        logins.grant(vhost, "edgeward")
        name = names[1]
        # Then the user is as `enroll` makes it: the device grants, one connection, no tags
        assert admin.user_grants(vhost, name) == device_grants()
        user = admin.user(name)
        assert (
            user is not None
            and user["tags"] in ("", [])
            and (user["hashing_algorithm"] == HASHING_ALGORITHM)
        )
        # and it logs in with the password derived from the secret (the hash computed here)
        device = connect(vhost, name, device_password(secret, name))
        try:
            # publishing telemetry as itself, stamped with its login, is accepted
            channel = device.channel()
            channel.confirm_delivery()
            channel.basic_publish(
                topology.TELEMETRY_EXCHANGE,
                f"telemetry.{name}.alert",
                b"x",
                pika.BasicProperties(user_id=name),
            )
            # a second connection is refused: max-connections 1
            with pytest.raises(pika.exceptions.AMQPConnectionError):
                connect(vhost, name, device_password(secret, name))
        finally:
            device.close()
        # and no other password does
        with pytest.raises(pika.exceptions.AMQPConnectionError):
            connect(vhost, name, device_password(new_secret(), name))
        # When the grants are revoked (as before the run deletes its vhost)
        logins.revoke(vhost)
        # Then none is left, and a login is refused access to the vhost
        grants = admin.user_grants(vhost, name)
        assert grants["configure"] is None and grants["topic"] is None
        with pytest.raises(pika.exceptions.AMQPConnectionError):
            connect(vhost, name, device_password(secret, name))
    finally:
        logins.remove()
    assert logins.figures["removed"] == 3 and logins.figures["left"] == 0
    assert all(admin.user(n) is None for n in names)


def test_a_device_user_may_not_publish_as_another_device(broker_url: str, vhost: str) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(broker_url))
    topology.declare(conn.channel())
    conn.close()
    secret = new_secret()
    name = f"edgeward-test-{secrets.token_hex(4)}"
    logins = DeviceLogins(api(), [name], secret)
    try:
        logins.create()
        logins.grant(vhost, "edgeward")
        device = connect(vhost, name, device_password(secret, name))
        try:
            channel = device.channel()
            channel.confirm_delivery()
            # Then the broker refuses a publish under another device's key
            with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
                channel.basic_publish(
                    topology.TELEMETRY_EXCHANGE,
                    "telemetry.someone-else.alert",
                    b"x",
                    pika.BasicProperties(user_id=name),
                )
            assert info.value.reply_code == 403
            # and one claiming another login as user_id
            channel = device.channel()
            channel.confirm_delivery()
            with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
                channel.basic_publish(
                    topology.TELEMETRY_EXCHANGE,
                    f"telemetry.{name}.alert",
                    b"x",
                    pika.BasicProperties(user_id="someone-else"),
                )
            assert info.value.reply_code == 406
        finally:
            if device.is_open:
                device.close()
    finally:
        logins.remove()


def test_a_failed_run_still_removes_its_device_users_and_says_so(
    tmp_path: Path, broker_admin: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a run that cannot make its vhost, after its device users were made
    made: list[list[str]] = []

    def boom(self: Runner, urls: list[str], name: str) -> list[str]:
        assert self.logins is not None
        made.append(self.logins.existing())
        raise RuntimeError("no vhost today")

    monkeypatch.setattr(Runner, "_start_actors", lambda self: None)
    monkeypatch.setattr(Runner, "_vhost", boom)
    run = Runner(
        parse("devices = 3\nduration = 5\n"),
        tmp_path,
        brokers=["amqp://guest:guest@127.0.0.1:5672/%2F"],
        out=lambda line: None,
    )
    # When it runs, it fails
    with pytest.raises(RuntimeError, match="no vhost today"):
        run.execute()
    # Then its users existed, and are gone; the partial report says what happened
    assert made == [["sim-000000", "sim-000001", "sim-000002"]]
    users = {u["name"] for u in broker_admin.request("GET", "/users")}
    assert not users & {"sim-000000", "sim-000001", "sim-000002"}
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["completed"] is False
    assert report["logins"]["removed"] == 3 and report["logins"]["left"] == 0


class StoppedCluster:
    """Stands in for a LocalCluster at the end of a run: only stop() is asked."""

    def __init__(self) -> None:
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True


def test_a_throwaway_local_cluster_is_stopped_with_its_users_in_it(tmp_path: Path) -> None:
    api = FakeAPI()
    run = runner(tmp_path)
    logins = DeviceLogins(api, [f"sim-{i:06d}" for i in range(3)], new_secret())  # type: ignore[arg-type]
    logins.create()
    logins.grant("edgeward-sim-x", "edgeward")
    run.logins, run.api, run.vhosts = logins, api, ["edgeward-sim-x"]  # type: ignore[assignment]
    run.cluster = cluster = StoppedCluster()
    run.cleanup()
    assert cluster.stopped and run.cluster is None
    # no revocation, no user deleted: they go with the cluster, and the report says so
    assert api.revoked == [] and api.deletes == [] and api.users
    assert logins.figures["removed_with_cluster"] is True
    assert "thrown away" in _logins_figure(logins.figures)


def test_on_an_existing_broker_the_grants_are_revoked_and_the_users_removed(
    tmp_path: Path,
) -> None:
    api = FakeAPI()
    run = runner(tmp_path)
    logins = DeviceLogins(api, [f"sim-{i:06d}" for i in range(3)], new_secret())  # type: ignore[arg-type]
    logins.create()
    logins.grant("edgeward-sim-x", "edgeward")
    api.delete_vhost = lambda name: None  # type: ignore[attr-defined]
    run.logins, run.api, run.vhosts = logins, api, ["edgeward-sim-x"]  # type: ignore[assignment]
    run.cleanup()
    assert len(api.revoked) == 1 and not api.users
    assert logins.figures["removed"] == 3
    assert "removed after the run" in _logins_figure(logins.figures)
