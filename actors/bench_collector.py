"""``python -m edgeward.actors.bench_collector``: the TelemetryCollector's
figures in BENCHMARKS.md.

Runs the real control plane (its actors on ``multiprocTCPBase``, started from
this process) against the local broker, in a vhost of its own, and prints:

* **sustained throughput**: ``--backlog`` records are put on the stream while
  the control plane is down; then it starts, and the collector drains them.
  Records/s = records / (last commit - first commit).
* **reader CPU per record**: utime + stime of the collector's reader
  process per record stored (``/proc``); unlike the rates, this does not
  depend on what else the machine runs.
* **latency at an offered rate**: for each ``--rates`` value, records are
  published at that rate for ``--seconds`` (paced every 10 ms; each record's
  ``time`` is its publish time), and publish -> stored latency is each
  record's ``stored`` (taken in the commit's transaction) minus its ``time``:
  p50, p99, max.
* **heartbeats, stream vs queue** (``--heartbeats N``): N real-size
  heartbeats published to the telemetry exchange while a scratch stream with
  the audit trail's retention is bound beside ``edgeward.heartbeats``: what
  the stream keeps on disk (``du`` of its directory, when the broker's data
  dir is readable) against what the classic queue holds once the
  DeviceMirror has consumed it.

The collector runs with the control plane's defaults (batch 250 / 200 ms,
prefetch 500) unless ``--batch``/``--batch-ms`` say otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import pika

from edgeward.transport import topology
from edgeward.transport.admin import ManagementAPI, url_with_vhost
from edgeward.transport.connection import DEFAULT_BROKER_URL
from edgeward.transport.wire import CONTENT_TYPE, Heartbeat, Record

from . import messages as m
from .audit_store import AuditStore
from .bench import cpu_seconds
from .collector import audit_path
from .runtime import ControlPlane, free_port

BROKER_DATA = Path("/var/lib/rabbitmq/mnesia")
SCRATCH_STREAM = "bench.heartbeats-as-stream"


def alert(device: str, seq: int, when: float) -> Record:
    return Record(
        device,
        seq,
        when,
        "alert",
        {
            "policy": "pos-block-network-tools",
            "action": "Block",
            "severity": 5,
            "operation": "Process",
            "resource": "/usr/bin/curl",
            "source": "/bin/bash",
            "tags": ["MITRE"],
            "message": "network tool executed",
            "revision": 3,
        },
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Publisher:
    def __init__(self, url: str) -> None:
        self.conn = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.conn.channel()
        topology.declare(self.channel)
        self.props = pika.BasicProperties(content_type=CONTENT_TYPE, delivery_mode=2)

    def record(self, rec: Record) -> None:
        # The blocking channel flushes the socket on every publish (~0.5 ms on
        # a busy machine); its underlying channel only buffers the frames, and
        # flush() sends them: a device-like publisher that can offer 5,000/s.
        self.channel._impl.basic_publish(
            topology.TELEMETRY_EXCHANGE,
            rec.routing_key,
            rec.encode(),
            pika.BasicProperties(
                content_type=CONTENT_TYPE, delivery_mode=2, message_id=rec.message_id
            ),
        )

    def flush(self) -> None:
        self.conn.process_data_events(time_limit=0)

    def raw(self, routing_key: str, body: bytes) -> None:
        self.channel._impl.basic_publish(topology.TELEMETRY_EXCHANGE, routing_key, body, self.props)

    def settle(self) -> None:
        """Send what is buffered and wait for the broker to answer a round trip."""
        self.flush()
        channel = self.conn.channel()
        channel.confirm_delivery()
        channel.basic_publish(topology.TELEMETRY_EXCHANGE, "bench.none", b"", self.props)
        channel.close()

    def close(self) -> None:
        self.conn.close()


class CollectorBench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.vhost = f"edgeward-bench-collector-{uuid.uuid4().hex[:8]}"
        self.url = url_with_vhost(args.broker_url, self.vhost)
        self.api = ManagementAPI.for_amqp_url(self.url)
        self.home = Path(tempfile.mkdtemp(prefix="edgeward-bench-collector-"))
        self.plane: ControlPlane | None = None
        self.settings = m.Settings(
            home=str(self.home),
            broker_url=self.url,
            # The bench publishes for many devices on one login, so its
            # records carry no user_id; the check itself is a string compare.
            allow_shared_login=True,
            **({"collector_batch": args.batch} if args.batch else {}),
            **({"collector_batch_ms": args.batch_ms} if args.batch_ms else {}),
        )

    def say(self, text: str) -> None:
        if not self.args.json:
            print(text, flush=True)

    def store(self) -> AuditStore:
        return AuditStore(audit_path(str(self.home)))

    def wait_stored(self, count: int, timeout: float) -> None:
        store = self.store()
        deadline = time.monotonic() + timeout
        try:
            while store.count() < count:
                if time.monotonic() > deadline:
                    raise SystemExit(f"only {store.count()} of {count} stored after {timeout}s")
                time.sleep(0.05)
        finally:
            store.close()

    def reader_pid(self) -> int:
        assert self.plane is not None
        return int(self.plane.collector_status()["reader"]["pid"])

    def start_plane(self) -> None:
        self.plane = ControlPlane(self.settings, free_port())
        self.plane.start()
        # Starting the actor system leaves SIGINT/SIGTERM to us: stop cleanly on both.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _interrupt)

    def sustained(self, pub: Publisher) -> dict[str, Any]:
        n = self.args.backlog
        self.say(f"putting {n} records on the stream with the control plane down ...")
        now = time.time()
        for i in range(n):
            pub.record(alert(f"backlog-{i % 100:04d}", i // 100 + 1, now))
            if i % 500 == 499:
                pub.flush()
        pub.settle()
        started = time.monotonic()
        self.start_plane()
        self.wait_stored(n, timeout=600)
        drained = time.monotonic() - started
        cpu = cpu_seconds(self.reader_pid())  # the reader's whole life: start-up included
        store = self.store()
        stamps = [s for _, s in store.latencies()]
        store.close()
        span = stamps[-1] - stamps[0]
        return {
            "records": n,
            "records_per_s": round((n - 1) / span) if span > 0 else None,
            "start_to_all_stored_s": round(drained, 2),
            "reader_cpu_us_per_record": round(cpu / n * 1e6, 1),
            "load_average_1m": round(os.getloadavg()[0], 1),
        }

    def offered(self, pub: Publisher, rate: int) -> dict[str, Any]:
        seconds = self.args.seconds
        total = int(rate * seconds)
        prefix = f"r{rate}"
        self.say(f"offering {rate} records/s for {seconds:.0f}s ...")
        store = self.store()
        before = store.count()
        pid = self.reader_pid()
        cpu0 = cpu_seconds(pid)
        t0 = time.monotonic()
        sent = 0
        while sent < total:
            due = min(total, int((time.monotonic() - t0) * rate) + 1)
            while sent < due:
                pub.record(alert(f"{prefix}-{sent % 100:04d}", sent // 100 + 1, time.time()))
                sent += 1
            pub.flush()
            pause = t0 + sent / rate - time.monotonic()
            if pause > 0:
                time.sleep(min(pause, 0.01))
        took = time.monotonic() - t0
        pub.settle()
        self.wait_stored(before + total, timeout=300)
        cpu = cpu_seconds(pid) - cpu0
        rows = store._db.execute(
            "SELECT (stored - time) * 1000 FROM records WHERE device LIKE ?", (prefix + "-%",)
        ).fetchall()
        store.close()
        lat = [r[0] for r in rows]
        return {
            "load_average_1m": round(os.getloadavg()[0], 1),
            "offered_per_s": rate,
            "achieved_per_s": round(total / took),
            "records": total,
            "reader_cpu_us_per_record": round(cpu / total * 1e6, 1),
            "latency_ms": {
                "p50": round(statistics.median(lat), 1),
                "p99": round(percentile(lat, 0.99), 1),
                "max": round(max(lat), 1),
            },
        }

    def heartbeats(self, pub: Publisher) -> dict[str, Any]:
        n = self.args.heartbeats
        hb = Heartbeat(
            device="pos-00001",
            time=time.time(),
            revision=12,
            applied_revision=12,
            hash="ab" * 32,
            status="ok",
            rejected={"stale": 1},
            labels={"store": "berlin", "kubearmor.io/hostname": "pos-00001"},
            outbox=3,
            dropped={"log": 0},
        )
        size = len(hb.encode())
        pub.channel.queue_declare(
            SCRATCH_STREAM, durable=True, arguments=topology.TELEMETRY_RETENTION.arguments()
        )
        pub.channel.queue_bind(
            SCRATCH_STREAM, topology.TELEMETRY_EXCHANGE, routing_key="telemetry.*.heartbeat"
        )
        self.say(f"publishing {n} heartbeats of {size} bytes to the stream and the queue ...")
        t0 = time.monotonic()
        for i in range(n):
            # Each device's own heartbeat, as the mirror would believe it
            # (same size: the names are as long as the template's).
            name = f"pos-{i % 35000:05d}"
            beat = dataclasses.replace(
                hb, device=name, labels={**hb.labels, "kubearmor.io/hostname": name}
            )
            pub.raw(f"telemetry.{name}.heartbeat", beat.encode())
            if i % 500 == 499:
                pub.flush()
        pub.settle()
        took = time.monotonic() - t0
        # The classic queue is consumed by the DeviceMirror's link: wait for it to drain.
        deadline = time.monotonic() + 120
        queue: dict[str, Any] = {}
        while time.monotonic() < deadline:
            queue = self.api.queue(self.vhost, topology.HEARTBEAT_QUEUE) or {}
            if queue.get("messages") == 0 and "memory" in queue:
                break
            time.sleep(1)
        disk = stream_disk_bytes(self.vhost, SCRATCH_STREAM)
        per_day = 35_000 / 10 * 86_400  # 35,000 devices, one heartbeat per 10 s
        return {
            "heartbeats": n,
            "heartbeat_bytes": size,
            "publish_per_s": round(n / took),
            "stream_disk_bytes": disk,
            "stream_bytes_per_heartbeat": round(disk / n, 1) if disk else None,
            "queue_messages_after_mirror": queue.get("messages"),
            "queue_memory_bytes_after_mirror": queue.get("memory"),
            "fleet_heartbeats_per_day": int(per_day),
            "fleet_stream_gib_per_day": round(per_day * (disk / n) / 1024**3, 1) if disk else None,
        }

    def run(self) -> dict[str, Any]:
        self.api.create_vhost(self.vhost)
        self.api.set_permissions(self.vhost, "guest")
        pub = Publisher(self.url)
        try:
            out: dict[str, Any] = {
                "settings": {
                    "batch": self.settings.collector_batch,
                    "batch_ms": self.settings.collector_batch_ms,
                    "prefetch": 2 * self.settings.collector_batch,
                }
            }
            out["sustained"] = self.sustained(pub)
            self.say(f"  {out['sustained']}")
            out["offered"] = []
            for rate in self.args.rates:
                out["offered"].append(self.offered(pub, rate))
                self.say(f"  {out['offered'][-1]}")
            if self.args.heartbeats:
                out["heartbeats"] = self.heartbeats(pub)
                self.say(f"  {out['heartbeats']}")
            return out
        finally:
            pub.close()

    def close(self) -> None:
        if self.plane is not None:
            self.plane.stop()
        try:
            self.api.delete_vhost(self.vhost)
        finally:
            shutil.rmtree(self.home, ignore_errors=True)


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def stream_disk_bytes(vhost: str, queue: str) -> int | None:
    """Bytes the broker keeps on disk for a stream (its directory), if readable."""
    try:
        dirs = [
            d
            for d in BROKER_DATA.glob("*/stream/*")
            if d.is_dir()
            and vhost.replace("-", "_") in d.name.replace("-", "_")
            and queue.replace(".", "_").replace("-", "_")
            in d.name.replace(".", "_").replace("-", "_")
        ]
    except OSError:
        return None
    if len(dirs) != 1:
        return None
    done = subprocess.run(["du", "-sb", str(dirs[0])], capture_output=True, text=True)
    return int(done.stdout.split()[0]) if done.returncode == 0 else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m edgeward.actors.bench_collector",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--broker-url", default=DEFAULT_BROKER_URL)
    parser.add_argument("--backlog", type=int, default=50_000)
    parser.add_argument("--rates", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--heartbeats", type=int, default=0)
    parser.add_argument("--batch", type=int, default=0, help="collector batch (default: plane's)")
    parser.add_argument("--batch-ms", type=float, default=0.0)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON only")
    args = parser.parse_args(argv)
    bench = CollectorBench(args)
    try:
        figures = bench.run()
    except KeyboardInterrupt:
        return 130
    finally:
        bench.close()
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
