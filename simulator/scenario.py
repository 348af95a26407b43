"""Scenario files: what a simulation run does, in TOML.

```toml
name = "smoke"
devices = 200               # fleet size (``--devices`` overrides)
duration = 30               # seconds, from the first connect attempt
heartbeat_interval = 10     # seconds between a device's heartbeats
telemetry = true            # devices keep a telemetry outbox and a channel to drain it,
                            # as agents do (false: the policy path alone, lighter)
alert_rate = 0.0            # alerts per device per second (Poisson), sent as telemetry
outbox_max_records = 10000  # each device's telemetry outbox bound (the agent's default)
verify = "every"            # "every" device verifies every bundle, or "cached" per worker
baseline = true             # measure the raw broker floor first (devices that only ack)
shared_login = false        # true: every device logs in with the broker URL's login
                            # (``--shared-login``) instead of a broker user of its own
workers = 0                 # worker processes; 0 = one per 5,000 devices

[labels]                    # the label mix: key -> {value = weight}
store = { berlin = 5, paris = 3, rome = 2 }

[ramp]
rate = 200                  # new connections per second, whole fleet
reconnect_spread = 30       # after "restore", devices spread their first attempt over
                            # this many seconds (full jitter), as agents coming back do

[churn]                     # devices going offline and back on their own
offline_fraction = 0.1      # share of the fleet offline at any time
mean_offline = 20           # seconds offline, exponentially distributed

[[timeline]]                # actions at t seconds after the ramp ends
at = 5
action = "apply"            # apply | restart-node | cut | restore
policies = 20               # policies in the revision's fleet state
changed = 1                 # of which this revision changes (delta size)
selector = "store=berlin"   # which devices the changed policies select ("*" = all)
```

Bad files get :class:`ScenarioError` naming the file and the key.
"""

from __future__ import annotations

import tomllib
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeward.actors.outbox import DEFAULT_MAX_RECORDS

ACTIONS = ("apply", "restart-node", "cut", "restore")


class ScenarioError(ValueError):
    pass


@dataclass(frozen=True)
class Step:
    at: float
    action: str
    policies: int = 10
    changed: int = 1
    selector: str = "*"
    node: int = 1


