"""Judge one event against the policies in force on a device, as KubeArmor would.

The rules, in words (docs/enforcement.md gives the reasons and examples;
tests/test_evaluator.py has one table row or more for each):

1. **Classes.** An ``exec`` event is judged by ``process`` rules, an ``open``
   by ``file`` rules, a ``net`` event by ``network`` rules and a ``cap`` event
   by ``capabilities`` rules. ``syscalls`` and ``device`` are not evaluated.
2. **Matching.** A rule matches when its resource matches — ``matchPaths``
   ``path`` exactly, ``execname`` the executable's base name,
   ``matchDirectories`` the directory itself and its direct entries (every
   descendant with ``recursive``), ``matchPatterns`` an AppArmor glob (``*``
   and ``?`` stay inside one path component, ``**`` crosses them, ``[...]``,
   ``{a,b}``), ``protocol`` and ``capability`` case-insensitively — and, when
   it has ``fromSource``, the event's acting process is one of those paths.
3. **Inherited values.** ``action``, ``severity``, ``tags`` and ``message``
   come from the rule, else its section, else the spec: the most specific
   wins. ``action`` defaults to Block, the others to nothing.
4. **readOnly / ownerOnly narrow a rule.** They name what the rule permits:
   reads (``readOnly``), the file's owner (``ownerOnly``: the acting user is
   the owner; unknown owner or user counts as not the owner). A Block or
   Audit rule with them hits only what they do not permit; an Allow rule
   with them allows only what they permit. What they permit is not thereby
   allowed by a Block/Audit rule: it is as if the rule had not matched.
5. **Host policies honour Allow only with fromSource.** Such an Allow rule in
   a KubeArmorHostPolicy is ignored (and listed in ``ignored``).
6. **Allow-list mode, per class.** The posture classes are ``file`` (process
   and file rules together), ``network`` and ``capabilities``. An event is in
   allow-list mode when an honoured Allow rule of its class has no
   ``fromSource`` or names the event's source. Then whatever no Allow rule
   allows falls to the class's default posture — ``audit`` unless configured
   ``block`` — reported as policy ``DefaultPosture``. Outside allow-list mode
   an unmatched event is allowed and no policy decided (``policy`` None).
7. **Conflicts: the most restrictive outcome wins**, Block over Audit over
   Allow, whatever the rules' specificity: Block wins over Allow on the same
   resource. A named policy wins over ``DefaultPosture`` with the same action.
   Among rules with the same action the most specific decides: rules with
   ``fromSource`` before rules without, then exact path (protocol,
   capability), execname, directory, recursive directory (deeper first),
   pattern (longer first), then policy name and position.

Speed: ``compile_policies`` indexes the rules by exact path, by executable
name, by directory (each ``dir`` under its own path; each pattern under the
directory part of its literal prefix, then the literal rest of the name), by
protocol and by capability; ``evaluate`` looks up the event's path, its base
name and each of its parent directories, so it touches only the rules that
can match. ``evaluate_by_scan`` checks
every rule instead: it is the reference the index is tested against and the
baseline of ``python -m edgeward.enforcement.bench_eval``.
"""

from __future__ import annotations

import difflib
import posixpath
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from .policy import HOST_POLICY_KIND, Policy

__all__ = [
    "ACTIONS",
    "CAPABILITIES",
    "DEFAULT_POSTURE",
    "POSTURES",
    "POSTURE_CLASSES",
    "PROTOCOLS",
    "CapEvent",
    "CompiledPolicies",
    "Decision",
    "Event",
    "EventError",
    "ExecEvent",
    "NetEvent",
    "OpenEvent",
    "PolicyCompileError",
    "compile_policies",
    "glob_regex",
]

ACTIONS = ("Allow", "Audit", "Block")
DEFAULT_POSTURE = "DefaultPosture"
POSTURES = ("audit", "block")
POSTURE_CLASSES = ("file", "network", "capabilities")
# Section of the policy -> posture class it shares its allow-list mode with.
_POSTURE_CLASS = {
    "process": "file",
    "file": "file",
    "network": "network",
    "capabilities": "capabilities",
}

