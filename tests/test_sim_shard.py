"""A simulator shard against the real broker, without Thespian: devices
connect, share connections when asked, apply a signed revision, and come
back after a cut; their telemetry waits out the cut and is all read from
the stream, or counted as dropped; with a run secret, each logs in as a
broker user of its own and stamps its telemetry with that login."""

from __future__ import annotations

import asyncio
import secrets
import time

import pika
import pytest
from brokerkit import MANAGEMENT_URL, BrokerAdmin, wait_until

from edgeward.simulator.logins import DeviceLogins, new_secret
from edgeward.simulator.run import Policies
from edgeward.simulator.scenario import Step, device_name
from edgeward.simulator.shard import Shard, ShardConfig
from edgeward.simulator.telemetry import ALERT_EVENT, StreamTally
from edgeward.transport import topology
from edgeward.transport.admin import ManagementAPI
from edgeward.transport.connection import close_quietly
from edgeward.transport.signing import Signer
from edgeward.transport.wire import Bundle


def run_until(loop: asyncio.AbstractEventLoop, predicate, timeout: float, what: str) -> None:
    async def wait() -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.05)

    loop.run_until_complete(wait())


def publish(url: str, signer: Signer, policies: Policies, step: Step) -> int:
    revision, changed, _ = policies.step(step)
    bundle = Bundle(
        revision=revision,
        issued_at=time.time(),
        mode="delta",
        policies=tuple(policies.state[n] for n in changed),
        sha256=__import__("edgeward.enforcement.digest", fromlist=["x"]).state_digest(
            policies.state.values()
        ),
    )
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = conn.channel()
        channel.confirm_delivery()
        channel.basic_publish(
            topology.POLICY_EXCHANGE,
            "",
            signer.sign(bundle).encode(),
            pika.BasicProperties(
                headers={"revision": revision, "published_us": int(time.time() * 1e6)}
            ),
        )
    finally:
        conn.close()
    return revision


def shard_on(
    broker_url: str, devices: int, first: int = 0, **config: object
) -> tuple[Shard, asyncio.AbstractEventLoop, Signer]:
    """A shard of ``devices`` berlin devices on the test's vhost (its topology
    declared), trusting a fresh signer; not started."""
    conn = pika.BlockingConnection(pika.URLParameters(broker_url))
    topology.declare(conn.channel())
    conn.close()
    signer = Signer.generate()
    loop = asyncio.new_event_loop()
    shard = Shard(
        ShardConfig(
            first=first,
            labels=[{"store": "berlin"}] * devices,
            urls=[broker_url],
            mode="edgeward",
            trusted_keys={signer.key_id: signer.public_b64},
            ramp_rate=200,
            **config,  # type: ignore[arg-type]
        ),
        loop,
    )
    return shard, loop, signer


@pytest.mark.parametrize("share", [1, 5])
def test_shard_devices_apply_a_revision_and_catch_up_after_a_cut(
    broker_url: str, share: int
) -> None:
    # Given a shard of 20 devices (sharing connections 5 to 1 when asked)
    shard, loop, signer = shard_on(broker_url, 20, share=share)
    try:
        shard.start()
        run_until(loop, lambda: shard.snapshot()["connected"] == 20, 20, "all connected")
        assert len(shard.links) == 20 // share
        # When a revision is published
        policies = Policies()
        first = publish(broker_url, signer, policies, Step(0, "apply", policies=5, changed=5))
        shard.set_latest(first, None)
        # Then every device puts it in force, and the latency of each is recorded
        run_until(loop, lambda: shard.snapshot()["in_sync"] == 20, 20, "all in sync")
        # When every connection is cut, a revision published meanwhile, and all restored
        shard.cut()
        run_until(loop, lambda: shard.snapshot()["connected"] == 0, 20, "all cut")
        second = publish(
            broker_url,
            signer,
            policies,
            Step(0, "apply", policies=5, changed=1, selector="store=berlin"),
        )
        shard.set_latest(second, {"store": "berlin"})
        shard.restore()
        # Then they reconnect and catch up from their stored offsets
        run_until(loop, lambda: shard.snapshot()["in_sync"] == 20, 30, "caught up")
        assert shard.unexpected_closes == 0, shard.errors
        final = shard.final()
        assert final["revisions"] == [second] * 20 and all(final["online"])
    finally:
        shard.stop()
        loop.run_until_complete(asyncio.sleep(0.5))
        loop.close()


def read_telemetry(url: str, expected: int, timeout: float) -> StreamTally:
    """The vhost's telemetry stream from its start, tallied, until ``expected``
    distinct records were read (or the timeout)."""
    tally = StreamTally()
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = conn.channel()
        channel.basic_qos(prefetch_count=1000)
        channel.basic_consume(
            topology.TELEMETRY_STREAM,
            lambda ch, method, props, body: tally.add(body, time.time(), props.user_id),
            arguments={"x-stream-offset": "first"},
        )
        deadline = time.monotonic() + timeout
        while tally.received < expected and time.monotonic() < deadline:
            conn.process_data_events(time_limit=0.2)
        conn.process_data_events(time_limit=0.5)  # anything beyond: a repeat, or a bug
    finally:
        close_quietly(conn)  # a stream answers pika's reject of buffered deliveries with 540
    return tally


