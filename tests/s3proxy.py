"""A loopback TCP proxy in front of the S3 endpoint that plays a bad link or a busy store: it
caps the client-to-server bandwidth (benchmarks/checkpoint_stall.py), and it answers chosen
requests itself with S3's `503 SlowDown` instead of passing them on (the retry tests)."""
from __future__ import annotations

import socket
import threading
import time
from typing import Callable

SLOW_DOWN = (b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: %d\r\n"
             b"Connection: close\r\n\r\n%s")
SLOW_DOWN_BODY = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>"
                  b"<Message>Please reduce your request rate.</Message></Error>")


class LoopbackProxy:
    """127.0.0.1:port → 127.0.0.1:target_port. `rate`: client-to-server bytes/s over all
    connections together (None: unlimited). `refuse(method, path)`: True answers that request
    503 SlowDown (its body read and dropped, the connection closed); every request it saw is
    in `seen` as (method, path, refused)."""

    def __init__(self, target_port: int, rate: float | None = None,
                 refuse: Callable[[str, str], bool] | None = None):
        self.target_port, self.rate, self.refuse = target_port, rate, refuse
        self.seen: list[tuple[str, str, bool]] = []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.lock, self.free_at = threading.Lock(), 0.0  # when the link has sent all it was given
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self.server.accept()
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:  # the server has stopped
                client.close()
                continue
            upward = self._requests if self.refuse else self._pump
            threading.Thread(target=upward, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, upward: bool = True) -> None:
        try:
            while data := source.recv(16384):
                self._send(sink, data, upward)
        except OSError:
            pass
        finally:
            _close(source, sink)

    def _send(self, sink: socket.socket, data: bytes, upward: bool) -> None:
        if upward and self.rate:  # one link, shared, that never saves up idle time
            with self.lock:
                self.free_at = max(self.free_at, time.monotonic()) + len(data) / self.rate
                due = self.free_at
            time.sleep(max(0.0, due - time.monotonic()))
        sink.sendall(data)

    def _requests(self, client: socket.socket, upstream: socket.socket) -> None:
        """Client to server one HTTP/1.1 request at a time (clients send the next one only after
        the answer), so that a refused one can be answered here."""
        buffer = b""
        try:
            while True:
                while b"\r\n\r\n" not in buffer:
                    if not (data := client.recv(16384)):
                        return
                    buffer += data
                head, buffer = buffer.split(b"\r\n\r\n", 1)
                method, path = head.split(b"\r\n", 1)[0].decode().split(" ")[:2]
                headers = {k.strip().lower(): v.strip() for k, _, v in
                           (line.decode().partition(":") for line in head.split(b"\r\n")[1:])}
                assert "chunked" not in headers.get("transfer-encoding", ""), "chunked bodies are not framed here"
                length = int(headers.get("content-length", 0))
                refused = self.refuse(method, path)
                self.seen.append((method, path, refused))
                if refused and headers.get("expect", "").lower() != "100-continue":
                    while len(buffer) < length:  # the client sends the whole body before it reads
                        if not (data := client.recv(16384)):
                            return
                        buffer += data
                if refused:
                    client.sendall(SLOW_DOWN % (len(SLOW_DOWN_BODY), SLOW_DOWN_BODY))
                    return
                self._send(upstream, head + b"\r\n\r\n", True)
                while length > 0:
                    if not buffer and not (buffer := client.recv(16384)):
                        return
                    part, buffer = buffer[:length], buffer[length:]
                    self._send(upstream, part, True)
                    length -= len(part)
        except OSError:
            pass
        finally:
            _close(client, upstream)


def _close(*sockets: socket.socket) -> None:
    for s in sockets:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
