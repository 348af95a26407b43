"""The audit store: telemetry records in SQLite, with the stream offset they
were read up to, in one transaction.

One file (``audit.sqlite`` under ``EDGEWARD_HOME``, or a fresh file for
``edgeward audit replay``), WAL mode.  The TelemetryCollector's reader is the
only writer; queries (``edgeward alerts``) read beside it.

What makes "exactly once" hold:

* ``records`` is keyed ``(device, seq)`` and written with ``INSERT OR
  IGNORE``: a record sent twice (the agent re-sent it after a lost confirm)
  is stored once, and the ignored insert is counted as a duplicate.
* One :meth:`AuditStore.commit` writes a batch's records, its refusals, the
  counters and the stream offset of the batch's last delivery together.  A
  crash before the commit loses the whole batch *and* its offset, so the
  restart re-reads exactly that batch; a crash after it re-reads nothing.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeward.transport.wire import ALERT_KEYS, Record

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    device        TEXT    NOT NULL,
    seq           INTEGER NOT NULL,
    stream_offset INTEGER NOT NULL,  -- where it was read in the telemetry stream
    time          REAL    NOT NULL,  -- the device's clock when it saw it
    type          TEXT    NOT NULL,  -- alert | log | event
    policy        TEXT,
    action        TEXT,
    severity      INTEGER,
    operation     TEXT,
    resource      TEXT,
    source        TEXT,
    body          TEXT    NOT NULL,  -- JSON: the whole record body
    stored        REAL    NOT NULL,  -- the control plane's clock at commit
    PRIMARY KEY (device, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS records_by_offset ON records (stream_offset);
CREATE INDEX IF NOT EXISTS records_by_type_time ON records (type, time);
CREATE TABLE IF NOT EXISTS stream_position (
    stream        TEXT    PRIMARY KEY,
    stream_offset INTEGER NOT NULL,  -- the last offset whose effect is stored
    updated       REAL    NOT NULL
);
CREATE TABLE IF NOT EXISTS revoked (
    device     TEXT PRIMARY KEY,         -- its telemetry is refused ("revoked")
    revoked_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT    PRIMARY KEY,       -- stored, duplicates, refused:<reason>
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS refused (
    stream_offset INTEGER PRIMARY KEY,
    routing_key   TEXT    NOT NULL,
    reason        TEXT    NOT NULL,
    detail        TEXT    NOT NULL,
    body          BLOB    NOT NULL,  -- the first REFUSED_BODY_BYTES, kept as evidence
    stored        REAL    NOT NULL
);
"""

#: How much of a refused message is kept for forensics.
REFUSED_BODY_BYTES = 4096

#: Columns of an alert as ``edgeward alerts --json`` prints it.
ALERT_FIELDS = ("device", "seq", "time", *ALERT_KEYS)


@dataclass(frozen=True)
class Refusal:
    """A message on the stream that is not a record we accept."""

    stream_offset: int
    routing_key: str
    reason: str
    detail: str
    body: bytes


@dataclass(frozen=True)
class Committed:
    """What one commit did."""

    stored: int
    duplicates: int
    refused: int
    stream_offset: int | None


@dataclass(frozen=True)
class AlertQuery:
    """Filters of ``edgeward alerts``; ``None`` means "any"."""

    device: str | None = None
    policy: str | None = None
    severity: int | None = None  # at least this severity
    since: float | None = None  # device time, epoch seconds
    after_offset: int | None = None  # only records read after this offset
    limit: int | None = None  # the latest N (by time)


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    return str(value)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)


