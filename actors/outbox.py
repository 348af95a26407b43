"""The telemetry outbox: every record a device produces, on disk first, and
the sender that drains it to the broker with publisher confirms.

:class:`Outbox` — one SQLite file (``outbox.sqlite`` beside the cache) in WAL
mode with ``synchronous=FULL``.  :meth:`Outbox.accept` numbers the records
(``seq``, per device, from 1, never reused: the next number is kept in the
file), writes them and commits before it returns, so a kill -9 (or a power
cut) at any instant loses nothing it accepted.  It is bounded by a count and
a byte size; past either bound the oldest record of the lowest priority goes
first (logs before alerts and events, :data:`~edgeward.transport.wire.RECORD_TYPES`),
never one the sender has in flight, and every drop is counted by type in the
same transaction.  A records table and a small key/value table::

    records(seq INTEGER PRIMARY KEY, type TEXT, priority INTEGER, size INTEGER, data BLOB)
    meta(key TEXT PRIMARY KEY, value)   -- next_seq, dropped:<type>,
                                        -- reported:<type>, source:<name>

``data`` is the encoded :class:`~edgeward.transport.wire.Record`, published
as it is.  ``source:<name>`` lets an input (the ``--events-from`` reader)
store how far it read in the same transaction as the records it made, so a
restart neither loses nor repeats a line.

:class:`Sender` — publishes the oldest records first on a channel of its own
with ``confirm_delivery`` (``mandatory``, persistent, ``message_id``
``<device>:<seq>``), at most ``window`` unconfirmed, at most ``rate`` per
second; after each (re)connect with more than one window waiting it starts a
random ``[0, jitter]`` seconds later, so a fleet coming back together does
not arrive at once.  A record leaves the
outbox only when the broker confirmed it; a nack, a return (unroutable: the
stream is not bound) or a lost channel leaves it there to be sent again, so
the collector may see a record twice and deduplicates by (device, seq).
It times each publish to its confirm (:class:`ConfirmLatency`); the agent
hands the counts to the control plane in its next heartbeat.
"""

from __future__ import annotations

import random
import sqlite3
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pika

from edgeward.transport import topology
from edgeward.transport.connection import cancel_timer
from edgeward.transport.wire import CONFIRM_BUCKETS, CONTENT_TYPE, RECORD_TYPES, Record

DEFAULT_MAX_RECORDS = 10_000
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
_REPORT_BYTES = 256  # room made for a drop report (its encoding is ~150 bytes)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY,
    type TEXT NOT NULL,
    priority INTEGER NOT NULL,
    size INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS records_by_priority ON records (priority, seq);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value);
