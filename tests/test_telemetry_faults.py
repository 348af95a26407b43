"""Telemetry through faults, end to end (issue 4): several real agents judge
numbered events into their outboxes and drain them to RabbitMQ; the real
TelemetryCollector of an in-process control plane reads the stream into the
audit store.  Something breaks on the way, then comes back; at the end every
device's books must balance, read from the two ends of the path only:

* sent(d): the seqs its outbox gave (``next_seq - 1``, once it read all its events);
* stored(d): its seqs in the audit store;
* dropped(d): the counts of its latest stored ``dropped`` report (0 without one).

``len(stored(d)) + dropped(d) == sent(d)``, ``stored(d)`` within ``1..sent(d)``,
and no event line stored twice (a line re-numbered on a resend would be a
duplicate the store's ``(device, seq)`` key cannot see).

The faults: agents killed with SIGKILL while sending; the network to the
broker stalling, resetting and going away (tests/tcpproxy.py); a broker node
of the test's own restarting; the collector's reader killed with SIGKILL in
the middle of a batch; outboxes overflowing while offline.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
from collections import Counter
from collections.abc import Iterator
from contextlib import closing, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from brokerkit import free_port, wait_until
from tcpproxy import TcpProxy
from test_collector import running_control_plane
from test_telemetry_agent_e2e import (
    BLOCKED_DIR,
    Agent,
    alert_line,
    declare_and_publish_policy,
    log_line,
)
from thespian.actors import ActorSystem

from edgeward.actors.audit_store import AuditStore
from edgeward.actors.collector import audit_path
from edgeward.actors.runtime import ControlPlane
from edgeward.transport.signing import Signer

DEVICES = ("pos-0001", "pos-0002", "pos-0003")
FAST = {"collector_batch": 100, "collector_batch_ms": 100}  # the control plane's collector
# Agents come back within a second of their broker (the default spreads a
# fleet's reconnects over 10 s) and drain at most 300 records/s each.
AGENT = {"reconnect_spread_s": 1.0, "telemetry_rate": 300.0}


# -- the fleet ------------------------------------------------------------------------


class Fleet:
    """Agents, each its own device, config, cache and events file, and the
    event lines written for each (by kind: the resources they name)."""

    def __init__(self, root: Path, url: str, signer: Signer, **settings: Any) -> None:
        self.agents = [
            Agent(root / device, url, signer, device=device, **{**AGENT, **settings})
            for device in DEVICES
        ]
        self.written: dict[str, dict[str, list[str]]] = {
            device: {"alert": [], "log": []} for device in DEVICES
        }

    def start(self) -> None:
        for agent in self.agents:
            agent.start()
        for agent in self.agents:
            assert agent.proc is not None
            agent.proc.wait_for_line("in force: revision 1", timeout=60)

    def write(self, agent: Agent, lines: list[str]) -> None:
        for line in lines:
            path = json.loads(line)["path"]
            kind = "alert" if path.startswith(BLOCKED_DIR) else "log"
            self.written[agent.device][kind].append(path)
        agent.write(lines)

    def write_alerts(self, first: int, counts: tuple[int, ...]) -> None:
        """Agent i gets ``counts[i]`` alerts, numbered from ``first``."""
        for agent, count in zip(self.agents, counts, strict=True):
            self.write(agent, [alert_line(n) for n in range(first, first + count)])

    def read_everything(self, timeout: float = 60.0) -> None:
        wait_until(
            lambda: all(agent.read_to_end() for agent in self.agents),
            timeout=timeout,
            message="an agent did not read all its events",
        )

    def said(self, fragment: str) -> list[int]:
        """How many lines with ``fragment`` each agent said so far."""
        return [len(agent.proc.matching(fragment)) if agent.proc else 0 for agent in self.agents]

    def wait_said(self, fragment: str, before: list[int], timeout: float = 30.0) -> None:
        """Wait until every agent said ``fragment`` again since ``before`` (:meth:`said`)."""
        for agent, seen in zip(self.agents, before, strict=True):
            assert agent.proc is not None
            proc = agent.proc
            wait_until(
                lambda proc=proc, seen=seen: len(proc.matching(fragment)) > seen,
                timeout=timeout,
                message=f"{agent.device} did not say {fragment!r} again",
            )

    def kill(self) -> None:
        for agent in self.agents:
            agent.stop(signal.SIGKILL)


@pytest.fixture
def signer() -> Signer:
    return Signer.generate()


@pytest.fixture
def fleets() -> Iterator[list[Fleet]]:
    made: list[Fleet] = []
    yield made
    for fleet in made:
        fleet.kill()


@pytest.fixture
def planes() -> Iterator[list[ControlPlane]]:
    made: list[ControlPlane] = []
    yield made
    for plane in made:
        plane.stop()


# -- the books --------------------------------------------------------------------------


@dataclass
class Account:
    """One device's books: what its outbox numbered against what the store holds."""

    device: str
    read_all: bool  # the agent accepted every line of its events file
    sent: int  # seqs its outbox gave: 1..sent
    stored: set[int] = field(default_factory=set)
    dropped: dict[str, int] = field(default_factory=dict)  # its latest stored drop report
    lines: dict[str, Counter[str]] = field(default_factory=dict)  # kind -> resource -> times

    @property
    def dropped_reported(self) -> int:
        return sum(self.dropped.values())

    @property
    def balanced(self) -> bool:
        return (
            self.read_all
            and self.sent > 0
            and len(self.stored) + self.dropped_reported == self.sent
        )

    def __str__(self) -> str:
        return (
            f"{self.device}: sent {self.sent} = stored {len(self.stored)}"
            f" + dropped {self.dropped_reported} {self.dropped or ''}"
        )


