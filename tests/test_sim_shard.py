"""A simulator shard against the real broker, without Thespian: devices
connect, share connections when asked, apply a signed revision, and come
back after a cut."""

from __future__ import annotations

import asyncio
import time

import pika
import pytest

from edgeward.simulator.run import Policies
from edgeward.simulator.scenario import Step
from edgeward.simulator.shard import Shard, ShardConfig
from edgeward.transport import topology
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


@pytest.mark.parametrize("share", [1, 5])
def test_shard_devices_apply_a_revision_and_catch_up_after_a_cut(
    broker_url: str, share: int
) -> None:
    # Given a shard of 20 devices (sharing connections 5 to 1 when asked)
    conn = pika.BlockingConnection(pika.URLParameters(broker_url))
    topology.declare(conn.channel())
    conn.close()
    signer = Signer.generate()
    loop = asyncio.new_event_loop()
    shard = Shard(
        ShardConfig(
            first=0,
            labels=[{"store": "berlin"}] * 20,
            urls=[broker_url],
            mode="edgeward",
            trusted_keys={signer.key_id: signer.public_b64},
            share=share,
            ramp_rate=200,
        ),
        loop,
    )
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
