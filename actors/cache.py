"""The agent's disk cache: one sqlitedict file, one record, one write.

The record is the agent core's :class:`CacheRecord`; it is stored as CBOR
(not pickle: the cache is data, never code) and committed before the
delivery behind it is acked.

:class:`TrustFile` is kept apart from the cache (beside its directory by
default): the highest revision the device accepted (the core's *floor*) and
the signing keys it trusts now. A wiped cache leaves it, so the device
neither goes back to an older revision nor trusts again a key it saw revoked
(the core's rules 14-15).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import cbor2
from sqlitedict import SqliteDict

from .config import write_private
from .core import CacheRecord

_KEY = "policy"


class AgentCache:
    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "cache.sqlite"
        #: Where a damaged cache file was moved, if one was found at start.
        self.set_aside: Path | None = None
        if self.path.exists() and not self._readable():
            # A damaged file must not keep the device from starting: keep it
            # for forensics and start empty.
            self.set_aside = self.path.with_name(f"cache.sqlite.damaged-{int(time.time())}")
            os.replace(self.path, self.set_aside)
        self._db = self._open()

    def _readable(self) -> bool:
        try:
            with closing(sqlite3.connect(str(self.path))) as db:
                db.execute("PRAGMA schema_version").fetchone()
            return True
        except sqlite3.DatabaseError:
            return False

    def _open(self) -> SqliteDict:
        return SqliteDict(
            str(self.path),
            tablename="agent",
            encode=cbor2.dumps,
            decode=cbor2.loads,
            autocommit=False,
            outer_stack=False,
        )

    def load(self) -> CacheRecord | None:
        try:
            raw = self._db.get(_KEY)
        except Exception:  # a damaged file: start empty, the core counts it
            return None
        if not isinstance(raw, dict):
            return None
        try:
            return CacheRecord(
                revision=int(raw["revision"]),
                offset=raw["offset"],
                applied_revision=int(raw["applied_revision"]),
                fleet=tuple(raw["fleet"]),
                bundle=bytes(raw["bundle"]),
                digest=str(raw.get("digest", "")),
            )
        except (KeyError, TypeError, ValueError):
            return None

    def store(self, record: CacheRecord) -> None:
        self._db[_KEY] = {
            "revision": record.revision,
            "offset": record.offset,
            "applied_revision": record.applied_revision,
            "fleet": list(record.fleet),
            "bundle": record.bundle,
            "digest": record.digest,
        }
        self._db.commit(blocking=True)

    def close(self) -> None:
        self._db.close()


class TrustFile:
    """``{"v": 1, "floor": int, "keyring": {key id: {"public", "until"}}}`` in
    one small JSON file, replaced atomically (written, fsynced, renamed)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.problem = ""  # why the file was not used, if it was not

    def load(self) -> tuple[int, dict[str, Any]]:
        """The floor and keyring kept; (0, {}) when there is no usable file."""
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return 0, {}
        except (OSError, ValueError) as exc:
            self.problem = f"{self.path}: unreadable ({exc})"
            return 0, {}
        floor, keyring = data.get("floor"), data.get("keyring")
        if (
            not isinstance(data, dict)
            or not isinstance(floor, int)
            or floor < 0
            or not isinstance(keyring, dict)
        ):
            self.problem = f"{self.path}: not a trust file"
            return 0, {}
        return floor, keyring

    def store(self, floor: int, keyring: dict[str, Any]) -> None:
        data = json.dumps({"v": 1, "floor": floor, "keyring": keyring}, sort_keys=True)
        write_private(self.path, data + "\n")
