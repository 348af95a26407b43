"""Backends put a set of policies in force on a device.

A backend takes the *whole* set a device must enforce and replaces what it
enforced before, as one step: either the new set is in force afterwards or
the old one still is (and :class:`BackendError` says why).  ``digest`` is what
the backend itself reports as in force, which is what heartbeats carry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from .digest import EMPTY_DIGEST, state_digest

if TYPE_CHECKING:  # the evaluator is imported on first use: most backends never judge events
    from .evaluator import CompiledPolicies, Decision, Event

#: No revisions known yet: one empty map shared by every backend (the
#: simulator holds thousands); apply() replaces it, never changes it.
_NO_REVISIONS: dict[str, int] = {}
#: KubeArmor's ``Operation`` for each event type of the evaluator.
OPERATIONS = {"exec": "Process", "open": "File", "net": "Network", "cap": "Capabilities"}


class BackendError(Exception):
    """The backend could not put the set in force; the previous set still is."""


class Backend(Protocol):
    name: str

    def apply(
        self,
        policies: Sequence[Mapping[str, Any]],
        digest: str = "",
        *,
        revision: int | None = None,
    ) -> str:
        """Put exactly ``policies`` in force; return the digest now in force.

        ``digest``, when given, is the caller's digest of exactly these
        documents (from the signed per-policy digests of the bundle).
        ``revision``, when given, is the edgeward revision they come with (a
        backend may tag or remember it)."""
        ...

    @property
    def digest(self) -> str:
        """Digest of the set in force now."""
        ...


class BuiltinBackend:
    """Keeps the in-force set in memory and judges events against it with the
    evaluator (``enforcement/evaluator.py``): simulation, dry runs, tests, and
    devices without KubeArmor (``edgeward agent run --events-from``).

    The evaluator's index is built on the first :meth:`evaluate` after an
    apply, so a backend that never judges an event never pays for it (the
    simulator's devices share one index per set instead: simulator/telemetry.py).
    With ``revision`` given to :meth:`apply` it remembers, per policy, the
    revision that brought its current content, which alerts name.
    """

    name = "builtin"

    def __init__(self, default_posture: str = "audit") -> None:
        self._policies: tuple[Mapping[str, Any], ...] = ()
        self._digest = EMPTY_DIGEST
        self.applies = 0
        self.default_posture = default_posture
        self.revision = 0
        self._revisions: dict[str, int] = _NO_REVISIONS
        self._compiled: CompiledPolicies | None = None

    def apply(
        self,
        policies: Sequence[Mapping[str, Any]],
        digest: str = "",
        *,
        revision: int | None = None,
    ) -> str:
        if revision is not None:
            before = {str(p["metadata"]["name"]): p for p in self._policies}
            self._revisions = {
                name: self._revisions.get(name, revision) if before.get(name) == p else revision
                for p in policies
                for name in [str(p["metadata"]["name"])]
            }
            self.revision = revision
        self._policies = tuple(policies)
        self._compiled = None
        # It holds exactly what it was given, so the caller's digest of those
        # documents is its own; without one it computes it.
        self._digest = digest or state_digest(self._policies)
        self.applies += 1
        return self._digest

    def evaluate(self, event: Event) -> Decision:
        """What the set in force does to ``event`` (rules in evaluator.py)."""
        if self._compiled is None:
            from .evaluator import compile_policies

            self._compiled = compile_policies(self._policies, self.default_posture)
        return self._compiled.evaluate(event)

    def revision_of(self, policy: str | None) -> int:
        """The revision that brought ``policy``'s content in force (for
        ``DefaultPosture`` or an unknown name: the revision of the set)."""
        return self._revisions.get(policy or "", self.revision)

    def alert(self, event: Event, decision: Decision) -> dict[str, Any]:
        """A telemetry ``alert`` (or ``log``) body for one judged event."""
        resource = getattr(event, "path", None)
        if resource is None:
            resource = getattr(event, "protocol", None) or getattr(event, "capability", None)
        return {
            "policy": decision.policy,
            "action": decision.action,
            "severity": decision.severity,
            "operation": OPERATIONS.get(event.op, event.op),
            "resource": resource,
            "source": event.source,  # type: ignore[attr-defined]
            "tags": list(decision.tags),
            "message": decision.message,
            "revision": self.revision_of(decision.policy),
            "rule": decision.rule,
        }

    @property
    def digest(self) -> str:
        return self._digest

    @property
    def policies(self) -> tuple[Mapping[str, Any], ...]:
        return self._policies

    @property
    def names(self) -> list[str]:
        return sorted(str(p["metadata"]["name"]) for p in self._policies)
