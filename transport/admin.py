"""Broker administration over RabbitMQ's management HTTP API.

Used for vhosts (the demo's, each test's) and device users.  The API is on
the node's management port (15672 by default, plugin
``rabbitmq_management``); its URL is derived from an AMQP URL's host and
credentials unless given.

Why the HTTP API and not ``rabbitmqctl``: enrolment runs wherever the
operator runs the CLI, usually not on a broker node (``rabbitmqctl`` needs
the node's Erlang cookie and runs as the broker's OS user); the API needs
only an administrator's login, works the same against every node of a
cluster, and answers in JSON we can check.

A device user (:func:`device_grants`): no configure rights; write only to
the telemetry exchange, and there only routing keys
``telemetry.<its user name>.<type>`` (a topic permission with RabbitMQ's
``{username}`` expansion); read only the policy stream; at most one
connection (user limit ``max-connections``); no tags (no management login).
"""

from __future__ import annotations

import base64
import http.client
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from .errors import BrokerUnreachable

#: What a device's broker user may do (see the module docstring).
DEVICE_CONFIGURE = "^$"
DEVICE_WRITE = r"^edgeward\.uplink$"
DEVICE_READ = r"^edgeward\.policy$"
DEVICE_TOPIC_EXCHANGE = "edgeward.uplink"
DEVICE_TOPIC_WRITE = r"^telemetry\.{username}\.[a-z]+$"
DEVICE_MAX_CONNECTIONS = 1


#: What the control plane's own broker user may do: declare and bind its
#: topology, publish bundles, read heartbeats and the audit trail — on
#: edgeward's names only, in its vhost only; no management login, no tags.
CONTROL_PLANE_PATTERN = r"^edgeward\."


def device_grants() -> dict[str, Any]:
    """The permissions of a device user, as the API shows them."""
    return {
        "configure": DEVICE_CONFIGURE,
        "write": DEVICE_WRITE,
        "read": DEVICE_READ,
        "topic": {
            "exchange": DEVICE_TOPIC_EXCHANGE,
            "write": DEVICE_TOPIC_WRITE,
            "read": "^$",
        },
        "max-connections": DEVICE_MAX_CONNECTIONS,
    }


