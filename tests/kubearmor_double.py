"""A KubeArmor daemon double that speaks the real wire.

A real grpcio server on a free loopback port, serving ``policy.PolicyService``,
``policy.ProbeService`` and ``feeder.LogService`` from edgeward's own copies of
KubeArmor's ``.proto`` files, and behaving as the interface page
(``/work/shared/kubearmor-interface.md``) describes the daemon in non-k8s mode:

* ``hostPolicy`` takes JSON ``{"type", "object": {"metadata", "spec"}}``:
  ADDED upserts by name (new name or identical content -> Applied, changed
  content -> Modified), DELETED of an unknown name -> NotExist, MODIFIED of an
  unknown name -> Modified without holding it; bad JSON, an empty name or a
  spec of the wrong type -> Invalid.  No other validation, like the daemon.
* It keeps a copy of each policy on its disk and replays them on
  :meth:`KubeArmorDouble.restart`, so a restart can bring back a policy that
  was deleted meanwhile (:meth:`put_on_disk` plants one).
* ``getProbeData`` lists every host policy held, keyed by node name, as the
  daemon's own JSON (``metadata.policyName``, not ``metadata.name``).
* ``containerPolicy`` answers NotEnabled, as on a host without a container
  runtime the daemon watches.
* Alerts and logs go out only when a test emits them; each subscriber has a
  1000-entry queue and what does not fit is dropped and counted.

Tests can make it refuse (:meth:`refuse`, :meth:`answer_all`) and read what it
holds (:attr:`policies`, :meth:`names`) and what it was asked (:attr:`calls`).
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from brokerkit import free_port

from edgeward.enforcement.kubearmor import (
    kubearmor_pb2,
    kubearmor_pb2_grpc,
    policy_pb2,
    policy_pb2_grpc,
)

STATUS = policy_pb2.PolicyStatus
QUEUE_SIZE = 1000  # per subscriber, as in the daemon


class KubeArmorDouble:
    def __init__(
        self,
        state_dir: Path,
        *,
        node: str = "edge-node",
        port: int | None = None,
        tls: tuple[bytes, bytes, bytes] | None = None,
    ) -> None:
        """``tls``: (server key, server cert, client CA) in PEM, for mTLS (the
        daemon's coming default); plaintext without it."""
        self.tls = tls
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.node = node
        self.port = port or free_port()
        self.policies: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str, str]] = []  # hostPolicy: (type, name, answer)
        self.container_calls: list[bytes] = []  # containerPolicy requests (NotEnabled)
        self.dropped: Counter[str] = Counter()  # alerts/logs nobody could take
        self.starts = 0
        self._refusals: dict[str, int] = {}  # policy name -> status to answer
        self._answer_all: int | None = None
        self._lock = threading.Lock()
        self._subscribers: dict[str, list[queue.Queue]] = {"alerts": [], "logs": []}
        self._flowing = threading.Event()
        self._flowing.set()
        self._parked: dict[int, threading.Event] = {}  # per subscriber queue
        self._server: grpc.Server | None = None
        self._running = threading.Event()

    # -- life cycle ----------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> KubeArmorDouble:
        """Start serving; like the daemon, first replay the copies on disk."""
        with self._lock:
            self.policies = {}
            for path in sorted(self.state_dir.glob("*.json")):
                obj = json.loads(path.read_text())
                self.policies[obj["metadata"]["name"]] = obj
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        policy_pb2_grpc.add_PolicyServiceServicer_to_server(_Policies(self), server)
        policy_pb2_grpc.add_ProbeServiceServicer_to_server(_Probe(self), server)
        kubearmor_pb2_grpc.add_LogServiceServicer_to_server(_Logs(self), server)
        if self.tls is None:
            bound = server.add_insecure_port(self.address)
        else:
            key, cert, client_ca = self.tls
            credentials = grpc.ssl_server_credentials(
                [(key, cert)], root_certificates=client_ca, require_client_auth=True
            )
            bound = server.add_secure_port(self.address, credentials)
        if bound != self.port:
            raise RuntimeError(f"kubearmor double: cannot listen on {self.address}")
        self._running.set()
        server.start()
        self._server = server
        self.starts += 1
        return self

    def stop(self) -> None:
        """Stop like a killed daemon: streams end, policies in memory are gone."""
        self._running.clear()
        if self._server is not None:
            self._server.stop(grace=None).wait(5)
            self._server = None
        with self._lock:
            self._subscribers = {"alerts": [], "logs": []}

    def restart(self) -> None:
        self.stop()
        self.start()

    # -- what tests set up and look at -----------------------------------------------

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self.policies)

    def tags(self, name: str) -> list[str]:
        with self._lock:
            return list((self.policies[name].get("spec") or {}).get("tags") or [])

    def put_on_disk(self, obj: Mapping[str, Any]) -> None:
        """Leave a copy on disk that the next start replays (a stale policy)."""
        self._persist(obj["metadata"]["name"], obj)

    def refuse(self, name: str, status: str = "Invalid") -> None:
        """Answer ``status`` to every ADDED/DELETED of policy ``name``."""
        self._refusals[name] = STATUS.Value(status)

    def accept(self, name: str) -> None:
        self._refusals.pop(name, None)

    def answer_all(self, status: str | None) -> None:
        """Answer ``status`` to every policy call (None: behave again)."""
        self._answer_all = None if status is None else STATUS.Value(status)

    def subscribers(self, kind: str) -> int:
        with self._lock:
            return len(self._subscribers[kind])

    @contextmanager
    def held_back(self) -> Iterator[None]:
        """Queue what is emitted without sending it (a subscriber that cannot keep up)."""
        self._flowing.clear()
        try:
            # Wait until no stream is inside a read of its queue: from now on
            # whatever is emitted stays queued.
            with self._lock:
                parked = [self._parked[id(q)] for qs in self._subscribers.values() for q in qs]
            for event in parked:
                if not event.wait(5):
                    raise RuntimeError("kubearmor double: a stream did not hold back")
            yield
        finally:
            self._flowing.set()

    def emit_alert(self, **fields: Any) -> None:
        fields.setdefault("Timestamp", int(time.time()))
        fields.setdefault("HostName", self.node)
        self._emit("alerts", kubearmor_pb2.Alert(**fields))

    def emit_alert_for(self, name: str, **fields: Any) -> None:
        """An alert as the daemon raises it for a policy it holds (its tags included)."""
        with self._lock:
            spec = self.policies[name].get("spec") or {}
        values: dict[str, Any] = {
            "PolicyName": name,
            "Tags": ",".join(spec.get("tags") or []),
            "ATags": list(spec.get("tags") or []),
            "Severity": str(spec.get("severity", 1)),
            "Type": "MatchedHostPolicy",
            "Operation": "Process",
            "Action": spec.get("action") or "Block",
            "Result": "Permission denied",
            "Enforcer": "BPFLSM",
        }
        values.update(fields)
        self.emit_alert(**values)

    def emit_log(self, **fields: Any) -> None:
        fields.setdefault("Timestamp", int(time.time()))
        fields.setdefault("HostName", self.node)
        fields.setdefault("Type", "HostLog")
        self._emit("logs", kubearmor_pb2.Log(**fields))

    # -- inside -------------------------------------------------------------------------

    def _emit(self, kind: str, msg: Any) -> None:
        with self._lock:
            subscribers = list(self._subscribers[kind])
        if not subscribers:
            self.dropped[kind] += 1
        for q in subscribers:
            try:
                q.put_nowait(msg)
            except queue.Full:
                self.dropped[kind] += 1

    def _persist(self, name: str, obj: Mapping[str, Any] | None) -> None:
        path = self.state_dir / f"{name}.json"
        if obj is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(json.dumps(obj))

    def _host_policy(self, raw: bytes) -> int:
        try:
            event = json.loads(raw)
            kind = event["type"]
            obj = event["object"]
            name = obj["metadata"]["name"]
        except (ValueError, KeyError, TypeError):
            self.calls.append(("?", "", "Invalid"))
            return STATUS.Invalid
        status = self._answer(kind, name, obj)
        self.calls.append((str(kind), str(name), STATUS.Name(status)))
        return status

    def _answer(self, kind: Any, name: Any, obj: Any) -> int:
        if not isinstance(name, str) or not name:
            return STATUS.Invalid
        if self._answer_all is not None:
            return self._answer_all
        if name in self._refusals:
            return self._refusals[name]
        with self._lock:
            held = self.policies.get(name)
            if kind == "DELETED":
                if held is None:
                    return STATUS.NotExist
                del self.policies[name]
                self._persist(name, None)
                return STATUS.Deleted
            if kind not in ("ADDED", "MODIFIED"):
                return STATUS.Invalid
            if not isinstance(obj.get("spec", {}), dict):
                return STATUS.Invalid
            stored = {"metadata": dict(obj["metadata"]), "spec": dict(obj.get("spec") or {})}
            if kind == "MODIFIED" and held is None:
                return STATUS.Modified  # answered, not enforced until a restart
            self.policies[name] = stored
            self._persist(name, stored)
            return STATUS.Applied if held is None or held == stored else STATUS.Modified

    def _probe(self) -> policy_pb2.ProbeResponse:
        with self._lock:
            items = sorted(self.policies.items())
        host = policy_pb2.HostSecurityPolicies(
            policyList=[name for name, _ in items],
            policyDataList=[
                # The daemon's own object: metadata.policyName, not metadata.name.
                policy_pb2.policy(
                    policy=json.dumps(
                        {"metadata": {"policyName": name}, "spec": obj["spec"]}
                    ).encode()
                )
                for name, obj in items
            ],
        )
        return policy_pb2.ProbeResponse(hostMap={self.node: host})

    def _stream(self, kind: str, context: grpc.ServicerContext) -> Iterator[Any]:
        q: queue.Queue = queue.Queue(maxsize=QUEUE_SIZE)
        parked = threading.Event()  # set while this stream holds back
        with self._lock:
            self._subscribers[kind].append(q)
            self._parked[id(q)] = parked
        try:
            while context.is_active() and self._running.is_set():
                if not self._flowing.is_set():
                    parked.set()
                    self._flowing.wait(0.2)
                    continue
                parked.clear()
                try:
                    msg = q.get(timeout=0.2)
                except queue.Empty:
                    continue
                yield msg
        finally:
            with self._lock:
                if q in self._subscribers[kind]:
                    self._subscribers[kind].remove(q)
                self._parked.pop(id(q), None)


