"""Telemetry, the agent's half, end to end: the real agent (`edgeward agent
run --events-from`) judges events with the builtin backend, keeps the alerts
in its outbox and drains it to the real broker; each test reads back the
``edgeward.telemetry`` stream of its own vhost.

No control plane runs here: the test declares the topology, signs a bundle
itself and reads the stream and the heartbeat queue directly, so what is
checked is exactly what the agent put on the wire.  (Agents killed, networks
cut and broker nodes restarted, with records followed into the collector's
audit store: test_telemetry_faults.py, which uses the helpers here.)
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pika
import pytest
from brokerkit import free_port, wait_until
from fleetkit import CLI, Proc
from tcpproxy import TcpProxy

from edgeward.actors.bench import memory_kib
from edgeward.enforcement.digest import state_digest
from edgeward.transport import topology
from edgeward.transport.signing import Signer
from edgeward.transport.wire import Bundle, Heartbeat, Record, decode

DEVICE = "pos-0001"
PSS_BUDGET_MIB = 96  # DESIGN.md: the agent's whole process tree
BLOCKED_DIR = "/opt/pos/tools/"


def block_tools_policy() -> dict[str, Any]:
    return {
        "apiVersion": "security.kubearmor.com/v1",
        "kind": "KubeArmorHostPolicy",
        "metadata": {"name": "block-tools"},
        "spec": {
            "nodeSelector": {"matchLabels": {"store": "berlin"}},
            "process": {"matchDirectories": [{"dir": BLOCKED_DIR, "recursive": True}]},
            "action": "Block",
            "severity": 7,
            "tags": ["PCI"],
        },
    }


def alert_line(n: int) -> str:
    """An event the policy blocks: an alert, named by ``n``."""
    return json.dumps({"op": "exec", "path": f"{BLOCKED_DIR}tool-{n}", "source": "/bin/sh"})


def log_line(n: int) -> str:
    """An event nothing forbids: a log when ``log_allowed_events`` is on."""
    return json.dumps({"op": "exec", "path": f"/usr/bin/ok-{n}", "source": "/bin/sh"})


# -- the broker side ----------------------------------------------------------------


def declare_and_publish_policy(url: str, signer: Signer) -> None:
    """The topology, and revision 1 (a snapshot with the one policy) on the policy stream."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = conn.channel()
        topology.declare(channel)
        channel.confirm_delivery()
        doc = block_tools_policy()
        bundle = Bundle(
            revision=1, issued_at=0.0, mode="snapshot", policies=(doc,), sha256=state_digest([doc])
        )
        channel.basic_publish(
            topology.POLICY_EXCHANGE, "", signer.sign(bundle).encode(), topology.policy_properties()
        )
    finally:
        conn.close()


class StreamReader:
    """Reads the telemetry stream from its start and keeps what it read."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.records: list[Record] = []
        self.deliveries: list[tuple[Any, Any]] = []  # (method, properties), in order
        self.conn: Any = None

    def _connect(self) -> None:
        self.conn = pika.BlockingConnection(pika.URLParameters(self.url))
        channel = self.conn.channel()
        channel.basic_qos(prefetch_count=1000)
        offset = len(self.records)  # stream offsets count from 0 here: one test, one stream
        channel.basic_consume(
            topology.TELEMETRY_STREAM, self._on_message, arguments={"x-stream-offset": offset}
        )

    def _on_message(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        self.records.append(Record.from_message(decode(body)))
        self.deliveries.append((method, properties))
        channel.basic_ack(method.delivery_tag)

    def poll(self) -> list[Record]:
        try:
            if self.conn is None or not self.conn.is_open:
                self._connect()
            self.conn.process_data_events(time_limit=0.2)
        except pika.exceptions.AMQPError:
            self.conn = None  # the node is restarting: read on later
        return self.records

    def seqs(self) -> set[int]:
        return {r.seq for r in self.records if r.device == DEVICE}

    def close(self) -> None:
        # pika rejects deliveries still buffered when it closes, and a stream
        # answers a reject by closing the connection (540): expected here.
        if self.conn is not None and self.conn.is_open:
            try:
                self.conn.close()
            except pika.exceptions.AMQPError:
                pass


def last_heartbeat(url: str) -> Heartbeat | None:
    """The newest heartbeat of ours waiting in the heartbeat queue (the queue is emptied)."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    newest = None
    try:
        channel = conn.channel()
        while True:
            method, _props, body = channel.basic_get(topology.HEARTBEAT_QUEUE, auto_ack=True)
            if method is None:
                return newest
            newest = Heartbeat.from_message(decode(body))
    finally:
        conn.close()


