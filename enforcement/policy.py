"""Parse and validate KubeArmor policy YAML before anything is published.

The KubeArmor daemon does no validation in non-Kubernetes mode (unknown keys
are dropped, an empty action means Block), so every policy is checked here and
refused with a message naming the file, the document and the field.

Structure, meant to grow towards the full schema:

* ``_UniqueKeyLoader`` — a ``yaml.SafeLoader`` that records duplicate mapping
  keys (with their field path) and turns stray ``ValueError``s raised while
  constructing values into ordinary YAML errors.
* ``SECTIONS`` / ``RuleShape`` / ``SectionShape`` — the key tables of the
  policy language (KubeArmor's CRD types, as in the shared interface notes).
* ``VALUE_CHECKS`` — per-key value checks applied wherever the key appears in
  the spec, a section, a rule or a ``fromSource`` entry.
* ``_DocumentValidator`` — the visitor walking one document with those tables.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.reader import ReaderError

from .selector import HOSTNAME_REGEX_LABEL, hostname_regex

__all__ = [
    "API_VERSION",
    "HOST_POLICY_KIND",
    "CONTAINER_POLICY_KIND",
    "ACTIONS",
    "Policy",
    "PolicyValidationError",
    "Problem",
    "load_policy_files",
    "parse_policies",
]

API_VERSION = "security.kubearmor.com/v1"
HOST_POLICY_KIND = "KubeArmorHostPolicy"
CONTAINER_POLICY_KIND = "KubeArmorPolicy"
KINDS = (HOST_POLICY_KIND, CONTAINER_POLICY_KIND)
ACTIONS = ("Allow", "Audit", "Block")
SEVERITY_MIN, SEVERITY_MAX = 1, 10

# Bounds that keep hostile input (alias bombs, deep nesting) cheap to refuse.
MAX_VALUES = 100_000
MAX_DEPTH = 64
#: Largest policy text, refused by its size before parsing: no bigger than a
#: bundle (transport.wire.MAX_BODY_BYTES). PyYAML's pure-Python parser takes
#: ~5-20 s for 1 MiB of the costliest shapes (200,000 duplicate keys: ~18 s on
#: two loaded cores), so this also bounds the time one file can take.
MAX_TEXT_BYTES = 1024 * 1024
#: Integers the daemon can take (it reads policies as JSON into Go int64s);
#: beyond these a value would also need a CBOR tag, which no device accepts.
MIN_INT, MAX_INT = -(2**63), 2**63 - 1

_DNS1123_LABEL = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
_DNS1123_SUBDOMAIN = re.compile(rf"{_DNS1123_LABEL}(?:\.{_DNS1123_LABEL})*")
_DNS1123_MAX = 253


# --------------------------------------------------------------------------- #
# Public types
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Problem:
    """One reason a policy file is refused."""

    source: str
    document: int  # 1-based index of the YAML document in the file; 0 = the file itself
    field: str  # dotted path with [i] indexes, "" for the whole document
    reason: str

    def __str__(self) -> str:
        if self.field:
            return f"{self.source}: document {self.document}: {self.field}: {self.reason}"
        return f"{self.source}: document {self.document}: {self.reason}"


class PolicyValidationError(Exception):
    """Raised with every problem found; ``str()`` lists one problem a line."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems: list[Problem] = list(problems)
        super().__init__(self.problems)

    def __str__(self) -> str:
        return "\n".join(str(problem) for problem in self.problems)


@dataclass(frozen=True)
class Policy:
    """A validated policy document. ``document`` is the plain parsed YAML: read-only."""

    name: str
    kind: str
    match_labels: tuple[tuple[str, str], ...]
    document: dict[str, Any] = field(hash=False, repr=False)

    @property
    def selector(self) -> dict[str, str]:
        return dict(self.match_labels)


# --------------------------------------------------------------------------- #
# Key tables
# --------------------------------------------------------------------------- #

Check = Callable[[Any], str | None]
"""A value check: returns the reason the value is refused, or None."""