class ManagementAPI:
    def __init__(self, base: str, user: str, password: str, timeout: float = 10.0) -> None:
        self.base = base.rstrip("/")
        self.timeout = timeout
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self._auth = f"Basic {token}"

    @classmethod
    def for_amqp_url(cls, amqp_url: str, port: int = 15672) -> ManagementAPI:
        parts = urlsplit(amqp_url)
        return cls(
            f"http://{parts.hostname or '127.0.0.1'}:{port}/api",
            unquote(parts.username or "guest"),
            unquote(parts.password or "guest"),
        )

    def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Authorization", self._auth)
        req.add_header("Content-Type", "application/json")
        for key, value in (headers or {}).items():
            req.add_header(key, value)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 404 and method in ("GET", "DELETE"):
                return None
            detail = exc.read().decode(errors="replace")[:200]
            raise RuntimeError(f"{method} {path}: HTTP {exc.code} {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise BrokerUnreachable([self.base], f"management API: {exc}") from None
        return json.loads(raw) if raw else None

    @staticmethod
    def _q(name: str) -> str:
        return quote(name, safe="")

    def create_vhost(self, vhost: str) -> None:
        self.request("PUT", f"/vhosts/{self._q(vhost)}")

    def delete_vhost(self, vhost: str) -> None:
        self.request("DELETE", f"/vhosts/{self._q(vhost)}")

    def set_permissions(
        self, vhost: str, user: str, configure: str = ".*", write: str = ".*", read: str = ".*"
    ) -> None:
        self.request(
            "PUT",
            f"/permissions/{self._q(vhost)}/{self._q(user)}",
            {"configure": configure, "write": write, "read": read},
        )

    def queue(self, vhost: str, name: str) -> dict[str, Any] | None:
        return self.request("GET", f"/queues/{self._q(vhost)}/{self._q(name)}")

    # -- users -------------------------------------------------------------------

    def user(self, name: str) -> dict[str, Any] | None:
        return self.request("GET", f"/users/{self._q(name)}")

    def put_device_user(self, vhost: str, name: str, password: str | None) -> None:
        """Make (or reset) ``name`` as a device user of ``vhost``: new password
        (None: none at all — it logs in only with its certificate, EXTERNAL),
        the device grants, nothing else."""
        user: dict[str, str] = {"tags": ""}
        if password is None:
            user["password_hash"] = ""  # no password can log in
        else:
            user["password"] = password
        self.request("PUT", f"/users/{self._q(name)}", user)
        self.set_permissions(vhost, name, DEVICE_CONFIGURE, DEVICE_WRITE, DEVICE_READ)
        self.request(
            "PUT",
            f"/topic-permissions/{self._q(vhost)}/{self._q(name)}",
            {"exchange": DEVICE_TOPIC_EXCHANGE, "write": DEVICE_TOPIC_WRITE, "read": "^$"},
        )
        self.request(
            "PUT",
            f"/user-limits/{self._q(name)}/max-connections",
            {"value": DEVICE_MAX_CONNECTIONS},
        )

    def user_names(self) -> list[str]:
        """The names of every user on the broker."""
        return [u["name"] for u in self.request("GET", "/users?columns=name") or []]

    def user_limits(self, name: str) -> dict[str, Any]:
        """``name``'s user limits (``{"max-connections": 1}``; {} when none)."""
        limits = self.request("GET", f"/user-limits/{self._q(name)}") or []
        return dict(limits[0]["value"]) if limits else {}

    def import_definitions(self, definitions: dict[str, Any]) -> None:
        """Import a definitions document (users, permissions, ...): thousands
        of users in one request, where :meth:`put_device_user` takes four each."""
        self.request("POST", "/definitions", definitions)

    def delete_users(self, names: list[str]) -> None:
        """Delete these users in one request (each must exist)."""
        self.request("POST", "/users/bulk-delete", {"users": names})

    def delete_each(self, paths: Sequence[str], threads: int = 4) -> None:
        """``DELETE`` every path (one already gone is fine), over ``threads``
        kept-alive connections: thousands of small deletes, each a fraction
        of what a fresh connection per request costs."""
        parts = urlsplit(self.base)
        local = threading.local()
        opened: list[http.client.HTTPConnection] = []

        def connection() -> http.client.HTTPConnection:
            conn = getattr(local, "conn", None)
            if conn is None:
                cls = (
                    http.client.HTTPSConnection
                    if parts.scheme == "https"
                    else http.client.HTTPConnection
                )
                conn = local.conn = cls(parts.netloc, timeout=self.timeout)
                opened.append(conn)
            return conn

        def delete(path: str) -> None:
            for attempt in range(2):
                conn = connection()
                try:
                    conn.request("DELETE", parts.path + path, headers={"Authorization": self._auth})
                    resp = conn.getresponse()
                    body = resp.read()
                except (http.client.HTTPException, OSError) as exc:
                    conn.close()
                    local.conn = None
                    if attempt:  # a kept-alive connection the server closed: once more
                        raise BrokerUnreachable([self.base], f"management API: {exc}") from None
                    continue
                if resp.status >= 400 and resp.status != 404:
                    detail = body.decode(errors="replace")[:200]
                    raise RuntimeError(f"DELETE {path}: HTTP {resp.status} {detail}")
                return

        try:
            with ThreadPoolExecutor(max(1, threads)) as pool:
                for _ in pool.map(delete, paths):
                    pass
        finally:
            for conn in opened:
                conn.close()

    def put_control_plane_user(self, vhost: str, name: str, password: str) -> None:
        """Make (or reset) ``name`` as the control plane's user of ``vhost``."""
        self.request("PUT", f"/users/{self._q(name)}", {"password": password, "tags": ""})
        pattern = CONTROL_PLANE_PATTERN
        self.set_permissions(vhost, name, pattern, pattern, pattern)

    def delete_user(self, name: str) -> bool:
        """Delete ``name``; False when there was no such user."""
        if self.user(name) is None:
            return False
        self.request("DELETE", f"/users/{self._q(name)}")
        return True

    def user_connections(self, name: str) -> list[str]:
        """Names of the connections ``name`` holds on any node."""
        conns = self.request("GET", "/connections?columns=name,user") or []
        return [c["name"] for c in conns if c.get("user") == name]

    def close_connections(self, names: list[str], reason: str) -> None:
        """Close these connections (one already gone is fine)."""
        for conn in names:
            path = f"/connections/{self._q(conn)}"
            self.request("DELETE", path, headers={"X-Reason": reason})  # gone already: fine

    def revoke_user(self, name: str, reason: str) -> tuple[bool, int]:
        """Delete ``name`` first (no new login), then close what it still
        holds (RabbitMQ closes a deleted user's connections itself, mostly).
        Whether the user existed, and how many connections it had."""
        held = self.user_connections(name)
        existed = self.delete_user(name)
        self.close_connections(self.user_connections(name), reason)
        return existed, len(held)

    def user_grants(self, vhost: str, name: str) -> dict[str, Any]:
        """What ``name`` may do in ``vhost`` (the shape of :func:`device_grants`)."""
        perms = self.request("GET", f"/permissions/{self._q(vhost)}/{self._q(name)}") or {}
        topics = self.request("GET", f"/topic-permissions/{self._q(vhost)}/{self._q(name)}") or []
        limits = self.request("GET", f"/user-limits/{self._q(name)}") or []
        out: dict[str, Any] = {k: perms.get(k) for k in ("configure", "write", "read")}
        out["topic"] = {k: topics[0][k] for k in ("exchange", "write", "read")} if topics else None
        out["max-connections"] = limits[0]["value"].get("max-connections") if limits else None
        return out


def with_login(amqp_url: str, user: str, password: str) -> str:
    """``amqp_url`` with another login (host, port, vhost and query kept)."""
    parts = urlsplit(amqp_url)
    host = parts.hostname or "127.0.0.1"
    if ":" in host:  # IPv6
        host = f"[{host}]"
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    if parts.port:
        netloc += f":{parts.port}"
    return parts._replace(netloc=netloc).geturl()


def vhost_of(amqp_url: str) -> str:
    path = urlsplit(amqp_url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def url_with_vhost(amqp_url: str, vhost: str) -> str:
    parts = urlsplit(amqp_url)
    return parts._replace(path="/" + quote(vhost, safe="")).geturl()
