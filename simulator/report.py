"""The simulation report: every figure of a run, the broker sizing, and charts.

:func:`compute` turns a :class:`~edgeward.simulator.model.RunData` into one
JSON-able dict of figures; :func:`write` puts that dict (plus the raw series)
in ``report.json``, a one-minute summary for planners in ``report.md``, and
PNG charts beside them.  Both work on a partial run (Ctrl-C): whatever was
recorded is reported and the report says it is partial.

How the figures are defined:

* **Propagation** — seconds from a revision's publish to "in force" on each
  device that was online when it was published (``Rollout.latencies``).
  Percentiles interpolate linearly between the sorted values (numpy's
  default).  *Time to 99% / 100%* is the latency of the k-th device to put
  the revision in force, k = ceil(0.99 × online targeted devices) and all of
  them; null when fewer devices got there.
* **Raw baseline ratio** — edgeward's full-fleet time (the largest latency of
  any rollout) divided by the raw broker's full-fleet fan-out time (the
  largest receive latency of one probe, median over the probes).
* **Broker cost per connection / per device** — the nodes are summed at the
  moment the broker held the most connections; from that, each node's first
  sample with about no connections is subtracted; the difference is divided
  by the connections (and by the devices connected then).
* **Sizing** — for each fleet size, nodes needed by memory (usable per node =
  memory × RabbitMQ's default high watermark 0.4 × (1 − headroom), less the
  node's idle memory) and by file descriptors (limit × (1 − headroom), less
  the idle fds); the larger count binds.  Broker CPU is not sampled, so CPU is
  not modelled.
* **Telemetry** — *sent*: records the devices put in their outboxes (alerts,
  the core's events, drop reports); *received*: distinct (device, seq) read
  from the telemetry stream; *dropped*: what the outboxes dropped.  Balanced
  when sent = received + dropped; records still in outboxes at the end (on
  devices offline then, or not drained in time) are named as such.  The
  end-to-end latency of a record is its receipt time minus the record time
  the device gave it (one machine, one clock), percentiles as above, of all
  records and by type.

matplotlib is optional (the ``sim`` extra): it is imported only to draw, and
without it the report is written with a note that the charts were skipped.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edgeward.simulator.model import (
    OWN_HOST,
    SLOW_TURN_S,
    Action,
    BrokerSample,
    FleetSample,
    Rollout,
    RunData,
)

# Planners' defaults for one broker node.
DEFAULT_NODE_MEMORY_BYTES = 16 * 2**30
DEFAULT_NODE_FDS = 65_536
DEFAULT_NODE_CORES = 4
DEFAULT_HEADROOM = 0.3
RUN_DATA = "run-data.json"  # the raw data a report is computed from

# RabbitMQ's default vm_memory_high_watermark.relative: past it, publishers block.
MEMORY_HIGH_WATERMARK = 0.4
FLEET_SIZES = (10_000, 35_000, 100_000)
# A replicated stream wants a member on each of three nodes.
STREAM_REPLICATION_NODES = 3
# Timeline actions that move or drop connections: costs are measured before them.
DISRUPTIVE_ACTIONS = frozenset({"restart-node", "cut", "churn"})
#: Defaults of the CPU sizing targets: the whole fleet reconnected (a storm)
#: and a revision delivered to every device within these many seconds.
DEFAULT_RECONNECT_TARGET = 180.0
DEFAULT_ROLLOUT_TARGET = 10.0
#: A quiet window shorter than this cannot tell the steady CPU per device.
MIN_QUIET_SECONDS = 5.0
# Fewer connections than this and the broker's own noise (GC, stats) swamps
# the per-connection difference: no per-connection cost is claimed.
MIN_CONNECTIONS_TO_MEASURE = 100
# "About no connections": the control plane holds a few of its own.
IDLE_CONNECTIONS_ABSOLUTE = 10
IDLE_CONNECTIONS_FRACTION = 0.05

CHARTS = (
    "connected.png",
    "propagation_cdf.png",
    "in_sync.png",
    "broker.png",
    "rates.png",
    "client.png",
)
CONFIG_FILE = "charts/rabbitmq/rabbitmq.conf"
_KIB = 1024
_MIB = 1024**2
_GIB = 1024**3


# --------------------------------------------------------------------------
# Small arithmetic


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between closest ranks; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def time_to_fraction(latencies: Sequence[float], total: int, fraction: float) -> float | None:
    """Seconds until ``fraction`` of ``total`` devices had it; None if never."""
    if total <= 0:
        return None
    needed = max(1, _ceil(total * fraction))
    if len(latencies) < needed:
        return None
    return sorted(latencies)[needed - 1]


def cdf(latencies: Iterable[float], total: int) -> list[tuple[float, float]]:
    """Points (latency, % of ``total`` that had it by then), as a step curve.

    It ends at 100% only when every one of ``total`` devices got there.
    """
    ordered = sorted(latencies)
    if total <= 0:
        return []
    return [(value, 100.0 * (i + 1) / total) for i, value in enumerate(ordered)]


def rates(times: Sequence[float], counters: Sequence[float]) -> list[tuple[float, float]]:
    """Per-second rates (at interval midpoints) from a cumulative counter.

    A counter that goes down was reset (a node restarted): that interval is
    skipped rather than reported as a negative rate.
    """
    out = []
    for i in range(1, len(times)):
        dt = times[i] - times[i - 1]
        dv = counters[i] - counters[i - 1]
        if dt > 0 and dv >= 0:
            out.append(((times[i] + times[i - 1]) / 2, dv / dt))
    return out


def _ceil(x: float) -> int:
    """ceil that does not turn 3.0000000000004 into 4."""
    return math.ceil(x - 1e-9)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _r(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


# --------------------------------------------------------------------------
# compute()


def compute(
    run: RunData,
    *,
    node_memory_bytes: int = DEFAULT_NODE_MEMORY_BYTES,
    node_fds: int = DEFAULT_NODE_FDS,
    node_cores: int = DEFAULT_NODE_CORES,
    headroom: float = DEFAULT_HEADROOM,
    reconnect_target: float = DEFAULT_RECONNECT_TARGET,
    rollout_target: float = DEFAULT_ROLLOUT_TARGET,
) -> dict[str, Any]:
    """Every figure of ``run``, machine-readable (no raw series)."""
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom must be in [0, 1), got {headroom!r}")
    if reconnect_target <= 0 or rollout_target <= 0:
        raise ValueError("the reconnect and rollout targets must be positive seconds")
    if node_memory_bytes <= 0 or node_fds <= 0 or node_cores <= 0:
        raise ValueError("node memory, fds and cores must be positive")
    notes: list[str] = list(run.notes)
    if not run.completed:
        notes.append(
            f"Partial run: stopped after {run.duration:.1f} s; "
            "the figures cover only what was recorded until then."
        )

    propagation = _propagation(run, notes)
    baseline = _baseline(run, propagation, notes)
    broker = _broker(run, notes)
    client = _client(run)
    converged, convergence = _convergence(run, notes)
    logins = _logins(run, notes)
    if _ran_elsewhere(run.worker_hosts):
        notes.append(
            "The devices ran on other hosts (--worker-host): propagation and telemetry "
            "latency are receipt times there minus publish or record times on the run's "
            "host and the devices', good to the hosts' clock agreement (NTP keeps it "
            "within milliseconds)."
        )

    return {
        "devices": run.devices,
        "workers": run.workers,
        "worker_hosts": dict(run.worker_hosts),
        "connected_max": max((s.connected for s in run.samples), default=None),
        "converged": converged,
        "convergence": convergence,
        "propagation_ms": propagation,
        "baseline": baseline,
        "raw_baseline_ratio": baseline["ratio"] if baseline else None,
        "messages_lost": _messages_lost(run, notes),
        "messages": {
            "expected": run.messages_expected,
            "received": run.messages_received,
        },
        "unexpected_closes": run.unexpected_closes,
        "ramp_seconds": _r(run.ramp_seconds),
        "connect_rate_per_second": _connect_rate(run),
        "reconnect": dict(run.reconnect),
        "errors": _errors(run),
        "telemetry": _telemetry(run, notes),
        "heartbeats_sent": run.heartbeats_sent,
        "client": client,
        "broker": broker,
        "sizing": _sizing(
            run,
            broker,
            node_memory_bytes=node_memory_bytes,
            node_fds=node_fds,
            node_cores=node_cores,
            headroom=headroom,
            reconnect_target=reconnect_target,
            rollout_target=rollout_target,
        ),
        "scenario": run.scenario,
        "versions": run.versions,
        "machine": run.machine,
        "verify": run.verify,
        "share_connections": run.share_connections,
        "logins": logins,
        "broker_config": run.broker_config,
        "brokers": run.brokers,
        "nodes": run.nodes,
        "started_at": run.started_at,
        "duration": _r(run.duration),
        "completed": run.completed,
        "notes": notes,
    }


def _rollout_figures(
    rollout: Rollout, baseline_full: float | None, parallel: int = 1
) -> dict[str, Any]:
    """One revision's figures; ``parallel`` is how many worker processes could
    run at once (workers, at most the machine's cores)."""
    lat = rollout.latencies
    full = max(lat) if lat else None
    reached = len(lat)
    return {
        "revision": rollout.revision,
        "t": _r(rollout.t),
        "targeted": rollout.targeted,
        "online_at_publish": rollout.online_at_publish,
        "in_force": reached,
        "late": len(rollout.late),
        "late_max_ms": _ms(max(rollout.late)) if rollout.late else None,
        "p50": _ms(percentile(lat, 50)),
        "p90": _ms(percentile(lat, 90)),
        "p99": _ms(percentile(lat, 99)),
        "max": _ms(full),
        "time_to_99_ms": _ms(time_to_fraction(lat, rollout.online_at_publish, 0.99)),
        "time_to_100_ms": _ms(time_to_fraction(lat, rollout.online_at_publish, 1.0)),
        "raw_baseline_ratio": (
            _r(full / baseline_full) if full is not None and baseline_full else None
        ),
        "deliveries_processed": rollout.processed,
        "device_processing_us": (
            _r(rollout.processing_seconds / rollout.processed * 1e6) if rollout.processed else None
        ),
        "client_processing_s": _r(rollout.processing_seconds),
        # The least wall time the load generator needed for that work with
        # its workers side by side: time a real fleet (a CPU per device) spends
        # in parallel, and part of every propagation figure measured here.
        "client_serial_ms": _ms(rollout.processing_seconds / max(1, parallel)),
    }


def _baseline_full_fanout(run: RunData) -> float | None:
    probes = [max(f) for f in (run.baseline.fanouts if run.baseline else []) if f]
    return statistics.median(probes) if probes else None


def _propagation(run: RunData, notes: list[str]) -> dict[str, Any]:
    baseline_full = _baseline_full_fanout(run)
    everything = [x for r in run.rollouts for x in r.latencies]
    cores = int((run.machine or {}).get("cores") or 1)
    parallel = max(1, min(run.workers or 1, cores))
    per_revision = [_rollout_figures(r, baseline_full, parallel) for r in run.rollouts]
    for r in per_revision:
        if r["online_at_publish"] and r["in_force"] < r["online_at_publish"]:
            notes.append(
                f"Revision {r['revision']}: {r['in_force']} of {r['online_at_publish']} "
                "devices online at publish put it in force (the rest went offline, "
                "or did not get it)."
            )
        if r["in_force"] > r["online_at_publish"] and run.slowest_turn_s >= SLOW_TURN_S:
            notes.append(
                f"Revision {r['revision']}: {r['in_force']} devices put it in force, "
                f"{r['online_at_publish']} counted online at publish: the workers were "
                f"overloaded (a loop turn took up to {run.slowest_turn_s:.0f} s) and took "
                "the run's commands late, so devices whose worker had not yet cut them "
                "received it."
            )
        elif r["in_force"] > r["online_at_publish"]:
            notes.append(
                f"Revision {r['revision']}: {r['in_force']} latencies for "
                f"{r['online_at_publish']} devices online at publish — a counting bug."
            )
    if not run.rollouts:
        notes.append("No rollouts were recorded: no propagation figures.")

    def worst(key: str) -> float | None:
        values = [r[key] for r in per_revision]
        if not values or any(v is None for v in values):
            return None
        return max(values)

    return {
        "p50": _ms(percentile(everything, 50)),
        "p90": _ms(percentile(everything, 90)),
        "p99": _ms(percentile(everything, 99)),
        "max": _ms(max(everything)) if everything else None,
        "count": len(everything),
        # The slowest rollout; null if any rollout never got there.
        "time_to_99_ms": worst("time_to_99_ms"),
        "time_to_100_ms": worst("time_to_100_ms"),
        "per_revision": per_revision,
    }


def _baseline(run: RunData, propagation: dict[str, Any], notes: list[str]) -> dict[str, Any] | None:
    base = run.baseline
    if base is None:
        notes.append("No raw baseline was measured: no ratio to it.")
        return None
    probes = [f for f in base.fanouts if f]
    full = _baseline_full_fanout(run)
    pooled = [x for f in probes for x in f]
    short = [i for i, f in enumerate(probes) if len(f) < base.connected]
    if short:
        notes.append(
            f"Baseline: {len(short)} of {len(probes)} probes reached fewer than the "
            f"{base.connected} connected devices."
        )
    edgeward_full = propagation["max"]
    ratio = None
    if full and edgeward_full is not None:
        ratio = _r(edgeward_full / 1000 / full)
    return {
        "devices": base.devices,
        "connected": base.connected,
        "probes": len(probes),
        "probe_bytes": base.probe_bytes,
        "p50_ms": _ms(percentile(pooled, 50)),
        "p99_ms": _ms(percentile(pooled, 99)),
        "full_fanout_ms": _ms(full),
        "full_fanout_ms_per_probe": [_ms(max(f)) for f in probes],
        "ratio": ratio,
        "ratio_basis": (
            "edgeward's slowest rollout to its last online targeted device (max latency) "
            "÷ the raw full-fleet fan-out (max receive latency per probe, median over probes)"
        ),
    }


def _convergence(run: RunData, notes: list[str]) -> tuple[bool, dict[str, Any]]:
    if not run.samples:
        return False, {"reason": "no fleet samples were recorded"}
    last = run.samples[-1]
    detail: dict[str, Any] = {
        "t": _r(last.t),
        "online": last.online,
        "in_sync": last.in_sync,
        "connected": last.connected,
    }
    reasons = []
    if last.in_sync > last.online:
        notes.append(
            f"Last sample: {last.in_sync} in sync but only {last.online} online — a counting bug."
        )
    if last.in_sync != last.online:
        reasons.append(f"{last.online - last.in_sync} online devices not in sync at the end")
    if run.rollouts:
        latest = max(run.rollouts, key=lambda r: r.revision)
        detail["latest_revision"] = latest.revision
        detail["latest_in_force"] = len(latest.latencies)
        detail["latest_online_at_publish"] = latest.online_at_publish
        if last.t < latest.t:
            reasons.append(f"the last sample predates revision {latest.revision}'s publish")
        # Devices taken offline after the publish rightly never got it; the
        # last sample speaks for them.  Otherwise every one must have.
        went_offline = any(a.kind in ("cut", "churn") and a.t >= latest.t for a in run.actions)
        if len(latest.latencies) < latest.online_at_publish and not went_offline:
            reasons.append(
                f"revision {latest.revision} in force on {len(latest.latencies)} of "
                f"{latest.online_at_publish} devices online at publish"
            )
    detail["reason"] = "; ".join(reasons) if reasons else None
    return not reasons, detail


def _messages_lost(run: RunData, notes: list[str]) -> int | None:
    lost = run.messages_expected - run.messages_received
    if lost < 0:
        notes.append(
            f"Bug: devices received {run.messages_received} messages but only "
            f"{run.messages_expected} were expected (duplicates counted, or the "
            "expectation is short); messages lost is unknown."
        )
        return None
    return lost


def _connect_rate(run: RunData) -> float | None:
    connected = max((s.connected for s in run.samples), default=0)
    if not run.ramp_seconds or run.ramp_seconds <= 0 or not connected:
        return None
    return round(connected / run.ramp_seconds, 1)


def _errors(run: RunData) -> dict[str, Any]:
    by_kind = dict(sorted(run.errors.items(), key=lambda kv: (-kv[1], kv[0])))
    return {
        "total": sum(by_kind.values()),
        "by_kind": by_kind,
        "cumulative_at_last_sample": run.samples[-1].errors if run.samples else None,
    }


def _logins(run: RunData, notes: list[str]) -> dict[str, Any]:
    """How the devices logged in, and what making (and removing) their
    broker users took: set-up, before any phase, not part of the ramp."""
    logins = dict(run.logins) or {
        "mode": "shared",
        "reason": "a run from before the simulator made a broker user per device",
    }
    if logins.get("mode") != "device":
        notes.append(
            "Logins: every device logged in with the shared login of the broker URL "
            f"({logins.get('reason', 'asked for')}), not as a broker user of its own, and "
            "stamped no user_id: real devices each have a user (enroll), which the broker "
            "checks at every login and publish."
        )
        return logins
    if logins.get("problem"):
        notes.append(f"Logins: {logins['problem']}.")
    elif logins.get("left"):
        notes.append(
            f"Logins: {logins['left']:,} of the run's device users were still on the broker "
            "after it."
        )
    if logins.get("limit_applied") is False:
        notes.append(
            "Logins: the broker did not keep the device users' max-connections limit "
            "(is the user_limits feature flag off?): devices could open more than one "
            "connection, and the broker counted none per user."
        )
    if logins.get("existing_before"):
        notes.append(
            f"Logins: {logins['existing_before']:,} users named like this run's devices were "
            "already on the broker (left by an earlier run?); they were replaced, then removed."
        )
    stamped = run.telemetry_stamped
    if stamped is not None and stamped < run.telemetry_received:
        notes.append(
            f"Logins: only {stamped:,} of the {run.telemetry_received:,} telemetry records read "
            "carried their device's user_id."
        )
    return logins


def _telemetry(run: RunData, notes: list[str]) -> dict[str, Any]:
    accounted = run.telemetry_received + run.telemetry_dropped_reported
    balanced = run.telemetry_sent == accounted
    if not balanced:
        gap = run.telemetry_sent - accounted
        if gap > 0 and gap <= run.telemetry_waiting:
            where = (
                f" ({run.telemetry_waiting_offline} on devices offline at the end)"
                if run.telemetry_waiting_offline
                else ""
            )
            notes.append(
                f"Telemetry does not add up: {gap} records were still in outboxes "
                f"at the end{where}, not lost."
            )
        else:
            what = "unaccounted for (lost)" if gap > 0 else "more than sent (duplicates)"
            notes.append(f"Telemetry does not add up: {abs(gap)} records {what}.")
    latency = run.telemetry_latency_ms or {}
    return {
        "sent": run.telemetry_sent,
        "received": run.telemetry_received,
        "dropped_reported": run.telemetry_dropped_reported,
        "balanced": balanced,
        "exercised": run.telemetry_sent > 0,
        "alerts": run.telemetry_alerts,
        "waiting_at_end": run.telemetry_waiting,
        "waiting_offline_at_end": run.telemetry_waiting_offline,
        "duplicates_read": run.telemetry_duplicates,
        # Records published with their device's broker login as user_id.
        "stamped": run.telemetry_stamped,
        "drained": run.telemetry_drained,
        # Device's record time -> read from the stream, per distinct record.
        "latency_ms": {k: latency.get(k) for k in ("p50", "p90", "p99", "max")},
        "latency_count": latency.get("count", 0),
        "latency_ms_by_type": dict(latency.get("by_type", {})),
    }


def _client(run: RunData) -> dict[str, Any]:
    samples = run.samples
    connected = max((s.connected for s in samples), default=0)
    peak_rss = max((s.client_rss_bytes for s in samples), default=None)
    cpu = samples[-1].client_cpu_seconds if samples else None
    base = run.client_base_rss_bytes
    return {
        "peak_rss_bytes": peak_rss,
        "base_rss_bytes": base,
        # KiB of worker RSS per connected device: (peak RSS - the workers' RSS
        # before they made their devices) / most devices connected.
        "rss_per_device_kib": (
            round((peak_rss - base) / connected / _KIB, 1)
            if peak_rss is not None and connected
            else None
        ),
        "cpu_seconds": _r(cpu),
        "cpu_seconds_per_device": (
            round(cpu / run.devices, 6) if cpu is not None and run.devices else None
        ),
        "mean_cpu_percent": (
            round(100 * cpu / samples[-1].t, 1) if cpu is not None and samples[-1].t > 0 else None
        ),
    }


def _by_node(samples: Iterable[BrokerSample]) -> dict[str, list[BrokerSample]]:
    nodes: dict[str, list[BrokerSample]] = {}
    for s in sorted(samples, key=lambda s: s.t):
        nodes.setdefault(s.node, []).append(s)
    return nodes


def _idle_sample(series: list[BrokerSample]) -> BrokerSample | None:
    peak = max(s.connections for s in series)
    limit = max(IDLE_CONNECTIONS_ABSOLUTE, IDLE_CONNECTIONS_FRACTION * peak)
    return next((s for s in series if s.connections <= limit), None)


def _broker_peak_moment(
    nodes: dict[str, list[BrokerSample]], before: float
) -> tuple[float, dict[str, BrokerSample]] | None:
    """The moment before ``before`` when the nodes together held the most connections.

    At each sample time each node counts with its latest sample, provided it
    is recent (within 1.5 × that node's median sampling interval); moments
    where a node has no recent sample (down, or not yet scraped) are skipped.
    """
    stale = {}
    for name, series in nodes.items():
        gaps = [b.t - a.t for a, b in zip(series, series[1:], strict=False) if b.t > a.t]
        stale[name] = 1.5 * statistics.median(gaps) if gaps else math.inf
    moments: list[tuple[float, float, dict[str, BrokerSample]]] = []
    for t in sorted({s.t for series in nodes.values() for s in series if s.t < before}):
        current = {}
        for name, series in nodes.items():
            latest = next((s for s in reversed(series) if s.t <= t), None)
            if latest is None or t - latest.t > stale[name]:
                break
            current[name] = latest
        else:
            moments.append((t, sum(s.connections for s in current.values()), current))
    if not moments:
        return None
    # The node's memory and fd gauges refresh only every
    # collect_statistics_interval (connection counts at once), so take the
    # *latest* moment on the plateau of the most connections, not the first.
    most = max(total for _, total, _ in moments)
    t, _, current = next(m for m in reversed(moments) if m[1] >= 0.99 * most)
    return t, current


def _devices_connected_at(run: RunData, t: float, within: float = 15.0) -> int | None:
    """Devices connected at ``t``, from the fleet sample nearest it; None
    when no sample is within ``within`` seconds (e.g. a broker peak in the
    baseline phase, whose fleet samples a partial report may not have)."""
    if not run.samples:
        return None
    nearest = min(run.samples, key=lambda s: abs(s.t - t))
    return nearest.connected if abs(nearest.t - t) <= within else None


def _broker(run: RunData, notes: list[str]) -> dict[str, Any]:
    nodes = _by_node(run.broker)
    per_node = {}
    for name, series in nodes.items():
        idle = _idle_sample(series)
        per_node[name] = {
            "samples": len(series),
            "peak_memory_bytes": max(s.memory_bytes for s in series),
            "peak_fds": max(s.fds for s in series),
            "peak_erlang_processes": max(s.erlang_processes for s in series),
            "peak_connections": max(s.connections for s in series),
            "idle": (
                {
                    "t": _r(idle.t),
                    "connections": idle.connections,
                    "memory_bytes": idle.memory_bytes,
                    "fds": idle.fds,
                    "erlang_processes": idle.erlang_processes,
                }
                if idle
                else None
            ),
        }
    return {
        "nodes": per_node,
        "per_connection": _per_connection(run, nodes, notes),
        "cpu": _broker_cpu(run, nodes),
    }


def _per_connection(
    run: RunData, nodes: dict[str, list[BrokerSample]], notes: list[str]
) -> dict[str, Any]:
    method = (
        "Σ over nodes at the moment of most connections (before any restart, cut or "
        "churn moved or dropped connections), minus each node's first sample with about "
        "no connections; ÷ connections (or ÷ devices connected then)"
    )
    unmeasured = {
        "memory_bytes_per_connection": None,
        "memory_bytes_per_device": None,
        "fds_per_connection": None,
        "fds_per_device": None,
        "erlang_processes_per_device": None,
        "method": method,
    }
    if not nodes:
        return {**unmeasured, "reason": "no broker samples were recorded"}
    idle = {name: _idle_sample(series) for name, series in nodes.items()}
    missing = sorted(name for name, s in idle.items() if s is None)
    if missing:
        return {
            **unmeasured,
            "reason": f"no sample with about no connections on {', '.join(missing)} "
            "(sampling started after the ramp), so the idle cost is unknown",
        }
    # A restart moves connections between nodes, and a node's last sample
    # before it went down would count them twice: measure before any of that.
    disrupted = min((a.t for a in run.actions if a.kind in DISRUPTIVE_ACTIONS), default=math.inf)
    moment = _broker_peak_moment(nodes, before=disrupted)
    if moment is None:
        return {
            **unmeasured,
            "reason": "no moment with a recent sample from every node before the first "
            "restart, cut or churn",
        }
    t, at_peak = moment
    connections = sum(s.connections - idle[n].connections for n, s in at_peak.items())
    devices = _devices_connected_at(run, t)
    if devices is None:
        return {
            **unmeasured,
            "measured_at": {"t": _r(t), "connections": connections, "devices": None},
            "reason": f"no fleet sample near the broker's peak (t = {t:.1f} s): "
            "how many devices held those connections is unknown",
        }
    if devices and not run.share_connections and abs(connections - devices) > 0.1 * devices:
        notes.append(
            f"At t = {t:.1f} s the broker counted {connections:,.0f} connections above idle "
            f"for {devices:,} devices connected (one connection each): sampling skew or "
            "other clients; the per-device costs divide by devices."
        )
    if connections < MIN_CONNECTIONS_TO_MEASURE or not devices:
        return {
            **unmeasured,
            "measured_at": {"t": _r(t), "connections": connections, "devices": devices},
            "reason": f"only {connections:.0f} connections above idle "
            f"(< {MIN_CONNECTIONS_TO_MEASURE}): too few to tell a per-connection "
            "cost from the broker's noise",
        }
    memory = sum(s.memory_bytes - idle[n].memory_bytes for n, s in at_peak.items())
    fds = sum(s.fds - idle[n].fds for n, s in at_peak.items())
    processes = sum(s.erlang_processes - idle[n].erlang_processes for n, s in at_peak.items())
    if memory <= 0 or fds <= 0:
        notes.append(
            "Broker memory or fds did not rise with connections: the per-connection "
            "figures are not trustworthy."
        )
    return {
        "memory_bytes_per_connection": round(memory / connections),
        "memory_bytes_per_device": round(memory / devices),
        "fds_per_connection": round(fds / connections, 3),
        "fds_per_device": round(fds / devices, 3),
        "erlang_processes_per_device": round(processes / devices, 2),
        "idle_memory_bytes_per_node": round(statistics.mean(s.memory_bytes for s in idle.values())),
        "idle_fds_per_node": round(statistics.mean(s.fds for s in idle.values()), 1),
        "measured_at": {"t": _r(t), "connections": connections, "devices": devices},
        "method": method,
        "reason": None,
    }


def _cpu_at(series: list[BrokerSample], t: float) -> float | None:
    """A node's cumulative CPU at ``t``, interpolated; None outside its samples."""
    before = next((s for s in reversed(series) if s.t <= t), None)
    after = next((s for s in series if s.t >= t), None)
    if before is None or after is None or not before.cpu_seconds or not after.cpu_seconds:
        return None
    if after.t == before.t:
        return before.cpu_seconds
    share = (t - before.t) / (after.t - before.t)
    return before.cpu_seconds + share * (after.cpu_seconds - before.cpu_seconds)


def _cluster_cpu(nodes: dict[str, list[BrokerSample]], t0: float, t1: float) -> float | None:
    """CPU seconds all nodes used between t0 and t1; None where a node cannot tell
    (not sampled then, does not export CPU, or restarted in between)."""
    total = 0.0
    for series in nodes.values():
        inside = [s.cpu_seconds for s in series if t0 <= s.t <= t1]
        a, b = _cpu_at(series, t0), _cpu_at(series, t1)
        if a is None or b is None or any(y < x for x, y in zip(inside, inside[1:], strict=False)):
            return None
        total += b - a
    return total


def _connected_seconds(run: RunData, t0: float, t1: float) -> float:
    """∫ devices connected dt over [t0, t1] (trapezoids over the fleet samples)."""
    points = [(s.t, s.connected) for s in run.samples if t0 <= s.t <= t1]
    return sum((b[0] - a[0]) * (a[1] + b[1]) / 2 for a, b in zip(points, points[1:], strict=False))


def _broker_cpu(run: RunData, nodes: dict[str, list[BrokerSample]]) -> dict[str, Any]:
    """What the broker's CPU costs per device: steady, per connection, per delivery.

    * steady — core-seconds per second per connected device, in the quiet
      window after the ramp and before the first action;
    * per connection — the ramp's CPU less the steady cost of the devices
      already connected, ÷ connections made;
    * per delivery — the largest rollout's CPU (publish → last device in
      force) less the steady cost, ÷ devices it was delivered to (every
      connected device reads every bundle off the stream, targeted or not).
    """
    method = (
        "Erlang runtime CPU (erlang_vm_statistics_runtime_milliseconds) summed over "
        "nodes between two moments, interpolated between samples"
    )
    out: dict[str, Any] = {
        "steady_core_seconds_per_device_second": None,
        "core_seconds_per_connection": None,
        "core_seconds_per_delivery": None,
        "method": method,
        "reason": None,
    }
    if not nodes or not any(s.cpu_seconds for series in nodes.values() for s in series):
        out["reason"] = "the nodes did not export their CPU (erlang_vm_statistics_runtime)"
        return out
    if not run.samples:
        out["reason"] = "no fleet samples"
        return out
    most = max(s.connected for s in run.samples)
    full = next((s for s in run.samples if s.connected >= 0.999 * most), None)
    first_action = min((a.t for a in run.actions), default=run.samples[-1].t)
    if full is None or most == 0:
        out["reason"] = "no device connected"
        return out
    steady = None
    quiet0, quiet1 = full.t + 1.0, first_action - 1.0
    if quiet1 - quiet0 >= MIN_QUIET_SECONDS:
        cpu = _cluster_cpu(nodes, quiet0, quiet1)
        device_seconds = _connected_seconds(run, quiet0, quiet1)
        if cpu is not None and device_seconds > 0:
            steady = max(0.0, cpu / device_seconds)
            out["steady_core_seconds_per_device_second"] = steady
            out["steady_window"] = [_r(quiet0), _r(quiet1)]
    if steady is None:
        out["reason"] = (
            f"no quiet window of {MIN_QUIET_SECONDS:g} s between the ramp and the first "
            "action, or the nodes were not sampled then"
        )
        return out
    start = next((s for s in run.samples if s.connected > 0), None)
    if start is not None:
        before = [s for s in run.samples if s.t < start.t]
        t0 = before[-1].t if before else start.t
        made = full.connected - (before[-1].connected if before else 0)
        cpu = _cluster_cpu(nodes, t0, full.t)
        if cpu is not None and made > 0:
            work = cpu - steady * _connected_seconds(run, t0, full.t)
            out["core_seconds_per_connection"] = max(0.0, work) / made
            out["ramp_window"] = [_r(t0), _r(full.t)]
    rollouts = [
        r
        for r in run.rollouts
        if r.latencies
        and r.t < min((a.t for a in run.actions if a.kind in DISRUPTIVE_ACTIONS), default=math.inf)
    ]
    if rollouts:
        # The rollout that put the most in force (every connected device reads
        # each bundle, so deliveries alone do not tell them apart).
        biggest = max(rollouts, key=lambda r: (len(r.latencies), r.processed, -r.revision))
        t1 = biggest.t + max(biggest.latencies)
        delivered = biggest.processed or _devices_connected_at(run, biggest.t) or 0
        cpu = _cluster_cpu(nodes, biggest.t, t1)
        if cpu is not None and delivered:
            work = cpu - steady * _connected_seconds(run, biggest.t, t1)
            out["delivery_revision"] = biggest.revision
            out["delivery_window"] = [_r(biggest.t), _r(t1)]
            if work > 0:
                out["core_seconds_per_delivery"] = work / delivered
            else:
                # Not a cost of zero: the rollout's CPU did not stand out
                # from the steady cost over its window (too short, or the
                # nodes' CPU sampled too coarsely to see it).
                out["delivery_reason"] = (
                    f"revision {biggest.revision}'s CPU ({cpu:.2f} core-s) did not exceed "
                    "the steady cost over its window"
                )
    return out


# --------------------------------------------------------------------------
# Sizing


def _other_config(config: str) -> str:
    return CONFIG_FILE if config == "default" else "default"


def _sizing(
    run: RunData,
    broker: dict[str, Any],
    *,
    node_memory_bytes: int,
    node_fds: int,
    node_cores: int,
    headroom: float,
    reconnect_target: float = DEFAULT_RECONNECT_TARGET,
    rollout_target: float = DEFAULT_ROLLOUT_TARGET,
) -> dict[str, Any]:
    cost = broker["per_connection"]
    cpu = broker.get("cpu") or {}
    usable_memory = node_memory_bytes * MEMORY_HIGH_WATERMARK * (1 - headroom)
    usable_fds = node_fds * (1 - headroom)
    usable_cores = node_cores * (1 - headroom)
    other = _other_config(run.broker_config)
    sizing: dict[str, Any] = {
        "broker_config": run.broker_config,
        "other_config": other,
        "other_config_note": (
            f"Measured with the broker config '{run.broker_config}' only; "
            f"'{other}' needs its own run (no figures are given for it)."
        ),
        "inputs": {
            "node_memory_bytes": node_memory_bytes,
            "node_fds": node_fds,
            "node_cores": node_cores,
            "headroom": headroom,
            "memory_high_watermark": MEMORY_HIGH_WATERMARK,
            "usable_memory_bytes_per_node": round(usable_memory),
            "usable_fds_per_node": round(usable_fds),
            "memory_bytes_per_device": cost["memory_bytes_per_device"],
            "fds_per_device": cost["fds_per_device"],
            "idle_memory_bytes_per_node": cost.get("idle_memory_bytes_per_node"),
            "idle_fds_per_node": cost.get("idle_fds_per_node"),
            "connect_rate_per_second": _connect_rate(run),
            "usable_cores_per_node": usable_cores,
            "reconnect_target_s": reconnect_target,
            "rollout_target_s": rollout_target,
            "steady_core_seconds_per_device_second": cpu.get(
                "steady_core_seconds_per_device_second"
            ),
            "core_seconds_per_connection": cpu.get("core_seconds_per_connection"),
            "core_seconds_per_delivery": cpu.get("core_seconds_per_delivery"),
        },
        "cpu": (
            "Broker CPU is the Erlang runtime's, measured on this run's machine (where "
            "the load generator shares the cores), and assumed to scale linearly with "
            "devices and to spread evenly over nodes; stream replication and cluster "
            "traffic between nodes are in the measured figures only as far as this "
            "run's cluster had them."
            if cpu.get("reason") is None
            else f"Broker CPU is not modelled: {cpu.get('reason')}."
        ),
        "stream_replication": (
            f"Streams: at least {STREAM_REPLICATION_NODES} nodes are advisable so the "
            "policy stream keeps a quorum of replicas through the loss of a node."
        ),
        "reason": cost["reason"],
        "fleets": [],
    }
    measured = cost["measured_at"]["connections"] if cost.get("measured_at") else None
    if cost["reason"] is None:
        sizing["extrapolation"] = (
            f"Per-device costs measured at {measured:,.0f} connections are assumed linear; "
            f"{max(FLEET_SIZES):,} devices is ×{max(FLEET_SIZES) / measured:,.0f} that."
        )
    for devices in FLEET_SIZES:
        sizing["fleets"].append(
            _fleet_nodes(
                devices,
                cost,
                usable_memory,
                usable_fds,
                _connect_rate(run),
                _cpu_constraint(devices, cpu, usable_cores, reconnect_target, rollout_target),
            )
        )
    return sizing


def _fleet_nodes(
    devices: int,
    cost: dict[str, Any],
    usable_memory: float,
    usable_fds: float,
    connect_rate: float | None,
    cpu: dict[str, Any] | None = None,
) -> dict[str, Any]:
    cpu = cpu or {"nodes": None, "reasoning": "not modelled (broker CPU was not measured)"}
    if cost["reason"] is not None:
        reason = f"per-device broker costs not measured: {cost['reason']}"
        return {
            "devices": devices,
            "constraints": {
                "memory": {"nodes": None, "reasoning": reason},
                "fds": {"nodes": None, "reasoning": reason},
                "cpu": cpu,
            },
            "nodes": None,
            "binding": None,
            "nodes_with_stream_replication": None,
            "reconnect_seconds_at_measured_rate": None,
        }
    constraints: dict[str, dict[str, Any]] = {"cpu": cpu}
    memory_need = devices * cost["memory_bytes_per_device"]
    memory_capacity = usable_memory - cost["idle_memory_bytes_per_node"]
    constraints["memory"] = _constraint(
        memory_need,
        memory_capacity,
        f"{devices:,} devices × {_bytes(cost['memory_bytes_per_device'])} = "
        f"{_bytes(memory_need)}; per node {_bytes(usable_memory)} usable "
        f"(memory × {MEMORY_HIGH_WATERMARK} watermark × (1 − headroom)) − "
        f"{_bytes(cost['idle_memory_bytes_per_node'])} idle = {_bytes(memory_capacity)}",
    )
    fds_need = devices * cost["fds_per_device"]
    fds_capacity = usable_fds - cost["idle_fds_per_node"]
    constraints["fds"] = _constraint(
        fds_need,
        fds_capacity,
        f"{devices:,} devices × {cost['fds_per_device']:g} fds = {fds_need:,.0f}; "
        f"per node {usable_fds:,.0f} usable (limit × (1 − headroom)) − "
        f"{cost['idle_fds_per_node']:,.0f} idle = {fds_capacity:,.0f}",
    )
    counted = {k: v for k, v in constraints.items() if v.get("load") is not None}
    if any(v["nodes"] is None for v in counted.values()):
        nodes = None
        binding = next(k for k, v in counted.items() if v["nodes"] is None)
    else:
        nodes = max(1, *(v["nodes"] for v in counted.values()))
        binding = max(counted, key=lambda k: counted[k]["load"])
    return {
        "devices": devices,
        "constraints": {k: constraints[k] for k in ("memory", "fds", "cpu")},
        "nodes": nodes,
        "binding": binding,
        "nodes_with_stream_replication": (
            max(nodes, STREAM_REPLICATION_NODES) if nodes is not None else None
        ),
        # The whole fleet reconnecting at the rate this run's ramp reached.
        "reconnect_seconds_at_measured_rate": (
            round(devices / connect_rate, 1) if connect_rate else None
        ),
    }


def _cpu_constraint(
    devices: int,
    cpu: dict[str, Any],
    usable_cores: float,
    reconnect_target: float,
    rollout_target: float,
) -> dict[str, Any]:
    """Nodes for the broker's CPU: the largest of three loads, in cores.

    steady (devices × steady cost), a reconnect storm of the whole fleet
    within ``reconnect_target`` s, a rollout to every device within
    ``rollout_target`` s; each ÷ usable cores per node.
    """
    steady = cpu.get("steady_core_seconds_per_device_second")
    per_connection = cpu.get("core_seconds_per_connection")
    per_delivery = cpu.get("core_seconds_per_delivery")
    if cpu.get("reason") is not None or steady is None:
        return {"nodes": None, "reasoning": f"not modelled: {cpu.get('reason') or 'no figures'}"}
    loads = {"steady": (devices * steady, f"{devices:,} devices × {steady * 1000:.3f} core-ms/s")}
    if per_connection is not None:
        loads["reconnect storm"] = (
            devices * per_connection / reconnect_target,
            f"{devices:,} connections × {per_connection * 1000:.2f} core-ms "
            f"÷ {reconnect_target:g} s",
        )
    if per_delivery is not None:
        loads["rollout"] = (
            devices * per_delivery / rollout_target,
            f"{devices:,} deliveries × {per_delivery * 1000:.3f} core-ms ÷ {rollout_target:g} s",
        )
    worst = max(loads, key=lambda k: loads[k][0])
    need, _ = loads[worst]
    parts = "; ".join(f"{k}: {text} = {cores:.2f} cores" for k, (cores, text) in loads.items())
    result = _constraint(
        need, usable_cores, f"{parts}; per node {usable_cores:g} usable cores; {worst} binds"
    )
    result["loads_cores"] = {k: round(v[0], 3) for k, v in loads.items()}
    return result


def _constraint(need: float, capacity: float, reasoning: str) -> dict[str, Any]:
    if capacity <= 0:
        return {
            "nodes": None,
            "need": round(need, 1),
            "capacity_per_node": round(capacity, 1),
            "load": math.inf,
            "reasoning": reasoning + " — a node's idle cost alone exceeds what is usable",
        }
    load = need / capacity
    nodes = max(1, _ceil(load))
    return {
        "nodes": nodes,
        "need": round(need, 1),
        "capacity_per_node": round(capacity, 1),
        "load": round(load, 4),
        "reasoning": f"{reasoning} → ceil({load:.2f}) = {nodes} node{'s' if nodes > 1 else ''}",
    }


def _bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    if abs(n) >= _GIB:
        return f"{n / _GIB:.2f} GiB"
    if abs(n) >= _MIB:
        return f"{n / _MIB:.1f} MiB"
    return f"{n / _KIB:.1f} KiB"


# --------------------------------------------------------------------------
# write()


def write(
    run: RunData,
    directory: Path,
    *,
    node_memory_bytes: int = DEFAULT_NODE_MEMORY_BYTES,
    node_fds: int = DEFAULT_NODE_FDS,
    node_cores: int = DEFAULT_NODE_CORES,
    headroom: float = DEFAULT_HEADROOM,
    reconnect_target: float = DEFAULT_RECONNECT_TARGET,
    rollout_target: float = DEFAULT_ROLLOUT_TARGET,
) -> dict[str, Any]:
    """Write run-data.json (first: a bug below must not lose a long run),
    then report.json, report.md and the charts into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    run.save(directory / RUN_DATA)
    figures = compute(
        run,
        node_memory_bytes=node_memory_bytes,
        node_fds=node_fds,
        node_cores=node_cores,
        headroom=headroom,
        reconnect_target=reconnect_target,
        rollout_target=rollout_target,
    )
    figures["charts"] = _draw_charts(run, figures, directory)
    document = {**figures, "series": _series(run)}
    (directory / "report.json").write_text(
        json.dumps(_finite(document), indent=1, allow_nan=False) + "\n"
    )
    (directory / "report.md").write_text(markdown(figures, run))
    return figures


def headline(figures: dict[str, Any]) -> str:
    """The run in one line, as ``edgeward simulate`` ends."""
    p = figures.get("propagation_ms") or {}
    tel = figures.get("telemetry") or {}
    telemetry = ""
    if tel.get("exercised"):
        telemetry = (
            f", telemetry sent/received/dropped {tel['sent']}/{tel['received']}/"
            f"{tel['dropped_reported']} (balanced {tel['balanced']}), end-to-end p50/p99 "
            f"{tel['latency_ms']['p50']}/{tel['latency_ms']['p99']} ms"
        )
    return (
        f"devices {figures.get('devices')}, connected max {figures.get('connected_max')}, "
        f"converged {figures.get('converged')}, propagation p50/p99/max "
        f"{p.get('p50')}/{p.get('p99')}/{p.get('max')} ms, raw baseline ratio "
        f"{figures.get('raw_baseline_ratio')}, messages lost {figures.get('messages_lost')}, "
        f"unexpected closes {figures.get('unexpected_closes')}{telemetry}"
    )


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: they become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _series(run: RunData) -> dict[str, Any]:
    def fleet(s: FleetSample) -> dict[str, Any]:
        return {
            **asdict(s),
            "t": round(s.t, 3),
            "client_cpu_seconds": round(s.client_cpu_seconds, 3),
        }

    def broker(s: BrokerSample) -> dict[str, Any]:
        return {
            "t": round(s.t, 3),
            "node": s.node,
            "memory_bytes": round(s.memory_bytes),
            "fds": round(s.fds),
            "erlang_processes": round(s.erlang_processes),
            "connections": round(s.connections),
            "messages_in_total": round(s.messages_in_total),
            "messages_out_total": round(s.messages_out_total),
        }

    return {
        "fleet": [fleet(s) for s in run.samples],
        "broker": [broker(s) for s in run.broker],
        "actions": [{"t": round(a.t, 3), "kind": a.kind, "detail": a.detail} for a in run.actions],
        "rollouts": [
            {
                "revision": r.revision,
                "t": round(r.t, 3),
                "latencies_ms": [round(x * 1000, 1) for x in r.latencies],
                "late_ms": [round(x * 1000, 1) for x in r.late],
            }
            for r in run.rollouts
        ],
        "baseline_fanouts_ms": (
            [[round(x * 1000, 1) for x in f] for f in run.baseline.fanouts] if run.baseline else []
        ),
    }


# --------------------------------------------------------------------------
# report.md


def _fmt(value: Any, unit: str = "", digits: int = 0) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, int | float):
        text = f"{value:,.{digits}f}"
    else:
        text = str(value)
    return f"{text} {unit}".rstrip()


def _reconnect_figure(reconnect: dict[str, Any], word: str) -> Any:
    return next((v for k, v in reconnect.items() if word in k.lower()), None)


def markdown(figures: dict[str, Any], run: RunData) -> str:
    """report.md: headline, sizing, errors, what the run did, notes."""
    f = figures
    lines: list[str] = []
    add = lines.append
    name = f["scenario"].get("name", "unnamed scenario") if f["scenario"] else "unnamed scenario"
    partial = not f["completed"]
    add(f"# edgeward simulation: {name}{' (PARTIAL RUN)' if partial else ''}")
    add("")
    if partial:
        add(
            f"> **PARTIAL RUN** — stopped early after {f['duration']:.1f} s. "
            "Every figure below covers only what was recorded until then."
        )
        add("")
    started = datetime.fromtimestamp(f["started_at"], tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    add(
        f"Started {started}, ran {f['duration']:.1f} s. Broker config: "
        f"`{f['broker_config']}`, {len(f['nodes'])} node(s); verify: `{f['verify']}`; "
        f"connections: "
        + ("one per device" if not f["share_connections"] else f"shared ({f['share_connections']})")
        + f"; logins: {_logins_word(f['logins'])}"
        + f"; {f['workers']} worker process(es)"
        + _hosts_phrase(f.get("worker_hosts") or {})
        + "."
    )
    add("")

    p = f["propagation_ms"]
    b = f["baseline"]
    lost = f["messages_lost"]
    conv = f["convergence"]
    rec = f["reconnect"]
    tel = f["telemetry"]
    cl = f["client"]
    ratio = "n/a (no baseline)" if b is None else _fmt(f["raw_baseline_ratio"], "×", 2)
    if b is not None and f["raw_baseline_ratio"] is not None:
        ratio += f" (edgeward {_fmt(p['max'], 'ms')} vs raw {_fmt(b['full_fanout_ms'], 'ms')})"
    add("## Headline")
    add("")
    add("| figure | value |")
    add("|---|---|")
    add(f"| Devices | {_fmt(f['devices'])} |")
    add(f"| Connected (max) | {_fmt(f['connected_max'])} |")
    converged = _fmt(f["converged"])
    if not f["converged"] and conv.get("reason"):
        converged += f" ({conv['reason']})"
    add(f"| Converged | {converged} |")
    add(
        "| Propagation p50 / p90 / p99 / max | "
        + " / ".join(_fmt(p[k], digits=1) for k in ("p50", "p90", "p99", "max"))
        + f" ms ({p['count']:,} device-rollouts) |"
    )
    add(
        "| Time to 99% / 100% of online targeted devices (slowest rollout) | "
        f"{_fmt(p['time_to_99_ms'], 'ms', 1)} / {_fmt(p['time_to_100_ms'], 'ms', 1)} |"
    )
    add(f"| Ratio to raw baseline (full fleet) | {ratio} |")
    lost_text = (
        "n/a (counter bug, see notes)"
        if lost is None
        else f"{lost:,} of {f['messages']['expected']:,} expected"
    )
    add(f"| Messages lost | {lost_text} |")
    add(f"| Unexpected closes | {_fmt(f['unexpected_closes'])} |")
    rate = f["connect_rate_per_second"]
    add(
        f"| Ramp time (all online connected) | {_fmt(f['ramp_seconds'], 's', 1)}"
        + (f" (~{rate:,.0f} connections/s)" if rate else "")
        + " |"
    )
    add(
        "| Reconnect storm: to all connected / to all in sync | "
        f"{_fmt(_reconnect_figure(rec, 'connect'), 's', 1)} / "
        f"{_fmt(_reconnect_figure(rec, 'sync'), 's', 1)} |"
    )
    add(f"| Errors (all kinds) | {_fmt(f['errors']['total'])} |")
    add(f"| Device logins | {_logins_figure(f['logins'])} |")
    if tel["exercised"]:
        waiting = tel["waiting_at_end"]
        add(
            f"| Telemetry sent = received + dropped | {tel['sent']:,} = {tel['received']:,} + "
            f"{tel['dropped_reported']:,}: {'yes' if tel['balanced'] else '**no**'}"
            f" ({tel['alerts']:,} alerts"
            + (f"; {waiting:,} still in outboxes at the end" if waiting else "")
            + ("; outboxes **did not drain**" if tel["drained"] is False else "")
            + ") |"
        )

        def quartet(lat: dict[str, Any]) -> str:
            return " / ".join(_fmt(lat.get(k), digits=1) for k in ("p50", "p90", "p99", "max"))

        by_type = "".join(
            f"; {kind}s {quartet(lat)} ms"
            for kind, lat in tel["latency_ms_by_type"].items()
            if len(tel["latency_ms_by_type"]) > 1
        )
        add(
            "| Telemetry end-to-end latency p50 / p90 / p99 / max | "
            f"{quartet(tel['latency_ms'])} ms ({tel['latency_count']:,} records{by_type}) |"
        )
    else:
        add("| Telemetry | not exercised in this run |")
    cpu_ms = cl["cpu_seconds_per_device"]
    cpu_ms = None if cpu_ms is None else cpu_ms * 1000
    add(
        f"| Client RSS per device / CPU per device | {_fmt(cl['rss_per_device_kib'], 'KiB', 1)}"
        f" / {_fmt(cpu_ms, 'ms', 2)} CPU |"
    )
    add("")

    if p["per_revision"]:
        add("### Per revision")
        add("")
        add(
            "| revision | published at | targeted | online at publish | in force | late "
            "| p50 ms | p99 ms | max ms | to 99% ms | to 100% ms | × raw |"
        )
        add("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in p["per_revision"]:
            add(
                f"| {r['revision']} | {_fmt(r['t'], 's', 1)} | {r['targeted']:,} "
                f"| {r['online_at_publish']:,} | {r['in_force']:,} | {r['late']:,} "
                f"| {_fmt(r['p50'], digits=1)} | {_fmt(r['p99'], digits=1)} "
                f"| {_fmt(r['max'], digits=1)} | {_fmt(r['time_to_99_ms'], digits=1)} "
                f"| {_fmt(r['time_to_100_ms'], digits=1)} "
                f"| {_fmt(r['raw_baseline_ratio'], digits=2)} |"
            )
        add("")
        add(
            "The simulator's own work per revision (decode, verify, select, apply, "
            "cache, ack, heartbeat for each delivery), which a real fleet does in "
            "parallel — one CPU per device — and the workers here do side by side "
            "on this machine's cores: it is part of every propagation figure above."
        )
        add("")
        add("| revision | deliveries handled | per device | CPU in all | least wall time |")
        add("|---|---|---|---|---|")
        for r in p["per_revision"]:
            add(
                f"| {r['revision']} | {r['deliveries_processed']:,} "
                f"| {_fmt(r['device_processing_us'], 'µs', 0)} "
                f"| {_fmt(r['client_processing_s'], 's', 2)} "
                f"| {_fmt(r['client_serial_ms'], 'ms', 0)} |"
            )
        add("")

    lines.extend(_sizing_markdown(f))
    lines.extend(_broker_markdown(f))

    add("## Errors by kind")
    add("")
    if f["errors"]["by_kind"]:
        add("| kind | count |")
        add("|---|---|")
        for kind, count in f["errors"]["by_kind"].items():
            add(f"| {kind} | {count:,} |")
    else:
        add("None.")
    add("")

    add("## What this run did")
    add("")
    if run.actions:
        for a in run.actions:
            add(f"- {a.t:.1f} s — {_describe_action(a)}")
    else:
        add("- No timeline actions were carried out.")
    add("")

    if f.get("charts"):
        add("## Charts")
        add("")
        for chart in f["charts"]:
            add(f"- [{chart}]({chart})")
        add("")

    add("## Notes")
    add("")
    for note in f["notes"] or ["None."]:
        add(f"- {note}")
    add("")
    return "\n".join(lines)


def _ran_elsewhere(hosts: dict[str, int]) -> bool:
    """Whether devices ran on a worker host, not the run's own."""
    return any(not host.endswith(OWN_HOST) for host in hosts)


def _hosts_phrase(hosts: dict[str, int]) -> str:
    if not _ran_elsewhere(hosts):
        return ""
    return " on " + ", ".join(f"{h} ({n:,} devices)" for h, n in sorted(hosts.items()))


def _logins_word(logins: dict[str, Any]) -> str:
    if logins.get("mode") == "device":
        return "a broker user per device"
    return "shared (the broker URL's)"


def _logins_figure(logins: dict[str, Any]) -> str:
    """The headline's cell: how devices logged in, and the set-up's cost."""
    if logins.get("mode") != "device":
        return f"shared login of the broker URL ({logins.get('reason', 'asked for')})"
    grants = logins.get("grants_s") or {}
    steps = [f"users {_fmt(logins.get('users_s'), 's', 1)}"] + [
        f"{phase} grants {_fmt(seconds, 's', 1)}" for phase, seconds in grants.items()
    ]
    text = (
        f"a broker user each ({logins.get('users', 0):,} made, device grants, "
        f"max-connections 1); set-up {_fmt(logins.get('setup_s'), 's', 1)} "
        f"({', '.join(steps)}), before the phases, not in the ramp"
    )
    revoked = logins.get("revoke_s") or {}
    if revoked:
        text += (
            "; grants revoked before each vhost went ("
            + ", ".join(f"{phase} {_fmt(seconds, 's', 1)}" for phase, seconds in revoked.items())
            + ")"
        )
    removed = logins.get("removed")
    if logins.get("removed_with_cluster"):
        text += "; left in the local cluster, which was stopped and thrown away"
    elif removed is not None:
        text += f"; {removed:,} removed after the run in {_fmt(logins.get('remove_s'), 's', 1)}"
    return text


def _describe_action(action: Action) -> str:
    detail = ", ".join(f"{k}={v}" for k, v in action.detail.items())
    return f"`{action.kind}`" + (f" ({detail})" if detail else "")


def _sizing_markdown(f: dict[str, Any]) -> list[str]:
    s = f["sizing"]
    i = s["inputs"]
    out = [f"## Broker sizing (measured with broker config `{s['broker_config']}`)", ""]
    out.append(
        f"Per node: {_bytes(i['node_memory_bytes'])} memory, {i['node_fds']:,} fds, "
        f"{i['node_cores']} cores, headroom {i['headroom']:.0%}. "
        f"Usable memory = memory × {i['memory_high_watermark']} (RabbitMQ's default high "
        f"watermark) × (1 − headroom) = {_bytes(i['usable_memory_bytes_per_node'])}; "
        f"usable fds = {i['usable_fds_per_node']:,}."
    )
    out.append("")
    if s["reason"] is not None:
        out.append(
            f"**No node counts:** the per-device broker costs could not be measured — "
            f"{s['reason']}."
        )
        out.append("")
    else:
        pc = f["broker"]["per_connection"]
        at = pc["measured_at"]
        out.append(
            f"Measured per device: {_bytes(i['memory_bytes_per_device'])} broker memory, "
            f"{i['fds_per_device']:g} fds ({_bytes(pc['memory_bytes_per_connection'])} and "
            f"{pc['fds_per_connection']:g} fds per connection), at {at['connections']:,.0f} "
            f"connections / {at['devices']:,} devices (t = {at['t']:.1f} s); idle node "
            f"{_bytes(i['idle_memory_bytes_per_node'])}, {i['idle_fds_per_node']:,.0f} fds. "
            f"{s['extrapolation']}"
        )
        out.append("")
        if i.get("steady_core_seconds_per_device_second") is not None:
            cpu = f["broker"]["cpu"]

            def core_ms(key: str, digits: int) -> str:
                value = i.get(key)
                return "n/a" if value is None else f"{value * 1000:.{digits}f} core-ms"

            out.append(
                f"Measured broker CPU (Erlang runtime, all nodes): steady "
                f"{core_ms('steady_core_seconds_per_device_second', 4)} per device per "
                f"second; {core_ms('core_seconds_per_connection', 2)} per connection set up "
                f"(ramp); {core_ms('core_seconds_per_delivery', 3)} per bundle delivered "
                f"(revision {cpu.get('delivery_revision', 'n/a')}"
                + (f": {cpu['delivery_reason']}" if cpu.get("delivery_reason") else "")
                + "). Targets: the whole fleet "
                f"reconnected within {i['reconnect_target_s']:g} s, a revision delivered "
                f"within {i['rollout_target_s']:g} s; usable cores per node "
                f"{i['usable_cores_per_node']:g}."
            )
            out.append("")
        out.append(
            "| devices | memory nodes | fd nodes | CPU nodes | nodes | binds "
            "| with stream replication "
            "| full reconnect at measured rate |"
        )
        out.append("|---|---|---|---|---|---|---|---|")
        for fleet in s["fleets"]:
            c = fleet["constraints"]
            out.append(
                f"| {fleet['devices']:,} | {_fmt(c['memory']['nodes'])} "
                f"| {_fmt(c['fds']['nodes'])} "
                f"| {_fmt(c['cpu']['nodes']) if c['cpu']['nodes'] else 'not modelled'} "
                f"| **{_fmt(fleet['nodes'])}** | {fleet['binding']} "
                f"| {_fmt(fleet['nodes_with_stream_replication'])} "
                f"| {_fmt(fleet['reconnect_seconds_at_measured_rate'], 's')} |"
            )
        out.append("")
        out.append("Reasoning:")
        out.append("")
        for fleet in s["fleets"]:
            c = fleet["constraints"]
            out.append(f"- **{fleet['devices']:,} devices** — binds: {fleet['binding']}")
            out.append(f"  - memory: {c['memory']['reasoning']}")
            out.append(f"  - fds: {c['fds']['reasoning']}")
            out.append(f"  - CPU: {c['cpu']['reasoning']}")
        out.append("")
    out.append(f"- {s['cpu']}")
    out.append(f"- {s['stream_replication']}")
    out.append(f"- {s['other_config_note']}")
    if i["connect_rate_per_second"]:
        out.append(
            f"- Reconnect times use this run's ramp rate ({i['connect_rate_per_second']:,.0f} "
            "connections/s over the whole cluster, client and broker sharing this machine); "
            "they are not scaled with node count."
        )
    out.append("")
    return out


def _broker_markdown(f: dict[str, Any]) -> list[str]:
    nodes = f["broker"]["nodes"]
    if not nodes:
        return []
    out = ["## Broker peaks", ""]
    out.append("| node | memory | fds | Erlang processes | connections |")
    out.append("|---|---|---|---|---|")
    for name, n in nodes.items():
        out.append(
            f"| {name} | {_bytes(n['peak_memory_bytes'])} | {n['peak_fds']:,.0f} "
            f"| {n['peak_erlang_processes']:,.0f} | {n['peak_connections']:,.0f} |"
        )
    out.append("")
    return out


# --------------------------------------------------------------------------
# Charts


def _draw_charts(run: RunData, figures: dict[str, Any], directory: Path) -> list[str]:
    """Draw every chart; returns the files written.  Never fails the report."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        figures["notes"].append(
            "Charts skipped: matplotlib is not installed (pip install 'edgeward[sim]')."
        )
        return []
    drawers: dict[str, Callable[[Any, RunData], None]] = {
        "connected.png": _chart_connected,
        "propagation_cdf.png": _chart_propagation,
        "in_sync.png": _chart_in_sync,
        "broker.png": _chart_broker,
        "rates.png": _chart_rates,
        "client.png": _chart_client,
    }
    written = []
    for filename, draw in drawers.items():
        fig = Figure(figsize=(10, 9 if filename == "broker.png" else 5), dpi=100)
        FigureCanvasAgg(fig)
        try:
            draw(fig, run)
            fig.savefig(directory / filename)
        except Exception as exc:  # a chart must not cost the report
            figures["notes"].append(f"Chart {filename} failed: {exc!r}")
            continue
        written.append(filename)
    return written


_ACTION_COLOURS = {
    "apply": "tab:green",
    "restart-node": "tab:red",
    "cut": "tab:purple",
    "restore": "tab:cyan",
    "churn": "tab:brown",
}


def _action_label(action: Action) -> str:
    """A few characters beside the line: the kind, and which revision or node."""
    detail = action.detail
    if "revision" in detail:
        return f"{action.kind} r{detail['revision']}"
    if "node" in detail:
        return f"{action.kind} {str(detail['node']).split('@')[0]}"
    return action.kind


def _mark_actions(ax: Any, actions: list[Action], *, label: bool = True) -> None:
    for a in actions:
        colour = _ACTION_COLOURS.get(a.kind, "tab:gray")
        ax.axvline(a.t, color=colour, linestyle="--", linewidth=0.9, alpha=0.8)
        if label:
            ax.annotate(
                _action_label(a),
                xy=(a.t, 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(2, -4),
                textcoords="offset points",
                rotation=90,
                va="top",
                fontsize=7,
                color=colour,
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.75, "pad": 0.5},
            )


def _from_zero(ax: Any) -> None:
    """y from 0 to a little above the data, so a flat line does not hide in the frame."""
    top = ax.dataLim.ymax
    ax.set_ylim(0, top * 1.08 if math.isfinite(top) and top > 0 else 1)


def _no_data(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} recorded", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _title(fig: Any, run: RunData, title: str) -> None:
    suffix = " — PARTIAL RUN" if not run.completed else ""
    fig.suptitle(f"{title}{suffix}", color="tab:red" if suffix else "black")


def _chart_connected(fig: Any, run: RunData) -> None:
    _title(fig, run, f"Devices connected ({run.devices:,} simulated)")
    ax = fig.add_subplot()
    if not run.samples:
        _no_data(ax, "fleet samples")
        return
    t = [s.t for s in run.samples]
    ax.plot(t, [s.online for s in run.samples], label="meant to be online", color="tab:gray")
    ax.plot(t, [s.connected for s in run.samples], label="connected", color="tab:blue")
    _mark_actions(ax, run.actions)
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("devices")
    _from_zero(ax)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")


def _chart_propagation(fig: Any, run: RunData) -> None:
    _title(fig, run, "Publish → in force, per rollout (online targeted devices)")
    ax = fig.add_subplot()
    curves = []
    for r in run.rollouts:
        points = cdf([x * 1000 for x in r.latencies], r.online_at_publish)
        if points:
            curves.append((f"revision {r.revision} ({r.online_at_publish:,} online)", points, "-"))
    base = run.baseline
    if base and base.fanouts:
        probes = [f for f in base.fanouts if f]
        pooled = [x * 1000 for f in probes for x in f]
        points = cdf(pooled, base.connected * len(probes))
        if points:
            label = f"raw baseline fan-out ({len(probes)} probes)"
            curves.append((label, points, "--"))
    if not curves:
        _no_data(ax, "rollouts")
        return
    for label, points, style in curves:
        xs = [x for x, _ in points]
        ys = [y for _, y in points]
        colour = "black" if style == "--" else None
        ax.step(xs, ys, where="post", linestyle=style, label=label, color=colour)
    lows = [pts[0][0] for _, pts, _ in curves if pts[0][0] > 0]
    highs = [pts[-1][0] for _, pts, _ in curves]
    if lows and max(highs) / min(lows) > 50:
        ax.set_xscale("log")
    ax.set_xlabel("milliseconds after publish")
    ax.set_ylabel("% of devices")
    ax.set_ylim(0, 102)
    ax.axhline(99, color="tab:gray", linewidth=0.7, linestyle=":")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right", fontsize=8)


def _chart_in_sync(fig: Any, run: RunData) -> None:
    _title(fig, run, "In sync: share of online devices with the latest revision in force")
    ax = fig.add_subplot()
    points = [(s.t, 100 * s.in_sync / s.online) for s in run.samples if s.online > 0]
    if not points:
        _no_data(ax, "fleet samples")
        return
    ax.plot([t for t, _ in points], [y for _, y in points], color="tab:green")
    _mark_actions(ax, run.actions)
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("% of online devices in sync")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)


def _chart_broker(fig: Any, run: RunData) -> None:
    _title(fig, run, f"Broker nodes (config: {run.broker_config})")
    panels = [
        ("memory_bytes", "memory (MiB)", _MIB),
        ("fds", "open file descriptors", 1),
        ("erlang_processes", "Erlang processes", 1),
        ("connections", "connections", 1),
        ("cpu_seconds", "CPU (cores busy, Erlang runtime)", None),
        (None, "", 1),
    ]
    nodes = _by_node(run.broker)
    axes = fig.subplots(3, 2, sharex=True)
    for ax, (field, label, scale) in zip(axes.flat, panels, strict=True):
        if field is None:
            ax.axis("off")
            continue
        if not nodes:
            _no_data(ax, "broker samples")
            continue
        for name, series in nodes.items():
            if scale is None:  # a cumulative counter: plot its rate
                points = rates([s.t for s in series], [s.cpu_seconds for s in series])
                ax.plot([p[0] for p in points], [p[1] for p in points], label=name)
                continue
            ax.plot([s.t for s in series], [getattr(s, field) / scale for s in series], label=name)
        _mark_actions(ax, run.actions, label=False)
        ax.set_title(label, fontsize=10)
        _from_zero(ax)
        ax.grid(alpha=0.3)
    if nodes:
        axes[0][0].legend(fontsize=8)
        for ax in axes[2]:
            ax.set_xlabel("seconds since start")
    fig.tight_layout(rect=(0, 0, 1, 0.95))


def _chart_rates(fig: Any, run: RunData) -> None:
    _title(fig, run, "Messages per second")
    top, bottom = fig.subplots(2, 1, sharex=True)
    if run.samples:
        t = [s.t for s in run.samples]
        for label, counter in (
            ("policy deliveries to devices", [s.deliveries for s in run.samples]),
            ("heartbeats from devices", [s.heartbeats for s in run.samples]),
        ):
            points = rates(t, counter)
            top.plot([x for x, _ in points], [y for _, y in points], label=label)
        top.legend(fontsize=8, loc="upper right")
        _mark_actions(top, run.actions)
        top.set_title("devices (simulator counters)", fontsize=10)
        top.set_ylabel("messages/s")
        _from_zero(top)
        top.grid(alpha=0.3)
    else:
        _no_data(top, "fleet samples")
    nodes = _by_node(run.broker)
    if nodes:
        directions = (("in", "messages_in_total", "-"), ("out", "messages_out_total", "--"))
        for i, (name, series) in enumerate(nodes.items()):
            t = [s.t for s in series]
            for direction, field, style in directions:
                points = rates(t, [getattr(s, field) for s in series])
                bottom.plot(
                    [x for x, _ in points],
                    [y for _, y in points],
                    color=f"C{i}",  # one colour per node: solid in, dashed out
                    linestyle=style,
                    label=f"{name} {direction}",
                )
        bottom.legend(fontsize=8, loc="upper right", ncol=2)
        _mark_actions(bottom, run.actions, label=False)
        bottom.set_title("broker (messages into queues/streams, out to consumers)", fontsize=10)
        bottom.set_ylabel("messages/s")
        _from_zero(bottom)
        bottom.grid(alpha=0.3)
    else:
        _no_data(bottom, "broker samples")
    bottom.set_xlabel("seconds since start")
    fig.tight_layout(rect=(0, 0, 1, 0.95))


def _chart_client(fig: Any, run: RunData) -> None:
    _title(fig, run, f"Simulator client ({run.workers} worker processes)")
    top, bottom = fig.subplots(2, 1, sharex=True)
    if not run.samples:
        _no_data(top, "fleet samples")
        _no_data(bottom, "fleet samples")
        return
    base = run.client_base_rss_bytes
    rss = [
        (s.t, (s.client_rss_bytes - base) / s.connected / _KIB) for s in run.samples if s.connected
    ]
    top.plot([t for t, _ in rss], [y for _, y in rss], color="tab:orange")
    top.set_title("RSS per connected device (KiB)", fontsize=10)
    _from_zero(top)
    top.grid(alpha=0.3)
    cpu = rates([s.t for s in run.samples], [s.client_cpu_seconds for s in run.samples])
    bottom.plot([t for t, _ in cpu], [100 * y for _, y in cpu], color="tab:red")
    bottom.set_title("CPU (% of one core, all workers)", fontsize=10)
    _from_zero(bottom)
    bottom.set_xlabel("seconds since start")
    bottom.grid(alpha=0.3)
    for ax in (top, bottom):
        _mark_actions(ax, run.actions, label=ax is top)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
