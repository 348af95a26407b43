"""``edgeward``: the one command line.

Exit codes come from one place (:data:`EXIT`): 0 ok, 2 bad input, 3 control
plane or broker unreachable, 1 anything else, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from edgeward.enforcement.evaluator import (
    CapEvent,
    Event,
    EventError,
    ExecEvent,
    NetEvent,
    OpenEvent,
    compile_policies,
)
from edgeward.enforcement.kubearmor.settings import KubeArmorSettings
from edgeward.enforcement.policy import PolicyValidationError, load_policy_files
from edgeward.transport.admin import vhost_of, with_login
from edgeward.transport.connection import TLSSettings, TLSSettingsError, split_urls, tls_from_env
from edgeward.transport.errors import BrokerUnreachable, TopologyConflict

from . import messages as m
from .config import (
    AgentConfig,
    admin_port_from_env,
    broker_url_from_env,
    home_from_env,
    metrics_port_from_env,
)
from .fleet import STATES

EXIT = {"ok": 0, "error": 1, "bad_input": 2, "unreachable": 3, "interrupted": 130}

DEVICE_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class CliError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _reply_value(reply: m.Reply) -> Any:
    if reply.ok:
        return reply.value
    code = {m.BAD_INPUT: "bad_input", m.UNREACHABLE: "unreachable"}.get(reply.code, "error")
    raise CliError(code, reply.error)


# -- output ------------------------------------------------------------------


def ago(ts: float | None, now: float | None = None) -> str:
    if ts is None:
        return "never"
    delta = max(0.0, (now or time.time()) - ts)
    if delta < 60:
        return f"{delta:.0f}s ago"
    if delta < 3600:
        return f"{delta / 60:.0f}m ago"
    return f"{delta / 3600:.1f}h ago"


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def labels_text(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"


def emit(args: argparse.Namespace, rows: list[dict], render: Callable[[list[dict]], str]) -> None:
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
    else:
        print(render(rows) if rows else "(none)")


# -- verbs -----------------------------------------------------------------------


def cmd_broker_up(args: argparse.Namespace) -> int:
    from edgeward.transport import topology
    from edgeward.transport.connection import connect_blocking, redact, split_urls

    urls = split_urls(args.broker_url)
    _check_tls(urls)
    deadline = time.monotonic() + args.wait
    while True:
        try:
            conn = connect_blocking(urls, name="edgeward-cli")
            break
        except BrokerUnreachable:
            if time.monotonic() >= deadline:
                raise
            time.sleep(1)
    try:
        topology.declare(conn.channel(), *_retention(args))
    finally:
        conn.close()
    print(f"broker ready at {', '.join(redact(u) for u in urls)}; topology declared")
    return 0


def _check_tls(urls: list[str]) -> None:
    """The EDGEWARD_TLS_* settings fit these URLs and their files load, or exit 2 now."""
    try:
        tls_from_env().check(urls)
    except TLSSettingsError as exc:
        raise CliError("bad_input", str(exc)) from None


def cmd_broker_control_plane_user(args: argparse.Namespace) -> int:
    urls = split_urls(args.broker_url)
    out = Path(args.out)
    if out.exists() and not args.force:
        raise CliError("bad_input", f"--out {out}: exists (--force replaces it and the secret)")
    secret = secrets.token_urlsafe(32)
    admin = _management(args)
    for vhost in sorted({vhost_of(u) for u in urls}):
        admin.put_control_plane_user(vhost, args.name, secret)
    url = ",".join(with_login(u, args.name, secret) for u in urls)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(f"EDGEWARD_BROKER_URL={url}\n")
    print(
        f"broker user {args.name!r}: configure, write and read on edgeward.* only, no tags; "
        f"its login is in {out} (mode 0600) as EDGEWARD_BROKER_URL=... for the control "
        "plane's environment (systemd EnvironmentFile=). Enrol and revoke devices with an "
        "administrator's --management-url: this user cannot make users."
    )
    return 0


def _retention(args: argparse.Namespace):
    from edgeward.transport.topology import Retention

    policy = Retention(
        args.retention_max_age, args.retention_max_bytes, args.retention_segment_bytes
    )
    telemetry = Retention(
        args.telemetry_max_age, args.telemetry_max_bytes, args.telemetry_segment_bytes
    )
    for name, value in (
        ("--retention-max-age", args.retention_max_age),
        ("--telemetry-max-age", args.telemetry_max_age),
    ):
        if not re.fullmatch(r"[1-9][0-9]*[YMDhms]", value):
            raise CliError(
                "bad_input", f"{name} {value!r}: expected a number and a unit, like 90D or 12h"
            )
    return policy, telemetry


def _settings(args: argparse.Namespace) -> m.Settings:
    _retention(args)  # refuse a bad retention before starting anything
    if args.collector_batch < 1 or args.collector_batch_ms <= 0:
        raise CliError("bad_input", "--collector-batch and --collector-batch-ms must be positive")
    return m.Settings(
        home=str(Path(args.home).resolve()),
        broker_url=args.broker_url,
        snapshot_every=args.snapshot_every,
        snapshot_cooldown=args.snapshot_cooldown,
        offline_after=args.offline_after,
        retention_max_age=args.retention_max_age,
        retention_max_bytes=args.retention_max_bytes,
        retention_segment_bytes=args.retention_segment_bytes,
        telemetry_max_age=args.telemetry_max_age,
        telemetry_max_bytes=args.telemetry_max_bytes,
        telemetry_segment_bytes=args.telemetry_segment_bytes,
        collector_batch=args.collector_batch,
        collector_batch_ms=args.collector_batch_ms,
        allow_shared_login=args.allow_shared_login,
        metrics_port=getattr(args, "metrics_port", 0) or 0,  # only control-plane run has it
    )


def cmd_control_plane_run(args: argparse.Namespace) -> int:
    from edgeward.transport.connection import split_urls

    from .control import describe_broker
    from .runtime import ControlPlane, admin_address, port_open

    _check_tls(split_urls(args.broker_url))  # refuse a bad URL or TLS setting first
    if port_open(args.admin_port):
        raise CliError(
            "error", f"port {admin_address(args.admin_port)} is taken (another control plane?)"
        )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    plane = ControlPlane(_settings(args), args.admin_port)
    try:
        status = plane.start()
        announced = False
        while not stop.is_set():
            if status.get("connected"):
                if not announced:
                    print(
                        f"control plane ready: admin {admin_address(args.admin_port)}, "
                        f"broker {describe_broker(args.broker_url)}, home {args.home}",
                        flush=True,
                    )
                    announced = True
            elif not announced:
                print(f"waiting for the broker: {status.get('error', '')}", flush=True)
            stop.wait(2.0 if announced else 1.0)
            if not announced and not stop.is_set():
                status = plane.link_status()
    finally:
        plane.stop()
    print("control plane stopped", flush=True)
    return 0


def cmd_enroll(args: argparse.Namespace) -> int:
    from .runtime import Client

    if not DEVICE_NAME.match(args.device):
        raise CliError(
            "bad_input",
            f"device name {args.device!r}: use lower-case letters, digits and '-' (at most 63)",
        )
    labels = {}
    for item in args.label:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError("bad_input", f"--label {item!r}: expected key=value")
        labels[key] = value
    backend: dict[str, Any] = {"kind": args.backend}
    if args.kubearmor_address:
        if args.backend != "kubearmor":
            raise CliError("bad_input", "--kubearmor-address needs --backend kubearmor")
        backend["address"] = args.kubearmor_address
    if args.backend == "kubearmor":
        try:
            KubeArmorSettings.from_config(backend)
        except ValueError as exc:
            raise CliError("bad_input", f"--kubearmor-address: {exc}") from None
    urls = split_urls(args.device_broker_url or args.broker_url)
    tls = TLSSettings(
        ca=_absolute(args.tls_ca),
        cert=_absolute(args.tls_cert),
        key=_absolute(args.tls_key),
        external=args.tls_external,
        source="config",
    )
    try:
        tls.check(urls, login=args.device)  # the files must be there and fit the device
    except TLSSettingsError as exc:
        raise CliError("bad_input", str(exc)) from None
    if args.tls_external and args.shared_login:
        raise CliError("bad_input", "--tls-external logs in as the device: not with --shared-login")
    admin = None if args.shared_login else _management(args)
    client = Client(args.admin_port)
    keys = _reply_value(client.distributor(m.SigningIdentity()))
    _reply_value(client.mirror(m.Enroll(args.device, tuple(sorted(labels.items())))))
    if admin is None:
        device_url = ",".join(urls)
        login = "the shared broker login (--shared-login: not for production)"
    elif args.tls_external:
        # Its certificate is its login: the user has no password at all.
        for vhost in sorted({vhost_of(u) for u in urls}):
            admin.put_device_user(vhost, args.device, None)
        device_url = ",".join(with_login(u, args.device, "") for u in urls)
        login = f"broker user {args.device!r} (logs in with its certificate: EXTERNAL)"
    else:
        # A fresh random secret, known only to the broker (as a hash) and to
        # the config file written below; enrolling again replaces it.
        secret = secrets.token_urlsafe(32)
        for vhost in sorted({vhost_of(u) for u in urls}):
            admin.put_device_user(vhost, args.device, secret)
        device_url = ",".join(with_login(u, args.device, secret) for u in urls)
        login = f"broker user {args.device!r} (its own secret, in the config only)"
    cache_dir = args.cache_dir or str(Path(args.home).resolve() / "devices" / args.device)
    try:
        config = AgentConfig(
            device=args.device,
            labels=labels,
            broker_url=device_url,
            cache_dir=str(Path(cache_dir).resolve()),
            trusted_keys=keys,
            heartbeat_interval=args.heartbeat_interval,
            backend=backend,
            tls_ca=tls.ca,
            tls_cert=tls.cert,
            tls_key=tls.key,
            tls_external=tls.external,
        )
    except ValueError as exc:
        raise CliError("bad_input", str(exc)) from None
    config.write(Path(args.out))
    print(
        f"enrolled {args.device} ({labels_text(labels)}) with {login}; "
        f"agent config written to {args.out} (mode 0600)"
    )
    return 0


def _absolute(path: str | None) -> str:
    return str(Path(path).resolve()) if path else ""


def _management(args: argparse.Namespace) -> Any:
    """The management API the operator's login administers users through."""
    from edgeward.transport.admin import ManagementAPI

    if args.management_url:
        parts = urlsplit(args.management_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise CliError("bad_input", f"--management-url {args.management_url!r}: not http(s)")
        first = urlsplit(split_urls(args.broker_url)[0])
        user = unquote(parts.username or first.username or "guest")
        password = unquote(parts.password or first.password or "guest")
        port = f":{parts.port}" if parts.port else ""
        base = f"{parts.scheme}://{parts.hostname}{port}{parts.path.rstrip('/') or '/api'}"
        return ManagementAPI(base, user, password)
    return ManagementAPI.for_amqp_url(split_urls(args.broker_url)[0])


def cmd_revoke(args: argparse.Namespace) -> int:
    from .runtime import Client

    client = Client(args.admin_port)
    result = _reply_value(client.mirror(m.Revoke(args.device)))
    _reply_value(client.collector(m.Revoke(args.device)))
    said = [f"{args.device} revoked: marked revoked, its telemetry from now on refused"]
    if not args.shared_login:
        admin = _management(args)
        existed, closed = admin.revoke_user(args.device, "device revoked")
        said.append(
            f"broker user {'deleted' if existed else 'was already gone'}, "
            f"{closed} live connection{'s' if closed != 1 else ''} closed"
        )
    if result.get("already"):
        said[0] = f"{args.device} was already revoked"
    print("; ".join(said))
    return 0


def cmd_agent_run(args: argparse.Namespace) -> int:
    from .agent import run_agent

    return run_agent(Path(args.config), Path(args.events_from) if args.events_from else None)


def _load(paths: list[str]) -> tuple[list[dict], list[str]]:
    policies = load_policy_files(paths)
    return [p.document for p in policies], [f"{p.name}" for p in policies]


def cmd_policy_apply(args: argparse.Namespace) -> int:
    from .runtime import Client

    docs, names = _load(args.files)  # exit 2 before anything is sent
    client = Client(args.admin_port)
    result = _reply_value(client.distributor(m.ApplyPolicies(tuple(docs), tuple(args.files))))
    if not result["changed"] and not result["deleted"]:
        print(f"no change: revision {result['revision']} already holds {', '.join(names)}")
    else:
        print(f"revision {result['revision']} published: {', '.join(result['changed'])}")
    return 0


def cmd_policy_delete(args: argparse.Namespace) -> int:
    from .runtime import Client

    result = _reply_value(Client(args.admin_port).distributor(m.DeletePolicy(args.name)))
    print(f"revision {result['revision']} published: deleted {args.name}")
    return 0


def cmd_policy_rollback(args: argparse.Namespace) -> int:
    from .runtime import Client

    result = _reply_value(Client(args.admin_port).distributor(m.Rollback(args.revision)))
    if not result["changed"] and not result["deleted"]:
        print(f"no change: the fleet already holds revision {args.revision}'s policies")
    else:
        print(f"revision {result['revision']} published: content of revision {args.revision}")
    return 0


def cmd_policy_snapshot(args: argparse.Namespace) -> int:
    from .runtime import Client

    result = _reply_value(Client(args.admin_port).distributor(m.PublishSnapshot()))
    print(f"snapshot of revision {result['snapshot']} published")
    return 0


def cmd_policy_list(args: argparse.Namespace) -> int:
    from .runtime import Client

    rows = _reply_value(Client(args.admin_port).distributor(m.ListPolicies()))
    emit(
        args,
        rows,
        lambda rs: table(
            [
                (r["name"], r["kind"], r["revision"], labels_text(r["selector"]), r["action"])
                for r in rs
            ],
            ["NAME", "KIND", "REVISION", "SELECTOR", "ACTION"],
        ),
    )
    return 0


def cmd_policy_history(args: argparse.Namespace) -> int:
    from .runtime import Client

    rows = _reply_value(Client(args.admin_port).distributor(m.History()))
    emit(
        args,
        rows,
        lambda rs: table(
            [
                (
                    r["revision"],
                    time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["issued_at"])),
                    shorten(r["summary"], 60),
                    r["policies"],
                    "yes" if r["published"] else "no",
                    r["digest"][:12],
                )
                for r in rs
            ],
            ["REVISION", "ISSUED", "CHANGE", "POLICIES", "PUBLISHED", "DIGEST"],
        ),
    )
    return 0


