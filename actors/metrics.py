"""Prometheus ``/metrics`` for the control plane, served by an actor.

The MetricsExporter listens on ``Settings.metrics_port`` (0: off). Every
``REFRESH`` seconds it asks the DeviceMirror for its device rows and the
TelemetryCollector for its counters, and it answers each HTTP request from
the latest answers: a scrape never waits on another actor. No thread: the
listening socket is handed to Thespian with ``ThespianWatch`` like the
BrokerLink's broker socket, and a request (a few hundred bytes that arrive
with the connection) is read with a short timeout.

Series, fleet-wide only — never a label per device (35,000 series would hurt
Prometheus; per-device detail is ``edgeward devices``):

==========================================  ======================================
``edgeward_devices{state}``                 devices per state (every state, 0 too)
``edgeward_devices_by_revision{revision}``  devices per reported in-force revision
``edgeward_fleet_revision``                 the fleet's latest revision
``edgeward_outbox_records``                 records waiting in devices' outboxes
``edgeward_outbox_dropped{type}``           records devices report they dropped
``edgeward_bundles_rejected{reason}``       bundles devices report they refused
``edgeward_telemetry_stored_total``         records the collector stored
``edgeward_alerts_stored_total{severity, policy}``  alerts among them
``edgeward_telemetry_duplicates_total``     repeats it recognised and skipped
``edgeward_telemetry_rejected_total{reason}``  messages it refused, by reason
``edgeward_collector_restarts_total``       times its stream reader was restarted
``edgeward_collector_lag``                  stream tail offset - stored offset
``edgeward_heartbeats_refused_total``       heartbeats not from the device they name
``edgeward_heartbeats_malformed_total``     heartbeats that did not decode
``edgeward_telemetry_confirm_seconds``      devices' publish-to-confirm latency
                                            (histogram, from their heartbeats)
``edgeward_metrics_age_seconds``            how old the answers above are
==========================================  ======================================

The collector lag is measured every ``TAIL_EVERY`` seconds, right after a
fresh stored offset arrives, by a short-lived consumer at the stream's
``last`` chunk (RabbitMQ 3.10 publishes no stream tail offset); it is absent
while the broker cannot be asked. Offsets are not dense (a stream spends one
at each segment start), so it bounds the records not yet stored from above.
"""

from __future__ import annotations

import socket
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from thespian.actors import ActorTypeDispatcher, ThespianWatch, WakeupMessage, WatchMessage

from edgeward.transport.connection import split_urls

from . import messages as m
from .collector import stream_tail
from .fleet import STATES

METRICS = "edgeward-metrics"  # the exporter's global name
REFRESH = 5.0  # seconds between asking the mirror and the collector
REQUEST_TIMEOUT = 1.0  # seconds a scrape may take to send its request
MAX_REQUEST = 8192
TAIL_EVERY = 15.0  # seconds between measurements of the collector's lag
TAIL_TIMEOUT = 2.0  # at most this long blocked asking the broker


