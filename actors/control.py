"""The control plane's actors (Thespian, ``multiprocTCPBase``).

* :class:`PolicyDistributor` — validates, numbers, signs and publishes fleet
  revisions (and snapshots); keeps the revision history in SQLite.
* :class:`DeviceMirror` — enrolled devices, desired versus reported state.
* :class:`BrokerLink` — owns the AMQP connection for both.
* The TelemetryCollector (``collector.py``) owns its own connection.

How pika lives inside Thespian: the BrokerLink owns a pika
``BlockingConnection`` and never blocks waiting for input.  Every handler
returns ``ThespianWatch([socket fd])`` so that Thespian wakes it when the
broker sends something, and it re-arms ``wakeupAfter`` to service heartbeats
and reconnects.  No thread is started behind Thespian's back.  Publishing a
bundle waits for its confirm inside the handler (a few milliseconds).
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pika.exceptions
from thespian.actors import (
    ActorExitRequest,
    ActorTypeDispatcher,
    ThespianWatch,
    WakeupMessage,
    WatchMessage,
)

from edgeward.enforcement.policy import PolicyValidationError, parse_policies
from edgeward.transport import topology
from edgeward.transport.connection import (
    Backoff,
    close_quietly,
    connect_blocking,
    redact,
    socket_fds,
    split_urls,
)
from edgeward.transport.errors import BrokerUnreachable, RemoteProtocolError, TopologyConflict
from edgeward.transport.signing import Signer
from edgeward.transport.wire import CONFIRM_BUCKETS, Bundle, Heartbeat, decode

from . import messages as m
from .collector import retentions
from .fleet import STATES, Desired, FleetRevision, advance, desired_for, device_state
from .keys import KeyringError, KeyStore
from .store import Store

log = logging.getLogger("edgeward.control")

DISTRIBUTOR = "edgeward-policy-distributor"
MIRROR = "edgeward-device-mirror"
LINK = "edgeward-broker-link"


def store_path(home: str) -> Path:
    return Path(home) / "control.sqlite"


def key_path(home: str) -> Path:
    return Path(home) / "keys" / "signing.pem"


class _Configured(ActorTypeDispatcher):
    settings: m.Settings | None = None

    def receiveMsg_Status(self, msg: m.Status, sender: Any) -> None:
        self.send(sender, m.Reply(self.settings is not None, self.status()))

    def status(self) -> dict[str, Any]:
        return {"configured": self.settings is not None}

    def not_configured(self, sender: Any) -> None:
        self.send(sender, m.Reply.fail(m.FAILED, "control plane is still starting"))

    def receiveUnrecognizedMessage(self, msg: Any, sender: Any) -> None:
        if not isinstance(msg, ActorExitRequest | WakeupMessage):
            log.warning("%s dropped a message it does not know: %r", type(self).__name__, msg)


# -- BrokerLink --------------------------------------------------------------


REFUSAL_LOG_EVERY = 10.0  # seconds between log lines about refused heartbeats


class BrokerLink(_Configured):
    HEARTBEAT_PREFETCH = 500

    def __init__(self) -> None:
        super().__init__()
        self.conn: Any = None
        self.channel: Any = None
        self.urls: list[str] = []
        self.mirror: Any = None
        self.backoff = Backoff(base=0.5, cap=10.0)
        self.retry_at = 0.0
        self.batch: list[dict] = []
        self.malformed = 0
        self.refused = 0
        self.refused_total = 0  # flushed to the mirror so far
        self.refusal_logged_at = -REFUSAL_LOG_EVERY
        self.last_tag = 0
        self.last_error = ""

    def status(self) -> dict[str, Any]:
        return {
            "configured": self.settings is not None,
            "connected": self.conn is not None,
            "error": self.last_error,
        }

    def receiveMsg_Configure(self, msg: m.Configure, sender: Any) -> ThespianWatch:
        self.settings = msg.settings
        self.urls = split_urls(msg.settings.broker_url)
        self.mirror = msg.mirror
        self._ensure_connected()
        self.wakeupAfter(0.5)
        self.send(sender, m.Reply(True, self.status()))
        return self._watch()

    def receiveMsg_Status(self, msg: m.Status, sender: Any) -> ThespianWatch:
        if self.settings is not None:
            self._ensure_connected()
        self.send(
            sender, m.Reply(self.settings is not None and self.conn is not None, self.status())
        )
        return self._watch()

    def receiveMsg_WakeupMessage(self, msg: WakeupMessage, sender: Any) -> ThespianWatch:
        if self.settings is not None:
            self._ensure_connected()
            self._pump()
            self.wakeupAfter(0.5)
        return self._watch()

    def receiveMsg_WatchMessage(self, msg: WatchMessage, sender: Any) -> ThespianWatch:
        self._pump()
        return self._watch()

    def receiveMsg_Publish(self, msg: m.Publish, sender: Any) -> ThespianWatch:
        self._ensure_connected(now=True)
        if self.channel is None:
            self.send(sender, m.Published(msg.token, False, self.last_error or "not connected"))
            return self._watch()
        try:
            self.channel.basic_publish(
                topology.POLICY_EXCHANGE,
                "",
                msg.body,
                topology.policy_properties(),
                mandatory=True,
            )
        except pika.exceptions.UnroutableError:
            self.send(sender, m.Published(msg.token, False, "policy stream missing"))
        except pika.exceptions.NackError:
            self.send(sender, m.Published(msg.token, False, "broker refused the bundle"))
        except (pika.exceptions.AMQPError, OSError) as exc:
            self._lost(exc)
            self.send(sender, m.Published(msg.token, False, f"broker connection lost: {exc}"))
        else:
            self.send(sender, m.Published(msg.token, True))
        self._pump()
        return self._watch()

    def receiveMsg_ActorExitRequest(self, msg: ActorExitRequest, sender: Any) -> None:
        self._flush()
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:  # closing a broken connection: nothing to save
                pass
        self.conn = self.channel = None

    # -- connection ----------------------------------------------------------

    def _watch(self) -> ThespianWatch:
        return ThespianWatch(socket_fds(self.conn))

    def _ensure_connected(self, now: bool = False) -> None:
        if self.conn is not None or (not now and time.monotonic() < self.retry_at):
            return
        conn = None
        try:
            conn = connect_blocking(self.urls, name="edgeward-control-plane")
            channel = conn.channel()
            assert self.settings is not None
            topology.declare(channel, *retentions(self.settings))
            channel.confirm_delivery()
            channel.basic_qos(prefetch_count=self.HEARTBEAT_PREFETCH)
            channel.basic_consume(topology.HEARTBEAT_QUEUE, self._on_heartbeat)
        except (BrokerUnreachable, TopologyConflict) as exc:
            close_quietly(conn)
            self.last_error = str(exc)
            self.retry_at = time.monotonic() + self.backoff.next_delay()
            log.warning("%s", exc)
            return
        except (pika.exceptions.AMQPError, OSError) as exc:
            close_quietly(conn)
            self.last_error = f"broker setup failed: {exc!r}"
            self.retry_at = time.monotonic() + self.backoff.next_delay()
            log.warning("%s", self.last_error)
            return
        self.conn, self.channel = conn, channel
        self.backoff.reset()
        self.last_error = ""
        log.info("connected to the broker")

    def _lost(self, exc: BaseException) -> None:
        self.last_error = f"connection lost: {exc!r}"
        log.warning("%s", self.last_error)
        close_quietly(self.conn)
        self.conn = self.channel = None
        self.retry_at = time.monotonic() + self.backoff.next_delay()

    def _pump(self) -> None:
        if self.conn is None:
            return
        try:
            self.conn.process_data_events(time_limit=0)
            self._flush()
        except (pika.exceptions.AMQPError, OSError) as exc:
            self._lost(exc)

    def _on_heartbeat(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        self.last_tag = method.delivery_tag
        try:
            hb = Heartbeat.from_message(decode(body))
        except RemoteProtocolError:
            self.malformed += 1
            return
        # The same identity rule as telemetry records: the routing key, the
        # body and the broker login (user_id) must all name one device.
        assert self.settings is not None
        key = method.routing_key.split(".")
        user_id = properties.user_id
        if (
            len(key) != 3
            or key[1] != hb.device
            or (user_id is not None and user_id != hb.device)
            or (user_id is None and not self.settings.allow_shared_login)
        ):
            self.refused += 1
            # One line per REFUSAL_LOG_EVERY seconds at most: a flood of
            # forged heartbeats must not become a flood of log lines.
            now = time.monotonic()
            if now >= self.refusal_logged_at + REFUSAL_LOG_EVERY:
                self.refusal_logged_at = now
                log.warning(
                    "refused a heartbeat naming %r, routed %r, from user %r (%s refused so far)",
                    hb.device,
                    method.routing_key,
                    user_id,
                    self.refused_total + self.refused,
                )
            return
        self.batch.append(asdict(hb))

    def _flush(self) -> None:
        if self.batch or self.malformed or self.refused:
            self.send(self.mirror, m.Heartbeats(tuple(self.batch), self.malformed, self.refused))
            self.refused_total += self.refused
            self.batch, self.malformed, self.refused = [], 0, 0
        if self.last_tag and self.channel is not None:
            self.channel.basic_ack(self.last_tag, multiple=True)
            self.last_tag = 0


# -- PolicyDistributor ---------------------------------------------------------


class PolicyDistributor(_Configured):
    def __init__(self) -> None:
        super().__init__()
        self.store: Store | None = None
        self.keys: KeyStore | None = None
        self.signer: Signer | None = None
        self.link: Any = None
        self.mirror: Any = None
        self.token = 0
        self.in_flight: dict[int, tuple[Any, int, str]] = {}
        self.waiting: deque[tuple[Any, Any]] = deque()
        self.last_snapshot_request = 0.0

    def receiveMsg_Configure(self, msg: m.Configure, sender: Any) -> None:
        self.settings = msg.settings
        self.store = Store(store_path(msg.settings.home))
        self.keys = KeyStore(msg.settings.home)
        pending = self.keys.pending
        if pending and pending["revision"] is None:
            self.keys.abandon()  # made, never announced: as if never made
        elif pending:
            rev = self.store.revision(pending["revision"])
            if rev is None:
                self.keys.abandon()
            elif rev.published:
                self.keys.activate()
        self.signer = self.keys.signer()
        self.link, self.mirror = msg.link, msg.mirror
        for rev in self.store.unpublished():  # a crash between store and confirm
            self._publish(rev.revision, "delta", None)
        self.send(sender, m.Reply(True, self.status()))

    def receiveMsg_SigningIdentity(self, msg: m.SigningIdentity, sender: Any) -> None:
        if self.keys is None:
            return self.not_configured(sender)
        # Every key the fleet trusts now (a new device learns which retire
        # from its first bundle's keyring).
        self.send(sender, m.Reply(True, {k: e["public"] for k, e in self.keys.keyring().items()}))

    def receiveMsg_ListKeys(self, msg: m.ListKeys, sender: Any) -> None:
        if self.keys is None:
            return self.not_configured(sender)
        self.send(sender, m.Reply(True, self.keys.rows()))

    def receiveMsg_RotateKey(self, msg: m.RotateKey, sender: Any) -> None:
        if self._busy(msg, sender):
            return
        assert self.keys is not None and self.store is not None
        if msg.overlap < 0:
            return self.send(sender, m.Reply.fail(m.BAD_INPUT, "the overlap must not be negative"))
        old = self.keys.active
        now = time.time()
        try:
            new = self.keys.rotate(msg.overlap, now)
        except KeyringError as exc:
            return self.send(sender, m.Reply.fail(m.BAD_INPUT, str(exc)))
        summary = f"rotate signing key {old} -> {new.key_id}"
        # Issued at the rotation's own time, so the old key's signature on
        # it holds even with no overlap, and when published again later.
        rev = self._forced_revision("rotate-key", summary, now)
        self.keys.announce(rev.revision)
        self._publish(rev.revision, "delta", sender)  # signed by the old key: all trust it

    def receiveMsg_RevokeKey(self, msg: m.RevokeKey, sender: Any) -> None:
        if self._busy(msg, sender):
            return
        assert self.keys is not None
        try:
            self.keys.revoke(msg.key_id)
        except KeyringError as exc:
            return self.send(sender, m.Reply.fail(m.BAD_INPUT, str(exc)))
        rev = self._forced_revision("revoke-key", f"revoke signing key {msg.key_id}")
        self._publish(rev.revision, "delta", sender)

    def _forced_revision(self, action: str, summary: str, now: float | None = None) -> Any:
        """A revision that changes no policy (it carries a new keyring)."""
        assert self.store is not None
        return self.store.add_revision(
            issued_at=time.time() if now is None else now,
            action=action,
            summary=summary,
            state=self._state(),
            changed=[],
            deleted=[],
        )

    # Changes are serialised: one revision in flight at a time.
    def _busy(self, msg: Any, sender: Any) -> bool:
        if self.settings is None:
            self.not_configured(sender)
            return True
        if self._busy_now():
            self.waiting.append((msg, sender))
            return True
        return False

    def receiveMsg_ApplyPolicies(self, msg: m.ApplyPolicies, sender: Any) -> None:
        if self._busy(msg, sender):
            return
        docs: dict[str, dict] = {}
        problems = []
        for i, doc in enumerate(msg.documents):
            source = msg.sources[i] if i < len(msg.sources) else f"document {i + 1}"
            try:
                (policy,) = parse_policies(json.dumps(doc), source)
            except PolicyValidationError as exc:
                problems.append(str(exc))
                continue
            except ValueError:
                problems.append(f"{source}: expected exactly one document")
                continue
            docs[policy.name] = policy.document
        if problems:
            return self.send(sender, m.Reply.fail(m.BAD_INPUT, "\n".join(problems)))
        current = self._state()
        changed = sorted(n for n, d in docs.items() if current.get(n) != d)
        state = {**current, **docs}
        self._new_revision(sender, "apply", f"apply {', '.join(changed)}", state, changed, [])

    def receiveMsg_DeletePolicy(self, msg: m.DeletePolicy, sender: Any) -> None:
        if self._busy(msg, sender):
            return
        current = self._state()
        if msg.name not in current:
            return self.send(sender, m.Reply.fail(m.BAD_INPUT, f"no policy named {msg.name!r}"))
        state = {n: d for n, d in current.items() if n != msg.name}
        self._new_revision(sender, "delete", f"delete {msg.name}", state, [], [msg.name])

    def receiveMsg_Rollback(self, msg: m.Rollback, sender: Any) -> None:
        if self._busy(msg, sender):
            return
        assert self.store is not None
        target = self.store.revision(msg.revision)
        if target is None or not target.published:
            return self.send(
                sender, m.Reply.fail(m.BAD_INPUT, f"no published revision {msg.revision}")
            )
        current = self._state()
        changed = sorted(n for n, d in target.state.items() if current.get(n) != d)
        deleted = sorted(set(current) - set(target.state))
        self._new_revision(
            sender, "rollback", f"rollback to {msg.revision}", target.state, changed, deleted
        )

    def receiveMsg_PublishSnapshot(self, msg: m.PublishSnapshot, sender: Any) -> None:
        if self.settings is None:
            return self.not_configured(sender)
        assert self.store is not None
        latest = self.store.latest()
        if latest is None:
            return self.send(sender, m.Reply.fail(m.BAD_INPUT, "no revision to snapshot yet"))
        self._publish(latest.revision, "snapshot", sender)

    def receiveMsg_SnapshotWanted(self, msg: m.SnapshotWanted, sender: Any) -> None:
        assert self.settings is not None and self.store is not None
        now = time.monotonic()
        if now - self.last_snapshot_request < self.settings.snapshot_cooldown:
            return
        latest = self.store.latest()
        if latest is not None and latest.published:
            self.last_snapshot_request = now
            log.info("snapshot of revision %s asked for by %s", latest.revision, msg.device)
            self._publish(latest.revision, "snapshot", None)

    def receiveMsg_ListPolicies(self, msg: m.ListPolicies, sender: Any) -> None:
        if self.settings is None:
            return self.not_configured(sender)
        assert self.store is not None
        last_changed: dict[str, int] = {}
        latest = None
        for rev in self.store.revisions():
            if not rev.published:
                continue
            latest = rev
            for name in rev.changed:
                last_changed[name] = rev.revision
        rows = []
        for name, doc in sorted((latest.state if latest else {}).items()):
            spec = doc.get("spec") or {}
            selector = (spec.get("nodeSelector") or spec.get("selector") or {}).get(
                "matchLabels", {}
            )
            rows.append(
                {
                    "name": name,
                    "kind": doc.get("kind"),
                    "revision": last_changed.get(name, latest.revision if latest else 0),
                    "selector": selector,
                    "action": spec.get("action", "Block"),
                }
            )
        self.send(sender, m.Reply(True, rows))

    def receiveMsg_History(self, msg: m.History, sender: Any) -> None:
        if self.settings is None:
            return self.not_configured(sender)
        assert self.store is not None
        rows = [
            {
                "revision": r.revision,
                "issued_at": r.issued_at,
                "action": r.action,
                "summary": r.summary,
                "policies": len(r.state),
                "digest": r.digest,
                "published": r.published,
            }
            for r in self.store.revisions()
        ]
        self.send(sender, m.Reply(True, rows))

    def receiveMsg_Published(self, msg: m.Published, sender: Any) -> None:
        assert self.store is not None and self.settings is not None
        client, revision, mode = self.in_flight.pop(msg.token, (None, 0, ""))
        if mode == "delta":
            if msg.ok:
                self.store.mark_published(revision)
                rev = self.store.revision(revision)
                assert rev is not None
                pending = self.keys.pending if self.keys else None
                if pending and pending["revision"] == revision:
                    assert self.keys is not None
                    key = self.keys.activate()
                    self.signer = self.keys.signer()
                    log.info("signing key %s announced in revision %s: it signs now", key, revision)
                self.send(self.mirror, m.FleetChanged(revision, rev.state))
                if client is not None:
                    self.send(
                        client,
                        m.Reply(
                            True,
                            {"revision": revision, "changed": rev.changed, "deleted": rev.deleted},
                        ),
                    )
                if revision % self.settings.snapshot_every == 0:
                    self._publish(revision, "snapshot", None)
            elif client is not None:
                # Nobody has seen it: take the number back so revisions stay dense.
                self.store.drop_revision(revision)
                pending = self.keys.pending if self.keys else None
                if pending and pending["revision"] == revision:
                    assert self.keys is not None
                    self.keys.abandon()
                self.send(client, m.Reply.fail(m.UNREACHABLE, msg.error))
            else:
                log.warning("revision %s still unpublished: %s", revision, msg.error)
        elif client is not None:
            if msg.ok:
                self.send(client, m.Reply(True, {"snapshot": revision}))
            else:
                self.send(client, m.Reply.fail(m.UNREACHABLE, msg.error))
        while self.waiting and not self._busy_now():
            queued, queued_sender = self.waiting.popleft()
            self.receiveMessage(queued, queued_sender)

    def _busy_now(self) -> bool:
        return any(mode == "delta" for _, _, mode in self.in_flight.values())

    # -- helpers -------------------------------------------------------------

    def _state(self) -> dict[str, dict]:
        assert self.store is not None
        latest = self.store.latest()
        return dict(latest.state) if latest else {}

    def _new_revision(
        self,
        sender: Any,
        action: str,
        summary: str,
        state: dict[str, dict],
        changed: list[str],
        deleted: list[str],
    ) -> None:
        assert self.store is not None
        if not changed and not deleted:
            latest = self.store.latest()
            return self.send(
                sender,
                m.Reply(
                    True,
                    {"revision": latest.revision if latest else 0, "changed": [], "deleted": []},
                ),
            )
        rev = self.store.add_revision(
            issued_at=time.time(),
            action=action,
            summary=summary,
            state=state,
            changed=changed,
            deleted=deleted,
        )
        self._publish(rev.revision, "delta", sender)

    def _publish(self, revision: int, mode: str, client: Any) -> None:
        assert self.store is not None and self.signer is not None
        rev = self.store.revision(revision)
        assert rev is not None
        if mode == "delta":
            policies = tuple(rev.state[n] for n in rev.changed)
            deleted = tuple(rev.deleted)
        else:
            policies = tuple(rev.state[n] for n in sorted(rev.state))
            deleted = ()
        assert self.keys is not None
        bundle = Bundle(
            revision=revision,
            # A delta is issued when its revision was made (published again
            # after a crash, it is the same statement); a snapshot, now.
            issued_at=rev.issued_at if mode == "delta" else time.time(),
            mode=mode,
            policies=policies,
            deleted=deleted,
            sha256=rev.digest,
            keyring=self.keys.keyring(),
        )
        self.token += 1
        # Deltas are in flight one at a time, to keep revisions in order;
        # snapshots never hold up a change.
        self.in_flight[self.token] = (client, revision, mode)
        body = self.signer.sign(bundle).encode()
        self.send(self.link, m.Publish(body, revision, mode, self.token))


# -- DeviceMirror --------------------------------------------------------------


class DeviceMirror(_Configured):
    FLUSH_SECONDS = 2.0

    def __init__(self) -> None:
        super().__init__()
        self.store: Store | None = None
        self.distributor: Any = None
        self.labels: dict[str, dict[str, str]] = {}
        self.desired: dict[str, Desired] = {}
        self.reported: dict[str, dict] = {}
        self.last_seen: dict[str, float] = {}
        self.history: list[FleetRevision] = []
        self.dirty: set[str] = set()
        self.unknown_devices = 0
        self.malformed = 0
        self.refused = 0  # heartbeats whose sender was not the device they name
        self.revoked: set[str] = set()
        # The fleet's telemetry publish-confirm latency, summed from the
        # heartbeats' counts since this mirror started (a Prometheus histogram).
        self.confirm_counts = [0] * (len(CONFIRM_BUCKETS) + 1)
        self.confirm_seconds = 0.0

    def status(self) -> dict[str, Any]:
        return {
            "configured": self.settings is not None,
            "devices": len(self.labels),
            "unknown_devices": self.unknown_devices,
            "malformed": self.malformed,
            "refused": self.refused,
            "revoked": len(self.revoked),
            "confirm_buckets": list(CONFIRM_BUCKETS),
            "confirm_counts": list(self.confirm_counts),
            "confirm_seconds": self.confirm_seconds,
        }

    def receiveMsg_Configure(self, msg: m.Configure, sender: Any) -> None:
        self.settings = msg.settings
        self.distributor = msg.distributor
        self.store = Store(store_path(msg.settings.home))
        self.history = [
            FleetRevision.of(r.revision, r.state) for r in self.store.revisions() if r.published
        ]
        for row in self.store.devices():
            self.labels[row.device] = row.labels
            self.desired[row.device] = desired_for(row.device, row.labels, self.history)
            if row.reported is not None:
                self.reported[row.device] = row.reported
            if row.last_seen is not None:
                self.last_seen[row.device] = row.last_seen
        self.revoked = set(self.store.revoked())
        self.wakeupAfter(self.FLUSH_SECONDS)
        self.send(sender, m.Reply(True, self.status()))

    def receiveMsg_Enroll(self, msg: m.Enroll, sender: Any) -> None:
        if self.settings is None:
            return self.not_configured(sender)
        assert self.store is not None
        if msg.device in self.revoked:
            return self.send(
                sender,
                m.Reply.fail(
                    m.BAD_INPUT,
                    f"{msg.device} is revoked and stays so: enrol the hardware under a new name",
                ),
            )
        labels = dict(msg.labels)
        self.store.enroll(msg.device, labels, time.time())
        self.labels[msg.device] = labels
        self.desired[msg.device] = desired_for(msg.device, labels, self.history)
        self.send(sender, m.Reply(True, {"device": msg.device, "labels": labels}))

    def receiveMsg_Revoke(self, msg: m.Revoke, sender: Any) -> None:
        if self.settings is None:
            return self.not_configured(sender)
        assert self.store is not None
        if msg.device not in self.labels:
            return self.send(sender, m.Reply.fail(m.BAD_INPUT, f"{msg.device} is not enrolled"))
        already = msg.device in self.revoked
        if not already:
            self.store.revoke(msg.device, time.time())
            self.revoked.add(msg.device)
        self.send(sender, m.Reply(True, {"device": msg.device, "already": already}))

    def receiveMsg_FleetChanged(self, msg: m.FleetChanged, sender: Any) -> None:
        if self.history and self.history[-1].revision >= msg.revision:
            return
        rev = FleetRevision.of(msg.revision, msg.state)
        self.history.append(rev)
        for device, labels in self.labels.items():
            self.desired[device] = advance(self.desired[device], rev, device, labels)

    def receiveMsg_Heartbeats(self, msg: m.Heartbeats, sender: Any) -> None:
        now = time.time()
        self.malformed += msg.malformed
        self.refused += msg.refused
        for hb in msg.items:
            device = hb["device"]
            if device not in self.labels:
                self.unknown_devices += 1
                continue
            if device in self.revoked:
                self.refused += 1
                continue
            # Latency counts are since the device's previous heartbeat: add
            # them to the fleet's, and keep them out of the device's state.
            confirms = hb.pop("confirms", ())
            self.confirm_seconds += hb.pop("confirm_seconds", 0.0)
            for i, n in enumerate(confirms):
                self.confirm_counts[i] += n
            self.reported[device] = hb
            self.last_seen[device] = now
            self.dirty.add(device)
            if hb.get("awaiting_snapshot") and self.distributor is not None:
                self.send(self.distributor, m.SnapshotWanted(device))

    def receiveMsg_ListDevices(self, msg: m.ListDevices, sender: Any) -> None:
        if self.settings is None:
            return self.not_configured(sender)
        if msg.state is not None and msg.state not in STATES:
            return self.send(
                sender, m.Reply.fail(m.BAD_INPUT, f"state must be one of {', '.join(STATES)}")
            )
        now = time.time()
        latest = self.history[-1].revision if self.history else 0
        rows = []
        for device in sorted(self.labels):
            reported = self.reported.get(device)
            desired = self.desired[device]
            state = (
                "revoked"
                if device in self.revoked
                else device_state(
                    desired,
                    reported,
                    self.last_seen.get(device),
                    now,
                    self.settings.offline_after,
                    latest=latest,
                )
            )
            if msg.state is not None and state != msg.state:
                continue
            rows.append(
                {
                    "device": device,
                    "labels": self.labels[device],
                    "desired_revision": desired.revision,
                    "reported_revision": reported.get("applied_revision") if reported else None,
                    "state": state,
                    "last_seen": self.last_seen.get(device),
                    "fleet_revision": reported.get("revision") if reported else None,
                    "rejected": reported.get("rejected", {}) if reported else {},
                    "gaps": reported.get("gaps", 0) if reported else 0,
                    "error": reported.get("error", "") if reported else "",
                    "hash": reported.get("hash") if reported else None,
                    "desired_hash": desired.digest,
                    "status": reported.get("status") if reported else None,
                    "outbox": reported.get("outbox", 0) if reported else 0,
                    "dropped": reported.get("dropped", {}) if reported else {},
                }
            )
        self.send(sender, m.Reply(True, rows))

    def receiveMsg_WakeupMessage(self, msg: WakeupMessage, sender: Any) -> None:
        self._flush()
        self.wakeupAfter(self.FLUSH_SECONDS)

    def receiveMsg_ActorExitRequest(self, msg: ActorExitRequest, sender: Any) -> None:
        self._flush()

    def _flush(self) -> None:
        if self.store is None or not self.dirty:
            return
        self.store.save_reports({d: (self.reported[d], self.last_seen[d]) for d in self.dirty})
        self.dirty.clear()


def describe_broker(urls: str) -> str:
    return ", ".join(redact(u) for u in split_urls(urls))
