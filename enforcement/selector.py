"""Which devices a policy's ``matchLabels`` select.

A host's only KubeArmor identity is its hostname; the fleet adds its own
labels (``store: berlin``). Every key of ``matchLabels`` must match:

* ``kubearmor.io/hostname``: ``"*"`` selects every device, otherwise a
  comma-separated list of exact hostnames (spaces around names ignored);
* ``kubearmor.io/hostnamereg``: a regular expression matched against the whole
  hostname, where a bare ``*`` is a wildcard (see ``hostname_regex``);
* any other key: the device's label of that name must equal the value.

An empty ``matchLabels`` never selects anything.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

__all__ = [
    "HOSTNAME_LABEL",
    "HOSTNAME_REGEX_LABEL",
    "hostname_regex",
    "selects",
    "validate_labels",
]

HOSTNAME_LABEL = "kubearmor.io/hostname"
HOSTNAME_REGEX_LABEL = "kubearmor.io/hostnamereg"

# After these a '*' repeats something: it is a regex quantifier, not a wildcard.
_QUANTIFIABLE_END = frozenset(".)]}")


def _expand_bare_stars(pattern: str) -> str:
    """Turn every bare ``*`` into ``.*``; leave regex quantifiers alone.

    A ``*`` is bare at the start of the pattern or of a group or alternative,
    and after a plain literal character (``pos-*``). After ``.``, ``)``, ``]``,
    ``}`` or an escaped character it is the usual quantifier (``pos-.*``,
    ``pos-[0-9]*``). Character classes and escapes are copied unchanged.
    """
    out: list[str] = []
    previous = ""  # the last character copied, "\\" after an escape
    i, n = 0, len(pattern)
    while i < n:
        char = pattern[i]
        if char == "\\":
            out.append(pattern[i : i + 2])
            previous = "\\"
            i += 2
        elif char == "[":
            j = i + 1
            if j < n and pattern[j] == "^":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            out.append(pattern[i : j + 1])
            previous = "]"
            i = j + 1
        elif char == "*":
            quantifier = previous == "\\" or previous in _QUANTIFIABLE_END
            out.append("*" if quantifier else ".*")
            previous = "*"
            i += 1
        else:
            out.append(char)
            previous = char
            i += 1
    return "".join(out)


@functools.lru_cache(maxsize=256)
def hostname_regex(pattern: str) -> re.Pattern[str]:
    """Compile a ``kubearmor.io/hostnamereg`` value; raises ``re.error`` if invalid."""
    try:
        return re.compile(_expand_bare_stars(pattern))
    except (OverflowError, RecursionError) as exc:
        raise re.error(f"cannot compile: {exc}") from exc


def _hostname_matches(value: str, device: str) -> bool:
    if value.strip() == "*":
        return True
    names = {name.strip() for name in value.split(",")}
    names.discard("")
    return device in names


def _hostname_regex_matches(value: str, device: str) -> bool:
    try:
        regex = hostname_regex(value)
    except re.error:
        return False
    return regex.fullmatch(device) is not None


def selects(match_labels: Mapping[str, str], device: str, labels: Mapping[str, str]) -> bool:
    """True when ``match_labels`` selects the device named ``device`` with ``labels``."""
    if not match_labels:
        return False
    for key, value in match_labels.items():
        if not isinstance(value, str):
            return False
        if key == HOSTNAME_LABEL:
            matched = _hostname_matches(value, device)
        elif key == HOSTNAME_REGEX_LABEL:
            matched = _hostname_regex_matches(value, device)
        else:
            matched = labels.get(key) == value
        if not matched:
            return False
    return True


def validate_labels(labels: Any) -> None:
    """Raise ``ValueError`` unless ``labels`` maps non-empty strings to strings."""
    if not isinstance(labels, Mapping):
        raise ValueError(f"labels must be a mapping of strings, got {type(labels).__name__}")
    for key, value in labels.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"label key {key!r} must be a non-empty string")
        if not isinstance(value, str):
            raise ValueError(f"label {key!r}: value {value!r} must be a string")
