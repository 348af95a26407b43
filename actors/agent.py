"""The device agent: the LocalEnforcer around the agent core.

One process, one thread, one event loop (pika's ``SelectConnection``
ioloop).  Start-up order is the design's promise: load the cache, put its
policies in force, say so, and only then connect.  A device with no network
is protected within a second.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

from pika.adapters.select_connection import IOLoop, SelectConnection

from edgeward.enforcement.backend import Backend, BuiltinBackend
from edgeward.transport.connection import quiet_pika, split_urls
from edgeward.transport.signing import Verifier

from . import core as c
from .cache import AgentCache
from .config import AgentConfig
from .shell import AgentShell, Link

TICK_SECONDS = 1.0


class LocalEnforcer(AgentShell):
    """Hosts one :class:`AgentCore` on a real device."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        backend: Backend | None = None,
        clock: Callable[[], float] = time.time,
        out: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.urls = split_urls(config.broker_url)
        self.disk_cache = AgentCache(Path(config.cache_dir))
        super().__init__(
            c.AgentCore(
                config.device,
                config.labels,
                Verifier(config.trusted_keys),
                heartbeat_interval=config.heartbeat_interval,
            ),
            backend or BuiltinBackend(),
            self.disk_cache,
            clock=clock,
            out=out or (lambda line: print(line, flush=True)),
        )
        self.ioloop = IOLoop()
        self.link = Link(
            [self],
            self.urls,
            SelectConnection,
            self.ioloop,
            name=f"edgeward-agent {config.device}",
            prefetch=config.prefetch,
            on_event=self._on_link_event,
        )

    def _on_link_event(self, kind: str, detail: str) -> None:
        if kind == "connected":
            self.say(f"connected to {detail}")
        elif kind == "closed":
            if self.link.stopped:
                self.ioloop.stop()
        elif kind.startswith("lost:"):
            self.say(f"connection lost ({kind[5:]}): {detail}; reconnecting")
        else:
            self.say(f"broker unreachable ({kind}): {detail}")

    def start(self) -> None:
        if self.disk_cache.set_aside is not None:
            self.say(f"warning: damaged cache moved to {self.disk_cache.set_aside}; starting empty")
        super().start()

    def run(self) -> int:
        self.start()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.ioloop.add_callback_threadsafe(self.stop))
        self.link.start()
        self.ioloop.call_later(TICK_SECONDS, self._tick)
        self.ioloop.start()
        self.disk_cache.close()
        return 0

    def stop(self) -> None:
        if self.link.stopped:
            return
        self.say("stopping")
        was_open = self.link.is_open
        self.link.stop()
        if not was_open:
            self.ioloop.stop()

    def _tick(self) -> None:
        if self.link.stopped:
            return
        self.tick()
        self.ioloop.call_later(TICK_SECONDS, self._tick)


def run_agent(config_path: Path) -> int:
    config = AgentConfig.read(config_path)
    # The agent says what happened to its link in its own words; pika's log
    # would repeat each failure several times over.
    quiet_pika()
    agent = LocalEnforcer(config, out=lambda line: print(f"[{config.device}] {line}", flush=True))
    return agent.run()
