"""Connecting to the broker: URL lists, failover, jittered backoff.

``EDGEWARD_BROKER_URL`` may name several nodes of one cluster, separated by
commas.  Every client tries them in turn (starting at a random one, so a
fleet spreads over the nodes) and fails over to the next when one is down.
pika's exceptions stop here: callers see :class:`BrokerUnreachable`.

TLS (docs/tls.md): an ``amqps://`` URL turns it on; :class:`TLSSettings` says
which CA to trust (pinning), which client certificate to show and whether to
log in with it (SASL EXTERNAL).  Every client goes through :func:`parameters`
with them: agents from their config file; whatever uses :func:`connect_blocking`
(the control plane, the CLI, the collector, the simulator's own connections)
from ``EDGEWARD_TLS_*`` (:meth:`TLSSettings.from_env`).
"""

from __future__ import annotations

import logging
import os
import random
import ssl
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pika
import pika.credentials
import pika.exceptions

from .errors import BrokerUnreachable

DEFAULT_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"


def split_urls(value: str) -> list[str]:
    urls = [u.strip() for u in value.split(",") if u.strip()]
    if not urls:
        raise ValueError("no broker URL given")
    for url in urls:
        if urlsplit(url).scheme not in ("amqp", "amqps"):
            raise ValueError(f"not an amqp:// or amqps:// URL: {redact(url)}")
    return urls