PROTOCOLS = frozenset({"TCP", "UDP", "ICMP", "ICMPV6", "RAW"})
CAPABILITIES = frozenset(
    """chown dac_override dac_read_search fowner fsetid kill setgid setuid setpcap
    linux_immutable net_bind_service net_broadcast net_admin net_raw ipc_lock ipc_owner
    sys_module sys_rawio sys_chroot sys_ptrace sys_pacct sys_admin sys_boot sys_nice
    sys_resource sys_time sys_tty_config mknod lease audit_write audit_control setfcap
    mac_override mac_admin syslog wake_alarm block_suspend audit_read perfmon bpf
    checkpoint_restore""".split()
)


# --------------------------------------------------------------------------- #
# Errors
# --------------------------------------------------------------------------- #


class EventError(ValueError):
    """An event is malformed: the caller's input, named by line and field."""

    def __init__(self, reason: str, field: str = "", line: int | None = None) -> None:
        self.reason = reason
        self.field = field
        self.line = line
        super().__init__(reason, field, line)

    def at_line(self, line: int | None) -> EventError:
        return EventError(self.reason, self.field, line)

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line is not None else ""
        what = f"field '{self.field}': " if self.field else ""
        return f"{where}{what}{self.reason}"


class PolicyCompileError(ValueError):
    """A policy document cannot be read as a policy (it was never validated)."""


# --------------------------------------------------------------------------- #
# Events
# --------------------------------------------------------------------------- #


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {str: "a string", bool: "a boolean", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__
    )


