"""A fault-injecting TCP proxy for tests: it sits between a client and a
broker and can cut, stall and reset the connections through it, without
touching the broker itself.

It runs an asyncio loop in a thread of its own; every method is called from
the test's thread and returns once the proxy did it::

    proxy = TcpProxy(port, ("127.0.0.1", 5672)).start()
    proxy.stall()    # connections stay open, nothing gets through either way
    proxy.resume()   # what was held goes through, and everything after it
    proxy.reset()    # every connection ends with a TCP RST; new ones are taken
    proxy.cut()      # stop listening and close every connection (FIN)
    proxy.start()    # listen again
    proxy.stop()     # cut, and end the proxy's thread
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class TcpProxy:
    def __init__(self, listen_port: int, target: tuple[str, int]) -> None:
        self.listen_port = listen_port
        self.target = target
        self.accepted = 0  # connections taken since the proxy was made
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._flowing: asyncio.Event | None = None
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- from the test's thread ------------------------------------------------

    def start(self) -> TcpProxy:
        """Listen (again) and forward."""
        if self._loop is None:
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()
                loop.close()

            self._thread = threading.Thread(target=run, name="tcpproxy", daemon=True)
            self._thread.start()
            ready.wait(5)
            self._loop = loop
        self._call(self._listen())
        return self

    def stop(self) -> None:
        """Close the listener and every connection, and end the thread."""
        if self._loop is None:
            return
        self._call(self._cut())
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(5)
        self._loop = self._thread = None

    def cut(self) -> None:
        """The network is gone: no listener, every connection closed."""
        self._call(self._cut())

    def stall(self) -> None:
        """Connections stay open but nothing gets through, either way."""
        self._call(self._set_flowing(False))

    def resume(self) -> None:
        """Forward again, what was held first."""
        self._call(self._set_flowing(True))

    def reset(self) -> int:
        """End every connection with a TCP RST (keep listening); how many."""
        return self._call(self._reset())

    @property
    def connections(self) -> int:
        return len(self._links)

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        assert self._loop is not None, "the proxy is not started"
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    # -- on the proxy's loop ----------------------------------------------------

    async def _listen(self) -> None:
        if self._flowing is None:
            self._flowing = asyncio.Event()
            self._flowing.set()
        if self._server is None:
            self._server = await asyncio.start_server(
                self._accept, "127.0.0.1", self.listen_port, reuse_address=True
            )

    async def _cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for client, upstream in list(self._links):
            for writer in (client, upstream):
                writer.close()
        self._links.clear()

    async def _set_flowing(self, flowing: bool) -> None:
        assert self._flowing is not None
        if flowing:
            self._flowing.set()
        else:
            self._flowing.clear()

    async def _reset(self) -> int:
        links = list(self._links)
        for client, upstream in links:
            for writer in (client, upstream):
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
        self._links.clear()
        return len(links)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        link = (writer, up_writer)
        self._links.add(link)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.ensure_future(self._pump(src, dst, link))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        link: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    ) -> None:
        assert self._flowing is not None
        try:
            while True:
                data = await src.read(65536)
                if not data:
                    break
                await self._flowing.wait()  # a stall holds what was read
                if link not in self._links:
                    break  # cut or reset meanwhile
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if link in self._links:
                self._links.discard(link)
                for writer in link:
                    writer.close()
