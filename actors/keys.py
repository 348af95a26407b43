"""The control plane's signing keys: which one signs, which ones devices trust.

``HOME/keys/`` holds one PEM private key per key (mode 0600) and
``keyring.json``::

    {"active": "<key id>",                  # signs every bundle published now
     "pending": {"key": "<id>", "revision": n} | null,
     "keys": {"<key id>": {"public": "<base64>", "until": null | <issued_at>,
                           "file": "key-<id>.pem", "created": <time>}}}

Every bundle carries :meth:`KeyStore.keyring` (id -> public, until), signed,
and devices trust exactly that from the bundle on (transport/signing.py).

Rotation (:meth:`rotate`) makes a new key and announces it in a revision
*signed by the current key* — the only key every device already trusts; the
old key then retires: bundles issued up to ``now + overlap`` may still carry
its signature. The new key becomes active only once that revision is
confirmed by the broker (:meth:`activate`), so a control plane that crashes
in between publishes the announcement again with the old key. Revocation
(:meth:`revoke`) drops a key from the keyring at once (not the active one:
rotate first).

A home from before keyrings has only ``signing.pem``: it becomes the one key.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from edgeward.transport.signing import Signer

from .config import write_private


class KeyringError(ValueError):
    """A key operation that cannot be done (unknown id, revoking the active key)."""


class KeyStore:
    def __init__(self, home: str) -> None:
        self.dir = Path(home) / "keys"
        self.path = self.dir / "keyring.json"
        self.data = self._load()
        self.signers: dict[str, Signer] = {}

    # -- reading -----------------------------------------------------------------

    def _load(self) -> dict[str, Any]:
        if self.path.exists():
            return json.loads(self.path.read_text())
        signer = Signer.load_or_create(self.dir / "signing.pem")  # the first, or an old home's
        data = {
            "active": signer.key_id,
            "pending": None,
            "keys": {
                signer.key_id: {
                    "public": signer.public_b64,
                    "until": None,
                    "file": "signing.pem",
                    "created": time.time(),
                }
            },
        }
        self._save(data)
        return data

    def _save(self, data: dict[str, Any]) -> None:
        write_private(self.path, json.dumps(data, indent=2, sort_keys=True) + "\n")

    @property
    def active(self) -> str:
        return str(self.data["active"])

    @property
    def pending(self) -> dict[str, Any] | None:
        return self.data.get("pending")

    def signer(self, key_id: str | None = None) -> Signer:
        """The private key ``key_id`` (default: the active one)."""
        key_id = key_id or self.active
        if key_id not in self.signers:
            entry = self.data["keys"][key_id]
            signer = Signer.load_or_create(self.dir / entry["file"])
            if signer.key_id != key_id:
                raise ValueError(f"{self.dir / entry['file']}: holds key {signer.key_id}")
            self.signers[key_id] = signer
        return self.signers[key_id]

    def keyring(self) -> dict[str, dict[str, Any]]:
        """What bundles carry: key id -> public key and until."""
        return {
            k: {"public": e["public"], "until": e["until"]}
            for k, e in sorted(self.data["keys"].items())
        }

    def rows(self) -> list[dict[str, Any]]:
        pending = (self.pending or {}).get("key")
        return [
            {
                "key_id": k,
                "state": "active"
                if k == self.active
                else "pending"
                if k == pending
                else "retiring"
                if e["until"] is not None
                else "trusted",
                "until": e["until"],
                "created": e.get("created"),
            }
            for k, e in sorted(self.data["keys"].items(), key=lambda kv: kv[1].get("created", 0))
        ]

    # -- changing ----------------------------------------------------------------

    def rotate(self, overlap: float, now: float | None = None) -> Signer:
        """A new key, trusted from now on; the active one retires after
        ``overlap`` seconds. Stays pending until :meth:`activate`."""
        if self.pending:
            raise KeyringError(f"key {self.pending['key']} is still being announced; try again")
        now = time.time() if now is None else now
        signer = Signer.generate()
        file = f"key-{signer.key_id}.pem"
        signer.save(self.dir / file)
        data = json.loads(json.dumps(self.data))
        data["keys"][self.active]["until"] = now + overlap
        data["keys"][signer.key_id] = {
            "public": signer.public_b64,
            "until": None,
            "file": file,
            "created": now,
        }
        data["pending"] = {"key": signer.key_id, "revision": None}
        self._save(data)
        self.data = data
        self.signers[signer.key_id] = signer
        return signer

    def announce(self, revision: int) -> None:
        """The revision that carries the pending key's announcement."""
        if self.pending:
            self.data["pending"]["revision"] = revision
            self._save(self.data)

    def activate(self) -> str | None:
        """The pending key signs from now on (its announcement was confirmed)."""
        pending = self.pending
        if not pending:
            return None
        self.data["active"] = pending["key"]
        self.data["pending"] = None
        self._save(self.data)
        return str(pending["key"])

    def abandon(self) -> None:
        """The announcement never went out: forget the pending key."""
        pending = self.pending
        if not pending:
            return
        key = pending["key"]
        self.data["keys"].pop(key, None)
        self.data["keys"][self.active]["until"] = None
        self.data["pending"] = None
        self._save(self.data)

    def revoke(self, key_id: str) -> None:
        if key_id not in self.data["keys"]:
            raise KeyringError(f"no key {key_id!r} (see `edgeward keys list`)")
        if key_id == self.active:
            raise KeyringError(f"{key_id} signs now: rotate first (`edgeward keys rotate`)")
        if self.pending and key_id == self.pending["key"]:
            raise KeyringError(f"{key_id} is being announced; wait for it")
        entry = self.data["keys"].pop(key_id)
        self._save(self.data)
        pem = self.dir / entry["file"]
        if pem.exists():
            os.replace(pem, pem.with_name(pem.name + ".revoked"))
        self.signers.pop(key_id, None)
