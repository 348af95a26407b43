"""Policies are refused before publishing, with a message naming file, document and field."""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeward.enforcement.policy import (
    Policy,
    PolicyValidationError,
    Problem,
    load_policy_files,
    parse_policies,
)

DATA = Path(__file__).parent / "data" / "policies"
VALID_FILES = sorted((DATA / "valid").glob("*.yaml"))
INVALID_FILES = sorted((DATA / "invalid").glob("*.yaml"))

# file name -> (field, fragment of the reason)
EXPECTED_REFUSALS = {
    "dir-without-slash.yaml": ("spec.process.matchDirectories[0].dir", "must end with '/'"),
    "duplicate-action.yaml": ("spec.action", "duplicate key 'action'"),
    "empty-selector.yaml": ("spec.nodeSelector.matchLabels", "must not be empty"),
    "host-network-without-fromsource.yaml": (
        "spec.network.matchProtocols[0].fromSource",
        "is required",
    ),
    "misspelled-key.yaml": (
        "spec.file.matchPaths[0].readonly",
        "unknown key 'readonly' (did you mean 'readOnly'?)",
    ),
    "not-yaml.yaml": ("", "invalid YAML at line 4"),
    "relative-path.yaml": ("spec.file.matchPaths[0].path", "must be absolute"),
    "severity-out-of-range.yaml": ("spec.severity", "from 1 to 10 (got 11)"),
    "unknown-action.yaml": ("spec.action", "must be one of Allow, Audit, Block (got 'Deny')"),
}

HEADER = """\
apiVersion: security.kubearmor.com/v1
kind: KubeArmorHostPolicy
metadata:
  name: {name}
spec:
  nodeSelector:
    matchLabels:
      kubearmor.io/hostname: "*"
"""


def policy_text(body: str = "", name: str = "demo") -> str:
    """A valid host policy header followed by ``body`` (spec-level lines)."""
    return HEADER.format(name=name) + body


def refusal(text: str, source: str = "x.yaml") -> list[Problem]:
    with pytest.raises(PolicyValidationError) as caught:
        parse_policies(text, source)
    return caught.value.problems


def refused_fields(text: str) -> dict[str, str]:
    return {problem.field: problem.reason for problem in refusal(text)}


# --------------------------------------------------------------------------- #
# The shared example files
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("path", VALID_FILES, ids=lambda path: path.name)
def test_every_valid_example_file_is_accepted(path: Path) -> None:
    policies = load_policy_files([path])
    assert policies
    assert all(isinstance(policy, Policy) for policy in policies)


@pytest.mark.parametrize("path", INVALID_FILES, ids=lambda path: path.name)
def test_every_invalid_example_file_is_refused_naming_the_field_and_reason(path: Path) -> None:
    assert path.name in EXPECTED_REFUSALS, f"add the expected refusal of {path.name}"
    field, fragment = EXPECTED_REFUSALS[path.name]
    with pytest.raises(PolicyValidationError) as caught:
        load_policy_files([path])
    matching = [p for p in caught.value.problems if p.field == field and fragment in p.reason]
    assert matching, str(caught.value)
    assert all(problem.source == str(path) for problem in caught.value.problems)
    assert all(problem.document == 1 for problem in caught.value.problems)


def test_every_expected_refusal_has_its_example_file() -> None:
    assert set(EXPECTED_REFUSALS) == {path.name for path in INVALID_FILES}


def test_loading_all_invalid_files_reports_the_problems_of_every_file_at_once() -> None:
    with pytest.raises(PolicyValidationError) as caught:
        load_policy_files(INVALID_FILES)
    assert {problem.source for problem in caught.value.problems} == {
        str(path) for path in INVALID_FILES
    }


def test_loading_all_valid_files_returns_every_policy_in_order() -> None:
    names = [policy.name for policy in load_policy_files(VALID_FILES)]
    assert names == [
        "pos-block-package-managers",
        "pos-audit-log-removal",
        "pos-audit-sudo",
        "pos-block-network-tools",
        "pos-block-raw-sockets",
        "pos-payment-app-allowlist",
        "pos-protect-payment-config",
    ]


# --------------------------------------------------------------------------- #
# Messages and the error object
# --------------------------------------------------------------------------- #