class MetricsExporter(ActorTypeDispatcher):
    def __init__(self) -> None:
        super().__init__()
        self.listener: socket.socket | None = None
        self.mirror: Any = None
        self.collector: Any = None
        self.rows: list[dict[str, Any]] = []
        self.counters: dict[str, Any] = {}
        self.mirror_status: dict[str, Any] = {}
        self.urls: list[str] = []
        self.lag: int | None = None
        self.tail_at = 0.0
        self.updated = 0.0
        self.scrapes = 0

    # -- set-up ------------------------------------------------------------------

    def receiveMsg_Configure(self, msg: m.Configure, sender: Any) -> ThespianWatch:
        self.mirror, self.collector = msg.mirror, msg.collector
        self.urls = split_urls(msg.settings.broker_url)
        port = msg.settings.metrics_port
        if port and self.listener is None:
            try:
                listener = socket.create_server(("0.0.0.0", port), reuse_port=False)
            except OSError as exc:
                self.send(sender, m.Reply.fail("error", f"metrics port {port}: {exc}"))
                return self._watch()
            listener.setblocking(False)
            self.listener = listener
            self.wakeupAfter(0.01)
        self.send(sender, m.Reply(True, {"metrics_port": port}))
        return self._watch()

    def receiveMsg_Status(self, msg: m.Status, sender: Any) -> ThespianWatch:
        port = self.listener.getsockname()[1] if self.listener else 0
        self.send(sender, m.Reply(True, {"port": port, "scrapes": self.scrapes}))
        return self._watch()

    def receiveMsg_ActorExitRequest(self, msg: Any, sender: Any) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    def _watch(self) -> ThespianWatch:
        return ThespianWatch([self.listener.fileno()] if self.listener else [])

    # -- keeping the answers fresh ---------------------------------------------------

    def receiveMsg_WakeupMessage(self, msg: WakeupMessage, sender: Any) -> ThespianWatch:
        if self.mirror is not None:
            self.send(self.mirror, m.ListDevices())
            self.send(self.mirror, m.Status())
        if self.collector is not None:
            self.send(self.collector, m.Status())
        self.wakeupAfter(REFRESH)
        return self._watch()

    def receiveMsg_Reply(self, msg: m.Reply, sender: Any) -> ThespianWatch:
        if msg.ok and sender == self.mirror and isinstance(msg.value, list):
            self.rows = msg.value
            self.updated = time.time()
        elif msg.ok and sender == self.mirror and isinstance(msg.value, dict):
            self.mirror_status = msg.value
        elif msg.ok and sender == self.collector and isinstance(msg.value, dict):
            self.counters = msg.value
            if time.monotonic() - self.tail_at >= TAIL_EVERY:
                self._measure_lag(msg.value.get("offset"))
        return self._watch()

    def _measure_lag(self, stored: int | None) -> None:
        """Stream tail minus the stored offset just received (blocks up to ~2 s)."""
        self.tail_at = time.monotonic()
        if not self.urls:
            return
        try:
            tail = stream_tail(self.urls, quiet=0.2, timeout=TAIL_TIMEOUT)
        except Exception:  # the broker is away: no figure rather than a wrong one
            self.lag = None
            return
        if tail is None:
            self.lag = 0
        else:
            self.lag = max(0, tail - (-1 if stored is None else stored))

    # -- serving -------------------------------------------------------------------

    def receiveMsg_WatchMessage(self, msg: WatchMessage, sender: Any) -> ThespianWatch:
        if self.listener is not None and self.listener.fileno() in msg.ready:
            while True:
                try:
                    conn, _ = self.listener.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    break
                with conn:
                    self._serve(conn)
        return self._watch()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(REQUEST_TIMEOUT)
        request = b""
        try:
            while b"\r\n\r\n" not in request and len(request) < MAX_REQUEST:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                request += chunk
            line = request.split(b"\r\n", 1)[0].split()
            if len(line) < 2 or line[0] != b"GET":
                conn.sendall(_response(405, b"only GET\n", b"text/plain"))
            elif line[1].split(b"?")[0] != b"/metrics":
                conn.sendall(_response(404, b"see /metrics\n", b"text/plain"))
            else:
                self.scrapes += 1
                conn.sendall(_response(200, self.exposition(), CONTENT_TYPE))
        except OSError:
            pass  # a scraper that went away, or a slow one: its problem

    def exposition(self) -> bytes:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(
            _Snapshot(self.rows, self.counters, self.updated, self.mirror_status, self.lag)
        )
        return generate_latest(registry)


CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


def _response(status: int, body: bytes, content_type: bytes) -> bytes:
    reason = {200: b"OK", 404: b"Not Found", 405: b"Method Not Allowed"}[status]
    head = (
        b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
        % (status, reason, content_type, len(body))
    )
    return head + body


