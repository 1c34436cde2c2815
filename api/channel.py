"""The HTTP server: waitress, with a channel whose deadlines keep slow, silent or half-closed clients from
holding it."""

import logging
import socket
import struct
import time

import waitress.task
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.utilities import Error as WaitressError

from api.guard import SECURITY_HEADERS
from api.native import INBUF_OVERFLOW, MAX_BODY_BYTES, OUTBUF_OVERFLOW, spool_shortage
from api.pulls import PULL_SLOTS
from engine.files.folders import FOLDER_WAITERS

log = logging.getLogger("imagine")


CONNECTION_LIMIT = 200  # open connections; more wait in the kernel's queue until one closes


IDLE_TIMEOUT = 30  # seconds an idle kept-alive connection stays open


REQUEST_TIMEOUT = 60  # seconds a client has to send its whole request: headers trickled byte by byte are dropped


SEND_TIMEOUT = 60  # seconds an answer may wait for a client that does not read it, before the client is dropped


# A client whose end of stream (FIN) comes this soon (seconds) after its request shut down only its sending side
# (as `nc -N` does) and waits for the answer; one whose FIN comes later has left, and its generation is cancelled.
HALF_CLOSE_GRACE = 2.0


# Unfinished request bodies are spooled to temporary files: all of them together may hold this much.
UPLOADS_BUDGET = 4 * MAX_BODY_BYTES


# Threads beyond one for each request the queue accepts: they answer other routes, 503s and errors at once.
SPARE_THREADS = 3


class InsufficientStorage(WaitressError):
    code = 507
    reason = "Insufficient Storage"


class RequestParser(HTTPRequestParser):
    """waitress's parser, refusing with 507 a body announced larger than the temporary folder can hold, before it is
    received: waitress would spool it there and reset the connection, without a status, once writing failed."""

    def received(self, data):
        headers_were_finished = self.headers_finished
        consumed = super().received(data)
        announced = self.headers_finished and not headers_were_finished and not self.error and self.content_length
        if announced > INBUF_OVERFLOW and (why := spool_shortage(announced)):
            log.warning("refused an upload of %d KiB: %s", announced >> 10, why)
            self.error = InsufficientStorage(f"{why} for this upload")
            self.completed = True
            self.expect_continue = False  # else waitress sends "100 Continue", takes the body after all and spools it
        return consumed


class ErrorTask(waitress.task.ErrorTask):
    """waitress's own error answers (a malformed request, a body too large or one the temporary folder cannot hold),
    with the security headers every answer of the app carries."""

    def execute(self):
        self.response_headers.extend(SECURITY_HEADERS.items())
        super().execute()


