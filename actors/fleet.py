"""Desired versus reported: the DeviceMirror's arithmetic, with no I/O.

A device's *desired revision* is the latest fleet revision that changed the
set of policies selected for it; its *desired digest* is that set's digest.
Its state follows from what it last reported and when:

=========  ===============================================================
unknown    never reported
offline    silent for longer than ``offline_after`` seconds
failed     reports that its last apply failed
in_sync    enforces the desired digest, at or past the desired revision
pending    anything else: behind, catching up, or waiting for a snapshot
=========  ===============================================================
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from edgeward.enforcement.digest import EMPTY_DIGEST, state_digest

from .core import select_for

STATES = ("in_sync", "pending", "offline", "failed", "unknown")


@dataclass(frozen=True)
class Desired:
    revision: int = 0
    digest: str = EMPTY_DIGEST


def advance(
    desired: Desired,
    revision: int,
    state: Mapping[str, Mapping[str, Any]],
    device: str,
    labels: Mapping[str, str],
) -> Desired:
    """The device's desired state after one more fleet revision."""
    digest = state_digest(select_for(state, device, labels))
    return desired if digest == desired.digest else Desired(revision, digest)


def desired_for(
    device: str,
    labels: Mapping[str, str],
    history: Iterable[tuple[int, Mapping[str, Mapping[str, Any]]]],
) -> Desired:
    desired = Desired()
    for revision, state in history:
        desired = advance(desired, revision, state, device, labels)
    return desired


def device_state(
    desired: Desired,
    reported: Mapping[str, Any] | None,
    last_seen: float | None,
    now: float,
    offline_after: float,
) -> str:
    if reported is None or last_seen is None:
        return "unknown"
    if now - last_seen > offline_after:
        return "offline"
    if reported.get("status") == "failed":
        return "failed"
    if (
        reported.get("hash") == desired.digest
        and int(reported.get("revision", 0)) >= desired.revision
        and not reported.get("awaiting_snapshot")
    ):
        return "in_sync"
    return "pending"