"""


def over_bounds(
    count: int,
    size: int,
    max_records: int,
    max_bytes: int,
    extra_records: int = 0,
    extra_bytes: int = 0,
) -> bool:
    """Whether an outbox holding ``count`` records of ``size`` bytes must drop
    one to make room for ``extra_records`` more of ``extra_bytes`` (the rule
    of this outbox and of the simulator's in-memory one)."""
    return count > 0 and (count + extra_records > max_records or size + extra_bytes > max_bytes)


def drop_report(
    totals: Counter[str], reported: Counter[str], max_records: int, max_bytes: int
) -> dict[str, Any]:
    """The body of a ``dropped`` event: the drops by type since the first
    start, and since the last report."""
    return {
        "event": "dropped",
        "dropped": dict(totals),
        "since_last_report": {k: n - reported[k] for k, n in totals.items()},
        "max_records": max_records,
        "max_bytes": max_bytes,
    }


class Outbox:
    """Records waiting for the broker, on disk, numbered, bounded."""

    def __init__(
        self,
        path: Path,
        device: str,
        *,
        max_records: int = DEFAULT_MAX_RECORDS,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        if max_records < 1 or max_bytes < 1:
            raise ValueError("the outbox bounds must be positive")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.device = device
        self.max_records = max_records
        self.max_bytes = max_bytes
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        meta = dict(self._db.execute("SELECT key, value FROM meta"))
        self.next_seq = int(meta.get("next_seq", 1))
        self.dropped: Counter[str] = Counter()
        self.reported: Counter[str] = Counter()
        for key, value in meta.items():
            kind, _, name = key.partition(":")
            if kind == "dropped":
                self.dropped[name] = int(value)
            elif kind == "reported":
                self.reported[name] = int(value)
        self.count = self.bytes = 0
        self._recount()
        #: seqs published and not yet confirmed: never dropped (they may arrive).
        self.in_flight: set[int] = set()
        #: called after records were accepted (the sender wakes up).
        self.on_accept: Callable[[], None] | None = None
        self.accepted: Counter[str] = Counter()  # since this process started

    def __len__(self) -> int:
        return self.count

    # -- accepting -------------------------------------------------------------

    def accept(self, type: str, body: Mapping[str, Any], now: float) -> Record:
        """Number one record and keep it; committed when this returns."""
        return self.accept_many([(type, body)], now)[0]

    def accept_many(
        self,
        items: Iterable[tuple[str, Mapping[str, Any]]],
        now: float,
        *,
        source: tuple[str, Any] | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> list[Record]:
        """Number and keep several records in one transaction.

        ``source`` is ``(name, position)``: stored with the records, so an
        input can resume after exactly what was accepted (:meth:`position`).
        ``meta`` are more keys to store in the same transaction.
        """
        extra = dict(meta or {})
        if source is not None:
            extra[f"source:{source[0]}"] = source[1]
        records: list[Record] = []
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            seq = self.next_seq
            dropped: Counter[str] = Counter()
            for kind, body in items:
                records.append(self._insert(kind, body, now, seq))
                seq += 1
                dropped += self._enforce_bounds()
            db.execute("INSERT OR REPLACE INTO meta VALUES ('next_seq', ?)", (seq,))
            for kind in dropped:
                db.execute(
                    "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                    (f"dropped:{kind}", self.dropped[kind] + dropped[kind]),
                )
            for key, value in extra.items():
                db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            self._recount()
            raise
        self.next_seq = seq
        self.dropped += dropped
        for record in records:
            self.accepted[record.type] += 1
        if records and self.on_accept is not None:
            self.on_accept()
        return records

    def _insert(self, kind: str, body: Mapping[str, Any], now: float, seq: int) -> Record:
        record = Record(self.device, seq, now, kind, dict(body))
        data = record.encode()
        self._db.execute(
            "INSERT INTO records (seq, type, priority, size, data) VALUES (?, ?, ?, ?, ?)",
            (seq, kind, RECORD_TYPES[kind], len(data), data),
        )
        self.count += 1
        self.bytes += len(data)
        return record

    def _enforce_bounds(self, extra_records: int = 0, extra_bytes: int = 0) -> Counter[str]:
        """Drop the oldest of the lowest priority until within both bounds
        (with room for ``extra_records`` more of ``extra_bytes``)."""
        dropped: Counter[str] = Counter()
        while over_bounds(
            self.count, self.bytes, self.max_records, self.max_bytes, extra_records, extra_bytes
        ):
            rows = self._db.execute(
                "SELECT seq, type, size FROM records ORDER BY priority, seq LIMIT ?",
                (len(self.in_flight) + 1,),
            ).fetchall()
            victim = next((r for r in rows if r[0] not in self.in_flight), rows[0])
            self._db.execute("DELETE FROM records WHERE seq = ?", (victim[0],))
            self.count -= 1
            self.bytes -= victim[2]
            dropped[victim[1]] += 1
        return dropped

    def _recount(self) -> None:
        count, size = self._db.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM records"
        ).fetchone()
        self.count, self.bytes = int(count), int(size)

    def position(self, source: str) -> Any:
        """What ``accept_many(..., source=(source, position))`` stored last (None if never)."""
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (f"source:{source}",))
        found = row.fetchone()
        return None if found is None else found[0]

    # -- drops, reported once per change -----------------------------------------

    def report_drops(self, now: float) -> Record | None:
        """If records were dropped since the last report, accept one ``dropped``
        event saying how many of each type (in all, and since that report).

        Room for the report is made first, so the totals it carries include
        what making room for it cost."""
        if self.dropped == self.reported:
            return None
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            made_room = self._enforce_bounds(extra_records=1, extra_bytes=_REPORT_BYTES)
            totals = self.dropped + made_room
            body = drop_report(totals, self.reported, self.max_records, self.max_bytes)
            record = self._insert("event", body, now, self.next_seq)
            after = self._enforce_bounds()  # only if the report was larger than thought
            db.execute("INSERT OR REPLACE INTO meta VALUES ('next_seq', ?)", (record.seq + 1,))
            for kind, n in (totals + after).items():
                db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (f"dropped:{kind}", n))
            for kind, n in totals.items():
                db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (f"reported:{kind}", n))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            self._recount()
            raise
        self.next_seq = record.seq + 1
        self.dropped = totals + after
        self.reported = Counter(totals)
        self.accepted["event"] += 1
        if self.on_accept is not None:
            self.on_accept()
        return record

    # -- the sender's side -------------------------------------------------------

    def after(self, seq: int, limit: int) -> list[tuple[int, str, bytes]]:
        """Up to ``limit`` records with a seq above ``seq``, oldest first."""
        return self._db.execute(
            "SELECT seq, type, data FROM records WHERE seq > ? ORDER BY seq LIMIT ?",
            (seq, limit),
        ).fetchall()

    def delete(self, seqs: Iterable[int]) -> None:
        """Forget records the broker confirmed (one transaction)."""
        seqs = list(seqs)
        if not seqs:
            return
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for seq in seqs:
                row = db.execute("DELETE FROM records WHERE seq = ? RETURNING size", (seq,))
                found = row.fetchone()
                if found is not None:
                    self.count -= 1
                    self.bytes -= found[0]
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            self._recount()
            raise

    def close(self) -> None:
        self._db.close()


