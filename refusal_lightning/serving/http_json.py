"""JSON over HTTP/1.1 for our two small servers: ``serve`` and the evaluator's stub server.

A threading server with a deep listen backlog, a keep-alive handler that reads and writes JSON bodies
and checks a Bearer key in constant time, and OpenAI's error body ``{"error": {"message", "type",
"param", "code"}}``. Nothing here knows about models.
"""

from __future__ import annotations

import hmac
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MAX_BODY_BYTES = 16 * 1024 * 1024


class RequestError(Exception):
    """An error reply: HTTP status plus OpenAI's error fields."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code or str(self.status)}}


class LocalHTTPServer(ThreadingHTTPServer):
    """``ThreadingHTTPServer`` with daemon worker threads and a listen backlog deep enough for an
    evaluator running 64 requests at once (the stdlib default of 5 drops connections under load)."""

    daemon_threads = True
    request_queue_size = 256
    allow_reuse_address = True


class JSONHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive JSON plumbing shared by ``serve`` and the evaluator's stub server."""

    protocol_version = "HTTP/1.1"
    server_version = "refusal-lightning"
    api_key: str | None = None  # set on a subclass; None = no auth
    log_requests = False

    def setup(self) -> None:
        super().setup()
        # Headers and body go out as two writes; with Nagle on, the body waits for the client's delayed
        # ACK of the headers (~40 ms per request on Linux loopback).
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        if self.log_requests:
            super().log_message(format, *args)

    def send_json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (timeout); nothing to tell it

    def send_error_json(self, err: RequestError) -> None:
        self.send_json(err.status, err.body())

    def read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise RequestError(411, "Content-Length required")
        try:
            size = int(length)
        except ValueError:
            self.close_connection = True
            raise RequestError(400, "bad Content-Length") from None
        if size > MAX_BODY_BYTES:
            self.close_connection = True
            raise RequestError(413, f"request body over {MAX_BODY_BYTES} bytes")
        return self.rfile.read(size)

    def read_json(self) -> dict[str, Any]:
        raw = self.read_body()
        try:
            body = json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RequestError(400, f"request body is not valid JSON: {err}") from None
        if not isinstance(body, dict):
            raise RequestError(400, "request body must be a JSON object")
        return body

    def check_auth(self) -> None:
        if not self.api_key:
            return
        given = self.headers.get("Authorization", "")
        expected = f"Bearer {self.api_key}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise RequestError(401, "missing or invalid API key (send it as 'Authorization: Bearer ...')",
                               type_="authentication_error", code="invalid_api_key")


def start_in_thread(server: ThreadingHTTPServer) -> str:
    """Run ``server.serve_forever`` in a daemon thread; returns ``http://host:port``. Stop it with
    ``server.shutdown(); server.server_close()``."""
    # A short poll interval makes shutdown() return in ~50 ms instead of the default 0.5 s.
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="http-server",
                     daemon=True).start()
    host, port = server.server_address[:2]
    return f"http://{host}:{port}"


def serve_until_interrupted(server: ThreadingHTTPServer, names: list[str]) -> None:
    """Print the ready line (``serving NAMES on URL``, which the pipeline waits for) and serve until ^C."""
    host, port = server.server_address[:2]
    print(f"serving {', '.join(names)} on http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