class Channel(HTTPChannel):
    """A waitress connection with deadlines, a bound on what unfinished uploads hold, and half-closed clients
    answered. waitress runs these methods on its one event-loop thread, and asks readable() every second."""

    error_task_class = ErrorTask
    parser_class = RequestParser

    def __init__(self, server, sock, addr, adj, map=None):
        super().__init__(server, sock, addr, adj, map)
        self.request_started = None  # when the first byte of the request being received came (time.time())
        self.request_bytes = 0  # what that request holds so far, counted in server.uploads
        self.stalled_since = time.time()  # since when an answer waits with nothing of it sent
        self.half_closed = False  # the client sent its request, then shut down its side of the connection
        self.request_received = 0.0  # when the last whole request came in (time.time())

    def received(self, data):
        if self.request_started is None:
            self.request_started = time.time()
        self.hold_upload(len(data))
        if self.server.uploads > UPLOADS_BUDGET:
            log.warning("dropped a client: unfinished uploads would hold over %d MiB", UPLOADS_BUDGET >> 20)
            self.will_close = True
            return False
        done = super().received(data)
        if self.request is None:  # no request is half received
            self.hold_upload(-self.request_bytes)
            self.request_started = None
            if self.requests:
                self.request_received = time.time()
        return done

    def hold_upload(self, size: int) -> None:
        self.request_bytes += size
        self.server.uploads = getattr(self.server, "uploads", 0) + size

    def handle_read(self):
        # TCP cannot tell a client that shut only its sending side (SHUT_WR, as `nc -N` does) from one that left:
        # both send a FIN. A FIN right behind a whole request is read as the first, a later one as the second,
        # however recently the answer's last streamed line went out.
        request_waits = self.requests and self.request is None
        if request_waits and time.time() - self.request_received < HALF_CLOSE_GRACE and self.peer_shut_down():
            self.half_closed = True
            return
        super().handle_read()

    def peer_shut_down(self) -> bool:
        """Whether the client's end of stream (FIN) is waiting right behind its request."""
        try:
            return self.socket.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except OSError:  # nothing waiting (EAGAIN), or the connection is broken
            return False

    def readable(self):
        now = time.time()  # the clock of waitress's last_activity
        if self.will_close:
            return False
        if self.request_started is not None and now - self.request_started > REQUEST_TIMEOUT:
            log.warning("dropped a client that took over %d s to send its request", REQUEST_TIMEOUT)
            self.will_close = True
        if not self.total_outbufs_len or self.last_activity > self.stalled_since:
            self.stalled_since = now  # nothing to send, or something was sent since the last look
        elif now - self.stalled_since > SEND_TIMEOUT:
            log.warning("dropped a client that read nothing of its answer for %g s", SEND_TIMEOUT)
            self.drop()
            return False
        if self.half_closed and not self.requests:
            self.close_when_flushed = True  # it is answered, and can send nothing more
        return not self.half_closed and super().readable()

    def drop(self) -> None:
        """Closes the connection now, unsent data and all. Not with will_close: waitress closes such a connection
        only once its socket can take more data, which never comes for a client that does not read; the thread
        writing its answer would wait forever, holding a generation slot."""
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset, not linger
        self.handle_close()  # wakes the writing thread: its next write raises ClientDisconnected, closing the body

    def writable(self):
        return self.connected and super().writable()  # a dropped connection is out of the loop's select

    def handle_close(self):
        self.hold_upload(-self.request_bytes)
        self.request_bytes = 0
        super().handle_close()


def create_server(app, max_queue: int, host: str, port: int):
    """The production HTTP server (waitress) for the app; its `run()` serves until the process ends."""
    server = waitress.create_server(
        app,
        host=host,
        port=port,
        # A thread for each waiting request and the running one (see take_generation_slot), one for each of as many
        # jobs' event streams (api/jobs.py, stream_slots), for each request waiting for the models folders to be
        # read (see FolderReader), for each pull (api/pulls.py), and spares.
        threads=2 * (max_queue + 1) + SPARE_THREADS + FOLDER_WAITERS + PULL_SLOTS,
        # Reading ahead on each connection is what lets waitress notice that a client has left.
        channel_request_lookahead=1,
        connection_limit=CONNECTION_LIMIT,
        channel_timeout=IDLE_TIMEOUT,
        cleanup_interval=5,  # how often idle connections are looked for
        # Flask answers bodies over MAX_BODY_BYTES with a JSON 413; waitress refuses larger ones from their
        # Content-Length, unread (with a margin for a body that is just over, to get Flask's clearer answer).
        max_request_body_size=MAX_BODY_BYTES + 2**20,
        max_request_header_size=64 * 2**10,
        inbuf_overflow=INBUF_OVERFLOW,
        outbuf_overflow=OUTBUF_OVERFLOW,
        # An answer waits in memory or a spool file until the client reads it; past 4 MB unsent, the thread
        # writing it waits too, until SEND_TIMEOUT drops the client.
        outbuf_high_watermark=4 * 2**20,
    )
    # waitress makes one server per address a name resolves to ("localhost": 127.0.0.1 and ::1).
    for each in [server, *getattr(server, "map", {}).values()]:
        if hasattr(each, "channel_class"):
            each.channel_class = Channel
    return server
