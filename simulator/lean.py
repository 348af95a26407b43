"""pika's asyncio connection, trimmed to be held by the thousand in one process.

A simulated device is mostly its AMQP connection: of the ~19 KiB a connected
device cost (tracemalloc and RSS at a few hundred devices, BENCHMARKS.md),
pika kept ~11 KiB per connection. :class:`LeanConnection` changes nothing on
the wire; it keeps less of what pika keeps per connection and writes all the
frames of one loop turn with one ``send()``:

- callback registrations (17 per connection: the connection's, the channel's,
  the sender's) are slotted records, not 5-key dicts;
- the two FIFOs pika makes per connection (the transport's write buffers, the
  channel's blocked RPCs), nearly always empty, are lists (a deque allocates
  a 64-slot block up front);
- the open and open-error callbacks are dropped once the connection is open
  (they keep pika's finished connector alive otherwise);
- connections told the same server properties share one copy of them.

Each of these leans on a pika internal (pika is pinned in setup.cfg);
``tests/test_sim_lean.py`` checks that each still takes hold, so an upgrade
that moves one fails there rather than quietly costing memory.
"""

from __future__ import annotations

from typing import Any

from pika.adapters.asyncio_connection import AsyncioConnection
from pika.callback import CallbackManager

#: Server properties seen by this process's connections, by their repr.
_SERVER_INFO: dict[str, tuple[Any, Any]] = {}
_SERVER_INFO_MAX = 64


class Fifo(list):
    """The part of ``collections.deque`` pika uses, on a list: an empty one
    costs 56 bytes instead of a deque's ~600."""

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)

    def appendleft(self, item: Any) -> None:
        self.insert(0, item)


class Registration:
    """One callback registration, read and written by pika's
    :class:`~pika.callback.CallbackManager` by the keys of its dicts."""

    __slots__ = ("callback", "one_shot", "only", "arguments", "calls")

    def __init__(self, callback: Any, one_shot: bool, only: Any, arguments: Any) -> None:
        self.callback = callback
        self.one_shot = one_shot
        self.only = only
        self.arguments = arguments
        self.calls = 1 if one_shot else 0

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def __setitem__(self, key: str, value: Any) -> None:
        setattr(self, key, value)

    def __repr__(self) -> str:
        return (
            f"Registration({self.callback!r}, one_shot={self.one_shot}, "
            f"only={self.only!r}, arguments={self.arguments!r}, calls={self.calls})"
        )


class LeanCallbacks(CallbackManager):
    """pika's callback manager with :class:`Registration` records for dicts."""

    def _callback_dict(  # type: ignore[override]
        self, callback: Any, one_shot: bool, only_caller: Any, arguments: Any
    ) -> Registration:
        return Registration(callback, one_shot, only_caller, arguments)


class LeanConnection(AsyncioConnection):
    """pika's ``AsyncioConnection``, keeping less per connection (see the module)
    and writing all frames of one loop turn in one send.

    pika hands the transport one buffer per frame and the transport sends
    each with its own ``send()``: a device's ack plus heartbeat was four
    system calls, and on loopback each costs the sender the receiver's work
    too (~90 µs measured) — the largest part of the simulator's CPU per
    delivery. Joining them changes nothing on the wire but the segmenting.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._pending: list[bytes] | None = None
        super().__init__(*args, **kwargs)

    def _init_connection_state(self) -> None:
        # pika made ``self.callbacks`` just before this first call; nothing is
        # registered yet. Later calls (after a close) keep the lean one.
        if not isinstance(self.callbacks, LeanCallbacks):
            self.callbacks = LeanCallbacks()
        super()._init_connection_state()

    def _proto_connection_made(self, transport: Any) -> None:
        if not getattr(transport, "_tx_buffers", True):
            transport._tx_buffers = Fifo()
        super()._proto_connection_made(transport)

    def _create_channel(self, channel_number: int, on_open_callback: Any) -> Any:
        channel = super()._create_channel(channel_number, on_open_callback)
        if not channel._blocked:
            channel._blocked = Fifo()
        return channel

    def _on_connection_open_ok(self, method_frame: Any) -> None:
        super()._on_connection_open_ok(method_frame)
        # Both fire only while opening; the connector's hold it and its workflow.
        self.callbacks.remove_all(0, self.ON_CONNECTION_OPEN_OK)
        self.callbacks.remove_all(0, self.ON_CONNECTION_ERROR)

    def _adapter_emit_data(self, data: bytes) -> None:
        if self._pending is None:
            self._pending = [data]
            self.ioloop.call_soon(self._flush)
        else:
            self._pending.append(data)

    def _flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending and self._transport is not None:
            super()._adapter_emit_data(b"".join(pending))

    def _set_server_information(self, method_frame: Any) -> None:
        # Every connection to a cluster is told the same server properties
        # (product, version, capabilities, ...): ~2 KiB of decoded strings and
        # dicts per connection, kept for its life. Keep one copy per distinct
        # value instead.
        super()._set_server_information(method_frame)
        key = repr((self.server_properties, self.server_capabilities))
        shared = _SERVER_INFO.get(key)
        if shared is None and len(_SERVER_INFO) < _SERVER_INFO_MAX:
            shared = _SERVER_INFO[key] = (self.server_properties, self.server_capabilities)
        if shared is not None:
            self.server_properties, self.server_capabilities = shared
