"""A TCP proxy the test can open and close, to cut a client off a broker
without touching the broker itself."""

from __future__ import annotations

import selectors
import socket
import threading


class TcpProxy:
    def __init__(self, listen_port: int, target: tuple[str, int]) -> None:
        self.listen_port = listen_port
        self.target = target
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._server: socket.socket | None = None

    def start(self) -> TcpProxy:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.listen_port))
        server.listen(64)
        server.setblocking(False)
        self._server = server
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close the listener and every connection through it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def _loop(self) -> None:
        sel = selectors.DefaultSelector()
        assert self._server is not None
        sel.register(self._server, selectors.EVENT_READ, None)
        peers: dict[socket.socket, socket.socket] = {}
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(timeout=0.1):
                    sock = key.fileobj
                    if sock is self._server:
                        client, _ = self._server.accept()
                        try:
                            upstream = socket.create_connection(self.target, timeout=5)
                        except OSError:
                            client.close()
                            continue
                        for s in (client, upstream):
                            s.setblocking(False)
                            sel.register(s, selectors.EVENT_READ, None)
                        peers[client], peers[upstream] = upstream, client
                        continue
                    other = peers.get(sock)  # type: ignore[arg-type]
                    try:
                        data = sock.recv(65536)  # type: ignore[union-attr]
                        if data and other is not None:
                            other.sendall(data)
                            continue
                    except OSError:
                        pass
                    for s in (sock, other):
                        if s is not None and s in peers:
                            sel.unregister(s)
                            peers.pop(s, None)
                            s.close()
        finally:
            for s in list(peers):
                s.close()
            sel.close()
            self._server.close()
