"""Content digests of policy sets, computed the same way on both sides.

The control plane signs the digest of the whole fleet state into every
bundle; a device reports the digest of the set it actually enforces, and the
DeviceMirror compares that with the digest of the set it should enforce.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

EMPTY_DIGEST = hashlib.sha256(b"[]").hexdigest()


def _name(doc: Mapping[str, Any]) -> str:
    return str(doc["metadata"]["name"])


def state_digest(docs: Iterable[Mapping[str, Any]]) -> str:
    """SHA-256 of a set of policy documents, independent of their order."""
    ordered = sorted(docs, key=_name)
    canonical = json.dumps(ordered, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()