def books(home: Path, fleet: Fleet) -> dict[str, Account]:
    """Every device's account, the store read before the outboxes: whatever
    is stored was numbered by then, so stored(d) cannot run ahead of sent(d)."""
    with closing(sqlite3.connect(audit_path(str(home)), timeout=10)) as db:
        rows = db.execute("SELECT device, seq, type, body FROM records ORDER BY seq").fetchall()
    accounts = {}
    for agent in fleet.agents:
        meta = agent.outbox()["meta"]
        accounts[agent.device] = Account(
            agent.device,
            read_all=agent.read_to_end(),
            sent=int(meta.get("next_seq", 1)) - 1,
            lines={"alert": Counter(), "log": Counter()},
        )
    for device, seq, kind, body in rows:
        account = accounts.get(device)
        if account is None:
            continue
        account.stored.add(seq)
        record = json.loads(body)
        if kind in account.lines:
            account.lines[kind][record["resource"]] += 1
        elif record.get("event") == "dropped":  # rows come by seq: the latest wins
            account.dropped = record["dropped"]
    return accounts


def balanced_books(home: Path, fleet: Fleet, timeout: float = 60.0) -> dict[str, Account]:
    """Wait until every device's books balance; return them (balanced or not
    at the deadline: the asserts that follow then say what is off)."""
    last: list[dict[str, Account]] = []

    def balanced() -> bool:
        last[:] = [books(home, fleet)]
        return all(account.balanced for account in last[0].values())

    with suppress(AssertionError):
        wait_until(balanced, timeout=timeout, interval=0.25)
    return last[0]


