"""The simulated devices' broker logins: one RabbitMQ user per device, as
``edgeward enroll`` makes them for real devices.

What a device user may do is :func:`~edgeward.transport.admin.device_grants`
(no configure rights; write only to ``edgeward.uplink`` and there only
``telemetry.<its name>.<type>``; read only the policy stream; one connection
at most; no tags). ``enroll`` makes a user with four API calls; 35,000 of them
that way would take longer than most runs, so the simulator makes them with
RabbitMQ's definitions import instead (``POST /api/definitions``), thousands
per request:

* ``users`` with a ``password_hash`` computed here the way RabbitMQ does for
  ``rabbit_password_hashing_sha256`` (:func:`password_hash`) and the user
  limit ``max-connections`` (RabbitMQ 3.10 imports a user's ``limits``; the
  ``user_limits`` feature flag must be on, which it is on any 3.10 node);
* once a phase's vhost exists, ``permissions`` and ``topic_permissions`` for
  it (the per-vhost import, ``POST /api/definitions/{vhost}``, takes neither).
  The raw baseline's vhost gets no topic permissions: raw devices publish
  nothing, so they would only cost the teardown.

Passwords are not shipped to the workers: each is ``HMAC-SHA256(run secret,
device name)`` (:func:`device_password`), and a worker derives its device's
password when the device connects (``shard.DeviceLink``). The secret is made
per run and lives as long as the run.

Definitions cannot delete, and RabbitMQ 3.10 deletes grants slowly in bulk
(measured, see docs/simulator.md): deleting a vhost clears its grants in one
transaction whose every topic-permission step scans what it already holds
(2,000 users: 25 s, growing with the square), and deleting a user scans the
whole permission tables (~25 ms a user with 35,000 users' grants present).
So a phase's grants are revoked one by one first (:meth:`DeviceLogins.revoke`:
``DELETE`` by full key, a few threads over kept-alive connections), before
its vhost goes; then the users go with ``POST /api/users/bulk-delete``, each
cheap once the tables are empty. Also after Ctrl-C or a failure. (Each topic
permission's ``DELETE`` still scans the topic permission table once, in the
API's existence check: the edgeward vhost's revocation is the slow part.)
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from urllib.parse import quote

from edgeward.transport.admin import (
    DEVICE_MAX_CONNECTIONS,
    DEVICE_TOPIC_EXCHANGE,
    ManagementAPI,
    device_grants,
)
from edgeward.transport.errors import BrokerUnreachable

HASHING_ALGORITHM = "rabbit_password_hashing_sha256"

#: Users (or grants) per definitions import: ~190 bytes a user and ~280 a
#: device's grants in a vhost, so a request stays far below the management
#: API's default body limit (10 MB), and well inside one request's timeout.
CHUNK = 5000
#: Users per bulk-delete request: ~1 ms each once their grants are revoked,
#: ~25 ms with 35,000 users' grants still present (a revocation that failed);
#: a request must end within the API timeout (60 s) either way.
DELETE_CHUNK = 1000
#: Concurrent requests revoking grants (kept-alive connections).
REVOKE_THREADS = 4

#: The raw baseline with ``--baseline-delivery queue``: each raw device
#: declares a server-named exclusive queue and binds it to the policy
#: exchange, which the device grants do not allow (no configure rights).
#: In that vhost only, raw devices may also do that to ``amq.gen-*`` queues.
RAW_QUEUE_CONFIGURE = r"^amq\.gen-.*$"
RAW_QUEUE_WRITE = r"^(edgeward\.uplink|amq\.gen-.*)$"
RAW_QUEUE_READ = r"^(edgeward\.policy|amq\.gen-.*)$"


class Stopped(Exception):
    """The set-up was stopped between two chunks (Ctrl-C)."""


def new_secret() -> bytes:
    """A run's secret: every device password of the run derives from it."""
    return os.urandom(32)


