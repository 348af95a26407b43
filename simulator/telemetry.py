"""The simulated fleet's telemetry: alerts raised on devices, their outboxes,
and the count of what reached the ``edgeward.telemetry`` stream.

What a simulated device does (``shard.SimDevice``), as the real agent does it:

* **Alerts.**  Each device raises alerts at the scenario's ``alert_rate``
  (a Poisson process per device).  An alert is an event judged by the
  device's backend against its policies in force, with the same evaluator
  the agent runs for ``--events-from``: :data:`ALERT_EVENT`, a process
  reading the point-of-sale secrets under ``/etc/pos/secrets/``, which every
  policy the simulator generates blocks (``run.Policies``: a recursive
  ``file.matchDirectories`` rule, ``Block``, severity 5).  Judged ``Block``,
  it becomes an ``alert`` record.  A device with no policy in force yet lets
  it pass, as a real one would: no record.
* **Outbox.**  The alert, and the core's own events (``revision_applied``,
  ``bundle_refused``...: the core is made with ``records=True``), go into a
  :class:`MemoryOutbox`: numbered per device, bounded like the agent's
  SQLite outbox (same bounds, same drop rule), but in memory — 35,000 SQLite
  files would measure the disk, not the broker.  The agent's own
  :class:`~edgeward.actors.outbox.Sender` drains it over a second,
  confirm-mode channel of the device's connection.
* **Counting.**  :class:`StreamTally` is what the run's counter (the
  ``TelemetryCounter`` actor) does with each message it reads from the
  stream: decode, deduplicate by (device, seq), and time the record's
  end-to-end latency (the device's record time to its receipt; one machine,
  one clock).

Per-device memory matters here (35,000 devices in a few processes): an
outbox holds its records and little else; the compiled policies a device
judges with are shared per process (:func:`compiled_for`).
"""

from __future__ import annotations

import dataclasses
from array import array
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from edgeward.actors.config import AgentConfig
from edgeward.actors.outbox import (
    _REPORT_BYTES,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_RECORDS,
    drop_report,
    over_bounds,
)
from edgeward.enforcement.backend import BuiltinBackend
from edgeward.enforcement.evaluator import (
    CompiledPolicies,
    Decision,
    Event,
    OpenEvent,
    compile_policies,
)
from edgeward.transport.errors import RemoteProtocolError
from edgeward.transport.wire import RECORD_TYPES, Record, decode

#: The event a simulated device's alerts are made of: a script reading the
#: terminal's payment key.  Every generated policy blocks ``/etc/pos/secrets/``
#: (recursively), so once any policy is in force this is a ``Block``.
ALERT_EVENT = OpenEvent(path="/etc/pos/secrets/payment.key", source="/usr/bin/python3")


def agent_default(name: str) -> Any:
    """The agent's default for one config field (``telemetry_window``...)."""
    return AgentConfig.__dataclass_fields__[name].default


# -- judging events: one compiled set per distinct set in force, per process ------

#: Compiled policy sets by (digest, posture), most recently used last.  A
#: digest names exactly one set of documents, so devices with the same set in
#: force share one index instead of each compiling its own.
_COMPILED: OrderedDict[tuple[str, str], CompiledPolicies] = OrderedDict()
COMPILED_KEEP = 64  # distinct sets kept; a run has a handful per revision


def compiled_for(
    digest: str, policies: Sequence[Mapping[str, Any]], posture: str
) -> CompiledPolicies:
    key = (digest, posture)
    found = _COMPILED.get(key)
    if found is None:
        found = _COMPILED[key] = compile_policies(policies, posture)
        while len(_COMPILED) > COMPILED_KEEP:
            _COMPILED.popitem(last=False)
    else:
        _COMPILED.move_to_end(key)
    return found