def assert_books_balance(
    home: Path,
    fleet: Fleet,
    accounts: dict[str, Account],
    dropped_types: frozenset[str] = frozenset(),
) -> None:
    """Per device and in total: sent = stored + dropped reported; nothing
    stored outside 1..sent; no event line stored twice; every alert stored;
    drops only of ``dropped_types``."""
    for device, account in accounts.items():
        print(account)
        written = fleet.written[device]
        assert account.read_all, f"{device} did not read all its events"
        assert account.stored <= set(range(1, account.sent + 1)), f"{device}: unknown seqs stored"
        assert len(account.stored) + account.dropped_reported == account.sent, str(account)
        twice = {r: n for kind in account.lines.values() for r, n in kind.items() if n > 1}
        assert not twice, f"{device}: lines stored more than once: {twice}"
        assert sorted(account.lines["alert"]) == sorted(written["alert"]), f"{device}: alerts"
        assert set(account.dropped) <= dropped_types, f"{device} dropped {account.dropped}"
        stored_logs = set(account.lines["log"])
        assert stored_logs <= set(written["log"])
        assert len(written["log"]) - len(stored_logs) == account.dropped.get("log", 0)
    sent = sum(a.sent for a in accounts.values())
    stored = sum(len(a.stored) for a in accounts.values())
    dropped = sum(a.dropped_reported for a in accounts.values())
    print(f"in total: sent {sent} = stored {stored} + dropped {dropped}")
    assert sent == stored + dropped
    with closing(AuditStore(audit_path(str(home)))) as store:
        keys = store.keys()
        assert len(keys) == len(set(keys)) == store.count() == stored


def plane_for(home: Path, url: str, planes: list[ControlPlane], **settings: Any) -> ControlPlane:
    """A control plane, stopped after the test; one that never got ready is
    shut down at once (its actor processes would outlive the test run)."""
    try:
        plane = running_control_plane(home, url, **{**FAST, **settings})
    except BaseException:
        if getattr(ActorSystem, "systemBase", None) is not None:  # the process's one system
            ActorSystem().shutdown()
        raise
    planes.append(plane)
    return plane


# == the tests ===============================================================================


def test_agents_killed_while_sending_lose_and_repeat_nothing_after_restart(
    tmp_path: Path, broker_url: str, signer: Signer, fleets: list[Fleet], planes: list[ControlPlane]
) -> None:
    # Given a control plane collecting telemetry, and three agents in force
    declare_and_publish_policy(broker_url, signer)
    home = tmp_path / "control"
    plane = plane_for(home, broker_url, planes)
    fleet = Fleet(tmp_path, broker_url, signer)
    fleets.append(fleet)
    fleet.start()
    # When each has 400-600 alerts to send and is killed with SIGKILL once
    # 100 of them are confirmed
    fleet.write_alerts(0, (400, 500, 600))
    for agent in fleet.agents:
        wait_until(
            lambda agent=agent: (
                agent.read_to_end()
                and (box := agent.outbox())["meta"]["next_seq"] - 1 - box["waiting"] >= 100
            ),
            timeout=30,
            message=f"{agent.device} sent nothing",
        )
        agent.stop(signal.SIGKILL)
        held = agent.outbox()["waiting"]
        assert held > 0, f"{agent.device} sent everything before the kill: nothing proved"
    # ...and more events come while they are down
    fleet.write_alerts(1000, (100, 100, 100))
    # Then, restarted, they send what they held and what came: the books balance
    for agent in fleet.agents:
        agent.start()
    accounts = balanced_books(home, fleet)
    assert_books_balance(home, fleet, accounts)
    print(f"collector duplicates: {plane.collector_status()['duplicates']}")