def test_problem_message_names_source_document_field_and_reason() -> None:
    text = (
        policy_text(name="first")
        + "---\n"
        + policy_text("  file:\n    matchPaths:\n      - path: etc/shadow\n", name="second")
    )
    with pytest.raises(PolicyValidationError) as caught:
        parse_policies(text, "x.yaml")
    assert str(caught.value) == "x.yaml: document 2: spec.file.matchPaths[0].path: must be absolute"


def test_problem_without_a_field_omits_the_field_part() -> None:
    problem = Problem("x.yaml", 3, "", "must be a mapping")
    assert str(problem) == "x.yaml: document 3: must be a mapping"


def test_error_message_lists_one_problem_per_line() -> None:
    with pytest.raises(PolicyValidationError) as caught:
        parse_policies(policy_text("  severity: 0\n  action: Deny\n"), "x.yaml")
    problems = caught.value.problems
    assert len(problems) == 2
    assert str(caught.value).splitlines() == [str(problem) for problem in problems]


def test_error_survives_pickling_with_its_problems() -> None:
    error = PolicyValidationError([Problem("x.yaml", 1, "spec", "is required")])
    copy_ = pickle.loads(pickle.dumps(error))
    assert copy_.problems == error.problems
    assert str(copy_) == str(error)


def test_source_defaults_to_input() -> None:
    with pytest.raises(PolicyValidationError) as caught:
        parse_policies("kind: 1\n")
    assert caught.value.problems[0].source == "<input>"


# --------------------------------------------------------------------------- #
# Documents and YAML
# --------------------------------------------------------------------------- #


def test_problems_of_all_documents_are_collected_into_one_error() -> None:
    text = (
        policy_text("  severity: 0\n", name="one")
        + "---\n"
        + policy_text("  action: Deny\n", name="two")
    )
    problems = refusal(text)
    assert [(p.document, p.field) for p in problems] == [(1, "spec.severity"), (2, "spec.action")]


def test_empty_documents_are_skipped_but_keep_their_place_in_the_count() -> None:
    text = "---\n---\n" + policy_text(name="one") + "---\n" + policy_text("  severity: 0\n")
    problems = refusal(text)
    assert [(p.document, p.field) for p in problems] == [(3, "spec.severity")]


def test_a_text_without_documents_gives_no_policies() -> None:
    assert parse_policies("") == []
    assert parse_policies("# only a comment\n---\n") == []


def test_yaml_syntax_error_names_the_document_and_the_line() -> None:
    text = policy_text(name="one") + "---\n" + "metadata: {name: broken\nspec: [\n"
    problems = refusal(text)
    assert len(problems) == 1
    assert problems[0].document == 2
    assert problems[0].field == ""
    assert problems[0].reason.startswith("invalid YAML at line 11")


def test_documents_before_a_yaml_error_are_still_validated() -> None:
    text = policy_text("  severity: 0\n") + "---\n" + "a: [\n"
    problems = refusal(text)
    assert [(p.document, p.field) for p in problems] == [(1, "spec.severity"), (2, "")]


def test_a_document_that_is_not_a_mapping_is_refused() -> None:
    problems = refusal("- just\n- a list\n")
    assert problems[0].field == ""
    assert "must be a mapping" in problems[0].reason


def test_duplicate_key_is_refused_with_its_field_path() -> None:
    body = "  file:\n    matchPaths:\n      - path: /etc/a\n        path: /etc/b\n"
    problems = refusal(policy_text(body))
    assert [p.field for p in problems] == ["spec.file.matchPaths[0].path"]
    assert "duplicate key 'path' (first at line 11, again at line 12)" in problems[0].reason


def test_yaml_merge_keys_are_not_mistaken_for_duplicates() -> None:
    text = policy_text(
        "  file:\n"
        "    matchPaths:\n"
        "      - &shadow {path: /etc/shadow, readOnly: true}\n"
        "      - <<: *shadow\n"
        "        path: /etc/gshadow\n"
    )
    [policy] = parse_policies(text)
    assert policy.document["spec"]["file"]["matchPaths"][1] == {
        "path": "/etc/gshadow",
        "readOnly": True,
    }


def test_timestamps_are_refused_so_the_policy_stays_plain_json() -> None:
    fields = refused_fields(policy_text("  message: 2024-01-01\n"))
    assert "quote it" in fields["spec.message"]


