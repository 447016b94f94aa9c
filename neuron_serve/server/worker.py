"""gunicorn's gthread worker, with what a model server shared by many clients needs from it.

- **A request's head is read by the worker's event loop, not by a pool thread.** gthread hands a
  connection to a pool thread as soon as its first bytes arrive, and the thread then blocks until
  the head is whole: 40 clients that sent a request line and one header and then waited (slowloris)
  held all 28 threads of the tiny deployment, and /ping timed out. Here the event loop collects the
  head without blocking, hands the connection to a thread only once it is whole, and drops it when it
  is not whole within `HEAD_TIMEOUT_S`.
- **On SIGTERM the listening sockets close at once**, so that new connections are refused instead of
  queueing in a backlog no one reads (to be reset at exit), while the accepted requests drain.
- **Streams know the drain's deadline** (`draining_past_deadline`): one still running just before the
  worker is killed ends with an error event rather than a cut connection.

Written against gunicorn 27's ``gunicorn/workers/gthread.py`` (``TConn``, ``ThreadWorker.accept``,
``pending_conns`` / ``murder_pending``, ``on_client_socket_readable``) and its parser's unreader.
"""

from __future__ import annotations

import errno
import selectors
import time
from functools import partial

from gunicorn.workers.gthread import TConn, ThreadWorker

HEAD_TIMEOUT_S = 10.0  # a client that cannot send its request head in this long is not a client
DRAIN_MARGIN_S = 1.0  # streams end this long before the arbiter kills the worker at graceful_timeout
_HEAD_END = b"\r\n\r\n"
_drain = {"deadline": float("inf")}


def draining_past_deadline() -> bool:
    """Whether this worker is shutting down and its streams must end now."""
    return time.monotonic() >= _drain["deadline"]


class _HeadConn(TConn):
    """A connection whose request head the event loop read; the parser gets it back first."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.head = b""

    def init(self) -> None:
        super().init()
        self.give_head_to_parser()

    def give_head_to_parser(self) -> None:
        if self.head and self.parser is not None:
            self.parser.unreader.unread(self.head)
            self.head = b""


class ServingWorker(ThreadWorker):
    def accept(self, listener) -> None:
        if self.cfg.is_ssl:  # TLS records cannot be read ahead of the handshake
            super().accept(listener)
            return
        try:
            client, address = listener.accept()
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        self._await_head(_HeadConn(self.cfg, client, address, listener.getsockname()))

    def on_client_socket_readable(self, conn, client) -> None:
        """A kept-alive connection's next request: its head too is read here first."""
        if not isinstance(conn, _HeadConn):
            super().on_client_socket_readable(conn, client)
            return
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self._await_head(conn)

    def _await_head(self, conn: _HeadConn) -> None:
        conn.sock.setblocking(False)
        conn.timeout = time.monotonic() + HEAD_TIMEOUT_S  # murder_pending drops it then
        self.pending_conns.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._read_head, conn))

    def _read_head(self, conn: _HeadConn, sock) -> None:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            conn.head += data
        if data and _HEAD_END not in conn.head and len(conn.head) <= self._head_limit():
            return
        self.poller.unregister(sock)
        self.pending_conns.remove(conn)
        if not data:  # the client went away before its head was whole
            self.nr_conns -= 1
            conn.close()
            return
        conn.data_ready = True
        conn.give_head_to_parser()  # a kept-alive connection's parser already exists
        self.enqueue_req(conn)  # whole, or too long: the parser answers that with its own error

    def _head_limit(self) -> int:
        cfg = self.cfg
        return cfg.limit_request_line + cfg.limit_request_fields * (cfg.limit_request_field_size or 8190) + 4

    def handle_exit(self, sig, frame) -> None:
        _drain["deadline"] = time.monotonic() + max(0.0, self.cfg.graceful_timeout - DRAIN_MARGIN_S)
        super().handle_exit(sig, frame)

    def set_accept_enabled(self, enabled: bool) -> None:
        super().set_accept_enabled(enabled)
        if not enabled and not self.alive:
            for listener in self.sockets:
                listener.close()
