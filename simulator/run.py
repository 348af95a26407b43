"""``edgeward simulate``: set up the broker, run the phases, write the report.

The run, in order:

1. the broker: a throwaway local cluster (``--local-cluster K``) or the
   nodes given (``--broker``); a broker user per device, as ``enroll`` makes
   them (``logins.py``; not with ``--shared-login`` or shared connections),
   granted in each of two fresh vhosts, one for the raw baseline and one for
   edgeward; vhosts and users removed at the end;
2. the raw baseline (unless the scenario says ``baseline = false``): every
   device connects and consumes the policy stream but only acks; probes are
   published and their fan-out timed;
3. the edgeward phase: the same fleet with the real agent core; after the
   ramp, the scenario's timeline runs (times are seconds after the ramp),
   for ``duration`` seconds; then a short settle; then devices stop raising
   alerts and the run waits (at most ``DRAIN_LIMIT``) for their telemetry
   outboxes to drain onto the stream, which a counter reads throughout;
4. the report (``report.json``, ``report.md``, charts) in ``--report DIR``,
   also after Ctrl-C (marked partial).
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edgeward.enforcement.digest import state_digest
from edgeward.enforcement.selector import selects
from edgeward.transport import topology
from edgeward.transport.admin import ManagementAPI, url_with_vhost
from edgeward.transport.connection import connect_blocking, redact, split_urls
from edgeward.transport.errors import BrokerUnreachable
from edgeward.transport.signing import Signer
from edgeward.transport.wire import Bundle

from . import model
from .logins import DeviceLogins, Stopped, new_secret, patiently, remove_quietly
from .scenario import Scenario, Step, device_name, labels_for

SETTLE = 5.0
API_TIMEOUT = 60.0  # one management API request, seconds
API_PATIENCE = 300.0  # how long a busy management API is waited for
PROGRESS_PATIENCE = 120.0  # how long a progress poll waits for the director
STORM_LIMIT = 300.0  # how long a reconnect storm is waited for, each phase
RESTART_LIMIT = 180.0  # how long the devices of a restarted node are waited for
# How long the outboxes are given to drain at the end.  A backlog larger than
# the sender's window starts after a random delay of up to the agent's drain
# jitter (60 s), then goes at its rate (100 records/s).
DRAIN_LIMIT = 120.0
PROBES = 3
WORKER_PATIENCE = 60.0  # how long named worker hosts are waited for
NODE_DOWN_PATIENCE = 120.0  # how long every worker is given to take a node-down notice


class Aborted(Exception):
    pass


class _BaselineOnly(Exception):
    pass


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    out = {"python": platform.python_version()}
    for dist in ("edgeward", "pika", "thespian", "cryptography", "cbor2"):
        try:
            out[dist] = version(dist)
        except Exception:
            pass
    return out


def _machine() -> dict[str, Any]:
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "memory_bytes": mem,
        "cpu": cpu,
        "kernel": platform.release(),
        "hostname_hash": uuid.uuid5(uuid.NAMESPACE_DNS, platform.node()).hex[:8],
    }


def _r2(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def largest_bundle(scenario: Scenario) -> int:
    """Bytes of the largest signed bundle the scenario's timeline publishes.

    The raw baseline's probes carry this many bytes: a floor measured with
    tiny messages would flatter the broker and inflate edgeward's ratio.
    """
    policies = Policies()
    signer = Signer.generate()
    largest = 0
    for step in scenario.timeline:
        if step.action != "apply":
            continue
        revision, changed, _ = policies.step(step)
        bundle = delta_bundle(revision, policies.state, changed)
        largest = max(largest, len(signer.sign(bundle).encode()))
    return largest


def delta_bundle(
    revision: int,
    state: Mapping[str, Mapping[str, Any]],
    changed: Sequence[str],
    deleted: Sequence[str] = (),
) -> Bundle:
    """The delta a timeline step publishes: the changed and deleted policies
    and the digest of the whole state after it."""
    return Bundle(
        revision=revision,
        issued_at=time.time(),
        mode="delta",
        policies=tuple(dict(state[n]) for n in changed),
        deleted=tuple(deleted),
        sha256=state_digest(state.values()),
    )


class Policies:
    """The fleet state the timeline's ``apply`` steps build, revision by revision."""

    def __init__(self) -> None:
        self.state: dict[str, dict] = {}
        self.revision = 0

    @staticmethod
    def _selector(text: str) -> dict[str, str]:
        if text == "*":
            return {"kubearmor.io/hostname": "*"}
        key, _, value = text.partition("=")
        return {key.strip(): value.strip()}

    @staticmethod
    def _doc(name: str, selector: dict[str, str], revision: int, j: int) -> dict:
        return {
            "apiVersion": "security.kubearmor.com/v1",
            "kind": "KubeArmorHostPolicy",
            "metadata": {"name": name},
            "spec": {
                "nodeSelector": {"matchLabels": selector},
                "process": {
                    "matchPaths": [
                        {"path": f"/opt/pos/bin/tool-{revision}-{j}-{k}"} for k in range(4)
                    ]
                },
                "file": {"matchDirectories": [{"dir": "/etc/pos/secrets/", "recursive": True}]},
                "severity": 5,
                "action": "Block",
            },
        }

    def step(self, step: Step) -> tuple[int, list[str], dict[str, str] | None]:
        """The next revision: (revision, changed names, selector of the change or None)."""
        self.revision += 1
        selector = self._selector(step.selector)
        group = (
            "all"
            if step.selector == "*"
            else re.sub(r"[^a-z0-9]+", "-", step.selector.lower()).strip("-")
        )
        changed = []
        for j in range(step.changed):
            name = f"sim-{group}-{j}"
            self.state[name] = self._doc(name, selector, self.revision, j)
            changed.append(name)
        j = 0
        everyone = False
        while len(self.state) < step.policies:
            name = f"sim-base-{j}"
            if name not in self.state:
                self.state[name] = self._doc(name, self._selector("*"), self.revision, j)
                changed.append(name)
                everyone = True
            j += 1
        return self.revision, changed, (None if everyone or step.selector == "*" else selector)


