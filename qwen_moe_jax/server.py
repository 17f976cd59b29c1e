"""An OpenAI-compatible HTTP server over one Generator (`infer.py --serve`): POST /v1/completions,
/v1/chat/completions and /v1/responses (responses_api.py), each one JSON reply or server-sent events with "stream":
true; vLLM's /tokenize and /detokenize; GET /v1/models, /health and /metrics (Prometheus', serving_metrics.py).

The HTTP threads (the standard library's ThreadingHTTPServer, a thread per connection) read and check requests,
turn them into jobs (openai_api.py), submit them to the engine thread (serving_engine.py) and wait for their
results: the reply, whole or streamed. The server checks the API key and browsers' origins (CORS), and stops
draining the requests under way.
"""

from __future__ import annotations

import hmac
import json
import queue
import re
import select
import socket
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jax

from qwen_moe_jax import responses_api
from qwen_moe_jax.errors import UserError
from qwen_moe_jax.generate import Generator
from qwen_moe_jax.grammar import Grammars
from qwen_moe_jax.openai_api import Api, BadRequest, error_body
from qwen_moe_jax.sampling import Sampling
from qwen_moe_jax.serving_engine import Engine, Job
from qwen_moe_jax.serving_link import Link
from qwen_moe_jax.serving_metrics import Metrics
from qwen_moe_jax.tokenizer import Tokenizer

READ_TIMEOUT_S = 60  # the longest a client may keep the server waiting on its socket
MAX_BODY = 64 << 20  # bytes of a request body (a prompt of 100k token ids is about 0.7 MB of JSON)
CLIENT_CHECK_S = 0.5  # how often a request waiting for its whole reply checks that its client is still there


