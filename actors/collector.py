"""The TelemetryCollector: the audit trail, from the stream into SQLite, once.

Rules (what the code below keeps true):

1. The reader consumes ``edgeward.telemetry`` from the stored offset + 1
   (``first`` when nothing is stored), with a per-consumer prefetch of twice
   the batch size (at most 65,535: AMQP's limit) and manual acks.  It never
   nacks or rejects: on RabbitMQ 3.10 that closes the connection.
2. Every delivery is classified.  A record whose routing key
   ``telemetry.<device>.<type>`` names the device and type of its body is
   kept; anything else is *refused* with a reason (``malformed``,
   ``too_large``, ``too_deep``, ``unknown_version``, ``unknown_kind``,
   ``bad_routing_key``, ``device_mismatch``, ``type_mismatch``, and the
   identity checks of :class:`Trust`: ``no_user_id``, ``user_mismatch``,
   ``revoked``) that is counted, and its first bytes are kept as evidence.
   A refusal never stops the consumer.
3. A batch commits after ``collector_batch`` deliveries or
   ``collector_batch_ms`` after its first delivery, whichever comes first:
   records (``INSERT OR IGNORE`` on ``(device, seq)``: a duplicate is counted,
   not stored), refusals, counters and the offset of the batch's last
   delivery, in one SQLite transaction.
4. Acks follow the commit (``multiple``).  On a stream they only return
   credit: where to resume is the stored offset, not the broker's opinion.
5. A crash at any instant leaves whole batches only; the restart reads from
   the stored offset + 1, which re-reads exactly the batch that was lost.  A
   commit that fails is handled the same way: drop the connection, re-read.
6. A first delivery past the stored offset + 1 means retention removed what
   lay between while the collector was away: logged as an error and counted
   (``lost_to_retention``, in offsets: an upper bound on records, since a
   stream spends an offset on its own bookkeeping at each segment start),
   never silent.

Two actors: :class:`TelemetryCollector` (global name; answers queries from
the store, and supervises) and its child :class:`TelemetryReader` (owns its
own AMQP connection, the stream consumer and the store's writes).  When the
reader dies, even by ``kill -9``, the collector starts a new one, which
resumes from the stored offset.  The reader owns its connection rather than
going through the BrokerLink: a Thespian message costs ~0.5 ms, a record
costs the reader ~20 us.

:func:`replay` re-reads the stream from a time into a fresh store, with the
same classification and commits (``edgeward audit replay``).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
from thespian.actors import (
    ActorExitRequest,
    ActorTypeDispatcher,
    ChildActorExited,
    ThespianWatch,
    WakeupMessage,
    WatchMessage,
)

from edgeward.transport import topology
from edgeward.transport.connection import (
    Backoff,
    close_quietly,
    connect_blocking,
    socket_fds,
    split_urls,
)
from edgeward.transport.errors import BrokerUnreachable, RemoteProtocolError, TopologyConflict
from edgeward.transport.wire import Record, decode

from . import messages as m
from .audit_store import AlertQuery, AuditStore, Committed, Refusal

log = logging.getLogger("edgeward.collector")

COLLECTOR = "edgeward-telemetry-collector"
STREAM_OFFSET = "x-stream-offset"


def audit_path(home: str) -> Path:
    return Path(home) / "audit.sqlite"


#: basic.qos carries prefetch_count in 16 bits; a larger one cannot be encoded.
MAX_PREFETCH = 65_535


def prefetch_for(batch: int) -> int:
    """Twice the batch (rule 1), within what basic.qos can carry."""
    return min(2 * max(1, batch), MAX_PREFETCH)


def retentions(settings: m.Settings) -> tuple[topology.Retention, topology.Retention]:
    """The policy and telemetry stream retention the settings ask for."""
    return (
        topology.Retention(
            settings.retention_max_age,
            settings.retention_max_bytes,
            settings.retention_segment_bytes,
        ),
        topology.Retention(
            settings.telemetry_max_age,
            settings.telemetry_max_bytes,
            settings.telemetry_segment_bytes,
        ),
    )


# -- classification and batches (no I/O but the store) --------------------------


@dataclass(frozen=True)
class Trust:
    """Whom the collector believes (rule 2's identity checks).

    ``require_user_id``: a record must carry the AMQP ``user_id`` of its
    device's broker user. RabbitMQ refuses a ``user_id`` other than the
    connection's login, and a device user may publish only its own routing
    keys, so a record that names device D in key, body and ``user_id`` came
    from D's login. Off only with ``--allow-shared-login`` (devices sharing
    one login, for development): then a missing ``user_id`` passes, a
    ``user_id`` naming another device still does not.
    ``revoked``: devices whose telemetry is refused from now on.
    """

    require_user_id: bool = True
    revoked: frozenset[str] = frozenset()


def classify(
    routing_key: str, body: bytes, user_id: str | None = None, trust: Trust = Trust()
) -> Record:
    """The record in one delivery, or :class:`RemoteProtocolError` saying why not."""
    parts = routing_key.split(".")
    if len(parts) != 3 or parts[0] != "telemetry" or not parts[1]:
        raise RemoteProtocolError("bad_routing_key", routing_key)
    if parts[1] in trust.revoked:
        raise RemoteProtocolError("revoked", f"{parts[1]!r} is revoked")
    if user_id is None:
        if trust.require_user_id:
            raise RemoteProtocolError("no_user_id", f"published as {parts[1]!r} without user_id")
    elif user_id != parts[1]:
        raise RemoteProtocolError("user_mismatch", f"user {user_id!r} published as {parts[1]!r}")
    try:
        record = Record.from_message(decode(body))
    except (ValueError, TypeError, OverflowError) as exc:  # belt and braces
        raise RemoteProtocolError("malformed", str(exc)) from None
    if record.device != parts[1]:
        raise RemoteProtocolError("device_mismatch", f"{record.device!r} published as {parts[1]!r}")
    if record.type != parts[2]:
        raise RemoteProtocolError("type_mismatch", f"{record.type!r} published as {parts[2]!r}")
    return record


@dataclass
class Batch:
    """Deliveries read but not yet committed."""

    records: list[tuple[int, Record]] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)
    last_offset: int | None = None
    last_tag: int = 0
    started: float = 0.0  # monotonic time of the first delivery
    skipped: int = 0  # offsets retention removed before they were read
    trust: Trust = field(default_factory=Trust)

    def __len__(self) -> int:
        return len(self.records) + len(self.refusals)

    def add(
        self,
        offset: int,
        routing_key: str,
        body: bytes,
        tag: int,
        now: float,
        user_id: str | None = None,
    ) -> None:
        if not self:
            self.started = now
        try:
            self.records.append((offset, classify(routing_key, body, user_id, self.trust)))
        except RemoteProtocolError as exc:
            self.refusals.append(Refusal(offset, routing_key, exc.reason, exc.detail, body))
        self.last_offset = offset
        self.last_tag = tag

    def due(self, size: int, seconds: float, now: float) -> bool:
        return len(self) >= size or (bool(self) and now - self.started >= seconds)

    def commit(self, store: AuditStore) -> Committed:
        extra = {"lost_to_retention": self.skipped} if self.skipped else None
        return store.commit(self.records, self.refusals, self.last_offset, counters=extra)


def _offset_of(properties: Any) -> int | None:
    value = (properties.headers or {}).get(STREAM_OFFSET)
    return value if isinstance(value, int) else None


# -- the reader ------------------------------------------------------------------


class TelemetryReader(ActorTypeDispatcher):
    """Reads the stream into the store (rules 1-5 above).  Child of the
    TelemetryCollector; tells it a :class:`~messages.ReaderState` on changes."""

    STATE_EVERY = 0.5  # seconds between state reports while something changes

    def __init__(self) -> None:
        super().__init__()
        self.settings: m.Settings | None = None
        self.parent: Any = None
        self.store: AuditStore | None = None
        self.urls: list[str] = []
        self.conn: Any = None
        self.channel: Any = None
        self.trust = Trust()
        self.batch = Batch(trust=self.trust)
        self.backoff = Backoff(base=0.5, cap=10.0)
        self.retry_at = 0.0
        self.error = ""
        self.resumed_from: int | None = None
        self.expected: int | None = None  # the offset the next delivery should have
        self.received: int | None = None
        self.reported: m.ReaderState | None = None
        self.reported_at = 0.0
        self.unnumbered = 0

    @property
    def tick(self) -> float:
        assert self.settings is not None
        return max(0.05, min(0.5, self.settings.collector_batch_ms / 2000))

    def receiveMsg_Configure(self, msg: m.Configure, sender: Any) -> ThespianWatch:
        self.settings = msg.settings
        self.parent = sender
        self.urls = split_urls(msg.settings.broker_url)
        self.store = AuditStore(audit_path(msg.settings.home))
        self._trust(frozenset(self.store.revoked()))
        self._ensure_connected()
        self._report(force=True)
        self.wakeupAfter(self.tick)
        return self._watch()

    def receiveMsg_Revoke(self, msg: m.Revoke, sender: Any) -> ThespianWatch:
        self._trust(self.trust.revoked | {msg.device})
        return self._watch()

    def _trust(self, revoked: frozenset[str]) -> None:
        assert self.settings is not None
        self.trust = Trust(not self.settings.allow_shared_login, revoked)
        self.batch.trust = self.trust  # deliveries from now on

    def receiveMsg_WakeupMessage(self, msg: WakeupMessage, sender: Any) -> ThespianWatch:
        if self.settings is not None:
            self._ensure_connected()
            self._pump()
            self._report()
            self.wakeupAfter(self.tick)
        return self._watch()

    def receiveMsg_WatchMessage(self, msg: WatchMessage, sender: Any) -> ThespianWatch:
        self._pump()
        return self._watch()

    def receiveMsg_ActorExitRequest(self, msg: ActorExitRequest, sender: Any) -> None:
        self._commit()
        self._close()
        if self.store is not None:
            self.store.close()

    def receiveUnrecognizedMessage(self, msg: Any, sender: Any) -> None:
        log.warning("telemetry reader dropped a message it does not know: %r", msg)

    # -- the connection ----------------------------------------------------------

    def _watch(self) -> ThespianWatch:
        return ThespianWatch(socket_fds(self.conn))

    def _ensure_connected(self) -> None:
        if self.conn is not None or time.monotonic() < self.retry_at:
            return
        assert self.settings is not None and self.store is not None
        stored = self.store.offset()
        start: Any = "first" if stored is None else stored + 1
        batch = max(1, self.settings.collector_batch)
        conn = None
        try:
            conn = connect_blocking(self.urls, name="edgeward-telemetry-collector")
            channel = conn.channel()
            topology.declare(channel, *retentions(self.settings))
            channel.basic_qos(prefetch_count=prefetch_for(batch))
            channel.basic_consume(
                topology.TELEMETRY_STREAM, self._on_message, arguments={STREAM_OFFSET: start}
            )
        except (BrokerUnreachable, TopologyConflict) as exc:
            close_quietly(conn)
            self._retry(str(exc))
            return
        except (pika.exceptions.AMQPError, OSError) as exc:
            close_quietly(conn)
            self._retry(f"broker setup failed: {exc!r}")
            return
        self.conn, self.channel = conn, channel
        self.backoff.reset()
        self.error = ""
        self.resumed_from = stored
        self.expected = None if stored is None else stored + 1
        log.info("reading %s from offset %s", topology.TELEMETRY_STREAM, start)

    def _retry(self, error: str) -> None:
        self.error = error
        self.retry_at = time.monotonic() + self.backoff.next_delay()
        log.warning("%s", error)

    def _lost(self, exc: BaseException) -> None:
        # What was delivered is still good: keep it, then resume after it.
        self._commit(ack=False)
        self._close()
        self._retry(f"connection lost: {exc!r}")

    def _close(self) -> None:
        conn, self.conn, self.channel = self.conn, None, None
        close_quietly(conn)  # pika rejects what it buffered: a 540 here is expected

    # -- reading and committing --------------------------------------------------

    def _on_message(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        offset = _offset_of(properties)
        if offset is None:  # not from a stream: cannot be resumed after, skip
            self.unnumbered += 1
            return
        if self.expected is not None and offset > self.expected + 1:
            # A stream starts a reader older than its retention at the oldest
            # message it still has: what lay between is gone. Say so, count it.
            # (Offsets are not dense: the stream spends one on its own
            # bookkeeping at each segment start, so only the first delivery
            # tells, and a gap of one offset is that entry, not a record.)
            log.error(
                "offsets %s-%s of %s were dropped by retention before they were read",
                self.expected,
                offset - 1,
                topology.TELEMETRY_STREAM,
            )
            self.batch.skipped += offset - self.expected
        self.expected = None
        self.batch.add(
            offset,
            method.routing_key,
            body,
            method.delivery_tag,
            time.monotonic(),
            properties.user_id,
        )
        self.received = offset

    def _pump(self) -> None:
        if self.conn is None:
            return
        assert self.settings is not None
        try:
            self.conn.process_data_events(time_limit=0)
            if self.batch.due(
                self.settings.collector_batch,
                self.settings.collector_batch_ms / 1000,
                time.monotonic(),
            ):
                self._commit()
        except (pika.exceptions.AMQPError, OSError) as exc:
            self._lost(exc)

    def _commit(self, ack: bool = True) -> None:
        if not self.batch or self.store is None:
            return
        batch, self.batch = self.batch, Batch(trust=self.trust)
        try:
            done = batch.commit(self.store)
        except sqlite3.Error as exc:
            # Nothing of the batch is stored, its offset neither: drop the
            # connection and read it again from the stored offset.
            self._close()
            self._retry(f"audit store commit failed: {exc!r}")
            return
        if done.refused or done.duplicates:
            log.info(
                "batch to offset %s: %s stored, %s duplicates, %s refused",
                done.stream_offset,
                done.stored,
                done.duplicates,
                done.refused,
            )
        if ack and self.channel is not None:
            self.channel.basic_ack(batch.last_tag, multiple=True)
        self._report()

    def _report(self, force: bool = False) -> None:
        if self.parent is None or self.store is None:
            return
        state = m.ReaderState(
            pid=os.getpid(),
            connected=self.conn is not None,
            error=self.error,
            resumed_from=self.resumed_from,
            committed=self.store.offset(),
            received=self.received,
            pending=len(self.batch),
        )
        now = time.monotonic()
        if state == self.reported or (not force and now - self.reported_at < self.STATE_EVERY):
            return
        self.reported, self.reported_at = state, now
        self.send(self.parent, state)


# -- the collector (front, supervisor) -----------------------------------------------


class TelemetryCollector(ActorTypeDispatcher):
    """Answers ``edgeward alerts`` from the store and keeps a reader running."""

    RESTART_DELAYS = (0.0, 0.5, 1.0, 2.0, 5.0, 10.0)

    def __init__(self) -> None:
        super().__init__()
        self.settings: m.Settings | None = None
        self.store: AuditStore | None = None
        self.reader: Any = None
        self.state: m.ReaderState | None = None
        self.restarts = 0
        self.exiting = False

    def receiveMsg_Configure(self, msg: m.Configure, sender: Any) -> None:
        self.settings = msg.settings
        self.store = AuditStore(audit_path(msg.settings.home))
        if self.reader is None:
            self._start_reader()
        self.send(sender, m.Reply(True, self.status()))

    def receiveMsg_Status(self, msg: m.Status, sender: Any) -> None:
        self.send(sender, m.Reply(self.settings is not None, self.status()))

    def receiveMsg_Alerts(self, msg: m.Alerts, sender: Any) -> None:
        if self.store is None:
            return self.send(sender, m.Reply.fail(m.FAILED, "control plane is still starting"))
        rows, high = self.store.alerts(AlertQuery(**asdict(msg)))
        self.send(sender, m.Reply(True, {"alerts": rows, "offset": high}))

    def receiveMsg_Revoke(self, msg: m.Revoke, sender: Any) -> None:
        if self.store is None:
            return self.send(sender, m.Reply.fail(m.FAILED, "control plane is still starting"))
        already = not self.store.revoke(msg.device, time.time())
        if self.reader is not None:
            self.send(self.reader, msg)
        self.send(sender, m.Reply(True, {"device": msg.device, "already": already}))

    def receiveMsg_ReaderState(self, msg: m.ReaderState, sender: Any) -> None:
        if sender == self.reader:
            self.state = msg

    def receiveMsg_ChildActorExited(self, msg: ChildActorExited, sender: Any) -> None:
        if msg.childAddress != self.reader or self.exiting:
            return
        delay = self.RESTART_DELAYS[min(self.restarts, len(self.RESTART_DELAYS) - 1)]
        self.restarts += 1
        self.reader, self.state = None, None
        log.warning("telemetry reader exited; restart %s in %.1fs", self.restarts, delay)
        self.wakeupAfter(delay, payload="restart")

    def receiveMsg_WakeupMessage(self, msg: WakeupMessage, sender: Any) -> None:
        if msg.payload == "restart" and self.reader is None and not self.exiting:
            self._start_reader()

    def receiveMsg_ActorExitRequest(self, msg: ActorExitRequest, sender: Any) -> None:
        self.exiting = True  # Thespian stops the reader with us
        if self.store is not None:
            self.store.close()

    def receiveUnrecognizedMessage(self, msg: Any, sender: Any) -> None:
        log.warning("telemetry collector dropped a message it does not know: %r", msg)

    def _start_reader(self) -> None:
        self.reader = self.createActor(TelemetryReader)
        self.send(self.reader, m.Configure(self.settings))

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"configured": self.settings is not None, "restarts": self.restarts}
        if self.store is not None:
            out.update(self.store.counters())
            out["offset"] = self.store.offset()
        out["reader"] = asdict(self.state) if self.state is not None else None
        out["connected"] = bool(self.state and self.state.connected)
        return out


# -- replay ----------------------------------------------------------------------


@dataclass(frozen=True)
class ReplayResult:
    read: int
    stored: int
    duplicates: int
    refused: dict[str, int]
    first_offset: int | None
    last_offset: int | None


def stream_tail(urls: list[str], quiet: float = 0.5, timeout: float = 10.0) -> int | None:
    """The last offset in the stream now (None when it is empty).

    A consumer at ``last`` receives the last chunk; the largest offset in it
    is the tail.  Its own connection: closing it with deliveries buffered
    draws a 540, which is harmless there."""
    conn = connect_blocking(urls, name="edgeward-stream-tail", timeout=timeout)
    tail: list[int] = []

    def on_message(channel: Any, method: Any, properties: Any, body: bytes) -> None:
        offset = _offset_of(properties)
        if offset is not None:
            tail.append(offset)
        channel.basic_ack(method.delivery_tag)

    try:
        channel = conn.channel()
        channel.basic_qos(prefetch_count=1000)
        channel.basic_consume(
            topology.TELEMETRY_STREAM, on_message, arguments={STREAM_OFFSET: "last"}
        )
        deadline = time.monotonic() + timeout
        seen = -1
        while time.monotonic() < deadline:
            conn.process_data_events(time_limit=quiet)
            if len(tail) == seen:
                break
            seen = len(tail)
    finally:
        try:
            conn.close()
        except Exception:
            pass
    return max(tail) if tail else None


def replay(
    broker_url: str,
    since: float,
    into: Path,
    *,
    batch: int = 1000,
    idle: float = 5.0,
    on_progress: Callable[[int], None] = lambda _: None,
) -> ReplayResult:
    """Read the telemetry stream from time ``since`` (broker arrival time,
    chunk precision) to its tail as it was when called, into the fresh store
    ``into``; classify and commit exactly as the collector does.  Stops early
    if nothing arrives for ``idle`` seconds."""
    if into.exists():
        raise FileExistsError(f"{into} exists; replay writes a fresh store")
    urls = split_urls(broker_url)
    tail = stream_tail(urls)
    store = AuditStore(into)
    # Replay keeps records without a user_id (a stream from before device
    # users, or a development fleet); one naming another device is refused.
    trust = Trust(require_user_id=False)
    pending = Batch(trust=trust)
    totals = {"read": 0, "stored": 0, "duplicates": 0}
    refused: dict[str, int] = {}
    seen: list[int] = []  # first and last offset read

    def flush(channel: Any) -> None:
        nonlocal pending
        if not pending:
            return
        done = pending.commit(store)
        for r in pending.refusals:
            refused[r.reason] = refused.get(r.reason, 0) + 1
        totals["stored"] += done.stored
        totals["duplicates"] += done.duplicates
        channel.basic_ack(pending.last_tag, multiple=True)
        pending = Batch(trust=trust)
        on_progress(totals["read"])

    conn = connect_blocking(urls, name="edgeward-audit-replay")
    try:
        if tail is not None:
            channel = conn.channel()
            channel.basic_qos(prefetch_count=prefetch_for(batch))
            state = {"done": False, "last": time.monotonic()}

            def on_message(ch: Any, method: Any, properties: Any, body: bytes) -> None:
                offset = _offset_of(properties)
                state["last"] = time.monotonic()
                if offset is None or state["done"]:
                    return
                if offset > tail:
                    state["done"] = True
                    return
                seen[:] = [seen[0] if seen else offset, offset]
                pending.add(
                    offset, method.routing_key, body, method.delivery_tag, 0.0, properties.user_id
                )
                totals["read"] += 1
                if offset == tail:
                    state["done"] = True

            start = dt.datetime.fromtimestamp(since, tz=dt.UTC)
            channel.basic_consume(
                topology.TELEMETRY_STREAM, on_message, arguments={STREAM_OFFSET: start}
            )
            while not state["done"] and time.monotonic() - state["last"] < idle:
                conn.process_data_events(time_limit=0.2)
                if len(pending) >= batch:
                    flush(channel)
            flush(channel)
    finally:
        try:
            conn.close()
        except Exception:  # buffered deliveries rejected on close: a 540, harmless
            pass
        store.close()
    return ReplayResult(
        read=totals["read"],
        stored=totals["stored"],
        duplicates=totals["duplicates"],
        refused=refused,
        first_offset=seen[0] if seen else None,
        last_offset=seen[1] if seen else None,
    )
