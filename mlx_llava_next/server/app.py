"""HTTP: routes, auth, body limits, JSON and SSE responses on the standard library's ThreadingHTTPServer."""

import hmac
import ipaddress
import json
import queue
import select
import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Dict, Optional

from ..errors import LlavaNextError
from .documents import parse_ocr_request
from .engine import Engine, Job
from .images import ImagePolicy, fetch_image
from .schema import ApiError, parse_chat_request, parse_json

STATIC = Path(__file__).parent / "static"
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """'127.0.0.1:8080' -> '127.0.0.1', '[::1]:8080' -> '::1'."""
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Server(ThreadingHTTPServer):
    """The HTTP server; one thread per connection, all sharing one Engine."""

    daemon_threads = True
    allow_reuse_address = True
    # socketserver's listen backlog is 5: clients connecting at once beyond that have their SYN
    # dropped and retried (a connection error once in a full test run, 16 clients at once)
    request_queue_size = 128

    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 8080, *, api_key: Optional[str] = None,
                 images: ImagePolicy = ImagePolicy(), max_body_bytes: int = 64 << 20, log=None):
        self.engine, self.api_key, self.images, self.max_body_bytes = engine, api_key, images, max_body_bytes
        self.log = log
        # Bound to loopback, only loopback names are answered: a web page whose domain is re-bound
        # to 127.0.0.1 (DNS rebinding) cannot talk to the server as if it were same-origin.
        self.loopback_only = is_loopback(host)
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), Handler)


