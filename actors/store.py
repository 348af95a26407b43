"""The control plane's SQLite store: revisions and devices.

One file under ``EDGEWARD_HOME``, WAL mode, opened by the actors that need
it.  Every fleet revision keeps its whole desired state, so history,
rollback and snapshots need nothing else.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeward.enforcement.digest import state_digest

SCHEMA = """
CREATE TABLE IF NOT EXISTS revisions (
    revision   INTEGER PRIMARY KEY,
    issued_at  REAL    NOT NULL,
    action     TEXT    NOT NULL,
    summary    TEXT    NOT NULL,
    state      TEXT    NOT NULL,   -- JSON: every policy document in force
    changed    TEXT    NOT NULL,   -- JSON: names added or changed
    deleted    TEXT    NOT NULL,   -- JSON: names removed
    digest     TEXT    NOT NULL,
    published  INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS devices (
    device      TEXT PRIMARY KEY,
    labels      TEXT NOT NULL,
    enrolled_at REAL NOT NULL,
    reported    TEXT,              -- JSON: the last heartbeat
    last_seen   REAL
);
CREATE TABLE IF NOT EXISTS revoked (
    device     TEXT PRIMARY KEY,
    revoked_at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Revision:
    revision: int
    issued_at: float
    action: str
    summary: str
    state: dict[str, dict[str, Any]]
    changed: list[str]
    deleted: list[str]
    digest: str
    published: bool


@dataclass(frozen=True)
class DeviceRow:
    device: str
    labels: dict[str, str]
    enrolled_at: float
    reported: dict[str, Any] | None
    last_seen: float | None


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(str(path), timeout=10, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    # -- revisions -------------------------------------------------------------

    def _revision(self, row: tuple) -> Revision:
        return Revision(
            revision=row[0],
            issued_at=row[1],
            action=row[2],
            summary=row[3],
            state=json.loads(row[4]),
            changed=json.loads(row[5]),
            deleted=json.loads(row[6]),
            digest=row[7],
            published=bool(row[8]),
        )

    _COLUMNS = "revision, issued_at, action, summary, state, changed, deleted, digest, published"

    def latest(self) -> Revision | None:
        row = self._db.execute(
            f"SELECT {self._COLUMNS} FROM revisions ORDER BY revision DESC LIMIT 1"
        ).fetchone()
        return self._revision(row) if row else None

    def revision(self, number: int) -> Revision | None:
        row = self._db.execute(
            f"SELECT {self._COLUMNS} FROM revisions WHERE revision = ?", (number,)
        ).fetchone()
        return self._revision(row) if row else None

    def revisions(self) -> Iterator[Revision]:
        for row in self._db.execute(f"SELECT {self._COLUMNS} FROM revisions ORDER BY revision"):
            yield self._revision(row)

    def add_revision(
        self,
        *,
        issued_at: float,
        action: str,
        summary: str,
        state: Mapping[str, Mapping[str, Any]],
        changed: list[str],
        deleted: list[str],
    ) -> Revision:
        latest = self.latest()
        number = 1 if latest is None else latest.revision + 1
        digest = state_digest(state.values())
        self._db.execute(
            "INSERT INTO revisions (revision, issued_at, action, summary, state, changed,"
            " deleted, digest, published) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0)",
            (
                number,
                issued_at,
                action,
                summary,
                _dumps(state),
                _dumps(changed),
                _dumps(deleted),
                digest,
            ),
        )
        return self.revision(number)  # type: ignore[return-value]

    def drop_revision(self, number: int) -> None:
        self._db.execute("DELETE FROM revisions WHERE revision = ? AND published = 0", (number,))

    def mark_published(self, number: int) -> None:
        self._db.execute("UPDATE revisions SET published = 1 WHERE revision = ?", (number,))

    def unpublished(self) -> list[Revision]:
        return [r for r in self.revisions() if not r.published]

    # -- devices ---------------------------------------------------------------

    def enroll(self, device: str, labels: Mapping[str, str], when: float) -> None:
        self._db.execute(
            "INSERT INTO devices (device, labels, enrolled_at) VALUES (?, ?, ?)"
            " ON CONFLICT(device) DO UPDATE SET labels = excluded.labels",
            (device, _dumps(dict(labels)), when),
        )

    def devices(self) -> list[DeviceRow]:
        rows = self._db.execute(
            "SELECT device, labels, enrolled_at, reported, last_seen FROM devices ORDER BY device"
        )
        return [
            DeviceRow(r[0], json.loads(r[1]), r[2], json.loads(r[3]) if r[3] else None, r[4])
            for r in rows
        ]

    def revoke(self, device: str, when: float) -> None:
        self._db.execute(
            "INSERT OR IGNORE INTO revoked (device, revoked_at) VALUES (?, ?)", (device, when)
        )

    def revoked(self) -> list[str]:
        return [d for (d,) in self._db.execute("SELECT device FROM revoked ORDER BY device")]

    def save_reports(self, reports: Mapping[str, tuple[dict[str, Any], float]]) -> None:
        """Store many devices' last heartbeats in one transaction."""
        if not reports:
            return
        with self._transaction():
            self._db.executemany(
                "UPDATE devices SET reported = ?, last_seen = ? WHERE device = ?",
                [(_dumps(rep), seen, dev) for dev, (rep, seen) in reports.items()],
            )

    def _transaction(self):
        db = self._db

        class _Tx:
            def __enter__(self):
                db.execute("BEGIN")

            def __exit__(self, exc_type, *_):
                db.execute("ROLLBACK" if exc_type else "COMMIT")

        return _Tx()