def _severity(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    try:
        return int(str(value))
    except ValueError:
        return None


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


class AuditStore:
    def __init__(self, path: Path, stream: str = "edgeward.telemetry") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.stream = stream
        self._db = sqlite3.connect(str(path), timeout=10, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a process crash; a power loss may drop
        # the last commits, but then their offset goes with them: re-read.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _transaction(self, mode: str = "IMMEDIATE") -> Iterator[sqlite3.Connection]:
        self._db.execute(f"BEGIN {mode}")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- the writer --------------------------------------------------------------

    def offset(self) -> int | None:
        """The last stream offset whose effect is stored; None before the first."""
        row = self._db.execute(
            "SELECT stream_offset FROM stream_position WHERE stream = ?", (self.stream,)
        ).fetchone()
        return None if row is None else int(row[0])

    def commit(
        self,
        records: Sequence[tuple[int, Record]],
        refusals: Sequence[Refusal],
        stream_offset: int | None,
        now: float | None = None,
        counters: dict[str, int] | None = None,
    ) -> Committed:
        """Store a batch: ``records`` (each with its stream offset), the
        refusals, the counters (plus ``counters``) and ``stream_offset``, in
        one transaction."""
        now = time.time() if now is None else now
        rows = []
        for offset, rec in records:
            body = rec.body if rec.type == "alert" else {}
            rows.append(
                (
                    rec.device,
                    rec.seq,
                    offset,
                    rec.time,
                    rec.type,
                    _text(body.get("policy")),
                    _text(body.get("action")),
                    _severity(body.get("severity")),
                    _text(body.get("operation")),
                    _text(body.get("resource")),
                    _text(body.get("source")),
                    _dumps(rec.body),
                    now,
                )
            )
        reasons: dict[str, int] = {}
        for refusal in refusals:
            reasons[refusal.reason] = reasons.get(refusal.reason, 0) + 1
        with self._transaction() as db:
            before = db.total_changes
            db.executemany(
                "INSERT OR IGNORE INTO records (device, seq, stream_offset, time, type, policy,"
                " action, severity, operation, resource, source, body, stored)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            stored = db.total_changes - before
            # Alerts stored by this batch, by severity and policy (offsets are
            # unique per delivery, so the batch's range holds only its rows).
            by_kind: list[tuple[Any, Any, int]] = []
            if stored and records:
                low = min(offset for offset, _ in records)
                high = max(offset for offset, _ in records)
                by_kind = db.execute(
                    "SELECT severity, policy, count(*) FROM records WHERE stream_offset"
                    " BETWEEN ? AND ? AND +type = 'alert' GROUP BY severity, policy",
                    (low, high),
                ).fetchall()
            db.executemany(
                "INSERT OR IGNORE INTO refused (stream_offset, routing_key, reason, detail, body,"
                " stored) VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (
                        r.stream_offset,
                        r.routing_key,
                        r.reason,
                        r.detail[:500],
                        r.body[:REFUSED_BODY_BYTES],
                        now,
                    )
                    for r in refusals
                ],
            )
            bumps = {"stored": stored, "duplicates": len(rows) - stored}
            bumps.update({f"refused:{reason}": n for reason, n in reasons.items()})
            for sev, pol, n in by_kind:
                bumps[f"alerts:{'none' if sev is None else sev}:{pol or ''}"] = n
            bumps.update(counters or {})
            db.executemany(
                "INSERT INTO counters (name, value) VALUES (?, ?)"
                " ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                [(name, n) for name, n in bumps.items() if n],
            )
            if stream_offset is not None:
                db.execute(
                    "INSERT INTO stream_position (stream, stream_offset, updated) VALUES (?, ?, ?)"
                    " ON CONFLICT(stream) DO UPDATE SET stream_offset = excluded.stream_offset,"
                    " updated = excluded.updated",
                    (self.stream, stream_offset, now),
                )
        return Committed(stored, len(rows) - stored, len(refusals), stream_offset)

    # -- queries -----------------------------------------------------------------

    def counters(self) -> dict[str, Any]:
        """``{"stored": n, "duplicates": n, "refused": {reason: n},
        "alerts": {"<severity>:<policy>": n}}``."""
        out: dict[str, Any] = {"stored": 0, "duplicates": 0, "refused": {}, "alerts": {}}
        for name, value in self._db.execute("SELECT name, value FROM counters"):
            kind, _, rest = name.partition(":")
            if kind in ("refused", "alerts") and rest:
                out[kind][rest] = value
            else:
                out[name] = value
        return out

    def alerts(self, query: AlertQuery) -> tuple[list[dict[str, Any]], int | None]:
        """Alerts matching ``query``, oldest first, and the highest stream
        offset stored at the time of the query (read in one snapshot, so a
        follower asking for ``after_offset`` = that offset misses nothing)."""
        where, params = ["type = 'alert'"], []
        for column, value in (("device", query.device), ("policy", query.policy)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if query.severity is not None:
            where.append("severity >= ?")
            params.append(query.severity)
        if query.since is not None:
            where.append("time >= ?")
            params.append(query.since)
        if query.after_offset is not None:
            where.append("stream_offset > ?")
            params.append(query.after_offset)
        columns = (
            "device, seq, time, policy, action, severity, operation, resource, source, body,"
            " stream_offset, stored"
        )
        sql = f"SELECT {columns} FROM records WHERE {' AND '.join(where)}"
        if query.after_offset is not None:
            sql += " ORDER BY stream_offset"
        else:
            sql += " ORDER BY time DESC, device DESC, seq DESC"
        if query.limit:
            sql += f" LIMIT {int(query.limit)}"
        with self._transaction("DEFERRED") as db:
            rows = db.execute(sql, params).fetchall()
            (high,) = db.execute("SELECT max(stream_offset) FROM records").fetchone()
        if query.after_offset is None:
            rows.reverse()
        return [_alert(row) for row in rows], high

    def count(self, type_: str | None = None) -> int:
        if type_ is None:
            return self._db.execute("SELECT count(*) FROM records").fetchone()[0]
        return self._db.execute("SELECT count(*) FROM records WHERE type = ?", (type_,)).fetchone()[
            0
        ]

    def revoke(self, device: str, when: float) -> bool:
        """Mark ``device`` revoked; False when it already was."""
        cur = self._db.execute(
            "INSERT OR IGNORE INTO revoked (device, revoked_at) VALUES (?, ?)", (device, when)
        )
        return cur.rowcount == 1

    def revoked(self) -> list[str]:
        return [d for (d,) in self._db.execute("SELECT device FROM revoked ORDER BY device")]

    def summary(self) -> dict[str, Any]:
        """What the store holds: records by type, devices, their time span,
        the stored offset and the counters (``edgeward audit status``)."""
        by_type = dict(self._db.execute("SELECT type, count(*) FROM records GROUP BY type"))
        devices, first, last = self._db.execute(
            "SELECT count(DISTINCT device), min(time), max(time) FROM records"
        ).fetchone()
        return {
            "path": str(self.path),
            "records": sum(by_type.values()),
            "by_type": by_type,
            "devices": devices,
            "first_time": first,
            "last_time": last,
            "offset": self.offset(),
            **self.counters(),
        }

    def keys(self) -> list[tuple[str, int]]:
        """Every stored ``(device, seq)``, in order (for tests and checks)."""
        return [(d, s) for d, s in self._db.execute("SELECT device, seq FROM records")]

    def latencies(self) -> Iterable[tuple[float, float]]:
        """``(device time, stored)`` of every record: the bench's raw data."""
        return self._db.execute("SELECT time, stored FROM records ORDER BY stored")


def _alert(row: tuple) -> dict[str, Any]:
    body = json.loads(row[9])
    return {
        "device": row[0],
        "seq": row[1],
        "time": row[2],
        "policy": row[3],
        "action": row[4],
        "severity": row[5],
        "operation": row[6],
        "resource": row[7],
        "source": row[8],
        "tags": body.get("tags", []),
        "message": body.get("message"),
        "revision": body.get("revision"),
        "offset": row[10],
        "stored": row[11],
    }
