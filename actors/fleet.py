"""Desired versus reported: the DeviceMirror's arithmetic, with no I/O.

A device's *desired revision* is the latest fleet revision that changed the
set of policies selected for it; its *desired digest* is that set's digest.
Its state follows from what it last reported and when:

=========  ===============================================================
unknown    never reported
offline    silent for longer than ``offline_after`` seconds
failed     reports that its last apply failed
in_sync    enforces the desired digest, at or past the desired revision
drifted    reports ``ok`` at or past the desired revision (and not past the
           latest one the mirror knows), but enforces another digest: what
           is in force is not what was sent
pending    anything else: behind, catching up, or waiting for a snapshot
=========  ===============================================================

A device reporting a revision the mirror has not heard of yet (its bundle
arrived before the mirror learnt it was published) is pending, not drifted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from edgeward.enforcement.digest import EMPTY_DIGEST, combine, doc_digest, name_of

from .core import select_for

STATES = ("in_sync", "pending", "drifted", "offline", "failed", "unknown", "revoked")


@dataclass(frozen=True)
class FleetRevision:
    """A published revision's whole state, with each policy's digest worked
    out once (not once per device)."""

    revision: int
    state: Mapping[str, Mapping[str, Any]]
    digests: Mapping[str, str]

    @classmethod
    def of(cls, revision: int, state: Mapping[str, Mapping[str, Any]]) -> FleetRevision:
        return cls(revision, state, {name: doc_digest(doc) for name, doc in state.items()})


@dataclass(frozen=True)
class Desired:
    revision: int = 0
    digest: str = EMPTY_DIGEST


def advance(
    desired: Desired, rev: FleetRevision, device: str, labels: Mapping[str, str]
) -> Desired:
    """The device's desired state after one more fleet revision."""
    chosen = select_for(rev.state, device, labels)
    digest = combine({name_of(d): rev.digests[name_of(d)] for d in chosen})
    return desired if digest == desired.digest else Desired(rev.revision, digest)


def desired_for(
    device: str, labels: Mapping[str, str], history: Iterable[FleetRevision]
) -> Desired:
    desired = Desired()
    for rev in history:
        desired = advance(desired, rev, device, labels)
    return desired


def device_state(
    desired: Desired,
    reported: Mapping[str, Any] | None,
    last_seen: float | None,
    now: float,
    offline_after: float,
    latest: int | None = None,
) -> str:
    """The device's state; ``latest`` is the newest published revision the
    caller knows (None: no bound)."""
    if reported is None or last_seen is None:
        return "unknown"
    if now - last_seen > offline_after:
        return "offline"
    if reported.get("status") == "failed":
        return "failed"
    revision = int(reported.get("revision", 0))
    if reported.get("awaiting_snapshot") or revision < desired.revision:
        return "pending"
    if reported.get("hash") == desired.digest:
        return "in_sync"
    if reported.get("status", "ok") == "ok" and (latest is None or revision <= latest):
        return "drifted"
    return "pending"
