"""The test helpers themselves: per-test vhosts, wait_until, free ports."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import pika
import pytest
from brokerkit import BrokerAdmin, free_port, wait_until

pytest_plugins = ["pytester"]

TESTS_DIR = Path(__file__).resolve().parent

INNER_TESTS = """
from pathlib import Path

SEEN = Path(__file__).with_name("seen.txt")


def record(name):
    with SEEN.open("a") as f:
        f.write(name + "\\n")


def test_vhost_exists(vhost, broker_admin):
    record(vhost)
    assert broker_admin.vhost_info(vhost) is not None


def test_fails_but_vhost_still_goes(broker_url, vhost):
    record(vhost)
    assert broker_url.endswith("/" + vhost)
    raise AssertionError("deliberate failure")


def test_needs_no_broker():
    pass
"""


# -- wait_until ----------------------------------------------------------------


def test_wait_until_returns_the_first_truthy_value() -> None:
    calls = iter([None, 0, [], "", "done"])
    assert wait_until(lambda: next(calls), timeout=5, interval=0.001) == "done"


def test_wait_until_raises_with_message_and_last_value() -> None:
    values = iter(range(-1000, 0))

    def never() -> list[int]:
        next(values)
        return []

    with pytest.raises(AssertionError) as info:
        wait_until(never, timeout=0.2, interval=0.01, message="queue never filled")
    text = str(info.value)
    assert "queue never filled" in text
    assert "last value: []" in text


def test_wait_until_lets_predicate_errors_through() -> None:
    def boom() -> bool:
        raise ValueError("predicate broke")

    with pytest.raises(ValueError, match="predicate broke"):
        wait_until(boom, timeout=5)


# -- ports ---------------------------------------------------------------------


def test_free_port_can_be_bound() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_free_port_factory_gives_distinct_ports(free_port_factory: Callable[[], int]) -> None:
    ports = [free_port_factory() for _ in range(5)]
    assert len(set(ports)) == 5
    assert all(0 < p < 65536 for p in ports)


# -- per-test vhost ------------------------------------------------------------


def test_vhost_is_fresh_and_guest_may_use_it(vhost: str, broker_admin: BrokerAdmin) -> None:
    assert vhost.startswith("edgeward-test-")
    assert vhost in broker_admin.list_vhosts()
    perms = broker_admin.request("GET", f"/permissions/{vhost}/guest")
    assert (perms["configure"], perms["write"], perms["read"]) == (".*", ".*", ".*")
    assert broker_admin.list_connections(vhost) == []


def test_vhost_exists_during_test_and_is_gone_after(
    pytester: pytest.Pytester, broker_admin: BrokerAdmin
) -> None:
    """Run a nested session with these fixtures; its vhosts must be deleted
    afterwards, also for the test that failed."""
    pytester.makeini("[pytest]\nmarkers =\n    broker: needs the local RabbitMQ\n")
    pytester.makeconftest((TESTS_DIR / "conftest.py").read_text())
    pytester.makepyfile(brokerkit=(TESTS_DIR / "brokerkit.py").read_text())
    pytester.makepyfile(test_inner=INNER_TESTS)

    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=1)

    seen = (pytester.path / "seen.txt").read_text().split()
    assert len(seen) == 2 and len(set(seen)) == 2
    for name in seen:
        assert name.startswith("edgeward-test-")
        assert broker_admin.vhost_info(name) is None, f"vhost {name} was not deleted"

    # Both broker tests carry the "broker" marker; the third does not.
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-m", "not broker")
    result.assert_outcomes(passed=1, deselected=2)


def test_pika_can_declare_a_queue_in_the_vhost(
    broker_url: str, vhost: str, broker_admin: BrokerAdmin
) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        channel = conn.channel()
        channel.queue_declare("edgeward.brokerkit", durable=True)
        channel.basic_publish("", "edgeward.brokerkit", b"hello")

        info = broker_admin.queue_info(vhost, "edgeward.brokerkit")
        assert info is not None and info["vhost"] == vhost and info["durable"] is True
        assert broker_admin.queue_info(vhost, "no-such-queue") is None

        method, _, body = channel.basic_get("edgeward.brokerkit", auto_ack=True)
        assert method is not None and body == b"hello"

        wait_until(
            lambda: broker_admin.list_connections(vhost),
            timeout=10,
            message="management API never listed the pika connection",
        )
        assert broker_admin.close_connections(vhost) == 1

        def closed_by_broker() -> bool:
            # A blocking connection only reads (and answers close) when asked to.
            try:
                conn.process_data_events(0)
            except pika.exceptions.ConnectionClosedByBroker as exc:
                return exc.reply_code == 320  # CONNECTION_FORCED
            return False

        wait_until(closed_by_broker, timeout=10, message="close_connections did not close it")
        wait_until(
            lambda: not broker_admin.list_connections(vhost),
            timeout=10,
            message="connection still listed after close_connections",
        )
    finally:
        if conn.is_open:
            conn.close()
