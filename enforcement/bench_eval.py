"""Benchmark the policy evaluator: decisions per second, index versus full scan.

    python -m edgeward.enforcement.bench_eval [--policies 100] [--events 1000] [--runs 5] [--json]

It generates ``--policies`` valid KubeArmorHostPolicy documents (a fixed
seed: every run judges the same set), passes them through the real validator,
compiles them, and judges ``--events`` distinct events (exec, open, net, cap;
about half of them hit a rule) with ``evaluate`` (the index) and with
``evaluate_by_scan`` (every rule checked: the naive baseline), checking that
both give the same decision for every event. Each run times whole passes over
the events, index and scan alternating so both see the same load; each
figure is the median of ``--runs`` runs (wall clock, and per CPU second of
this process), and the ratio is the median of the paired runs' ratios.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import yaml

from .evaluator import (
    CapEvent,
    CompiledPolicies,
    Decision,
    Event,
    ExecEvent,
    NetEvent,
    OpenEvent,
    compile_policies,
)
from .policy import parse_policies

SOURCES = [f"/opt/app{i}/bin/app{i}" for i in range(20)] + ["/bin/bash", "/usr/bin/python3"]
BINARIES = [f"/usr/bin/tool{i}" for i in range(150)] + [f"/usr/sbin/daemon{i}" for i in range(50)]
TOP_DIRS = ["/etc", "/var/lib", "/opt", "/srv/data", "/home", "/var/log"]
PROTOCOLS = ["tcp", "udp", "icmp", "raw"]
CAPS = ["net_raw", "net_admin", "sys_admin", "sys_ptrace", "chown", "setuid", "kill", "bpf"]


def _directory(rng: random.Random) -> str:
    return f"{rng.choice(TOP_DIRS)}/d{rng.randrange(40)}/"


def _rule(rng: random.Random, kind: str) -> tuple[str, str, dict[str, Any]]:
    """(section, list, rule) of one synthetic rule."""
    source = [{"path": rng.choice(SOURCES)}]
    if kind == "exec-path":
        return "process", "matchPaths", {"path": rng.choice(BINARIES)}
    if kind == "exec-dir":
        rule = {"dir": f"/opt/app{rng.randrange(20)}/bin/", "recursive": True}
        return "process", "matchDirectories", rule | {"fromSource": source}
    if kind == "exec-pattern":
        return "process", "matchPatterns", {"pattern": f"/usr/bin/tool{rng.randrange(15)}*"}
    if kind == "file-path":
        path = _directory(rng) + f"f{rng.randrange(20)}"
        return "file", "matchPaths", {"path": path, "ownerOnly": rng.random() < 0.3}
    if kind == "file-dir":
        rule = {"dir": _directory(rng), "recursive": rng.random() < 0.5}
        return "file", "matchDirectories", rule | {"readOnly": rng.random() < 0.5}
    if kind == "file-pattern":
        return "file", "matchPatterns", {"pattern": _directory(rng) + "*.key"}
    if kind == "net":
        rule = {"protocol": rng.choice(PROTOCOLS), "fromSource": source}
        return "network", "matchProtocols", rule
    rule = {"capability": rng.choice(CAPS), "fromSource": source}
    return "capabilities", "matchCapabilities", rule


RULE_KINDS = ["exec-path", "exec-dir", "exec-pattern", "file-path", "file-dir", "file-pattern"]


def make_policies(count: int, seed: int = 7) -> list[dict[str, Any]]:
    """``count`` synthetic host policies of 4–7 rules each."""
    rng = random.Random(seed)
    docs = []
    for i in range(count):
        action = rng.choices(["Block", "Audit", "Allow"], weights=[5, 3, 2])[0]
        spec: dict[str, Any] = {
            "nodeSelector": {"matchLabels": {"kubearmor.io/hostname": "*"}},
            "severity": rng.randint(1, 10),
            "action": action,
        }
        kinds = rng.choices(RULE_KINDS + ["net", "cap"], k=rng.randint(4, 7))
        for kind in kinds:
            section, list_name, rule = _rule(rng, kind)
            if action == "Allow" and "fromSource" not in rule:
                if list_name == "matchPatterns":
                    continue  # patterns take no fromSource: a host Allow would be ignored
                rule["fromSource"] = [{"path": rng.choice(SOURCES)}]  # host Allow needs it
            spec.setdefault(section, {}).setdefault(list_name, []).append(rule)
        docs.append(
            {
                "apiVersion": "security.kubearmor.com/v1",
                "kind": "KubeArmorHostPolicy",
                "metadata": {"name": f"bench-{i:03d}"},
                "spec": spec,
            }
        )
    return docs


def _path_event_target(rng: random.Random, docs: list[dict[str, Any]], section: str) -> str:
    """A path that hits some rule about half of the time, else a random one."""
    if rng.random() < 0.5:
        doc = rng.choice(docs)
        rules = [
            (list_name, rule)
            for list_name, rules in doc["spec"].get(section, {}).items()
            for rule in rules
        ]
        if rules:
            list_name, rule = rng.choice(rules)
            if list_name == "matchPaths":
                return rule["path"]
            if list_name == "matchDirectories":
                return rule["dir"] + f"sub{rng.randrange(3)}/x{rng.randrange(10_000)}"
            return rule["pattern"].replace("*", f"x{rng.randrange(10_000)}")
    if section == "process":
        return rng.choice(BINARIES) + f"-{rng.randrange(10_000)}"
    return _directory(rng) + f"miss{rng.randrange(10_000)}"


def make_events(count: int, docs: list[dict[str, Any]], seed: int = 11) -> list[Event]:
    """``count`` distinct events: 35% exec, 40% open, 15% net, 10% cap."""
    rng = random.Random(seed)
    events: dict[Event, None] = {}
    while len(events) < count:
        op = rng.choices(["exec", "open", "net", "cap"], weights=[35, 40, 15, 10])[0]
        source = rng.choice(SOURCES + [None])
        event: Event
        if op == "exec":
            event = ExecEvent(_path_event_target(rng, docs, "process"), source=source)
        elif op == "open":
            owner = rng.choice(["pos", "root"])
            event = OpenEvent(
                _path_event_target(rng, docs, "file"),
                source=source,
                write=rng.random() < 0.4,
                owner=owner,
                user=rng.choice(["pos", "root"]),
            )
        elif op == "net":
            event = NetEvent(rng.choice(PROTOCOLS), source=source or "/bin/bash")
        else:
            event = CapEvent(rng.choice(CAPS), source=source or "/usr/bin/python3")
        events.setdefault(event, None)
    return list(events)


def _rate(
    judge: Callable[[Event], Decision], events: Sequence[Event], seconds: float
) -> tuple[float, float]:
    """Decisions per wall-clock second and per CPU second, over whole passes of
    ``events`` lasting at least ``seconds``."""
    passes = 0
    start, start_cpu = time.perf_counter(), time.process_time()
    while True:
        for event in events:
            judge(event)
        passes += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            cpu = max(time.process_time() - start_cpu, 1e-9)
            return passes * len(events) / elapsed, passes * len(events) / cpu


def run(policies: int, events: int, runs: int, seconds: float) -> dict[str, Any]:
    docs = make_policies(policies)
    typed = parse_policies(yaml.safe_dump_all(docs), "<bench>")
    compile_ms = []
    compiled: CompiledPolicies | None = None
    for _ in range(runs):
        start = time.perf_counter()
        compiled = compile_policies(typed)
        compile_ms.append((time.perf_counter() - start) * 1000)
    assert compiled is not None
    sample = make_events(events, docs)
    decisions = [compiled.evaluate(event) for event in sample]
    pairs = zip(sample, decisions, strict=True)
    mismatches = sum(decision != compiled.evaluate_by_scan(event) for event, decision in pairs)
    if mismatches:
        raise AssertionError(f"index and full scan disagree on {mismatches} events")
    _rate(compiled.evaluate, sample, seconds / 5)  # warm up
    # Index and scan alternate, so that both see the same load on a shared machine.
    indexed, scanned = [], []
    for _ in range(runs):
        indexed.append(_rate(compiled.evaluate, sample, seconds))
        scanned.append(_rate(compiled.evaluate_by_scan, sample, seconds))
    wall_ratios = [i[0] / s[0] for i, s in zip(indexed, scanned, strict=True)]
    return {
        "policies": policies,
        "rules": len(compiled),
        "events": len(sample),
        "events_by_op": dict(sorted(Counter(e.op for e in sample).items())),
        "decisions_by_action": dict(sorted(Counter(d.action for d in decisions).items())),
        "decided_by_a_policy": sum(d.policy not in (None, "DefaultPosture") for d in decisions),
        "compile_ms_median": round(statistics.median(compile_ms), 2),
        "indexed_decisions_per_s": [round(wall) for wall, _ in indexed],
        "scan_decisions_per_s": [round(wall) for wall, _ in scanned],
        "indexed_median": round(statistics.median(wall for wall, _ in indexed)),
        "scan_median": round(statistics.median(wall for wall, _ in scanned)),
        "indexed_cpu_median": round(statistics.median(cpu for _, cpu in indexed)),
        "scan_cpu_median": round(statistics.median(cpu for _, cpu in scanned)),
        "speedup": round(statistics.median(wall_ratios), 1),
        "runs": runs,
        "python": sys.version.split()[0],
    }


def render(result: dict[str, Any]) -> str:
    ops = ", ".join(f"{op} {n}" for op, n in result["events_by_op"].items())
    actions = ", ".join(f"{action} {n}" for action, n in result["decisions_by_action"].items())
    runs = result["runs"]

    def each(values: list[int]) -> str:
        return " / ".join(f"{v:,}" for v in values)

    return "\n".join(
        [
            f"policy evaluator: {result['policies']} policies ({result['rules']} rules), "
            f"{result['events']:,} distinct events ({ops})",
            f"decisions: {actions}; {result['decided_by_a_policy']} decided by a named policy",
            f"compile: {result['compile_ms_median']} ms (median of {runs})",
            f"indexed evaluate: {result['indexed_median']:,} decisions/s "
            f"(median of {runs} runs: {each(result['indexed_decisions_per_s'])}; "
            f"{result['indexed_cpu_median']:,} per CPU second)",
            f"full scan baseline: {result['scan_median']:,} decisions/s "
            f"(median of {runs} runs: {each(result['scan_decisions_per_s'])}; "
            f"{result['scan_cpu_median']:,} per CPU second)",
            f"index / scan: {result['speedup']}x (median of the {runs} paired runs; "
            "same events, same decisions)",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m edgeward.enforcement.bench_eval",
        description="Decisions per second of the policy evaluator, index versus full scan.",
    )
    parser.add_argument("--policies", type=int, default=100, help="default %(default)s")
    parser.add_argument("--events", type=int, default=1000, help="distinct events (default 1000)")
    parser.add_argument("--runs", type=int, default=5, help="runs per figure (default 5)")
    parser.add_argument(
        "--seconds", type=float, default=0.5, help="minimum time per run (default %(default)s)"
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if args.policies < 1 or args.events < 1 or args.runs < 1:
        parser.error("--policies, --events and --runs must be at least 1")
    result = run(args.policies, args.events, args.runs, args.seconds)
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