def _key_table(rows: list[dict]) -> str:
    return table(
        [
            (
                r["key_id"],
                r["state"],
                _when(r["created"]) if r.get("created") else "-",
                _when(r["until"]) if r["until"] is not None else "-",
            )
            for r in rows
        ],
        ["KEY", "STATE", "CREATED", "SIGNS BUNDLES ISSUED UNTIL"],
    )


def cmd_keys_list(args: argparse.Namespace) -> int:
    from .runtime import Client

    emit(args, _reply_value(Client(args.admin_port).distributor(m.ListKeys())), _key_table)
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    from .runtime import Client

    overlap = _duration(args.overlap, "--overlap")
    client = Client(args.admin_port)
    result = _reply_value(client.distributor(m.RotateKey(overlap)))
    rows = _reply_value(client.distributor(m.ListKeys()))
    active = next(r for r in rows if r["state"] == "active")
    print(
        f"revision {result['revision']} published: key {active['key_id']} signs from now on; "
        f"devices learn it from that revision (signed by the key it replaces)"
    )
    print(_key_table(rows))
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from .runtime import Client

    client = Client(args.admin_port)
    result = _reply_value(client.distributor(m.RevokeKey(args.key_id)))
    print(
        f"revision {result['revision']} published: devices that read it trust {args.key_id} no more"
    )
    print(_key_table(_reply_value(client.distributor(m.ListKeys()))))
    return 0


