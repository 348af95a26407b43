"""The evaluator decides each event as KubeArmor would.

The rules are at the top of enforcement/evaluator.py. The table holds one or
more rows per rule and per interaction of rules; each row is checked against
the indexed evaluator and against the full scan.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeward.enforcement.bench_eval import make_events, make_policies
from edgeward.enforcement.evaluator import (
    DEFAULT_POSTURE,
    CapEvent,
    CompiledPolicies,
    Decision,
    Event,
    EventError,
    ExecEvent,
    NetEvent,
    OpenEvent,
    PolicyCompileError,
    compile_policies,
)
from edgeward.enforcement.policy import load_policy_files, parse_policies

DATA = Path(__file__).parent / "data" / "policies"
VALID_FILES = sorted((DATA / "valid").glob("*.yaml"))

HOST = "KubeArmorHostPolicy"
CONTAINER = "KubeArmorPolicy"


def policy(name: str, *lines: str, kind: str = HOST) -> str:
    """A policy document whose spec has ``lines`` (flow-style YAML, one key each)."""
    selector = "nodeSelector" if kind == HOST else "selector"
    spec = "".join(f"  {line}\n" for line in lines)
    return (
        f"apiVersion: security.kubearmor.com/v1\nkind: {kind}\nmetadata:\n  name: {name}\n"
        f'spec:\n  {selector}:\n    matchLabels:\n      kubearmor.io/hostname: "*"\n{spec}'
    )


def container(name: str, *lines: str) -> str:
    return policy(name, *lines, kind=CONTAINER)


@cache
def compiled(
    texts: tuple[str, ...], posture: str | tuple[tuple[str, str], ...]
) -> CompiledPolicies:
    policies = parse_policies("---\n".join(texts))
    return compile_policies(policies, posture if isinstance(posture, str) else dict(posture))


@dataclass(frozen=True)
class Case:
    id: str
    policies: tuple[str, ...]
    event: Event
    action: str
    policy: str | None
    posture: str | tuple[tuple[str, str], ...] = "audit"
    more: Mapping[str, Any] = field(default_factory=dict)  # severity, tags, message


CURL = "/usr/bin/curl"
BASH = "/bin/bash"
DAEMON = "/opt/pos/bin/payment-daemon"
PY = "/usr/bin/python3"

BLOCK_CURL = policy("block-curl", f"process: {{matchPaths: [{{path: {CURL}}}]}}", "action: Block")
AUDIT_CURL = policy("audit-curl", f"process: {{matchPaths: [{{path: {CURL}}}]}}", "action: Audit")
ALLOW_CURL_FROM_BASH = policy(
    "allow-curl",
    f"process: {{matchPaths: [{{path: {CURL}, fromSource: [{{path: {BASH}}}]}}]}}",
    "action: Allow",
)
DAEMON_HELPERS = policy(
    "daemon-helpers",
    f"process: {{matchDirectories: [{{dir: /opt/pos/bin/, recursive: true, "
    f"fromSource: [{{path: {DAEMON}}}]}}]}}",
    "action: Allow",
)
PROTECT_CONFIG = policy(
    "protect-config",
    "file: {matchDirectories: [{dir: /opt/pos/config/, recursive: true, readOnly: true}]}",
    "action: Block",
)
PRIVATE_HOME = policy(
    "private-home",
    "file: {matchDirectories: [{dir: /home/, recursive: true, ownerOnly: true}]}",
    "action: Block",
)
OWNER_READS_KEYS = policy(
    "owner-reads-keys",
    "file: {matchDirectories: [{dir: /etc/keys/, ownerOnly: true, readOnly: true}]}",
    "action: Block",
)
RAW_FROM_PY = policy(
    "raw-from-python",
    f"network: {{matchProtocols: [{{protocol: raw, fromSource: [{{path: {PY}}}]}}]}}",
    "action: Block",
)
TCP_ONLY_FROM_DAEMON = policy(
    "tcp-only",
    f"network: {{matchProtocols: [{{protocol: tcp, fromSource: [{{path: {DAEMON}}}]}}]}}",
    "action: Allow",
)
NET_BIND_ONLY_FROM_DAEMON = policy(
    "net-bind-only",
    f"capabilities: {{matchCapabilities: [{{capability: net_bind_service, "
    f"fromSource: [{{path: {DAEMON}}}]}}]}}",
    "action: Allow",
)
NO_RAW_CAP_FROM_PY = policy(
    "no-raw-cap",
    f"capabilities: {{matchCapabilities: [{{capability: net_raw, fromSource: [{{path: {PY}}}]}}]}}",
    "action: Block",
)
DAEMON_READS_CONFIG = policy(
    "daemon-reads-config",
    f"file: {{matchDirectories: [{{dir: /opt/pos/config/, recursive: true, readOnly: true, "
    f"fromSource: [{{path: {DAEMON}}}]}}]}}",
    "action: Allow",
)
DAEMON_OWNS_SPOOL = policy(
    "daemon-owns-spool",
    f"file: {{matchDirectories: [{{dir: /var/spool/pos/, ownerOnly: true, "
    f"fromSource: [{{path: {DAEMON}}}]}}]}}",
    "action: Allow",
)
LAYERED = policy(
    "layered",
    "severity: 2",
    "tags: [spec-tag]",
    "message: from the spec",
    "file: {severity: 5, tags: [section-tag], matchPaths: ["
    "{path: /etc/a, severity: 9, tags: [rule-tag], message: from the rule}, "
    "{path: /etc/b}]}",
    "process: {matchPaths: [{path: /usr/bin/c}]}",
    "action: Block",
)


def p(*names_and_texts: str) -> tuple[str, ...]:
    return tuple(names_and_texts)


CASES = [
    # -- process matchPaths ------------------------------------------------------
    Case("exec_of_a_blocked_path_is_blocked", p(BLOCK_CURL),
         ExecEvent(CURL), "Block", "block-curl"),
    Case("exec_of_an_unlisted_path_is_allowed_and_no_policy_decided", p(BLOCK_CURL),
         ExecEvent("/usr/bin/ls"), "Allow", None),
    Case("exec_of_an_audited_path_is_audited", p(AUDIT_CURL),
         ExecEvent(CURL), "Audit", "audit-curl"),
    Case("action_defaults_to_block_when_no_level_sets_it",
         p(policy("no-action", f"process: {{matchPaths: [{{path: {CURL}}}]}}")),
         ExecEvent(CURL), "Block", "no-action"),
    Case("execname_matches_the_binary_in_any_directory",
         p(policy("no-nc", "process: {matchPaths: [{execname: nc}]}", "action: Block")),
         ExecEvent("/opt/tools/nc"), "Block", "no-nc"),
    Case("execname_does_not_match_another_base_name",
         p(policy("no-nc", "process: {matchPaths: [{execname: nc}]}", "action: Block")),
         ExecEvent("/usr/bin/ncat"), "Allow", None),
    Case("event_paths_are_normalised_before_matching", p(BLOCK_CURL),
         ExecEvent("/usr//lib/../bin/./curl"), "Block", "block-curl"),
    Case("process_rules_do_not_judge_file_opens", p(BLOCK_CURL), OpenEvent(CURL), "Allow", None),
    Case("file_rules_do_not_judge_execs",
         p(policy("no-curl-file", f"file: {{matchPaths: [{{path: {CURL}}}]}}", "action: Block")),
         ExecEvent(CURL), "Allow", None),
    # -- matchDirectories --------------------------------------------------------
    Case("a_directory_matches_its_direct_entries",
         p(policy("tmp", "file: {matchDirectories: [{dir: /tmp/}]}", "action: Block")),
         OpenEvent("/tmp/x"), "Block", "tmp"),
    Case("a_non_recursive_directory_does_not_match_deeper_entries",
         p(policy("tmp", "file: {matchDirectories: [{dir: /tmp/}]}", "action: Block")),
         OpenEvent("/tmp/a/x"), "Allow", None),
    Case("a_recursive_directory_matches_deeper_entries",
         p(policy("tmp", "file: {matchDirectories: [{dir: /tmp/, recursive: true}]}",
                  "action: Block")),
         OpenEvent("/tmp/a/b/c/x"), "Block", "tmp"),
    Case("a_directory_rule_matches_the_directory_itself",
         p(policy("tmp", "file: {matchDirectories: [{dir: /tmp/}]}", "action: Block")),
         OpenEvent("/tmp"), "Block", "tmp"),
    Case("a_directory_does_not_match_a_sibling_sharing_its_prefix",
         p(policy("pos", "file: {matchDirectories: [{dir: /opt/pos/, recursive: true}]}",
                  "action: Block")),
         OpenEvent("/opt/posx/file"), "Allow", None),
    Case("a_process_directory_blocks_execs_below_it",
         p(policy("no-tmp-exec", "process: {matchDirectories: [{dir: /tmp/, recursive: true}]}",
                  "action: Block")),
         ExecEvent("/tmp/.x/miner"), "Block", "no-tmp-exec"),
    # -- matchPatterns -----------------------------------------------------------
    Case("a_pattern_star_matches_within_one_path_component",
         p(policy("apt", "process: {matchPatterns: [{pattern: '/usr/bin/apt*'}]}",
                  "action: Block")),
         ExecEvent("/usr/bin/apt-get"), "Block", "apt"),
    Case("a_pattern_star_does_not_cross_a_slash",
         p(policy("apt", "process: {matchPatterns: [{pattern: '/usr/bin/apt*'}]}",
                  "action: Block")),
         ExecEvent("/usr/bin/apt.d/run"), "Allow", None),
    Case("a_pattern_double_star_crosses_directories",
         p(policy("keys", "file: {matchPatterns: [{pattern: '/home/**/.ssh/id_*'}]}",
                  "action: Block")),
         OpenEvent("/home/ann/work/.ssh/id_rsa"), "Block", "keys"),
    Case("a_pattern_question_mark_matches_exactly_one_character",
         p(policy("ttys", "file: {matchPatterns: [{pattern: '/dev/tty?'}]}", "action: Audit")),
         OpenEvent("/dev/tty12"), "Allow", None),
    Case("a_pattern_character_class_matches_one_of_its_characters",
         p(policy("ttys", "file: {matchPatterns: [{pattern: '/dev/tty[0-9]'}]}", "action: Audit")),
         OpenEvent("/dev/tty7"), "Audit", "ttys"),
    Case("a_pattern_with_braces_matches_each_alternative",
         p(policy("ids", "file: {matchPatterns: [{pattern: '/etc/{passwd,group}'}]}",
                  "action: Audit")),
         OpenEvent("/etc/group", write=True), "Audit", "ids"),
    Case("a_pattern_with_a_wildcard_first_component_still_matches",
         p(policy("secret", "file: {matchPatterns: [{pattern: '/*/secret'}]}", "action: Block")),
         OpenEvent("/srv/secret"), "Block", "secret"),
    Case("a_pattern_without_wildcards_matches_only_its_own_path",
         p(policy("motd", "file: {matchPatterns: [{pattern: /etc/motd}]}", "action: Audit")),
         OpenEvent("/etc/motd.d/x"), "Allow", None),
    Case("a_pattern_alternative_inside_a_name_matches_each_spelling",
         p(policy("pw", "file: {matchPatterns: [{pattern: '/etc/pass{wd,wd-}'}]}",
                  "action: Audit")),
         OpenEvent("/etc/passwd-"), "Audit", "pw"),
    # -- readOnly ------------------------------------------------------------------
    Case("a_readonly_block_lets_reads_through", p(PROTECT_CONFIG),
         OpenEvent("/opt/pos/config/app.yaml"), "Allow", None),
    Case("a_readonly_block_blocks_writes", p(PROTECT_CONFIG),
         OpenEvent("/opt/pos/config/app.yaml", write=True), "Block", "protect-config"),
    Case("a_readonly_audit_audits_only_writes",
         p(policy("log", "file: {matchDirectories: [{dir: /var/log/, readOnly: true}]}",
                  "action: Audit")),
         OpenEvent("/var/log/syslog"), "Allow", None),
    Case("a_readonly_allow_allows_reads_from_its_source", p(DAEMON_READS_CONFIG),
         OpenEvent("/opt/pos/config/app.yaml", source=DAEMON), "Allow", "daemon-reads-config"),
    Case("a_readonly_allow_leaves_writes_to_the_default_posture", p(DAEMON_READS_CONFIG),
         OpenEvent("/opt/pos/config/app.yaml", source=DAEMON, write=True), "Audit",
         DEFAULT_POSTURE),
    Case("a_readonly_allow_write_is_blocked_under_block_posture", p(DAEMON_READS_CONFIG),
         OpenEvent("/opt/pos/config/app.yaml", source=DAEMON, write=True), "Block",
         DEFAULT_POSTURE, posture="block"),
    Case("what_a_readonly_block_permits_is_not_thereby_allowed_in_allow_list_mode",
         p(PROTECT_CONFIG, policy(
             "daemon-reads-etc",
             f"file: {{matchDirectories: [{{dir: /etc/, recursive: true, "
             f"fromSource: [{{path: {DAEMON}}}]}}]}}",
             "action: Allow")),
         OpenEvent("/opt/pos/config/app.yaml", source=DAEMON), "Block", DEFAULT_POSTURE,
         posture="block"),
    # -- ownerOnly -----------------------------------------------------------------
    Case("an_owneronly_block_lets_the_owner_through", p(PRIVATE_HOME),
         OpenEvent("/home/ann/notes", owner="ann", user="ann", write=True), "Allow", None),
    Case("an_owneronly_block_blocks_other_users", p(PRIVATE_HOME),
         OpenEvent("/home/ann/notes", owner="ann", user="bob"), "Block", "private-home"),
    Case("an_owneronly_block_blocks_when_the_user_is_unknown", p(PRIVATE_HOME),
         OpenEvent("/home/ann/notes", owner="ann"), "Block", "private-home"),
    Case("owner_and_user_compare_as_text_so_a_uid_matches_its_string", p(PRIVATE_HOME),
         OpenEvent("/home/ann/notes", owner=1000, user="1000"), "Allow", None),
    Case("ownerOnly_with_readOnly_lets_the_owner_read", p(OWNER_READS_KEYS),
         OpenEvent("/etc/keys/k", owner="pos", user="pos"), "Allow", None),
    Case("ownerOnly_with_readOnly_blocks_the_owner_writing", p(OWNER_READS_KEYS),
         OpenEvent("/etc/keys/k", owner="pos", user="pos", write=True), "Block",
         "owner-reads-keys"),
    Case("ownerOnly_with_readOnly_blocks_others_reading", p(OWNER_READS_KEYS),
         OpenEvent("/etc/keys/k", owner="pos", user="root"), "Block", "owner-reads-keys"),
    Case("an_owneronly_allow_allows_the_owner", p(DAEMON_OWNS_SPOOL),
         OpenEvent("/var/spool/pos/q1", source=DAEMON, owner="pos", user="pos", write=True),
         "Allow", "daemon-owns-spool"),
    Case("an_owneronly_allow_leaves_other_users_to_the_posture", p(DAEMON_OWNS_SPOOL),
         OpenEvent("/var/spool/pos/q1", source=DAEMON, owner="pos", user="root"), "Audit",
         DEFAULT_POSTURE),
    Case("an_owneronly_process_rule_blocks_execs_by_other_users",
         p(policy("own-tools", "process: {matchDirectories: [{dir: /opt/tools/, ownerOnly: true}]}",
                  "action: Block")),
         ExecEvent("/opt/tools/t", owner="ops", user="guest"), "Block", "own-tools"),
    # -- fromSource ----------------------------------------------------------------
    Case("a_fromsource_rule_applies_to_its_source",
         p(policy("no-curl-from-bash",
                  f"process: {{matchPaths: [{{path: {CURL}, fromSource: [{{path: {BASH}}}]}}]}}",
                  "action: Block")),
         ExecEvent(CURL, source=BASH), "Block", "no-curl-from-bash"),
    Case("a_fromsource_rule_does_not_apply_to_another_source",
         p(policy("no-curl-from-bash",
                  f"process: {{matchPaths: [{{path: {CURL}, fromSource: [{{path: {BASH}}}]}}]}}",
                  "action: Block")),
         ExecEvent(CURL, source="/bin/sh"), "Allow", None),
    Case("a_fromsource_rule_does_not_apply_when_the_source_is_unknown",
         p(policy("no-curl-from-bash",
                  f"process: {{matchPaths: [{{path: {CURL}, fromSource: [{{path: {BASH}}}]}}]}}",
                  "action: Block")),
         ExecEvent(CURL), "Allow", None),
    Case("a_fromsource_list_applies_to_each_of_its_sources",
         p(policy("shells",
                  f"process: {{matchPaths: [{{path: {CURL}, "
                  f"fromSource: [{{path: {BASH}}}, {{path: /bin/sh}}]}}]}}",
                  "action: Block")),
         ExecEvent(CURL, source="/bin/sh"), "Block", "shells"),
    # -- network -----------------------------------------------------------------
    Case("a_network_block_from_a_source_blocks_that_protocol", p(RAW_FROM_PY),
         NetEvent("RAW", source=PY), "Block", "raw-from-python"),
    Case("protocols_match_case_insensitively", p(RAW_FROM_PY),
         NetEvent("raw", source=PY), "Block", "raw-from-python"),
    Case("a_network_block_leaves_other_protocols_alone", p(RAW_FROM_PY),
         NetEvent("udp", source=PY), "Allow", None),
    Case("a_network_allow_allows_its_protocol_for_its_source", p(TCP_ONLY_FROM_DAEMON),
         NetEvent("tcp", source=DAEMON), "Allow", "tcp-only"),
    Case("a_network_allow_puts_its_source_in_allow_list_mode", p(TCP_ONLY_FROM_DAEMON),
         NetEvent("udp", source=DAEMON), "Audit", DEFAULT_POSTURE),
    Case("a_network_allow_list_blocks_under_block_posture", p(TCP_ONLY_FROM_DAEMON),
         NetEvent("udp", source=DAEMON), "Block", DEFAULT_POSTURE, posture="block"),
    Case("a_network_allow_list_leaves_other_sources_alone", p(TCP_ONLY_FROM_DAEMON),
         NetEvent("udp", source=PY), "Allow", None, posture="block"),
    Case("a_container_network_rule_without_source_applies_to_every_process",
         p(container("no-icmp", "network: {matchProtocols: [{protocol: icmp}]}",
                     "action: Block")),
         NetEvent("icmp", source="/usr/bin/ping"), "Block", "no-icmp"),
    # -- capabilities --------------------------------------------------------------
    Case("a_capability_block_from_a_source_blocks_it", p(NO_RAW_CAP_FROM_PY),
         CapEvent("net_raw", source=PY), "Block", "no-raw-cap"),
    Case("capability_names_may_carry_the_cap_prefix_in_any_case", p(NO_RAW_CAP_FROM_PY),
         CapEvent("CAP_NET_RAW", source=PY), "Block", "no-raw-cap"),
    Case("a_capability_allow_puts_its_source_in_allow_list_mode", p(NET_BIND_ONLY_FROM_DAEMON),
         CapEvent("sys_admin", source=DAEMON), "Block", DEFAULT_POSTURE, posture="block"),
    Case("a_capability_allow_allows_its_capability", p(NET_BIND_ONLY_FROM_DAEMON),
         CapEvent("net_bind_service", source=DAEMON), "Allow", "net-bind-only", posture="block"),
    # -- severity, tags, message, action: the most specific wins -----------------
    Case("rule_severity_tags_and_message_override_section_and_spec", p(LAYERED),
         OpenEvent("/etc/a"), "Block", "layered",
         more={"severity": 9, "tags": ["rule-tag"], "message": "from the rule"}),
    Case("section_severity_and_tags_override_the_spec", p(LAYERED),
         OpenEvent("/etc/b"), "Block", "layered",
         more={"severity": 5, "tags": ["section-tag"], "message": "from the spec"}),
    Case("spec_values_apply_where_nothing_more_specific_is_set", p(LAYERED),
         ExecEvent("/usr/bin/c"), "Block", "layered",
         more={"severity": 2, "tags": ["spec-tag"], "message": "from the spec"}),
    Case("a_rule_action_overrides_the_spec_action",
         p(policy("mixed", "process: {matchPaths: [{path: /usr/bin/su, action: Audit}, "
                  "{path: /usr/bin/nc}]}", "action: Block")),
         ExecEvent("/usr/bin/su"), "Audit", "mixed"),
    Case("a_section_action_overrides_the_spec_action",
         p(policy("mixed", "file: {action: Audit, matchPaths: [{path: /etc/hosts}]}",
                  "action: Block")),
         OpenEvent("/etc/hosts", write=True), "Audit", "mixed"),
    Case("unset_severity_tags_and_message_are_empty", p(BLOCK_CURL), ExecEvent(CURL), "Block",
         "block-curl", more={"severity": None, "tags": [], "message": None}),
    # -- Allow and the default posture ---------------------------------------------
    Case("a_host_allow_without_fromsource_is_ignored",
         p(policy("allow-ls", "process: {matchPaths: [{path: /usr/bin/ls}]}", "action: Allow")),
         ExecEvent("/usr/bin/id"), "Allow", None, posture="block"),
    Case("a_container_allow_without_fromsource_puts_every_process_in_allow_list_mode",
         p(container("allow-ls", "process: {matchPaths: [{path: /usr/bin/ls}]}",
                     "action: Allow")),
         ExecEvent("/usr/bin/id", source=BASH), "Block", DEFAULT_POSTURE, posture="block"),
    Case("an_exec_matching_an_allow_rule_is_allowed_by_that_policy", p(DAEMON_HELPERS),
         ExecEvent("/opt/pos/bin/tools/print", source=DAEMON), "Allow", "daemon-helpers"),
    Case("an_exec_no_allow_rule_covers_falls_to_the_audit_posture_by_default", p(DAEMON_HELPERS),
         ExecEvent("/usr/bin/ls", source=DAEMON), "Audit", DEFAULT_POSTURE,
         more={"severity": None, "tags": []}),
    Case("an_exec_no_allow_rule_covers_is_blocked_under_block_posture", p(DAEMON_HELPERS),
         ExecEvent("/usr/bin/ls", source=DAEMON), "Block", DEFAULT_POSTURE, posture="block"),
    Case("allow_list_mode_is_only_for_the_allow_rule_s_source", p(DAEMON_HELPERS),
         ExecEvent("/usr/bin/ls", source=BASH), "Allow", None, posture="block"),
    Case("a_process_allow_puts_the_source_s_file_opens_in_allow_list_mode", p(DAEMON_HELPERS),
         OpenEvent("/etc/hosts", source=DAEMON), "Block", DEFAULT_POSTURE, posture="block"),
    Case("a_file_allow_puts_the_source_s_execs_in_allow_list_mode", p(DAEMON_READS_CONFIG),
         ExecEvent("/usr/bin/ls", source=DAEMON), "Audit", DEFAULT_POSTURE),
    Case("a_process_allow_does_not_touch_the_network_class", p(DAEMON_HELPERS),
         NetEvent("udp", source=DAEMON), "Allow", None, posture="block"),
    Case("a_network_allow_does_not_touch_the_file_class", p(TCP_ONLY_FROM_DAEMON),
         OpenEvent("/etc/hosts", source=DAEMON), "Allow", None, posture="block"),
    Case("the_posture_is_set_per_class_file_block",
         p(DAEMON_HELPERS, TCP_ONLY_FROM_DAEMON),
         ExecEvent("/usr/bin/ls", source=DAEMON), "Block", DEFAULT_POSTURE,
         posture=(("file", "block"), ("network", "audit"))),
    Case("the_posture_is_set_per_class_network_audit",
         p(DAEMON_HELPERS, TCP_ONLY_FROM_DAEMON),
         NetEvent("udp", source=DAEMON), "Audit", DEFAULT_POSTURE,
         posture=(("file", "block"), ("network", "audit"))),
    # -- conflicts -------------------------------------------------------------------
    Case("block_wins_over_allow_on_the_same_path", p(BLOCK_CURL, ALLOW_CURL_FROM_BASH),
         ExecEvent(CURL, source=BASH), "Block", "block-curl"),
    Case("block_wins_over_a_more_specific_allow",
         p(policy("no-bin", "process: {matchDirectories: [{dir: /usr/bin/, recursive: true}]}",
                  "action: Block"), ALLOW_CURL_FROM_BASH),
         ExecEvent(CURL, source=BASH), "Block", "no-bin"),
    Case("block_wins_over_audit_on_the_same_path", p(AUDIT_CURL, BLOCK_CURL),
         ExecEvent(CURL), "Block", "block-curl"),
    Case("audit_wins_over_allow_the_event_runs_but_is_reported",
         p(AUDIT_CURL, ALLOW_CURL_FROM_BASH),
         ExecEvent(CURL, source=BASH), "Audit", "audit-curl", posture="block"),
    Case("an_audit_rule_is_named_rather_than_the_audit_posture", p(AUDIT_CURL, DAEMON_HELPERS),
         ExecEvent(CURL, source=DAEMON), "Audit", "audit-curl"),
    Case("the_block_posture_wins_over_an_audit_rule", p(AUDIT_CURL, DAEMON_HELPERS),
         ExecEvent(CURL, source=DAEMON), "Block", DEFAULT_POSTURE, posture="block"),
    Case("an_exact_path_decides_before_a_directory_with_the_same_action",
         p(policy("etc", "file: {matchDirectories: [{dir: /etc/, recursive: true, severity: 3}]}",
                  "action: Block"),
           policy("shadow", "file: {matchPaths: [{path: /etc/shadow, severity: 9}]}",
                  "action: Block")),
         OpenEvent("/etc/shadow"), "Block", "shadow", more={"severity": 9}),
    Case("a_fromsource_rule_decides_before_one_without_with_the_same_action",
         p(BLOCK_CURL, policy(
             "no-curl-from-bash",
             f"process: {{matchPaths: [{{path: {CURL}, fromSource: [{{path: {BASH}}}]}}]}}",
             "action: Block")),
         ExecEvent(CURL, source=BASH), "Block", "no-curl-from-bash"),
    Case("a_deeper_directory_decides_before_a_shallower_one",
         p(policy("a-opt", "file: {matchDirectories: [{dir: /opt/, recursive: true}]}",
                  "action: Audit"),
           policy("b-opt-pos", "file: {matchDirectories: [{dir: /opt/pos/, recursive: true}]}",
                  "action: Audit")),
         OpenEvent("/opt/pos/x/y"), "Audit", "b-opt-pos"),
    Case("a_directory_decides_before_a_pattern",
         p(policy("a-pattern", "file: {matchPatterns: [{pattern: '/srv/*'}]}", "action: Block"),
           policy("b-dir", "file: {matchDirectories: [{dir: /srv/}]}", "action: Block")),
         OpenEvent("/srv/x"), "Block", "b-dir"),
    Case("equally_specific_rules_are_decided_by_policy_name",
         p(policy("zeta", f"process: {{matchPaths: [{{path: {CURL}}}]}}", "action: Block"),
           policy("alpha", f"process: {{matchPaths: [{{path: {CURL}}}]}}", "action: Block")),
         ExecEvent(CURL), "Block", "alpha"),
    Case("a_readonly_block_and_an_allow_on_the_same_path_let_the_allowed_read_through",
         p(PROTECT_CONFIG, DAEMON_READS_CONFIG),
         OpenEvent("/opt/pos/config/app.yaml", source=DAEMON), "Allow", "daemon-reads-config",
         posture="block"),
    Case("a_readonly_block_and_an_allow_on_the_same_path_still_block_the_write",
         p(PROTECT_CONFIG, DAEMON_READS_CONFIG),
         OpenEvent("/opt/pos/config/app.yaml", source=DAEMON, write=True), "Block",
         "protect-config"),
]  # fmt: skip


def test_the_table_has_at_least_sixty_distinct_cases() -> None:
    assert len(CASES) >= 60
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_decision(case: Case) -> None:
    # Given the case's policies in force
    evaluator = compiled(case.policies, case.posture)
    # When the event happens
    decision = evaluator.evaluate(case.event)
    # Then the action and the deciding policy are the expected ones, and the full scan agrees
    assert (decision.action, decision.policy) == (case.action, case.policy)
    got = decision.to_json()
    assert {key: got[key] for key in case.more} == dict(case.more)
    assert evaluator.evaluate_by_scan(case.event) == decision


# --------------------------------------------------------------------------- #
# The example policies
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def examples() -> CompiledPolicies:
    return compile_policies(load_policy_files(VALID_FILES))


@pytest.mark.parametrize(
    ("event", "action", "name"),
    [
        (ExecEvent(CURL, source=BASH), "Block", "pos-block-network-tools"),
        (ExecEvent("/usr/bin/nmap-7.9"), "Block", "pos-block-network-tools"),
        (ExecEvent("/usr/bin/dpkg-query"), "Block", "pos-block-package-managers"),
        (ExecEvent("/usr/bin/sudo"), "Audit", "pos-audit-sudo"),
        (OpenEvent("/var/log/pos/today.log", write=True), "Audit", "pos-audit-log-removal"),
        (OpenEvent("/etc/shadow"), "Block", "pos-protect-payment-config"),
        (OpenEvent("/opt/pos/config/app.yaml", write=True), "Block", "pos-protect-payment-config"),
        (ExecEvent("/opt/pos/bin/print", source=DAEMON), "Allow", "pos-payment-app-allowlist"),
        (ExecEvent("/usr/bin/ls", source=DAEMON), "Audit", DEFAULT_POSTURE),
        (NetEvent("raw", source=PY), "Block", "pos-block-raw-sockets"),
        (CapEvent("net_raw", source=PY), "Block", "pos-block-raw-sockets"),
        (ExecEvent("/usr/bin/ls", source=BASH), "Allow", None),
    ],
    ids=lambda value: value.describe() if isinstance(value, Event) else str(value),
)
def test_the_example_policies_decide_as_their_comments_say(
    examples: CompiledPolicies, event: Event, action: str, name: str | None
) -> None:
    decision = examples.evaluate(event)
    assert (decision.action, decision.policy) == (action, name)


def test_the_deciding_rule_and_inherited_values_are_reported(examples: CompiledPolicies) -> None:
    decision = examples.evaluate(OpenEvent("/etc/shadow"))
    assert decision == Decision(
        "Block",
        "pos-protect-payment-config",
        severity=9,
        tags=("CIS", "credentials"),
        rule="spec.file.matchPaths[0]",
    )


def test_plain_documents_as_bundles_carry_them_decide_like_typed_policies() -> None:
    # Given the same policies as typed Policy objects and as the plain dicts a bundle holds
    policies = load_policy_files(VALID_FILES)
    typed = compile_policies(policies, "block")
    plain = compile_policies([p.document for p in policies], "block")
    # Then every decision is the same
    for event in [
        ExecEvent("/usr/bin/ls", source=DAEMON),
        OpenEvent("/etc/shadow"),
        NetEvent("raw", source=PY),
    ]:
        assert plain.evaluate(event) == typed.evaluate(event)


def test_ignored_host_allow_rules_are_listed() -> None:
    evaluator = compiled(
        p(policy("allow-ls", "process: {matchPaths: [{path: /usr/bin/ls}]}", "action: Allow")),
        "audit",
    )
    assert len(evaluator.ignored) == 1
    assert "allow-ls: spec.process.matchPaths[0]: Allow without fromSource" in evaluator.ignored[0]


def test_a_default_posture_that_is_not_audit_or_block_is_refused() -> None:
    with pytest.raises(ValueError, match="must be audit or block"):
        compile_policies([], "deny")
    with pytest.raises(ValueError, match="unknown class"):
        compile_policies([], {"process": "block"})


def test_a_malformed_plain_document_is_refused_naming_policy_and_field() -> None:
    doc = {"metadata": {"name": "bad"}, "spec": {"file": {"matchPaths": [{"path": 5}]}}}
    with pytest.raises(PolicyCompileError, match=r"'bad': spec.file.matchPaths\[0\].path"):
        compile_policies([doc])


def test_the_decision_json_has_exactly_the_documented_keys() -> None:
    assert Decision("Allow").to_json() == {
        "action": "Allow",
        "policy": None,
        "severity": None,
        "tags": [],
        "message": None,
    }


# --------------------------------------------------------------------------- #
# Events from JSON
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("obj", "event"),
    [
        ({"op": "exec", "path": CURL, "source": BASH}, ExecEvent(CURL, source=BASH)),
        ({"op": "open", "path": "/etc/x", "write": True}, OpenEvent("/etc/x", write=True)),
        (
            {"op": "open", "path": "/h/f", "owner": "ann", "user": 1000},
            OpenEvent("/h/f", owner="ann", user="1000"),
        ),
        ({"op": "net", "protocol": "tcp", "source": PY}, NetEvent("TCP", source=PY)),
        ({"op": "cap", "capability": "CAP_SYS_ADMIN"}, CapEvent("sys_admin")),
    ],
    ids=["exec", "open", "open-owner", "net", "cap"],
)
def test_every_kind_of_event_is_read_from_json(obj: dict, event: Event) -> None:
    assert Event.from_json(obj) == event
    assert Event.from_json(event.to_json()) == event


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ([], "line 7: an event must be a JSON object (got list)"),
        ({"path": CURL}, "line 7: field 'op': is required"),
        ({"op": "run"}, "line 7: field 'op': must be exec, open, net or cap (got 'run')"),
        ({"op": "exec"}, "line 7: field 'path': is required for op 'exec'"),
        ({"op": "exec", "path": "curl"}, "line 7: field 'path': must be an absolute path"),
        ({"op": "exec", "path": CURL, "write": True}, "field 'write': does not apply to op 'exec'"),
        ({"op": "open", "path": "/x", "sorce": BASH}, "unknown field (did you mean 'source'?)"),
        ({"op": "open", "path": "/x", "write": "yes"}, "field 'write': must be true or false"),
        ({"op": "open", "path": "/x", "user": True}, "field 'user': must be a user name or uid"),
        ({"op": "net", "protocol": "http"}, "field 'protocol': must be one of"),
        ({"op": "cap", "capability": "net_rwa"}, "(did you mean 'net_raw'?)"),
        (
            {"op": "cap", "capability": "net_raw", "source": 3},
            "field 'source': must be an absolute",
        ),
    ],
    ids=lambda value: str(value)[:40],
)
def test_a_bad_event_is_refused_naming_the_line_and_field(obj: Any, message: str) -> None:
    with pytest.raises(EventError) as caught:
        Event.from_json(obj, line=7)
    assert message in str(caught.value)
    assert caught.value.line == 7


def test_events_are_validated_on_construction_too() -> None:
    with pytest.raises(EventError, match="must be an absolute path"):
        OpenEvent("etc/passwd")


# --------------------------------------------------------------------------- #
# Properties
# --------------------------------------------------------------------------- #

PATH_PARTS = [
    "usr",
    "bin",
    "curl",
    "opt",
    "pos",
    "config",
    "etc",
    "shadow",
    "var",
    "log",
    "..",
    ".",
]
JSON_SCALARS = st.none() | st.booleans() | st.integers(-5, 5000) | st.text(max_size=12)
PATHS = st.lists(st.sampled_from(PATH_PARTS) | st.text(max_size=6), max_size=6).map(
    lambda parts: "/" + "/".join(parts)
)
FIELD_VALUES = {
    "op": st.sampled_from(["exec", "open", "net", "cap"]) | JSON_SCALARS,
    "path": PATHS | JSON_SCALARS,
    "source": st.sampled_from([BASH, DAEMON, PY, CURL]) | PATHS | JSON_SCALARS,
    "write": st.booleans() | JSON_SCALARS,
    "owner": st.sampled_from(["pos", "root"]) | JSON_SCALARS,
    "user": st.sampled_from(["pos", "root"]) | JSON_SCALARS,
    "protocol": st.sampled_from(["tcp", "UDP", "raw", "icmp", "icmpv6"]) | JSON_SCALARS,
    "capability": st.sampled_from(["net_raw", "CAP_SYS_ADMIN", "bpf"]) | JSON_SCALARS,
}
EVENT_OBJECTS = st.fixed_dictionaries(
    {"op": FIELD_VALUES["op"]},
    optional={key: value for key, value in FIELD_VALUES.items() if key != "op"}
    | {"extra": JSON_SCALARS},
)


@pytest.fixture(scope="module")
def example_evaluators() -> list[CompiledPolicies]:
    policies = load_policy_files(VALID_FILES)
    return [compile_policies(policies, posture) for posture in ("audit", "block")]


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(EVENT_OBJECTS | st.lists(JSON_SCALARS, max_size=2) | JSON_SCALARS)
def test_any_json_event_is_read_or_refused_and_reads_are_always_decided(
    example_evaluators: list[CompiledPolicies], obj: Any
) -> None:
    try:
        event = Event.from_json(obj, line=1)
    except EventError as exc:
        assert str(exc).startswith("line 1: ")
        return
    for evaluator in example_evaluators:
        decision = evaluator.evaluate(event)
        assert decision.action in ("Allow", "Audit", "Block")
        assert decision == evaluator.evaluate_by_scan(event)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from(["audit", "block"]))
def test_the_index_decides_exactly_like_the_full_scan_on_generated_policies(
    seed: int, posture: str
) -> None:
    # Given generated policies (every rule kind, Allow/Audit/Block, fromSource) and events
    docs = make_policies(25, seed=seed)
    evaluator = compile_policies(docs, posture)
    # Then the index and the scan of every rule decide every event the same way
    for event in make_events(150, docs, seed=seed + 1):
        assert evaluator.evaluate(event) == evaluator.evaluate_by_scan(event), event
