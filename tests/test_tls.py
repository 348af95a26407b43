"""TLS to the broker (docs/tls.md): amqps:// with a pinned CA, with and
without a client certificate, and x.509 login (SASL EXTERNAL).

The CA, the broker's certificate (SANs: DNS ``localhost``, IP ``127.0.0.1``)
and the devices' certificates (CN = device name) are made here, per module,
with ``cryptography``.  One RabbitMQ node of the module's own
(simulator.cluster.LocalCluster with a TLS listener, the
``rabbitmq_auth_mechanism_ssl`` plugin, PLAIN and EXTERNAL offered, peer
certificates verified but not required) serves every broker test; each test
works in a vhost of its own there.  Every handshake is real: nothing here
mocks pika or ssl.

The first tests need no broker: how settings are read, checked and refused.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import secrets
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pika
import pika.credentials
import pika.exceptions
import pytest
from brokerkit import BrokerAdmin, wait_until
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from fleetkit import CLI
from test_telemetry_agent_e2e import Agent, StreamReader, alert_line, declare_and_publish_policy

from edgeward.actors.config import AgentConfig
from edgeward.simulator.cluster import LocalCluster, rabbitmq_bin_dir
from edgeward.transport import topology
from edgeward.transport.admin import ManagementAPI
from edgeward.transport.connection import (
    TLSSettings,
    TLSSettingsError,
    connect_blocking,
    parameters,
)
from edgeward.transport.errors import BrokerUnreachable
from edgeward.transport.signing import Signer

F = TypeVar("F", bound=Callable[..., Any])
_NO_RABBITMQ = not (rabbitmq_bin_dir() / "rabbitmq-server").exists()


def needs_node(test: F) -> F:
    """A test on the module's TLS node: ``broker``, skipped without RabbitMQ."""
    test = pytest.mark.broker(test)
    return pytest.mark.skipif(_NO_RABBITMQ, reason="needs Debian's rabbitmq-server")(test)


# -- a throwaway PKI ----------------------------------------------------------------------