def test_records_of_agents_behind_a_network_that_stalls_resets_and_goes_away_are_stored_once(
    tmp_path: Path, broker_url: str, signer: Signer, fleets: list[Fleet], planes: list[ControlPlane]
) -> None:
    # Given a control plane collecting telemetry, and three agents that reach
    # the broker through a proxy we control
    declare_and_publish_policy(broker_url, signer)
    home = tmp_path / "control"
    plane = plane_for(home, broker_url, planes)
    port = free_port()
    proxy = TcpProxy(port, ("127.0.0.1", 5672)).start()
    fleet = Fleet(tmp_path, broker_url.replace(":5672/", f":{port}/"), signer)
    fleets.append(fleet)
    try:
        fleet.start()
        fleet.write_alerts(0, (200, 250, 300))
        wait_until(
            lambda: plane.collector_status()["stored"] >= 150, timeout=30, message="none stored"
        )
        # When the network stalls (connections open, nothing through) while more comes
        proxy.stall()
        fleet.write_alerts(1000, (200, 250, 300))
        fleet.read_everything()
        # ...then resets every connection...
        lost, connected = fleet.said("connection lost"), fleet.said("connected to")
        proxy.resume()
        proxy.reset()
        fleet.wait_said("connection lost", lost)
        fleet.wait_said("connected to", connected)
        # ...then goes away altogether while still more comes
        lost = fleet.said("connection lost")
        proxy.cut()
        fleet.write_alerts(2000, (200, 250, 300))
        fleet.wait_said("connection lost", lost)
        fleet.read_everything()
        # ...and comes back
        proxy.start()
        # Then every device's books balance, with nothing dropped
        accounts = balanced_books(home, fleet)
        assert_books_balance(home, fleet, accounts)
        print(f"collector duplicates: {plane.collector_status()['duplicates']}")
    finally:
        proxy.stop()


def test_records_of_agents_sending_through_a_broker_node_restart_are_stored_once(
    tmp_path: Path, signer: Signer, fleets: list[Fleet], planes: list[ControlPlane]
) -> None:
    from edgeward.simulator.cluster import LocalCluster

    # Given a RabbitMQ node of the test's own, a control plane collecting
    # from it, and three agents sending to it
    # (named for this run: test runs at once must not share an Erlang node name)
    cluster = LocalCluster(1, tmp_path / "cluster", name_prefix=f"edgewardfault{os.getpid()}")
    cluster.start(progress=lambda line: None)
    try:
        url = cluster.amqp_urls[0]
        declare_and_publish_policy(url, signer)
        home = tmp_path / "control"
        plane = plane_for(home, url, planes)
        fleet = Fleet(tmp_path, url, signer, telemetry_rate=200.0)
        fleets.append(fleet)
        fleet.start()
        fleet.write_alerts(0, (300, 400, 500))
        wait_until(
            lambda: plane.collector_status()["stored"] >= 150, timeout=30, message="none stored"
        )
        # When the node stops while they are sending, and more comes while it is down
        lost = fleet.said("connection lost")
        cluster.stop_node(1)
        fleet.write_alerts(1000, (100, 150, 200))
        wait_until(
            lambda: not plane.collector_status()["connected"],
            timeout=30,
            message="the collector never noticed the node was gone",
        )
        fleet.wait_said("connection lost", lost)
        fleet.read_everything()
        # ...and starts again
        cluster.start_node(1)
        # Then the collector reconnects by itself (its reader is the same one)...
        status = wait_until(
            lambda: (s := plane.collector_status())["connected"] and s,
            timeout=60,
            message="the collector never reconnected",
        )
        assert status["restarts"] == 0
        # ...and every device's books balance, with nothing dropped
        accounts = balanced_books(home, fleet, timeout=90)
        assert_books_balance(home, fleet, accounts)
        print(f"collector duplicates: {plane.collector_status()['duplicates']}")
    finally:
        for fleet in fleets:
            fleet.kill()
        for plane in planes:
            plane.stop()
        # (the node is thrown away: no need to wait for a graceful stop)
        pid = cluster.pid(1)
        if pid is not None:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            wait_until(lambda: not cluster.is_running(1), timeout=10)
        cluster.stop()