COMMON_KEYS = frozenset({"severity", "tags", "message", "action"})
# Syscall rules are audit-only: KubeArmor has no action for them.
AUDIT_ONLY_KEYS = frozenset({"severity", "tags", "message"})
SOURCE_KEYS = frozenset({"path"})
SYSCALL_SOURCE_KEYS = frozenset({"path", "dir", "recursive"})


@dataclass(frozen=True)
class RuleShape:
    """The keys one rule of a ``match*`` list may have."""

    keys: frozenset[str]
    required_one_of: tuple[str, ...] = ()
    # KubeArmorHostPolicy network/capabilities rules apply only to a source binary.
    host_needs_source: bool = False
    source_keys: frozenset[str] = SOURCE_KEYS
    common_keys: frozenset[str] = COMMON_KEYS
    # Value checks that replace VALUE_CHECKS for this rule's own keys.
    checks: Mapping[str, Check] = field(default_factory=dict)

    @property
    def allowed(self) -> frozenset[str]:
        return self.keys | self.common_keys


@dataclass(frozen=True)
class SectionShape:
    """A spec section (process, file, …): its rule lists and section-wide keys."""

    rules: Mapping[str, RuleShape]
    common_keys: frozenset[str] = COMMON_KEYS
    # False for sections whose key table the interface doc does not give yet.
    checked: bool = True

    @property
    def allowed(self) -> frozenset[str]:
        return frozenset(self.rules) | self.common_keys


def _rule(*keys: str, **options: Any) -> RuleShape:
    return RuleShape(keys=frozenset(keys), **options)


# Value checks --------------------------------------------------------------


def _check_action(value: Any) -> str | None:
    if isinstance(value, str) and value in ACTIONS:
        return None
    allowed = ", ".join(ACTIONS)
    hint = _suggest(value, ACTIONS) if isinstance(value, str) else None
    suffix = f" (did you mean '{hint}'?)" if hint else ""
    return f"must be one of {allowed} (got {value!r}){suffix}"