def test_an_impossible_date_is_a_yaml_error_naming_the_line() -> None:
    problems = refusal(policy_text("  message: 2024-13-45\n"))
    assert problems[0].reason.startswith("invalid YAML at line 9")


def test_python_tags_are_refused() -> None:
    problems = refusal("a: !!python/object/apply:os.system [true]\n")
    assert "invalid YAML" in problems[0].reason


def test_a_recursive_alias_is_refused() -> None:
    problems = refusal(policy_text("  tags: &loop [*loop]\n"))
    assert "recursive" in problems[0].reason


def test_an_alias_bomb_is_refused_without_expanding_it() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    problems = refusal("\n".join(lines) + "\n")
    assert "too large" in problems[0].reason


def test_deep_nesting_is_refused() -> None:
    assert "nested" in refusal("[" * 5000)[0].reason
    assert "nested" in refusal("a: " + "[" * 100 + "]" * 100 + "\n")[0].reason


# --------------------------------------------------------------------------- #
# Header fields
# --------------------------------------------------------------------------- #


def test_api_version_must_be_kubearmor_v1() -> None:
    text = policy_text().replace("security.kubearmor.com/v1", "security.kubearmor.com/v2")
    assert "must be 'security.kubearmor.com/v1'" in refused_fields(text)["apiVersion"]


def test_kind_must_be_a_kubearmor_policy_kind() -> None:
    text = policy_text().replace("KubeArmorHostPolicy", "NetworkPolicy")
    assert "KubeArmorHostPolicy" in refused_fields(text)["kind"]


@pytest.mark.parametrize("missing", ["apiVersion", "kind", "metadata", "spec"])
def test_each_top_level_field_is_required(missing: str) -> None:
    document = yaml.safe_load(policy_text())
    del document[missing]
    assert refused_fields(yaml.safe_dump(document))[missing] == "is required"


def test_metadata_name_is_required() -> None:
    text = policy_text().replace("  name: demo\n", "  labels: {}\n")
    assert refused_fields(text)["metadata.name"] == "is required"


@pytest.mark.parametrize(
    "name",
    ["Upper", "under_score", "-leading", "trailing-", "dot..dot", "a" * 254, "123", "'a b'", "''"],
)
def test_metadata_name_must_be_a_dns1123_subdomain(name: str) -> None:
    assert "metadata.name" in refused_fields(policy_text(name=name))


@pytest.mark.parametrize("name", ["a", "pos-audit-sudo", "pos.v2", "0day", "a" * 253])
def test_dns1123_names_are_accepted(name: str) -> None:
    [policy] = parse_policies(policy_text(name=name))
    assert policy.name == name


# --------------------------------------------------------------------------- #
# Selector
# --------------------------------------------------------------------------- #


def test_host_policy_needs_a_node_selector() -> None:
    text = policy_text().replace("  nodeSelector:\n    matchLabels:\n", "  other:\n    x:\n")
    fields = refused_fields(text)
    assert fields["spec.nodeSelector"] == "is required"


def test_empty_selector_is_refused_because_it_never_matches() -> None:
    text = policy_text().replace(
        'matchLabels:\n      kubearmor.io/hostname: "*"', "matchLabels: {}"
    )
    assert "never matches" in refused_fields(text)["spec.nodeSelector.matchLabels"]


def test_label_values_must_be_strings() -> None:
    text = policy_text().replace('kubearmor.io/hostname: "*"', "store: 7")
    assert "must be a string" in refused_fields(text)["spec.nodeSelector.matchLabels.store"]


def test_an_invalid_hostname_regex_is_refused() -> None:
    text = policy_text().replace('kubearmor.io/hostname: "*"', 'kubearmor.io/hostnamereg: "pos-(["')
    fields = refused_fields(text)
    assert (
        "not a valid regular expression"
        in fields["spec.nodeSelector.matchLabels.kubearmor.io/hostnamereg"]
    )


def test_container_policy_uses_selector_and_needs_no_fromsource() -> None:
    text = (
        policy_text("  network:\n    matchProtocols:\n      - protocol: tcp\n")
        .replace("KubeArmorHostPolicy", "KubeArmorPolicy")
        .replace("nodeSelector", "selector")
    )
    [policy] = parse_policies(text)
    assert policy.kind == "KubeArmorPolicy"
    assert policy.selector == {"kubearmor.io/hostname": "*"}