@dataclass(frozen=True)
class Scenario:
    name: str
    devices: int
    duration: float
    heartbeat_interval: float = 10.0
    telemetry: bool = True
    alert_rate: float = 0.0
    outbox_max_records: int = DEFAULT_MAX_RECORDS
    verify: str = "every"
    baseline: bool = True
    shared_login: bool = False
    workers: int = 0
    labels: dict[str, dict[str, float]] = field(default_factory=dict)
    ramp_rate: float = 200.0
    reconnect_spread: float = 30.0
    offline_fraction: float = 0.0
    mean_offline: float = 30.0
    timeline: tuple[Step, ...] = ()
    source: str = ""

    @property
    def worker_count(self) -> int:
        return self.workers or max(1, -(-self.devices // 5000))

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def _get(table: dict, key: str, typ: type | tuple, where: str, default: Any = ...) -> Any:
    if key not in table:
        if default is ...:
            raise ScenarioError(f"{where}: `{key}` is required")
        return default
    value = table[key]
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, typ) or (isinstance(value, bool) and typ is not bool):
        name = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
        raise ScenarioError(f"{where}: `{key}` must be {name}, not {value!r}")
    return value


def _positive(value: float, key: str, where: str, *, zero_ok: bool = False) -> float:
    if value < 0 or (value == 0 and not zero_ok):
        raise ScenarioError(f"{where}: `{key}` must be {'>= 0' if zero_ok else '> 0'}")
    return value


KNOWN = {
    "name",
    "devices",
    "duration",
    "heartbeat_interval",
    "telemetry",
    "alert_rate",
    "outbox_max_records",
    "verify",
    "baseline",
    "shared_login",
    "workers",
    "labels",
    "ramp",
    "churn",
    "timeline",
}


def parse(text: str, source: str = "<scenario>") -> Scenario:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{source}: not TOML: {exc}") from None
    unknown = sorted(set(data) - KNOWN)
    if unknown:
        raise ScenarioError(f"{source}: unknown keys {unknown} (known: {sorted(KNOWN)})")
    w = source
    devices = int(_positive(_get(data, "devices", int, w), "devices", w))
    duration = _positive(_get(data, "duration", float, w), "duration", w)
    verify = _get(data, "verify", str, w, "every")
    if verify not in ("every", "cached"):
        raise ScenarioError(f'{w}: `verify` must be "every" or "cached"')
    labels: dict[str, dict[str, float]] = {}
    for key, mix in _get(data, "labels", dict, w, {}).items():
        if not isinstance(mix, dict) or not mix:
            raise ScenarioError(f"{w}: labels.{key} must be a table of value = weight")
        for value, weight in mix.items():
            if not isinstance(weight, int | float) or weight <= 0:
                raise ScenarioError(f"{w}: labels.{key}.{value} must be a positive weight")
        labels[key] = {str(v): float(wt) for v, wt in mix.items()}
    ramp = _get(data, "ramp", dict, w, {})
    churn = _get(data, "churn", dict, w, {})
    offline_fraction = _get(churn, "offline_fraction", float, f"{w}: churn", 0.0)
    if not 0 <= offline_fraction < 1:
        raise ScenarioError(f"{w}: churn.offline_fraction must be in [0, 1)")
    steps = []
    for i, raw in enumerate(_get(data, "timeline", list, w, [])):
        where = f"{w}: timeline[{i}]"
        if not isinstance(raw, dict):
            raise ScenarioError(f"{where}: must be a table")
        action = _get(raw, "action", str, where)
        if action not in ACTIONS:
            raise ScenarioError(f"{where}: action must be one of {', '.join(ACTIONS)}")
        extra = sorted(set(raw) - {"at", "action", "policies", "changed", "selector", "node"})
        if extra:
            raise ScenarioError(f"{where}: unknown keys {extra}")
        step = Step(
            at=_positive(_get(raw, "at", float, where), "at", where, zero_ok=True),
            action=action,
            policies=int(_positive(_get(raw, "policies", int, where, 10), "policies", where)),
            changed=int(_positive(_get(raw, "changed", int, where, 1), "changed", where)),
            selector=_get(raw, "selector", str, where, "*"),
            node=int(_positive(_get(raw, "node", int, where, 1), "node", where)),
        )
        if step.changed > step.policies:
            raise ScenarioError(f"{where}: `changed` cannot exceed `policies`")
        if step.selector != "*" and "=" not in step.selector:
            raise ScenarioError(f'{where}: selector must be "*" or key=value')
        steps.append(step)
    telemetry = _get(data, "telemetry", bool, w, True)
    if not telemetry and data.get("alert_rate", 0):
        raise ScenarioError(f"{w}: `alert_rate` needs `telemetry = true` (alerts are telemetry)")
    return Scenario(
        name=_get(data, "name", str, w, Path(source).stem),
        devices=devices,
        duration=duration,
        heartbeat_interval=_positive(
            _get(data, "heartbeat_interval", float, w, 10.0), "heartbeat_interval", w
        ),
        telemetry=telemetry,
        alert_rate=_positive(
            _get(data, "alert_rate", float, w, 0.0), "alert_rate", w, zero_ok=True
        ),
        outbox_max_records=int(
            _positive(
                _get(data, "outbox_max_records", int, w, DEFAULT_MAX_RECORDS),
                "outbox_max_records",
                w,
            )
        ),
        verify=verify,
        baseline=_get(data, "baseline", bool, w, True),
        shared_login=_get(data, "shared_login", bool, w, False),
        workers=int(_positive(_get(data, "workers", int, w, 0), "workers", w, zero_ok=True)),
        labels=labels,
        ramp_rate=_positive(_get(ramp, "rate", float, f"{w}: ramp", 200.0), "rate", w),
        reconnect_spread=_positive(
            _get(ramp, "reconnect_spread", float, f"{w}: ramp", 30.0),
            "reconnect_spread",
            w,
            zero_ok=True,
        ),
        offline_fraction=offline_fraction,
        mean_offline=_positive(
            _get(churn, "mean_offline", float, f"{w}: churn", 30.0), "mean_offline", w
        ),
        timeline=tuple(sorted(steps, key=lambda s: s.at)),
        source=source,
    )


def load(path: str | Path) -> Scenario:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read: {exc.strerror}") from None
    return parse(text, str(path))


def labels_for(scenario: Scenario, index: int) -> dict[str, str]:
    """Device ``index``'s labels: the mix spread evenly and deterministically."""
    labels = {}
    for key, mix in scenario.labels.items():
        total = sum(mix.values())
        # a low-discrepancy walk over [0, 1): golden-ratio steps
        x = ((index + 1) * 0.6180339887498949 + zlib.crc32(key.encode()) % 1000 / 1000) % 1.0
        acc = 0.0
        for value, weight in mix.items():
            acc += weight / total
            if x < acc:
                labels[key] = value
                break
        else:
            labels[key] = next(reversed(mix))
    return labels


def device_name(index: int) -> str:
    return f"sim-{index:06d}"
