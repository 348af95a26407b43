"""A throwaway local RabbitMQ cluster of K nodes on one machine.

Every node is fully separate from any broker the machine already runs: its
own node name, ports, data dir, pid file, config, enabled-plugins file and
Erlang cookie (a private ``HOME`` under ``base_dir``), so the machine's
``rabbit@localhost`` is never touched::

    with LocalCluster(3, Path("/tmp/sim"), config_file=Path("charts/rabbitmq/rabbitmq.conf")) as c:
        print(c.amqp_urls, c.prometheus_urls)
        c.restart_node(2)

Node ``i`` (1-based) is ``f"{name_prefix}{i}@localhost"`` with its files under
``base_dir/node{i}/``: ``rabbitmq.conf``, ``enabled_plugins``, ``mnesia/``,
``log/`` (the node's log), ``console.log`` (what ``rabbitmq-server`` printed:
where a broken config shows up) and ``rabbitmq.pid``.

Notes on how the nodes are run (each learnt the hard way):

* The scripts in ``/usr/sbin`` are Debian's wrapper, which ``su``s to the
  ``rabbitmq`` user as root and so drops the environment: the real scripts in
  ``/usr/lib/rabbitmq/bin`` are called instead (``EDGEWARD_RABBITMQ_BIN``
  overrides the directory).
* ``/etc/rabbitmq/rabbitmq-env.conf`` (which names the shared node) is not
  read: ``RABBITMQ_CONF_ENV_FILE`` points at an empty per-node file, and every
  ``RABBITMQ_*`` variable inherited from the caller is dropped.
* ``rabbitmq-server -detached`` dies silently on a bad config (no pid file, no
  log, no output), so the server runs in the foreground as a child in its own
  session, its output going to ``console.log``; it lives on if Python exits.
* ``rabbitmqctl stop <pidfile>`` waits forever when the pid file is missing,
  so it is only called for a node whose pid file names a live process.
* 3.10 sets the node name at run time, so it is not on the beam's command
  line: ``-edgeward_local_cluster_node NAME`` is added there, so that
  ``pgrep -f NAME`` finds a node.
* Right after a node stops, its dist port has connections in TIME_WAIT: the
  free-port check binds with SO_REUSEADDR, as Erlang does, or a restart
  would find the port "taken".
* A graceful stop takes ~6-8 s (SIGTERM alone as long); nodes stop in parallel.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

__all__ = ["ClusterError", "LocalCluster", "NodeSpec", "rabbitmq_bin_dir"]

PLUGINS = ("rabbitmq_management", "rabbitmq_prometheus")

# Ports a node of ours must never take: epmd, and what a default broker (the
# machine's shared node) uses or its CLI tools use for distribution.
RESERVED_PORTS = frozenset({4369, 5552, 5671, 5672, 15672, 15692, 25672, *range(35672, 35683)})

# Keys of a node's own listeners: dropped (commented out) from config_file,
# which applies to every node and so must not pin a port.
_NODE_KEYS = (
    "listeners.",
    "management.tcp.",
    "management.ssl.",
    "prometheus.tcp.",
    "prometheus.ssl.",
    "stream.listeners.",
    "mqtt.listeners.",
    "stomp.listeners.",
    "web_mqtt.tcp.",
    "web_stomp.tcp.",
)

_PORTS_PER_NODE = 4  # amqp, management, prometheus, dist (and amqps, with amqps=True)
_AUTO_PORT_RANGE = (20000, 30000)  # below Linux's ephemeral range (32768-60999)
_LOG_TAIL_LINES = 40


class ClusterError(RuntimeError):
    """A node failed to start, join or answer in time."""


def rabbitmq_bin_dir() -> Path:
    """The directory of the real (unwrapped) ``rabbitmq-server``/``rabbitmqctl``."""
    override = os.environ.get("EDGEWARD_RABBITMQ_BIN")
    if override:
        return Path(override)
    debian = Path("/usr/lib/rabbitmq/bin")
    if (debian / "rabbitmq-server").exists():
        return debian
    found = shutil.which("rabbitmq-server")
    if found:
        return Path(os.path.realpath(found)).parent
    return debian


@dataclass(frozen=True)
class NodeSpec:
    """Name, ports and files of one node."""

    index: int  # 1-based
    name: str
    amqp_port: int
    management_port: int
    prometheus_port: int
    dist_port: int
    dir: Path
    amqps_port: int | None = None  # the TLS listener, with LocalCluster(amqps=True)

    @property
    def pid_file(self) -> Path:
        return self.dir / "rabbitmq.pid"

    @property
    def config_file(self) -> Path:
        return self.dir / "rabbitmq.conf"

    @property
    def plugins_file(self) -> Path:
        return self.dir / "enabled_plugins"

    @property
    def log_dir(self) -> Path:
        return self.dir / "log"

    @property
    def log_file(self) -> Path:
        return self.log_dir / f"{self.name}.log"

    @property
    def console_file(self) -> Path:
        return self.dir / "console.log"

    @property
    def joined_marker(self) -> Path:
        return self.dir / "joined"

    @property
    def ports(self) -> tuple[int, ...]:
        base = (self.amqp_port, self.management_port, self.prometheus_port, self.dist_port)
        return base if self.amqps_port is None else (*base, self.amqps_port)


def _port_free(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:port. SO_REUSEADDR, as the broker
    uses it: a port whose old connections sit in TIME_WAIT (a node's dist port
    right after it stopped) is free to listen on again."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ports_usable(ports: Iterable[int]) -> bool:
    return all(0 < p < 65536 and p not in RESERVED_PORTS and _port_free(p) for p in ports)


def _pick_base_port(count: int) -> int:
    """A base port with ``count`` consecutive free ports, none of them reserved.

    Taken below the ephemeral range, so that client sockets opened between
    construction and start() cannot grab them; the start is random, so that
    two clusters made at the same time rarely try the same block.
    """
    low, high = _AUTO_PORT_RANGE
    rng = random.Random()
    for _ in range(500):
        base = rng.randrange(low, high - count)
        if _ports_usable(range(base, base + count)):
            return base
    raise ClusterError(f"no {count} consecutive free ports in {low}-{high}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is not alive (it is only waiting to be reaped by its parent).
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    """The first few error lines of ``path`` (where RabbitMQ names a bad config
    key, before pages of crash report), then its last ``lines`` lines."""
    try:
        all_lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"({path} does not exist)"
    if not all_lines:
        return f"({path} is empty)"
    tail = all_lines[-lines:]
    head = [ln for ln in all_lines[: -lines or None] if "[error]" in ln or "Error" in ln][:8]
    return "\n".join([*head, "...", *tail] if head else tail)


class LocalCluster:
    """K RabbitMQ nodes on 127.0.0.1, clustered with node 1, each with
    ``rabbitmq_management`` and ``rabbitmq_prometheus`` enabled.

    Node i (1-based) takes four consecutive ports from ``base_port + 4*(i-1)``:
    AMQP, management, prometheus, Erlang distribution. Without ``base_port``
    a free block is picked at construction. The lines of ``config_file`` are
    appended to every node's generated ``rabbitmq.conf`` (listener keys in it
    are commented out: ports are the cluster's to give).

    ``amqps=True`` gives every node a fifth port, a TLS listener
    (``listeners.ssl.default``; node i's block is then ``base_port + 5*(i-1)``,
    the fifth port last): ``config_file`` must then hold the ``ssl_options.*``
    keys (certificate files the nodes can read: they run as the caller's OS
    user). ``plugins`` are enabled on top of management and prometheus (e.g.
    ``rabbitmq_auth_mechanism_ssl`` for x.509 login; see docs/tls.md).
    """

    def __init__(
        self,
        size: int,
        base_dir: Path,
        *,
        base_port: int | None = None,
        config_file: Path | None = None,
        name_prefix: str = "edgesim",
        amqps: bool = False,
        plugins: Iterable[str] = (),
    ) -> None:
        if size < 1:
            raise ValueError(f"a cluster needs at least one node, not {size}")
        if not name_prefix or not all(c.isalnum() or c in "_-" for c in name_prefix):
            raise ValueError(f"name_prefix must be letters, digits, '_' or '-': {name_prefix!r}")
        self.size = size
        self.base_dir = Path(base_dir).resolve()
        self.config_file = Path(config_file).resolve() if config_file is not None else None
        if self.config_file is not None and not self.config_file.is_file():
            raise FileNotFoundError(f"broker config {self.config_file} does not exist")
        self.name_prefix = name_prefix
        self.amqps = amqps
        self.plugins = tuple(dict.fromkeys((*PLUGINS, *plugins)))
        if not all(p and all(c.isalnum() or c == "_" for c in p) for p in self.plugins):
            raise ValueError(f"plugin names are letters, digits and '_': {self.plugins}")
        per_node = _PORTS_PER_NODE + (1 if amqps else 0)
        count = size * per_node
        if base_port is None:
            base_port = _pick_base_port(count)
        else:
            clash = sorted(RESERVED_PORTS.intersection(range(base_port, base_port + count)))
            if clash or base_port < 1024 or base_port + count > 65535:
                raise ValueError(
                    f"base_port {base_port} gives ports {base_port}-{base_port + count - 1}, "
                    f"which must lie in 1024-65535 and avoid {clash or 'reserved ports'}"
                )
        self.base_port = base_port
        self.nodes: list[NodeSpec] = [
            NodeSpec(
                index=i,
                name=f"{name_prefix}{i}@localhost",
                amqp_port=base_port + (i - 1) * per_node,
                management_port=base_port + (i - 1) * per_node + 1,
                prometheus_port=base_port + (i - 1) * per_node + 2,
                dist_port=base_port + (i - 1) * per_node + 3,
                dir=self.base_dir / f"node{i}",
                amqps_port=base_port + (i - 1) * per_node + 4 if amqps else None,
            )
            for i in range(1, size + 1)
        ]
        self.bin_dir = rabbitmq_bin_dir()
        self.home = self.base_dir / "home"  # holds the cluster's own Erlang cookie
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()

    # -- public properties ---------------------------------------------------

    @property
    def node_names(self) -> list[str]:
        return [n.name for n in self.nodes]

    @property
    def amqp_urls(self) -> list[str]:
        return [f"amqp://guest:guest@127.0.0.1:{n.amqp_port}/%2F" for n in self.nodes]

    @property
    def amqps_urls(self) -> list[str]:
        """The nodes' TLS listeners (``amqps=True`` only), guest's login: a
        client still has to trust the nodes' certificate (docs/tls.md)."""
        if not self.amqps:
            raise ValueError("this cluster has no TLS listeners (LocalCluster(..., amqps=True))")
        return [f"amqps://guest:guest@127.0.0.1:{n.amqps_port}/%2F" for n in self.nodes]

    @property
    def prometheus_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{n.prometheus_port}/metrics" for n in self.nodes]

    @property
    def management_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{n.management_port}" for n in self.nodes]

    def node(self, i: int) -> NodeSpec:
        """Node ``i`` (1-based)."""
        if not 1 <= i <= self.size:
            raise IndexError(f"node {i} is not in 1..{self.size}")
        return self.nodes[i - 1]

    # -- lifecycle -------------------------------------------------------------

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self, progress: Callable[[str], None] = print, timeout: float = 180) -> None:
        """Start the K nodes in parallel and join nodes 2..K to node 1.

        A node that joined before (its data dir is kept) rejoins by itself.
        On failure every node is stopped again and :class:`ClusterError` is
        raised with the tail of the failing node's log.
        """
        deadline = time.monotonic() + timeout
        t0 = time.monotonic()
        self.prepare()
        try:
            # Every node boots at once (a fresh node is a cluster of its own
            # until it joins); then nodes 2..K stop their app in parallel,
            # join node 1 one at a time (concurrent join_cluster calls into
            # one node are a known source of flaky cluster formation) and
            # start their app again in parallel.
            self._parallel(lambda n: self._start_and_wait(n, deadline, progress), self.nodes)
            joining = [n for n in self.nodes[1:] if not n.joined_marker.exists()]
            self._parallel(lambda n: self._ctl_ok(n, deadline, "stop_app"), joining)
            for node in joining:
                self._ctl_ok(node, deadline, "join_cluster", self.nodes[0].name)
            self._parallel(lambda n: self._ctl_ok(n, deadline, "start_app"), joining)
            for node in joining:
                node.joined_marker.write_text(f"joined {self.nodes[0].name}\n")
                progress(f"{node.name}: joined {self.nodes[0].name}")
        except BaseException:
            progress("start failed; stopping the nodes")
            self.stop(progress=progress)
            raise
        progress(f"cluster of {self.size} running in {time.monotonic() - t0:.1f}s")

    def stop(self, progress: Callable[[str], None] | None = None) -> None:
        """Stop every node, all at once (start() boots them all at once too, so
        no node has to be the last down and first up). Idempotent; never
        raises for a node that is not running."""
        self._parallel(lambda n: self._stop(n, progress), self.nodes)

    def stop_node(self, i: int, progress: Callable[[str], None] | None = None) -> None:
        """Stop node ``i``; nothing happens if it is not running."""
        self._stop(self.node(i), progress)

    def start_node(
        self, i: int, progress: Callable[[str], None] | None = None, timeout: float = 120
    ) -> None:
        """Start node ``i`` and wait until it runs. A node that had joined the
        cluster rejoins by itself; one that never joined is joined now."""
        node = self.node(i)
        deadline = time.monotonic() + timeout
        self.prepare()
        self._start_and_wait(node, deadline, progress)
        if i > 1 and not node.joined_marker.exists():
            self._join(node, deadline, progress)

    def restart_node(
        self, i: int, progress: Callable[[str], None] | None = None, timeout: float = 120
    ) -> None:
        """Stop node ``i`` and start it again; it rejoins the cluster (its data
        dir is kept) and this returns once it runs."""
        self.stop_node(i, progress)
        self.start_node(i, progress, timeout)

    def is_running(self, i: int) -> bool:
        """Whether node ``i``'s OS process is alive (not whether RabbitMQ is up)."""
        pid = self.pid(i)
        return pid is not None and _pid_alive(pid)

    def pid(self, i: int) -> int | None:
        """The beam process of node ``i``, from its pid file (None if absent)."""
        try:
            return int(self.node(i).pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def fd_limit(self, i: int = 1) -> int | None:
        """The open-files (soft) limit of node ``i``'s beam process, from
        ``/proc/<pid>/limits``; None if the node does not run."""
        pid = self.pid(i)
        if pid is None:
            return None
        try:
            limits = Path(f"/proc/{pid}/limits").read_text()
        except OSError:
            return None
        for line in limits.splitlines():
            if line.startswith("Max open files"):
                soft = line[len("Max open files") :].split()[0]
                return None if soft == "unlimited" else int(soft)
        return None

    # -- CLI -------------------------------------------------------------------

    def env(self, i: int) -> dict[str, str]:
        """The environment for node ``i``'s server and for CLI tools aimed at it."""
        node = self.node(i)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")}
        for key in ("ERL_FLAGS", "ERL_AFLAGS", "ERL_ZFLAGS", "ERL_LIBS"):
            env.pop(key, None)
        env.update(
            HOME=str(self.home),
            ERL_EPMD_ADDRESS="127.0.0.1",
            ERL_CRASH_DUMP=str(node.dir / "erl_crash.dump"),
            RABBITMQ_CONF_ENV_FILE=str(node.dir / "rabbitmq-env.conf"),
            RABBITMQ_NODENAME=node.name,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(node.amqp_port),
            RABBITMQ_DIST_PORT=str(node.dist_port),
            RABBITMQ_MNESIA_BASE=str(node.dir / "mnesia"),
            RABBITMQ_LOG_BASE=str(node.log_dir),
            RABBITMQ_PID_FILE=str(node.pid_file),
            RABBITMQ_CONFIG_FILE=str(node.config_file),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(node.dir / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(node.plugins_file),
            # Distribution on loopback only; the tag makes the beam findable
            # with `pgrep -f <node name>` (3.10 sets the node name at run time,
            # so it is not on the command line otherwise).
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=(
                "-kernel inet_dist_use_interface {127,0,0,1} "
                f"-edgeward_local_cluster_node {node.name}"
            ),
        )
        return env

    def ctl(
        self, i: int, *args: str, timeout: float = 60, tool: str = "rabbitmqctl"
    ) -> subprocess.CompletedProcess[str]:
        """Run ``tool -n NODE args...`` against node ``i``; never raises for a
        non-zero exit (check ``returncode``); raises ClusterError on timeout."""
        node = self.node(i)
        cmd = [str(self.bin_dir / tool), "-n", node.name, *args]
        try:
            return subprocess.run(
                cmd,
                env=self.env(i),
                cwd=node.dir,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=max(timeout, 1.0),
            )
        except subprocess.TimeoutExpired as exc:
            raise ClusterError(f"{' '.join(cmd)} did not finish in {timeout:.0f}s") from exc

    # -- files -----------------------------------------------------------------

    def prepare(self) -> None:
        """Write the cluster's Erlang cookie and every node's ``rabbitmq.conf``,
        ``enabled_plugins`` and (empty) ``rabbitmq-env.conf``. start() and
        start_node() call it; alone, it shows what a node would run with."""
        self.home.mkdir(parents=True, exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        if not cookie.exists():
            fd = os.open(cookie, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(20).upper())
        extra = self._shared_config_lines()
        for node in self.nodes:
            node.dir.mkdir(parents=True, exist_ok=True)
            node.log_dir.mkdir(exist_ok=True)
            (node.dir / "rabbitmq-env.conf").write_text("# empty: keep /etc/rabbitmq's out\n")
            node.plugins_file.write_text(f"[{','.join(self.plugins)}].\n")
            lines = [
                f"## {node.name}: generated by edgeward.simulator.cluster",
                f"listeners.tcp.local = 127.0.0.1:{node.amqp_port}",
                f"management.tcp.port = {node.management_port}",
                "management.tcp.ip = 127.0.0.1",
                f"prometheus.tcp.port = {node.prometheus_port}",
                "prometheus.tcp.ip = 127.0.0.1",
            ]
            if node.amqps_port is not None:
                lines.append(f"listeners.ssl.default = 127.0.0.1:{node.amqps_port}")
            if extra:
                lines += ["", f"## appended from {self.config_file}", *extra]
            node.config_file.write_text("\n".join(lines) + "\n")

    # -- internals -------------------------------------------------------------

    def _shared_config_lines(self) -> list[str]:
        if self.config_file is None:
            return []
        out = []
        for line in self.config_file.read_text().splitlines():
            key = line.split("=", 1)[0].strip()
            if not line.lstrip().startswith("#") and "=" in line and key.startswith(_NODE_KEYS):
                out.append(f"# (set per node by LocalCluster) {line}")
            else:
                out.append(line)
        return out

    def _start_and_wait(
        self, node: NodeSpec, deadline: float, progress: Callable[[str], None] | None
    ) -> None:
        say = progress or (lambda _line: None)
        t0 = time.monotonic()
        if self.is_running(node.index):
            say(f"{node.name}: already running")
        else:
            self._launch(node)
            say(f"{node.name}: starting (amqp {node.amqp_port})")
        self._await_running(node, deadline)
        say(f"{node.name}: running ({time.monotonic() - t0:.1f}s)")

    def _launch(self, node: NodeSpec) -> None:
        if not _ports_usable(node.ports):
            taken = [p for p in node.ports if not _port_free(p)]
            raise ClusterError(f"{node.name}: ports {taken} are taken")
        node.pid_file.unlink(missing_ok=True)
        server = self.bin_dir / "rabbitmq-server"
        if not server.exists():
            raise ClusterError(f"{server} not found (is Debian's rabbitmq-server installed?)")
        with node.console_file.open("ab") as console:
            proc = subprocess.Popen(
                [str(server)],
                env=self.env(node.index),
                cwd=node.dir,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # outlives Ctrl-C in the caller's terminal
            )
        with self._lock:
            self._procs[node.index] = proc

    def _await_running(self, node: NodeSpec, deadline: float) -> None:
        """Until the pid file names a live beam, then `rabbitmqctl wait` (which
        returns once rabbit and its plugins run, and fails if the beam dies)."""
        proc = self._procs.get(node.index)
        while True:
            if proc is not None and proc.poll() is not None:
                status = proc.returncode
                self._fail(node, f"rabbitmq-server exited (status {status}) before the node ran")
            pid = self.pid(node.index)
            if pid is not None and _pid_alive(pid):
                break
            if time.monotonic() > deadline:
                self._fail(node, "no pid file before the deadline")
            time.sleep(0.1)
        remaining = deadline - time.monotonic()
        wait_args = ("wait", str(node.pid_file), "--timeout", f"{max(remaining, 1):.0f}")
        res = self.ctl(node.index, *wait_args, timeout=remaining + 10)
        if res.returncode != 0:
            self._fail(node, f"rabbitmqctl wait failed: {(res.stderr or res.stdout).strip()}")

    def _join(
        self, node: NodeSpec, deadline: float, progress: Callable[[str], None] | None
    ) -> None:
        if node.joined_marker.exists():
            return
        first = self.nodes[0].name
        t0 = time.monotonic()
        self._ctl_ok(node, deadline, "stop_app")
        self._ctl_ok(node, deadline, "join_cluster", first)
        self._ctl_ok(node, deadline, "start_app")
        node.joined_marker.write_text(f"joined {first}\n")
        if progress:
            progress(f"{node.name}: joined {first} ({time.monotonic() - t0:.1f}s)")

    def _ctl_ok(self, node: NodeSpec, deadline: float, *args: str) -> None:
        """``rabbitmqctl args`` against ``node``; ClusterError unless it succeeds."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            self._fail(node, f"no time left for rabbitmqctl {' '.join(args)}")
        res = self.ctl(node.index, *args, timeout=remaining)
        if res.returncode != 0:
            detail = (res.stderr or res.stdout).strip()
            self._fail(node, f"rabbitmqctl {' '.join(args)} failed: {detail}")

    @staticmethod
    def _parallel(fn: Callable[[NodeSpec], None], nodes: list[NodeSpec]) -> None:
        """fn(node) for every node at once; re-raises the first failure."""
        if len(nodes) <= 1:
            for node in nodes:
                fn(node)
            return
        with ThreadPoolExecutor(max_workers=len(nodes)) as pool:
            for future in [pool.submit(fn, n) for n in nodes]:
                future.result()

    def _fail(self, node: NodeSpec, reason: str) -> None:
        raise ClusterError(
            f"{node.name}: {reason}\n"
            f"--- tail of {node.log_file} ---\n{_tail(node.log_file)}\n"
            f"--- tail of {node.console_file} ---\n{_tail(node.console_file)}"
        )

    def _stop(self, node: NodeSpec, progress: Callable[[str], None] | None) -> None:
        pid = self.pid(node.index)
        proc = self._procs.get(node.index)
        if pid is not None and _pid_alive(pid):
            t0 = time.monotonic()
            try:
                res = self.ctl(node.index, "stop", str(node.pid_file), timeout=60)
                ok = res.returncode == 0
            except ClusterError:
                ok = False
            if not ok or _pid_alive(pid):
                self._kill(pid)
            if progress:
                progress(f"{node.name}: stopped ({time.monotonic() - t0:.1f}s)")
        elif proc is not None and proc.poll() is None:
            # Launched but no pid file yet: end the session we started.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        node.pid_file.unlink(missing_ok=True)
        if proc is not None:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            with self._lock:
                self._procs.pop(node.index, None)

    @staticmethod
    def _kill(pid: int) -> None:
        """SIGTERM (a graceful stop for RabbitMQ), then SIGKILL after 30 s."""
        for sig, grace in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            end = time.monotonic() + grace
            while time.monotonic() < end:
                if not _pid_alive(pid):
                    return
                time.sleep(0.1)