def device_password(secret: bytes, device: str) -> str:
    """``device``'s password in the run with ``secret`` (43 URL-safe characters)."""
    digest = hmac.new(secret, device.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's ``password_hash`` for ``rabbit_password_hashing_sha256``:
    base64(salt + sha256(salt + utf-8 password)), with a random 4-byte salt."""
    if salt is None:
        salt = os.urandom(4)
    if len(salt) != 4:
        raise ValueError("RabbitMQ's salt is 4 bytes")
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def check_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches a ``password_hash`` (as the broker checks it)."""
    raw = base64.b64decode(stored)
    return hmac.compare_digest(password_hash(password, raw[:4]), stored)


def users_definitions(names: Iterable[str], secret: bytes) -> dict[str, Any]:
    """The definitions document that makes ``names`` device users (no grants
    yet: those are per vhost, :func:`grants_definitions`)."""
    return {
        "users": [
            {
                "name": name,
                "password_hash": password_hash(device_password(secret, name)),
                "hashing_algorithm": HASHING_ALGORITHM,
                "tags": "",
                "limits": {"max-connections": DEVICE_MAX_CONNECTIONS},
            }
            for name in names
        ]
    }


def grants_definitions(
    names: Iterable[str], vhost: str, *, raw_queues: bool = False, topic: bool = True
) -> dict[str, Any]:
    """The definitions document that gives ``names`` the device grants in
    ``vhost`` (``raw_queues``: and the raw baseline's queues, see
    :data:`RAW_QUEUE_CONFIGURE`; ``topic``: with the topic permission)."""
    grants = device_grants()  # what enroll gives a device, the one source of it
    configure, write, read = (
        (RAW_QUEUE_CONFIGURE, RAW_QUEUE_WRITE, RAW_QUEUE_READ)
        if raw_queues
        else (grants["configure"], grants["write"], grants["read"])
    )
    permissions = []
    topic_permissions = []
    for name in names:
        permissions.append(
            {"user": name, "vhost": vhost, "configure": configure, "write": write, "read": read}
        )
        if topic:
            topic_permissions.append({"user": name, "vhost": vhost, **grants["topic"]})
    doc: dict[str, Any] = {"permissions": permissions}
    if topic:
        doc["topic_permissions"] = topic_permissions
    return doc


def revoke_paths(names: Iterable[str], vhost: str, *, topic: bool = True) -> list[str]:
    """The management API paths whose ``DELETE`` revokes ``names``' grants in
    ``vhost``, each by its full key (a topic permission by its exchange too:
    without it, RabbitMQ scans the topic permission table for each)."""
    v, exchange = quote(vhost, safe=""), quote(DEVICE_TOPIC_EXCHANGE, safe="")
    paths = []
    for name in names:
        user = quote(name, safe="")
        paths.append(f"/permissions/{v}/{user}")
        if topic:
            paths.append(f"/topic-permissions/{v}/{user}/{exchange}")
    return paths


def _chunks(items: Sequence[str], size: int) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class DeviceLogins:
    """A run's device users on one broker: made, granted per vhost, revoked
    per vhost (before the vhost is deleted), removed.

    ``figures`` is what the report shows (``RunData.logins``): the users
    made, the seconds each step took, how many were removed at the end.
    ``stop()`` is asked between chunks: true stops the set-up (Ctrl-C).
    """

    def __init__(
        self,
        api: ManagementAPI,
        names: Sequence[str],
        secret: bytes,
        *,
        chunk: int = CHUNK,
        out: Callable[[str], None] = lambda line: None,
        stop: Callable[[], bool] = lambda: False,
    ) -> None:
        self.api = api
        self.names = list(names)
        self.secret = secret
        self.chunk = chunk
        self.out = out
        self.stop = stop
        self.attempted = False  # an import of users was sent: some may exist
        self.granted: dict[str, tuple[str, bool]] = {}  # vhost -> (label, topic), maybe partly
        self.figures: dict[str, Any] = {
            "mode": "device",
            "users": 0,
            "users_s": None,
            "grants_s": {},
            "setup_s": 0.0,
            "revoke_s": {},
            "existing_before": 0,
            "limit_applied": None,  # whether the broker took max-connections (checked on one)
            "removed": None,
            "remove_s": None,
            "left": None,
        }

    def existing(self) -> list[str]:
        """The run's device users that are on the broker now."""
        ours = set(self.names)
        return [name for name in self.api.user_names() if name in ours]

    def create(self) -> float:
        """Make every device's user (password hash, no tags, max-connections 1)."""
        started = time.monotonic()
        self.figures["existing_before"] = len(self.existing())
        done = 0
        for part in _chunks(self.names, self.chunk):
            if self.stop():
                raise Stopped("stopped while making device users")
            self.attempted = True
            self.api.import_definitions(users_definitions(part, self.secret))
            done += len(part)
            self.figures["users"] = done
            if len(self.names) > self.chunk:
                self.out(f"  device users: {done:,} of {len(self.names):,}")
        seconds = time.monotonic() - started
        self.figures["users_s"] = round(seconds, 2)
        self.figures["setup_s"] = round(self.figures["setup_s"] + seconds, 2)
        if self.names:
            # A broker without the user_limits feature flag drops `limits` silently.
            limit = self.api.user_limits(self.names[-1]).get("max-connections")
            self.figures["limit_applied"] = limit == DEVICE_MAX_CONNECTIONS
        return seconds

    def grant(
        self, vhost: str, label: str, *, raw_queues: bool = False, topic: bool = True
    ) -> float:
        """Give every device user the device grants in ``vhost`` (``label``
        names the phase in the figures; ``topic``: with the topic permission)."""
        started = time.monotonic()
        self.granted[vhost] = (label, topic)
        for part in _chunks(self.names, self.chunk):
            if self.stop():
                raise Stopped("stopped while granting device users")
            self.api.import_definitions(
                grants_definitions(part, vhost, raw_queues=raw_queues, topic=topic)
            )
        seconds = time.monotonic() - started
        self.figures["grants_s"][label] = round(seconds, 2)
        self.figures["setup_s"] = round(self.figures["setup_s"] + seconds, 2)
        return seconds

    def revoke(self, vhost: str) -> float:
        """Revoke every device user's grants in ``vhost`` (one that was never
        granted is fine), each by its key: before ``vhost`` is deleted, which
        would clear them far more slowly. Nothing if none were granted there."""
        if vhost not in self.granted:
            return 0.0
        label, topic = self.granted[vhost]
        started = time.monotonic()
        self.api.delete_each(revoke_paths(self.names, vhost, topic=topic), REVOKE_THREADS)
        del self.granted[vhost]
        seconds = time.monotonic() - started
        self.figures["revoke_s"][label] = round(seconds, 2)
        return seconds

    def remove(self) -> int:
        """Delete the run's device users that exist; how many were deleted.
        Cheap once their grants are revoked (:meth:`revoke`); their grants
        still anywhere, each deletion scans every grant on the broker."""
        if not self.attempted:
            self.figures["removed"] = 0
            self.figures["left"] = 0
            return 0
        started = time.monotonic()
        removed = 0
        for part in _chunks(self.existing(), DELETE_CHUNK):
            self.api.delete_users(list(part))
            removed += len(part)
        self.figures["removed"] = removed
        self.figures["remove_s"] = round(time.monotonic() - started, 2)
        self.figures["left"] = len(self.existing())
        return removed


def patiently(
    call: Callable[[], Any],
    patience: float,
    out: Callable[[str], None],
    *,
    doing: str = "retrying",
    stop: Callable[[], bool] = lambda: False,
) -> Any:
    """``call()``, retried every 5 s while the management API is busy (a node
    that just closed tens of thousands of connections can keep it busy for a
    minute), for at most ``patience`` seconds or until ``stop()``; then its
    :class:`BrokerUnreachable` is raised."""
    deadline = time.monotonic() + patience
    while True:
        try:
            return call()
        except BrokerUnreachable as exc:
            if time.monotonic() > deadline or stop():
                raise
            out(f"management API busy ({exc}); {doing}")
            time.sleep(5)


def remove_quietly(logins: DeviceLogins, patience: float, out: Callable[[str], None]) -> str:
    """:meth:`DeviceLogins.remove`, retried while the management API is busy
    (for at most ``patience`` seconds); a problem as text ("" when none)."""
    try:
        patiently(logins.remove, patience, out, doing="retrying the removal of device users")
    except Exception as exc:  # whatever it was, the report must still be written
        return f"device users were not removed: {exc}"
    left = logins.figures.get("left") or 0
    return f"{left} device users could not be removed" if left else ""
