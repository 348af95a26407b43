"""The ``kubearmor`` backend: the local KubeArmor daemon enforces, over gRPC.

What goes over the wire is KubeArmor's own (``protos/*.proto``, see
``/work/shared/kubearmor-interface.md``): one ``policy.PolicyService/hostPolicy``
call per host policy (``containerPolicy`` for a ``KubeArmorPolicy``),
carrying the JSON event
``{"type": "ADDED" | "DELETED", "object": {"metadata": ..., "spec": ...}}``.

Applying a set
    Only the difference to the set in force goes out: every policy that is
    new or whose content changed is sent ``ADDED`` (an upsert by name; the
    daemon's ``MODIFIED`` does not enforce a name it does not hold), with
    ``edgeward-rev:<revision>`` added to its ``spec.tags`` so that its alerts
    name the fleet revision that pushed this content; then every policy that
    left the set is sent ``DELETED``.  Adds go first: while a set is being
    replaced the device enforces more, never less.

Daemon answers
    ``Applied``/``Modified`` to an add and ``Deleted``/``NotExist`` to a delete
    are success.  Anything else (``Invalid``, ``Failure``, ``NotEnabled``, an
    unknown value) or a failed call fails the apply: what was already sent is
    undone (the previous versions re-sent, new names deleted), the previous set
    stays in force, and :class:`KubeArmorRefused` says which policy and what
    the daemon answered.  If even the undo fails the backend forgets what the
    daemon holds and re-learns it (``getProbeData``) before its next step.

Reconcile
    :meth:`KubeArmorBackend.reconcile` makes the daemon hold exactly the set in
    force: the daemon replays its own disk copies at start-up, so after a
    restart it may hold policies deleted meanwhile, or older versions.  It
    deletes what is not ours and re-sends what is missing or does not carry
    our tag for it.  The agent calls it whenever the daemon (re)appears.

Watching
    :class:`Watch` keeps ``WatchAlerts("policy")`` and ``WatchLogs("system")``
    subscribed, on an asyncio loop in a thread of its own (grpc's asyncio
    API), and reconnects with jittered backoff.  Everything it sees is handed
    to one callback as a small frozen event; the agent passes them to its
    ioloop.  Applies and reconciles use the synchronous API, on the caller's
    thread.

Regenerate the stubs with ``make protos`` (grpcio-tools; see the Makefile).
Configuration, failure handling and footprint: ``docs/kubearmor-backend.md``.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from google.protobuf import empty_pb2
from google.protobuf.message import Message

from edgeward.enforcement.backend import BackendError
from edgeward.enforcement.digest import EMPTY_DIGEST, doc_digest, name_of, state_digest

from . import kubearmor_pb2, kubearmor_pb2_grpc, policy_pb2, policy_pb2_grpc
from .settings import KubeArmorSettings

TAG_PREFIX = "edgeward-rev:"
CONTAINER_KIND = "KubeArmorPolicy"  # everything else is sent as a host policy
STATUS = policy_pb2.PolicyStatus
ADD_OK = frozenset({STATUS.Applied, STATUS.Modified})
DELETE_OK = frozenset({STATUS.Deleted, STATUS.NotExist})


def status_name(status: int) -> str:
    try:
        return STATUS.Name(status)
    except ValueError:
        return f"status {status}"


class KubeArmorRefused(BackendError):
    """The daemon answered a policy with something other than success.

    ``status`` is the daemon's answer (e.g. ``"Invalid"``) or, when the call
    itself failed, the gRPC status code (e.g. ``"UNAVAILABLE"``)."""

    def __init__(self, text: str, status: str, policy: str = "") -> None:
        super().__init__(text)
        self.status = status
        self.policy = policy


def open_channel(settings: KubeArmorSettings, *, aio: bool = False) -> Any:
    """A channel to the daemon as configured: plaintext, TLS or mTLS; the
    client's keepalive never below the daemon's 5-minute minimum.  ``aio``:
    a ``grpc.aio`` channel (for use on the asyncio loop that made it)."""
    options = [
        ("grpc.keepalive_time_ms", settings.keepalive_s * 1000),
        ("grpc.keepalive_timeout_ms", 20_000),
        # Streams sit idle for hours: keep pinging without data in between.
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 0),
        # A restarted daemon should be found again within seconds.
        ("grpc.initial_reconnect_backoff_ms", 500),
        ("grpc.max_reconnect_backoff_ms", 5_000),
    ]
    kind: Any = grpc.aio if aio else grpc
    if not settings.tls:
        return kind.insecure_channel(settings.address, options=options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(settings.ca).read_bytes(),
        private_key=Path(settings.key).read_bytes() if settings.key else None,
        certificate_chain=Path(settings.cert).read_bytes() if settings.cert else None,
    )
    return kind.secure_channel(settings.address, credentials, options=options)


def tagged(doc: Mapping[str, Any], revision: int | None) -> dict[str, Any]:
    """The object sent to the daemon: metadata and spec, our revision tag in
    ``spec.tags`` (replacing any earlier one)."""
    spec = dict(doc.get("spec") or {})
    tags = [t for t in spec.get("tags") or [] if not str(t).startswith(TAG_PREFIX)]
    if revision is not None:
        tags.append(f"{TAG_PREFIX}{revision}")
    if tags:
        spec["tags"] = tags
    return {"metadata": dict(doc.get("metadata") or {}), "spec": spec}


def event_bytes(kind: str, obj: Mapping[str, Any]) -> bytes:
    return json.dumps({"type": kind, "object": obj}, separators=(",", ":")).encode()


def message_dict(msg: Message) -> dict[str, Any]:
    """A protobuf message as a plain dict of the fields that are set (CBOR-
    and JSON-friendly; int64 stays an int)."""
    out: dict[str, Any] = {}
    for field, value in msg.ListFields():
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            out[field.name] = dict(value)
        elif field.message_type is not None:
            if field.is_repeated:
                out[field.name] = [message_dict(v) for v in value]
            else:
                out[field.name] = message_dict(value)
        elif field.is_repeated:
            out[field.name] = list(value)
        else:
            out[field.name] = value
    return out


@dataclass(frozen=True)
class _Pushed:
    digest: str  # of the document as the bundle carried it (without our tag); "" if unknown
    obj: dict[str, Any]  # what the daemon was sent
    tag: str  # our tag in it ("" when no revision was given)
    container: bool = False  # a KubeArmorPolicy: containerPolicy, not hostPolicy


@dataclass(frozen=True)
class HeldPolicy:
    """One policy the daemon lists in ``getProbeData``, as its own JSON."""

    data: dict[str, Any]
    container: bool = False


class KubeArmorBackend:
    """Puts a set of policies in force through the local KubeArmor daemon.

    Host policies (``KubeArmorHostPolicy``) go to ``hostPolicy``; container
    policies (``KubeArmorPolicy``) to ``containerPolicy``."""

    name = "kubearmor"

    def __init__(
        self, settings: KubeArmorSettings | None = None, *, channel: grpc.Channel | None = None
    ) -> None:
        self.settings = settings or KubeArmorSettings()
        self.channel = channel if channel is not None else open_channel(self.settings)
        self._policies = policy_pb2_grpc.PolicyServiceStub(self.channel)
        self._probe = policy_pb2_grpc.ProbeServiceStub(self.channel)
        self._in_force: dict[str, _Pushed] = {}
        self._digest = EMPTY_DIGEST
        # Do we know what the daemon holds?  Not until we asked (it replays
        # its own copies at start), nor after an undo that failed.
        self._known = False
        # Has a set been put in force by this process?  Until then the set in
        # force is not known to be empty, only unknown: reconcile leaves the
        # daemon alone and the first apply sorts it out.
        self._settled = False
        #: The daemon's answers, by status name (and gRPC code for failed calls).
        self.answers: Counter[str] = Counter()

    # -- the Backend protocol ----------------------------------------------------

    @property
    def digest(self) -> str:
        return self._digest

    @property
    def names(self) -> list[str]:
        """Names of the policies in force."""
        return sorted(self._in_force)

    def apply(
        self,
        policies: Sequence[Mapping[str, Any]],
        digest: str = "",
        *,
        revision: int | None = None,
    ) -> str:
        """Put exactly ``policies`` in force; on any refusal the previous set
        stays (:class:`KubeArmorRefused`)."""
        target = {name_of(doc): doc for doc in policies}
        before = self._held()
        wanted: dict[str, _Pushed] = {}
        for name, doc in target.items():
            d = doc_digest(doc)
            old = before.get(name)
            if old is not None and old.digest == d:
                wanted[name] = old
            else:
                wanted[name] = _Pushed(
                    d,
                    tagged(doc, revision),
                    "" if revision is None else f"{TAG_PREFIX}{revision}",
                    doc.get("kind") == CONTAINER_KIND,
                )
        adds = [n for n in sorted(wanted) if before.get(n) is not wanted[n]]
        deletes = [n for n in sorted(before) if n not in wanted]
        done: list[str] = []
        try:
            for name in adds:
                self._add(name, wanted[name])
                done.append(name)
            for name in deletes:
                self._delete(name, before[name].container)
                done.append(name)
        except KubeArmorRefused:
            self._undo(done, before, wanted)
            raise
        self._in_force = wanted
        self._known = True
        self._settled = True
        self._digest = digest or state_digest(policies)
        return self._digest

    # -- reconcile ---------------------------------------------------------------

    def reconcile(self) -> tuple[list[str], list[str]]:
        """Make the daemon hold exactly the set in force; return the names
        removed and the names (re-)sent.  Before the first good apply there
        is no set in force to hold it to: nothing is done."""
        self._known = False
        if not self._settled:
            return [], []
        before = self._held()
        added = [n for n in sorted(self._in_force) if before.get(n) is not self._in_force[n]]
        removed = [n for n in sorted(before) if n not in self._in_force]
        for name in added:
            self._add(name, self._in_force[name])
        for name in removed:
            self._delete(name, before[name].container)
        self._known = True
        return removed, added

    def held(self) -> dict[str, HeldPolicy]:
        """What the daemon holds (``getProbeData``), by policy name: every host
        policy (``hostMap``, any node key), and the container policies that
        apply to a container it knows (``containerMap``; one that applies to
        none is not listed, so it cannot be seen here)."""
        try:
            probe = self._probe.getProbeData(empty_pb2.Empty(), timeout=self.settings.timeout_s)
        except grpc.RpcError as exc:
            raise self._call_failed("getProbeData", "", exc) from None
        out: dict[str, HeldPolicy] = {}
        for container, entries in [
            *((True, c) for c in probe.containerMap.values()),
            *((False, h) for h in probe.hostMap.values()),
        ]:
            datas = list(entries.policyDataList)
            for i, name in enumerate(entries.policyList):
                try:
                    data = json.loads(datas[i].policy) if i < len(datas) else {}
                except ValueError:
                    data = {}
                out[name] = HeldPolicy(data if isinstance(data, dict) else {}, container)
        return out

    def _held(self) -> dict[str, _Pushed]:
        """What the daemon holds now: our record of each policy when we know
        it is there as we sent it; otherwise a record with an unknown digest."""
        if self._known:
            return dict(self._in_force)
        out: dict[str, _Pushed] = {}
        for name, held in self.held().items():
            ours = self._in_force.get(name)
            if ours is not None and ours.tag and ours.tag in _tags(held.data):
                out[name] = ours
            else:
                out[name] = _Pushed("", {}, "", held.container)
        return out

    # -- one call each -------------------------------------------------------------

    def _add(self, name: str, pushed: _Pushed) -> None:
        self._send(name, "ADDED", pushed.obj, ADD_OK, pushed.container)

    def _delete(self, name: str, container: bool) -> None:
        self._send(name, "DELETED", {"metadata": {"name": name}}, DELETE_OK, container)

    def _send(
        self, name: str, kind: str, obj: Mapping[str, Any], ok: frozenset[int], container: bool
    ) -> None:
        request = policy_pb2.policy(policy=event_bytes(kind, obj))
        method = "containerPolicy" if container else "hostPolicy"
        try:
            answer = getattr(self._policies, method)(request, timeout=self.settings.timeout_s)
        except grpc.RpcError as exc:
            raise self._call_failed(f"{method} {kind}", name, exc) from None
        status = status_name(answer.status)
        self.answers[status] += 1
        if answer.status not in ok:
            raise KubeArmorRefused(
                f"kubearmor answered {status} to {kind} of policy {name!r}", status, name
            )

    def _call_failed(self, what: str, name: str, exc: grpc.RpcError) -> KubeArmorRefused:
        code = exc.code().name if isinstance(exc, grpc.Call) else "UNKNOWN"
        detail = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        self.answers[code] += 1
        about = f" of policy {name!r}" if name else ""
        return KubeArmorRefused(
            f"kubearmor at {self.settings.address}: {what}{about} failed: {code} {detail}".rstrip(),
            code,
            name,
        )

    def _undo(
        self, done: Iterable[str], before: Mapping[str, _Pushed], wanted: Mapping[str, _Pushed]
    ) -> None:
        """Put back what ``done`` changed; if that fails, forget what the daemon holds."""
        try:
            for name in reversed(list(done)):
                old = before.get(name)
                if old is None:
                    self._delete(name, wanted[name].container)
                elif not old.digest:
                    self._known = False  # its content was not ours to put back
                else:
                    self._add(name, old)
        except KubeArmorRefused:
            self._known = False

    def close(self) -> None:
        self.channel.close()


def _tags(data: Mapping[str, Any]) -> list[str]:
    spec = data.get("spec")
    tags = spec.get("tags") if isinstance(spec, Mapping) else None
    return [str(t) for t in tags] if isinstance(tags, list) else []


# -- watching alerts and logs ----------------------------------------------------


@dataclass(frozen=True)
class DaemonUp:
    """The daemon answers (at start, or again after it was lost)."""

    address: str


@dataclass(frozen=True)
class DaemonDown:
    reason: str


@dataclass(frozen=True)
class AlertSeen:
    alert: dict[str, Any]


@dataclass(frozen=True)
class LogSeen:
    log: dict[str, Any]


WatchEvent = DaemonUp | DaemonDown | AlertSeen | LogSeen


class _Backoff:
    """Jittered exponential delays ("full jitter" between half and all)."""

    def __init__(self, base: float, cap: float) -> None:
        self.base, self.cap, self.attempt = base, cap, 0

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * (2**self.attempt))
        self.attempt += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0


class Watch:
    """Keeps the daemon's alert and log streams subscribed.

    One thread (``kubearmor-watch``) runs an asyncio loop with grpc's asyncio
    API on a channel of its own, reading both streams.  grpc's sync streams
    would need a thread each, and each of those wakes every 100 ms while it
    waits (about 25 wake-ups a second for two streams and the channel's
    poller); an idle asyncio stream wakes for nothing.

    The alerts stream also tells the daemon's comings and goings: before it
    subscribes it asks ``getProbeData`` until the daemon answers, then says
    :class:`DaemonUp`; when its stream breaks it says :class:`DaemonDown`.
    ``on_event`` is called on the watch's thread: a host with a loop of its
    own hands the event over (e.g. pika's ``add_callback_threadsafe``).
    """

    def __init__(
        self,
        backend: KubeArmorBackend,
        on_event: Callable[[WatchEvent], None],
        *,
        backoff_base: float = 0.5,
        # The daemon is on this host: asking it every few seconds while it is
        # down costs nothing, and until the agent sees it back a restarted
        # daemon enforces only what it replayed from its disk.
        backoff_cap: float = 5.0,
        alert_filter: str = "policy",
        log_filter: str = "system",
    ) -> None:
        self.backend = backend
        self.settings = backend.settings
        self.on_event = on_event
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.alert_filter = alert_filter
        self.log_filter = log_filter
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._thread = threading.Thread(target=self._run, name="kubearmor-watch", daemon=True)
        #: Streams opened so far, per kind.
        self.subscriptions: Counter[str] = Counter()
        #: Events the host's callback refused (raised on).
        self.lost_events = 0

    def start(self) -> Watch:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel both streams and wait for the thread to end."""
        with self._lock:
            self._stopping.set()
            loop, task = self._loop, self._task
        if loop is not None and task is not None:
            try:
                loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:
                pass  # the loop has already ended
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the thread ------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        with self._lock:
            if self._stopping.is_set():
                return
            self._loop = asyncio.get_running_loop()
            self._task = asyncio.current_task()  # type: ignore[assignment]
        channel = open_channel(self.settings, aio=True)
        try:
            logs = kubearmor_pb2_grpc.LogServiceStub(channel)
            probe = policy_pb2_grpc.ProbeServiceStub(channel)
            await asyncio.gather(self._alerts(logs, probe), self._logs(logs))
        except asyncio.CancelledError:
            pass
        finally:
            await channel.close()

    def _tell(self, event: WatchEvent) -> None:
        # A host that cannot take an event (its loop is closing) must not end
        # the watch: the event is lost, and counted.
        try:
            self.on_event(event)
        except Exception:
            self.lost_events += 1

    async def _alerts(self, logs: Any, probe: Any) -> None:
        backoff = _Backoff(self.backoff_base, self.backoff_cap)
        down_said = False
        while True:
            try:
                await probe.getProbeData(empty_pb2.Empty(), timeout=self.settings.timeout_s)
            except grpc.RpcError as exc:
                if not down_said:
                    self._tell(DaemonDown(f"getProbeData: {_describe(exc)}"))
                    down_said = True
                await asyncio.sleep(backoff.next_delay())
                continue
            self._tell(DaemonUp(self.settings.address))
            request = kubearmor_pb2.RequestMessage(Filter=self.alert_filter)
            reason = await self._follow("alerts", logs.WatchAlerts(request), AlertSeen, backoff)
            self._tell(DaemonDown(reason))
            down_said = True
            await asyncio.sleep(backoff.next_delay())

    async def _logs(self, logs: Any) -> None:
        backoff = _Backoff(self.backoff_base, self.backoff_cap)
        while True:
            request = kubearmor_pb2.RequestMessage(Filter=self.log_filter)
            await self._follow("logs", logs.WatchLogs(request), LogSeen, backoff)
            await asyncio.sleep(backoff.next_delay())

    async def _follow(
        self,
        kind: str,
        call: Any,
        event: Callable[[dict[str, Any]], WatchEvent],
        backoff: _Backoff,
    ) -> str:
        """Read one stream until it ends; return why it ended."""
        self.subscriptions[kind] += 1
        opened = time.monotonic()
        try:
            async for msg in call:
                backoff.reset()  # it works: the next loss starts from short delays
                self._tell(event(message_dict(msg)))
            return f"{kind} stream ended"
        except grpc.RpcError as exc:
            if time.monotonic() - opened > 10:
                backoff.reset()
            return f"{kind} stream: {_describe(exc)}"
        finally:
            call.cancel()


def _describe(exc: grpc.RpcError) -> str:
    if isinstance(exc, grpc.Call | grpc.aio.AioRpcError):
        return f"{exc.code().name} {exc.details() or ''}".rstrip()
    return str(exc)