class _Policies(policy_pb2_grpc.PolicyServiceServicer):
    def __init__(self, double: KubeArmorDouble) -> None:
        self.double = double

    def hostPolicy(self, request: policy_pb2.policy, context: Any) -> policy_pb2.response:
        return policy_pb2.response(status=self.double._host_policy(request.policy))

    def containerPolicy(self, request: policy_pb2.policy, context: Any) -> policy_pb2.response:
        # A host without a container runtime the daemon watches.
        self.double.container_calls.append(request.policy)
        return policy_pb2.response(status=STATUS.NotEnabled)

    def networkPolicy(self, request: policy_pb2.policy, context: Any) -> policy_pb2.response:
        return policy_pb2.response(status=STATUS.NotEnabled)


class _Probe(policy_pb2_grpc.ProbeServiceServicer):
    def __init__(self, double: KubeArmorDouble) -> None:
        self.double = double

    def getProbeData(self, request: Any, context: Any) -> policy_pb2.ProbeResponse:
        return self.double._probe()


class _Logs(kubearmor_pb2_grpc.LogServiceServicer):
    def __init__(self, double: KubeArmorDouble) -> None:
        self.double = double

    def HealthCheck(self, request: Any, context: Any) -> kubearmor_pb2.ReplyMessage:
        return kubearmor_pb2.ReplyMessage(Retval=request.nonce)

    def WatchAlerts(self, request: Any, context: Any) -> Iterator[kubearmor_pb2.Alert]:
        if request.Filter not in ("all", "policy"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"filter {request.Filter!r}")
        yield from self.double._stream("alerts", context)

    def WatchLogs(self, request: Any, context: Any) -> Iterator[kubearmor_pb2.Log]:
        if request.Filter not in ("all", "system"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"filter {request.Filter!r}")
        yield from self.double._stream("logs", context)
