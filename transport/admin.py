"""Broker administration over RabbitMQ's management HTTP API.

Used for vhosts (the demo's, each test's) and, later, device users.  The API
is on the node's management port (15672 by default, plugin
``rabbitmq_management``); its URL is derived from an AMQP URL's host and
credentials unless given.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from .errors import BrokerUnreachable


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

    def request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Authorization", self._auth)
        req.add_header("Content-Type", "application/json")
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


def vhost_of(amqp_url: str) -> str:
    path = urlsplit(amqp_url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def url_with_vhost(amqp_url: str, vhost: str) -> str:
    parts = urlsplit(amqp_url)
    return parts._replace(path="/" + quote(vhost, safe="")).geturl()