# -- the agent ---------------------------------------------------------------------------


class Agent:
    """One device agent process with its config, cache and events file."""

    def __init__(
        self, home: Path, url: str, signer: Signer, device: str = DEVICE, **settings: Any
    ) -> None:
        self.home = home
        self.device = device
        home.mkdir(parents=True, exist_ok=True)
        self.cache_dir = home / "cache"
        self.events = home / "events.jsonl"
        self.events.touch()
        self.config = home / f"{device}.json"
        config = {
            "device": device,
            "labels": {"store": "berlin"},
            "broker_url": url,
            "cache_dir": str(self.cache_dir),
            "trusted_keys": {signer.key_id: signer.public_b64},
            "heartbeat_interval": 1.0,
            "telemetry_drain_jitter_s": 0.2,
            **settings,
        }
        self.config.write_text(json.dumps(config))
        self.proc: Proc | None = None

    def start(self) -> Proc:
        self.proc = Proc(
            [*CLI, "agent", "run", "--config", str(self.config), "--events-from", str(self.events)],
            {"PYTHONUNBUFFERED": "1", **_env()},
            self.device,
        )
        return self.proc

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            self.proc.stop(sig)

    def write(self, lines: list[str]) -> None:
        with self.events.open("a") as fh:
            fh.write("".join(line + "\n" for line in lines))

    def outbox(self) -> dict[str, Any]:
        """What the outbox file holds now: records waiting, meta keys."""
        path = self.cache_dir / "outbox.sqlite"
        try:
            with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
                waiting = db.execute("SELECT count(*) FROM records").fetchone()[0]
                meta = dict(db.execute("SELECT key, value FROM meta"))
        except sqlite3.OperationalError:  # not made yet
            return {"waiting": 0, "meta": {}}
        return {"waiting": waiting, "meta": meta}

    def read_to_end(self) -> bool:
        """The agent accepted every line of its events file."""
        position = str(self.outbox()["meta"].get("source:events", ""))
        return position.endswith(f":{self.events.stat().st_size}")

    def dropped(self) -> dict[str, int]:
        meta = self.outbox()["meta"]
        return {k[8:]: v for k, v in meta.items() if k.startswith("dropped:")}


def _env() -> dict[str, str]:
    return dict(os.environ)


@pytest.fixture
def signer() -> Signer:
    return Signer.generate()


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    made: list[Agent] = []
    yield made
    for agent in made:
        agent.stop(signal.SIGKILL)


def alerts_by_tool(records: list[Record]) -> dict[str, list[int]]:
    """Seqs of the alerts on the stream, by the tool each names."""
    found: dict[str, list[int]] = {}
    for r in records:
        if r.type == "alert":
            found.setdefault(r.body["resource"], []).append(r.seq)
    return found


def assert_every_accepted_record_arrived(
    reader: StreamReader, agent: Agent, alerts: int
) -> list[Record]:
    """Wait until the stream covers seqs 1..N (N: the last the outbox gave) and
    holds every alert line once (by seq; copies of a seq are allowed)."""

    def covered() -> bool:
        records = reader.poll()
        meta = agent.outbox()["meta"]
        last = int(meta.get("next_seq", 1)) - 1
        return (
            agent.read_to_end()
            and last > 0
            and reader.seqs() >= set(range(1, last + 1))
            and len(alerts_by_tool(records)) == alerts
        )

    wait_until(covered, timeout=120, interval=0.2, message="not every record reached the stream")
    by_tool = alerts_by_tool(reader.records)
    assert all(len(set(seqs)) == 1 for seqs in by_tool.values()), "a line became two records"
    return reader.records


# == the tests ===============================================================================