@pytest.mark.parametrize("bound", [10_000, 3], ids=["roomy-outbox", "tight-outbox"])
def test_shard_telemetry_waits_out_a_cut_and_every_record_is_read_or_counted_dropped(
    broker_url: str, bound: int
) -> None:
    # Given 10 devices raising 4 alerts a second each, with outboxes of `bound` records
    shard, loop, signer = shard_on(broker_url, 10, alert_rate=4.0, outbox_max_records=bound)

    def telemetry() -> dict:
        return shard.telemetry()

    try:
        shard.start()
        run_until(loop, lambda: shard.snapshot()["connected"] == 10, 20, "all connected")
        # and a revision in force whose policies block what the devices see
        revision = publish(broker_url, signer, Policies(), Step(0, "apply", policies=3, changed=3))
        shard.set_latest(revision, None)
        run_until(loop, lambda: shard.snapshot()["in_sync"] == 10, 20, "all in sync")
        run_until(loop, lambda: telemetry()["alerts"] >= 20, 20, "alerts raised")
        # When they go quiet, drain, and lose their connections
        shard.stop_alerts()
        run_until(loop, lambda: telemetry()["waiting"] == 0, 20, "drained")
        shard.cut()
        run_until(loop, lambda: shard.snapshot()["connected"] == 0, 20, "all cut")
        # and each sees five blocked events while offline
        for device in shard.devices:
            for _ in range(5):
                device.judge(ALERT_EVENT)  # type: ignore[union-attr]
        # Then the alerts wait in the outboxes, as many as fit
        assert telemetry()["waiting"] == 10 * min(5, bound)
        # When the connections come back
        shard.restore()
        run_until(loop, lambda: telemetry()["waiting"] == 0, 30, "drained after the cut")
        counts = telemetry()
    finally:
        shard.stop()
        loop.run_until_complete(asyncio.sleep(0.5))
        loop.close()
    # Then every record put in an outbox is on the stream once, or was dropped and counted
    tally = read_telemetry(broker_url, counts["sent"] - counts["dropped"], 20)
    assert counts["sent"] == tally.received + counts["dropped"]
    assert tally.by_type["alert"] == counts["alerts"] - counts["dropped"]
    if bound == 3:
        # two alerts of each device did not fit, and reporting that took a third's room
        assert counts["dropped"] == 10 * 3
        assert tally.by_type["event"] == 10 * 2  # revision_applied, and the drop report
    else:
        assert counts["dropped"] == 0 and tally.by_type["event"] == 10
    assert tally.malformed == 0


def test_shard_devices_log_in_as_their_own_users_and_stamp_what_they_publish(
    broker_url: str, vhost: str, broker_admin: BrokerAdmin
) -> None:
    # Given a broker user for each of 5 devices (names far from any real run's), granted
    # in the test's vhost as the simulator grants them
    first = 900_000 + secrets.randbelow(90_000)
    names = [device_name(first + i) for i in range(5)]
    secret = new_secret()
    logins = DeviceLogins(
        ManagementAPI(MANAGEMENT_URL.rstrip("/") + "/api", "guest", "guest"), names, secret
    )
    logins.create()
    try:
        logins.grant(vhost, "edgeward")
        # When a shard of those devices runs with the run's secret, raising alerts
        shard, loop, signer = shard_on(
            broker_url, 5, first=first, login_secret=secret, alert_rate=4.0
        )
        try:
            shard.start()
            run_until(loop, lambda: shard.snapshot()["connected"] == 5, 20, "all connected")
            # Then the broker sees each connection as its device's own user
            wait_until(
                lambda: (
                    sorted(c.get("user") for c in broker_admin.list_connections(vhost)) == names
                ),
                timeout=10,
                message="connections as the devices' users",
            )
            revision = publish(
                broker_url, signer, Policies(), Step(0, "apply", policies=3, changed=3)
            )
            shard.set_latest(revision, None)
            run_until(loop, lambda: shard.snapshot()["in_sync"] == 5, 20, "all in sync")
            run_until(loop, lambda: shard.telemetry()["alerts"] >= 10, 20, "alerts raised")
            shard.stop_alerts()
            run_until(loop, lambda: shard.telemetry()["waiting"] == 0, 20, "drained")
            counts = shard.telemetry()
            assert shard.unexpected_closes == 0 and not shard.errors, shard.errors
        finally:
            shard.stop()
            loop.run_until_complete(asyncio.sleep(0.5))
            loop.close()
    finally:
        logins.remove()
    # And every record reached the stream stamped with its device's login as user_id
    tally = read_telemetry(broker_url, counts["sent"], 20)
    assert tally.received == counts["sent"] > 0
    assert tally.stamped == tally.received
    assert logins.figures["removed"] == 5 and logins.figures["left"] == 0
