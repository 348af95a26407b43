"""LocalCluster (simulator/cluster.py) and scrape() (simulator/metrics.py).

The cluster tests start their own RabbitMQ nodes (names ``edgesimtest<hex>N``,
ports picked free, files under tmp_path) and never touch the machine's shared
broker; they need Debian's rabbitmq-server installed and are marked
``broker`` so that ``-m "not broker"`` leaves them out. One 2-node cluster,
started with charts/rabbitmq/rabbitmq.conf, serves the module; the tests run
in file order and the last one stops it.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pika
import pytest
from brokerkit import wait_until

from edgeward.simulator.cluster import ClusterError, LocalCluster, rabbitmq_bin_dir
from edgeward.simulator.metrics import MetricsUnavailable, parse, scrape

REPO = Path(__file__).resolve().parent.parent
TUNED_CONFIG = REPO / "charts" / "rabbitmq" / "rabbitmq.conf"
F = TypeVar("F", bound=Callable[..., Any])

_NO_RABBITMQ = not (rabbitmq_bin_dir() / "rabbitmq-server").exists()


def needs_rabbitmq(test: F) -> F:
    """Marks a test that starts nodes: ``broker``, and skipped without RabbitMQ."""
    test = pytest.mark.broker(test)
    return pytest.mark.skipif(_NO_RABBITMQ, reason="needs Debian's rabbitmq-server")(test)


def _prefix() -> str:
    return f"edgesimtest{secrets.token_hex(3)}"


def _beams(prefix: str) -> list[str]:
    """Command lines of running processes that mention ``prefix`` (our beams
    carry their node name on the command line)."""
    out = subprocess.run(["pgrep", "-af", prefix], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "beam" in line]


def _running_nodes(cluster: LocalCluster, i: int) -> list[str]:
    res = cluster.ctl(i, "cluster_status", "--formatter", "json")
    assert res.returncode == 0, res.stderr
    return sorted(json.loads(res.stdout)["running_nodes"])


# -- no nodes started ------------------------------------------------------------


def test_ports_names_and_urls_are_distinct(tmp_path: Path) -> None:
    c = LocalCluster(3, tmp_path, name_prefix="edgesimunit")
    assert c.node_names == [f"edgesimunit{i}@localhost" for i in (1, 2, 3)]
    ports = [p for n in c.nodes for p in n.ports]
    assert len(set(ports)) == 12
    assert 25672 not in ports and 5672 not in ports and 15672 not in ports
    assert c.amqp_urls[1] == f"amqp://guest:guest@127.0.0.1:{c.nodes[1].amqp_port}/%2F"
    assert c.prometheus_urls[2] == f"http://127.0.0.1:{c.nodes[2].prometheus_port}/metrics"
    assert c.management_urls[0] == f"http://127.0.0.1:{c.nodes[0].management_port}"
    assert c.nodes[1].dir == tmp_path.resolve() / "node2"
    with pytest.raises(IndexError):
        c.node(4)


def test_base_port_must_avoid_the_shared_node(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="25672"):
        LocalCluster(2, tmp_path, base_port=25670)
    c = LocalCluster(2, tmp_path, base_port=21000)
    assert [n.amqp_port for n in c.nodes] == [21000, 21004]


def test_config_file_is_appended_without_its_listeners(tmp_path: Path) -> None:
    extra = tmp_path / "extra.conf"
    extra.write_text("heartbeat = 30\nlisteners.tcp.default = 5672\n")
    c = LocalCluster(2, tmp_path / "c", config_file=extra, name_prefix="edgesimunit")
    c.prepare()
    for node in c.nodes:
        text = node.config_file.read_text()
        assert f"listeners.tcp.local = 127.0.0.1:{node.amqp_port}" in text
        assert f"prometheus.tcp.port = {node.prometheus_port}" in text
        assert "\nheartbeat = 30\n" in text
        assert "\nlisteners.tcp.default = 5672" not in text
        assert node.plugins_file.read_text() == "[rabbitmq_management,rabbitmq_prometheus].\n"
    assert (c.home / ".erlang.cookie").stat().st_mode & 0o777 == 0o400


def test_parse_keeps_what_parses() -> None:
    text = (
        "# TYPE rabbitmq_connections gauge\n"
        "rabbitmq_connections 3\n"
        "# TYPE rabbitmq_global_messages_received_total counter\n"
        'rabbitmq_global_messages_received_total{protocol="amqp091"} 5\n'
        'rabbitmq_global_messages_received_total{protocol="mqtt"} 2\n'
        "# TYPE rabbitmq_process_open_fds gauge\n"
        "rabbitmq_process_open_fds not-a-number\n"
        "some_other_metric 1\n"
    )
    assert parse(text) == {"connections": 3.0, "messages_in_total": 7.0}


def test_the_erlang_runtime_in_milliseconds_becomes_cpu_seconds() -> None:
    text = (
        "# TYPE erlang_vm_statistics_runtime_milliseconds counter\n"
        "# HELP erlang_vm_statistics_runtime_milliseconds The sum of the runtime.\n"
        "erlang_vm_statistics_runtime_milliseconds 81208\n"
    )
    assert parse(text) == {"cpu_seconds": pytest.approx(81.208)}


def test_scrape_unreachable_raises(free_port_factory) -> None:
    url = f"http://127.0.0.1:{free_port_factory()}/metrics"
    with pytest.raises(MetricsUnavailable) as info:
        scrape(url, timeout=2)
    assert info.value.url == url


def test_a_slow_node_is_scraped_on_the_scrapers_thread_not_the_callers(
    free_port_factory,
) -> None:
    import http.server
    import threading
    import time

    from edgeward.simulator.metrics import NodeScraper

    # Given a node that takes a second to answer and one that does not answer
    class Slow(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            time.sleep(1.0)
            body = b"# TYPE rabbitmq_connections gauge\nrabbitmq_connections 42\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    slow = f"http://127.0.0.1:{server.server_address[1]}/metrics"
    away = f"http://127.0.0.1:{free_port_factory()}/metrics"
    scraper = NodeScraper([("rabbit@away", away), ("rabbit@slow", slow)], every=0.5)
    try:
        # When the scraper runs
        scraper.start()
        # Then taking its samples never waits on a scrape
        began = time.monotonic()
        first = scraper.take()
        assert time.monotonic() - began < 0.1
        # And the slow node's figures arrive, the silent node's never do
        samples = list(first)
        wait_until(
            lambda: samples.extend(scraper.take()) or len(samples) >= 2,
            timeout=10,
            message="the slow node was not scraped twice",
        )
        assert {node for _, node, _ in samples} == {"rabbit@slow"}
        assert all(figures == {"connections": 42.0} for _, _, figures in samples)
    finally:
        scraper.stop()
        server.shutdown()
        server.server_close()
    # And once stopped it scrapes no more
    assert not scraper._thread.is_alive()


# -- real nodes ------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = LocalCluster(
        2,
        tmp_path_factory.mktemp("cluster"),
        config_file=TUNED_CONFIG,
        name_prefix=_prefix(),
    )
    c.start(progress=lambda _line: None, timeout=120)
    try:
        yield c
    finally:
        c.stop()


@needs_rabbitmq
@pytest.mark.parametrize("node", [1, 2])
def test_both_nodes_see_two_running_nodes(cluster: LocalCluster, node: int) -> None:
    assert _running_nodes(cluster, node) == sorted(cluster.node_names)


@needs_rabbitmq
def test_tuned_config_is_in_force(cluster: LocalCluster) -> None:
    res = cluster.ctl(2, "eval", "application:get_env(rabbit, tcp_listen_options).")
    assert res.returncode == 0, res.stderr
    assert "{backlog,4096}" in res.stdout and "{sndbuf,32768}" in res.stdout
    assert cluster.fd_limit(2) == scrape(cluster.prometheus_urls[1])["fd_limit"]


@needs_rabbitmq
def test_stream_on_node2_and_metrics(cluster: LocalCluster) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(cluster.amqp_urls[1]))
    try:
        ch = conn.channel()
        ch.queue_declare("edgesimtest.stream", durable=True, arguments={"x-queue-type": "stream"})
        ch.confirm_delivery()
        ch.basic_publish("", "edgesimtest.stream", b"hello")

        def on_node2() -> dict[str, float] | None:
            m = scrape(cluster.prometheus_urls[1])
            return m if m.get("connections", 0) >= 1 and m.get("messages_in_total") else None

        m2 = wait_until(on_node2, timeout=10, message="node 2 never counted the connection")
        m1 = scrape(cluster.prometheus_urls[0])
        for m in (m1, m2):
            assert {"memory_bytes", "fds", "fd_limit", "connections", "erlang_processes"} <= set(m)
            assert m["memory_bytes"] > 10_000_000
            assert 0 < m["fds"] < m["fd_limit"]
            # The Erlang runtime's CPU in seconds: a booted node has used some,
            # and far less than it has been up (ms were not taken for s).
            assert 0.1 < m["cpu_seconds"] < 3600
        assert m1["connections"] == 0
    finally:
        conn.close()


@needs_rabbitmq
def test_restart_node2_rejoins(cluster: LocalCluster) -> None:
    old_pid = cluster.pid(2)
    cluster.restart_node(2)
    assert cluster.pid(2) != old_pid
    wait_until(
        lambda: _running_nodes(cluster, 1) == sorted(cluster.node_names),
        timeout=30,
        interval=0.5,
        message="node 2 is not back in node 1's cluster",
    )
    conn = pika.BlockingConnection(pika.URLParameters(cluster.amqp_urls[1]))
    try:
        # The stream declared before the restart is still there (passive).
        conn.channel().queue_declare("edgesimtest.stream", passive=True)
    finally:
        conn.close()


@needs_rabbitmq
def test_stop_leaves_no_node(cluster: LocalCluster) -> None:
    assert len(_beams(cluster.name_prefix)) == 2
    cluster.stop()
    assert _beams(cluster.name_prefix) == []
    assert not cluster.is_running(1) and not cluster.is_running(2)
    cluster.stop()  # idempotent


@needs_rabbitmq
def test_bad_config_fails_with_the_log(tmp_path: Path) -> None:
    bad = tmp_path / "bad.conf"
    bad.write_text("no_such_setting_anywhere = 1\n")
    prefix = _prefix()
    c = LocalCluster(1, tmp_path / "c", config_file=bad, name_prefix=prefix)
    with pytest.raises(ClusterError, match="no_such_setting_anywhere"):
        c.start(progress=lambda _line: None, timeout=60)
    assert _beams(prefix) == []
