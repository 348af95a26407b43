"""How the agent reaches the local KubeArmor daemon: address, TLS, keepalive.

Kept apart from ``backend.py`` so that reading an agent config (and the
simulator, which never talks to a daemon) does not import grpc.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

DEFAULT_ADDRESS = "127.0.0.1:32767"
# The daemon's minimum client ping interval is gRPC's default, 5 minutes:
# a client that pings more often is sent GOAWAY "too_many_pings".
MIN_KEEPALIVE_S = 300


@dataclass(frozen=True)
class KubeArmorSettings:
    """``{"kind": "kubearmor", "address": ..., "ca": ..., "cert": ..., "key": ...,
    "keepalive_s": ...}`` from the agent config.

    ``ca`` (a PEM file) turns TLS on and is the CA the daemon's certificate
    must chain to; ``cert`` and ``key`` (PEM files, both or neither) are the
    agent's client certificate for mTLS.  Without any of them the channel is
    plaintext, which is the daemon's default: keep it on loopback.
    """

    address: str = DEFAULT_ADDRESS
    ca: str = ""
    cert: str = ""
    key: str = ""
    keepalive_s: int = MIN_KEEPALIVE_S
    timeout_s: float = 5.0  # per unary call

    def __post_init__(self) -> None:
        if not isinstance(self.address, str) or not self.address:
            raise ValueError("kubearmor backend: address must be a non-empty string")
        for name in ("ca", "cert", "key"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"kubearmor backend: {name} must be a file path")
        if bool(self.cert) != bool(self.key):
            raise ValueError("kubearmor backend: cert and key go together (mTLS)")
        if (self.cert or self.key) and not self.ca:
            raise ValueError("kubearmor backend: a client cert needs the daemon's ca too")
        if isinstance(self.keepalive_s, bool) or not isinstance(self.keepalive_s, int):
            raise ValueError("kubearmor backend: keepalive_s must be a whole number of seconds")
        if self.keepalive_s < MIN_KEEPALIVE_S:
            raise ValueError(
                f"kubearmor backend: keepalive_s {self.keepalive_s} is below {MIN_KEEPALIVE_S}:"
                " the daemon answers faster pings with GOAWAY too_many_pings"
            )
        if not isinstance(self.timeout_s, int | float) or not self.timeout_s > 0:
            raise ValueError("kubearmor backend: timeout_s must be a positive number")

    @property
    def tls(self) -> bool:
        return bool(self.ca)

    @classmethod
    def from_config(cls, data: Mapping[str, Any]) -> KubeArmorSettings:
        """From the config's ``backend`` object (``kind`` already checked)."""
        known = {"kind", "address", "ca", "cert", "key", "keepalive_s", "timeout_s"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"kubearmor backend: unknown keys {unknown}")
        return cls(**{k: v for k, v in data.items() if k != "kind"})