class Handler(BaseHTTPRequestHandler):
  protocol_version = "HTTP/1.1"
  timeout = READ_TIMEOUT_S  # on the socket: a client silent this long (mid-request, or idle between) is let go
  api: Api  # set by `make_server`
  api_key: str | None = None  # set by `make_server`: what every request but /health and /metrics must bear
  stored: responses_api.Stored  # set by `make_server`: the stored responses and their conversations
  origins: frozenset[str] = frozenset()  # set by `make_server`: the web pages' origins that may call it ("*": any)

  @property
  def _origin(self) -> str | None:
    """The request's Origin when it may read the reply (CORS), else None."""
    origin = self.headers.get("Origin") if getattr(self, "headers", None) else None  # (none: a bad request line)
    return origin if origin and ("*" in self.origins or origin in self.origins) else None

  def end_headers(self) -> None:
    if self._origin:  # every reply a page from an allowed origin gets says it may read it
      self.send_header("Access-Control-Allow-Origin", self._origin)
      self.send_header("Vary", "Origin")
    super().end_headers()

  def do_OPTIONS(self) -> None:  # noqa: N802
    """A browser's CORS preflight: what a page from an allowed origin may send (no API key: preflights bear none)."""
    self.close_connection = self.close_connection or self.headers.get("Content-Length", "0") != "0"
    if not self.origins:
      return self._not_allowed()
    if not self._origin:
      return self._json(403, error_body(f"origin {self.headers.get('Origin')!r} is not allowed (--allowed-origins)",
                                    "permission_error"))
    self.send_response(204)
    self.send_header("Access-Control-Allow-Methods", "GET, POST, DELETE, OPTIONS")
    self.send_header("Access-Control-Allow-Headers",
                     self.headers.get("Access-Control-Request-Headers", "Authorization, Content-Type"))
    self.send_header("Access-Control-Max-Age", "600")
    self.send_header("Content-Length", "0")
    self.end_headers()

  def _not_allowed(self) -> None:
    """405 naming the methods the server takes (the request's body, if any, unread: the connection closes)."""
    self.close_connection = True
    allowed = "GET, POST, OPTIONS" if self.origins else "GET, POST"
    self._json(405, error_body(f"method {self.command} is not allowed ({allowed})", "method_not_allowed"),
               {"Allow": allowed})

  do_PUT = do_PATCH = do_HEAD = do_CONNECT = do_TRACE = _not_allowed

  def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
    """The standard library's replies to requests it cannot parse (a bad request line, headers too long, an unknown
    method), as JSON errors; the connection closes."""
    self.close_connection = True
    message = message or self.responses.get(code, ("error",))[0]
    self._json(code, error_body(message, "invalid_request_error" if code < 500 else "server_error"))

  def _refused(self) -> bool:
    """Answers 401 to a request without `Authorization: Bearer <api_key>` (when the server has a key)."""
    if self.api_key is None or self.route in ("/health", "/metrics"):
      return False
    given = self.headers.get("Authorization", "")
    if hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
      return False
    self.close_connection = True  # (its body unread)
    self._json(401, error_body("missing or wrong API key: send 'Authorization: Bearer <key>'", "authentication_error"))
    return True

  @property
  def route(self) -> str:
    """The request's path without its query string (which no route reads)."""
    return urllib.parse.urlsplit(self.path).path

  def log_message(self, format: str, *args) -> None:  # noqa: A002  (one line per request on stderr)
    sys.stderr.write(f"{self.address_string()} {format % args}\n")

  def _bodiless(self) -> None:
    """A GET or DELETE reads no body: one sent with it closes the connection (what follows is no request's start)."""
    if self.headers.get("Content-Length", "0") != "0" or self.headers.get("Transfer-Encoding"):
      self.close_connection = True

  def do_GET(self) -> None:  # noqa: N802
    self._bodiless()
    if self._refused():
      return
    if self.route.startswith("/v1/responses/"):
      return self._stored(self.stored.response)
    if self.route == "/health":  # (503 tells a load balancer to send no more requests here)
      return self._json(503, {"status": "draining"}) if self.server.draining else self._json(200, {"status": "ok"})
    if self.route == "/metrics":
      return self._send(200, *self.api.engine.metrics.exposition())
    if self.route == "/v1/models":
      return self._json(200, {"object": "list", "data": [  # (max_model_len, root and parent: vLLM's too)
        {"id": name, "object": "model", "owned_by": "qwen-moe-jax", "created": 0, "max_model_len": self.api.slots,
         "root": name, "parent": None if name == self.api.name else self.api.name}
        for name in (self.api.name, *self.api.adapters)]})
    self._json(404, error_body(f"no such path: {self.path}", "not_found_error"))

  def do_DELETE(self) -> None:  # noqa: N802
    """Drops a stored response (DELETE /v1/responses/{id}); any other path: 405."""
    if not self.route.startswith("/v1/responses/"):
      return self._not_allowed()
    self._bodiless()
    if not self._refused():
      self._stored(self.stored.delete)

  def _stored(self, act) -> None:
    """`act` (Stored.response or delete) on the stored response the path names: its reply, or a 404."""
    try:
      self._json(200, act(urllib.parse.unquote(self.route.removeprefix("/v1/responses/"))))
    except BadRequest as e:
      self._json(e.status, error_body(str(e), "not_found_error", e.param))

  def do_POST(self) -> None:  # noqa: N802
    kind = {"/v1/completions": "completions", "/v1/chat/completions": "chat", "/v1/responses": "responses",
            "/tokenize": "tokenize", "/detokenize": "detokenize"}.get(self.route)
    if self._refused():
      return
    if kind is None:
      self.close_connection = True  # (its body unread)
      return self._json(404, error_body(f"no such path: {self.path}", "not_found_error"))
    if not self.server.admit():
      self.close_connection = True  # (its body unread)
      return self._json(503, error_body("the server is shutting down", "service_unavailable"))
    try:
      self._post(kind)
    finally:
      self.server.leave()

  def _post(self, kind: str) -> None:
    """A POST to a route that generates: its jobs submitted, then the reply, whole or streamed (a Responses request
    runs as the chat request it means: responses_api.py)."""
    try:
      body = self._body()
      if kind in ("tokenize", "detokenize"):
        return self._json(200, getattr(self.api, kind)(body))
      events: queue.Queue = queue.Queue()
      asked, jobs, prompts = responses_api.jobs(self.api, kind, body, events, self.stored)
    except BadRequest as e:
      return self._json(e.status, error_body(str(e), param=e.param))
    except Exception as e:  # noqa: BLE001  (a bug: the client hears of it, the server goes on)
      print(f"error: {self.path}: {type(e).__name__}: {e}", file=sys.stderr)
      return self._json(500, error_body(f"{type(e).__name__}: {e}", "server_error"))
    self.api.engine.submit(jobs)
    if body.get("stream"):
      return self._stream(kind, body, asked, events, jobs, prompts)
    results: list[tuple | None] = [None] * len(jobs)
    while any(r is None for r in results):
      try:
        event = events.get(timeout=CLIENT_CHECK_S)
      except queue.Empty:
        if self._client_gone():  # it timed out, say: free its rows rather than generate for no one
          for j in jobs:
            j.cancelled = True
          self.close_connection = True
          return
        continue
      if event[0] == "error":
        return self._json(500, error_body(event[2], "server_error"))
      if event[0] == "done":
        results[event[1]] = event[2:]
    reply = responses_api.reply(self.api, kind, body, asked, results, prompts)
    if kind == "responses":
      self.stored.put(body, asked, reply)
    self._json(200, reply)

  def _body(self):
    """The request's JSON body; BadRequest if its Content-Length is missing or wrong, too large, or the JSON bad
    (the connection then closes: what follows on it is not a request's start)."""
    length, keep = self.headers.get("Content-Length", "0"), self.close_connection  # (a client's Connection: close)
    self.close_connection = True
    if self.headers.get("Transfer-Encoding"):
      raise BadRequest("send the body with a Content-Length (chunked transfer encoding is not supported)", status=411)
    if not length.isdigit():
      raise BadRequest(f"Content-Length must be the body's size in bytes, got {length!r:.40}")
    if int(length) > MAX_BODY:
      raise BadRequest(f"the request body of {int(length)} bytes is over the {MAX_BODY}-byte limit", status=413)
    try:
      data = self.rfile.read(int(length))
    except TimeoutError:  # a client that sends less than it said, and waits
      raise BadRequest(f"the request body did not arrive within {READ_TIMEOUT_S} s", status=408) from None
    if len(data) < int(length):
      raise BadRequest(f"the request body ended after {len(data)} of its {length} bytes")
    try:
      body = json.loads(data or b"null")
    except (ValueError, RecursionError) as e:
      raise BadRequest(f"the request body is not valid JSON ({getattr(e, 'msg', None) or type(e).__name__})") from None
    self.close_connection = keep
    return body

  def _stream(self, kind: str, body: dict, asked: dict, events: queue.Queue, jobs: list[Job], prompts) -> None:
    """Server-sent events: chat's or completions' chunks, then [DONE]; or Responses' typed events (each named)."""
    self.send_response(200)
    self.send_header("Content-Type", "text/event-stream")
    self.send_header("Cache-Control", "no-cache")
    self.send_header("Connection", "close")
    self.end_headers()
    self.close_connection = True
    try:
      chunks = self.api.chunks("chat" if kind == "responses" else kind, asked, events, len(jobs), prompts)
      if kind == "responses":
        for event in responses_api.events(chunks, body, self.api.adapter(body) or self.api.name):
          if event["type"] in ("response.completed", "response.incomplete"):  # (stored before the client hears)
            self.stored.put(body, asked, event["response"])
          self._event(json.dumps(event, ensure_ascii=False), event["type"])
        return
      try:
        for chunk in chunks:
          self._event(json.dumps(chunk, ensure_ascii=False))
      except RuntimeError as e:  # the engine failed this call
        self._event(json.dumps(error_body(str(e), "server_error")))
      self._event("[DONE]")
    except OSError:  # the client went away (or stopped reading for READ_TIMEOUT_S): free its rows
      for j in jobs:
        j.cancelled = True

  def _client_gone(self) -> bool:
    """Whether the client closed the connection while waiting for its reply (it sends nothing meanwhile, so the
    socket reads as ready only at its end)."""
    ready, _, _ = select.select([self.connection], [], [], 0)
    try:
      return bool(ready) and not self.connection.recv(1, socket.MSG_PEEK)
    except OSError:  # reset
      return True

  def _event(self, data: str, name: str | None = None) -> None:
    self.wfile.write((f"event: {name}\n" if name else "").encode() + f"data: {data}\n\n".encode())
    self.wfile.flush()

  def _json(self, status: int, obj: dict, headers: dict[str, str] | None = None) -> None:
    self._send(status, json.dumps(obj, ensure_ascii=False).encode(), "application/json", headers)

  def _send(self, status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
    try:
      self.send_response(status)
      self.send_header("Content-Type", content_type)
      self.send_header("Content-Length", str(len(data)))
      for name, value in (headers or {}).items():
        self.send_header(name, value)
      self.end_headers()
      if self.command != "HEAD":  # (a reply to HEAD has no body)
        self.wfile.write(data)
    except OSError:  # the client left before its reply
      self.close_connection = True


def allowed_origins(text: str | None) -> frozenset[str]:
  """--allowed-origins 'ORIGIN,...' or '*' (or vLLM's JSON list, '["*"]') -> the origins, each '*' or
  scheme://host[:port]; else a UserError."""
  if not text:
    return frozenset()
  try:
    given = json.loads(text) if text.lstrip().startswith("[") else text.split(",")
  except json.JSONDecodeError:
    given = None
  if not isinstance(given, list) or not given or not all(isinstance(o, str) for o in given):
    raise UserError(f"--allowed-origins takes ORIGIN,... or a JSON list of them, got {text!r}")
  origins = frozenset(o.strip().rstrip("/") for o in given)
  for o in sorted(origins):
    if o != "*" and not re.fullmatch(r"https?://[^/\s]+", o):
      raise UserError(f"--allowed-origins: {o!r} is not an origin (scheme://host[:port], such as "
                      "http://localhost:3000) or *")
  return origins


class Server(ThreadingHTTPServer):
  """The HTTP server over an engine, which `server_close` stops too. `stop` lets the requests under way end first
  (vLLM's --shutdown-timeout)."""
  daemon_threads = True

  def __init__(self, address: tuple[str, int], handler: type, engine: Engine):
    super().__init__(address, handler)
    self.engine = engine
    self.under_way, self.draining, self.quiet = 0, False, threading.Condition()

  def handle_error(self, request, client_address) -> None:
    """A client resetting or leaving its connection is no server error (not logged); the rest is, as the standard
    library logs it."""
    if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError, TimeoutError)):
      super().handle_error(request, client_address)

  def admit(self) -> bool:
    """Counts a POST request under way until `leave`; False (not counted) once draining."""
    with self.quiet:
      if not self.draining:
        self.under_way += 1
      return not self.draining

  def leave(self) -> None:
    with self.quiet:
      self.under_way -= 1
      self.quiet.notify_all()

  def stop(self, timeout: float) -> None:
    """Answers new requests, and /health, with 503 from now on, waits up to `timeout` seconds for the requests under
    way to end (their replies sent), and ends `serve_forever` (call it from another thread). Once is enough: a
    second call returns at once."""
    with self.quiet:
      if self.draining:
        return
      self.draining = True
      print(f"stopping: new requests get 503; waiting up to {timeout:g} s for the {self.under_way} under way",
            file=sys.stderr, flush=True)
      self.quiet.wait_for(lambda: not self.under_way, timeout)
      if self.under_way:
        print(f"stopping with {self.under_way} requests still under way", file=sys.stderr, flush=True)
    self.shutdown()

  def server_close(self) -> None:
    super().server_close()
    self.engine.close()