class Handler(BaseHTTPRequestHandler):
    server: Server
    server_version = "mlx-llava-next"
    timeout = 60  # seconds a client may stall while sending its request or reading ours

    def log_message(self, format, *args):  # noqa: A002
        if self.server.log:
            self.server.log(f"{self.address_string()} {format % args}")

    # -- responses ------------------------------------------------------------------------
    def _send_json(self, status: int, body: Dict[str, Any], headers: Optional[Dict[str, str]] = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, e: ApiError) -> None:
        self._send_json(e.status, e.body(), e.headers)

    def _guard(self, fn) -> None:
        try:
            self._check_host()
            fn()
        except ApiError as e:
            self._send_error(e)
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            self.close_connection = True
        except Exception as e:  # noqa: BLE001  never a traceback to the client, never a dead server
            self._send_error(ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))

    # -- routing --------------------------------------------------------------------------
    def do_GET(self):
        self._guard(self._get)

    def do_POST(self):
        self._guard(self._post)

    def _route(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/") or "/"

    def _get(self) -> None:
        route = self._route()
        if route in ("/", "/index.html"):
            data = (STATIC / "index.html").read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Content-Security-Policy", "default-src 'self' 'unsafe-inline' data: blob:")
            self.end_headers()
            self.wfile.write(data)
        elif route == "/health":
            engine = self.server.engine
            self._send_json(200, {"status": "ok", "model": engine.model_id, "busy": engine.busy is not None,
                                  "queued": engine.queued()})
        elif route == "/v1/models":
            self._authorize()
            self._send_json(200, {"object": "list", "data": [
                {"id": self.server.engine.model_id, "object": "model", "created": 0, "owned_by": "mlx-llava-next"}]})
        elif route in ("/v1/chat/completions", "/v1/ocr"):
            raise ApiError(405, f"use POST for {route}", code="method_not_allowed")
        else:
            raise ApiError(404, f"no route {self.command} {route}", code="not_found")

    def _post(self) -> None:
        route = self._route()
        if route == "/v1/ocr":
            return self._post_ocr()
        if route != "/v1/chat/completions":
            raise ApiError(404, f"no route {self.command} {route}", code="not_found")
        self._authorize()
        body = parse_json(self._read_body())
        request = parse_chat_request(body)
        images = [fetch_image(ref.url, ref.param, self.server.images) for ref in request.images]
        try:
            prepared = self.server.engine.prepare(request, images)
        except LlavaNextError as e:  # marker/image mismatch, prompt longer than the context
            raise ApiError(400, str(e), param="messages", code="invalid_prompt") from None
        job = self.server.engine.submit(prepared)
        try:
            if request.stream:
                self._stream(job)
            else:
                self._complete(job)
        finally:
            job.cancelled.set()  # no-op when finished; stops the worker when this client left

    def _post_ocr(self) -> None:
        """A PDF or image through the document engine; the answer is what `cli.py ocr --format F` writes."""
        self._authorize()
        request = parse_ocr_request(parse_json(self._read_body()))
        job = self.server.engine.submit_ocr(request)
        try:
            result = next(iter(self._events(job)), None)
            if result is None or job.cancelled.is_set():
                return  # the client has gone
            data = result[0].encode()
            self.send_response(200)
            self.send_header("Content-Type", request.content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        finally:
            job.cancelled.set()  # no-op when finished; stops the worker after its page when this client left

    def _check_host(self) -> None:
        host = self.headers.get("Host")
        if self.server.loopback_only and host and host_name(host).lower() not in LOOPBACK_NAMES:
            self.close_connection = True
            raise ApiError(403, f"Host {host!r} refused: this server is bound to a loopback address and answers only "
                           "localhost / 127.0.0.1 / [::1] (start it with --host to serve other names)",
                           code="host_not_allowed")

    def _authorize(self) -> None:
        key = self.server.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        token = given[7:] if given.startswith("Bearer ") else ""
        if not hmac.compare_digest(token.encode(), key.encode()):
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                           type="authentication_error", code="invalid_api_key")

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked" or length is None:
            self.close_connection = True
            raise ApiError(411, "a Content-Length header is required", code="length_required")
        if not length.isdigit():
            self.close_connection = True
            raise ApiError(400, "bad Content-Length header", code="invalid_request")
        if int(length) > self.server.max_body_bytes:
            self.close_connection = True  # the body is not read
            raise ApiError(413, f"request body of {length} bytes exceeds the {self.server.max_body_bytes} byte limit",
                           code="request_too_large")
        content_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            # also what stops other web pages from posting here through a visitor's browser (no CORS)
            self.close_connection = True
            raise ApiError(415, "Content-Type must be application/json", code="unsupported_media_type")
        return self.rfile.read(int(length))

    # -- answering ------------------------------------------------------------------------
    def _client_gone(self) -> bool:
        """True when the client closed its side (readable with EOF while we have nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _events(self, job: Job):
        """The job's events; stops (cancelling it) when the client disconnects while it waits."""
        while True:
            try:
                kind, value = job.events.get(timeout=0.1)
            except queue.Empty:
                if self._client_gone():
                    job.cancelled.set()
                    return
                continue
            if kind == "error":
                if isinstance(value, ApiError):
                    raise value
                if isinstance(value, LlavaNextError):
                    raise ApiError(400, str(value), code="invalid_request")
                raise ApiError(500, f"generation failed: {type(value).__name__}: {value}", type="server_error")
            if kind == "done":
                return
            yield value

    def _usage(self, last) -> Dict[str, Any]:
        prompt = last.prompt_tokens + last.cached_tokens
        return {"prompt_tokens": prompt, "completion_tokens": last.generation_tokens,
                "total_tokens": prompt + last.generation_tokens,
                "prompt_tokens_details": {"cached_tokens": last.cached_tokens}}

    def _complete(self, job: Job) -> None:
        text, last = [], None
        for last in self._events(job):
            text.append(last.text)
        if job.cancelled.is_set() or last is None:
            return  # the client has gone
        self._send_json(200, {
            "id": job.id, "object": "chat.completion", "created": job.created, "model": self.server.engine.model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                         "logprobs": None, "finish_reason": last.finish_reason or "length"}],
            "usage": self._usage(last),
        })

    def _stream(self, job: Job) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        include_usage = job.prepared.request.include_usage

        def chunk(delta, finish=None, usage=None, choices=True):
            body = {"id": job.id, "object": "chat.completion.chunk", "created": job.created,
                    "model": self.server.engine.model_id,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}] if choices else []}
            if include_usage:
                body["usage"] = usage
            self.wfile.write(b"data: " + json.dumps(body).encode() + b"\n\n")
            self.wfile.flush()

        last = None
        chunk({"role": "assistant", "content": ""})
        try:
            for last in self._events(job):
                if last.text:
                    chunk({"content": last.text})
        except ApiError as e:  # headers are sent: report the error as an event, as OpenAI does
            self.wfile.write(b"data: " + json.dumps(e.body()).encode() + b"\n\n")
            return
        if job.cancelled.is_set() or last is None:
            return
        chunk({}, finish=last.finish_reason or "length")
        if include_usage:
            chunk(None, usage=self._usage(last), choices=False)
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()