def _duration(text: str, option: str) -> float:
    found = _AGE.match(text.strip())
    if not found:
        raise CliError("bad_input", f"{option} {text!r}: expected a duration like 7d, 12h, 30m, 0s")
    return float(found[1]) * _AGE_UNITS[found[2]]


def _single_event(args: argparse.Namespace) -> Event:
    op = next(name for name in ("exec", "open", "net", "cap") if getattr(args, name) is not None)
    flag = f"--{op}"
    not_here = {
        "exec": ["write"],
        "open": [],
        "net": ["write", "owner", "user"],
        "cap": ["write", "owner", "user"],
    }[op]
    for name in not_here:
        if getattr(args, name) not in (None, False):
            raise CliError("bad_input", f"--{name} does not apply to {flag}")
    if op in ("net", "cap") and args.source is None:
        raise CliError("bad_input", f"{flag} needs --source PATH (the acting process)")
    options = {"path": flag, "protocol": flag, "capability": flag}
    try:
        if op == "exec":
            return ExecEvent(args.exec, args.source, args.owner, args.user)
        if op == "open":
            return OpenEvent(args.open, args.source, args.write, args.owner, args.user)
        if op == "net":
            return NetEvent(args.net, args.source)
        return CapEvent(args.cap, args.source)
    except EventError as exc:
        option = options.get(exc.field, f"--{exc.field}")
        raise CliError("bad_input", f"{option}: {exc.reason}") from None