def test_selector_in_a_host_policy_suggests_node_selector() -> None:
    text = policy_text().replace("nodeSelector", "selector")
    fields = refused_fields(text)
    assert fields["spec.selector"] == "unknown key 'selector' (did you mean 'nodeSelector'?)"


# --------------------------------------------------------------------------- #
# Actions, severity, paths, directories, fromSource, keys
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ("  action: Deny\n", "spec.action"),
        ("  process:\n    action: Deny\n", "spec.process.action"),
        (
            "  process:\n    matchPaths:\n      - path: /usr/bin/curl\n        action: Deny\n",
            "spec.process.matchPaths[0].action",
        ),
    ],
)
def test_action_is_checked_on_spec_section_and_rule(body: str, field: str) -> None:
    assert "must be one of Allow, Audit, Block" in refused_fields(policy_text(body))[field]


def test_lowercase_action_suggests_the_right_spelling() -> None:
    assert (
        "(did you mean 'Block'?)" in refused_fields(policy_text("  action: block\n"))["spec.action"]
    )


@pytest.mark.parametrize("severity", ["0", "11", "-1", "true", "'5'", "5.5"])
def test_severity_outside_1_to_10_or_not_an_integer_is_refused(severity: str) -> None:
    body = f"  file:\n    matchPaths:\n      - path: /etc/a\n        severity: {severity}\n"
    assert "spec.file.matchPaths[0].severity" in refused_fields(policy_text(body))


@pytest.mark.parametrize("severity", [1, 10])
def test_severity_bounds_are_accepted(severity: int) -> None:
    parse_policies(policy_text(f"  severity: {severity}\n"))


def test_directory_without_trailing_slash_is_refused_naming_the_field() -> None:
    body = "  file:\n    matchDirectories:\n      - dir: /var/log\n"
    assert refused_fields(policy_text(body)) == {
        "spec.file.matchDirectories[0].dir": "must end with '/'"
    }


def test_relative_directory_is_refused() -> None:
    body = "  process:\n    matchDirectories:\n      - dir: opt/\n"
    assert refused_fields(policy_text(body)) == {
        "spec.process.matchDirectories[0].dir": "must be absolute"
    }


def test_path_ending_with_a_slash_is_refused() -> None:
    body = "  file:\n    matchPaths:\n      - path: /etc/\n"
    assert (
        "must not end with '/'" in refused_fields(policy_text(body))["spec.file.matchPaths[0].path"]
    )


def test_relative_fromsource_path_is_refused() -> None:
    body = (
        "  file:\n    matchPaths:\n      - path: /etc/shadow\n"
        "        fromSource:\n          - path: usr/bin/cat\n"
    )
    assert refused_fields(policy_text(body)) == {
        "spec.file.matchPaths[0].fromSource[0].path": "must be absolute"
    }


def test_a_path_that_is_not_a_string_is_refused() -> None:
    body = "  file:\n    matchPaths:\n      - path: 42\n"
    assert "must be a string" in refused_fields(policy_text(body))["spec.file.matchPaths[0].path"]


def test_a_rule_needs_its_main_key() -> None:
    body = "  file:\n    matchPaths:\n      - readOnly: true\n"
    assert refused_fields(policy_text(body)) == {"spec.file.matchPaths[0].path": "is required"}


def test_a_process_rule_may_name_the_executable_instead_of_the_path() -> None:
    parse_policies(policy_text("  process:\n    matchPaths:\n      - execname: curl\n"))


def test_syscall_paths_may_name_a_directory() -> None:
    body = (
        "  syscalls:\n    matchPaths:\n      - path: /home/\n"
        "        recursive: true\n        syscall: [unlink]\n"
    )
    parse_policies(policy_text(body))


@pytest.mark.parametrize(
    ("section", "rules", "rule"),
    [
        ("network", "matchProtocols", "protocol: udp"),
        ("capabilities", "matchCapabilities", "capability: net_raw"),
    ],
)
def test_host_network_and_capability_rules_need_fromsource(
    section: str, rules: str, rule: str
) -> None:
    fields = refused_fields(policy_text(f"  {section}:\n    {rules}:\n      - {rule}\n"))
    assert "is required" in fields[f"spec.{section}.{rules}[0].fromSource"]


