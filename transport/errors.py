"""Errors split by whose fault they are (the h11 way).

* :class:`RemoteProtocolError` — a peer sent something we refuse: a message
  that does not decode, a bad signature, a stale revision. It carries a short
  ``reason`` code that is counted and reported, never a crash.
* :class:`LocalProtocolError` — our own code misused an API.
* :class:`BrokerUnreachable` — no node of the broker URL list answered.
* :class:`TopologyConflict` — the broker holds a queue or stream of ours
  declared with other arguments than the ones asked for.
"""

from __future__ import annotations


class EdgewardError(Exception):
    """Base of every error edgeward raises on purpose."""


#: Longest ``detail`` kept: it may quote what the peer sent (a key id, a
#: version), and it travels on into logs, events and heartbeats.
MAX_DETAIL_CHARS = 200


class RemoteProtocolError(EdgewardError):
    """A peer sent something we refuse. ``reason`` is a counter label."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if len(detail) > MAX_DETAIL_CHARS:
            detail = detail[: MAX_DETAIL_CHARS - 1] + "…"
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class LocalProtocolError(EdgewardError):
    """Our own code used an API the wrong way."""


class BrokerUnreachable(EdgewardError):
    """No node of the configured broker answered."""

    def __init__(self, addresses: list[str], detail: str) -> None:
        super().__init__(f"broker unreachable at {', '.join(addresses)}: {detail}")
        self.addresses = addresses
        self.detail = detail


class TopologyConflict(EdgewardError):
    """A queue or stream exists with other arguments (RabbitMQ's 406
    "inequivalent arg"): its retention is fixed when it is made."""