def _events_file(name: str) -> list[Event]:
    try:
        if name == "-":
            text = sys.stdin.read()
        else:
            text = Path(name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise CliError("bad_input", f"{name}: cannot read events: {reason}") from None
    events: list[Event] = []
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            events.append(Event.from_json(json.loads(line), line=number))
        except json.JSONDecodeError as exc:
            problems.append(f"{name}: line {number}: not JSON: {exc.msg} (column {exc.colno})")
        except EventError as exc:
            problems.append(f"{name}: {exc}")
    if problems:
        shown = problems[:20]
        if len(problems) > 20:
            shown.append(f"... and {len(problems) - 20} more")
        raise CliError("bad_input", "invalid events, nothing was evaluated:\n" + "\n".join(shown))
    return events


def cmd_policy_test(args: argparse.Namespace) -> int:
    try:
        policies = load_policy_files(args.files)
    except PolicyValidationError as exc:
        raise CliError("bad_input", f"refused, nothing was evaluated:\n{exc}") from None
    if args.events is not None:
        for name in ("source", "write", "owner", "user"):
            if getattr(args, name) not in (None, False):
                raise CliError("bad_input", f"--{name} describes a single event: not with --events")
        events = _events_file(args.events)
    else:
        events = [_single_event(args)]
    evaluator = compile_policies(policies, args.default_posture)
    for note in evaluator.ignored:
        print(f"edgeward: note: {note}", file=sys.stderr)
    decisions = [evaluator.evaluate(event) for event in events]
    emit(
        args,
        [decision.to_json() for decision in decisions],
        lambda rs: table(
            [
                (
                    event.describe(),
                    d.action,
                    d.policy,
                    d.rule,
                    d.severity,
                    ",".join(d.tags) or None,
                    None if d.message is None else shorten(d.message, 60),
                )
                for event, d in zip(events, decisions, strict=True)
            ],
            ["EVENT", "ACTION", "POLICY", "RULE", "SEVERITY", "TAGS", "MESSAGE"],
        ),
    )
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    from .runtime import Client

    rows = _reply_value(Client(args.admin_port).mirror(m.ListDevices(args.state)))
    now = time.time()
    emit(
        args,
        rows,
        lambda rs: table(
            [
                (
                    r["device"],
                    labels_text(r["labels"]),
                    r["desired_revision"],
                    r["reported_revision"],
                    r["state"],
                    ago(r["last_seen"], now),
                )
                for r in rs
            ],
            ["DEVICE", "LABELS", "DESIRED", "REPORTED", "STATE", "LAST SEEN"],
        ),
    )
    return 0


_AGE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_when(text: str, option: str, now: float | None = None) -> float:
    """Epoch seconds from ISO 8601 (naive = local time) or an age (``10m``,
    ``2h``, ``1d``) counted back from ``now``."""
    from datetime import datetime

    value = text.strip()
    age = _AGE.match(value)
    if age:
        return (time.time() if now is None else now) - float(age[1]) * _AGE_UNITS[age[2]]
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise CliError(
            "bad_input",
            f"{option} {text!r}: expected ISO 8601 (2026-11-26T21:00:00Z) or an age "
            "like 30s, 10m, 2h, 1d",
        ) from None


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _alert_line(r: dict) -> str:
    return (
        f"{_when(r['time'])}  {r['device']}:{r['seq']}  severity {r['severity']}  "
        f"{r['action']}  {r['policy']}  {r['operation']} {r['resource']}  from {r['source']}"
    )


def _alerts_from(args: argparse.Namespace) -> Callable[[m.Alerts], tuple[list[dict], int | None]]:
    """Where alerts come from: the running collector, or an audit store file."""
    if args.store is not None:
        from dataclasses import asdict

        from .audit_store import AlertQuery, AuditStore

        path = Path(args.store)
        if not path.is_file():
            raise CliError("bad_input", f"--store {args.store}: no such file")
        store = AuditStore(path)
        return lambda query: store.alerts(AlertQuery(**asdict(query)))
    from .runtime import Client

    client = Client(args.admin_port)

    def ask(query: m.Alerts) -> tuple[list[dict], int | None]:
        value = _reply_value(client.collector(query))
        return value["alerts"], value["offset"]

    return ask


def cmd_alerts(args: argparse.Namespace) -> int:
    from dataclasses import replace

    if args.limit < 0:
        raise CliError("bad_input", "--limit must be 0 (all) or more")
    if args.severity is not None and args.severity < 0:
        raise CliError("bad_input", "--severity must be 0 or more")
    since = None if args.since is None else parse_when(args.since, "--since")
    query = m.Alerts(args.device, args.policy, args.severity, since, None, args.limit or None)
    fetch = _alerts_from(args)
    rows, high = fetch(query)
    if not args.follow:
        emit(
            args,
            rows,
            lambda rs: table(
                [
                    (
                        _when(r["time"]),
                        r["device"],
                        r["seq"],
                        r["severity"],
                        r["action"],
                        r["policy"],
                        r["operation"],
                        shorten(str(r["resource"]), 50),
                        r["source"],
                    )
                    for r in rs
                ],
                ["TIME", "DEVICE", "SEQ", "SEVERITY", "ACTION", "POLICY", "OPERATION", "RESOURCE"]
                + ["SOURCE"],
            ),
        )
        if args.limit and len(rows) == args.limit and not args.json:
            print(f"edgeward: the latest {args.limit} shown; --limit 0 for all", file=sys.stderr)
        return 0
    # --follow: what is stored now, then what arrives, one line (or JSON object) each.
    show = (lambda r: json.dumps(r, sort_keys=True)) if args.json else _alert_line
    try:
        while True:
            for row in rows:
                print(show(row), flush=True)
            time.sleep(args.interval)
            after = -1 if high is None else high
            rows, newest = fetch(replace(query, after_offset=after, limit=None))
            high = high if newest is None else newest
    except KeyboardInterrupt:
        return EXIT["ok"]  # Ctrl-C is how --follow ends


def cmd_audit_replay(args: argparse.Namespace) -> int:
    import pika.exceptions

    from .collector import replay

    since = parse_when(args.since, "--from")
    into = Path(
        args.into or Path(args.home) / f"audit-replay-{time.strftime('%Y%m%d-%H%M%S')}.sqlite"
    )
    if into.exists():
        raise CliError("bad_input", f"--into {into}: exists; replay writes a fresh store")
    tty = sys.stderr.isatty()

    def progress(read: int) -> None:
        if tty:
            print(f"\rread {read} records ...", end="", file=sys.stderr, flush=True)

    try:
        result = replay(args.broker_url, since, into, on_progress=progress)
    except pika.exceptions.AMQPError as exc:  # e.g. no telemetry stream: `broker up` first
        raise CliError("error", f"replay failed: {exc!r}") from None
    if tty:
        print(file=sys.stderr)
    refused = sum(result.refused.values())
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(result.refused.items()))
    span = (
        f" (offsets {result.first_offset}-{result.last_offset})"
        if result.first_offset is not None
        else ""
    )
    print(
        f"read {result.read} records from the telemetry stream since {_when(since)}{span} "
        f"into {into}: {result.stored} stored, {result.duplicates} duplicates, "
        f"{refused} refused" + (f" ({reasons})" if reasons else "")
    )
    return 0


