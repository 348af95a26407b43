"""Scrape one RabbitMQ node's ``rabbitmq_prometheus`` endpoint (``/metrics``).

:func:`scrape` returns a few figures under short keys; each is the sum of the
metric's samples over its labels (``rabbitmq_global_*`` counters come once per
protocol and queue type). What 3.10.8 exports, on its default aggregated
endpoint:

==========================  ====================================================
key                         metric
==========================  ====================================================
``memory_bytes``            ``rabbitmq_process_resident_memory_bytes`` (RSS)
``fds``                     ``rabbitmq_process_open_fds``
``fd_limit``                ``rabbitmq_process_max_fds``
``sockets``                 ``rabbitmq_process_open_tcp_sockets``
``socket_limit``            ``rabbitmq_process_max_tcp_sockets`` (~90% of fds)
``erlang_processes``        ``erlang_vm_process_count``
``connections``             ``rabbitmq_connections``
``channels``                ``rabbitmq_channels``
``consumers``               ``rabbitmq_consumers``
``queues``                  ``rabbitmq_queues``
``messages_in_total``       ``rabbitmq_global_messages_received_total``
``messages_out_total``      ``rabbitmq_global_messages_delivered_total``
``messages_confirmed_total``  ``rabbitmq_global_messages_confirmed_total``
``alarm_memory``            ``rabbitmq_alarms_memory_used_watermark`` (1 = on)
``alarm_fds``               ``rabbitmq_alarms_file_descriptor_limit`` (1 = on)
``cpu_seconds``             ``erlang_vm_statistics_runtime_milliseconds`` ÷ 1000
==========================  ====================================================

``cpu_seconds`` is the Erlang runtime's CPU time, summed over its threads
(``statistics(runtime)``): the work the node did. It leaves out what the
schedulers burn busy-waiting for work, which the OS counts as the process's
CPU (measured on an idle-ish node: runtime rose 3.5 s while the process's
utime + stime rose 6.4 s in the same 20 s) and which they give up when the
cores are wanted elsewhere.

A metric the node does not export (or that does not parse) is left out; an
endpoint that does not answer raises :class:`MetricsUnavailable`.

Freshness (measured on 3.10.8): ``memory_bytes``, ``fds`` and ``sockets`` are
the node's own statistics, refreshed every ``collect_statistics_interval``
(5 s by default, 60 s with charts/rabbitmq/rabbitmq.conf): they can be that
old. Connections, channels, the message counters and the Erlang process
count were seen to move at once.
"""

from __future__ import annotations

import math
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["METRICS", "MetricsUnavailable", "NodeScraper", "parse", "scrape"]

METRICS: dict[str, str] = {
    "memory_bytes": "rabbitmq_process_resident_memory_bytes",
    "fds": "rabbitmq_process_open_fds",
    "fd_limit": "rabbitmq_process_max_fds",
    "sockets": "rabbitmq_process_open_tcp_sockets",
    "socket_limit": "rabbitmq_process_max_tcp_sockets",
    "erlang_processes": "erlang_vm_process_count",
    "connections": "rabbitmq_connections",
    "channels": "rabbitmq_channels",
    "consumers": "rabbitmq_consumers",
    "queues": "rabbitmq_queues",
    "messages_in_total": "rabbitmq_global_messages_received_total",
    "messages_out_total": "rabbitmq_global_messages_delivered_total",
    "messages_confirmed_total": "rabbitmq_global_messages_confirmed_total",
    "alarm_memory": "rabbitmq_alarms_memory_used_watermark",
    "alarm_fds": "rabbitmq_alarms_file_descriptor_limit",
    "cpu_seconds": "erlang_vm_statistics_runtime_milliseconds",
}
#: Metrics whose unit is not the key's: multiply by this.
SCALE = {"cpu_seconds": 0.001}
#: Counters exported without the ``_total`` suffix, which prometheus_client's
#: parser then does not return: parsed without their TYPE line (as untyped).
UNTYPED = {"erlang_vm_statistics_runtime_milliseconds"}


class MetricsUnavailable(Exception):
    """The endpoint did not answer with metrics."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"{url}: {reason}")
        self.url = url
        self.reason = reason


def scrape(url: str, timeout: float = 5.0) -> dict[str, float]:
    """Fetch ``url`` (``http://host:15692/metrics``) and return :data:`METRICS`'
    keys that the node exports, each summed over its labels."""
    req = urllib.request.Request(url, headers={"Accept": "text/plain; version=0.0.4"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        raise MetricsUnavailable(url, f"HTTP {exc.code}") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise MetricsUnavailable(url, str(reason)) from exc
    return parse(body.decode("utf-8", errors="replace"))


def parse(text: str) -> dict[str, float]:
    """The :data:`METRICS` found in a Prometheus text exposition.

    Each wanted metric is parsed on its own lines only, so a line the parser
    does not like costs that one metric, not the scrape (and the other ~650
    families of a RabbitMQ node are never parsed).
    """
    wanted = set(METRICS.values())
    lines: dict[str, list[str]] = {name: [] for name in wanted}
    for line in text.splitlines():
        if line.startswith("#"):
            parts = line.split(None, 3)
            if (
                len(parts) >= 3
                and parts[1] in ("HELP", "TYPE")
                and parts[2] in wanted
                and parts[2] not in UNTYPED
            ):
                lines[parts[2]].append(line)
            continue
        name = line.split("{", 1)[0].split(None, 1)[0] if line.strip() else ""
        if name in wanted:
            lines[name].append(line)
    out: dict[str, float] = {}
    for key, name in METRICS.items():
        if not lines[name]:
            continue
        total, seen = 0.0, False
        try:
            for family in text_string_to_metric_families("\n".join(lines[name]) + "\n"):
                for sample in family.samples:
                    if sample.name == name and math.isfinite(sample.value):
                        total += sample.value
                        seen = True
        except Exception:  # a parse quirk drops this one metric, never the scrape
            continue
        if seen:
            out[key] = total * SCALE.get(key, 1.0)
    return out


class NodeScraper:
    """Scrapes nodes every ``every`` seconds on a thread of its own.

    A node under 35,000 connections can take seconds to answer; scraping on
    the caller's loop would stall whatever else that loop serves (the
    director's progress answers, its shards' nudges). :meth:`take` hands over
    what was scraped since the last call as ``(time.time(), node, figures)``;
    an endpoint that does not answer is skipped for that round.
    """

    def __init__(
        self, nodes: Sequence[tuple[str, str]], every: float, timeout: float = 2.0
    ) -> None:
        self.nodes = list(nodes)
        self.every = every
        self.timeout = timeout
        self._samples: list[tuple[float, str, dict[str, float]]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="node-scraper", daemon=True)

    def start(self) -> NodeScraper:
        self._thread.start()
        return self

    def once(self) -> list[tuple[float, str, dict[str, float]]]:
        """One round over the nodes, on the caller's thread."""
        self._round()
        return self.take()

    def take(self) -> list[tuple[float, str, dict[str, float]]]:
        with self._lock:
            samples, self._samples = self._samples, []
        return samples

    def stop(self) -> list[tuple[float, str, dict[str, float]]]:
        """Stop (waiting for a scrape under way) and return what is left."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.timeout * len(self.nodes) + 1.0)
        return self.take()

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            self._round()
            self._stop.wait(max(0.0, self.every - (time.monotonic() - began)))

    def _round(self) -> None:
        for node, url in self.nodes:
            if self._stop.is_set():
                return
            try:
                figures = scrape(url, timeout=self.timeout)
            except MetricsUnavailable:
                continue
            with self._lock:
                self._samples.append((time.time(), node, figures))