class _Snapshot:
    """The exporter's latest answers as Prometheus metric families."""

    def __init__(
        self,
        rows: list[dict[str, Any]],
        counters: dict[str, Any],
        updated: float,
        mirror: dict[str, Any] | None = None,
        lag: int | None = None,
    ):
        self.rows, self.counters, self.updated = rows, counters, updated
        self.mirror, self.lag = mirror or {}, lag

    def collect(self) -> Iterator[Any]:
        by_state = Counter(str(r.get("state", "unknown")) for r in self.rows)
        states = GaugeMetricFamily("edgeward_devices", "Devices per state", labels=["state"])
        for state in (*STATES, *sorted(set(by_state) - set(STATES))):
            states.add_metric([state], by_state.get(state, 0))
        yield states

        by_revision = Counter(int(r.get("reported_revision") or 0) for r in self.rows)
        revisions = GaugeMetricFamily(
            "edgeward_devices_by_revision",
            "Devices per revision they report in force (0: none yet)",
            labels=["revision"],
        )
        for revision, count in sorted(by_revision.items()):
            revisions.add_metric([str(revision)], count)
        yield revisions

        fleet = max((int(r.get("fleet_revision") or 0) for r in self.rows), default=0)
        yield GaugeMetricFamily("edgeward_fleet_revision", "The fleet's latest revision", fleet)

        yield GaugeMetricFamily(
            "edgeward_outbox_records",
            "Telemetry records waiting in devices' outboxes, as last reported",
            sum(int(r.get("outbox") or 0) for r in self.rows),
        )
        refused: Counter[str] = Counter()
        for r in self.rows:
            for reason, n in (r.get("rejected") or {}).items():
                refused[str(reason)] += int(n)
        bundles = GaugeMetricFamily(
            "edgeward_bundles_rejected",
            "Policy bundles devices refused (bad_signature, unknown_key, stale, ...), by reason, "
            "summed over their last heartbeats",
            labels=["reason"],
        )
        for reason in sorted(refused):
            bundles.add_metric([reason], refused[reason])
        yield bundles
        dropped: Counter[str] = Counter()
        for r in self.rows:
            for kind, n in (r.get("dropped") or {}).items():
                dropped[str(kind)] += int(n)
        drops = GaugeMetricFamily(
            "edgeward_outbox_dropped",
            "Records devices report their full outbox dropped, since each agent's first start",
            labels=["type"],
        )
        for kind in sorted(dropped):
            drops.add_metric([kind], dropped[kind])
        yield drops

        c = self.counters
        yield CounterMetricFamily(
            "edgeward_telemetry_stored", "Records the collector stored", int(c.get("stored", 0))
        )
        yield CounterMetricFamily(
            "edgeward_telemetry_duplicates",
            "Repeated records (same device and seq) the collector skipped",
            int(c.get("duplicates", 0)),
        )
        rejected = CounterMetricFamily(
            "edgeward_telemetry_rejected",
            "Messages on the telemetry stream the collector refused, by reason",
            labels=["reason"],
        )
        for reason, n in sorted((c.get("refused") or {}).items()):
            rejected.add_metric([str(reason)], int(n))
        yield rejected
        alerts = CounterMetricFamily(
            "edgeward_alerts_stored",
            "Alerts the collector stored, by severity and deciding policy",
            labels=["severity", "policy"],
        )
        for key, n in sorted((c.get("alerts") or {}).items()):
            severity, _, policy = str(key).partition(":")
            alerts.add_metric([severity, policy], int(n))
        yield alerts
        yield CounterMetricFamily(
            "edgeward_collector_restarts",
            "Times the collector's stream reader was restarted",
            int(c.get("restarts", 0)),
        )
        if self.lag is not None:
            yield GaugeMetricFamily(
                "edgeward_collector_lag",
                "Stream offsets between the telemetry stream's tail and the collector's stored"
                " offset (an upper bound on records not yet stored)",
                self.lag,
            )
        yield CounterMetricFamily(
            "edgeward_heartbeats_refused",
            "Heartbeats refused because their sender was not the device they name, or it is "
            "revoked",
            int(self.mirror.get("refused", 0)),
        )
        yield CounterMetricFamily(
            "edgeward_heartbeats_malformed",
            "Heartbeats that did not decode",
            int(self.mirror.get("malformed", 0)),
        )
        bounds = self.mirror.get("confirm_buckets") or []
        counts = self.mirror.get("confirm_counts") or []
        if bounds and len(counts) == len(bounds) + 1:
            cumulative, buckets = 0, []
            for bound, n in zip([*map(str, bounds), "+Inf"], counts, strict=True):
                cumulative += int(n)
                buckets.append((bound, cumulative))
            yield HistogramMetricFamily(
                "edgeward_telemetry_confirm_seconds",
                "Devices' telemetry publish-to-confirm latency, from their heartbeats",
                buckets=buckets,
                sum_value=float(self.mirror.get("confirm_seconds", 0.0)),
            )
        yield GaugeMetricFamily(
            "edgeward_metrics_age_seconds",
            "Age of the device rows these metrics come from (-1: none yet)",
            time.time() - self.updated if self.updated else -1.0,
        )