def _check_severity(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        if SEVERITY_MIN <= value <= SEVERITY_MAX:
            return None
    return f"must be an integer from {SEVERITY_MIN} to {SEVERITY_MAX} (got {value!r})"


def _check_file_path(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"must be a string (got {_type_name(value)})"
    if not value.startswith("/"):
        return "must be absolute"
    if value.endswith("/"):
        return "must not end with '/' (directories go in 'dir' of matchDirectories)"
    return None


def _check_directory(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"must be a string (got {_type_name(value)})"
    if not value.startswith("/"):
        return "must be absolute"
    if not value.endswith("/"):
        return "must end with '/'"
    return None


def _check_file_or_directory(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"must be a string (got {_type_name(value)})"
    if not value.startswith("/"):
        return "must be absolute"
    return None


VALUE_CHECKS: dict[str, Check] = {
    "action": _check_action,
    "severity": _check_severity,
    "path": _check_file_path,
    "dir": _check_directory,
}

_SYSCALL_RULE = {"common_keys": AUDIT_ONLY_KEYS, "source_keys": SYSCALL_SOURCE_KEYS}

SECTIONS: dict[str, SectionShape] = {
    "process": SectionShape(
        {
            "matchPaths": _rule(
                "path", "execname", "ownerOnly", "fromSource", required_one_of=("path", "execname")
            ),
            "matchDirectories": _rule(
                "dir", "recursive", "ownerOnly", "fromSource", required_one_of=("dir",)
            ),
            "matchPatterns": _rule("pattern", "ownerOnly", required_one_of=("pattern",)),
        }
    ),
    "file": SectionShape(
        {
            "matchPaths": _rule(
                "path", "readOnly", "ownerOnly", "fromSource", required_one_of=("path",)
            ),
            "matchDirectories": _rule(
                "dir", "recursive", "readOnly", "ownerOnly", "fromSource", required_one_of=("dir",)
            ),
            "matchPatterns": _rule(
                "pattern", "readOnly", "ownerOnly", required_one_of=("pattern",)
            ),
        }
    ),
    "network": SectionShape(
        {
            "matchProtocols": _rule(
                "protocol", "fromSource", required_one_of=("protocol",), host_needs_source=True
            ),
        }
    ),
    "capabilities": SectionShape(
        {
            "matchCapabilities": _rule(
                "capability", "fromSource", required_one_of=("capability",), host_needs_source=True
            ),
        }
    ),
    "syscalls": SectionShape(
        {
            "matchSyscalls": _rule("syscall", "fromSource", **_SYSCALL_RULE),
            # A syscall path may name a file or a directory (KubeArmor's CRD allows both).
            "matchPaths": _rule(
                "syscall",
                "path",
                "recursive",
                "fromSource",
                checks={"path": _check_file_or_directory},
                **_SYSCALL_RULE,
            ),
        },
        common_keys=AUDIT_ONLY_KEYS,
    ),
    # The interface doc lists the section but not its rules: only its shape is checked.
    "device": SectionShape({}, checked=False),
}

SELECTOR_KEY = {HOST_POLICY_KIND: "nodeSelector", CONTAINER_POLICY_KIND: "selector"}
SELECTOR_KEYS = {
    HOST_POLICY_KIND: frozenset({"matchLabels"}),
    CONTAINER_POLICY_KIND: frozenset({"matchLabels", "matchExpressions"}),
}


# --------------------------------------------------------------------------- #
# YAML loading
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class _DuplicateKey:
    path: str
    key: str
    first_line: int
    line: int


_NO_KEY = object()


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that records duplicate mapping keys instead of keeping the last one.

    YAML says keys are unique, PyYAML silently keeps the last value: for a policy
    that can turn ``action: Audit`` into ``action: Block`` unnoticed. The composed
    node tree of each document is walked before it is constructed, so every
    duplicate is reported with its field path (``duplicate_keys``).
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicate_keys: list[_DuplicateKey] = []

    def construct_document(self, node: Node) -> Any:
        self.duplicate_keys = self._find_duplicate_keys(node)
        return super().construct_document(node)

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        # Some constructors raise plain ValueErrors (``2024-13-45`` as a date,
        # ``!!int abc``): report them like every other YAML error, with a line.
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, TypeError, OverflowError) as exc:
            raise ConstructorError(
                None, None, f"cannot read {node.tag} value: {exc}", node.start_mark
            ) from exc

    def construct_yaml_int(self, node: ScalarNode) -> int:
        # ``0x`` and 4,000 digits is a valid YAML int whose repr() raises
        # ValueError; refuse it here, with a line, like any other bad value.
        value = super().construct_yaml_int(node)
        if not MIN_INT <= value <= MAX_INT:
            raise ValueError("integer out of the 64-bit range")
        return value

    def _key_of(self, node: Node) -> Any:
        """The constructed value of a scalar key node, or _NO_KEY when it is not one."""
        if not isinstance(node, ScalarNode) or node.tag == "tag:yaml.org,2002:merge":
            return _NO_KEY
        try:
            key = self.construct_object(node)
            hash(key)
        except (yaml.YAMLError, TypeError):
            # Construction reports it properly later; undo the half-done bookkeeping.
            self.recursive_objects.pop(node, None)
            return _NO_KEY
        return key

    def _find_duplicate_keys(self, root: Node) -> list[_DuplicateKey]:
        found: list[_DuplicateKey] = []
        visited: set[int] = set()
        stack: list[tuple[Node, str]] = [(root, "")]
        while stack:
            node, path = stack.pop()
            if id(node) in visited:
                continue
            visited.add(id(node))
            if isinstance(node, MappingNode):
                first_seen: dict[Any, Node] = {}
                children = []
                for key_node, value_node in node.value:
                    key = self._key_of(key_node)
                    label = str(key_node.value) if key is _NO_KEY else str(key)
                    child = _join(path, label)
                    if key is not _NO_KEY:
                        if key in first_seen:
                            found.append(
                                _DuplicateKey(
                                    path=child,
                                    key=label,
                                    first_line=first_seen[key].start_mark.line + 1,
                                    line=key_node.start_mark.line + 1,
                                )
                            )
                        else:
                            first_seen[key] = key_node
                    children.append((value_node, child))
                stack.extend(reversed(children))
            elif isinstance(node, SequenceNode):
                stack.extend(
                    (item, _index(path, i)) for i, item in reversed(list(enumerate(node.value)))
                )
        found.sort(key=lambda dup: dup.line)
        return found


def _yaml_error_reason(exc: yaml.YAMLError, text: str) -> str:
    mark = getattr(exc, "problem_mark", None)
    if isinstance(exc, yaml.MarkedYAMLError) and mark is not None:
        problem = exc.problem or "syntax error"
        reason = f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}"
        context_mark = exc.context_mark
        if exc.context and context_mark is not None:
            reason += f" ({exc.context} started at line {context_mark.line + 1})"
        elif exc.context:
            reason += f" ({exc.context})"
        return reason
    if isinstance(exc, ReaderError):
        line = text.count("\n", 0, exc.position) + 1 if isinstance(text, str) else "?"
        char = exc.character
        shown = f"#x{char:04x}" if isinstance(char, int) else repr(char)
        return f"invalid YAML at line {line}: unacceptable character {shown}"
    return f"invalid YAML: {exc}"


@dataclass
class _Document:
    index: int
    data: Any
    duplicate_keys: list[_DuplicateKey]


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _UniqueKeyLoader.construct_yaml_int)


def _size_problem(text: str | bytes, source: str) -> Problem | None:
    """A problem if ``text`` is longer than MAX_TEXT_BYTES in UTF-8, without parsing it."""
    if isinstance(text, str) and MAX_TEXT_BYTES // 4 < len(text) <= MAX_TEXT_BYTES:
        size = len(text.encode("utf-8", "surrogatepass"))
    else:
        size = len(text)  # a character takes at least one byte
    if size <= MAX_TEXT_BYTES:
        return None
    return Problem(source, 0, "", f"too large: more than {MAX_TEXT_BYTES} bytes of YAML")


def _load_documents(text: str, source: str) -> tuple[list[_Document], list[Problem]]:
    """Every non-empty document of ``text``; a YAML error ends the stream."""
    too_large = _size_problem(text, source)
    if too_large is not None:
        return [], [too_large]
    documents: list[_Document] = []
    index = 0
    loader: _UniqueKeyLoader | None = None
    try:
        loader = _UniqueKeyLoader(text)
        while True:
            index += 1
            if not loader.check_node():
                break
            data = loader.construct_document(loader.get_node())
            if data is not None:
                documents.append(_Document(index, data, loader.duplicate_keys))
    except yaml.YAMLError as exc:
        return documents, [Problem(source, index, "", _yaml_error_reason(exc, text))]
    except RecursionError:
        reason = "invalid YAML: nested too deeply to read"
        return documents, [Problem(source, index, "", reason)]
    finally:
        if loader is not None:
            loader.dispose()
    return documents, []


# --------------------------------------------------------------------------- #
# Validation
# --------------------------------------------------------------------------- #


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _index(path: str, i: int) -> str:
    return f"{path}[{i}]"


def _type_name(value: Any) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "nothing"
    return names.get(type(value), type(value).__name__)


def _suggest(word: str, candidates: Iterable[str]) -> str | None:
    candidates = sorted(candidates)
    for candidate in candidates:
        if candidate.lower() == word.lower():
            return candidate
    matches = difflib.get_close_matches(word, candidates, n=1)
    return matches[0] if matches else None


def _unknown_key_reason(key: str, allowed: frozenset[str]) -> str:
    if key == "action" and AUDIT_ONLY_KEYS <= allowed:
        # Only syscall sections and rules take severity/tags/message but no action.
        return "unknown key 'action': syscall rules only audit, they take no action"
    hint = _suggest(key, allowed)
    suffix = f" (did you mean '{hint}'?)" if hint else ""
    return f"unknown key '{key}'{suffix}"


class _Fatal(Exception):
    """The document cannot be walked safely (cycle, alias bomb, too deep)."""


class _DocumentValidator:
    """Walks one parsed document and collects ``(field, reason)`` pairs."""

    def __init__(self) -> None:
        self.problems: list[tuple[str, str]] = []
        self._values = 0

    def report(self, path: str, reason: str) -> None:
        self.problems.append((path, reason))

    # -- whole document -----------------------------------------------------

    def validate(self, doc: Any) -> None:
        if not isinstance(doc, dict):
            self.report("", f"must be a mapping (a policy document), got {_type_name(doc)}")
            return
        try:
            self._plain_json(doc, "", 0, set())
        except _Fatal as exc:
            self.report(exc.args[0], exc.args[1])
            return

        api_version = self._required(doc, "apiVersion", "")
        if api_version is not None and api_version != API_VERSION:
            self.report("apiVersion", f"must be '{API_VERSION}' (got {api_version!r})")

        kind = self._required(doc, "kind", "")
        if kind is not None and kind not in KINDS:
            self.report("kind", f"must be one of {', '.join(KINDS)} (got {kind!r})")
        policy_kind = kind if kind in KINDS else HOST_POLICY_KIND

        metadata = self._required(doc, "metadata", "")
        if metadata is not None and self._mapping(metadata, "metadata"):
            self._name(metadata)

        spec = self._required(doc, "spec", "")
        if spec is not None and self._mapping(spec, "spec"):
            self._spec(spec, policy_kind)

    def _plain_json(self, value: Any, path: str, depth: int, ancestors: set[int]) -> None:
        """Refuse what JSON cannot carry: the daemon receives the policy as JSON."""
        self._values += 1
        if self._values > MAX_VALUES:
            raise _Fatal("", f"too large: more than {MAX_VALUES} values after expanding aliases")
        if depth > MAX_DEPTH:
            raise _Fatal(path, f"nested more than {MAX_DEPTH} levels deep")
        if isinstance(value, dict | list):
            if id(value) in ancestors:
                raise _Fatal(path, "refers to itself (recursive YAML alias)")
            ancestors.add(id(value))
            if isinstance(value, dict):
                for key, item in value.items():
                    child = _join(path, str(key))
                    if not isinstance(key, str):
                        self.report(child, f"key {key!r} must be a string (quote it)")
                    self._plain_json(item, child, depth + 1, ancestors)
            else:
                for i, item in enumerate(value):
                    self._plain_json(item, _index(path, i), depth + 1, ancestors)
            ancestors.discard(id(value))
        elif isinstance(value, float) and not math.isfinite(value):
            self.report(path, f"must be a finite number (got {value!r})")
        elif value is not None and not isinstance(value, str | int | float | bool):
            self.report(
                path,
                f"must be a plain JSON value, got {type(value).__name__} "
                "(quote it if it is meant as text)",
            )

    # -- helpers -----------------------------------------------------------

    def _required(self, mapping: dict[str, Any], key: str, path: str) -> Any:
        if key not in mapping or mapping[key] is None:
            self.report(_join(path, key), "is required")
            return None
        return mapping[key]

    def _mapping(self, value: Any, path: str) -> bool:
        if isinstance(value, dict):
            return True
        self.report(path, f"must be a mapping (got {_type_name(value)})")
        return False

    def _list(self, value: Any, path: str) -> bool:
        if isinstance(value, list):
            return True
        self.report(path, f"must be a list (got {_type_name(value)})")
        return False

    def _keys(
        self,
        mapping: dict[Any, Any],
        allowed: frozenset[str],
        path: str,
        overrides: Mapping[str, Check] | None = None,
    ) -> None:
        """Refuse unknown keys, then run the value checks of the known ones."""
        for key, value in mapping.items():
            if not isinstance(key, str):
                continue  # reported by _plain_json
            if key not in allowed:
                self.report(_join(path, key), _unknown_key_reason(key, allowed))
                continue
            check = (overrides or {}).get(key) or VALUE_CHECKS.get(key)
            if check is None:
                continue
            reason = check(value)
            if reason is not None:
                self.report(_join(path, key), reason)

    # -- metadata ----------------------------------------------------------

    def _name(self, metadata: dict[str, Any]) -> None:
        name = self._required(metadata, "name", "metadata")
        if name is None:
            return
        if not isinstance(name, str):
            self.report("metadata.name", f"must be a string (got {_type_name(name)})")
        elif len(name) > _DNS1123_MAX:
            self.report("metadata.name", f"must be at most {_DNS1123_MAX} characters")
        elif not _DNS1123_SUBDOMAIN.fullmatch(name):
            self.report(
                "metadata.name",
                f"{name!r} is not a DNS-1123 name: use lowercase letters, digits, '-' and '.',"
                " starting and ending with a letter or digit",
            )

    # -- spec --------------------------------------------------------------

    def _spec(self, spec: dict[Any, Any], kind: str) -> None:
        selector_key = SELECTOR_KEY[kind]
        self._keys(spec, frozenset({selector_key, *SECTIONS, *COMMON_KEYS}), "spec")

        selector = self._required(spec, selector_key, "spec")
        selector_path = f"spec.{selector_key}"
        if selector is not None and self._mapping(selector, selector_path):
            self._keys(selector, SELECTOR_KEYS[kind], selector_path)
            labels = self._required(selector, "matchLabels", selector_path)
            if labels is not None:
                self._match_labels(labels, f"{selector_path}.matchLabels")

        for name, shape in SECTIONS.items():
            if name in spec:
                self._section(spec[name], f"spec.{name}", name, shape, kind)

    def _match_labels(self, labels: Any, path: str) -> None:
        if not isinstance(labels, dict):
            self.report(path, f"must be a mapping of label to value (got {_type_name(labels)})")
            return
        if not labels:
            self.report(path, "must not be empty: an empty selector never matches any device")
            return
        for key, value in labels.items():
            if not isinstance(key, str):
                continue  # reported by _plain_json
            if not key:
                self.report(path, "label keys must not be empty")
                continue
            if not isinstance(value, str):
                self.report(
                    _join(path, key), f"must be a string (got {_type_name(value)}; quote it)"
                )
            elif key == HOSTNAME_REGEX_LABEL:
                try:
                    hostname_regex(value)
                except re.error as exc:
                    self.report(_join(path, key), f"is not a valid regular expression: {exc}")

    def _section(self, section: Any, path: str, name: str, shape: SectionShape, kind: str) -> None:
        if not self._mapping(section, path) or not shape.checked:
            return
        self._keys(section, shape.allowed, path)
        for list_name, rule_shape in shape.rules.items():
            if list_name not in section:
                continue
            rules = section[list_name]
            list_path = _join(path, list_name)
            if not self._list(rules, list_path):
                continue
            for i, rule in enumerate(rules):
                self._rule(rule, _index(list_path, i), name, rule_shape, kind)

    def _rule(self, rule: Any, path: str, section: str, shape: RuleShape, kind: str) -> None:
        if not self._mapping(rule, path):
            return
        self._keys(rule, shape.allowed, path, shape.checks)

        if shape.required_one_of and not any(key in rule for key in shape.required_one_of):
            if len(shape.required_one_of) == 1:
                self.report(_join(path, shape.required_one_of[0]), "is required")
            else:
                names = " or ".join(f"'{key}'" for key in shape.required_one_of)
                self.report(path, f"needs {names}")

        source_path = _join(path, "fromSource")
        if "fromSource" in rule and "fromSource" in shape.keys:
            self._sources(rule["fromSource"], source_path, shape, kind)
        elif shape.host_needs_source and kind == HOST_POLICY_KIND:
            self.report(source_path, f"is required for {section} rules in a {HOST_POLICY_KIND}")

    def _sources(self, sources: Any, path: str, shape: RuleShape, kind: str) -> None:
        if not self._list(sources, path):
            return
        if not sources and shape.host_needs_source and kind == HOST_POLICY_KIND:
            self.report(path, "must list at least one program in a host policy")
        for i, source in enumerate(sources):
            source_path = _index(path, i)
            if not self._mapping(source, source_path):
                continue
            self._keys(source, shape.source_keys, source_path)
            if "path" not in source and "dir" not in source:
                self.report(_join(source_path, "path"), "is required")


# --------------------------------------------------------------------------- #
# Public functions
# --------------------------------------------------------------------------- #


def _match_labels_of(doc: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    key = SELECTOR_KEY[doc["kind"]]
    return tuple(sorted(doc["spec"][key]["matchLabels"].items()))


def _parse(text: str, source: str) -> tuple[list[tuple[Policy, int]], list[Problem]]:
    """Policies (with their document index) and problems of one file, without raising."""
    documents, problems = _load_documents(text, source)
    policies: list[tuple[Policy, int]] = []
    document_problems: list[Problem] = []
    for document in documents:
        found = [
            Problem(
                source,
                document.index,
                dup.path,
                f"duplicate key '{dup.key}' (first at line {dup.first_line}, again at line "
                f"{dup.line}); YAML would silently keep only the last one",
            )
            for dup in document.duplicate_keys
        ]
        validator = _DocumentValidator()
        validator.validate(document.data)
        found += [Problem(source, document.index, path, why) for path, why in validator.problems]
        if found:
            document_problems += found
            continue
        doc = document.data
        policy = Policy(
            name=doc["metadata"]["name"],
            kind=doc["kind"],
            match_labels=_match_labels_of(doc),
            document=doc,
        )
        policies.append((policy, document.index))
    # Problems of documents first, then the YAML error that ended the file.
    return policies, document_problems + problems


def _refuse_duplicate_names(
    policies: list[tuple[Policy, int, str]],
) -> tuple[list[Policy], list[Problem]]:
    first: dict[str, tuple[str, int]] = {}
    unique: list[Policy] = []
    problems: list[Problem] = []
    for policy, index, source in policies:
        if policy.name in first:
            where_source, where_index = first[policy.name]
            where = (
                f"document {where_index} of this file"
                if where_source == source
                else f"{where_source} document {where_index}"
            )
            problems.append(
                Problem(
                    source,
                    index,
                    "metadata.name",
                    f"duplicate policy name '{policy.name}' (already used in {where})",
                )
            )
        else:
            first[policy.name] = (source, index)
            unique.append(policy)
    return unique, problems


def parse_policies(text: str, source: str = "<input>") -> list[Policy]:
    """Parse and validate every policy in a multi-document YAML text.

    Empty documents are skipped. Raises one ``PolicyValidationError`` listing the
    problems of all documents; two documents with the same ``metadata.name``
    are refused too.
    """
    parsed, problems = _parse(text, source)
    policies, duplicates = _refuse_duplicate_names(
        [(policy, index, source) for policy, index in parsed]
    )
    problems += duplicates
    if problems:
        raise PolicyValidationError(problems)
    return policies


def load_policy_files(paths: Iterable[str | Path]) -> list[Policy]:
    """Read, parse and validate policy files; names must be unique across all of them.

    The ``source`` of a problem is the path as given. An unreadable file is
    reported as document 0. Raises one ``PolicyValidationError`` for all files.
    """
    parsed: list[tuple[Policy, int, str]] = []
    problems: list[Problem] = []
    for path in paths:
        source = str(path)
        try:
            with open(path, "rb") as fh:  # never more than the limit, even of /dev/zero
                raw = fh.read(MAX_TEXT_BYTES + 1)
            too_large = _size_problem(raw, source)
            if too_large is not None:
                problems.append(too_large)
                continue
            # As Path.read_text would: UTF-8, universal newlines.
            text = raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
        except UnicodeDecodeError as exc:
            problems.append(Problem(source, 0, "", f"cannot read file: not UTF-8 text ({exc})"))
            continue
        except OSError as exc:
            problems.append(Problem(source, 0, "", f"cannot read file: {exc.strerror or exc}"))
            continue
        file_policies, file_problems = _parse(text, source)
        parsed += [(policy, index, source) for policy, index in file_policies]
        problems += file_problems
    policies, duplicates = _refuse_duplicate_names(parsed)
    problems += duplicates
    if problems:
        raise PolicyValidationError(problems)
    return policies
