"""A simulation whose workers run on a worker host (``edgeward
simulate-worker``) instead of the run's own: here the worker host is a
second actor system on this machine, reached over TCP as another host's
would be. Its shards run the devices, the report says where they ran, and
the worker host outlives the run without its shards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from brokerkit import wait_until

ROOT = Path(__file__).parent.parent
SMOKE = ROOT / "simulator" / "scenarios" / "smoke.toml"
BROKER = "amqp://guest:guest@127.0.0.1:5672/%2F"


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgeward.actors.cli", *args]


def simulate(report: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    """``edgeward simulate`` of the smoke scenario on the shared broker."""
    return subprocess.run(
        cli("simulate", str(SMOKE), *args, "--broker-url", BROKER, "--report", str(report)),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def processes_named(name: str) -> set[int]:
    """Processes whose environment says they belong to the worker host ``name``."""
    marker = f"EDGEWARD_SIM_WORKER={name}".encode()
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as fh:
                    if marker in fh.read().split(b"\0"):
                        found.add(int(entry))
            except OSError:
                continue
    return found


@pytest.fixture
def worker_host(free_port_factory):
    """A running ``edgeward simulate-worker``: (port, name, its process)."""
    port = free_port_factory()
    name = f"test-worker-{port}"
    proc = subprocess.Popen(
        cli("simulate-worker", "--port", str(port), "--address", "127.0.0.1", "--name", name),
        # In its environment from the start, so /proc shows it on each of its
        # processes (the daemonized admin's and the shards' included).
        env={**os.environ, "EDGEWARD_SIM_WORKER": name},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        first = proc.stdout.readline()
        assert f"simulate-worker {name}: hosting workers" in first, first
        yield port, name, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for pid in processes_named(name):  # never leave its actor system behind
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def test_a_run_puts_its_devices_on_the_worker_host_and_the_host_outlives_it(
    worker_host, tmp_path: Path
) -> None:
    port, name, proc = worker_host
    # Given a worker host, its actor system up and idle
    idle = wait_until(lambda: processes_named(name), 10, message="worker host processes")
    # When a run names it
    done = simulate(
        tmp_path,
        "--devices",
        "40",
        "--no-baseline",
        "--worker-host",
        f"127.0.0.1:{port}",
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"worker hosts in the run: {name}" in done.stdout
    # Then every device ran there, converged, and nothing was lost
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["worker_hosts"] == {name: 40}
    assert report["converged"] is True and report["messages_lost"] == 0
    assert report["unexpected_closes"] == 0
    assert any("--worker-host" in note for note in report["notes"])
    assert f"on {name} (40 devices)" in (tmp_path / "report.md").read_text()
    # And the worker host is back to its idle processes, still up for the next run
    wait_until(lambda: processes_named(name) == idle, 30, message="the run's shards ended")
    assert proc.poll() is None
    # And Ctrl-C stops it with its actor system
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0
    wait_until(lambda: not processes_named(name), 15, message="worker host processes ended")


def test_a_worker_host_that_is_not_there_fails_the_run_before_any_device_is_made(
    free_port_factory, tmp_path: Path
) -> None:
    port = free_port_factory()  # nothing listens there
    started = time.monotonic()
    done = simulate(
        tmp_path,
        "--devices",
        "5",
        "--worker-host",
        f"127.0.0.1:{port}",
        "--worker-wait",
        "3",
        timeout=120,
    )
    assert done.returncode == 3, done.stdout[-2000:] + done.stderr[-2000:]
    assert "1 of 1 worker host(s) did not join within 3 s" in done.stderr
    assert f"127.0.0.1:{port}" in done.stdout + done.stderr
    assert time.monotonic() - started < 60
    # and no device user was made for a run that could not start
    assert "device users" not in done.stdout


def test_a_second_worker_host_on_a_taken_port_is_refused(worker_host) -> None:
    port, _, _ = worker_host
    done = subprocess.run(
        cli("simulate-worker", "--port", str(port)), capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2
    assert f"port {port} is taken" in done.stderr


def test_shards_on_a_worker_host_stop_when_the_run_is_killed(
    worker_host, tmp_path: Path, broker_admin
) -> None:
    port, name, proc = worker_host
    idle = wait_until(lambda: processes_named(name), 10, message="worker host processes")
    vhosts_before = set(broker_admin.list_vhosts())
    # Given a run whose shards are running on the worker host
    report = tmp_path / "killed-run"
    run = subprocess.Popen(
        cli(
            "simulate",
            str(SMOKE),
            "--devices",
            "20",
            "--no-baseline",
            "--shared-login",
            "--worker-host",
            f"127.0.0.1:{port}",
            "--broker-url",
            BROKER,
            "--report",
            str(report),
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: len(processes_named(name)) > len(idle), 60, message="shards started")
        # When the run's every process is killed (its actor system's too)
        marker = str(report).encode()
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/cmdline", "rb") as fh:
                        if marker in fh.read():
                            os.kill(int(entry), signal.SIGKILL)
                except OSError:
                    continue
        run.wait(timeout=10)
        # Then the shards on the worker host notice and end; the host stays up
        wait_until(lambda: processes_named(name) == idle, 60, message="orphaned shards ended")
        assert proc.poll() is None
    finally:
        if run.poll() is None:
            run.kill()
        for vhost in set(broker_admin.list_vhosts()) - vhosts_before:
            broker_admin.delete_vhost(vhost)
