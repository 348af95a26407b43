"""``make bench``: the policy-delivery figures of BENCHMARKS.md.

Runs a real control plane and real agents against the local broker (in a
vhost of its own) and prints:

* agent memory, connected and idle: PSS and RSS of its whole process tree
  (``/proc/<pid>/smaps_rollup``), against the design's 96 MiB PSS budget;
* agent idle CPU over ``--idle-seconds`` (percent of one core);
* time from ``edgeward agent run`` with no network to the cached policy in
  force (median of ``--runs``);
* time from ``edgeward policy apply`` to every agent ``in_sync`` (median of
  ``--runs``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from edgeward.transport.admin import ManagementAPI, url_with_vhost
from edgeward.transport.connection import DEFAULT_BROKER_URL

from .messages import ListDevices
from .runtime import Client, free_port

CLI = [sys.executable, "-m", "edgeward.actors.cli"]
CLK_TCK = os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def memory_kib(pid: int) -> dict[str, int]:
    total = {"Pss": 0, "Rss": 0}
    for p in tree(pid):
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                key, _, rest = line.partition(":")
                if key in total:
                    total[key] += int(rest.split()[0])
        except OSError:
            continue
    return total


def cpu_seconds(pid: int) -> float:
    ticks = 0
    for p in tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / CLK_TCK


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.vhost = f"edgeward-bench-{uuid.uuid4().hex[:8]}"
        self.url = url_with_vhost(DEFAULT_BROKER_URL, self.vhost)
        self.api = ManagementAPI.for_amqp_url(self.url)
        self.home = Path(tempfile.mkdtemp(prefix="edgeward-bench-"))
        self.env = {
            **os.environ,
            "EDGEWARD_BROKER_URL": self.url,
            "EDGEWARD_HOME": str(self.home),
            "EDGEWARD_ADMIN_PORT": str(free_port()),
            "PYTHONUNBUFFERED": "1",
        }
        self.procs: list[subprocess.Popen] = []
        self.client: Client | None = None

    def cli(self, *args: str) -> str:
        done = subprocess.run([*CLI, *args], env=self.env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"edgeward {' '.join(args)}: {done.stdout}{done.stderr}")
        return done.stdout

    def spawn(self, *args: str) -> tuple[subprocess.Popen, list[tuple[float, str]]]:
        proc = subprocess.Popen(
            [*CLI, *args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        lines: list[tuple[float, str]] = []

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append((time.monotonic(), line))

        threading.Thread(target=read, daemon=True).start()
        self.procs.append(proc)
        return proc, lines

    @staticmethod
    def wait_line(lines: list[tuple[float, str]], text: str, timeout: float = 60) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for when, line in lines:
                if text in line:
                    return when
            time.sleep(0.005)
        raise SystemExit(f"no line {text!r} within {timeout}s")

    def policy_file(self, i: int) -> str:
        path = self.home / f"bench-{i}.json"
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "security.kubearmor.com/v1",
                    "kind": "KubeArmorHostPolicy",
                    "metadata": {"name": "bench"},
                    "spec": {
                        "nodeSelector": {"matchLabels": {"kubearmor.io/hostname": "*"}},
                        "process": {"matchPaths": [{"path": f"/usr/bin/tool-{i}"}]},
                        "action": "Block",
                    },
                }
            )
        )
        return str(path)

    def all_in_sync(self, revision: int) -> bool:
        if self.client is None:
            self.client = Client(int(self.env["EDGEWARD_ADMIN_PORT"]))
        rows = self.client.mirror(ListDevices()).value
        return all(r["state"] == "in_sync" and r["fleet_revision"] == revision for r in rows)

    def run(self) -> dict:
        a = self.args
        self.api.create_vhost(self.vhost)
        self.api.set_permissions(self.vhost, "guest")
        _, cp_lines = self.spawn("control-plane", "run")
        self.wait_line(cp_lines, "control plane ready")
        agents = []
        for i in range(a.agents):
            cfg = self.home / f"pos-{i:04d}.json"
            self.cli("enroll", f"pos-{i:04d}", "--label", "store=bench", "--out", str(cfg))
            agents.append(self.spawn("agent", "run", "--config", str(cfg)))
        for _, lines in agents:
            self.wait_line(lines, "connected to")

        propagation, command = [], []
        for i in range(1, a.runs + 1):
            t0 = time.monotonic()
            self.cli("policy", "apply", self.policy_file(i))
            command.append(time.monotonic() - t0)
            while not self.all_in_sync(i):
                time.sleep(0.01)
            propagation.append(time.monotonic() - t0)
            print(
                f"apply -> all {a.agents} in_sync, run {i}: {propagation[-1] * 1000:.0f} ms",
                flush=True,
            )

        pid = agents[0][0].pid
        time.sleep(3)  # let start-up settle before measuring idle
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        print(f"measuring idle CPU for {a.idle_seconds:.0f}s ...", flush=True)
        time.sleep(a.idle_seconds)
        idle_cpu = (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0) * 100
        mem = memory_kib(pid)

        # Offline start: the same cache, a broker URL nobody answers.
        for proc, _ in agents:
            proc.terminate()
            proc.wait(15)
        cfg_path = self.home / "pos-0000.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["broker_url"] = f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F"
        offline_cfg = self.home / "offline.json"
        offline_cfg.write_text(json.dumps(cfg))
        offline = []
        for _ in range(a.runs):
            t0 = time.monotonic()
            proc, lines = self.spawn("agent", "run", "--config", str(offline_cfg))
            offline.append(self.wait_line(lines, "in force: revision") - t0)
            proc.terminate()
            proc.wait(15)

        return {
            "agents": a.agents,
            "runs": a.runs,
            "apply_to_all_in_sync_ms": {
                "median": round(statistics.median(propagation) * 1000),
                "min": round(min(propagation) * 1000),
                "max": round(max(propagation) * 1000),
            },
            "policy_apply_command_ms": round(statistics.median(command) * 1000),
            "agent_pss_mib": round(mem["Pss"] / 1024, 1),
            "agent_rss_mib": round(mem["Rss"] / 1024, 1),
            "agent_idle_cpu_percent": round(idle_cpu, 2),
            "idle_seconds": a.idle_seconds,
            "offline_start_to_in_force_ms": {
                "median": round(statistics.median(offline) * 1000),
                "max": round(max(offline) * 1000),
            },
        }

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
        try:
            self.api.delete_vhost(self.vhost)
        finally:
            shutil.rmtree(self.home, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m edgeward.actors.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON only")
    args = parser.parse_args(argv)
    bench = Bench(args)
    try:
        figures = bench.run()
    except KeyboardInterrupt:
        return 130
    finally:
        bench.close()
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(f"\nagents: {figures['agents']}, runs: {figures['runs']}")
        p = figures["apply_to_all_in_sync_ms"]
        print(
            f"policy apply -> all in_sync:     median {p['median']} ms "
            f"(min {p['min']}, max {p['max']})"
        )
        print(
            f"  of which the `policy apply` command: median {figures['policy_apply_command_ms']} ms"
        )
        o = figures["offline_start_to_in_force_ms"]
        print(f"start, no network -> in force:  median {o['median']} ms (max {o['max']})")
        print(
            f"agent PSS / RSS, idle:           {figures['agent_pss_mib']} / "
            f"{figures['agent_rss_mib']} MiB (budget 96 MiB PSS)"
        )
        print(
            f"agent idle CPU over {figures['idle_seconds']:.0f}s:        "
            f"{figures['agent_idle_cpu_percent']}% of a core (budget 1%)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