class ConfirmLatency:
    """Publish-to-confirm times, counted in :data:`CONFIRM_BUCKETS` until taken."""

    def __init__(self) -> None:
        self.counts = [0] * (len(CONFIRM_BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        i = 0
        while i < len(CONFIRM_BUCKETS) and seconds > CONFIRM_BUCKETS[i]:
            i += 1
        self.counts[i] += 1
        self.total += seconds

    def take(self) -> tuple[tuple[int, ...], float]:
        """The counts and their sum since the last take (nothing: ``((), 0.0)``)."""
        if not any(self.counts):
            return (), 0.0
        taken = tuple(self.counts), self.total
        self.counts = [0] * len(self.counts)
        self.total = 0.0
        return taken


class Sender:
    """Drains an :class:`Outbox` over one confirm-mode channel at a time (the
    policy channel: publishes made beside the sender's are counted in with
    :meth:`count_publish`)."""

    def __init__(
        self,
        outbox: Outbox,
        loop: Any,
        *,
        window: int = 100,
        rate: float = 100.0,
        jitter: float = 60.0,
        retry_delay: float = 5.0,
        rng: random.Random | None = None,
        clock: Callable[[], float],
        say: Callable[[str], None] = lambda line: None,
        user_id: str | None = None,
    ) -> None:
        if window < 1 or rate <= 0 or jitter < 0:
            raise ValueError("window and rate must be positive, jitter not negative")
        self.outbox = outbox
        self.loop = loop  # anything with call_later(delay, fn) -> handle with cancel()
        self.window = window
        self.rate = rate
        self.jitter = jitter
        self.retry_delay = retry_delay
        self.rng = rng or random.Random()
        self.clock = clock
        self.say = say
        self.user_id = user_id  # the device's broker login, stamped on every publish
        self.channel: Any = None
        self.draining = False  # the start delay after attach has passed
        self.sent = 0  # publishes, repeats included
        self.confirmed = 0
        self._tags: OrderedDict[int, int] = OrderedDict()  # delivery tag -> seq
        self._sent_at: dict[int, float] = {}  # delivery tag -> clock() at publish
        self.latency = ConfirmLatency()
        self._next_tag = 0
        self._cursor = 0  # highest seq published on this channel
        self._returned: set[int] = set()
        self._timer: Any = None
        self._tokens = 0.0
        self._refilled = 0.0
        outbox.on_accept = self.wake

    # -- channel life ----------------------------------------------------------

    def attach(self, channel: Any) -> None:
        """A fresh channel: switch confirms on, then drain after a random delay."""
        self.channel = channel
        self._reset()
        channel.add_on_return_callback(self._on_return)
        channel.confirm_delivery(self._on_confirm, callback=lambda _frame: self._confirming())

    def count_publish(self) -> None:
        """Someone else published on this channel (the shell's heartbeat): in
        confirm mode it took the next delivery tag, so the sender's own
        publishes are numbered after it; its confirm is ignored."""
        if self.channel is not None:
            self._next_tag += 1

    def _confirming(self) -> None:
        # A backlog of at most one window costs the broker nothing: send it at
        # once.  A bigger one (the device was offline) waits a random delay, so
        # a fleet coming back together spreads its backlogs out.
        delay = self.rng.uniform(0, self.jitter) if len(self.outbox) > self.window else 0.0
        self._schedule(delay, self._start)

    def _start(self) -> None:
        self._timer = None
        self.draining = True
        self._tokens = min(float(self.window), self.rate)
        self._refilled = self.clock()
        self.pump()

    def detach(self) -> None:
        """The channel is gone: what was in flight stays in the outbox."""
        self.channel = None
        self._reset()

    def _reset(self) -> None:
        self.draining = False
        if self._timer is not None:
            cancel_timer(self.loop, self._timer)
            self._timer = None
        self._tags.clear()
        self._sent_at.clear()
        self._next_tag = 0
        self._cursor = 0
        self._returned.clear()
        self.outbox.in_flight.clear()

    def _schedule(self, delay: float, fn: Callable[[], None]) -> None:
        if self._timer is not None:
            cancel_timer(self.loop, self._timer)
        self._timer = self.loop.call_later(delay, fn)

    # -- sending -----------------------------------------------------------------

    def wake(self) -> None:
        """New records were accepted: send them if the pace allows."""
        if self.draining and self._timer is None:
            self.pump()

    def pump(self) -> None:
        self._timer = None
        channel = self.channel
        if not self.draining or channel is None or not channel.is_open:
            return
        now = self.clock()
        self._tokens = min(
            float(max(self.window, 1)), self._tokens + (now - self._refilled) * self.rate
        )
        self._refilled = now
        room = min(self.window - len(self._tags), int(self._tokens + 1e-9))
        if room <= 0:
            if len(self._tags) < self.window:  # paced: wait for the next token
                self._schedule(self._next_token(), self.pump)
            return  # else the window is full: a confirm pumps again
        rows = self.outbox.after(self._cursor, room)
        device = self.outbox.device
        for seq, kind, data in rows:
            channel.basic_publish(
                topology.TELEMETRY_EXCHANGE,
                f"telemetry.{device}.{kind}",
                data,
                pika.BasicProperties(
                    content_type=CONTENT_TYPE,
                    delivery_mode=2,
                    message_id=f"{device}:{seq}",
                    user_id=self.user_id,
                ),
                mandatory=True,
            )
            self._next_tag += 1
            self._tags[self._next_tag] = seq
            self._sent_at[self._next_tag] = self.clock()
            self.outbox.in_flight.add(seq)
            self._cursor = seq
            self.sent += 1
        self._tokens -= len(rows)
        if len(rows) == room and len(self._tags) < self.window:
            self._schedule(self._next_token(), self.pump)

    def _next_token(self) -> float:
        """Seconds until one more record may go (at least 1 ms: no busy loop)."""
        return max(0.001, (1.0 - self._tokens) / self.rate)

    # -- confirms ------------------------------------------------------------------

    def _on_return(self, _channel: Any, _method: Any, properties: Any, _body: bytes) -> None:
        # Unroutable (the telemetry stream is not bound): confirmed next, but
        # not stored anywhere.  Keep it and try again later.
        _, _, seq = str(properties.message_id or "").rpartition(":")
        if seq.isdigit():
            self._returned.add(int(seq))

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        tag = method.delivery_tag
        if method.multiple:
            tags = [t for t in self._tags if t <= tag]
        else:
            tags = [tag] if tag in self._tags else []
        seqs = [self._tags.pop(t) for t in tags]
        now = self.clock()
        sent_at = [self._sent_at.pop(t, now) for t in tags]
        for seq in seqs:
            self.outbox.in_flight.discard(seq)
        if isinstance(method, pika.spec.Basic.Ack):
            done = [s for s in seqs if s not in self._returned]
            again = [s for s in seqs if s in self._returned]
            self.outbox.delete(done)
            self.confirmed += len(done)
            for when in sent_at:
                self.latency.observe(now - when)
        else:
            again = seqs
        self._returned.difference_update(seqs)
        if again:
            # Send them again from the oldest, after a pause (a nack or a
            # missing binding rarely clears at once); repeats are deduplicated.
            self.say(f"telemetry: {len(again)} records not taken by the broker; will resend")
            self._cursor = min(self._cursor, min(again) - 1)
            self._schedule(self.retry_delay, self.pump)
            return
        if self._timer is None:
            self.pump()
