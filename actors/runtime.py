"""Starting the control plane's actor system, and reaching it from the CLI."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Thespian guesses its own address with a UDP probe to a public address
# unless told; the control plane listens on loopback unless configured.
os.environ.setdefault("THESPIAN_BASE_IPADDR", "127.0.0.1")

from thespian.actors import ActorSystem  # noqa: E402

from . import collector, control, metrics  # noqa: E402
from . import messages as m  # noqa: E402

BASE = "multiprocTCPBase"
ASK_TIMEOUT = 20.0


class ControlPlaneUnreachable(Exception):
    def __init__(self, address: str, detail: str = "") -> None:
        super().__init__(
            f"control plane unreachable at {address}" + (f": {detail}" if detail else "")
        )
        self.address = address


def admin_address(port: int) -> str:
    return f"{os.environ['THESPIAN_BASE_IPADDR']}:{port}"


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int, host: str | None = None) -> bool:
    host = host or os.environ["THESPIAN_BASE_IPADDR"]
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _log_defs(home: Path) -> dict[str, Any]:
    (home / "logs").mkdir(parents=True, exist_ok=True)
    return {
        "version": 1,
        "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
        "handlers": {
            "file": {
                "class": "logging.FileHandler",
                "filename": str(home / "logs" / "control-plane.log"),
                "formatter": "plain",
            }
        },
        "root": {"handlers": ["file"], "level": "INFO"},
        "loggers": {"pika": {"level": "WARNING"}},
    }


class ControlPlane:
    """The running actor system (started in this process's session)."""

    def __init__(self, settings: m.Settings, port: int) -> None:
        self.settings = settings
        self.port = port
        self.asys: Any = None
        self.addresses: dict[str, Any] = {}

    def start(self, on_progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
        home = Path(self.settings.home)
        home.mkdir(parents=True, exist_ok=True)
        self.asys = ActorSystem(BASE, {"Admin Port": self.port}, logDefs=_log_defs(home))
        link = self.asys.createActor(control.BrokerLink, globalName=control.LINK)
        mirror = self.asys.createActor(control.DeviceMirror, globalName=control.MIRROR)
        dist = self.asys.createActor(control.PolicyDistributor, globalName=control.DISTRIBUTOR)
        coll = self.asys.createActor(collector.TelemetryCollector, globalName=collector.COLLECTOR)
        exporter = self.asys.createActor(metrics.MetricsExporter, globalName=metrics.METRICS)
        self.addresses = {
            "link": link,
            "mirror": mirror,
            "distributor": dist,
            "collector": coll,
            "metrics": exporter,
        }
        configure = m.Configure(
            self.settings, link=link, distributor=dist, mirror=mirror, collector=coll
        )
        for name in ("mirror", "distributor", "link", "collector", "metrics"):
            reply = self.asys.ask(self.addresses[name], configure, ASK_TIMEOUT)
            if not isinstance(reply, m.Reply) or not reply.ok:
                raise RuntimeError(f"{name} did not start: {reply!r}")
            on_progress(f"{name} ready")
        reply = self.asys.ask(link, m.Status(), ASK_TIMEOUT)
        return reply.value if isinstance(reply, m.Reply) else {}

    def link_status(self) -> dict[str, Any]:
        reply = self.asys.ask(self.addresses["link"], m.Status(), ASK_TIMEOUT)
        return reply.value if isinstance(reply, m.Reply) else {}

    def collector_status(self) -> dict[str, Any]:
        reply = self.asys.ask(self.addresses["collector"], m.Status(), ASK_TIMEOUT)
        return reply.value if isinstance(reply, m.Reply) else {}

    def stop(self) -> None:
        if self.asys is not None:
            self.asys.shutdown()
            self.asys = None


class Client:
    """The CLI's handle on a running control plane."""

    def __init__(self, port: int, timeout: float = ASK_TIMEOUT) -> None:
        self.port = port
        self.timeout = timeout
        if not port_open(port):
            raise ControlPlaneUnreachable(
                admin_address(port), "is `edgeward control-plane run` running?"
            )
        self.asys = ActorSystem(BASE, {"Admin Port": port})

    def _actor(self, name: str) -> Any:
        cls = {
            control.DISTRIBUTOR: control.PolicyDistributor,
            control.MIRROR: control.DeviceMirror,
            control.LINK: control.BrokerLink,
            collector.COLLECTOR: collector.TelemetryCollector,
        }[name]
        return self.asys.createActor(cls, globalName=name)

    def ask(self, name: str, msg: Any) -> m.Reply:
        reply = self.asys.ask(self._actor(name), msg, self.timeout)
        if reply is None:
            raise ControlPlaneUnreachable(admin_address(self.port), "no answer in time")
        if not isinstance(reply, m.Reply):
            raise ControlPlaneUnreachable(admin_address(self.port), f"odd answer {reply!r}")
        return reply

    def distributor(self, msg: Any) -> m.Reply:
        return self.ask(control.DISTRIBUTOR, msg)

    def mirror(self, msg: Any) -> m.Reply:
        return self.ask(control.MIRROR, msg)

    def link(self, msg: Any) -> m.Reply:
        return self.ask(control.LINK, msg)

    def collector(self, msg: Any) -> m.Reply:
        return self.ask(collector.COLLECTOR, msg)