def test_records_go_out_numbered_with_message_id_content_type_and_routing_key(
    tmp_path: Path, broker_url: str, signer: Signer, agents: list[Agent]
) -> None:
    # Given an agent in force with a policy that blocks the tools directory
    declare_and_publish_policy(broker_url, signer)
    agent = Agent(tmp_path, broker_url, signer)
    agents.append(agent)
    proc = agent.start()
    proc.wait_for_line("in force: revision 1")
    agent.write([alert_line(0), "not json", json.dumps({"op": "fly"})])
    # When it judged its events (one blocked, two unreadable)
    reader = StreamReader(broker_url)
    records = assert_every_accepted_record_arrived(reader, agent, alerts=1)
    # Then the stream holds the revision it applied, the alert, and the bad lines counted
    by_event = {r.body.get("event"): r for r in records if r.type == "event"}
    assert by_event["revision_applied"].body["revision"] == 1
    assert by_event["bad_events"].body["count"] == 2
    (alert,) = [r for r in records if r.type == "alert"]
    assert alert.body == {
        "policy": "block-tools",
        "action": "Block",
        "severity": 7,
        "operation": "Process",
        "resource": f"{BLOCKED_DIR}tool-0",
        "source": "/bin/sh",
        "tags": ["PCI"],
        "message": None,
        "revision": 1,
        "rule": "spec.process.matchDirectories[0]",
    }
    # And each went out with its id, content type, persistence and routing key
    for record, (method, props) in zip(reader.records, reader.deliveries, strict=True):
        assert props.message_id == f"{DEVICE}:{record.seq}"
        assert props.content_type == "application/cbor" and props.delivery_mode == 2
        assert method.routing_key == f"telemetry.{DEVICE}.{record.type}"
    assert sorted(reader.seqs()) == list(range(1, len(reader.seqs()) + 1))
    # And the agent keeps running, its outbox emptied by the confirms
    wait_until(lambda: agent.outbox()["waiting"] == 0, timeout=20)
    assert proc.popen.poll() is None
    reader.close()


def test_events_written_to_a_named_pipe_by_writers_that_come_and_go_become_alerts(
    tmp_path: Path, broker_url: str, signer: Signer, agents: list[Agent]
) -> None:
    # Given an agent in force that reads its events from a named pipe
    declare_and_publish_policy(broker_url, signer)
    agent = Agent(tmp_path, broker_url, signer)
    agent.events.unlink()
    os.mkfifo(agent.events)
    agents.append(agent)
    proc = agent.start()
    proc.wait_for_line("in force: revision 1")
    reader = StreamReader(broker_url)
    # When one writer writes two events and goes, then another writes one more
    for lines in ([alert_line(0), alert_line(1)], [alert_line(2)]):
        with agent.events.open("w") as pipe:
            pipe.write("".join(line + "\n" for line in lines))
    # Then all three become alerts on the stream, once each
    wait_until(
        lambda: len(alerts_by_tool(reader.poll())) == 3, timeout=30, message="alerts missing"
    )
    assert all(len(seqs) == 1 for seqs in alerts_by_tool(reader.records).values())
    assert proc.popen.poll() is None
    reader.close()