def make_server(generator: Generator, tok: Tokenizer, *, name: str, host: str, port: int, rows: int, slots: int,
                stop_ids: list[int], sampling: Sampling, seed: int, api_key: str | None = None,
                shutdown_timeout: float = 0, grammars: Grammars | None = None,
                origins: frozenset[str] = frozenset(), adapters: dict[str, dict] | None = None) -> Server:
  """The HTTP server (not yet serving: call serve_forever), its engine thread started and warmed up; with
  `api_key`, requests but /health and /metrics must bear it (`Authorization: Bearer <api_key>`, as OpenAI's clients
  send their api_key); `grammars` builds the requests' grammars (default: Grammars(tok), the default limits);
  web pages from `origins` ("*": any) may call it (CORS); `adapters`: served LoRA adapters (serving_engine.py), by
  name, which a request's model picks. With several processes, this is process 0's; the others `follow`."""
  link = Link() if jax.process_count() > 1 else None
  engine = Engine(generator, rows, slots, stop_ids, Metrics(name), link, adapters=adapters)
  try:
    engine.warm_up(sampling)
    api = Api(engine, tok, name, sampling, seed, slots, grammars)
    server = Server((host, port), type("BoundHandler", (Handler,), {"api": api, "api_key": api_key,
                                                                  "stored": responses_api.Stored(),
                                                                  "origins": frozenset(origins)}), engine)
  except BaseException:
    engine.close()  # (and the followers with it)
    raise
  if link:
    def stop_when_asked() -> None:  # by a follower: serve_forever returns, as when this process is stopped
      print(f"process {link.wait_for_stop_request()} asked to stop the server", file=sys.stderr, flush=True)
      server.stop(shutdown_timeout)

    threading.Thread(target=stop_when_asked, daemon=True, name="stop requests").start()
  return server