class SimBackend(BuiltinBackend):
    """The builtin backend as a simulated device runs it.

    It judges with the evaluator like the agent's, from the process-wide
    :func:`compiled_for` rather than an index of its own; and it remembers
    only the revision of the set in force (an alert names it), not a map per
    policy — both to keep 35,000 devices small.
    """

    def apply(
        self,
        policies: Sequence[Mapping[str, Any]],
        digest: str = "",
        *,
        revision: int | None = None,
    ) -> str:
        done = super().apply(policies, digest)
        if revision is not None:
            self.revision = revision
        return done

    def evaluate(self, event: Event) -> Decision:
        return compiled_for(self.digest, self.policies, self.default_posture).evaluate(event)


# -- the outbox -----------------------------------------------------------------


class MemoryOutbox:
    """A device's telemetry records waiting for the broker, in memory.

    The agent's :class:`~edgeward.actors.outbox.Outbox` without the file: the
    same numbering (``seq`` from 1, per device, never reused), the same
    bounds (a count and a byte size, the agent's defaults unless given), the
    same drop rule (the oldest record of the lowest priority first, never
    one in flight unless nothing else is left, every drop counted by type),
    the same drop reports, and the interface the agent's
    :class:`~edgeward.actors.outbox.Sender` drains (``after``, ``delete``,
    ``in_flight``, ``on_accept``).  What it does not do is survive its
    process: a simulated device is never killed.
    """

    __slots__ = (
        "device",
        "max_records",
        "max_bytes",
        "next_seq",
        "count",
        "bytes",
        "accepted",
        "dropped",
        "reported",
        "in_flight",
        "on_accept",
        "_records",
    )

    def __init__(
        self,
        device: str,
        *,
        max_records: int = DEFAULT_MAX_RECORDS,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        if max_records < 1 or max_bytes < 1:
            raise ValueError("the outbox bounds must be positive")
        self.device = device
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.next_seq = 1
        self.count = self.bytes = 0
        self.accepted = 0  # records accepted in all, drop reports included
        self.dropped: Counter[str] = Counter()
        self.reported: Counter[str] = Counter()
        #: seqs published and not yet confirmed: not dropped while others can be.
        self.in_flight: set[int] = set()
        self.on_accept: Callable[[], None] | None = None
        # seq -> (type, encoded record), oldest first (seqs only grow).
        self._records: dict[int, tuple[str, bytes]] = {}

    def __len__(self) -> int:
        return self.count

    def accept(self, type: str, body: Mapping[str, Any], now: float) -> Record:
        """Number one record and keep it (dropping to stay within the bounds)."""
        record = self._insert(type, body, now)
        self.dropped += self._enforce_bounds()
        if self.on_accept is not None:
            self.on_accept()
        return record

    def report_drops(self, now: float) -> Record | None:
        """If records were dropped since the last report, accept one ``dropped``
        event saying how many of each type; room for it is made first, and
        counted in it (as the agent's outbox does)."""
        if self.dropped == self.reported:
            return None
        totals = self.dropped + self._enforce_bounds(extra_records=1, extra_bytes=_REPORT_BYTES)
        body = drop_report(totals, self.reported, self.max_records, self.max_bytes)
        record = self._insert("event", body, now)
        self.dropped = totals + self._enforce_bounds()
        self.reported = Counter(totals)
        if self.on_accept is not None:
            self.on_accept()
        return record

    def _insert(self, kind: str, body: Mapping[str, Any], now: float) -> Record:
        record = Record(self.device, self.next_seq, now, kind, dict(body))
        data = record.encode()
        self._records[record.seq] = (kind, data)
        self.next_seq += 1
        self.count += 1
        self.bytes += len(data)
        self.accepted += 1
        return record

    def _enforce_bounds(self, extra_records: int = 0, extra_bytes: int = 0) -> Counter[str]:
        dropped: Counter[str] = Counter()
        while over_bounds(
            self.count, self.bytes, self.max_records, self.max_bytes, extra_records, extra_bytes
        ):
            victim = self._victim()
            kind, data = self._records.pop(victim)
            self.count -= 1
            self.bytes -= len(data)
            dropped[kind] += 1
        return dropped

    def _victim(self) -> int:
        """The oldest record of the lowest priority, not in flight if any is not."""
        best: tuple[int, int] | None = None
        fallback: tuple[int, int] | None = None
        for seq, (kind, _) in self._records.items():
            rank = (RECORD_TYPES[kind], seq)
            if fallback is None or rank < fallback:
                fallback = rank
            if seq not in self.in_flight and (best is None or rank < best):
                best = rank
        chosen = best or fallback
        assert chosen is not None
        return chosen[1]

    # -- the sender's side -------------------------------------------------------

    def after(self, seq: int, limit: int) -> list[tuple[int, str, bytes]]:
        """Up to ``limit`` records with a seq above ``seq``, oldest first."""
        out: list[tuple[int, str, bytes]] = []
        if limit <= 0:
            return out
        for s, (kind, data) in self._records.items():
            if s > seq:
                out.append((s, kind, data))
                if len(out) >= limit:
                    break
        return out

    def delete(self, seqs: Iterable[int]) -> None:
        """Forget records the broker confirmed."""
        for seq in seqs:
            found = self._records.pop(seq, None)
            if found is not None:
                self.count -= 1
                self.bytes -= len(found[1])

    def kept(self) -> list[tuple[int, str]]:
        """(seq, type) of every record held, oldest first (for tests and reports)."""
        return [(seq, kind) for seq, (kind, _) in self._records.items()]


# -- the other side: what reached the stream --------------------------------------


@dataclasses.dataclass
class StreamTally:
    """Records read from the telemetry stream, each (device, seq) counted once.

    Which seqs of a device were seen is a bitmap (a bit per seq: a device's
    seqs are dense from 1), so the tally stays small however many records
    go by; the latencies are kept as doubles, by record type, to give exact
    percentiles.
    """

    received: int = 0  # distinct (device, seq)
    duplicates: int = 0  # the same (device, seq) again (a resend after a lost confirm)
    malformed: int = 0  # not a record
    stamped: int = 0  # of the distinct records, those whose AMQP user_id names their device
    by_type: Counter[str] = dataclasses.field(default_factory=Counter)
    latencies: dict[str, array] = dataclasses.field(default_factory=dict)  # type -> seconds
    _seen: dict[str, bytearray] = dataclasses.field(default_factory=dict)

    def add(self, body: bytes, received_at: float, user_id: str | None = None) -> Record | None:
        """Count one message read at ``received_at`` (Unix time), published
        with the AMQP ``user_id`` given (None: none); the record, or None for
        a repeat or a message that is no record."""
        try:
            record = Record.from_message(decode(body))
        except (RemoteProtocolError, ValueError, TypeError):
            self.malformed += 1
            return None
        bits = self._seen.get(record.device)
        byte, bit = divmod(record.seq, 8)
        if bits is None:
            bits = self._seen[record.device] = bytearray()
        if byte >= len(bits):
            bits.extend(bytes(byte + 1 - len(bits) + len(bits) // 2))  # room to grow into
        if bits[byte] >> bit & 1:
            self.duplicates += 1
            return None
        bits[byte] |= 1 << bit
        self.received += 1
        if user_id is not None and user_id == record.device:
            self.stamped += 1
        self.by_type[record.type] += 1
        self.latencies.setdefault(record.type, array("d")).append(received_at - record.time)
        return record

    def latency_ms(self) -> dict[str, Any]:
        """End-to-end latency percentiles (linear between ranks) in ms, of all
        records and (``by_type``) of each type: alerts go out as they are
        raised, the core's events in the middle of handling a rollout."""
        everything = sorted(x for values in self.latencies.values() for x in values)
        return {
            **_summary(everything),
            "by_type": {k: _summary(sorted(v)) for k, v in sorted(self.latencies.items())},
        }

    def counts(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "duplicates": self.duplicates,
            "malformed": self.malformed,
            "stamped": self.stamped,
            "by_type": dict(self.by_type),
        }


def _summary(ordered: Sequence[float]) -> dict[str, Any]:
    from .report import percentile

    def ms(q: float) -> float | None:
        found = percentile(ordered, q)
        return None if found is None else round(found * 1000, 1)

    return {"p50": ms(50), "p90": ms(90), "p99": ms(99), "max": ms(100), "count": len(ordered)}
