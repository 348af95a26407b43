"""`edgeward policy test` prints what the policies decide for each event (a dry run)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgeward.actors.cli import main

DATA = Path(__file__).parent / "data" / "policies"
VALID = [str(path) for path in sorted((DATA / "valid").glob("*.yaml"))]
INVALID = DATA / "invalid"

DAEMON = "/opt/pos/bin/payment-daemon"
KEYS = {"action", "policy", "severity", "tags", "message"}


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["policy", "test", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def events_file(tmp_path: Path, *lines: str) -> str:
    path = tmp_path / "events.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_a_blocked_exec_is_shown_as_a_table_row_and_still_exits_0(capsys) -> None:
    code, out, _ = run(capsys, *VALID, "--exec", "/usr/bin/curl", "--source", "/bin/bash")
    assert code == 0
    header, row = out.splitlines()
    assert header.split()[:4] == ["EVENT", "ACTION", "POLICY", "RULE"]
    assert "exec /usr/bin/curl by /bin/bash" in row
    assert "Block" in row and "pos-block-network-tools" in row and "MITRE,T1105,pos" in row


def test_json_prints_one_object_with_the_documented_keys(capsys) -> None:
    code, out, _ = run(capsys, *VALID, "--open", "/etc/shadow", "--json")
    assert code == 0
    [decision] = json.loads(out)
    assert set(decision) == KEYS
    assert decision == {
        "action": "Block",
        "policy": "pos-protect-payment-config",
        "severity": 9,
        "tags": ["CIS", "credentials"],
        "message": None,
    }


def test_an_events_file_gives_one_decision_per_event_in_input_order(capsys, tmp_path) -> None:
    events = events_file(
        tmp_path,
        json.dumps({"op": "exec", "path": "/usr/bin/ls", "source": DAEMON}),
        "",  # blank lines are skipped
        json.dumps({"op": "exec", "path": "/opt/pos/bin/print", "source": DAEMON}),
        json.dumps({"op": "open", "path": "/opt/pos/config/app.yaml", "write": True}),
        json.dumps({"op": "open", "path": "/opt/pos/config/app.yaml"}),
        json.dumps({"op": "net", "protocol": "raw", "source": "/usr/bin/python3"}),
        json.dumps({"op": "cap", "capability": "CAP_NET_RAW", "source": "/usr/bin/python3"}),
        json.dumps({"op": "exec", "path": "/usr/bin/sudo"}),
    )
    code, out, _ = run(capsys, *VALID, "--events", events, "--json")
    assert code == 0
    got = [(d["action"], d["policy"]) for d in json.loads(out)]
    assert got == [
        ("Audit", "DefaultPosture"),
        ("Allow", "pos-payment-app-allowlist"),
        ("Block", "pos-protect-payment-config"),
        ("Allow", None),
        ("Block", "pos-block-raw-sockets"),
        ("Block", "pos-block-raw-sockets"),
        ("Audit", "pos-audit-sudo"),
    ]


def test_default_posture_block_blocks_what_the_allow_list_leaves_out(capsys) -> None:
    argv = [*VALID, "--exec", "/usr/bin/ls", "--source", DAEMON, "--json"]
    _, audit_out, _ = run(capsys, *argv)
    _, block_out, _ = run(capsys, *argv, "--default-posture", "block")
    assert json.loads(audit_out)[0]["action"] == "Audit"
    assert json.loads(block_out)[0]["action"] == "Block"
    assert json.loads(block_out)[0]["policy"] == "DefaultPosture"


def test_open_for_writing_with_owner_and_user_reaches_ownerOnly_rules(capsys, tmp_path) -> None:
    policy = tmp_path / "home.yaml"
    policy.write_text(
        "apiVersion: security.kubearmor.com/v1\nkind: KubeArmorHostPolicy\n"
        "metadata:\n  name: private-home\nspec:\n  nodeSelector:\n    matchLabels:\n"
        '      kubearmor.io/hostname: "*"\n'
        "  file:\n    matchDirectories:\n      - dir: /home/\n        recursive: true\n"
        "        ownerOnly: true\n  action: Block\n"
    )
    base = [str(policy), "--open", "/home/ann/notes", "--write", "--owner", "ann", "--json"]
    _, owner_out, _ = run(capsys, *base, "--user", "ann")
    _, other_out, _ = run(capsys, *base, "--user", "bob")
    assert json.loads(owner_out)[0]["action"] == "Allow"
    assert json.loads(other_out)[0]["action"] == "Block"


def test_a_capability_event_is_decided(capsys) -> None:
    code, out, _ = run(capsys, *VALID, "--cap", "net_raw", "--source", "/usr/bin/python3", "--json")
    assert code == 0
    assert json.loads(out)[0]["policy"] == "pos-block-raw-sockets"


def test_events_are_read_from_standard_input_with_a_dash(capsys, monkeypatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"op": "exec", "path": "/usr/bin/wget"}\n'))
    code, out, _ = run(capsys, *VALID, "--events", "-", "--json")
    assert code == 0
    assert json.loads(out)[0]["action"] == "Block"


def test_an_empty_events_file_prints_an_empty_array(capsys, tmp_path) -> None:
    code, out, _ = run(capsys, *VALID, "--events", events_file(tmp_path), "--json")
    assert (code, json.loads(out)) == (0, [])


def test_bad_events_exit_2_naming_every_bad_line_and_print_no_decisions(capsys, tmp_path) -> None:
    events = events_file(
        tmp_path,
        '{"op": "exec", "path": "/usr/bin/ls"}',
        '{"op": "exec"}',
        "not json",
        '{"op": "net", "protocol": "tcp", "sorce": "/x"}',
    )
    code, out, err = run(capsys, *VALID, "--events", events, "--json")
    assert code == 2
    assert out == ""
    assert f"{events}: line 2: field 'path': is required for op 'exec'" in err
    assert f"{events}: line 3: not JSON" in err
    assert "line 4: field 'sorce': unknown field (did you mean 'source'?)" in err
    assert "line 1" not in err


def test_an_invalid_policy_exits_2_naming_file_and_field(capsys) -> None:
    path = str(INVALID / "relative-path.yaml")
    code, out, err = run(capsys, path, "--exec", "/usr/bin/curl")
    assert code == 2
    assert out == ""
    assert f"{path}: document 1: spec.file.matchPaths[0].path: must be absolute" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--net", "tcp"], "--net needs --source PATH"),
        (["--cap", "net_rwa", "--source", "/x"], "--cap: unknown capability 'net_rwa'"),
        (["--exec", "usr/bin/curl"], "--exec: must be an absolute path"),
        (["--exec", "/usr/bin/curl", "--write"], "--write does not apply to --exec"),
        (["--open", "/etc/x", "--source", "bash"], "--source: must be an absolute path"),
        (["--events", "/nonexistent/events.jsonl"], "cannot read events"),
    ],
    ids=["net-without-source", "unknown-capability", "relative-exec", "write-with-exec",
         "relative-source", "missing-events-file"],
)  # fmt: skip
def test_bad_single_event_options_exit_2_with_a_reason(capsys, argv, message) -> None:
    code, out, err = run(capsys, *VALID, *argv)
    assert code == 2
    assert out == ""
    assert message in err


def test_single_event_options_are_refused_with_an_events_file(capsys, tmp_path) -> None:
    code, _, err = run(capsys, *VALID, "--events", events_file(tmp_path), "--source", "/bin/sh")
    assert code == 2
    assert "--source describes a single event: not with --events" in err


def test_an_event_option_is_required(capsys) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["policy", "test", *VALID])
    assert caught.value.code == 2
    assert "one of the arguments --events --exec --open --net --cap is required" in (
        capsys.readouterr().err
    )


def test_an_ignored_host_allow_rule_is_noted_on_stderr(capsys, tmp_path) -> None:
    policy = tmp_path / "allow.yaml"
    policy.write_text(
        "apiVersion: security.kubearmor.com/v1\nkind: KubeArmorHostPolicy\n"
        "metadata:\n  name: allow-ls\nspec:\n  nodeSelector:\n    matchLabels:\n"
        '      kubearmor.io/hostname: "*"\n'
        "  process:\n    matchPaths:\n      - path: /usr/bin/ls\n  action: Allow\n"
    )
    code, out, err = run(capsys, str(policy), "--exec", "/usr/bin/id", "--json")
    assert code == 0
    assert json.loads(out)[0] == {
        "action": "Allow",
        "policy": None,
        "severity": None,
        "tags": [],
        "message": None,
    }
    assert "note: allow-ls: spec.process.matchPaths[0]: Allow without fromSource is ignored" in err


def test_the_installed_command_runs_the_verb_end_to_end(tmp_path) -> None:
    events = events_file(tmp_path, '{"op": "exec", "path": "/usr/bin/nc", "source": "/bin/sh"}')
    done = subprocess.run(
        [sys.executable, "-m", "edgeward.actors.cli", "policy", "test", *VALID]
        + ["--events", events, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert [d["policy"] for d in json.loads(done.stdout)] == ["pos-block-network-tools"]
