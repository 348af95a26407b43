"""Test helpers around the local RabbitMQ: its management HTTP API, free ports,
and polling with a deadline instead of sleeping.

Only the standard library is used, so this module imports even when the
project's dependencies are half installed.
"""

from __future__ import annotations

import base64
import json
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

AMQP_HOST = "127.0.0.1"
AMQP_PORT = 5672
MANAGEMENT_URL = "http://127.0.0.1:15672"


class BrokerAdminError(RuntimeError):
    """The management API failed or answered with an unexpected status."""


class BrokerAdmin:
    """A tiny client of the RabbitMQ management API (``/api/...``)."""

    def __init__(
        self,
        base_url: str = MANAGEMENT_URL,
        user: str = "guest",
        password: str = "guest",
        timeout: float = 10.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.user = user
        self.timeout = timeout
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self._auth = f"Basic {token}"

    # -- plumbing ------------------------------------------------------------

    def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> Any:
        """Send one request; return the decoded JSON (None for no content).

        ``path`` starts after ``/api`` and must already be URL-encoded.
        Raises :class:`BrokerAdminError` on any status >= 400.
        """
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.base_url}/api{path}", data=data, method=method)
        req.add_header("Authorization", self._auth)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        for key, value in (headers or {}).items():
            req.add_header(key, value)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise BrokerAdminError(f"{method} {path}: HTTP {exc.code} {detail}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise BrokerAdminError(f"{method} {path}: {exc}") from exc
        return json.loads(raw) if raw else None

    def _get_or_none(self, path: str) -> Any:
        try:
            return self.request("GET", path)
        except BrokerAdminError as exc:
            cause = exc.__cause__
            if isinstance(cause, urllib.error.HTTPError) and cause.code == 404:
                return None
            raise

    # -- API -----------------------------------------------------------------

    def overview(self) -> dict[str, Any]:
        """``GET /api/overview``; raises BrokerAdminError if the API does not answer."""
        return self.request("GET", "/overview")

    def create_vhost(self, name: str) -> None:
        """Create ``name`` and wait until it runs on every node."""
        self.request("PUT", f"/vhosts/{_q(name)}", {})

        def running() -> bool:
            info = self.vhost_info(name)
            states = (info or {}).get("cluster_state") or {}
            # Brokers that do not report cluster_state are taken at their word.
            return info is not None and all(s == "running" for s in states.values())

        wait_until(running, timeout=15, message=f"vhost {name!r} did not start")

    def delete_vhost(self, name: str) -> None:
        """Delete ``name``; a vhost that is already gone is fine."""
        try:
            self.request("DELETE", f"/vhosts/{_q(name)}")
        except BrokerAdminError as exc:
            cause = exc.__cause__
            if not (isinstance(cause, urllib.error.HTTPError) and cause.code == 404):
                raise

    def delete_users_of(self, vhost: str) -> list[str]:
        """Delete the users (device users made by ``edgeward enroll``) whose
        only permissions are on ``vhost``; guest and users others use stay."""
        users = {p["user"] for p in self._get_or_none(f"/vhosts/{_q(vhost)}/permissions") or []}
        deleted = []
        for user in sorted(users - {"guest"}):
            elsewhere = [
                p
                for p in self._get_or_none(f"/users/{_q(user)}/permissions") or []
                if p["vhost"] != vhost
            ]
            if not elsewhere:
                try:
                    self.request("DELETE", f"/users/{_q(user)}")
                    deleted.append(user)
                except BrokerAdminError:
                    pass  # gone already
        return deleted

    def vhost_info(self, name: str) -> dict[str, Any] | None:
        """The vhost's description, or None if it does not exist."""
        return self._get_or_none(f"/vhosts/{_q(name)}")

    def list_vhosts(self) -> list[str]:
        return [v["name"] for v in self.request("GET", "/vhosts")]

    def set_permissions(
        self,
        vhost: str,
        user: str,
        configure: str = ".*",
        write: str = ".*",
        read: str = ".*",
    ) -> None:
        self.request(
            "PUT",
            f"/permissions/{_q(vhost)}/{_q(user)}",
            {"configure": configure, "write": write, "read": read},
        )

    def list_connections(self, vhost: str) -> list[dict[str, Any]]:
        """Client connections to ``vhost`` (each a dict with at least ``name``).

        The management database learns of a new connection within a moment,
        so poll with :func:`wait_until` rather than asserting right away.
        """
        return self._get_or_none(f"/vhosts/{_q(vhost)}/connections") or []

    def close_connections(self, vhost: str, reason: str = "closed by test") -> int:
        """Force-close every connection to ``vhost``; return how many were closed."""
        closed = 0
        for conn in self.list_connections(vhost):
            try:
                self.request(
                    "DELETE", f"/connections/{_q(conn['name'])}", headers={"X-Reason": reason}
                )
                closed += 1
            except BrokerAdminError as exc:
                cause = exc.__cause__
                if not (isinstance(cause, urllib.error.HTTPError) and cause.code == 404):
                    raise
        return closed

    def queue_info(self, vhost: str, name: str) -> dict[str, Any] | None:
        """The queue's description (``messages``, ``consumers``, ``type``,
        ``arguments``, ...), or None if it does not exist."""
        return self._get_or_none(f"/queues/{_q(vhost)}/{_q(name)}")


def _q(part: str) -> str:
    """URL-encode one path segment (vhost "/" becomes %2F)."""
    return urllib.parse.quote(part, safe="")


def amqp_url(vhost: str, user: str = "guest", password: str = "guest") -> str:
    """``amqp://user:password@127.0.0.1:5672/<url-encoded vhost>``."""
    return f"amqp://{_q(user)}:{_q(password)}@{AMQP_HOST}:{AMQP_PORT}/{_q(vhost)}"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.05,
    message: str = "condition not met",
) -> T:
    """Call ``predicate`` until it returns something truthy; return that value.

    Raises AssertionError with ``message``, the timeout and the last value the
    predicate returned once ``timeout`` seconds have passed. Exceptions raised
    by the predicate propagate at once (so it can fail fast).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"{message} (after {timeout:g}s; last value: {value!r})")
        time.sleep(min(interval, remaining))
