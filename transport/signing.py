"""Ed25519 signing of bundles, with key ids.

The control plane holds one private key (PEM, mode 0600, under
``EDGEWARD_HOME``); devices hold the public keys they trust, by key id.  The
key id is the first 16 hex digits of the SHA-256 of the raw public key, so a
device can name the key a bundle claims without trusting the claim.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

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
        pem = signer.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        return signer


class Verifier:
    """Checks signatures against a set of trusted public keys by key id."""

    def __init__(self, trusted: dict[str, str | bytes]) -> None:
        self._keys: dict[str, Ed25519PublicKey] = {}
        for key_id, public in trusted.items():
            raw = base64.b64decode(public) if isinstance(public, str) else public
            if key_id_of(raw) != key_id:
                raise ValueError(f"key id {key_id} does not match its public key")
            self._keys[key_id] = Ed25519PublicKey.from_public_bytes(raw)

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._keys)

    def verify(self, signed: SignedBundle) -> Bundle:
        """Return the bundle inside ``signed`` or raise RemoteProtocolError."""
        key = self._keys.get(signed.key_id)
        if key is None:
            raise RemoteProtocolError("unknown_key", signed.key_id)
        try:
            key.verify(signed.sig, signed.body)
        except InvalidSignature:
            raise RemoteProtocolError("bad_signature", f"key {signed.key_id}") from None
        return Bundle.decode_body(signed.body)


class CachingVerifier(Verifier):
    """Verifies identical envelope bytes once (the simulator's ``--verify cached``)."""

    def __init__(self, trusted: dict[str, str | bytes]) -> None:
        super().__init__(trusted)
        self._seen: dict[tuple[str, bytes, bytes], Bundle] = {}

    def verify(self, signed: SignedBundle) -> Bundle:
        key = (signed.key_id, signed.sig, signed.body)
        bundle = self._seen.get(key)
        if bundle is None:
            bundle = super().verify(signed)
            self._seen[key] = bundle
        return bundle