def redact(url: str) -> str:
    """The URL without its password, fit for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


# -- TLS -------------------------------------------------------------------------------

#: What each setting is called where it is set: in error messages.
_SETTING_NAMES = {
    "env": {
        "ca": "EDGEWARD_TLS_CA",
        "cert": "EDGEWARD_TLS_CERT",
        "key": "EDGEWARD_TLS_KEY",
        "external": "EDGEWARD_TLS_EXTERNAL",
    },
    "config": {"ca": "tls_ca", "cert": "tls_cert", "key": "tls_key", "external": "tls_external"},
}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


class TLSSettingsError(ValueError):
    """TLS settings that cannot work (a file missing or not PEM, a cert
    without its key, EXTERNAL without a cert, TLS files with a plain URL):
    refused before any connection is tried."""


@dataclass(frozen=True)
class TLSSettings:
    """How a client does TLS to the broker; only ``amqps://`` URLs use it.

    * ``ca``: a PEM file of the CA certificate(s) the broker's certificate
      must chain to.  Only these are trusted (the system's store is not
      read: CA pinning), and the URL's host must be named in the broker's
      certificate (a DNS name, or an IP address SAN for ``amqps://10.0.0.5``).
      Empty: the system's trust store, host name still checked.
    * ``cert``, ``key``: the client's certificate (PEM, its chain may follow
      it) and private key (PEM, unencrypted), both or neither: mutual TLS.
    * ``external``: log in with that certificate (SASL EXTERNAL): the broker
      takes the user name from it (its CN, with ``ssl_cert_login_from =
      common_name``) and the URL's user and password are not sent.

    ``source`` (``"env"`` or ``"config"``) only names the settings in errors.
    """

    ca: str = ""
    cert: str = ""
    key: str = ""
    external: bool = False
    source: str = "env"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TLSSettings:
        """``EDGEWARD_TLS_CA``, ``EDGEWARD_TLS_CERT``, ``EDGEWARD_TLS_KEY`` and
        ``EDGEWARD_TLS_EXTERNAL`` (1/true/yes/on): the control plane's, the
        CLI's, the collector's and the simulator's settings."""
        env = os.environ if environ is None else environ
        names = _SETTING_NAMES["env"]
        flag = env.get(names["external"], "").strip().lower()
        if flag not in _TRUE + _FALSE:
            raise TLSSettingsError(f"{names['external']}={flag!r}: expected 1/true or 0/false")
        return cls(
            ca=env.get(names["ca"], ""),
            cert=env.get(names["cert"], ""),
            key=env.get(names["key"], ""),
            external=flag in _TRUE,
            source="env",
        )

    def _name(self, setting: str) -> str:
        return _SETTING_NAMES.get(self.source, _SETTING_NAMES["env"])[setting]

    @property
    def enabled(self) -> bool:
        """Whether anything is set (and so only amqps:// URLs make sense)."""
        return bool(self.ca or self.cert or self.key or self.external)

    def trust(self) -> str:
        """What the broker's certificate is checked against, for messages."""
        return f"the CA in {self._name('ca')}={self.ca}" if self.ca else "the system's trust store"

    def validate(self) -> None:
        """The settings' shape, without touching a file."""
        for setting in ("ca", "cert", "key"):
            if not isinstance(getattr(self, setting), str):
                raise TLSSettingsError(f"{self._name(setting)}: expected a file path")
        if not isinstance(self.external, bool):
            raise TLSSettingsError(f"{self._name('external')}: expected true or false")
        if self.cert and not self.key:
            raise TLSSettingsError(
                f"{self._name('cert')} is set without {self._name('key')}: "
                "a client certificate needs its private key"
            )
        if self.key and not self.cert:
            raise TLSSettingsError(
                f"{self._name('key')} is set without {self._name('cert')}: "
                "a private key needs its client certificate"
            )
        if self.external and not self.cert:
            raise TLSSettingsError(
                f"{self._name('external')} needs a client certificate "
                f"({self._name('cert')} and {self._name('key')}): EXTERNAL logs in with it"
            )

    def check_urls(self, urls: list[str]) -> None:
        """Refuse TLS settings with a plain ``amqp://`` URL: they would be
        silently unused, and the traffic in clear."""
        if not self.enabled:
            return
        plain = [redact(u) for u in urls if urlsplit(u).scheme != "amqps"]
        if plain:
            given = [self._name(s) for s in ("ca", "cert", "key") if getattr(self, s)]
            if self.external:
                given.append(self._name("external"))
            raise TLSSettingsError(
                f"{', '.join(given)} set, but {', '.join(plain)} is plain amqp://: "
                "use amqps:// (TLS) or drop the TLS settings"
            )

    def check(self, urls: list[str], *, login: str | None = None) -> TLSSettings:
        """Everything, files included (an amqps:// URL loads them now), before
        the first connection; with ``login`` and EXTERNAL, the certificate's CN
        must be that name (the broker user it logs in as). Returns self."""
        self.validate()
        self.check_urls(urls)
        if any(urlsplit(u).scheme == "amqps" for u in urls):
            self.context()
            if self.external and login is not None:
                cn = self.client_cn()
                if cn != login:
                    raise TLSSettingsError(
                        f"{self._name('cert')}={self.cert}: its CN is {cn!r}, not {login!r}: "
                        f"with {self._name('external')} the broker would log in user {cn!r}"
                    )
        return self

    def context(self) -> ssl.SSLContext:
        """The client's SSLContext: TLS 1.2 or newer, the broker's certificate
        and host name checked.  Made again when a file changed (a renewed
        certificate is used from the next connection on); if the files cannot
        be loaded now but could before (a renewal half written), the last good
        context is kept."""
        self.validate()
        settings = (self.ca, self.cert, self.key)
        with _CONTEXTS_LOCK:
            last = _CONTEXTS.get(settings)
        try:
            stamps = self._stamps()
            if last is not None and last[0] == stamps:
                return last[1]
            ctx = self._make_context()
        except TLSSettingsError:
            if last is not None:
                return last[1]
            raise
        with _CONTEXTS_LOCK:
            _CONTEXTS[settings] = (stamps, ctx)
        return ctx

    def _stamps(self) -> tuple[tuple[str, int, int, int], ...]:
        """Each file's (path, mtime, size, inode); TLSSettingsError if one
        cannot be read."""
        stamps = []
        for setting in ("ca", "cert", "key"):
            path = getattr(self, setting)
            if not path:
                continue
            try:
                st = os.stat(path)
                with open(path, "rb") as fh:
                    fh.read(1)
            except OSError as exc:
                raise TLSSettingsError(
                    f"{self._name(setting)}={path}: cannot read: {exc.strerror}"
                ) from None
            stamps.append((path, st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(stamps)

    def _make_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.ca:
            try:
                ctx.load_verify_locations(cafile=self.ca)
            except (ssl.SSLError, ValueError) as exc:
                raise TLSSettingsError(
                    f"{self._name('ca')}={self.ca}: not a PEM CA certificate ({_ssl_reason(exc)})"
                ) from None
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        if self.cert:
            try:
                ctx.load_cert_chain(self.cert, self.key)
            except (ssl.SSLError, ValueError) as exc:
                raise TLSSettingsError(
                    f"{self._name('cert')}={self.cert} with {self._name('key')}={self.key}: "
                    f"not a PEM certificate and its unencrypted key ({_ssl_reason(exc)})"
                ) from None
        return ctx

    def client_cn(self) -> str:
        """The common name of the client certificate (the EXTERNAL user)."""
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        try:
            with open(self.cert, "rb") as fh:
                cert = x509.load_pem_x509_certificate(fh.read())
        except (OSError, ValueError) as exc:
            raise TLSSettingsError(f"{self._name('cert')}={self.cert}: {exc}") from None
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(names[0].value) if names else ""

    def apply(self, params: pika.ConnectionParameters) -> None:
        """Put these settings into ``params`` (made from an amqps:// or
        amqp:// URL: TLSSettingsError for TLS settings with the latter)."""
        if params.ssl_options is None:  # amqp://
            if self.enabled:
                self.check_urls([f"amqp://{params.host}:{params.port}"])
            return
        params.ssl_options = pika.SSLOptions(self.context())
        if self.external:
            params.credentials = pika.credentials.ExternalCredentials()


# (ca, cert, key) -> (the files' stamps, the context made from them)
_CONTEXTS: dict[tuple[str, str, str], tuple[Any, ssl.SSLContext]] = {}
_CONTEXTS_LOCK = threading.Lock()

NO_TLS = TLSSettings()


def _ssl_reason(exc: BaseException) -> str:
    return str(getattr(exc, "reason", None) or exc)


def tls_from_env() -> TLSSettings:
    """The ``EDGEWARD_TLS_*`` settings (TLSSettingsError for a bad flag)."""
    return TLSSettings.from_env()


def describe_tls_failure(exc: ssl.SSLError, tls: TLSSettings) -> str:
    """A TLS handshake that failed, in words: which check, against what."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = exc.verify_message or _ssl_reason(exc)
        return (
            "TLS: the broker's certificate is not trusted "
            f"(certificate verify failed: {why}; checked with {tls.trust()})"
        )
    return f"TLS handshake failed: {_ssl_reason(exc)}"


def tls_failure(error: BaseException | None) -> ssl.SSLError | None:
    """The TLS error inside what pika reports for a failed connection (its
    connection workflow nests it: ``exceptions`` of ``exception`` of ...)."""
    seen: set[int] = set()
    todo: list[Any] = [error]
    while todo:
        exc = todo.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        if isinstance(exc, ssl.SSLError):
            return exc
        todo.extend(getattr(exc, "exceptions", ()) or ())
        todo += [getattr(exc, "exception", None), exc.__cause__, exc.__context__]
        todo += [a for a in getattr(exc, "args", ()) if isinstance(a, BaseException)]
    return None


def explain_open_error(error: Any, tls: TLSSettings) -> Any:
    """For an ``on_open_error_callback``: a TLS failure as an
    AMQPConnectionError saying which check failed against what (pika's own
    error for it prints as an empty string); any other error as it is."""
    failure = tls_failure(error) if isinstance(error, BaseException) else None
    if failure is None:
        return error
    return pika.exceptions.AMQPConnectionError(describe_tls_failure(failure, tls))


def parameters(
    url: str,
    *,
    heartbeat: int = 30,
    timeout: float = 10.0,
    name: str = "edgeward",
    tls: TLSSettings | None = None,
) -> pika.URLParameters:
    """pika's parameters for one node. ``tls`` (None: no settings, so an
    amqps:// URL trusts the system's store and sends the URL's login)."""
    params = pika.URLParameters(url)
    (tls or NO_TLS).apply(params)
    params.heartbeat = heartbeat
    params.connection_attempts = 1
    params.socket_timeout = timeout
    # A broker past its fd limit accepts TCP and then never answers the
    # handshake: bound it.
    params.stack_timeout = timeout
    params.blocked_connection_timeout = 60
    params.client_properties = {"connection_name": name}
    return params


def rotation(urls: list[str], rng: random.Random | None = None) -> Iterator[str]:
    """Endless walk over the nodes, starting at a random one."""
    start = (rng or random).randrange(len(urls))
    i = start
    while True:
        yield urls[i % len(urls)]
        i += 1


@dataclass
class Backoff:
    """Exponential backoff with full jitter: each delay is uniform in
    [0, min(cap, base × 2^attempt)], which spreads a crowd of clients
    retrying together better than a jitter around the ceiling does.

    ``spread`` is for :meth:`after_loss`: the first delay after an
    established connection was lost is uniform in [0, spread], so a fleet
    that lost the broker at the same moment does not come back in the same
    moment (35,000 devices over 30 s is ~1,200 connections a second; over
    0.5 s it is a wall).
    """

    base: float = 0.5
    cap: float = 30.0
    attempt: int = 0
    rng: random.Random | None = None
    spread: float = 0.0

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * (2**self.attempt))
        self.attempt += 1
        return (self.rng or random).uniform(0, ceiling)

    def after_loss(self) -> float:
        """The first delay after losing an established connection."""
        self.attempt = 0
        if self.spread <= 0:
            return self.next_delay()
        self.attempt = 1
        return (self.rng or random).uniform(0, self.spread)

    def reset(self) -> None:
        self.attempt = 0


def cancel_timer(loop: Any, handle: Any) -> None:
    """Cancel a ``call_later`` handle of asyncio's loop or of pika's IOLoop."""
    if hasattr(handle, "cancel"):
        handle.cancel()
    else:
        loop.remove_timeout(handle)


def socket_fds(conn: Any) -> list[int]:
    """The file descriptor of a pika BlockingConnection's socket, for an actor
    to hand Thespian (``ThespianWatch``); none without a connection, or if
    pika's internals moved (the actor then relies on its wakeups alone)."""
    if conn is None:
        return []
    try:
        return [conn._impl._transport._sock.fileno()]
    except AttributeError:
        return []


def connect_blocking(
    urls: list[str],
    *,
    name: str = "edgeward",
    timeout: float = 10.0,
    tls: TLSSettings | None = None,
) -> pika.BlockingConnection:
    """A blocking connection to the first node of ``urls`` that answers.

    ``tls`` defaults to the ``EDGEWARD_TLS_*`` settings.  Settings that cannot
    work are a :class:`BrokerUnreachable` too ("not tried: ..."), so that a
    long-running caller (the control plane) says so and retries rather than
    crashing; a TLS handshake that fails says which check failed."""
    try:
        tls = (tls_from_env() if tls is None else tls).check(urls)
    except TLSSettingsError as exc:
        raise BrokerUnreachable([redact(u) for u in urls], f"not tried: {exc}") from None
    errors = []
    for url in urls:
        try:
            return pika.BlockingConnection(parameters(url, timeout=timeout, name=name, tls=tls))
        except pika.exceptions.ProbableAuthenticationError:
            if tls.external and urlsplit(url).scheme == "amqps":
                errors.append(
                    f"{redact(url)}: login refused (EXTERNAL: is there a broker user named "
                    "after the certificate's CN, with permissions on this vhost?)"
                )
            else:
                errors.append(f"{redact(url)}: login refused")
        except pika.exceptions.AuthenticationError as exc:
            errors.append(
                f"{redact(url)}: the broker does not offer login mechanism {exc} "
                "(EXTERNAL needs its rabbitmq_auth_mechanism_ssl plugin and auth_mechanisms)"
            )
        except ssl.SSLError as exc:
            errors.append(f"{redact(url)}: {describe_tls_failure(exc, tls)}")
        except pika.exceptions.AMQPError as exc:
            failure = tls_failure(exc)
            if failure is not None:
                errors.append(f"{redact(url)}: {describe_tls_failure(failure, tls)}")
                continue
            errors.append(f"{redact(url)}: {type(exc).__name__} {exc}".strip())
        except OSError as exc:
            errors.append(f"{redact(url)}: {exc}")
    raise BrokerUnreachable([redact(u) for u in urls], "; ".join(errors))


def close_quietly(conn: Any) -> None:
    """Close a connection that may be half made or already gone."""
    if conn is None:
        return
    try:
        if conn.is_open:
            conn.close()
    except Exception:  # pika rejects what it buffered (a 540 on a stream): expected
        pass


def quiet_pika(level: int = logging.CRITICAL) -> None:
    """Silence pika's own log: our links count and classify every failure,
    and pika would repeat each one for every connection.

    pika's modules keep module-level loggers made at import; a process whose
    logging was re-initialised since (Thespian does that in its actor
    processes) no longer reaches them through ``logging.getLogger``, so set
    each one directly.
    """
    logging.getLogger("pika").setLevel(level)
    for name, module in list(sys.modules.items()):
        if name.startswith("pika") and module is not None:
            for value in list(vars(module).values()):
                if isinstance(value, logging.Logger):
                    value.setLevel(level)
