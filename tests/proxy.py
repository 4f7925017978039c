"""A TCP proxy for tests that need to lose the link to Postgres on purpose.

`Proxy(host, port)` listens on 127.0.0.1 at a free port and forwards each accepted
connection to the server, one thread per connection. `cut()` drops every live
connection at once (both ends see the socket close, as after a network failure) and
keeps listening, so a client can reconnect; `close()` stops listening and cuts.
`pause()` stops forwarding without closing anything (a silent network: no data, no
error) until `resume()`. `dsn(dsn)` rewrites a DSN to go through the proxy.
"""

from __future__ import annotations

import selectors
import socket
import threading
import time
from typing import Self

from psycopg.conninfo import conninfo_to_dict, make_conninfo


class Proxy:
    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._closed = False
        self._paused = threading.Event()
        self._acceptor = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        self._acceptor.start()

    @classmethod
    def for_dsn(cls, dsn: str) -> Proxy:
        params = conninfo_to_dict(dsn)
        return cls(str(params.get("host") or "127.0.0.1"), int(str(params.get("port") or 5432)))

    def dsn(self, dsn: str) -> str:
        """The same DSN, but connecting through this proxy."""
        return make_conninfo(dsn, host="127.0.0.1", port=str(self.port))

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    def cut(self) -> None:
        """Drop every live connection; new ones are still accepted."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for sock in pair:
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # wakes the pump thread, which closes
                except OSError:
                    pass

    def pause(self) -> None:
        """Stop forwarding in both directions; sockets stay open, bytes wait unread."""
        self._paused.set()

    def resume(self) -> None:
        self._paused.clear()

    def close(self) -> None:
        self._closed = True
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        self.cut()
        self._acceptor.join(timeout=2)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._pairs.append((client, server))
            threading.Thread(
                target=self._pump, args=(client, server), name="proxy-pump", daemon=True
            ).start()

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        peer = {client: server, server: client}
        sel = selectors.DefaultSelector()
        try:
            for sock in peer:
                sel.register(sock, selectors.EVENT_READ)
            while True:
                if self._paused.is_set():
                    with self._lock:
                        if (client, server) not in self._pairs:
                            return  # cut while paused
                    time.sleep(0.02)
                    continue
                for key, _ in sel.select(timeout=0.1):
                    source = key.fileobj
                    assert isinstance(source, socket.socket)
                    data = source.recv(65536)
                    if not data:
                        return
                    peer[source].sendall(data)
        except OSError:
            return
        finally:
            sel.close()
            with self._lock:
                if (client, server) in self._pairs:
                    self._pairs.remove((client, server))
            client.close()
            server.close()
