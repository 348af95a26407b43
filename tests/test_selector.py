"""A policy's matchLabels select devices by hostname, hostname regex and fleet labels."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeward.enforcement.policy import load_policy_files
from edgeward.enforcement.selector import hostname_regex, selects, validate_labels

EXAMPLES = Path(__file__).parent.parent / "examples" / "policies"

DEMO_FLEET = {
    "pos-0001": {"store": "berlin"},
    "pos-0002": {"store": "berlin"},
    "pos-0003": {"store": "paris"},
}
BERLIN = {"pos-0001", "pos-0002"}
PARIS = {"pos-0003"}
EVERYONE = BERLIN | PARIS


def selected(match_labels: dict[str, str]) -> set[str]:
    return {
        device for device, labels in DEMO_FLEET.items() if selects(match_labels, device, labels)
    }


# --------------------------------------------------------------------------- #
# selects
# --------------------------------------------------------------------------- #


def test_empty_match_labels_select_no_device() -> None:
    assert selected({}) == set()


def test_hostname_star_selects_every_device() -> None:
    assert selected({"kubearmor.io/hostname": "*"}) == EVERYONE
    assert selects({"kubearmor.io/hostname": " * "}, "anything", {})


def test_hostname_selects_exactly_the_named_device() -> None:
    assert selected({"kubearmor.io/hostname": "pos-0002"}) == {"pos-0002"}
    assert not selects({"kubearmor.io/hostname": "pos-000"}, "pos-0001", {})


def test_hostname_comma_list_selects_each_listed_device_ignoring_spaces() -> None:
    assert selected({"kubearmor.io/hostname": "pos-0001, pos-0003 ,"}) == {"pos-0001", "pos-0003"}


def test_a_star_inside_a_hostname_list_is_not_a_wildcard() -> None:
    assert selected({"kubearmor.io/hostname": "pos-0001,*"}) == {"pos-0001"}


def test_an_empty_hostname_selects_nothing_not_even_an_unnamed_device() -> None:
    assert not selects({"kubearmor.io/hostname": ""}, "", {})
    assert not selects({"kubearmor.io/hostname": " , "}, "", {})


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("*", EVERYONE),
        ("pos-*", EVERYONE),
        ("pos-.*", EVERYONE),
        ("pos-000[12]", BERLIN),
        ("pos-000[0-9]*", EVERYONE),
        ("pos-0003|nope", PARIS),
        ("pos-00", set()),  # the whole hostname must match, not a prefix
        ("os-*", set()),
        (r"pos\-0001", {"pos-0001"}),
    ],
)
def test_hostname_regex_must_match_the_whole_hostname(pattern: str, expected: set[str]) -> None:
    assert selected({"kubearmor.io/hostnamereg": pattern}) == expected


@pytest.mark.parametrize("pattern", ["pos-([", "(", "a{2}*", "[z-a]"])
def test_an_invalid_hostname_regex_selects_nothing(pattern: str) -> None:
    assert selected({"kubearmor.io/hostnamereg": pattern}) == set()


@pytest.mark.parametrize(
    ("pattern", "compiled"),
    [
        ("*", ".*"),
        ("pos-*", "pos-.*"),
        ("pos-.*", "pos-.*"),
        ("pos-[0-9]*", "pos-[0-9]*"),
        ("pos-[*]", "pos-[*]"),
        (r"pos\*", r"pos\*"),
        ("(a|*)", "(a|.*)"),
        ("(ab)*", "(ab)*"),
    ],
)
def test_a_bare_star_in_a_hostname_regex_means_any_characters(pattern: str, compiled: str) -> None:
    assert hostname_regex(pattern).pattern == compiled


def test_other_labels_must_equal_the_device_labels() -> None:
    assert selected({"store": "berlin"}) == BERLIN
    assert selected({"store": "paris"}) == PARIS
    assert selected({"store": "Berlin"}) == set()
    assert selected({"region": "eu"}) == set()


def test_every_key_must_match() -> None:
    assert selected({"store": "berlin", "kubearmor.io/hostname": "pos-0002"}) == {"pos-0002"}
    assert selected({"store": "berlin", "kubearmor.io/hostname": "pos-0003"}) == set()
    assert selected({"store": "paris", "kubearmor.io/hostnamereg": "pos-*"}) == PARIS


def test_the_hostname_comes_from_the_device_not_from_its_labels() -> None:
    labels = {"kubearmor.io/hostname": "pos-0001"}
    assert not selects({"kubearmor.io/hostname": "pos-0001"}, "pos-0002", labels)


def test_a_non_string_selector_value_selects_nothing() -> None:
    assert not selects({"store": 1}, "pos-0001", {"store": 1})  # type: ignore[dict-item]


# --------------------------------------------------------------------------- #
# validate_labels
# --------------------------------------------------------------------------- #


def test_string_labels_are_valid() -> None:
    validate_labels({"store": "berlin", "empty-value": ""})
    validate_labels({})


@pytest.mark.parametrize(
    "labels",
    [
        {"store": 1},
        {"store": None},
        {1: "berlin"},
        {"": "berlin"},
        ["store", "berlin"],
    ],
)
def test_labels_that_are_not_non_empty_strings_are_refused(labels: object) -> None:
    with pytest.raises(ValueError):
        validate_labels(labels)


# --------------------------------------------------------------------------- #
# The demo policies in examples/policies
# --------------------------------------------------------------------------- #


def test_demo_policies_are_valid_and_select_the_intended_stores() -> None:
    policies = load_policy_files(sorted(EXAMPLES.glob("*.yaml")))
    reach = {policy.name: selected(policy.selector) for policy in policies}
    assert reach["pos-audit-sudo"] == BERLIN
    assert reach["pos-payment-app-allowlist"] == PARIS
    assert reach["pos-block-network-tools"] == EVERYONE
    assert reach["pos-protect-payment-config"] == EVERYONE
    assert {"kubearmor.io/hostname": "*"} in [policy.selector for policy in policies]
    assert all(reach.values()), "every demo policy selects at least one device"