class Pki:
    """CAs and the certificates they issue, as PEM files under ``dir``."""

    def __init__(self, dir: Path) -> None:
        self.dir = dir
        dir.mkdir(parents=True, exist_ok=True)
        self._cas: dict[str, tuple[Any, x509.Certificate]] = {}
        self._now = datetime.datetime.now(datetime.UTC)

    def _write(self, name: str, key: Any, cert: x509.Certificate) -> tuple[Path, Path]:
        crt, pem = self.dir / f"{name}.crt", self.dir / f"{name}.key"
        crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pem.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return crt, pem

    def _builder(self, cn: str, issuer: x509.Name, public_key: Any) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._now - datetime.timedelta(minutes=5))
            .not_valid_after(self._now + datetime.timedelta(days=1))
        )

    def ca(self, name: str) -> Path:
        """A self-signed CA; its certificate's file."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"edgeward test {name}")])
        cert = (
            self._builder(f"edgeward test {name}", subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        self._cas[name] = (key, cert)
        return self._write(f"ca-{name}", key, cert)[0]

    def issue(
        self, ca: str, cn: str, *, server: bool = False, sans: tuple[str, ...] = ()
    ) -> tuple[Path, Path]:
        """A certificate for ``cn`` signed by CA ``ca``: (cert file, key file).
        ``sans``: DNS names and IP addresses (a server's)."""
        ca_key, ca_cert = self._cas[ca]
        key = ec.generate_private_key(ec.SECP256R1())
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            self._builder(cn, ca_cert.subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
        )
        if sans:
            names: list[x509.GeneralName] = []
            for san in sans:
                try:
                    names.append(x509.IPAddress(ipaddress.ip_address(san)))
                except ValueError:
                    names.append(x509.DNSName(san))
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return self._write(f"{ca}-{cn}", key, builder.sign(ca_key, hashes.SHA256()))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    pki = Pki(tmp_path_factory.mktemp("pki"))
    pki.ca("ca")  # the fleet's CA: the broker's and the devices' certificates
    pki.ca("other")  # a CA nobody here uses: pinning it must fail
    pki.issue("ca", "localhost", server=True, sans=("localhost", "127.0.0.1"))
    return pki


# -- the module's TLS node --------------------------------------------------------------------


class TlsNode:
    """The module's node: its amqp:// and amqps:// URLs per vhost, its admin."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.amqp_port = cluster.node(1).amqp_port
        self.amqps_port = cluster.node(1).amqps_port
        self.admin = BrokerAdmin(cluster.management_urls[0])
        self.api = ManagementAPI(cluster.management_urls[0] + "/api", "guest", "guest")

    def amqp_url(self, vhost: str) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/{_q(vhost)}"

    def amqps_url(self, vhost: str, login: str = "guest:guest@", host: str = "127.0.0.1") -> str:
        return f"amqps://{login}{host}:{self.amqps_port}/{_q(vhost)}"

    def declare_topology(self, vhost: str) -> None:
        conn = pika.BlockingConnection(pika.URLParameters(self.amqp_url(vhost)))
        try:
            topology.declare(conn.channel())
        finally:
            conn.close()

    def certificate_user(self, vhost: str, device: str) -> None:
        """A device user (the grants ``edgeward enroll`` gives) with no
        password: it can log in only with a certificate whose CN it is."""
        self.api.put_device_user(vhost, device, None)

    def connections(self, vhost: str) -> list[dict[str, Any]]:
        """The vhost's client connections as the node sees them: user, ssl,
        auth_mechanism, peer_cert_subject (rabbitmqctl: the management API
        learns of a connection only with its next stats, seconds later)."""
        columns = ("name", "user", "ssl", "auth_mechanism", "peer_cert_subject")
        res = self.cluster.ctl(
            1, "list_connections", "-p", vhost, *columns, "-q", "--formatter", "json"
        )
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout or "[]")


def _q(part: str) -> str:
    return urllib.parse.quote(part, safe="")


def node_config(pki: Pki, path: Path) -> Path:
    """What docs/tls.md tells an operator to put in rabbitmq.conf (the TLS
    listener's port is LocalCluster's to give)."""
    path.write_text(
        "\n".join(
            [
                f"ssl_options.cacertfile = {pki.dir / 'ca-ca.crt'}",
                f"ssl_options.certfile = {pki.dir / 'ca-localhost.crt'}",
                f"ssl_options.keyfile = {pki.dir / 'ca-localhost.key'}",
                "ssl_options.verify = verify_peer",
                "ssl_options.fail_if_no_peer_cert = false",
                "auth_mechanisms.1 = PLAIN",
                "auth_mechanisms.2 = AMQPLAIN",
                "auth_mechanisms.3 = EXTERNAL",
                "ssl_cert_login_from = common_name",
                "",
            ]
        )
    )
    return path


@pytest.fixture(scope="module")
def node(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsNode]:
    if _NO_RABBITMQ:
        pytest.skip("needs Debian's rabbitmq-server")
    base = tmp_path_factory.mktemp("tlsnode")
    cluster = LocalCluster(
        1,
        base / "cluster",
        config_file=node_config(pki, base / "tls.conf"),
        name_prefix=f"edgewardtls{secrets.token_hex(3)}",
        amqps=True,
        plugins=("rabbitmq_auth_mechanism_ssl",),
    )
    cluster.start(progress=lambda line: None)
    try:
        yield TlsNode(cluster)
    finally:
        cluster.stop()


@pytest.fixture
def tls_vhost(node: TlsNode) -> Iterator[str]:
    """A vhost of the test's own on the TLS node, guest allowed everything."""
    name = f"tls-{secrets.token_hex(4)}"
    node.admin.create_vhost(name)
    node.admin.set_permissions(name, "guest")
    try:
        yield name
    finally:
        node.admin.close_connections(name)
        node.admin.delete_vhost(name)


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    made: list[Agent] = []
    yield made
    for agent in made:
        agent.stop()


def ca_only(pki: Pki, ca: str = "ca") -> TLSSettings:
    return TLSSettings(ca=str(pki.dir / f"ca-{ca}.crt"))


def with_certificate(pki: Pki, device: str, *, external: bool) -> TLSSettings:
    cert, key = pki.issue("ca", device)
    return TLSSettings(
        ca=str(pki.dir / "ca-ca.crt"), cert=str(cert), key=str(key), external=external
    )


def round_trip(conn: pika.BlockingConnection) -> bytes:
    """Publish a message to a fresh queue and consume it back."""
    channel = conn.channel()
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.confirm_delivery()
    channel.basic_publish("", queue, b"over TLS")
    for _method, _props, body in channel.consume(queue, auto_ack=True, inactivity_timeout=5):
        return body
    raise AssertionError("nothing came back")


# == settings, without a broker ==================================================================


def test_a_client_certificate_without_its_key_is_refused_before_connecting() -> None:
    # Given settings with a certificate but no key (from the environment)
    tls = TLSSettings.from_env({"EDGEWARD_TLS_CERT": "/etc/edgeward/device.crt"})
    # When they are checked, Then the refusal names both settings
    with pytest.raises(TLSSettingsError, match="EDGEWARD_TLS_CERT is set without EDGEWARD_TLS_KEY"):
        tls.validate()


def test_external_login_without_a_client_certificate_is_refused() -> None:
    with pytest.raises(TLSSettingsError, match="tls_external needs a client certificate"):
        TLSSettings(ca="/ca.crt", external=True, source="config").validate()


def test_an_unreadable_ca_file_is_refused_naming_the_setting_and_the_file(
    tmp_path: Path,
) -> None:
    # Given an amqps URL and a CA file that is not there
    tls = TLSSettings(ca=str(tmp_path / "nope.crt"))
    # Then checking refuses it, saying which setting and why
    with pytest.raises(TLSSettingsError, match=r"EDGEWARD_TLS_CA=.*nope.crt: cannot read"):
        tls.check(["amqps://guest:guest@127.0.0.1:5671/%2F"])
    # And a file that is not PEM is refused as such
    junk = tmp_path / "junk.crt"
    junk.write_text("not a certificate\n")
    with pytest.raises(TLSSettingsError, match="not a PEM CA certificate"):
        TLSSettings(ca=str(junk)).check(["amqps://127.0.0.1/"])


def test_tls_settings_with_a_plain_amqp_url_are_refused_not_ignored(pki: Pki) -> None:
    # Given a pinned CA, When the URL list holds a plain amqp:// node
    urls = ["amqps://127.0.0.1:5671/%2F", "amqp://guest:secret@127.0.0.1:5672/%2F"]
    # Then the settings are refused, with the password kept out of the message
    with pytest.raises(TLSSettingsError, match="is plain amqp://") as refused:
        ca_only(pki).check(urls)
    assert "secret" not in str(refused.value)
    # And connect_blocking says so without trying a node
    with pytest.raises(BrokerUnreachable, match="not tried: EDGEWARD_TLS_CA set"):
        connect_blocking(urls, tls=ca_only(pki))


def test_a_bad_external_flag_in_the_environment_is_refused() -> None:
    with pytest.raises(TLSSettingsError, match="EDGEWARD_TLS_EXTERNAL='maybe'"):
        TLSSettings.from_env({"EDGEWARD_TLS_EXTERNAL": "maybe"})
    env = {"EDGEWARD_TLS_EXTERNAL": "true", "EDGEWARD_TLS_CERT": "c", "EDGEWARD_TLS_KEY": "k"}
    assert TLSSettings.from_env(env) == TLSSettings(cert="c", key="k", external=True)
    assert not TLSSettings.from_env({}).enabled


def test_a_pinned_ca_is_the_only_trust_and_host_names_are_checked(pki: Pki) -> None:
    # Given a pinned CA, When parameters are made for an amqps URL
    params = parameters("amqps://guest:guest@127.0.0.1:5671/%2F", tls=ca_only(pki))
    ctx = params.ssl_options.context
    # Then only that CA is trusted (not the system's store), the broker must
    # show a certificate, its host name is checked, and TLS is 1.2 at least
    assert [c["subject"] for c in ctx.get_ca_certs()] == [((("commonName", "edgeward test ca"),),)]
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    # And the URL's login is kept (PLAIN)
    assert isinstance(params.credentials, pika.credentials.PlainCredentials)


def test_external_login_replaces_the_urls_login_with_the_certificate(pki: Pki) -> None:
    params = parameters(
        "amqps://127.0.0.1:5671/%2F", tls=with_certificate(pki, "pos-0009", external=True)
    )
    assert isinstance(params.credentials, pika.credentials.ExternalCredentials)


def test_a_renewed_certificate_is_used_and_a_half_written_one_does_not_break_reconnects(
    pki: Pki,
) -> None:
    # Given a client context made from a device's certificate
    tls = with_certificate(pki, "pos-0010", external=False)
    first = tls.context()
    assert tls.context() is first
    # When the certificate is renewed (same paths, new files)
    pki.issue("ca", "pos-0010")
    # Then the next connection gets a new context
    renewed = tls.context()
    assert renewed is not first
    # When the key is replaced by something broken (a renewal half written)
    Path(tls.key).write_text("-----BEGIN PRIVATE KEY-----\ntruncated\n")
    # Then the last good context is kept rather than failing every reconnect
    assert tls.context() is renewed


def test_an_agent_config_with_tls_files_and_a_plain_url_is_refused(pki: Pki) -> None:
    base = {
        "device": "pos-0001",
        "labels": {},
        "cache_dir": "/tmp/x",
        "trusted_keys": {},
    }
    with pytest.raises(ValueError, match="tls_ca set, but amqp://127.0.0.1:5672/ is plain"):
        AgentConfig(**base, broker_url="amqp://127.0.0.1:5672/", tls_ca=str(pki.dir / "x"))
    with pytest.raises(ValueError, match="tls_key is set without tls_cert"):
        AgentConfig(**base, broker_url="amqps://127.0.0.1/", tls_key="/k")
    # And the settings are the config's own
    config = AgentConfig(**base, broker_url="amqps://h/", tls_ca="/ca", tls_cert="/c", tls_key="/k")
    assert config.tls_settings() == TLSSettings("/ca", "/c", "/k", False, source="config")


def test_an_agent_whose_ca_file_is_missing_stops_with_a_clear_error(tmp_path: Path) -> None:
    # Given an agent config naming a CA file that does not exist
    config = tmp_path / "pos-0001.json"
    config.write_text(
        json.dumps(
            {
                "device": "pos-0001",
                "labels": {},
                "broker_url": "amqps://guest:guest@127.0.0.1:5671/%2F",
                "cache_dir": str(tmp_path / "cache"),
                "trusted_keys": {},
                "tls_ca": str(tmp_path / "missing-ca.crt"),
            }
        )
    )
    # When the agent is run
    done = subprocess.run(
        [*CLI, "agent", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Then it stops at once with one line naming the setting: no traceback
    assert done.returncode == 2, done.stdout + done.stderr
    assert "tls_ca=" in done.stderr and "missing-ca.crt: cannot read" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_an_agent_with_a_certificate_for_another_device_does_not_start(
    pki: Pki, tmp_path: Path
) -> None:
    # Given a config for pos-0004 holding pos-0005's certificate, with EXTERNAL
    tls = with_certificate(pki, "pos-0005", external=True)
    signer = Signer.generate()
    agent = Agent(
        tmp_path / "agent",
        "amqps://127.0.0.1:5671/%2F",
        signer,
        device="pos-0004",
        tls_ca=tls.ca,
        tls_cert=tls.cert,
        tls_key=tls.key,
        tls_external=True,
    )
    # When it is run
    done = subprocess.run(
        [*CLI, "agent", "run", "--config", str(agent.config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Then it refuses, naming the CN it would log in as
    assert done.returncode == 2, done.stdout + done.stderr
    assert "its CN is 'pos-0005', not 'pos-0004'" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_broker_certificate_for_another_host_name_is_refused(pki: Pki) -> None:
    # Given a TLS server (not a broker: the handshake is all that matters)
    # whose certificate, from the pinned CA, names another host
    cert, key = pki.issue("ca", "elsewhere.example", server=True, sans=("elsewhere.example",))
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve_one() -> None:
        conn, _ = listener.accept()
        try:
            server_ctx.wrap_socket(conn, server_side=True).close()
        except (ssl.SSLError, OSError):
            conn.close()

    thread = threading.Thread(target=serve_one, daemon=True)
    thread.start()
    try:
        # When a client pinning that CA connects to it as 127.0.0.1
        with pytest.raises(BrokerUnreachable) as refused:
            connect_blocking([f"amqps://guest:guest@127.0.0.1:{port}/%2F"], tls=ca_only(pki))
    finally:
        thread.join(5)
        listener.close()
    # Then the certificate is refused for the address it was reached at, and we say so
    assert "TLS: the broker's certificate is not trusted" in str(refused.value)
    assert "IP address mismatch, certificate is not valid for '127.0.0.1'" in str(refused.value)


# == against the TLS node =========================================================================


@needs_node
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_a_client_with_only_the_ca_logs_in_with_a_password_over_tls(
    node: TlsNode, pki: Pki, tls_vhost: str, host: str
) -> None:
    # Given a client that pins the fleet's CA and has no certificate of its own
    # (the broker's certificate names both 127.0.0.1, an IP SAN, and localhost)
    url = node.amqps_url(tls_vhost, host=host)
    # When it connects with guest's password and sends itself a message
    conn = connect_blocking([url], name="tls-test-plain", tls=ca_only(pki))
    try:
        body = round_trip(conn)
        # Then the message comes back, over a TLS connection logged in with PLAIN
        assert body == b"over TLS"
        (seen,) = wait_until(lambda: node.connections(tls_vhost), timeout=10)
        assert seen["ssl"] is True and seen["auth_mechanism"] == "PLAIN"
        assert seen["user"] == "guest" and not seen["peer_cert_subject"]
    finally:
        conn.close()


@needs_node
def test_a_client_pinning_another_ca_is_refused_with_a_clear_error_not_a_hang(
    node: TlsNode, pki: Pki, tls_vhost: str
) -> None:
    # Given a client that pins a CA which did not sign the broker's certificate
    tls = ca_only(pki, "other")
    # When it connects
    started = time.monotonic()
    with pytest.raises(BrokerUnreachable) as refused:
        connect_blocking([node.amqps_url(tls_vhost)], tls=tls, timeout=10)
    # Then it is refused at once, saying the certificate failed verification
    # against the pinned CA (and which file that is)
    assert time.monotonic() - started < 5
    message = str(refused.value)
    assert "TLS: the broker's certificate is not trusted (certificate verify failed" in message
    assert f"EDGEWARD_TLS_CA={pki.dir / 'ca-other.crt'}" in message
    assert "guest:guest" not in message


@needs_node
def test_a_client_certificate_logs_in_with_external_as_its_cn_with_that_users_grants(
    node: TlsNode, pki: Pki, tls_vhost: str
) -> None:
    # Given a device user without a password, and a certificate with its name as CN
    device = "pos-0003"
    node.declare_topology(tls_vhost)
    node.certificate_user(tls_vhost, device)
    tls = with_certificate(pki, device, external=True)
    # When the device connects with EXTERNAL (the URL names no user)
    conn = connect_blocking([node.amqps_url(tls_vhost, login="")], tls=tls)
    try:
        # Then the broker logged it in as the certificate's CN, over TLS
        (seen,) = wait_until(lambda: node.connections(tls_vhost), timeout=10)
        assert seen["user"] == device and seen["auth_mechanism"] == "EXTERNAL"
        assert seen["ssl"] is True and f"CN={device}" in seen["peer_cert_subject"]
        # And that user's grants apply: its own telemetry goes through ...
        channel = conn.channel()
        channel.confirm_delivery()
        props = pika.BasicProperties(user_id=device)
        exchange = topology.TELEMETRY_EXCHANGE
        channel.basic_publish(exchange, f"telemetry.{device}.alert", b"x", props, mandatory=True)
        # ... another device's routing key does not
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            channel.basic_publish(exchange, "telemetry.pos-0999.alert", b"x", props)
        assert refused.value.reply_code == 403
    finally:
        if conn.is_open:
            conn.close()
    # And the user has no password: a PLAIN login as it is refused
    with pytest.raises(BrokerUnreachable, match="login refused"):
        connect_blocking([node.amqps_url(tls_vhost, login=f"{device}:@")], tls=ca_only(pki))


@needs_node
def test_the_cli_reads_tls_settings_from_the_environment(
    node: TlsNode, pki: Pki, tls_vhost: str
) -> None:
    # Given the control plane's environment: the broker URL and the pinned CA
    env = {
        **os.environ,
        "EDGEWARD_BROKER_URL": node.amqps_url(tls_vhost),
        "EDGEWARD_TLS_CA": str(pki.dir / "ca-ca.crt"),
    }
    # When the CLI checks the broker and declares the topology
    done = subprocess.run(
        [*CLI, "broker", "up"], env=env, capture_output=True, text=True, timeout=60
    )
    # Then it did so over TLS
    assert done.returncode == 0, done.stdout + done.stderr
    assert "topology declared" in done.stdout
    assert node.admin.queue_info(tls_vhost, topology.HEARTBEAT_QUEUE) is not None
    # And without the CA (the system's store) the same command is refused, clearly
    env.pop("EDGEWARD_TLS_CA")
    done = subprocess.run(
        [*CLI, "broker", "up"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert "the broker's certificate is not trusted" in done.stderr
    assert "the system's trust store" in done.stderr and "Traceback" not in done.stderr


@needs_node
def test_an_agent_over_amqps_with_the_pinned_ca_puts_a_policy_in_force(
    node: TlsNode, pki: Pki, tls_vhost: str, agents: list[Agent], tmp_path: Path
) -> None:
    # Given a signed policy on the node, and an agent whose config pins the CA
    signer = Signer.generate()
    declare_and_publish_policy(node.amqp_url(tls_vhost), signer)
    agent = Agent(
        tmp_path / "agent",
        node.amqps_url(tls_vhost),
        signer,
        device="pos-0001",
        tls_ca=str(pki.dir / "ca-ca.crt"),
    )
    agents.append(agent)
    # When it runs
    proc = agent.start()
    # Then it connects over TLS and puts the policy in force
    proc.wait_for_line("in force: revision 1", timeout=60)
    assert proc.matching(f"connected to amqps://guest:***@127.0.0.1:{node.amqps_port}/")
    (seen,) = wait_until(lambda: node.connections(tls_vhost), timeout=10)
    assert seen["ssl"] is True and seen["auth_mechanism"] == "PLAIN"


@needs_node
def test_an_agent_logging_in_with_its_certificate_puts_a_policy_in_force_and_reports(
    node: TlsNode, pki: Pki, tls_vhost: str, agents: list[Agent], tmp_path: Path
) -> None:
    # Given a signed policy, a certificate-only broker user for the device,
    # and the device's config: amqps without a login, CA, cert, key, EXTERNAL
    device = "pos-0002"
    signer = Signer.generate()
    declare_and_publish_policy(node.amqp_url(tls_vhost), signer)
    node.certificate_user(tls_vhost, device)
    tls = with_certificate(pki, device, external=True)
    agent = Agent(
        tmp_path / "agent",
        node.amqps_url(tls_vhost, login=""),
        signer,
        device=device,
        tls_ca=tls.ca,
        tls_cert=tls.cert,
        tls_key=tls.key,
        tls_external=True,
    )
    agents.append(agent)
    # When it runs, and an event its policy blocks happens
    proc = agent.start()
    proc.wait_for_line("in force: revision 1", timeout=60)
    agent.write([alert_line(1)])
    # Then it is logged in as the device by its certificate
    (seen,) = wait_until(lambda: node.connections(tls_vhost), timeout=10)
    assert (seen["user"], seen["auth_mechanism"], seen["ssl"]) == (device, "EXTERNAL", True)
    # And its alert reaches the stream stamped with that login (the broker
    # checks user_id against it: the control plane trusts nothing else)
    reader = StreamReader(node.amqp_url(tls_vhost))
    try:

        def alert() -> list[tuple[Any, Any]]:
            reader.poll()
            return [
                props
                for record, (_m, props) in zip(reader.records, reader.deliveries, strict=True)
                if record.type == "alert" and record.device == device
            ]

        (props,) = wait_until(alert, timeout=30, message="the alert never arrived")
        assert props.user_id == device
    finally:
        reader.close()


@needs_node
def test_enroll_with_a_certificate_makes_a_passwordless_user_and_the_device_comes_in_sync(
    node: TlsNode, pki: Pki, tls_vhost: str, tmp_path: Path
) -> None:
    from fleetkit import Fleet

    device = "pos-0003"
    cert, key = pki.issue("ca", device)
    fleet = Fleet(tmp_path / "home", node.amqp_url(tls_vhost))
    try:
        # Given a control plane on the node, and a device enrolled to log in
        # over amqps with its certificate
        fleet.start_control_plane()
        config = fleet.enroll(
            device,
            "store=berlin",
            extra=[
                "--device-broker-url",
                node.amqps_url(tls_vhost, login=""),
                "--management-url",
                node.cluster.management_urls[0] + "/api",
                "--tls-ca",
                str(pki.dir / "ca-ca.crt"),
                "--tls-cert",
                str(cert),
                "--tls-key",
                str(key),
                "--tls-external",
            ],
        )
        # Then its user has no password: no password logs it in
        with pytest.raises(pika.exceptions.ProbableAuthenticationError):
            pika.BlockingConnection(
                pika.URLParameters(node.amqp_url(tls_vhost).replace("guest:guest", f"{device}:"))
            )
        assert json.loads(config.read_text())["tls_external"] is True
        # When its agent runs, it logs in with the certificate and reports in sync
        fleet.start_agent(device)
        wait_until(
            lambda: fleet.devices()[device]["state"] == "in_sync",
            timeout=60,
            message="the certificate-enrolled device never reported",
        )
        (seen,) = wait_until(
            lambda: (
                node.connections(tls_vhost)
                and [c for c in node.connections(tls_vhost) if c["user"] == device]
            ),
            timeout=10,
        )
        assert seen["auth_mechanism"] == "EXTERNAL"
    finally:
        fleet.close()


@needs_node
def test_an_agent_pinning_another_ca_says_why_and_keeps_trying(
    node: TlsNode, pki: Pki, tls_vhost: str, agents: list[Agent], tmp_path: Path
) -> None:
    # Given an agent whose config pins a CA that did not sign the broker's certificate
    agent = Agent(
        tmp_path / "agent",
        node.amqps_url(tls_vhost),
        Signer.generate(),
        device="pos-0006",
        tls_ca=str(pki.dir / "ca-other.crt"),
    )
    agents.append(agent)
    # When it runs
    proc = agent.start()
    # Then it says the broker is unreachable because of the certificate, and runs on
    proc.wait_for_line("broker unreachable", timeout=30)
    said = proc.matching("broker unreachable")[0]
    assert "TLS: the broker's certificate is not trusted (certificate verify failed" in said
    assert f"checked with the CA in tls_ca={pki.dir / 'ca-other.crt'}" in said
    assert agent.proc is not None and agent.proc.popen.poll() is None
