"""Configuration: environment, defaults, and the agent's config file."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import platformdirs

from edgeward.enforcement.kubearmor.settings import KubeArmorSettings
from edgeward.transport.connection import (
    DEFAULT_BROKER_URL,
    TLSSettings,
    split_urls,
)

DEFAULT_ADMIN_PORT = 1900


def broker_url_from_env() -> str:
    return os.environ.get("EDGEWARD_BROKER_URL") or DEFAULT_BROKER_URL


def home_from_env() -> Path:
    value = os.environ.get("EDGEWARD_HOME")
    return Path(value) if value else Path(platformdirs.user_data_dir("edgeward"))


def admin_port_from_env() -> int:
    value = os.environ.get("EDGEWARD_ADMIN_PORT")
    return int(value) if value else DEFAULT_ADMIN_PORT


def metrics_port_from_env() -> int:
    """EDGEWARD_METRICS_PORT: the control plane's Prometheus port (0 or unset: off)."""
    value = os.environ.get("EDGEWARD_METRICS_PORT")
    return int(value) if value else 0


def write_private(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` as one step: a new file of mode 0600,
    written and fsynced, renamed over the old one, the directory fsynced
    (config files, the device's trust file, the control plane's keyring)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@dataclass
class AgentConfig:
    """What ``edgeward enroll`` writes and ``edgeward agent run`` reads."""

    device: str
    labels: dict[str, str]
    broker_url: str
    cache_dir: str
    trusted_keys: dict[str, str]  # key id -> base64 raw Ed25519 public key
    heartbeat_interval: float = 10.0
    prefetch: int = 64
    # {"kind": "builtin"} or {"kind": "kubearmor", "address": ..., "ca": ...,
    # "cert": ..., "key": ..., "keepalive_s": ...}; the bare string "builtin"
    # of older configs is read as {"kind": "builtin"}.
    backend: dict[str, Any] = field(default_factory=lambda: {"kind": "builtin"})
    extra: dict[str, object] = field(default_factory=dict)
    # Telemetry (docs/telemetry.md, "Agent side"): the outbox's bounds; how
    # many records may wait for a confirm; how fast the outbox drains (records
    # per second) and how long after each (re)connect draining starts at the
    # latest (a random delay in [0, jitter], so a fleet coming back together
    # does not arrive at once).
    outbox_max_records: int = 10_000
    outbox_max_bytes: int = 16 * 1024 * 1024
    telemetry_window: int = 100
    telemetry_rate: float = 100.0
    telemetry_drain_jitter_s: float = 60.0
    # After losing the broker, the first reconnect waits a random time in
    # [0, this]: a node restart or an uplink outage that drops thousands of
    # devices together does not bring them back as one wall. Then the usual
    # backoff (full jitter, 0.5 s doubling to 30 s).
    reconnect_spread_s: float = 10.0
    # With the builtin backend and --events-from: an event the set in force
    # allows becomes a ``log`` record too (like KubeArmor's system log).
    log_allowed_events: bool = False
    # TLS to the broker (docs/tls.md), for amqps:// URLs only. tls_ca: the
    # PEM CA the broker's certificate must chain to, and nothing else (empty:
    # the system's trust store); the URL's host must be in the certificate.
    # tls_cert/tls_key: the device's client certificate and key (mutual TLS).
    # tls_external: log in with that certificate (SASL EXTERNAL): the broker
    # user is its CN, which must be the device name.  Paths on the device;
    # the files are read when the agent starts (and at each reconnect).
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_external: bool = False
    # Where the device keeps its floor and trusted keys apart from the cache
    # (actors/cache.py TrustFile); default: beside the cache directory,
    # ``<cache_dir>.trust.json``.
    trust_file: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.backend, str):
            self.backend = {"kind": self.backend}
        self.kubearmor_settings()  # refuses a bad backend now, not at first apply
        for name in ("outbox_max_records", "outbox_max_bytes", "telemetry_window"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if not isinstance(self.telemetry_rate, int | float) or self.telemetry_rate <= 0:
            raise ValueError("telemetry_rate: expected a positive number of records/s")
        for name in ("telemetry_drain_jitter_s", "reconnect_spread_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}: expected seconds, 0 or more")
        tls = self.tls_settings()
        tls.validate()  # the files are the device's: read when the agent starts
        if tls.enabled:
            try:
                urls = split_urls(self.broker_url)
            except ValueError as exc:
                raise ValueError(f"broker_url: {exc}") from None
            tls.check_urls(urls)  # TLS files with amqp:// would go unused

    def tls_settings(self) -> TLSSettings:
        """The agent's TLS settings (its own: EDGEWARD_TLS_* are not read)."""
        return TLSSettings(
            ca=self.tls_ca,
            cert=self.tls_cert,
            key=self.tls_key,
            external=self.tls_external,
            source="config",
        )

    @property
    def backend_kind(self) -> str:
        return str(self.backend.get("kind", "builtin"))

    def kubearmor_settings(self) -> KubeArmorSettings | None:
        """The kubearmor backend's settings; None for the builtin backend."""
        if not isinstance(self.backend, dict):
            raise ValueError("backend: expected an object with a kind")
        kind = self.backend.get("kind", "builtin")
        if kind == "builtin":
            if set(self.backend) - {"kind"}:
                raise ValueError("backend: the builtin backend takes no settings")
            return None
        if kind == "kubearmor":
            return KubeArmorSettings.from_config(self.backend)
        raise ValueError(f"backend: unknown kind {kind!r} (builtin or kubearmor)")

    def trust_path(self) -> Path:
        if self.trust_file:
            return Path(self.trust_file)
        cache = Path(self.cache_dir)
        return cache.with_name(cache.name + ".trust.json")

    def write(self, path: Path) -> None:
        write_private(path, json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def read(cls, path: Path) -> AgentConfig:
        try:
            data = json.loads(Path(path).read_text())
        except OSError as exc:
            raise ValueError(f"{path}: cannot read: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: not a JSON object")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}")
        missing = [
            k
            for k in ("device", "labels", "broker_url", "cache_dir", "trusted_keys")
            if k not in data
        ]
        if missing:
            raise ValueError(f"{path}: missing keys {missing}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from None
