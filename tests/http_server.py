"""A scripted HTTP/1.1 server on 127.0.0.1 that fails on demand, for the HTTP client
integrations' tests (statuses, Retry-After, delays, dropped connections), with the
fixtures that serve it and a fast retry policy."""

from __future__ import annotations

import email.utils
import http.server
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import buttress
from buttress import retry


@dataclass(frozen=True)
class Act:
    """One answer of the test server."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b"ok"
    delay: float = 0.0
    drop: bool = False  # close the connection without answering
    retry_after_date: float | None = None  # Retry-After as an HTTP-date this far ahead
    body_delay: float = 0.0  # wait this long between the headers and the body
    short: bool = False  # announce more body than is sent, then close the connection


class Script:
    """Per path, the answers to give in order (the last one repeats); counts every hit."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.routes: dict[str, list[Act]] = {}
        self.hits: Counter[tuple[str, str]] = Counter()

    def on(self, path: str, *acts: Act) -> str:
        with self.lock:
            self.routes[path] = list(acts)
        return path

    def next(self, method: str, path: str) -> Act:
        with self.lock:
            self.hits[(method, path)] += 1
            acts = self.routes.get(path) or [Act()]
            return acts.pop(0) if len(acts) > 1 else acts[0]


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so the client pools connections
    server: Server

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes: without this, Nagle's algorithm
        # and delayed ACKs add ~40 ms to every keep-alive exchange.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _serve(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        act = self.server.script.next(self.command, self.path)
        if act.delay:
            time.sleep(act.delay)
        if act.drop:
            self.close_connection = True
            return
        self.send_response(act.status)  # also sends Date
        headers = dict(act.headers)
        if act.retry_after_date is not None:
            # Whole seconds ahead of the Date header just sent (same one-second resolution).
            now = email.utils.parsedate_to_datetime(self.date_time_string()).timestamp()
            headers["Retry-After"] = email.utils.formatdate(now + act.retry_after_date, usegmt=True)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(act.body) + (10 if act.short else 0)))
        self.end_headers()
        if act.body_delay:
            self.wfile.flush()
            time.sleep(act.body_delay)
        if self.command != "HEAD":
            self.wfile.write(act.body)
        if act.short:
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _serve

    def log_message(self, format: str, *args: object) -> None:
        return None


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.script = Script()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request: object, client_address: object) -> None:
        return None  # a client that gave up closes its socket under a slow answer


def serve() -> Iterator[Server]:
    """Run a :class:`Server` in a thread for the duration of the generator."""
    server = Server()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def serving() -> Iterator[Server]:
    """A scripted HTTP/1.1 server on 127.0.0.1 (as a fixture: ``pytest.fixture(serving)``)."""
    yield from serve()


def fast(attempts: int = 3, **options: object) -> buttress.Retry:
    """A retry policy with tiny fixed waits."""
    return retry(attempts, backoff=[0.001], **options)  # type: ignore[arg-type]
