"""Names and declarations of everything edgeward keeps on the broker.

``edgeward.policy``  fanout exchange -> stream queue of the same name.  The
    control plane publishes signed bundles to the exchange; agents read the
    stream from their own stored offset.  Retention by age and bytes.  (The
    exchange lets cheap per-device notify queues bind beside the stream
    later, if the simulator shows stream readers cost too much.)
``edgeward.uplink``  topic exchange, routing keys
    ``telemetry.<device>.<kind>``: everything devices send.  Named apart
    from the stream it feeds: RabbitMQ permissions match exchange and queue
    names alike, so a device allowed to publish to an exchange named like the
    telemetry stream could also bind that stream to another exchange.
``edgeward.heartbeats``  classic queue bound to ``telemetry.*.heartbeat``:
    latest-wins state, bounded, oldest dropped first; the control plane
    consumes it.
``edgeward.telemetry``  stream queue bound to ``telemetry.*.alert``,
    ``telemetry.*.log`` and ``telemetry.*.event``: the audit trail, replayable,
    retention by age and bytes; the TelemetryCollector reads it from its
    stored offset.  Heartbeats never enter it.
"""

from __future__ import annotations

from dataclasses import dataclass

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from .errors import TopologyConflict

POLICY_EXCHANGE = "edgeward.policy"
POLICY_STREAM = "edgeward.policy"
TELEMETRY_EXCHANGE = "edgeward.uplink"
HEARTBEAT_QUEUE = "edgeward.heartbeats"
TELEMETRY_STREAM = "edgeward.telemetry"
TELEMETRY_BINDINGS = ("telemetry.*.alert", "telemetry.*.log", "telemetry.*.event")


def heartbeat_routing_key(device: str) -> str:
    return f"telemetry.{device}.heartbeat"


@dataclass(frozen=True)
class Retention:
    """Retention of the policy stream.  A stream drops whole segments, so
    ``segment_bytes`` bounds how precisely ``max_bytes`` is kept."""

    max_age: str = "30D"
    max_bytes: int = 1024**3
    segment_bytes: int = 16 * 1024**2

    def arguments(self) -> dict[str, object]:
        return {
            "x-queue-type": "stream",
            "x-max-age": self.max_age,
            "x-max-length-bytes": self.max_bytes,
            "x-stream-max-segment-size-bytes": self.segment_bytes,
        }


HEARTBEAT_QUEUE_ARGS = {
    "x-max-length": 200_000,
    "x-overflow": "drop-head",
    "x-message-ttl": 10 * 60 * 1000,
}


#: The audit trail keeps more than the policy stream: alerts are evidence.
TELEMETRY_RETENTION = Retention(max_age="90D", max_bytes=10 * 1024**3)


def declare(
    channel: BlockingChannel,
    retention: Retention | None = None,
    telemetry_retention: Retention | None = None,
) -> None:
    """Declare the topology; idempotent for the same arguments.

    Raises :class:`TopologyConflict` (the channel is closed, the connection
    not) when a stream exists with another retention than the one asked for.
    """
    retention = retention or Retention()
    telemetry_retention = telemetry_retention or TELEMETRY_RETENTION
    try:
        _declare(channel, retention, telemetry_retention)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code != 406 or "inequivalent arg" not in str(exc.reply_text):
            raise
        raise TopologyConflict(
            f"{exc.reply_text}. A stream's retention is fixed when it is made: keep the "
            "value it has (pass it, or leave the option at its default if that is what it "
            "has), or delete the stream (its records go with it) and let edgeward make it again"
        ) from exc


def _declare(
    channel: BlockingChannel, retention: Retention, telemetry_retention: Retention
) -> None:
    channel.exchange_declare(POLICY_EXCHANGE, exchange_type="fanout", durable=True)
    channel.queue_declare(POLICY_STREAM, durable=True, arguments=retention.arguments())
    channel.queue_bind(POLICY_STREAM, POLICY_EXCHANGE)
    channel.exchange_declare(TELEMETRY_EXCHANGE, exchange_type="topic", durable=True)
    channel.queue_declare(HEARTBEAT_QUEUE, durable=True, arguments=HEARTBEAT_QUEUE_ARGS)
    channel.queue_bind(HEARTBEAT_QUEUE, TELEMETRY_EXCHANGE, routing_key="telemetry.*.heartbeat")
    channel.queue_declare(TELEMETRY_STREAM, durable=True, arguments=telemetry_retention.arguments())
    for key in TELEMETRY_BINDINGS:
        channel.queue_bind(TELEMETRY_STREAM, TELEMETRY_EXCHANGE, routing_key=key)


def policy_properties() -> pika.BasicProperties:
    return pika.BasicProperties(content_type="application/cbor", delivery_mode=2)
