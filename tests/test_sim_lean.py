"""The simulator's lean pika connection keeps less per connection and
changes nothing else: its callback manager behaves as pika's, its FIFOs as
deques, and on a real broker every trim takes hold on each connection while
the devices still apply revisions."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from pika.callback import CallbackManager
from test_sim_shard import publish, run_until, shard_on

from edgeward.simulator.lean import Fifo, LeanCallbacks, LeanConnection, Registration
from edgeward.simulator.run import Policies
from edgeward.simulator.scenario import Step


def exercise(manager: CallbackManager) -> list[Any]:
    """The same registrations, firings and removals on a manager: what fired, in order."""
    fired: list[Any] = []

    def cb(name: str):
        def callback(*args: Any) -> None:
            fired.append((name, args))

        return callback

    once, always, caller_only = cb("once"), cb("always"), cb("caller-only")
    owner, stranger = object(), object()
    manager.add(1, "Basic.Ack", once)
    manager.add(1, "Basic.Ack", once)  # a second use of the same one-shot
    manager.add(1, "Basic.Ack", always, one_shot=False)
    manager.add(1, "Channel.Close", caller_only, only_caller=owner)
    manager.add(0, "x", cb("argued"), arguments={"k": 1})
    fired.append(("pending", manager.pending(1, "Basic.Ack")))
    for _ in range(3):
        fired.append(("processed", manager.process(1, "Basic.Ack", None, "tag")))
    fired.append(("by stranger", manager.process(1, "Channel.Close", stranger)))
    fired.append(("by owner", manager.process(1, "Channel.Close", owner)))
    fired.append(("removed", manager.remove(1, "Basic.Ack", always)))
    fired.append(("after removal", manager.process(1, "Basic.Ack", None)))
    fired.append(("cleanup", manager.cleanup(0)))
    fired.append(("after cleanup", manager.process(0, "x", None)))
    manager.add(2, "y", cb("y"))
    manager.remove_all(2, "y")
    fired.append(("after remove_all", manager.process(2, "y", None)))
    return fired


def test_lean_callbacks_fire_remove_and_count_as_pikas_own_manager() -> None:
    assert exercise(LeanCallbacks()) == exercise(CallbackManager())


def test_lean_callbacks_keep_slotted_registrations_not_dicts() -> None:
    manager = LeanCallbacks()
    manager.add(1, "Basic.Ack", print, one_shot=False)
    (entry,) = manager._stack["1"]["Basic.Ack"]
    assert isinstance(entry, Registration) and not hasattr(entry, "__dict__")
    assert "print" in repr(entry)


def test_a_fifo_pops_and_pushes_at_both_ends_as_a_deque_does() -> None:
    fifo, reference = Fifo(), deque()
    for queue in (fifo, reference):
        queue.append(b"a")
        queue.append(b"b")
        queue.appendleft(b"z")
    assert list(fifo) == list(reference) == [b"z", b"a", b"b"]
    assert fifo.popleft() == reference.popleft() == b"z"
    assert fifo[0] == reference[0] == b"a"
    fifo.clear()
    assert not fifo and not hasattr(fifo, "__dict__")


def test_every_trim_takes_hold_on_real_connections_and_devices_still_apply_revisions(
    broker_url: str,
) -> None:
    # Given a shard of 3 devices with telemetry, each with its own connection
    shard, loop, signer = shard_on(broker_url, 3, telemetry=True)
    try:
        # When they are connected
        shard.start()
        run_until(loop, lambda: shard.snapshot()["connected"] == 3, 20, "all connected")
        conns = [link.conn for link in shard.links]
        for conn in conns:
            assert isinstance(conn, LeanConnection)
            # Then each keeps slotted callback registrations, none for opening,
            stack = conn.callbacks._stack
            assert isinstance(conn.callbacks, LeanCallbacks)
            entries = [e for keys in stack.values() for es in keys.values() for e in es]
            assert entries and all(isinstance(e, Registration) for e in entries)
            assert not stack["0"].get(conn.ON_CONNECTION_OPEN_OK)
            assert not stack["0"].get(conn.ON_CONNECTION_ERROR)
            # lists for its FIFOs,
            assert type(conn._transport._tx_buffers) is Fifo
            assert all(type(ch._blocked) is Fifo for ch in conn._channels.values())
        # and one copy of what the broker said about itself
        assert conns[0].server_properties["product"] in ("RabbitMQ", b"RabbitMQ")
        assert all(c.server_properties is conns[0].server_properties for c in conns)
        assert all(c.server_capabilities is conns[0].server_capabilities for c in conns)
        assert all(c.publisher_confirms and c.consumer_cancel_notify for c in conns)
        # And when a revision is published, every device still puts it in force
        policies = Policies()
        revision = publish(broker_url, signer, policies, Step(0, "apply", policies=5, changed=5))
        shard.set_latest(revision, None)
        run_until(loop, lambda: shard.snapshot()["in_sync"] == 3, 20, "all in sync")
        assert shard.unexpected_closes == 0, shard.errors
    finally:
        shard.stop()
        loop.run_until_complete(asyncio.sleep(0.5))
        loop.close()