def cmd_audit_status(args: argparse.Namespace) -> int:
    """The audit trail at a glance: what is stored, how far behind the stream."""
    import pika.exceptions

    from edgeward.transport.connection import split_urls

    from .audit_store import AuditStore
    from .collector import audit_path, stream_tail

    status: dict[str, Any] = {}
    if args.store is not None:
        path = Path(args.store)
        if not path.is_file():
            raise CliError("bad_input", f"--store {args.store}: no such file")
    else:
        from .runtime import Client

        status = _reply_value(Client(args.admin_port).collector(m.Status()))
        path = audit_path(str(Path(args.home).resolve()))
        if not path.is_file():
            raise CliError("error", f"{path}: no audit store (is --home the control plane's?)")
    store = AuditStore(path)
    try:
        out = store.summary()
    finally:
        store.close()
    out["bytes"] = sum(f.stat().st_size for f in path.parent.glob(path.name + "*"))
    if args.store is None:
        reader = status.get("reader") or {}
        out["collector"] = {
            "connected": bool(status.get("connected")),
            "error": reader.get("error", ""),
            "pid": reader.get("pid"),
            "resumed_from": reader.get("resumed_from"),
            "pending": reader.get("pending", 0),
            "restarts": status.get("restarts", 0),
        }
        out["lost_to_retention"] = status.get("lost_to_retention", 0)
        try:
            tail = stream_tail(split_urls(args.broker_url), quiet=0.2, timeout=5.0)
        except (BrokerUnreachable, pika.exceptions.AMQPError) as exc:
            out["stream"] = {"error": str(exc) or repr(exc)}
        else:
            stored = out["offset"]
            lag = 0 if tail is None else tail - (-1 if stored is None else stored)
            out["stream"] = {"tail": tail, "lag": max(0, lag)}
    if args.json:
        print(json.dumps(out, indent=2, sort_keys=True))
        return 0
    kinds = ", ".join(f"{n} {t}s" for t, n in sorted(out["by_type"].items())) or "none"
    span = (
        f"; {_when(out['first_time'])} to {_when(out['last_time'])}"
        if out["first_time"] is not None
        else ""
    )
    refused = ", ".join(f"{k} {v}" for k, v in sorted(out["refused"].items())) or "none"
    lines = [
        ("store", f"{out['path']} ({out['bytes'] / 1024**2:.1f} MiB)"),
        ("records", f"{out['records']} from {out['devices']} devices ({kinds}){span}"),
        ("duplicates", f"{out['duplicates']} repeats recognised and skipped"),
        ("refused", refused),
        ("offset", "nothing stored yet" if out["offset"] is None else str(out["offset"])),
    ]
    if "stream" in out:
        stream = out["stream"]
        if "error" in stream:
            lines.append(("stream", stream["error"]))
        else:
            lines.append(("stream", f"tail offset {stream['tail']}, lag {stream['lag']} offsets"))
        lost = out["lost_to_retention"]
        if lost:
            lines.append(("lost", f"{lost} offsets removed by retention before they were read"))
        c = out["collector"]
        state = f"reading (pid {c['pid']})" if c["connected"] else f"not reading: {c['error']}"
        lines.append(("collector", f"{state}; {c['pending']} pending; {c['restarts']} restarts"))
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key.ljust(width)}  {value}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from edgeward.simulator.run import WorkersMissing, simulate
    from edgeward.simulator.scenario import ScenarioError

    try:
        return simulate(args)
    except ScenarioError as exc:
        raise CliError("bad_input", str(exc)) from None
    except WorkersMissing as exc:
        raise CliError("unreachable", str(exc)) from None


def cmd_simulate_worker(args: argparse.Namespace) -> int:
    from edgeward.simulator.workerhost import PortInUse, serve

    try:
        return serve(args.port, address=args.address, name=args.name)
    except PortInUse as exc:
        raise CliError("bad_input", str(exc)) from None


# -- parser --------------------------------------------------------------------------