def _absolute_path(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise EventError(f"must be an absolute path (got {_type_name(value)})", name)
    if not value.startswith("/"):
        raise EventError(f"must be an absolute path (got {value!r})", name)
    if "\x00" in value:
        raise EventError("must not contain NUL characters", name)
    path = posixpath.normpath(value)
    return "/" + path.lstrip("/")  # normpath keeps a leading "//"


def _optional_path(value: Any, name: str) -> str | None:
    return None if value is None else _absolute_path(value, name)


def _principal(value: Any, name: str) -> str | None:
    """A user or owner: a name or a numeric uid, compared as text."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise EventError(f"must be a user name or uid (got {_type_name(value)})", name)
    text = str(value)
    if not text:
        raise EventError("must not be empty", name)
    return text


def _protocol(value: Any) -> str:
    if not isinstance(value, str) or value.upper() not in PROTOCOLS:
        shown = repr(value) if isinstance(value, str) else _type_name(value)
        known = ", ".join(sorted(PROTOCOLS))
        raise EventError(f"must be one of {known} (got {shown})", "protocol")
    return value.upper()


def _capability_name(value: str) -> str:
    name = value.strip().lower()
    return name[4:] if name.startswith("cap_") else name


def _capability(value: Any) -> str:
    if not isinstance(value, str):
        raise EventError(f"must be a capability name (got {_type_name(value)})", "capability")
    name = _capability_name(value)
    if name not in CAPABILITIES:
        hint = difflib.get_close_matches(name, sorted(CAPABILITIES), n=1)
        suffix = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise EventError(f"unknown capability {value!r}{suffix}", "capability")
    return name


@dataclass(frozen=True, slots=True)
class Event:
    """Base of the four event types; ``Event.from_json`` reads any of them."""

    op: ClassVar[str] = ""

    @staticmethod
    def from_json(obj: Any, line: int | None = None) -> Event:
        """Read one event object (a line of an events file); raises ``EventError``."""
        try:
            return _event_from_json(obj)
        except EventError as exc:
            raise exc.at_line(line) from None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"op": self.op}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and not (f.name == "write" and value is False):
                out[f.name] = value
        return out

    def describe(self) -> str:
        raise NotImplementedError


def _by_source(source: str | None) -> str:
    return f" by {source}" if source else ""


def _as(owner: str | None, user: str | None) -> str:
    parts = []
    if user is not None:
        parts.append(f"user {user}")
    if owner is not None:
        parts.append(f"owner {owner}")
    return f" ({', '.join(parts)})" if parts else ""


@dataclass(frozen=True, slots=True)
class ExecEvent(Event):
    """``source`` executes ``path``; ``owner``/``user`` matter for ownerOnly rules."""

    op: ClassVar[str] = "exec"
    path: str
    source: str | None = None
    owner: str | None = None
    user: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", _absolute_path(self.path, "path"))
        object.__setattr__(self, "source", _optional_path(self.source, "source"))
        object.__setattr__(self, "owner", _principal(self.owner, "owner"))
        object.__setattr__(self, "user", _principal(self.user, "user"))

    def describe(self) -> str:
        return f"exec {self.path}{_by_source(self.source)}{_as(self.owner, self.user)}"


@dataclass(frozen=True, slots=True)
class OpenEvent(Event):
    """``source`` opens ``path`` for reading, or for writing with ``write``."""

    op: ClassVar[str] = "open"
    path: str
    source: str | None = None
    write: bool = False
    owner: str | None = None
    user: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", _absolute_path(self.path, "path"))
        object.__setattr__(self, "source", _optional_path(self.source, "source"))
        if not isinstance(self.write, bool):
            raise EventError(f"must be true or false (got {_type_name(self.write)})", "write")
        object.__setattr__(self, "owner", _principal(self.owner, "owner"))
        object.__setattr__(self, "user", _principal(self.user, "user"))

    def describe(self) -> str:
        mode = "write" if self.write else "read"
        return f"open {self.path} ({mode}){_by_source(self.source)}{_as(self.owner, self.user)}"


@dataclass(frozen=True, slots=True)
class NetEvent(Event):
    """``source`` opens a socket of ``protocol`` (TCP, UDP, ICMP, ICMPv6, RAW)."""

    op: ClassVar[str] = "net"
    protocol: str
    source: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "protocol", _protocol(self.protocol))
        object.__setattr__(self, "source", _optional_path(self.source, "source"))

    def describe(self) -> str:
        return f"net {self.protocol}{_by_source(self.source)}"


@dataclass(frozen=True, slots=True)
class CapEvent(Event):
    """``source`` uses the capability ``capability`` (``net_raw``, ``CAP_SYS_ADMIN``…)."""

    op: ClassVar[str] = "cap"
    capability: str
    source: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "capability", _capability(self.capability))
        object.__setattr__(self, "source", _optional_path(self.source, "source"))

    def describe(self) -> str:
        return f"cap {self.capability}{_by_source(self.source)}"


EVENT_TYPES: dict[str, type[Event]] = {
    cls.op: cls for cls in (ExecEvent, OpenEvent, NetEvent, CapEvent)
}
_REQUIRED = {"exec": "path", "open": "path", "net": "protocol", "cap": "capability"}


def _event_from_json(obj: Any) -> Event:
    if not isinstance(obj, dict):
        raise EventError(f"an event must be a JSON object (got {_type_name(obj)})")
    op = obj.get("op")
    if op is None:
        raise EventError("is required (exec, open, net or cap)", "op")
    if op not in EVENT_TYPES:
        raise EventError(f"must be exec, open, net or cap (got {op!r})", "op")
    cls = EVENT_TYPES[op]
    allowed = [f.name for f in fields(cls)]
    for key in obj:
        if key == "op":
            continue
        if key not in allowed:
            every = {name for c in EVENT_TYPES.values() for f in fields(c) for name in [f.name]}
            if key in every:
                raise EventError(f"does not apply to op '{op}'", str(key))
            hint = difflib.get_close_matches(str(key), allowed, n=1)
            suffix = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise EventError(f"unknown field{suffix}", str(key))
    required = _REQUIRED[op]
    if obj.get(required) is None:
        raise EventError(f"is required for op '{op}'", required)
    return cls(**{key: value for key, value in obj.items() if key != "op"})


# --------------------------------------------------------------------------- #
# Decisions
# --------------------------------------------------------------------------- #


@dataclass(frozen=True, slots=True)
class Decision:
    """What happens to one event and which policy said so.

    ``policy`` is the deciding policy's name, ``DefaultPosture``, or None when
    nothing matched (the event is allowed). ``rule`` names the deciding rule
    inside the policy (``spec.file.matchPaths[0]``), for people.
    """

    action: str
    policy: str | None = None
    severity: int | None = None
    tags: tuple[str, ...] = ()
    message: str | None = None
    rule: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "policy": self.policy,
            "severity": self.severity,
            "tags": list(self.tags),
            "message": self.message,
        }


NOTHING_MATCHED = Decision("Allow")


# --------------------------------------------------------------------------- #
# Rules
# --------------------------------------------------------------------------- #

# How specific a kind of match is: lower decides first among equal actions.
_KIND_RANK = {
    "path": 0,
    "protocol": 0,
    "capability": 0,
    "execname": 1,
    "dir": 2,
    "rdir": 3,
    "pattern": 4,
}


@dataclass(frozen=True, slots=True)
class _Rule:
    policy: str
    where: str  # spec.<section>.<list>[i]
    section: str  # process | file | network | capabilities
    kind: str  # path | execname | dir | rdir | pattern | protocol | capability
    target: str
    regex: re.Pattern[str] | None
    read_only: bool
    owner_only: bool
    sources: frozenset[str] | None  # None: any acting process
    action: str
    severity: int | None
    tags: tuple[str, ...]
    message: str | None
    rank: tuple[Any, ...] = field(compare=False)
    verdict: Decision = field(compare=False, default=Decision("Block"))

    def matches(self, event: Any) -> bool:
        """The resource and the source match (rule 2)."""
        if self.sources is not None and event.source not in self.sources:
            return False
        kind = self.kind
        if kind == "path":
            return event.path == self.target
        if kind == "dir":
            path = event.path
            return path + "/" == self.target or path[: path.rfind("/") + 1] == self.target
        if kind == "rdir":
            path = event.path
            return path.startswith(self.target) or path + "/" == self.target
        if kind == "pattern":
            assert self.regex is not None
            return self.regex.fullmatch(event.path) is not None
        if kind == "execname":
            return event.path[event.path.rfind("/") + 1 :] == self.target
        if kind == "protocol":
            return event.protocol == self.target
        return event.capability == self.target

    def permits(self, event: Any) -> bool:
        """What readOnly/ownerOnly leave to the event (rule 4)."""
        if self.read_only and getattr(event, "write", False):
            return False
        if self.owner_only:
            owner, user = event.owner, event.user
            return owner is not None and user is not None and owner == user
        return True

    def decision(self) -> Decision:
        return self.verdict


def glob_regex(pattern: str) -> re.Pattern[str]:
    """Compile a ``matchPatterns`` glob with AppArmor's meaning (rule 2)."""
    out: list[str] = []
    depth = 0
    i, n = 0, len(pattern)
    while i < n:
        char = pattern[i]
        if char == "*":
            if pattern.startswith("**", i):
                out.append(".*")
                i += 2
                continue
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            end = pattern.find("]", i + 2 if pattern.startswith("[^", i) else i + 1)
            if end < 0:
                out.append(re.escape(char))
            else:
                body = pattern[i + 1 : end]
                negate = body.startswith("^")
                body = body[1:] if negate else body
                escaped = "".join("\\" + c if c in "\\[]^" else c for c in body)
                out.append(f"[{'^' if negate else ''}{escaped}]")
                i = end + 1
                continue
        elif char == "{":
            depth += 1
            out.append("(?:")
        elif char == "}" and depth:
            depth -= 1
            out.append(")")
        elif char == "," and depth:
            out.append("|")
        else:
            out.append(re.escape(char))
        i += 1
    regex = "".join(out) + ")" * depth
    try:
        return re.compile(regex, re.DOTALL)
    except re.error:
        return re.compile(re.escape(pattern))


def _literal_prefix(pattern: str) -> tuple[str, str]:
    """The pattern's literal prefix split after its last '/': every match starts with it.

    ``/usr/bin/apt*`` gives ``("/usr/bin/", "apt")``: a path can match only if
    that directory is one of its parents and the rest of the path starts with
    ``apt``.
    """
    cut = min((i for i in (pattern.find(c) for c in "*?[{") if i >= 0), default=len(pattern))
    slash = pattern.rfind("/", 0, cut) + 1
    return pattern[:slash] or "/", pattern[slash:cut] if slash else ""


# --------------------------------------------------------------------------- #
# Compiling
# --------------------------------------------------------------------------- #

_LISTS = {
    "process": ("matchPaths", "matchDirectories", "matchPatterns"),
    "file": ("matchPaths", "matchDirectories", "matchPatterns"),
    "network": ("matchProtocols",),
    "capabilities": ("matchCapabilities",),
}


class _Reader:
    """Reads one policy document into ``_Rule``s, naming the field on a bad shape."""

    def __init__(self, name: str, kind: str, spec: Mapping[str, Any]) -> None:
        self.name = name
        self.host = kind == HOST_POLICY_KIND
        self.spec = spec
        self.rules: list[_Rule] = []
        self.ignored: list[str] = []

    def fail(self, where: str, reason: str) -> PolicyCompileError:
        return PolicyCompileError(f"policy {self.name!r}: {where}: {reason}")

    def _get(self, mapping: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
        value = mapping.get(key)
        if value is not None and not isinstance(value, kind):
            raise self.fail(f"{where}.{key}", f"must be {kind.__name__} (got {value!r})")
        return value

    def _inherited(self, layers: list[tuple[Mapping[str, Any], str]]) -> dict[str, Any]:
        values: dict[str, Any] = {"action": "Block", "severity": None, "tags": (), "message": None}
        for layer, where in layers:  # spec, section, rule: the last one set wins
            action = self._get(layer, "action", str, where)
            if action is not None:
                if action not in ACTIONS:
                    raise self.fail(f"{where}.action", f"must be one of {', '.join(ACTIONS)}")
                values["action"] = action
            severity = self._get(layer, "severity", int, where)
            if severity is not None:
                values["severity"] = severity
            tags = self._get(layer, "tags", list, where)
            if tags is not None:
                values["tags"] = tuple(str(tag) for tag in tags)
            message = self._get(layer, "message", str, where)
            if message is not None:
                values["message"] = message
        return values

    def read(self) -> None:
        spec_layer = (self.spec, "spec")
        for section in _LISTS:
            body = self._get(self.spec, section, dict, "spec")
            if not body:
                continue
            section_where = f"spec.{section}"
            for list_name in _LISTS[section]:
                entries = self._get(body, list_name, list, section_where)
                for i, entry in enumerate(entries or ()):
                    where = f"{section_where}.{list_name}[{i}]"
                    if not isinstance(entry, dict):
                        raise self.fail(where, "must be a mapping")
                    values = self._inherited([spec_layer, (body, section_where), (entry, where)])
                    self._rule(section, list_name, entry, where, values)

    def _sources(self, entry: Mapping[str, Any], where: str) -> frozenset[str] | None:
        sources = self._get(entry, "fromSource", list, where)
        if not sources:
            return None
        paths = set()
        for i, source in enumerate(sources):
            path = source.get("path") if isinstance(source, dict) else None
            if not isinstance(path, str) or not path.startswith("/"):
                raise self.fail(f"{where}.fromSource[{i}].path", "must be an absolute path")
            paths.add(_absolute_path(path, "fromSource"))
        return frozenset(paths)

    def _rule(
        self,
        section: str,
        list_name: str,
        entry: Mapping[str, Any],
        where: str,
        values: dict[str, Any],
    ) -> None:
        sources = self._sources(entry, where)
        if values["action"] == "Allow" and self.host and sources is None:
            self.ignored.append(
                f"{self.name}: {where}: Allow without fromSource is ignored in a "
                f"{HOST_POLICY_KIND} (KubeArmor honours host Allow rules only with fromSource)"
            )
            return
        regex = None
        if list_name == "matchPaths":
            if entry.get("path") is not None:
                kind, target = "path", self._get(entry, "path", str, where)
                target = _absolute_path(target, "path") if target.startswith("/") else target
            else:
                kind, target = "execname", self._get(entry, "execname", str, where) or ""
        elif list_name == "matchDirectories":
            target = self._get(entry, "dir", str, where) or ""
            if not target.startswith("/"):
                raise self.fail(f"{where}.dir", "must be an absolute directory")
            target = target if target.endswith("/") else target + "/"
            kind = "rdir" if entry.get("recursive") is True else "dir"
        elif list_name == "matchPatterns":
            kind, target = "pattern", self._get(entry, "pattern", str, where) or ""
            regex = glob_regex(target)
        elif list_name == "matchProtocols":
            kind = "protocol"
            target = str(self._get(entry, "protocol", str, where) or "").upper()
        else:
            kind = "capability"
            target = _capability_name(str(self._get(entry, "capability", str, where) or ""))
            if target not in CAPABILITIES:
                self.ignored.append(f"{self.name}: {where}: unknown capability never matches")
        length = -len(target)
        rank = (0 if sources else 1, _KIND_RANK[kind], length, self.name, len(self.rules))
        self.rules.append(
            _Rule(
                policy=self.name,
                where=where,
                section=section,
                kind=kind,
                target=target,
                regex=regex,
                read_only=section == "file" and entry.get("readOnly") is True,
                owner_only=section in ("process", "file") and entry.get("ownerOnly") is True,
                sources=sources,
                action=values["action"],
                severity=values["severity"],
                tags=values["tags"],
                message=values["message"],
                rank=rank,
                verdict=Decision(
                    values["action"],
                    self.name,
                    values["severity"],
                    values["tags"],
                    values["message"],
                    where,
                ),
            )
        )


def _name_kind_spec(policy: Policy | Mapping[str, Any]) -> tuple[str, str, Mapping[str, Any]]:
    if isinstance(policy, Policy):
        return policy.name, policy.kind, policy.document.get("spec") or {}
    if not isinstance(policy, Mapping):
        raise PolicyCompileError(
            f"expected a Policy or a policy document, got {type(policy).__name__}"
        )
    metadata = policy.get("metadata")
    name = metadata.get("name") if isinstance(metadata, Mapping) else None
    if not isinstance(name, str):
        raise PolicyCompileError("policy document without a metadata.name string")
    spec = policy.get("spec")
    if not isinstance(spec, Mapping):
        raise PolicyCompileError(f"policy {name!r}: spec: must be a mapping")
    return name, str(policy.get("kind", HOST_POLICY_KIND)), spec


def _postures(default_posture: str | Mapping[str, str]) -> dict[str, str]:
    if isinstance(default_posture, str):
        chosen = dict.fromkeys(POSTURE_CLASSES, default_posture)
    else:
        unknown = set(default_posture) - set(POSTURE_CLASSES)
        if unknown:
            raise ValueError(
                f"default posture for unknown class(es) {sorted(unknown)}: "
                f"use {', '.join(POSTURE_CLASSES)}"
            )
        chosen = {klass: default_posture.get(klass, "audit") for klass in POSTURE_CLASSES}
    for klass, posture in chosen.items():
        if posture not in POSTURES:
            raise ValueError(
                f"default posture of {klass}: must be audit or block (got {posture!r})"
            )
    return chosen


def compile_policies(
    policies: Iterable[Policy | Mapping[str, Any]],
    default_posture: str | Mapping[str, str] = "audit",
) -> CompiledPolicies:
    """Index ``policies`` (typed ``Policy``s or plain documents as bundles carry them).

    ``default_posture`` is ``"audit"`` or ``"block"`` for every class, or a
    mapping from class (``file``, ``network``, ``capabilities``) to posture;
    classes it leaves out are ``audit``.
    """
    postures = _postures(default_posture)
    rules: list[_Rule] = []
    ignored: list[str] = []
    for policy in policies:
        name, kind, spec = _name_kind_spec(policy)
        reader = _Reader(name, kind, spec)
        try:
            reader.read()
        except EventError as exc:  # a malformed path in an unvalidated document
            raise reader.fail("spec", str(exc)) from None
        rules += reader.rules
        ignored += reader.ignored
    return CompiledPolicies(rules, postures, ignored)


class CompiledPolicies:
    """Policies indexed for ``evaluate``; build with ``compile_policies``."""

    def __init__(self, rules: list[_Rule], postures: dict[str, str], ignored: list[str]) -> None:
        self.rules: tuple[_Rule, ...] = tuple(rules)
        self.postures = dict(postures)
        self.ignored: tuple[str, ...] = tuple(ignored)

        exact: dict[str, dict[str, list[_Rule]]] = {"process": {}, "file": {}}
        names: dict[str, list[_Rule]] = {}
        prefixes: dict[str, dict[str, list[_Rule]]] = {"process": {}, "file": {}}
        # section -> directory -> literal rest of the name -> pattern rules
        patterns: dict[str, dict[str, dict[str, list[_Rule]]]] = {"process": {}, "file": {}}
        by_value: dict[str, dict[str, list[_Rule]]] = {"network": {}, "capabilities": {}}
        allow_any = dict.fromkeys(POSTURE_CLASSES, False)
        allow_sources: dict[str, set[str]] = {klass: set() for klass in POSTURE_CLASSES}
        for rule in self.rules:
            if rule.kind == "path":
                bucket = exact[rule.section].setdefault(rule.target, [])
            elif rule.kind == "execname":
                bucket = names.setdefault(rule.target, [])
            elif rule.kind in ("dir", "rdir"):
                bucket = prefixes[rule.section].setdefault(rule.target, [])
            elif rule.kind == "pattern":
                directory, rest = _literal_prefix(rule.target)
                by_rest = patterns[rule.section].setdefault(directory, {})
                bucket = by_rest.setdefault(rest, [])
            else:
                bucket = by_value[rule.section].setdefault(rule.target, [])
            bucket.append(rule)
            if rule.action == "Allow":
                klass = _POSTURE_CLASS[rule.section]
                if rule.sources is None:
                    allow_any[klass] = True
                else:
                    allow_sources[klass] |= rule.sources

        def frozen(index: dict[str, list[_Rule]]) -> dict[str, tuple[_Rule, ...]]:
            return {key: tuple(bucket) for key, bucket in index.items()}

        self._exact = {section: frozen(index) for section, index in exact.items()}
        self._execnames = frozen(names)
        self._prefixes = {section: frozen(index) for section, index in prefixes.items()}
        # directory -> (lengths of the literal rests, literal rest -> rules)
        self._patterns = {
            section: {
                directory: (tuple(sorted({len(rest) for rest in by_rest})), frozen(by_rest))
                for directory, by_rest in index.items()
            }
            for section, index in patterns.items()
        }
        self._by_value = {section: frozen(index) for section, index in by_value.items()}
        self._allow_any = allow_any
        self._allow_sources = {klass: frozenset(s) for klass, s in allow_sources.items()}

    def __len__(self) -> int:
        return len(self.rules)

    # -- candidates --------------------------------------------------------

    def _candidates(self, event: Event) -> list[_Rule]:
        """Every rule that can match ``event``: index look-ups, never a full scan."""
        if isinstance(event, ExecEvent | OpenEvent):
            section = "process" if isinstance(event, ExecEvent) else "file"
            path = event.path
            found: list[_Rule] = []
            bucket = self._exact[section].get(path)
            if bucket:
                found += bucket
            if section == "process":
                bucket = self._execnames.get(path[path.rfind("/") + 1 :])
                if bucket:
                    found += bucket
            prefixes = self._prefixes[section]
            patterns = self._patterns[section]
            if prefixes:
                bucket = prefixes.get(path + "/")  # the directory itself
                if bucket:
                    found += bucket
            if prefixes or patterns:
                end = len(path)
                while end > 0:  # each parent directory, deepest first
                    end = path.rfind("/", 0, end)
                    directory = path[: end + 1]
                    bucket = prefixes.get(directory)
                    if bucket:
                        found += bucket
                    entry = patterns.get(directory)
                    if entry:
                        lengths, by_rest = entry
                        rest = path[end + 1 :]
                        for length in lengths:
                            bucket = by_rest.get(rest[:length])
                            if bucket:
                                found += bucket
            return found
        if isinstance(event, NetEvent):
            return list(self._by_value["network"].get(event.protocol, ()))
        if isinstance(event, CapEvent):
            return list(self._by_value["capabilities"].get(event.capability, ()))
        raise TypeError(f"not an event: {type(event).__name__}")

    def _scan(self, event: Event) -> list[_Rule]:
        section = _SECTION_OF.get(type(event))
        if section is None:
            raise TypeError(f"not an event: {type(event).__name__}")
        return [rule for rule in self.rules if rule.section == section]

    # -- deciding ----------------------------------------------------------

    def evaluate(self, event: Event) -> Decision:
        """The decision for ``event`` (rules 1–7 at the top of this module)."""
        return self._decide(event, self._candidates(event))

    def evaluate_by_scan(self, event: Event) -> Decision:
        """The same decision, checking every rule: the reference for tests and benchmarks."""
        return self._decide(event, self._scan(event))

    def in_allow_list_mode(self, event: Event) -> bool:
        klass = _POSTURE_CLASS[_SECTION_OF[type(event)]]
        return self._allow_any[klass] or event.source in self._allow_sources[klass]

    def _decide(self, event: Event, candidates: list[_Rule]) -> Decision:
        block: _Rule | None = None
        audit: _Rule | None = None
        allow: _Rule | None = None
        for rule in candidates:
            if not rule.matches(event):
                continue
            if rule.action == "Allow":
                if rule.permits(event) and (allow is None or rule.rank < allow.rank):
                    allow = rule
            elif rule.read_only or rule.owner_only:
                if rule.permits(event):
                    continue
                if rule.action == "Block":
                    if block is None or rule.rank < block.rank:
                        block = rule
                elif audit is None or rule.rank < audit.rank:
                    audit = rule
            elif rule.action == "Block":
                if block is None or rule.rank < block.rank:
                    block = rule
            elif audit is None or rule.rank < audit.rank:
                audit = rule
        if block is not None:
            return block.decision()
        if allow is None and self.in_allow_list_mode(event):
            klass = _POSTURE_CLASS[_SECTION_OF[type(event)]]
            posture = self.postures[klass]
            if posture == "block" or audit is None:
                return Decision(
                    "Block" if posture == "block" else "Audit",
                    DEFAULT_POSTURE,
                    message=f"not allowed by any Allow rule; {klass} default posture is {posture}",
                )
        if audit is not None:
            return audit.decision()
        if allow is not None:
            return allow.decision()
        return NOTHING_MATCHED


_SECTION_OF: dict[type, str] = {
    ExecEvent: "process",
    OpenEvent: "file",
    NetEvent: "network",
    CapEvent: "capabilities",
}
