"""Ed25519 signing of bundles, with key ids, and the keyring devices trust.

The control plane signs with its active private key (PEM, mode 0600, under
``EDGEWARD_HOME/keys``); devices hold the public keys they trust, by key id.
The key id is the first 16 hex digits of the SHA-256 of the raw public key,
so a device can name the key a bundle claims without trusting the claim.

Rotation and revocation travel in the bundles themselves: every bundle
carries the fleet's keyring (``Bundle.keyring``: key id -> public key and
``until``), signed like the rest of it. A device that accepted a bundle
trusts exactly that keyring from then on: a new key is trusted as soon as a
bundle signed by a key it already trusts announces it; a retiring key only
for bundles issued (``issued_at``, the control plane's signed clock, never
the device's) up to its ``until``; a key left out is no longer trusted at
all (revoked).
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from .errors import RemoteProtocolError
from .wire import Bundle, SignedBundle


def key_id_of(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:16]


@dataclass(frozen=True)
class Signer:
    private_key: Ed25519PrivateKey

    @property
    def public_raw(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def key_id(self) -> str:
        return key_id_of(self.public_raw)

    @property
    def public_b64(self) -> str:
        return base64.b64encode(self.public_raw).decode()

    def sign(self, bundle: Bundle) -> SignedBundle:
        body = bundle.encode_body()
        return SignedBundle(key_id=self.key_id, sig=self.private_key.sign(body), body=body)

    @classmethod
    def generate(cls) -> Signer:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: Path) -> Signer:
        """Load the PEM key at ``path``; make one (mode 0600) if there is none."""
        if path.exists():
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError(f"{path}: not an Ed25519 private key")
            return cls(key)
        signer = cls.generate()
        signer.save(path)
        return signer

    def save(self, path: Path) -> None:
        """Write the private key as PEM to a new file, mode 0600."""
        pem = self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
            fh.flush()
            os.fsync(fh.fileno())


class Verifier:
    """Checks signatures against a set of trusted public keys by key id,
    each trusted for bundles issued up to its ``until`` (None: no end)."""

    def __init__(
        self, trusted: dict[str, str | bytes], until: dict[str, float | None] | None = None
    ) -> None:
        self._keys: dict[str, Ed25519PublicKey] = {}
        self._public: dict[str, str] = {}
        self._until: dict[str, float | None] = {}
        for key_id, public in trusted.items():
            try:
                raw = base64.b64decode(public, validate=True) if isinstance(public, str) else public
                key = Ed25519PublicKey.from_public_bytes(raw)
            except ValueError:  # binascii.Error is one
                raise ValueError(f"key {key_id}: not a base64 Ed25519 public key") from None
            if key_id_of(raw) != key_id:
                raise ValueError(f"key id {key_id} does not match its public key")
            self._keys[key_id] = key
            self._public[key_id] = base64.b64encode(raw).decode()
            self._until[key_id] = (until or {}).get(key_id)

    @classmethod
    def from_keyring(cls, keyring: dict[str, dict[str, Any]]) -> Verifier:
        """A verifier for a ``Bundle.keyring`` (ValueError when a key is bad)."""
        return cls(
            {k: e["public"] for k, e in keyring.items()},
            {k: e["until"] for k, e in keyring.items()},
        )

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._keys)

    @property
    def keyring(self) -> dict[str, dict[str, Any]]:
        """What this verifier trusts, in ``Bundle.keyring`` form."""
        return {k: {"public": self._public[k], "until": self._until[k]} for k in sorted(self._keys)}

    def rekeyed(self, keyring: dict[str, dict[str, Any]]) -> Verifier:
        """The verifier to use once a bundle announcing ``keyring`` was accepted
        (self when nothing changes; ValueError when a key in it is bad)."""
        if not keyring or keyring == self.keyring:
            return self
        return type(self).from_keyring(keyring)

    def verify(self, signed: SignedBundle) -> Bundle:
        """Return the bundle inside ``signed`` or raise RemoteProtocolError."""
        key = self._keys.get(signed.key_id)
        if key is None:
            raise RemoteProtocolError("unknown_key", signed.key_id)
        try:
            key.verify(signed.sig, signed.body)
        except InvalidSignature:
            raise RemoteProtocolError("bad_signature", f"key {signed.key_id}") from None
        bundle = Bundle.decode_body(signed.body)
        until = self._until.get(signed.key_id)
        if until is not None and bundle.issued_at > until:
            raise RemoteProtocolError(
                "key_expired", f"key {signed.key_id} retired for bundles after {until:.0f}"
            )
        return bundle


class CachingVerifier(Verifier):
    """Verifies identical envelope bytes once (the simulator's ``--verify cached``)."""

    def __init__(
        self, trusted: dict[str, str | bytes], until: dict[str, float | None] | None = None
    ) -> None:
        super().__init__(trusted, until)
        self._seen: dict[tuple[str, bytes, bytes], Bundle] = {}

    def verify(self, signed: SignedBundle) -> Bundle:
        key = (signed.key_id, signed.sig, signed.body)
        bundle = self._seen.get(key)
        if bundle is None:
            bundle = super().verify(signed)
            self._seen[key] = bundle
        return bundle
