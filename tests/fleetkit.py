"""Run the real thing in tests: the control plane, agents and the CLI, as
processes, against the test's own vhost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from brokerkit import free_port, wait_until

CLI = [sys.executable, "-m", "edgeward.actors.cli"]


class Proc:
    """A child process whose output lines are collected as they come."""

    def __init__(self, args: list[str], env: dict[str, str], name: str) -> None:
        self.name = name
        self.started = time.monotonic()
        self.popen = subprocess.Popen(
            args,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    @property
    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def matching(self, fragment: str) -> list[str]:
        return [line for _, line in self.lines if fragment in line]

    def wait_for_line(self, fragment: str, timeout: float = 20.0) -> float:
        """Wait for a line containing ``fragment``; return seconds from start."""

        def seen() -> float | None:
            for when, line in self.lines:
                if fragment in line:
                    return when - self.started
            if self.popen.poll() is not None:
                raise AssertionError(f"{self.name} exited early:\n{self.output}")
            return None

        return wait_until(seen, timeout=timeout, message=f"{self.name}: no line {fragment!r}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._reader.join(5)
        return self.popen.returncode


class Fleet:
    """A control plane and its agents for one test."""

    def __init__(self, home: Path, broker_url: str) -> None:
        self.home = home
        self.broker_url = broker_url
        self.port = free_port()
        self.env = {
            **os.environ,
            "EDGEWARD_BROKER_URL": broker_url,
            "EDGEWARD_HOME": str(home),
            "EDGEWARD_ADMIN_PORT": str(self.port),
            "PYTHONUNBUFFERED": "1",
        }
        self.control: Proc | None = None
        self.agents: dict[str, Proc] = {}
        self.configs: dict[str, Path] = {}

    # -- processes -----------------------------------------------------------

    def start_control_plane(self, *extra: str) -> Proc:
        self.control = Proc([*CLI, "control-plane", "run", *extra], self.env, "control plane")
        self.control.wait_for_line("control plane ready", timeout=60)
        return self.control

    def stop_control_plane(self) -> None:
        if self.control is not None:
            code = self.control.stop()
            assert code == 0, f"control plane exited {code}:\n{self.control.output}"
            self.control = None

    def enroll(
        self,
        device: str,
        *labels: str,
        heartbeat: float = 1.0,
        broker_url: str | None = None,
        extra: Sequence[str] = (),
    ) -> Path:
        out = self.home / f"{device}.json"
        args = ["enroll", device, "--out", str(out), "--heartbeat-interval", str(heartbeat)]
        args += extra
        for label in labels:
            args += ["--label", label]
        if broker_url is not None:
            args += ["--broker-url", broker_url]
        self.cli(*args)
        self.configs[device] = out
        return out

    def start_agent(self, device: str) -> Proc:
        proc = Proc([*CLI, "agent", "run", "--config", str(self.configs[device])], self.env, device)
        self.agents[device] = proc
        return proc

    def stop_agent(self, device: str, sig: int = signal.SIGTERM) -> Proc:
        proc = self.agents.pop(device)
        proc.stop(sig)
        return proc

    def close(self) -> None:
        for device in list(self.agents):
            self.stop_agent(device)
        if self.control is not None:
            self.control.stop()
            self.control = None

    # -- the CLI -----------------------------------------------------------------

    def run_cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*CLI, *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def cli(self, *args: str) -> str:
        done = self.run_cli(*args)
        assert done.returncode == 0, (
            f"edgeward {' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}"
        )
        return done.stdout

    def devices(self) -> dict[str, dict[str, Any]]:
        return {row["device"]: row for row in json.loads(self.cli("devices", "--json"))}

    def history(self) -> list[dict[str, Any]]:
        return json.loads(self.cli("policy", "history", "--json"))

    def wait_states(self, expected: dict[str, str], timeout: float = 30.0) -> dict:
        def reached() -> dict | None:
            rows = self.devices()
            states = {d: rows[d]["state"] for d in expected}
            return rows if states == expected else None

        return wait_until(
            reached, timeout=timeout, interval=0.3, message=f"devices never reached {expected}"
        )
