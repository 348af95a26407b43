"""Backends put a set of policies in force on a device.

A backend takes the *whole* set a device must enforce and replaces what it
enforced before, as one step: either the new set is in force afterwards or
the old one still is (and :class:`BackendError` says why).  ``digest`` is what
the backend itself reports as in force, which is what heartbeats carry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from .digest import EMPTY_DIGEST, state_digest


class BackendError(Exception):
    """The backend could not put the set in force; the previous set still is."""


class Backend(Protocol):
    name: str

    def apply(self, policies: Sequence[Mapping[str, Any]], digest: str = "") -> str:
        """Put exactly ``policies`` in force; return the digest now in force.

        ``digest``, when given, is the caller's digest of exactly these
        documents (from the signed per-policy digests of the bundle)."""
        ...

    @property
    def digest(self) -> str:
        """Digest of the set in force now."""
        ...


class BuiltinBackend:
    """Keeps the in-force set in memory (simulation, dry runs, tests).

    The evaluator that judges events against this set comes with the
    enforcement issue; until then this backend records what is in force.
    """

    name = "builtin"

    def __init__(self) -> None:
        self._policies: tuple[Mapping[str, Any], ...] = ()
        self._digest = EMPTY_DIGEST
        self.applies = 0

    def apply(self, policies: Sequence[Mapping[str, Any]], digest: str = "") -> str:
        self._policies = tuple(policies)
        # It holds exactly what it was given, so the caller's digest of those
        # documents is its own; without one it computes it.
        self._digest = digest or state_digest(self._policies)
        self.applies += 1
        return self._digest

    @property
    def digest(self) -> str:
        return self._digest

    @property
    def policies(self) -> tuple[Mapping[str, Any], ...]:
        return self._policies

    @property
    def names(self) -> list[str]:
        return sorted(str(p["metadata"]["name"]) for p in self._policies)