def test_a_collector_killed_in_the_middle_of_a_batch_of_agents_records_stores_each_once(
    tmp_path: Path, broker_url: str, signer: Signer, fleets: list[Fleet], planes: list[ControlPlane]
) -> None:
    # Given a control plane whose collector commits every 3 s (and never by count)
    declare_and_publish_policy(broker_url, signer)
    home = tmp_path / "control"
    plane = plane_for(home, broker_url, planes, collector_batch=100_000, collector_batch_ms=3000)
    # and three agents in force sending 500-700 alerts each
    fleet = Fleet(tmp_path, broker_url, signer, telemetry_rate=200.0)
    fleets.append(fleet)
    fleet.start()
    fleet.write_alerts(0, (500, 600, 700))
    # When, a commit done, the collector's reader holds a new batch of theirs...
    state = wait_until(
        lambda: (
            (r := plane.collector_status()["reader"])
            and r["committed"] is not None
            and r["pending"] >= 50
            and r
        ),
        timeout=60,
        message="the collector never held a batch after a commit",
    )
    # ...and is killed with SIGKILL
    os.kill(state["pid"], signal.SIGKILL)
    with closing(AuditStore(audit_path(str(home)))) as store:
        assert store.offset() == state["committed"] < state["received"], (
            "the batch was committed before the kill: nothing proved"
        )
    # Then a new reader starts from the stored offset, not from what was received...
    restarted = wait_until(
        lambda: (
            (s := plane.collector_status())["restarts"] == 1
            and s["reader"]
            and s["reader"]["connected"]
            and s
        ),
        timeout=60,
        message="the reader was not restarted",
    )
    assert restarted["reader"]["pid"] != state["pid"]
    assert restarted["reader"]["resumed_from"] == state["committed"]
    # ...and every device's books balance, with nothing dropped
    accounts = balanced_books(home, fleet)
    assert_books_balance(home, fleet, accounts)
    print(f"collector duplicates: {plane.collector_status()['duplicates']}")


def test_full_outboxes_offline_drop_only_logs_and_exactly_what_they_report(
    tmp_path: Path, broker_url: str, signer: Signer, fleets: list[Fleet], planes: list[ControlPlane]
) -> None:
    # Given a control plane collecting telemetry, and three agents with room
    # for 40 records each, which log allowed events too, reaching the broker
    # through a proxy we control
    declare_and_publish_policy(broker_url, signer)
    home = tmp_path / "control"
    plane_for(home, broker_url, planes)
    port = free_port()
    proxy = TcpProxy(port, ("127.0.0.1", 5672)).start()
    fleet = Fleet(
        tmp_path,
        broker_url.replace(":5672/", f":{port}/"),
        signer,
        outbox_max_records=40,
        log_allowed_events=True,
    )
    fleets.append(fleet)
    try:
        fleet.start()
        for agent in fleet.agents:
            wait_until(lambda agent=agent: agent.outbox()["waiting"] == 0, timeout=30)
        # When they are offline while 90 events come to each: 30, 20 and 39
        # alerts among logs (39 fill all the room there is but the report's)
        lost = fleet.said("connection lost")
        proxy.cut()
        fleet.wait_said("connection lost", lost)
        for agent, alerts in zip(fleet.agents, (30, 20, 39), strict=True):
            blocked = set(random.Random(alerts).sample(range(90), alerts))
            fleet.write(agent, [alert_line(n) if n in blocked else log_line(n) for n in range(90)])
        fleet.read_everything()
        # Then each kept 40 and dropped 50 logs, no alert
        for agent in fleet.agents:
            assert agent.proc is not None
            kept_dropped = (agent.outbox()["waiting"], agent.dropped())
            assert kept_dropped == (40, {"log": 50}), f"{kept_dropped}:\n{agent.proc.output}"
        # When the network comes back
        proxy.start()
        # Then every device's books balance: the records missing are exactly
        # the drops it reported, all logs (the report made room for itself)
        accounts = balanced_books(home, fleet)
        assert_books_balance(home, fleet, accounts, dropped_types=frozenset({"log"}))
        for agent in fleet.agents:
            assert accounts[agent.device].dropped == agent.dropped() == {"log": 51}
        # And every alert was kept while a log could go instead: with 39
        # alerts, every log went and no alert
        assert not accounts["pos-0003"].lines["log"]
    finally:
        proxy.stop()