def test_a_full_outbox_offline_drops_exactly_what_it_reports_and_logs_before_alerts(
    tmp_path: Path, broker_url: str, signer: Signer, agents: list[Agent]
) -> None:
    # Given an agent with room for 40 records, which logs allowed events too, in force
    declare_and_publish_policy(broker_url, signer)
    port = free_port()
    proxy = TcpProxy(port, ("127.0.0.1", 5672)).start()
    agent = Agent(
        tmp_path,
        broker_url.replace(":5672/", f":{port}/"),
        signer,
        outbox_max_records=40,
        log_allowed_events=True,
    )
    agents.append(agent)
    proc = agent.start()
    reader = StreamReader(broker_url)
    try:
        wait_until(lambda: reader.poll(), timeout=30, message="revision_applied never sent")
        wait_until(lambda: agent.outbox()["waiting"] == 0, timeout=30)
        # When it is offline while 30 alerts and 60 logs come, interleaved
        proxy.cut()
        wait_until(lambda: proc.matching("connection lost"), timeout=30)
        lines = []
        for n in range(90):
            lines.append(alert_line(n) if n % 3 == 0 else log_line(n))
        agent.write(lines)
        wait_until(agent.read_to_end, timeout=30, message="agent did not read its events")
        # Then it kept 40 and dropped only logs
        assert agent.outbox()["waiting"] == 40
        assert agent.dropped() == {"log": 50}
        # When the network comes back
        proxy.start()

        # Then every alert arrives; the logs missing are exactly the reported drops
        def settled() -> bool:
            records = reader.poll()
            dropped = [r for r in records if r.body.get("event") == "dropped"]
            return bool(dropped) and agent.outbox()["waiting"] == 0 and len(records) > 40

        wait_until(settled, timeout=60, message="the outbox never drained")
        records = reader.records
        (report,) = [r for r in records if r.body.get("event") == "dropped"]
        reported = report.body["dropped"]
        last = max(reader.seqs())
        missing = set(range(1, last + 1)) - reader.seqs()
        assert len(missing) == sum(reported.values())
        assert reported == agent.dropped() == {"log": 51}  # the report made room for itself
        assert len(alerts_by_tool(records)) == 30
        logs = [r.body["resource"] for r in records if r.type == "log"]
        # (the oldest logs went: the 9 kept are the newest)
        assert logs == [f"/usr/bin/ok-{n}" for n in range(90) if n % 3][-len(logs) :]
        # And the heartbeats say the same
        wait_until(
            lambda: (hb := last_heartbeat(broker_url)) is not None and hb.dropped == reported,
            timeout=20,
            message="heartbeats never reported the drops",
        )
    finally:
        reader.close()
        proxy.stop()


def test_the_agent_with_a_full_outbox_stays_within_the_memory_budget(
    tmp_path: Path, broker_url: str, signer: Signer, agents: list[Agent]
) -> None:
    # Given an agent in force, then cut off the broker
    declare_and_publish_policy(broker_url, signer)
    port = free_port()
    proxy = TcpProxy(port, ("127.0.0.1", 5672)).start()
    agent = Agent(tmp_path, broker_url.replace(":5672/", f":{port}/"), signer)
    agents.append(agent)
    proc = agent.start()
    try:
        proc.wait_for_line("in force: revision 1")
        wait_until(lambda: "next_seq" in agent.outbox()["meta"], timeout=30)
        wait_until(lambda: agent.outbox()["waiting"] == 0, timeout=30)
        proxy.cut()
        wait_until(lambda: proc.matching("connection lost"), timeout=30)
        # When more alerts come than its outbox holds (default bound: 10,000 records)
        agent.write([alert_line(n) for n in range(12_000)])
        wait_until(agent.read_to_end, timeout=120, message="agent did not read its events")
        assert agent.outbox()["waiting"] == 10_000 and agent.dropped() == {"alert": 2000}
        # Then its whole process tree's PSS is within the design's budget
        memory = memory_kib(proc.popen.pid)
        pss, rss = memory["Pss"] / 1024, memory["Rss"] / 1024
        files = agent.cache_dir.glob("outbox.sqlite*")  # the database and its WAL
        size = sum(f.stat().st_size for f in files) / 1024**2
        print(
            f"\nagent with a full outbox: PSS {pss:.1f} MiB, RSS {rss:.1f} MiB, file {size:.1f} MiB"
        )
        assert 0 < pss <= PSS_BUDGET_MIB
    finally:
        proxy.stop()


def test_an_agent_stopped_while_the_broker_is_unreachable_exits_cleanly_keeping_its_records(
    tmp_path: Path, signer: Signer, agents: list[Agent]
) -> None:
    # Given an agent whose broker nobody answers, retrying, with a record waiting
    agent = Agent(tmp_path, f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F", signer)
    agents.append(agent)
    proc = agent.start()
    proc.wait_for_line("broker unreachable")
    agent.write(["not json"])
    wait_until(agent.read_to_end, timeout=20, message="agent did not read its events")
    # When it is asked to stop
    code = proc.stop(signal.SIGTERM)
    # Then it exits 0, and the record is still in its outbox for the next start
    assert code == 0, proc.output
    assert agent.outbox()["waiting"] == 1