class Runner:
    def __init__(
        self,
        scenario: Scenario,
        report_dir: Path,
        *,
        brokers: list[str] | None = None,
        local_cluster: int = 0,
        broker_config: Path | None = None,
        metrics_urls: list[str] | None = None,
        verify: str | None = None,
        share_connections: int = 0,
        baseline_delivery: str = "stream",
        baseline_only: bool = False,
        sizing: dict[str, Any] | None = None,
        worker_hosts: list[str] | None = None,
        worker_wait: float = WORKER_PATIENCE,
        out=print,
    ) -> None:
        self.scenario = scenario
        # host:port of each ``edgeward simulate-worker``: shards run there only.
        self.worker_hosts = list(worker_hosts or [])
        self.worker_wait = worker_wait
        self.report_dir = report_dir
        self.brokers = brokers or []
        self.local_cluster = local_cluster
        self.broker_config = broker_config
        self.metrics_urls = metrics_urls
        self.verify = verify or scenario.verify
        self.share = share_connections
        self.baseline_delivery = baseline_delivery
        self.baseline_only = baseline_only
        # Keyword arguments of report.write: node_memory_bytes, node_fds, ...
        self.sizing = dict(sizing or {})
        self.out = out
        self.abort = threading.Event()
        self.cluster: Any = None
        self.asys: Any = None
        self.director: Any = None
        self.api: ManagementAPI | None = None
        self.vhosts: list[str] = []
        # Per-device broker users (None: the shared login of the URLs).
        self.logins: DeviceLogins | None = None
        self.secret = b""  # the run's secret the device passwords derive from
        self.labels = [labels_for(scenario, i) for i in range(scenario.devices)]
        self.run: model.RunData | None = None
        self.baseline_broker: list[model.BrokerSample] = []
        # The phase as this process's progress polls saw it: the report's
        # fleet figures when the director's own record of it is lost.
        self.seen: list[model.FleetSample] = []
        self.slowest_turn = 0.0  # the longest a worker went without serving its actor
        self.seen_base_rss = 0  # the workers' RSS before their devices, as polled
        self.t0 = time.time()

    # -- set-up ------------------------------------------------------------------

    def _broker(self) -> tuple[list[str], list[tuple[str, str]], str]:
        """Node URLs, (node, metrics URL) pairs and a config label."""
        if self.local_cluster:
            from .cluster import LocalCluster

            self.out(f"starting a local {self.local_cluster}-node RabbitMQ cluster ...")
            self.cluster = LocalCluster(
                self.local_cluster, self.report_dir / "cluster", config_file=self.broker_config
            )
            self.cluster.start(progress=lambda line: self.out(f"  {line}"))
            urls = list(self.cluster.amqp_urls)
            metrics = list(zip(self.cluster.node_names, self.cluster.prometheus_urls, strict=True))
            self.api = ManagementAPI(
                self.cluster.management_urls[0].rstrip("/") + "/api",
                "guest",
                "guest",
                timeout=API_TIMEOUT,
            )
            label = str(self.broker_config) if self.broker_config else "default"
            return urls, metrics, label
        urls = self.brokers
        if self.metrics_urls is not None:
            metric_urls = self.metrics_urls
        else:
            metric_urls = [f"http://{urlsplit(u).hostname}:15692/metrics" for u in urls]
        metrics = [
            (f"{urlsplit(u).hostname}:{urlsplit(u).port or 5672}", m)
            for u, m in zip(urls, metric_urls, strict=False)
        ]
        self.api = ManagementAPI.for_amqp_url(urls[0])
        self.api.timeout = API_TIMEOUT
        return urls, metrics, "as found"

    def _shared_login_reason(self) -> str | None:
        """Why devices log in with the URLs' login, or None: a user each."""
        if self.share > 1:
            return (
                f"--share-connections {self.share}: a connection shared by {self.share} "
                "devices is one login, not one user per device"
            )
        if self.scenario.shared_login:
            return "asked for: --shared-login, or shared_login = true in the scenario"
        return None

    def _make_logins(self, run: model.RunData) -> None:
        """A broker user per device, before any phase (set-up, not the ramp)."""
        reason = self._shared_login_reason()
        if reason is not None:
            run.logins = {"mode": "shared", "reason": reason}
            return
        assert self.api is not None
        self.secret = new_secret()
        self.logins = DeviceLogins(
            self.api,
            [device_name(i) for i in range(self.scenario.devices)],
            self.secret,
            out=self.out,
            stop=self.abort.is_set,
        )
        run.logins = self.logins.figures
        self.out(f"making {self.scenario.devices:,} device users ...")
        seconds = self._patiently(self.logins.create)
        self.out(f"  {self.scenario.devices:,} device users made in {seconds:.1f} s")

    def _patiently(self, call):
        """``call()``, retried while the management API is busy (not after Ctrl-C)."""
        return patiently(call, API_PATIENCE, self.out, stop=self.abort.is_set)

    def _grant(self, vhost: str, label: str) -> None:
        """The device users' grants in a phase's vhost (their share of the set-up)."""
        logins = self.logins
        if logins is None:
            return
        raw = label == "raw"
        raw_queues = raw and self.baseline_delivery == "queue"
        # Raw devices publish nothing: a topic permission would only cost the teardown.
        seconds = self._patiently(
            lambda: logins.grant(vhost, label, raw_queues=raw_queues, topic=not raw)
        )
        self.out(f"  device users granted in {vhost} in {seconds:.1f} s")
        if raw_queues and self.run is not None:
            self.run.notes.append(
                "Logins: with --baseline-delivery queue, raw devices may also declare, bind and "
                "read server-named queues (amq.gen-*) in the baseline's vhost, which device "
                "users may not."
            )

    def _vhost(self, urls: list[str], name: str) -> list[str]:
        assert self.api is not None
        user = urlsplit(urls[0]).username or "guest"
        deadline = time.monotonic() + API_PATIENCE
        while True:
            try:
                self.api.create_vhost(name)
                self.api.set_permissions(name, user)
                break
            except BrokerUnreachable as exc:
                # A node that just closed tens of thousands of connections can
                # keep its management API busy for a minute: wait, then give up.
                if time.monotonic() > deadline or self.abort.is_set():
                    raise
                self.out(f"management API busy ({exc}); retrying")
                time.sleep(5)
        self.vhosts.append(name)
        with_vhost = [url_with_vhost(u, name) for u in urls]
        conn = connect_blocking(with_vhost, name="edgeward-simulate")
        try:
            topology.declare(conn.channel())
        finally:
            conn.close()
        return with_vhost

    def _start_actors(self) -> None:
        # The address the run's actors are reached at: loopback for a run on
        # this host; with worker hosts, this host's address on the way to them.
        address = "127.0.0.1"
        if self.worker_hosts:
            address = route_address(self.worker_hosts[0])
        os.environ.setdefault("THESPIAN_BASE_IPADDR", address)
        from thespian.actors import ActorSystem

        from edgeward.actors.runtime import free_port

        from .actors import WORKER_CAPABILITY, SimulationDirector

        port = free_port()
        log_dir = self.report_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        # Ctrl-C reaches every process of the terminal's group. Only this one
        # may act on it (it stops the run and writes the partial report): the
        # actor system's admin, forked now, would die of it and take the run
        # with it. It and the actors it forks inherit the ignore.
        main = threading.current_thread() is threading.main_thread()
        handler = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            self.asys = ActorSystem(
                "multiprocTCPBase",
                # Shards go where this capability is offered: here, unless
                # worker hosts were named.
                {"Admin Port": port, WORKER_CAPABILITY: not self.worker_hosts},
                logDefs={
                    "version": 1,
                    "handlers": {
                        "f": {
                            "class": "logging.FileHandler",
                            "filename": str(log_dir / "actors.log"),
                        }
                    },
                    "root": {"handlers": ["f"], "level": "WARNING"},
                },
            )
        finally:
            if main:
                signal.signal(signal.SIGINT, handler)
        self.director = self.asys.createActor(SimulationDirector)
        if self.worker_hosts:
            self._join_workers()

    def _join_workers(self) -> None:
        """Wait until every named worker host is in the run (it answers the
        run's invitation within a second or two when it is up)."""
        from .actors import JoinWorkers, WorkersJoined

        hosts = tuple(self.worker_hosts)
        self.out(f"inviting {len(hosts)} worker host(s): {', '.join(hosts)} ...")
        deadline = time.monotonic() + self.worker_wait
        message = JoinWorkers(hosts)
        said = None
        while True:
            joined = self.ask(message, 10, expect=lambda r: isinstance(r, WorkersJoined))
            names = joined.names
            if len(names) >= len(hosts):
                self.out(f"  worker hosts in the run: {', '.join(names)}")
                return
            if self.abort.is_set():
                raise Aborted()
            if time.monotonic() > deadline:
                raise WorkersMissing(
                    f"{len(hosts) - len(names)} of {len(hosts)} worker host(s) did not join "
                    f"within {self.worker_wait:g} s (joined: {', '.join(names) or 'none'}). "
                    "On each host named by --worker-host, is `edgeward simulate-worker "
                    "--port PORT` running, and can this host reach it (and it this one)?"
                )
            line = f"  {len(names)} of {len(hosts)} joined"
            if line != said:
                self.out(line)
                said = line
            message = JoinWorkers(())  # invited once; from now on, only ask who came
            self.abort.wait(0.5)

    def ask(
        self, msg: Any, timeout: float = 60.0, expect: Callable[[Any], bool] | None = None
    ) -> Any:
        """The director's answer to ``msg``. With ``expect``, answers it does
        not accept are skipped until one it does or the timeout: an answer to
        an earlier ask that timed out arrives late and would be taken for
        this one's."""
        from thespian.actors import PoisonMessage

        deadline = time.monotonic() + timeout
        reply = self.asys.ask(self.director, msg, timeout)
        while (
            expect is not None
            and reply is not None
            and not isinstance(reply, PoisonMessage)
            and not expect(reply)
        ):
            remaining = deadline - time.monotonic()
            reply = self.asys.listen(remaining) if remaining > 0 else None
        if reply is None:
            raise RuntimeError(f"the simulation director did not answer {type(msg).__name__}")
        if isinstance(reply, PoisonMessage):
            raise RuntimeError(
                f"the simulation director failed on {type(msg).__name__}; "
                f"see {self.report_dir / 'logs' / 'actors.log'}"
            )
        return reply

    # -- phases ------------------------------------------------------------------------

    def _configs(self, mode: str, urls: list[str], trusted: dict[str, str]):
        from .shard import ShardConfig

        s = self.scenario
        n = s.worker_count
        per = -(-s.devices // n)
        configs = []
        for w in range(n):
            first = w * per
            labels = self.labels[first : first + per]
            if not labels:
                break
            configs.append(
                ShardConfig(
                    first=first,
                    labels=labels,
                    urls=urls,
                    mode=mode,
                    trusted_keys=trusted,
                    delivery=self.baseline_delivery,
                    verify=self.verify,
                    share=max(1, self.share),
                    login_secret=self.secret,
                    heartbeat_interval=s.heartbeat_interval,
                    ramp_rate=s.ramp_rate / n,
                    reconnect_spread=s.reconnect_spread,
                    offline_fraction=s.offline_fraction,
                    mean_offline=s.mean_offline,
                    seed=w,
                    telemetry=s.telemetry,
                    alert_rate=s.alert_rate,
                    outbox_max_records=s.outbox_max_records,
                )
            )
        return tuple(configs)

    def _wait(self, seconds: float, what: str, until=None) -> dict:
        """Show progress for ``seconds`` (or until ``until(progress)``)."""
        from .actors import Progress

        deadline = time.monotonic() + seconds
        progress: dict = {}
        while True:
            if self.abort.is_set():
                raise Aborted()
            # A director busy for a while (scraping loaded nodes on shared
            # cores) is not a dead one: patience, and no stale answer taken.
            progress = self.ask(Progress(), PROGRESS_PATIENCE, expect=_is_progress)
            self._saw(progress)
            self._progress_line(what, progress)
            if until is not None and until(progress):
                return progress
            if time.monotonic() >= deadline:
                return progress
            self.abort.wait(min(1.0, max(0.0, deadline - time.monotonic())))

    def _saw(self, p: dict) -> None:
        from .actors import fleet_sample

        if not p.get("shards_reporting"):
            return
        self.seen.append(fleet_sample(time.time() - self.t0, p))
        self.slowest_turn = max(self.slowest_turn, p.get("slowest_turn_s", 0.0))
        self.seen_base_rss = p.get("base_rss", 0)

    def _progress_line(self, what: str, p: dict) -> None:
        errors = sum(p.get("errors", {}).values())
        line = (
            f"[{time.time() - self.t0:6.0f}s] {what:<22} connected {p.get('connected', 0):>6}"
            f"/{p.get('online', 0):<6} in sync {p.get('in_sync', 0):>6}  "
            f"errors {errors:<5} unexpected closes {p.get('unexpected_closes', 0)}"
        )
        behind = p.get("slowest_turn_s", 0.0)
        if behind >= model.SLOW_TURN_S:
            line += f"  workers overloaded: a loop turn took {behind:.0f} s"
        tel = p.get("telemetry", {})
        if tel.get("sent"):
            line += (
                f"  telemetry {tel.get('received', 0)}/{tel['sent']} read"
                f" ({tel.get('waiting', 0)} waiting, {tel.get('dropped', 0)} dropped)"
            )
        if sys.stdout.isatty():
            sys.stdout.write("\r" + line)
            sys.stdout.flush()
        else:
            now = time.monotonic()
            if now - getattr(self, "_last_line", 0.0) >= 5.0:
                self._last_line = now
                self.out(line)

    def _phase(self, mode: str, urls: list[str], metrics, signer: Signer | None):
        from .actors import EndPhase, StartPhase

        self.seen = []
        key = b""
        trusted: dict[str, str] = {}
        if signer is not None:
            from cryptography.hazmat.primitives import serialization

            key = signer.private_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            trusted = {signer.key_id: signer.public_b64}
        self.ask(
            StartPhase(
                mode=mode,
                urls=tuple(urls),
                publish_url=urls[0],
                configs=self._configs(mode, urls, trusted),
                metrics_urls=tuple(metrics),
                signing_key_pem=key,
                started_at=self.t0,
            ),
            120,
        )
        return EndPhase

    def _ramp(self, label: str) -> float | None:
        s = self.scenario
        started = time.monotonic()
        limit = s.devices / max(s.ramp_rate, 1.0) * 2 + 60
        p = self._wait(limit, label, until=lambda p: p.get("connected", 0) >= s.devices)
        if p.get("connected", 0) >= s.devices:
            return time.monotonic() - started
        self.out(
            f"\nramp: only {p.get('connected', 0)} of {s.devices} connected "
            f"after {limit:.0f}s; going on"
        )
        return None

    def _end_phase(self, end_cls):
        from .actors import PhaseResult

        self.out("")
        return self.ask(end_cls(), 120, expect=lambda r: isinstance(r, PhaseResult))

    def baseline(self, urls: list[str], metrics) -> model.Baseline:
        from .actors import Probe

        size = largest_bundle(self.scenario)
        end = self._phase("raw", urls, metrics, None)
        try:
            self._ramp("baseline: connecting")
            self._wait(3, "baseline: settling")
            for n in range(1, PROBES + 1):
                self.ask(Probe(n, size))
                self._wait(
                    10,
                    f"baseline: probe {n}",
                    until=lambda p, n=n: p.get("probes", {}).get(n, 0) >= p.get("connected", 0),
                )
        finally:
            result = self._end_phase(end)
            # Baseline only, or stopped during the baseline: its figures are the run's.
            if (self.baseline_only or self.abort.is_set()) and self.run is not None:
                self.run.samples = result.samples
                self.run.broker = result.broker
                self.run.errors = result.errors
                self.run.unexpected_closes = result.unexpected_closes
                self.run.client_base_rss_bytes = result.base_rss
                self.run.worker_hosts = dict(result.hosts)
        # The broker before and during the baseline: its first samples are the
        # truly idle node that per-device costs are measured from (the node's
        # memory and fd gauges lag, so the edgeward phase's start is not idle).
        self.baseline_broker = list(result.broker)
        return model.Baseline(
            devices=self.scenario.devices,
            connected=max((x.connected for x in result.samples), default=0),
            fanouts=result.fanouts,
            probe_bytes=size,
        )

    def edgeward(self, urls: list[str], metrics, run: model.RunData) -> None:
        from .actors import Command, PublishRevision

        signer = Signer.generate()
        end = self._phase("edgeward", urls, metrics, signer)
        policies = Policies()
        result = None
        try:
            run.ramp_seconds = self._ramp("connecting")
            ramp_done = time.monotonic()
            if self.scenario.offline_fraction > 0:
                self.ask(Command("churn"))
                run.actions.append(
                    model.Action(
                        time.time() - self.t0,
                        "churn",
                        {"offline_fraction": self.scenario.offline_fraction},
                    )
                )
            cut_at: float | None = None
            for step in self.scenario.timeline:
                wait = ramp_done + step.at - time.monotonic()
                if wait > 0:
                    self._wait(wait, f"waiting for t={step.at:g}")
                t = time.time() - self.t0
                if step.action == "apply":
                    revision, changed, selector = policies.step(step)
                    targeted = sum(
                        1
                        for i, labels in enumerate(self.labels)
                        if selector is None or selects(selector, device_name(i), labels)
                    )
                    reply = self.ask(
                        PublishRevision(
                            revision,
                            tuple(policies.state.values()),
                            tuple(changed),
                            targeted=targeted,
                            selector=selector,
                        )
                    )
                    run.actions.append(
                        model.Action(
                            t,
                            "apply",
                            {
                                "revision": revision,
                                "changed": len(changed),
                                "policies": len(policies.state),
                                "targeted": targeted,
                                "bundle_bytes": reply["bytes"],
                            },
                        )
                    )
                elif step.action == "cut":
                    self.ask(Command("cut"))
                    cut_at = time.monotonic()
                    run.actions.append(model.Action(t, "cut"))
                elif step.action == "restore":
                    self.ask(Command("restore"))
                    run.actions.append(model.Action(t, "restore"))
                    restored = time.monotonic()

                    # Shards report once a second: until they have seen the
                    # restore they still say 0 of 0 online, which is no storm.
                    def back(p: dict) -> bool:
                        return p.get("online", 0) > 0 and p.get("connected", 0) >= p["online"]

                    def synced(p: dict) -> bool:
                        return p.get("online", 0) > 0 and p.get("in_sync", 0) >= p["online"]

                    p = self._wait(STORM_LIMIT, "reconnect storm", until=back)
                    all_connected = time.monotonic() - restored if back(p) else None
                    p = self._wait(STORM_LIMIT, "storm: syncing", until=synced)
                    all_in_sync = time.monotonic() - restored if synced(p) else None
                    run.reconnect = {
                        "all_connected_s": _r2(all_connected),
                        "all_in_sync_s": _r2(all_in_sync),
                        "offline_s": round(restored - cut_at, 2) if cut_at else None,
                        "limit_s": STORM_LIMIT,
                    }
                    if all_connected is None or all_in_sync is None:
                        run.notes.append(
                            f"Reconnect storm: not all online devices were back "
                            f"{'connected' if all_connected is None else 'in sync'} within "
                            f"{STORM_LIMIT:g} s of the restore."
                        )
                elif step.action == "restart-node":
                    self._restart_node(step.node, run)
            remaining = ramp_done + self.scenario.duration - time.monotonic()
            if remaining > 0:
                self._wait(remaining, "running")
            if policies.revision:
                self._wait(
                    SETTLE + 30,
                    "settling",
                    until=lambda p: p.get("in_sync", 0) >= p.get("online", 1),
                )
            self._drain_telemetry(run)
            run.completed = True
        finally:
            try:
                result = self._end_phase(end)
            except RuntimeError:
                # The director's record of the phase is lost: keep what the
                # progress polls saw of it.
                run.samples, run.broker = list(self.seen), list(self.baseline_broker)
                run.client_base_rss_bytes = self.seen_base_rss
                run.notes.append(
                    "The fleet figures over time are this process's progress polls "
                    "(every ~1-5 s): the director's own record of the phase was lost."
                )
                raise
            self._fold(run, result, policies.revision)

    def _drain_telemetry(self, run: model.RunData) -> None:
        """Devices stop raising alerts; wait until every online device's
        outbox is empty and the stream holds all that was not dropped."""
        from .actors import Command

        if not self.scenario.telemetry:
            return
        self.ask(Command("quiet"))

        def drained(p: dict) -> bool:
            t = p.get("telemetry", {})
            online_waiting = t.get("waiting", 0) - t.get("waiting_offline", 0)
            read = t.get("received", 0) + t.get("dropped", 0) + t.get("waiting", 0)
            return online_waiting == 0 and read >= t.get("sent", 0)

        # Shards and the counter report once a second: let both see the quiet.
        self._wait(1.5, "telemetry: quiet")
        p = self._wait(DRAIN_LIMIT, "telemetry: draining", until=drained)
        t = p.get("telemetry", {})
        if not t.get("sent"):
            return  # nothing to drain: not exercised
        run.telemetry_drained = drained(p)
        if not run.telemetry_drained:
            run.notes.append(
                f"Telemetry: the outboxes did not drain within {DRAIN_LIMIT:g} s of the end "
                f"({t.get('waiting', 0) - t.get('waiting_offline', 0)} records still waiting "
                f"on online devices; {t.get('received', 0)} of {t['sent']} read from the "
                "stream then)."
            )

    def _restart_node(self, node: int, run: model.RunData) -> None:
        from .actors import Command

        if self.cluster is None:
            run.notes.append("restart-node needs --local-cluster; step skipped")
            return
        url = redact(self.cluster.amqp_urls[node - 1])
        # Every shard must know before the node stops (else its devices' closes
        # count as unexpected): the director answers once all have taken it.
        self.out(f"\ntelling the workers node {node} goes down ...")
        try:
            self.ask(
                Command("node-down", url),
                NODE_DOWN_PATIENCE,
                expect=lambda r: isinstance(r, dict) and r.get("acked") == "node-down",
            )
        except RuntimeError:
            run.notes.append(
                f"Node {node} restart: not every worker took the node-down notice within "
                f"{NODE_DOWN_PATIENCE:g} s; closes its devices saw first count as unexpected."
            )
        t = time.time() - self.t0
        self.out(f"restarting node {node} ...")
        started = time.monotonic()
        self.cluster.restart_node(node)
        detail: dict[str, Any] = {"node": node, "restart_s": round(time.monotonic() - started, 2)}
        run.actions.append(model.Action(t, "restart-node", detail))

        def back(p: dict) -> bool:
            return p.get("connected", 0) >= p.get("online", 1)

        p = self._wait(RESTART_LIMIT, "after node restart", until=back)
        # From the node's stop: how long its devices were away, at most.
        detail["all_connected_s"] = _r2(time.monotonic() - started) if back(p) else None
        if not back(p):
            run.notes.append(
                f"Node {node} restart: {p.get('connected', 0):,} of {p.get('online', 0):,} "
                f"online devices connected {RESTART_LIMIT:g} s after the node was back."
            )
        self.ask(Command("node-up", url))

    def _fold(self, run: model.RunData, result: Any, latest: int) -> None:
        run.samples = result.samples
        run.broker = self.baseline_broker + result.broker
        run.rollouts = result.rollouts
        run.errors = result.errors
        run.unexpected_closes = result.unexpected_closes
        run.heartbeats_sent = result.heartbeats
        run.client_base_rss_bytes = result.base_rss
        run.worker_hosts = dict(result.hosts)
        online = [rev for rev, on in zip(result.revisions, result.online, strict=False) if on]
        run.messages_expected = len(online) * latest
        run.messages_received = sum(min(rev, latest) for rev in online)
        run.notes.extend(result.notes)
        tel = result.telemetry
        run.telemetry_sent = tel.get("sent", 0)
        run.telemetry_alerts = tel.get("alerts", 0)
        run.telemetry_dropped_reported = tel.get("dropped", 0)
        run.telemetry_waiting = tel.get("waiting", 0)
        run.telemetry_waiting_offline = tel.get("waiting_offline", 0)
        counted = result.telemetry_stream
        if counted is not None:
            run.telemetry_received = counted.counts.get("received", 0)
            run.telemetry_duplicates = counted.counts.get("duplicates", 0)
            run.telemetry_stamped = counted.counts.get("stamped")
            run.telemetry_latency_ms = dict(counted.latency_ms or {})
            if counted.counts.get("malformed"):
                run.notes.append(
                    f"Telemetry: {counted.counts['malformed']} messages on the stream "
                    "were not records."
                )
            if counted.errors:
                failures = ", ".join(f"{k} {n}" for k, n in sorted(counted.errors.items()))
                run.notes.append(f"Telemetry counter: connection failures ({failures}).")

    # -- the whole run --------------------------------------------------------------------

    def execute(self) -> dict:
        self.report_dir.mkdir(parents=True, exist_ok=True)
        failure: Exception | None = None
        s = self.scenario
        run_id = uuid.uuid4().hex[:8]
        urls, metrics, config_label = self._broker()
        self.run = run = model.RunData(
            scenario=s.to_dict(),
            devices=s.devices,
            workers=s.worker_count,
            verify=self.verify,
            share_connections=self.share,
            brokers=[redact(u) for u in urls],
            nodes=[n for n, _ in metrics],
            broker_config=config_label,
            started_at=self.t0,
            machine=_machine(),
            versions=_versions(),
        )
        try:
            # The actors first: a worker host that does not join fails the run
            # before any user is made.
            self._start_actors()
            self._make_logins(run)
            if s.baseline:
                raw_urls = self._vhost(urls, f"edgeward-sim-{run_id}-raw")
                self._grant(f"edgeward-sim-{run_id}-raw", "raw")
                self.out(f"baseline: {s.devices} raw devices over {len(urls)} node(s)")
                run.baseline = self.baseline(raw_urls, metrics)
                self._drop_vhost(f"edgeward-sim-{run_id}-raw")
            if self.baseline_only:
                run.completed = True
                run.notes.append(
                    f"baseline only ({self.baseline_delivery} delivery): no edgeward phase; "
                    "the broker figures and sizing are the raw devices'"
                )
                raise _BaselineOnly()
            sim_urls = self._vhost(urls, f"edgeward-sim-{run_id}")
            self._grant(f"edgeward-sim-{run_id}", "edgeward")
            self.out(
                f"edgeward: {s.devices} devices, {s.worker_count} worker(s), "
                f"verify={self.verify}, "
                + (
                    f"{self.share} devices per connection"
                    if self.share > 1
                    else "one connection per device"
                )
                + (", a broker user each" if self.logins else ", the shared login"),
            )
            self.edgeward(sim_urls, metrics, run)
        except _BaselineOnly:
            pass
        except (Aborted, Stopped):
            self.out("\ninterrupted: writing a partial report")
            run.completed = False
        except Exception as exc:
            # Whatever broke, what was measured until then is still written.
            self.out(f"\nthe run failed ({exc}): writing a partial report")
            run.completed = False
            run.notes.append(f"The run failed: {exc}")
            failure = exc
        finally:
            run.duration = time.time() - self.t0
            run.slowest_turn_s = round(self.slowest_turn, 3)
            if self.slowest_turn >= model.SLOW_TURN_S:
                run.notes.append(
                    f"The load generator was overloaded: a worker's loop turn took up to "
                    f"{self.slowest_turn:.1f} s, and its devices' figures (connects, "
                    "propagation, acks) are late by as much. Run the workers on cores the "
                    "broker does not use (docs/simulator.md)."
                )
            self.cleanup()
        from . import report

        figures = report.write(run, self.report_dir, **self.sizing)
        if failure is not None:
            raise failure
        return figures

    def _drop_vhost(self, name: str) -> None:
        if self.api is not None and name in self.vhosts:
            logins = self.logins
            if logins is not None and name in logins.granted:
                # Deleting a vhost clears its grants in one transaction that
                # grows with the square of the users: revoke them first.
                self.out(f"revoking the device users' grants in {name} ...")
                try:
                    seconds = self._patiently(lambda: logins.revoke(name))
                    self.out(f"  revoked in {seconds:.1f} s")
                except Exception as exc:
                    logins.figures["problem"] = f"grants in {name} were not revoked: {exc}"
                    self.out(f"  {logins.figures['problem']}")
            try:
                self.api.delete_vhost(name)
            except Exception:
                pass
            self.vhosts.remove(name)

    def cleanup(self) -> None:
        if self.asys is not None:
            try:
                self.asys.shutdown()
            except Exception:
                pass
            self.asys = None
            # An actor system that did not answer its shutdown leaves its
            # processes (admin, director, shards) running on, reconnecting to
            # a cluster about to be stopped: end them.
            killed = kill_forks()
            if killed:
                self.out(f"  ended {killed} simulator process(es) that outlived the run")
        if self.cluster is not None:
            # A throwaway cluster goes with its vhosts and users: tearing down
            # 35,000 users' grants one by one would take minutes for nothing.
            self.vhosts.clear()
            if self.logins is not None:
                self.logins.figures["removed_with_cluster"] = True
                self.logins = None
        for name in list(self.vhosts):
            self._drop_vhost(name)
        # After the vhosts, their grants revoked: each user's deletion scans
        # every grant left on the broker.
        if self.logins is not None:
            self.out("removing the device users ...")
            problem = remove_quietly(self.logins, API_PATIENCE, self.out)
            if problem:
                self.logins.figures["problem"] = problem
                self.out(f"  {problem}")
            else:
                f = self.logins.figures
                self.out(f"  {f['removed']:,} device users removed in {f['remove_s'] or 0:.1f} s")
            self.logins = None
        if self.cluster is not None:
            self.out("stopping the local cluster ...")
            self.cluster.stop()
            self.cluster = None


class WorkersMissing(RuntimeError):
    """A worker host named with --worker-host did not join the run."""


def route_address(host_port: str) -> str:
    """This host's address on the route to ``host:port`` (no packet is sent)."""
    host = host_port.rpartition(":")[0] or host_port
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((host, 9))
            return probe.getsockname()[0]
        except OSError as exc:
            raise WorkersMissing(f"worker host {host_port}: no route to it ({exc})") from None


def _is_progress(reply: Any) -> bool:
    return isinstance(reply, dict) and "connected" in reply


def kill_forks() -> int:
    """SIGKILL this process's descendants that are forks of it (the same
    command line: the actor system's processes), not the broker nodes it
    started; how many there were.

    Thespian's admin daemonizes: it forks twice and starts a session of its
    own, so it and the actors it forks are no descendants of ours but
    orphans in a session whose id is the pid of our (exited) child. Both
    kinds are found."""
    me = os.getpid()
    try:
        with open(f"/proc/{me}/cmdline", "rb") as fh:
            mine = fh.read()
    except OSError:
        return 0
    parents: dict[int, int] = {}
    sessions: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rpartition(")")[2].split()
                parents[int(entry)] = int(fields[1])
                sessions[int(entry)] = int(fields[3])
            except (OSError, ValueError, IndexError):
                continue
    descendants, frontier = set(), {me}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - descendants
        descendants |= frontier
    children = {pid for pid, ppid in parents.items() if ppid == me}
    descendants |= {pid for pid, sid in sessions.items() if sid in children and pid != me}
    killed = 0
    for pid in descendants:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if fh.read() != mine:
                    continue
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except OSError:
            continue
    return killed


def _sizing_limits(args: Any) -> dict[str, Any]:
    return {
        "node_memory_bytes": int(args.node_memory * 1024**3),
        "node_fds": args.node_fds,
        "node_cores": args.node_cores,
        "headroom": args.headroom,
        "reconnect_target": args.reconnect_target,
        "rollout_target": args.rollout_target,
    }


def recompute(args: Any) -> int:
    """``--recompute``: the report again from a run's saved data, nothing run."""
    from . import report

    if args.scenario:
        raise ValueError("--recompute reads --report DIR; it takes no scenario")
    directory = Path(args.report)
    data = directory / report.RUN_DATA
    if not data.is_file():
        raise ValueError(f"{data} does not exist: --report must name a run's report directory")
    figures = report.write(model.RunData.load(data), directory, **_sizing_limits(args))
    print(f"report: {directory / 'report.md'} (recomputed from {data.name})")
    print(report.headline(figures))
    return 0


def simulate(args: Any) -> int:
    """The CLI verb."""
    from .scenario import load

    if args.recompute:
        return recompute(args)
    if not args.scenario:
        raise ValueError("give a scenario file (or --recompute with --report DIR)")
    scenario = load(args.scenario)
    if args.devices:
        scenario = replace(scenario, devices=args.devices)
    if args.workers:
        scenario = replace(scenario, workers=args.workers)
    if args.ramp_rate:
        scenario = replace(scenario, ramp_rate=args.ramp_rate)
    if args.no_baseline:
        scenario = replace(scenario, baseline=False)
    if getattr(args, "shared_login", False):
        scenario = replace(scenario, shared_login=True)
    if args.baseline_only and args.no_baseline:
        raise ValueError("--baseline-only and --no-baseline contradict each other")
    if args.local_cluster and args.broker:
        raise ValueError("give --broker or --local-cluster, not both")
    brokers = [u for b in (args.broker or []) for u in split_urls(b)]
    if not args.local_cluster and not brokers:
        brokers = split_urls(args.broker_url)
    report_dir = Path(args.report)
    if args.local_cluster and not shutil.which("rabbitmq-server"):
        raise ValueError("--local-cluster needs Debian's rabbitmq-server (run `make broker`)")
    worker_hosts = list(getattr(args, "worker_host", None) or [])
    for host in worker_hosts:
        name, _, port = host.rpartition(":")
        if not name or not port.isdigit():
            raise ValueError(f"--worker-host {host}: give HOST:PORT (simulate-worker's --port)")
    runner = Runner(
        scenario,
        report_dir,
        brokers=brokers,
        local_cluster=args.local_cluster,
        broker_config=Path(args.broker_config) if args.broker_config else None,
        metrics_urls=args.metrics_url,
        verify=args.verify,
        share_connections=args.share_connections,
        baseline_delivery=args.baseline_delivery,
        baseline_only=args.baseline_only,
        sizing=_sizing_limits(args),
        worker_hosts=worker_hosts,
        worker_wait=getattr(args, "worker_wait", None) or WORKER_PATIENCE,
        out=lambda line: print(line, flush=True),
    )

    def interrupt(*_: Any) -> None:
        runner.abort.set()

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    figures = runner.execute()
    print(f"\nreport: {report_dir / 'report.md'}")
    from .report import headline

    print(headline(figures))
    return 0 if figures.get("completed", True) else 130