_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def byte_size(text: str) -> int:
    """A size in bytes: ``1073741824``, ``1G``, ``16M``, ``512K`` (binary units)."""
    found = re.fullmatch(r"\s*([0-9]+)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not found or int(found[1]) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive size like 1G or 512M")
    return int(found[1]) * _SIZE_UNITS[found[2].upper()]


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--broker-url",
        default=broker_url_from_env(),
        help="AMQP URL of the broker; a comma-separated list names the nodes of one cluster "
        "(env EDGEWARD_BROKER_URL; default %(default)s)",
    )
    common.add_argument(
        "--home",
        default=str(home_from_env()),
        help="control-plane state: keys, SQLite store, device caches "
        "(env EDGEWARD_HOME; default %(default)s)",
    )
    common.add_argument(
        "--admin-port",
        type=int,
        default=admin_port_from_env(),
        help="Thespian admin port of the control plane (env EDGEWARD_ADMIN_PORT; "
        "default %(default)s)",
    )
    management = argparse.ArgumentParser(add_help=False)
    management.add_argument(
        "--management-url",
        default=os.environ.get("EDGEWARD_MANAGEMENT_URL"),
        metavar="URL",
        help="RabbitMQ management API for device users (env EDGEWARD_MANAGEMENT_URL; default "
        "http://<first broker host>:15672/api with the --broker-url login, which must be an "
        "administrator's)",
    )
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print a JSON array for scripts")
    retention = argparse.ArgumentParser(add_help=False)
    retention.add_argument(
        "--retention-max-age",
        default="30D",
        help="policy stream retention by age (default %(default)s)",
    )
    retention.add_argument(
        "--retention-max-bytes",
        type=byte_size,
        default="1G",
        help="policy stream retention by size: bytes, or with K/M/G/T (default %(default)s)",
    )
    retention.add_argument(
        "--retention-segment-bytes",
        type=byte_size,
        default="16M",
        help="stream segment size; retention drops whole segments (default %(default)s)",
    )
    retention.add_argument(
        "--telemetry-max-age",
        default="90D",
        help="audit trail (edgeward.telemetry stream) retention by age (default %(default)s)",
    )
    retention.add_argument(
        "--telemetry-max-bytes",
        type=byte_size,
        default="10G",
        help="audit trail retention by size (default %(default)s)",
    )
    retention.add_argument(
        "--telemetry-segment-bytes",
        type=byte_size,
        default="16M",
        help="audit trail segment size (default %(default)s)",
    )

    parser = argparse.ArgumentParser(
        prog="edgeward",
        description="Edge-first runtime security: signed KubeArmor policies to offline-first "
        "devices over RabbitMQ.",
        epilog="Exit codes: 0 ok, 1 error, 2 bad input, 3 control plane or broker unreachable.",
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    broker = verbs.add_parser("broker", help="the RabbitMQ side").add_subparsers(
        dest="sub", required=True, metavar="ACTION"
    )
    up = broker.add_parser(
        "up", parents=[common, retention], help="check the broker answers and declare the topology"
    )
    up.add_argument(
        "--wait", type=float, default=0.0, help="keep trying this many seconds before giving up"
    )
    up.set_defaults(func=cmd_broker_up)

    cpuser = broker.add_parser(
        "control-plane-user",
        parents=[common, management],
        help="make the control plane's own least-privilege broker user",
        description="Makes (or resets) a broker user for the control plane that may declare, "
        "bind, publish and read only edgeward's exchanges and queues in the broker URL's "
        "vhost, and has no management tags; writes its login to --out (mode 0600). Run it with "
        "an administrator's login in --broker-url (or --management-url).",
    )
    cpuser.add_argument("name", help="the user name, e.g. edgeward-control-plane")
    cpuser.add_argument("--out", required=True, metavar="FILE", help="where its login goes")
    cpuser.add_argument("--force", action="store_true", help="replace an existing --out")
    cpuser.set_defaults(func=cmd_broker_control_plane_user)

    cp = verbs.add_parser("control-plane", help="the central control plane").add_subparsers(
        dest="sub", required=True, metavar="ACTION"
    )
    run = cp.add_parser(
        "run", parents=[common, retention], help="run the control plane's actors in the foreground"
    )
    run.add_argument(
        "--metrics-port",
        type=int,
        default=metrics_port_from_env(),
        metavar="PORT",
        help="serve Prometheus /metrics on this port, all interfaces (env "
        "EDGEWARD_METRICS_PORT; default off; actors/metrics.py lists the series)",
    )
    run.add_argument(
        "--snapshot-every",
        type=int,
        default=10,
        help="publish a full snapshot every N revisions (default %(default)s)",
    )
    run.add_argument(
        "--snapshot-cooldown",
        type=float,
        default=5.0,
        help="at most one device-requested snapshot per this many seconds",
    )
    run.add_argument(
        "--offline-after",
        type=float,
        default=45.0,
        help="seconds of silence before a device counts as offline (default %(default)s)",
    )
    run.add_argument(
        "--allow-shared-login",
        action="store_true",
        help="accept telemetry and heartbeats that carry no broker user_id (devices enrolled "
        "with --shared-login; development only)",
    )
    run.add_argument(
        "--collector-batch",
        type=int,
        default=250,
        metavar="N",
        help="the telemetry collector commits after N records ... (default %(default)s)",
    )
    run.add_argument(
        "--collector-batch-ms",
        type=float,
        default=200.0,
        metavar="MS",
        help="... or MS milliseconds after a batch's first record (default %(default)s)",
    )
    run.set_defaults(func=cmd_control_plane_run)

    enroll = verbs.add_parser(
        "enroll",
        parents=[common, management],
        help="register a device, make its broker user, write its agent config",
        description="Registers the device with the control plane, makes it a broker user of "
        "its own (random secret; no configure rights; may read only the policy stream and "
        "publish only telemetry.<device>.*; one connection at a time) through the management "
        "API, and writes the agent config (mode 0600) with that login.",
    )
    enroll.add_argument("device", help="device name (lower-case letters, digits, '-')")
    enroll.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a label policies can select on; repeat for more",
    )
    enroll.add_argument("--out", required=True, help="where to write the agent config")
    enroll.add_argument("--cache-dir", help="the agent's cache (default HOME/devices/DEVICE)")
    enroll.add_argument(
        "--heartbeat-interval",
        type=float,
        default=10.0,
        help="seconds between heartbeats (default %(default)s)",
    )
    enroll.add_argument(
        "--backend",
        choices=["builtin", "kubearmor"],
        default="builtin",
        help="what puts policies in force: the builtin evaluator (default) or a KubeArmor "
        "daemon over its gRPC API (TLS and keepalive: edit the config's backend section, "
        "docs/kubearmor-backend.md)",
    )
    enroll.add_argument(
        "--kubearmor-address",
        metavar="HOST:PORT",
        help="the KubeArmor daemon (default 127.0.0.1:32767)",
    )
    enroll.add_argument(
        "--device-broker-url",
        metavar="URL",
        help="the broker URL(s) as the device reaches them (default: --broker-url); the "
        "device's own login replaces the one in it",
    )
    tls = enroll.add_argument_group("TLS to the broker (amqps:// URLs; docs/tls.md)")
    tls.add_argument(
        "--tls-ca", metavar="PEM", help="the only CA the broker's certificate may chain to"
    )
    tls.add_argument(
        "--tls-cert", metavar="PEM", help="the device's client certificate (CN = device)"
    )
    tls.add_argument("--tls-key", metavar="PEM", help="its private key")
    tls.add_argument(
        "--tls-external",
        action="store_true",
        help="log in with the certificate (SASL EXTERNAL); its broker user gets no password",
    )
    enroll.add_argument(
        "--shared-login",
        action="store_true",
        help="make no broker user: the device gets the broker URL as given (development "
        "only: any holder of it can act as any device)",
    )
    enroll.set_defaults(func=cmd_enroll)

    revoke = verbs.add_parser(
        "revoke",
        parents=[common, management],
        help="delete a device's broker user, close its connection, refuse its telemetry",
        description="Deletes the device's broker user (so it cannot log in again), closes its "
        "live connections, marks it revoked in `edgeward devices`, and makes the collector "
        "refuse its telemetry from now on (kept as evidence, counted as 'revoked'). A revoked "
        "device stays revoked: enrol the hardware again under a new name.",
    )
    revoke.add_argument("device")
    revoke.add_argument(
        "--shared-login", action="store_true", help="the device had no broker user of its own"
    )
    revoke.set_defaults(func=cmd_revoke)

    agent = verbs.add_parser("agent", help="the device agent").add_subparsers(
        dest="sub", required=True, metavar="ACTION"
    )
    arun = agent.add_parser("run", help="run one device agent in the foreground")
    arun.add_argument("--config", required=True, help="the file `edgeward enroll` wrote")
    arun.add_argument("--events-from", help="builtin backend: judge JSONL events from a file/pipe")
    arun.set_defaults(func=cmd_agent_run)

    policy = verbs.add_parser("policy", help="fleet policies").add_subparsers(
        dest="sub", required=True, metavar="ACTION"
    )
    apply = policy.add_parser(
        "apply", parents=[common], help="validate, sign and publish policies (multi-document YAML)"
    )
    apply.add_argument("files", nargs="+", metavar="FILE")
    apply.set_defaults(func=cmd_policy_apply)
    delete = policy.add_parser("delete", parents=[common], help="remove a policy from the fleet")
    delete.add_argument("name")
    delete.set_defaults(func=cmd_policy_delete)
    plist = policy.add_parser("list", parents=[common, as_json], help="policies in force now")
    plist.set_defaults(func=cmd_policy_list)
    hist = policy.add_parser("history", parents=[common, as_json], help="every fleet revision")
    hist.set_defaults(func=cmd_policy_history)
    rb = policy.add_parser(
        "rollback", parents=[common], help="publish a new revision whose content equals REVISION's"
    )
    rb.add_argument("revision", type=int)
    rb.set_defaults(func=cmd_policy_rollback)
    snap = policy.add_parser(
        "snapshot", parents=[common], help="publish a full snapshot of the fleet state now"
    )
    snap.set_defaults(func=cmd_policy_snapshot)
    ptest = policy.add_parser(
        "test",
        parents=[as_json],
        help="dry run: what the policies in FILEs decide for events (nothing is published)",
        description="Judge events against the policies in FILE... as KubeArmor would and print "
        "one decision per event. Exits 0 even when events are blocked; 2 on invalid policies "
        "or events. See docs/enforcement.md.",
    )
    ptest.add_argument("files", nargs="+", metavar="FILE")
    what = ptest.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--events",
        metavar="EVENTS.jsonl",
        help="one JSON event per line ('-' reads standard input)",
    )
    what.add_argument("--exec", metavar="PATH", help="a process executes PATH")
    what.add_argument("--open", metavar="PATH", help="a process opens PATH (for reading)")
    what.add_argument("--net", metavar="PROTO", help="a process opens a TCP/UDP/ICMP/RAW socket")
    what.add_argument("--cap", metavar="NAME", help="a process uses a capability (net_raw, …)")
    ptest.add_argument("--source", metavar="PATH", help="the acting process (its binary)")
    ptest.add_argument("--write", action="store_true", help="with --open: open for writing")
    ptest.add_argument("--owner", metavar="U", help="owner of the file (for ownerOnly rules)")
    ptest.add_argument("--user", metavar="U", help="the acting user (for ownerOnly rules)")
    ptest.add_argument(
        "--default-posture",
        choices=["audit", "block"],
        default="audit",
        help="what allow-list mode does to events no Allow rule allows, for every class "
        "(default %(default)s)",
    )
    ptest.set_defaults(func=cmd_policy_test)

    sim = verbs.add_parser(
        "simulate",
        parents=[common],
        help="run a simulated fleet against a real broker and write a sizing report",
        description="Run many simulated devices (the real agent core, each with its own AMQP "
        "connection) against a real RabbitMQ, follow the scenario's timeline, measure both "
        "sides, and write report.json, report.md and charts to --report.",
    )
    sim.add_argument(
        "scenario", nargs="?", help="scenario TOML (see simulator/scenarios/); not with --recompute"
    )
    sim.add_argument(
        "--recompute",
        action="store_true",
        help="run nothing: recompute report.json, report.md and the charts in --report from "
        "its run-data.json (e.g. with other --node-memory/--node-fds/--headroom)",
    )
    sim.add_argument("--devices", type=int, help="fleet size (overrides the scenario)")
    sim.add_argument("--workers", type=int, help="worker processes (default: one per 5,000)")
    sim.add_argument(
        "--worker-host",
        action="append",
        metavar="HOST:PORT",
        help="run the worker processes on this host, where `edgeward simulate-worker "
        "--port PORT` runs, not here (repeat for several; the workers are spread over "
        "them); keeps the load generator off the broker's cores. Clocks must agree (NTP)",
    )
    sim.add_argument(
        "--worker-wait",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long --worker-host hosts are waited for (default %(default)s)",
    )
    sim.add_argument(
        "--ramp-rate",
        type=float,
        metavar="PER_SECOND",
        help="new connections per second, whole fleet (overrides the scenario)",
    )
    where = sim.add_mutually_exclusive_group()
    where.add_argument(
        "--broker",
        action="append",
        metavar="URL",
        help="node URL(s) of an existing cluster; repeat or comma-separate "
        "(default: --broker-url); needs the management API to make vhosts",
    )
    where.add_argument(
        "--local-cluster",
        type=int,
        default=0,
        metavar="K",
        help="start a throwaway K-node cluster under the report dir",
    )
    sim.add_argument(
        "--broker-config",
        help="rabbitmq.conf lines for --local-cluster nodes (e.g. charts/rabbitmq/rabbitmq.conf)",
    )
    sim.add_argument(
        "--metrics-url",
        action="append",
        help="rabbitmq_prometheus URL per node (default http://HOST:15692/metrics)",
    )
    sim.add_argument(
        "--verify",
        choices=["every", "cached"],
        help="verify every bundle per device (default) or identical bytes once per "
        "worker (a documented shortcut for broker sizing)",
    )
    sim.add_argument(
        "--share-connections",
        type=int,
        default=0,
        metavar="M",
        help="M devices per AMQP connection, to show what sharing would save",
    )
    sim.add_argument(
        "--shared-login",
        action="store_true",
        help="every device logs in with the broker URL's login (no user_id) instead of a "
        "broker user of its own, made for the run and removed after it (the default; "
        "--share-connections implies this)",
    )
    sim.add_argument("--no-baseline", action="store_true", help="skip the raw baseline phase")
    sim.add_argument(
        "--baseline-only",
        action="store_true",
        help="run only the raw baseline (sizes the broker for bare connections)",
    )
    sim.add_argument(
        "--baseline-delivery",
        choices=["stream", "queue"],
        default="stream",
        help="raw devices consume the policy stream (default, like the agent) or "
        "an exclusive queue each bound to the policy exchange (the cheaper "
        "alternative in DESIGN.md)",
    )
    sim.add_argument("--report", required=True, metavar="DIR", help="where the report goes")
    sim.add_argument(
        "--node-memory",
        type=float,
        default=16,
        metavar="GIB",
        help="sizing: memory of a broker node (default %(default)s GiB)",
    )
    sim.add_argument(
        "--node-fds",
        type=int,
        default=65536,
        help="sizing: file descriptors a node may open (default %(default)s)",
    )
    sim.add_argument("--node-cores", type=int, default=4, help="sizing: cores of a node")
    sim.add_argument(
        "--headroom",
        type=float,
        default=0.3,
        help="sizing: share of each limit kept free (default %(default)s)",
    )
    sim.add_argument(
        "--reconnect-target",
        type=float,
        default=180.0,
        metavar="SECONDS",
        help="sizing: the whole fleet reconnected within this (CPU; default %(default)s)",
    )
    sim.add_argument(
        "--rollout-target",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="sizing: a revision delivered to every device within this (CPU; default %(default)s)",
    )
    sim.set_defaults(func=cmd_simulate)

    simw = verbs.add_parser(
        "simulate-worker",
        help="host a simulation's worker processes here, for a run on another host",
        description="Start an actor system that hosts the worker processes (and their "
        "simulated devices) of `edgeward simulate --worker-host THIS_HOST:PORT` runs, one "
        "after another, until Ctrl-C. The devices connect to the run's broker URLs from "
        "here, so those must be reachable from this host.",
    )
    simw.add_argument(
        "--port",
        type=int,
        default=1960,
        help="the port the run's host reaches this one at (default %(default)s)",
    )
    simw.add_argument(
        "--address",
        help="this host's address as the run's host reaches it (default: Thespian's guess; "
        "give it on hosts with several interfaces)",
    )
    simw.add_argument(
        "--name",
        help="how reports name this host (default HOSTNAME:PORT)",
    )
    simw.set_defaults(func=cmd_simulate_worker)

    keys = verbs.add_parser(
        "keys", help="the fleet's signing keys: list, rotate, revoke"
    ).add_subparsers(dest="sub", required=True, metavar="ACTION")
    klist = keys.add_parser("list", parents=[common, as_json], help="keys devices trust")
    klist.set_defaults(func=cmd_keys_list)
    krotate = keys.add_parser(
        "rotate",
        parents=[common],
        help="a new signing key, announced in a revision the current key signs",
        description="Makes a new Ed25519 signing key and publishes a revision (no policy "
        "change) signed by the current key whose keyring names the new key; once the broker "
        "confirms it, the new key signs everything. Devices that read that revision trust the "
        "new key, and the old one only for bundles issued within --overlap of now.",
    )
    krotate.add_argument(
        "--overlap",
        default="7d",
        help="how long bundles signed by the old key stay good (default %(default)s; 0s for "
        "a compromised key, then `keys revoke` it)",
    )
    krotate.set_defaults(func=cmd_keys_rotate)
    krevoke = keys.add_parser(
        "revoke",
        parents=[common],
        help="stop devices trusting a key at once (not the active one: rotate first)",
    )
    krevoke.add_argument("key_id")
    krevoke.set_defaults(func=cmd_keys_revoke)

    devices = verbs.add_parser(
        "devices", parents=[common, as_json], help="desired versus reported state of every device"
    )
    devices.add_argument("--state", choices=STATES, help="only devices in this state")
    devices.set_defaults(func=cmd_devices)

    alerts = verbs.add_parser(
        "alerts",
        parents=[common, as_json],
        help="alerts the devices sent, from the audit store",
        description="Alerts the TelemetryCollector stored, oldest first (the latest --limit). "
        "With --follow, new alerts are printed as they are stored until Ctrl-C (exit 0); "
        "--follow --json prints one JSON object per line. See docs/telemetry.md.",
    )
    alerts.add_argument("--device", help="only this device's alerts")
    alerts.add_argument("--policy", help="only alerts decided by this policy")
    alerts.add_argument("--severity", type=int, metavar="N", help="only severity N or higher")
    alerts.add_argument(
        "--since",
        metavar="TIME",
        help="only alerts seen at or after TIME: ISO 8601 (naive = local time) or an age "
        "like 10m, 2h, 1d",
    )
    alerts.add_argument("--follow", "-f", action="store_true", help="keep printing new alerts")
    alerts.add_argument(
        "--limit", type=int, default=100, help="the latest N (default %(default)s; 0 for all)"
    )
    alerts.add_argument(
        "--interval", type=float, default=0.5, help=argparse.SUPPRESS
    )  # --follow's polling period
    alerts.add_argument(
        "--store",
        metavar="FILE",
        help="read an audit store file (e.g. from `audit replay`) instead of the control plane",
    )
    alerts.set_defaults(func=cmd_alerts)

    audit = verbs.add_parser("audit", help="the audit trail").add_subparsers(
        dest="sub", required=True, metavar="ACTION"
    )
    areplay = audit.add_parser(
        "replay",
        parents=[common],
        help="re-read the telemetry stream from a time into a fresh audit store",
        description="Read the edgeward.telemetry stream from TIME (as the broker stored it; "
        "precise to a stream chunk) to its end into a new SQLite audit store, deduplicated "
        "and checked as the collector does, and say how many records were read. Query the "
        "result with `edgeward alerts --store FILE`.",
    )
    areplay.add_argument(
        "--from",
        dest="since",
        required=True,
        metavar="TIME",
        help="ISO 8601 (naive = local time) or an age like 10m, 2h, 1d",
    )
    areplay.add_argument(
        "--into", metavar="FILE", help="the new store (default HOME/audit-replay-<time>.sqlite)"
    )
    areplay.set_defaults(func=cmd_audit_replay)
    astatus = audit.add_parser(
        "status",
        parents=[common, as_json],
        help="what the audit trail holds and how far the collector is behind the stream",
        description="Records stored by type, devices and time span, duplicates skipped, "
        "messages refused by reason, the stored stream offset, and (from the running control "
        "plane and the broker) the stream's tail, the collector's lag in offsets, and its "
        "reader's state. With --store, only what that file holds.",
    )
    astatus.add_argument(
        "--store", metavar="FILE", help="an audit store file (e.g. from `audit replay`)"
    )
    astatus.set_defaults(func=cmd_audit_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .runtime import ControlPlaneUnreachable

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PolicyValidationError as exc:
        print(f"edgeward: refused, nothing was published:\n{exc}", file=sys.stderr)
        return EXIT["bad_input"]
    except CliError as exc:
        print(f"edgeward: {exc}", file=sys.stderr)
        return EXIT[exc.code]
    except TopologyConflict as exc:
        print(f"edgeward: {exc}", file=sys.stderr)
        return EXIT["bad_input"]
    except (ControlPlaneUnreachable, BrokerUnreachable) as exc:
        print(f"edgeward: {exc}", file=sys.stderr)
        return EXIT["unreachable"]
    except ValueError as exc:
        print(f"edgeward: {exc}", file=sys.stderr)
        return EXIT["bad_input"]
    except KeyboardInterrupt:
        return EXIT["interrupted"]


if __name__ == "__main__":
    sys.exit(main())