def test_an_empty_fromsource_list_is_refused_in_host_network_rules() -> None:
    body = "  network:\n    matchProtocols:\n      - protocol: udp\n        fromSource: []\n"
    assert "spec.network.matchProtocols[0].fromSource" in refused_fields(policy_text(body))


@pytest.mark.parametrize(
    ("body", "field", "suggestion"),
    [
        ("  proces: {}\n", "spec.proces", "process"),
        ("  Severity: 3\n", "spec.Severity", "severity"),
        ("  file:\n    matchPath: []\n", "spec.file.matchPath", "matchPaths"),
        (
            "  file:\n    matchDirectories:\n      - dir: /a/\n        recursiv: true\n",
            "spec.file.matchDirectories[0].recursiv",
            "recursive",
        ),
        (
            "  file:\n    matchPaths:\n      - path: /a\n        fromSource:\n"
            "          - pth: /bin/sh\n",
            "spec.file.matchPaths[0].fromSource[0].pth",
            "path",
        ),
    ],
)
def test_unknown_keys_are_refused_with_a_suggestion(body: str, field: str, suggestion: str) -> None:
    reason = refused_fields(policy_text(body))[field]
    assert reason.endswith(f"(did you mean '{suggestion}'?)")


def test_unknown_key_without_a_close_match_has_no_suggestion() -> None:
    fields = refused_fields(policy_text("  zzz: 1\n"))
    assert fields["spec.zzz"] == "unknown key 'zzz'"


def test_a_key_of_another_section_is_refused_there() -> None:
    body = "  process:\n    matchPatterns:\n      - pattern: /tmp/*\n        readOnly: true\n"
    assert "spec.process.matchPatterns[0].readOnly" in refused_fields(policy_text(body))


def test_syscall_rules_take_no_action() -> None:
    body = "  syscalls:\n    matchSyscalls:\n      - syscall: [unlink]\n        action: Block\n"
    reason = refused_fields(policy_text(body))["spec.syscalls.matchSyscalls[0].action"]
    assert "only audit" in reason


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ("  file: [1]\n", "spec.file"),
        ("  file:\n    matchPaths: {path: /a}\n", "spec.file.matchPaths"),
        ("  file:\n    matchPaths: [/etc/a]\n", "spec.file.matchPaths[0]"),
        (
            "  file:\n    matchPaths:\n      - path: /a\n        fromSource: /bin/sh\n",
            "spec.file.matchPaths[0].fromSource",
        ),
    ],
)
def test_sections_rule_lists_and_rules_must_have_the_right_shape(body: str, field: str) -> None:
    assert field in refused_fields(policy_text(body))


# --------------------------------------------------------------------------- #
# Names, files and the Policy object
# --------------------------------------------------------------------------- #


def test_two_documents_with_the_same_name_are_refused() -> None:
    text = policy_text(name="same") + "---\n" + policy_text(name="same")
    [problem] = refusal(text)
    assert (problem.document, problem.field) == (2, "metadata.name")
    assert "duplicate policy name 'same'" in problem.reason


def test_the_same_name_in_two_files_is_refused(tmp_path: Path) -> None:
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text(policy_text(name="same"))
    second.write_text(policy_text(name="same"))
    with pytest.raises(PolicyValidationError) as caught:
        load_policy_files([first, str(second)])
    [problem] = caught.value.problems
    assert problem.source == str(second)
    assert f"{first} document 1" in problem.reason


