"""Content digests of policies and policy sets, computed the same way on both
sides.

A policy's digest is the SHA-256 of its canonical JSON (sorted keys, no
spaces).  A set's digest combines its members' names and digests, sorted by
name, so a device that knows each policy's digest — the control plane signs
them into every bundle — gets any subset's digest without serialising a
document again.  The control plane signs the digest of the whole fleet state
into every bundle; a device reports the digest of the set it enforces, and
the DeviceMirror compares that with the digest of the set it should enforce.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any


def doc_digest(doc: Mapping[str, Any]) -> str:
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def combine(digests: Mapping[str, str]) -> str:
    """The digest of a set, from its members' names and digests."""
    lines = "\n".join(f"{name} {digests[name]}" for name in sorted(digests))
    return hashlib.sha256(lines.encode()).hexdigest()


def name_of(doc: Mapping[str, Any]) -> str:
    return str(doc["metadata"]["name"])


def state_digest(docs: Iterable[Mapping[str, Any]]) -> str:
    """The digest of a set of policy documents, independent of their order."""
    return combine({name_of(d): doc_digest(d) for d in docs})


EMPTY_DIGEST = combine({})
