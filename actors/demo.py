"""``make demo``: a control plane, three agents, two policy rollouts.

Runs the real commands as a user would, printing each one before running it.
Uses its own vhost (``edgeward-demo``, made afresh) and home
(``.edgeward/demo``), unless ``EDGEWARD_BROKER_URL`` / ``EDGEWARD_HOME`` say
otherwise.  Everything it started stops on Ctrl-C or when it is done.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from edgeward.actors.runtime import free_port
from edgeward.transport.admin import ManagementAPI, url_with_vhost, vhost_of
from edgeward.transport.connection import DEFAULT_BROKER_URL

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "edgeward.actors.cli"]
DEVICES = [("pos-0001", "store=berlin"), ("pos-0002", "store=berlin"), ("pos-0003", "store=paris")]
DEADLINE = 60.0


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


class Demo:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        url = os.environ.get("EDGEWARD_BROKER_URL")
        self.own_vhost = url is None
        self.url = url or url_with_vhost(DEFAULT_BROKER_URL, "edgeward-demo")
        self.home = Path(os.environ.get("EDGEWARD_HOME") or ROOT / ".edgeward" / "demo")
        self.env = {
            **os.environ,
            "EDGEWARD_BROKER_URL": self.url,
            "EDGEWARD_HOME": str(self.home),
            "EDGEWARD_ADMIN_PORT": os.environ.get("EDGEWARD_ADMIN_PORT") or str(free_port()),
            "PYTHONUNBUFFERED": "1",
        }

    def run(self, *args: str, show: bool = True) -> str:
        if show:
            print(f"$ edgeward {' '.join(args)}", flush=True)
        done = subprocess.run([*CLI, *args], env=self.env, capture_output=True, text=True, cwd=ROOT)
        if show:
            print((done.stdout + done.stderr).rstrip(), flush=True)
        if done.returncode != 0:
            raise SystemExit(f"demo: `edgeward {' '.join(args)}` failed ({done.returncode})")
        return done.stdout

    def spawn(self, prefix: str, *args: str) -> subprocess.Popen:
        proc = subprocess.Popen(
            [*CLI, *args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,
            cwd=ROOT,
        )
        self.procs.append(proc)
        ready = threading.Event()

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(f"  {prefix} | {line.rstrip()}\n")
                sys.stdout.flush()
                if "ready" in line:
                    ready.set()

        threading.Thread(target=pump, daemon=True).start()
        proc.ready = ready  # type: ignore[attr-defined]
        return proc

    def devices(self) -> list[dict]:
        return json.loads(self.run("devices", "--json", show=False))

    def watch_devices(self, done, what: str) -> None:
        """Show `edgeward devices` whenever it changes, until ``done(rows)``."""
        print("$ edgeward devices   (repeated until " + what + ")", flush=True)
        deadline = time.monotonic() + DEADLINE
        last = None
        while time.monotonic() < deadline:
            rows = self.devices()
            view = [
                (r["device"], r["desired_revision"], r["reported_revision"], r["state"])
                for r in rows
            ]
            if view != last:
                print(self.run("devices", show=False).rstrip(), flush=True)
                print(flush=True)
                last = view
            if done(rows):
                return
            time.sleep(0.5)
        raise SystemExit(f"demo: devices did not reach {what} within {DEADLINE:.0f}s")

    def main(self) -> int:
        if self.own_vhost:
            api = ManagementAPI.for_amqp_url(self.url)
            api.delete_vhost(vhost_of(self.url))
            api.create_vhost(vhost_of(self.url))
            api.set_permissions(vhost_of(self.url), "guest")
            shutil.rmtree(self.home, ignore_errors=True)
        say(f"broker: vhost {vhost_of(self.url)}; control-plane state in {self.home}")
        self.run("broker", "up")

        say("control plane")
        cp = self.spawn("control-plane", "control-plane", "run")
        if not cp.ready.wait(60):  # type: ignore[attr-defined]
            raise SystemExit("demo: the control plane did not become ready")

        say("three devices: enroll, then run each agent")
        for device, label in DEVICES:
            self.run(
                "enroll",
                device,
                "--label",
                label,
                "--out",
                str(self.home / f"{device}.json"),
                "--heartbeat-interval",
                "2",
            )
        for device, _ in DEVICES:
            events = self.events(device)
            events.write_text("")
            config = str(self.home / f"{device}.json")
            self.spawn(device, "agent", "run", "--config", config, "--events-from", str(events))

        say("roll out the example policies")
        policies = sorted(
            str(p.relative_to(ROOT)) for p in (ROOT / "examples/policies").glob("*.yaml")
        )
        self.run("policy", "apply", *policies)
        self.run("policy", "list")
        self.watch_devices(
            lambda rows: all(r["state"] == "in_sync" for r in rows), "all are in_sync"
        )

        say("change one policy that only store=berlin selects")
        self.run("policy", "apply", "examples/changes/pos-audit-sudo-v2.yaml")
        latest = json.loads(self.run("policy", "history", "--json", show=False))[-1]["revision"]

        def berlin_moved(rows: list[dict]) -> bool:
            return all(
                r["state"] == "in_sync"
                and (r["desired_revision"] == latest) == (r["labels"].get("store") == "berlin")
                for r in rows
            )

        self.watch_devices(berlin_moved, f"berlin is at revision {latest}, paris unchanged")
        self.run("policy", "history")

        say("someone runs curl on pos-0003: the agent blocks it and the alert goes up")
        with self.events("pos-0003").open("a") as fh:
            fh.write(json.dumps({"op": "exec", "path": "/usr/bin/curl", "source": "/bin/bash"}))
            fh.write("\n")
        deadline = time.monotonic() + DEADLINE
        while not json.loads(self.run("alerts", "--json", show=False)):
            if time.monotonic() > deadline:
                raise SystemExit("demo: the alert did not reach the audit trail")
            time.sleep(0.5)
        self.run("alerts")

        say("pos-0002 is stolen: revoke it (its broker user goes, its connection is closed)")
        self.run("revoke", "pos-0002")
        self.watch_devices(
            lambda rows: any(r["device"] == "pos-0002" and r["state"] == "revoked" for r in rows),
            "pos-0002 is revoked",
        )
        say("done: revisions reached exactly the devices they select; the alert arrived once")
        return 0

    def events(self, device: str) -> Path:
        """The file a device's agent judges events from (a stand-in for KubeArmor)."""
        return self.home / f"{device}.events.jsonl"

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


def main() -> int:
    demo = Demo()
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        return demo.main()
    except KeyboardInterrupt:
        print("\ninterrupted: stopping what the demo started", flush=True)
        return 130
    finally:
        demo.stop()


if __name__ == "__main__":
    sys.exit(main())
