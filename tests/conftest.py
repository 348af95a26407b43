"""Fixtures for tests that need the local RabbitMQ.

Each such test gets a vhost of its own, made and deleted over the management
API, so tests cannot see each other's queues, streams or connections:

    def test_something(broker_url: str) -> None:
        conn = pika.BlockingConnection(pika.URLParameters(broker_url))
        ...

Tests that use ``vhost``, ``broker_url`` or ``broker_admin`` are marked
``broker`` automatically (deselect them with ``-m "not broker"``).
"""

from __future__ import annotations

import secrets
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# tests/ has no __init__.py; make its helper modules importable whatever
# import mode pytest runs in (the default "prepend" already does this).
_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from brokerkit import (  # noqa: E402
    MANAGEMENT_URL,
    BrokerAdmin,
    BrokerAdminError,
    amqp_url,
    free_port,
)

BROKER_FIXTURES = frozenset({"vhost", "broker_url", "broker_admin"})


@pytest.hookimpl(tryfirst=True)  # before "-m" deselection looks at the markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if BROKER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.broker)


@pytest.fixture(scope="session")
def broker_admin() -> BrokerAdmin:
    """The management API client (guest/guest on 127.0.0.1:15672).

    Ends the whole session at once if the API does not answer: every broker
    test would fail the same way.
    """
    admin = BrokerAdmin()
    try:
        admin.overview()
    except BrokerAdminError as exc:
        pytest.exit(
            f"RabbitMQ management API at {MANAGEMENT_URL} does not answer ({exc}); "
            "run `make broker` (scripts/ensure-broker) first",
            returncode=pytest.ExitCode.TESTS_FAILED,
        )
    return admin


@pytest.fixture
def vhost(broker_admin: BrokerAdmin) -> Iterator[str]:
    """A fresh vhost ``edgeward-test-<hex>`` where guest may do anything.

    Afterwards (pass or fail) the users whose only permissions are on it
    (device users ``edgeward enroll`` made) are deleted, its connections are
    closed, and it is deleted. (Users are global in RabbitMQ: two test runs
    at once on one broker must not enrol the same device names.)
    """
    name = f"edgeward-test-{secrets.token_hex(6)}"
    broker_admin.create_vhost(name)
    try:
        broker_admin.set_permissions(name, "guest", ".*", ".*", ".*")
        yield name
    finally:
        try:
            broker_admin.delete_users_of(name)  # device users `edgeward enroll` made
            broker_admin.close_connections(name)
        finally:
            broker_admin.delete_vhost(name)


@pytest.fixture
def broker_url(vhost: str) -> str:
    """``amqp://guest:guest@127.0.0.1:5672/<url-encoded vhost>`` for this test's vhost."""
    return amqp_url(vhost)


@pytest.fixture
def free_port_factory() -> Callable[[], int]:
    """Call it for a free TCP port on 127.0.0.1; never the same one twice per test."""
    given: set[int] = set()

    def factory() -> int:
        for _ in range(100):
            port = free_port()
            if port not in given:
                given.add(port)
                return port
        raise RuntimeError("no fresh free port found")

    return factory
