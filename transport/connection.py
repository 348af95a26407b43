"""Connecting to the broker: URL lists, failover, jittered backoff.

``EDGEWARD_BROKER_URL`` may name several nodes of one cluster, separated by
commas.  Every client tries them in turn (starting at a random one, so a
fleet spreads over the nodes) and fails over to the next when one is down.
pika's exceptions stop here: callers see :class:`BrokerUnreachable`.
"""

from __future__ import annotations

import logging
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pika
import pika.exceptions

from .errors import BrokerUnreachable

DEFAULT_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"


def split_urls(value: str) -> list[str]:
    urls = [u.strip() for u in value.split(",") if u.strip()]
    if not urls:
        raise ValueError("no broker URL given")
    for url in urls:
        if urlsplit(url).scheme not in ("amqp", "amqps"):
            raise ValueError(f"not an amqp:// or amqps:// URL: {redact(url)}")
    return urls


def redact(url: str) -> str:
    """The URL without its password, fit for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def parameters(
    url: str, *, heartbeat: int = 30, timeout: float = 10.0, name: str = "edgeward"
) -> pika.URLParameters:
    params = pika.URLParameters(url)
    params.heartbeat = heartbeat
    params.connection_attempts = 1
    params.socket_timeout = timeout
    # A broker past its fd limit accepts TCP and then never answers the
    # handshake: bound it.
    params.stack_timeout = timeout
    params.blocked_connection_timeout = 60
    params.client_properties = {"connection_name": name}
    return params


def rotation(urls: list[str], rng: random.Random | None = None) -> Iterator[str]:
    """Endless walk over the nodes, starting at a random one."""
    start = (rng or random).randrange(len(urls))
    i = start
    while True:
        yield urls[i % len(urls)]
        i += 1


@dataclass
class Backoff:
    """Exponential backoff with full jitter: each delay is uniform in
    [0, min(cap, base × 2^attempt)], which spreads a crowd of clients
    retrying together better than a jitter around the ceiling does.

    ``spread`` is for :meth:`after_loss`: the first delay after an
    established connection was lost is uniform in [0, spread], so a fleet
    that lost the broker at the same moment does not come back in the same
    moment (35,000 devices over 30 s is ~1,200 connections a second; over
    0.5 s it is a wall).
    """

    base: float = 0.5
    cap: float = 30.0
    attempt: int = 0
    rng: random.Random | None = None
    spread: float = 0.0

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * (2**self.attempt))
        self.attempt += 1
        return (self.rng or random).uniform(0, ceiling)

    def after_loss(self) -> float:
        """The first delay after losing an established connection."""
        self.attempt = 0
        if self.spread <= 0:
            return self.next_delay()
        self.attempt = 1
        return (self.rng or random).uniform(0, self.spread)

    def reset(self) -> None:
        self.attempt = 0


def cancel_timer(loop: Any, handle: Any) -> None:
    """Cancel a ``call_later`` handle of asyncio's loop or of pika's IOLoop."""
    if hasattr(handle, "cancel"):
        handle.cancel()
    else:
        loop.remove_timeout(handle)


def socket_fds(conn: Any) -> list[int]:
    """The file descriptor of a pika BlockingConnection's socket, for an actor
    to hand Thespian (``ThespianWatch``); none without a connection, or if
    pika's internals moved (the actor then relies on its wakeups alone)."""
    if conn is None:
        return []
    try:
        return [conn._impl._transport._sock.fileno()]
    except AttributeError:
        return []


def connect_blocking(
    urls: list[str], *, name: str = "edgeward", timeout: float = 10.0
) -> pika.BlockingConnection:
    """A blocking connection to the first node of ``urls`` that answers."""
    errors = []
    for url in urls:
        try:
            return pika.BlockingConnection(parameters(url, timeout=timeout, name=name))
        except pika.exceptions.ProbableAuthenticationError:
            errors.append(f"{redact(url)}: login refused")
        except pika.exceptions.AMQPError as exc:
            errors.append(f"{redact(url)}: {type(exc).__name__} {exc}".strip())
        except OSError as exc:
            errors.append(f"{redact(url)}: {exc}")
    raise BrokerUnreachable([redact(u) for u in urls], "; ".join(errors))


def close_quietly(conn: Any) -> None:
    """Close a connection that may be half made or already gone."""
    if conn is None:
        return
    try:
        if conn.is_open:
            conn.close()
    except Exception:  # pika rejects what it buffered (a 540 on a stream): expected
        pass


def quiet_pika(level: int = logging.CRITICAL) -> None:
    """Silence pika's own log: our links count and classify every failure,
    and pika would repeat each one for every connection.

    pika's modules keep module-level loggers made at import; a process whose
    logging was re-initialised since (Thespian does that in its actor
    processes) no longer reaches them through ``logging.getLogger``, so set
    each one directly.
    """
    logging.getLogger("pika").setLevel(level)
    for name, module in list(sys.modules.items()):
        if name.startswith("pika") and module is not None:
            for value in list(vars(module).values()):
                if isinstance(value, logging.Logger):
                    value.setLevel(level)