def test_an_unreadable_file_is_reported_as_document_zero(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(PolicyValidationError) as caught:
        load_policy_files([missing, binary, VALID_FILES[0]])
    problems = caught.value.problems
    assert [(p.source, p.document, p.field) for p in problems] == [
        (str(missing), 0, ""),
        (str(binary), 0, ""),
    ]
    assert all(p.reason.startswith("cannot read file") for p in problems)


def test_the_source_of_a_problem_is_the_path_as_given(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("bad.yaml").write_text(policy_text("  severity: 0\n"))
    with pytest.raises(PolicyValidationError) as caught:
        load_policy_files(["bad.yaml"])
    assert str(caught.value).startswith("bad.yaml: document 1: spec.severity: ")


def test_a_policy_carries_name_kind_sorted_labels_and_the_plain_document() -> None:
    text = policy_text().replace(
        'kubearmor.io/hostname: "*"', "store: berlin\n      kubearmor.io/hostname: pos-0001"
    )
    [policy] = parse_policies(text)
    assert policy.name == "demo"
    assert policy.kind == "KubeArmorHostPolicy"
    assert policy.match_labels == (("kubearmor.io/hostname", "pos-0001"), ("store", "berlin"))
    assert policy.selector == {"kubearmor.io/hostname": "pos-0001", "store": "berlin"}
    assert policy.document == yaml.safe_load(text)
    assert json.loads(json.dumps(policy.document)) == policy.document
    assert hash(policy) == hash(copy.deepcopy(policy))


# --------------------------------------------------------------------------- #
# Property: anything either parses or is refused with PolicyValidationError
# --------------------------------------------------------------------------- #

VALID_TEXTS = [path.read_text() for path in VALID_FILES]
VALID_DOCUMENTS = [doc for text in VALID_TEXTS for doc in yaml.safe_load_all(text)]
KEYS = sorted(
    {
        "apiVersion", "kind", "metadata", "name", "spec", "nodeSelector", "selector",
        "matchLabels", "process", "file", "network", "capabilities", "syscalls", "device",
        "matchPaths", "matchDirectories", "matchPatterns", "matchProtocols",
        "matchCapabilities", "matchSyscalls", "path", "dir", "pattern", "protocol",
        "capability", "syscall", "fromSource", "recursive", "readOnly", "ownerOnly",
        "execname", "severity", "tags", "message", "action",
    }
)  # fmt: skip
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-3, 15)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=10)
    | st.sampled_from(["/etc/x", "etc/x", "/opt/", "opt", "Allow", "Block", "Deny", "*", "pos-*"])
)
VALUES = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=6,
)
YAML_ALPHABET = st.sampled_from(list("abc:-/ \n\t[]{},&*!|>'\"#%@`?~0123456789.") + ["---\n"])
PROPERTY_SETTINGS = settings(
    max_examples=70, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


def parses_or_refuses(text: str) -> None:
    try:
        policies = parse_policies(text, "fuzz.yaml")
    except PolicyValidationError as error:
        assert error.problems
        assert all(isinstance(problem, Problem) for problem in error.problems)
        assert str(error)
        return
    for policy in policies:
        json.dumps(policy.document, allow_nan=False)


def containers(value: object) -> list[object]:
    found: list[object] = []
    if isinstance(value, dict):
        found.append(value)
        for item in value.values():
            found += containers(item)
    elif isinstance(value, list):
        found.append(value)
        for item in value:
            found += containers(item)
    return found


@PROPERTY_SETTINGS
@given(st.text(max_size=200) | st.lists(YAML_ALPHABET, max_size=80).map("".join))
def test_arbitrary_text_parses_or_is_refused_with_a_validation_error(text: str) -> None:
    parses_or_refuses(text)


@PROPERTY_SETTINGS
@given(st.data())
def test_mutated_valid_documents_parse_or_are_refused_with_a_validation_error(data) -> None:
    document = copy.deepcopy(data.draw(st.sampled_from(VALID_DOCUMENTS)))
    for _ in range(data.draw(st.integers(1, 4))):
        target = data.draw(st.sampled_from(containers(document)))
        if isinstance(target, dict) and target:
            key = data.draw(st.sampled_from(sorted(target, key=str)))
            if data.draw(st.booleans()):
                del target[key]
            else:
                target[key] = data.draw(VALUES)
        elif isinstance(target, dict):
            target[data.draw(st.sampled_from(KEYS))] = data.draw(VALUES)
        elif target:
            target[data.draw(st.integers(0, len(target) - 1))] = data.draw(VALUES)
        else:
            target.append(data.draw(VALUES))
    parses_or_refuses(yaml.safe_dump(document))


@PROPERTY_SETTINGS
@given(
    st.sampled_from(VALID_TEXTS),
    st.lists(
        st.tuples(st.integers(0, 2000), st.integers(0, 4), st.lists(YAML_ALPHABET, max_size=4)),
        min_size=1,
        max_size=4,
    ),
)
def test_edited_valid_files_parse_or_are_refused_with_a_validation_error(
    text: str, edits: list[tuple[int, int, list[str]]]
) -> None:
    for position, deleted, inserted in edits:
        at = position % (len(text) + 1)
        text = text[:at] + "".join(inserted) + text[at + deleted :]
    parses_or_refuses(text)
