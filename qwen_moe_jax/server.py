"""An OpenAI-compatible HTTP server over one Generator (`infer.py --serve`): POST /v1/completions and
/v1/chat/completions (one JSON reply, or server-sent events with "stream": true), vLLM's /tokenize and
/detokenize, GET /v1/models, /health and /metrics (Prometheus', serving_metrics.py).

One engine thread owns the device and runs generate calls back to back; the HTTP threads (the standard library's
ThreadingHTTPServer) parse requests into jobs (a prompt and its settings: a request with "n" samples or several
prompts makes several), queue them and wait for their results. A job that arrives while a call runs joins it as
its rows free (Generator.generate's `arrivals`, polled every decode chunk), so requests do not wait for each other
(continuous batching). Calls keep their KV cache (`keep`): a finished request's row holds its prompt and reply
until a new request takes it, so a conversation's next turn runs only its new tokens (usage's
`prompt_tokens_details.cached_tokens` counts the others). Every call has the same shapes (`rows` rows, a cache of
`slots` slots), so the decode program compiles once for each set of sampling steps: a call takes those its requests
need (`room_ops`), and a request needing more widens a running call's as it joins.

Over several processes (jax.distributed), process 0 serves HTTP and every other runs the same engine as a
follower (`follow`), told at each sync point what process 0's engine saw (serving_link.py).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hmac
import itertools
import json
import queue
import re
import select
import signal
import socket
import sys
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jax

from qwen_moe_jax import tool_calls
from qwen_moe_jax.automaton import Grammar
from qwen_moe_jax.decoding import checked_seed
from qwen_moe_jax.errors import UserError, json_number
from qwen_moe_jax.generate import Arrival, Generator, Output, Piece, Room, Stream, room_ops
from qwen_moe_jax.grammar import Grammars
from qwen_moe_jax.sampling import MAX_TOP_LOGPROBS, SETTINGS, Sampling, SamplingOps, given_settings
from qwen_moe_jax.scoring import prompt_scores
from qwen_moe_jax.serving_link import Link
from qwen_moe_jax.serving_metrics import Meter, Metrics
from qwen_moe_jax.stop_strings import StopStrings, TextStream, text_of
from qwen_moe_jax.tokenizer import Tokenizer

JSON_OBJECT = {"type": "object"}  # the schema of response_format json_object (any JSON object)
FLAGS = ("stream", "echo", "ignore_eos", "parallel_tool_calls")  # fields that are true or false (and chat's logprobs)
ACCEPTED = {"suffix": ("",), "best_of": (1,), "functions": ([],)}  # the values of fields not implemented that we
# take
GUIDED = {"guided_regex": "regex", "guided_json": "json_schema", "guided_choice": "choice",  # vLLM's
          "response_format": "json_schema"}  # OpenAI's (see Api.grammar)


class BadRequest(Exception):
  """A request the server refuses (HTTP 400, or `status`), with OpenAI's error fields."""

  def __init__(self, message: str, param: str | None = None, status: int = 400):
    super().__init__(message)
    self.param, self.status = param, status


@dataclasses.dataclass
class Job:
  """One prompt of a request, generated as one row (or scored: `echo` with `logprobs`); its events go to the
  request's queue tagged with `choice`: ("text", choice, text, Piece: the ids it came from, None at the end) as
  text arrives (streamed requests), then ("done", choice, Output, scores: PromptScores of a scored job, else None)
  or ("error", choice, message)."""
  ids: list[int]
  max_new_tokens: int
  sampling: Sampling
  stream: Stream
  stops: StopStrings | None
  choice: int
  events: queue.Queue
  text: TextStream | None = None  # streamed requests: the text shown so far
  cancelled: bool = False  # the client went away (set by its HTTP thread; the engine sees it at its next sync)
  score: bool = False  # the prompt's scores, and with max_new_tokens 1 its greedy next token, from one forward pass
  meter: Meter | None = dataclasses.field(default_factory=Meter)  # its times, from now (None: not counted)
  serial: int = -1  # its number, the same on every process (Engine.submit)
  ended: bool = False  # the engine saw `cancelled` (every process at the same sync): its row ends, or it never starts

  def wire(self) -> dict:
    """What a follower's engine needs of the job, as JSON (`unwired` reads it)."""
    s = self.sampling
    return {"serial": self.serial, "ids": self.ids, "max_new_tokens": self.max_new_tokens,
            "sampling": {f: getattr(s, f) for f in SETTINGS},
            "grammar": [s.grammar.pattern, s.grammar.source] if s.grammar else None, "stream": list(self.stream),
            "stops": self.stops.stops if self.stops else None, "choice": self.choice, "score": self.score}

  @staticmethod
  def unwired(obj: dict, tok: Tokenizer, grammars: Grammars) -> "Job":
    """A job from its `wire` form, on a follower: no client reads its events, no metrics count it."""
    sampling = Sampling(**obj["sampling"] | {"logit_bias": tuple(map(tuple, obj["sampling"]["logit_bias"])),
                                             "grammar": obj["grammar"] and grammars.of_pattern(*obj["grammar"])})
    return Job(obj["ids"], obj["max_new_tokens"], sampling, Stream(*obj["stream"]),
               obj["stops"] and StopStrings(tok, obj["stops"]), obj["choice"], _NOWHERE, score=obj["score"],
               meter=None, serial=obj["serial"])


class _Nowhere:
  """A follower's jobs' event queue: nobody reads it."""

  def put(self, event: tuple) -> None:
    pass


_NOWHERE = _Nowhere()


class Stopped(BaseException):
  """The server stops: its engine's loop ends there (not an Exception: a call's error handling lets it through)."""


READ_TIMEOUT_S = 60  # the longest a client may keep the server waiting on its socket
MAX_BODY = 64 << 20  # bytes of a request body (a prompt of 100k token ids is about 0.7 MB of JSON)
CLIENT_CHECK_S = 0.5  # how often a request waiting for its whole reply checks that its client is still there


class Engine:
  """Runs the jobs on one thread, in generate calls of fixed shapes (Room), joining running calls as they come.

  What it decides depends only on what it saw at its sync points (`_sync`): the jobs submitted and the clients gone
  by then. `link` (several processes): process 0's engine sends that to the others', which `follow` on their own
  thread (and need the tokenizer `tok`, for the jobs' stop strings and grammars)."""

  def __init__(self, generator: Generator, rows: int, slots: int, stop_ids: list[int], metrics: Metrics,
               link: Link | None = None, tok: Tokenizer | None = None, grammars: Grammars | None = None):
    self.generator, self.stop_ids, self.metrics, self.link, self.tok = generator, stop_ids, metrics, link, tok
    self.room = Room(rows=rows, slots=slots, max_new=slots)
    self.leads = link is None or link.leads
    self.pending: collections.deque[Job] = collections.deque()  # jobs seen, not yet taken (the engine's thread's)
    self.live: dict[int, Job] = {}  # jobs seen, not yet ended, by serial
    self.inbox: list[Job] = []  # process 0: jobs submitted, not yet seen (under `ready`)
    self.serials, self.closing, self.ready = itertools.count(), False, threading.Condition()
    self.grammars = None if self.leads else grammars or Grammars(tok)
    self.thread = threading.Thread(target=self._serve, daemon=True, name="engine") if self.leads else None
    if self.thread:
      self.thread.start()

  def follow(self) -> None:
    """A follower's engine, on this thread, until process 0's stops."""
    self._serve()

  def close(self) -> None:
    """Stops the engine at its next sync point (with followers: tells them) and returns once it has stopped (so
    that no device call is under way as the process exits)."""
    with self.ready:
      self.closing = True
      self.ready.notify()
    self.thread.join()

  def warm_up(self, sampling: Sampling) -> None:
    """Runs a one-id prompt for two tokens with `sampling` (the server's defaults), so that the first requests find
    the decode program compiled (and a short prompt's prefill)."""
    events: queue.Queue = queue.Queue()
    self.submit([Job([0], 2, sampling, Stream(0, 0), None, 0, events, meter=None)])
    event = events.get()
    if event[0] == "error":
      raise UserError(f"warming up the server: {event[2]}")

  def submit(self, jobs: list[Job]) -> None:
    self.metrics.queued([j.meter for j in jobs])
    with self.ready:
      for j in jobs:
        j.serial = next(self.serials)
      self.inbox.extend(jobs)
      self.ready.notify()

  def _sync(self) -> None:
    """The engine sees what came: the jobs submitted join `pending`, and the jobs whose clients left end (`ended`:
    their rows end, or they never start); process 0 tells the followers, which wait for it here."""
    if self.leads:
      with self.ready:
        new, self.inbox, stop = self.inbox, [], self.closing
      gone = [j for j in self.live.values() if j.cancelled and not j.ended]
      if self.link:
        self.link.send({"jobs": [j.wire() for j in new], "gone": [j.serial for j in gone], "stop": stop})
    else:
      message = self.link.receive()
      new = [Job.unwired(obj, self.tok, self.grammars) for obj in message["jobs"]]
      gone, stop = [self.live[serial] for serial in message["gone"]], message["stop"]
    if stop:
      raise Stopped
    for j in gone:
      j.ended = True
    self.live.update((j.serial, j) for j in new)
    self.pending.extend(new)

  def _take(self, unless_scoring: bool = False) -> list[Job]:
    """The jobs seen and waiting (none, `unless_scoring`, while a scored job waits: a running call then drains, and
    the scored jobs run next)."""
    if unless_scoring and any(j.score for j in self.pending):
      return []
    jobs = list(self.pending)
    self.pending.clear()
    return jobs

  def _serve(self) -> None:
    try:
      while True:
        if self.leads:
          with self.ready:
            self.ready.wait_for(lambda: self.inbox or self.pending or self.closing)
        self._sync()
        jobs = self._take()
        for part, run in (([j for j in jobs if j.score], self._score), ([j for j in jobs if not j.score], self._call)):
          if part:
            run(part)
    except Stopped:
      return

  def _score(self, jobs: list[Job]) -> None:
    """Scored jobs, in one `prompt_scores` call (prompts that begin alike run their common ids once)."""
    self.generator.drop_kept()  # the rows' cache: its memory is the scoring pass's now
    try:  # an id after each prompt: where it is predicted, the greedy next token (its own score is not read)
      scores = prompt_scores(self.generator, [j.ids + [0] for j in jobs])
    except Exception as e:  # noqa: BLE001  (as in _call)
      return self._fail(jobs, e)
    for j, s in zip(jobs, scores, strict=True):
      new = slice(len(j.ids), len(j.ids) + j.max_new_tokens)
      out = Output(s.best[new], s.best_logprobs[new], "length", 0, [])
      self._finished(j, out)
      j.events.put(("done", j.choice, out, s))

  def _fail(self, jobs: list[Job], e: Exception) -> None:
    """Every job gets the error (out of memory, or a bug): the server goes on."""
    message = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
    print(f"error: {message}", file=sys.stderr)
    for j in jobs:
      self.live.pop(j.serial, None)
      self.metrics.failed(j.meter)
      j.events.put(("error", j.choice, message))

  def _finished(self, j: Job, out: Output) -> None:
    self.live.pop(j.serial, None)
    self.metrics.finished(j.meter, len(j.ids), out.cached, len(out.ids), "abort" if j.ended else out.reason)

  def _call(self, jobs: list[Job]) -> None:
    ops = room_ops(SamplingOps.of([j.sampling for j in jobs]), self.generator.config.vocab_size)
    room = dataclasses.replace(self.room, ops=ops)  # arrivals needing more steps widen it (Generator.generate)
    offered: list[Job] = []  # jobs handed to the call as arrivals: the admitted ones first, in order

    def job(i: int) -> Job:  # the call's prompt i
      return jobs[i] if i < len(jobs) else offered[i - len(jobs)]

    def arrivals() -> list[Arrival]:
      new = self._take(unless_scoring=True)
      offered.extend(new)
      return [Arrival(j.ids, j.max_new_tokens, j.sampling, j.stream) for j in new]

    def on_tokens(i: int, piece: Piece) -> None:
      j = job(i)
      self.metrics.tokens(j.meter, len(piece.ids))
      if j.text is not None:
        j.events.put(("text", j.choice, j.text.push(piece.ids), piece))

    def stop_when(i: int, ids: list[int], new: int) -> int | None:
      j = job(i)
      if j.ended:
        return len(ids)
      return j.stops.end(ids, new) if j.stops else None

    def on_done(i: int, out: Output) -> None:
      j = job(i)
      self._finished(j, out)
      if j.text is not None:
        j.events.put(("text", j.choice, j.text.close(), None))
      j.events.put(("done", j.choice, out, None))

    try:
      result = self.generator.generate(
        [j.ids for j in jobs], [j.max_new_tokens for j in jobs], [j.sampling for j in jobs],
        [j.stream for j in jobs], self.stop_ids, on_tokens, stop_when=stop_when, on_done=on_done,
        keep=True, arrivals=arrivals, room=room, on_return=self._sync)
    except Exception as e:  # noqa: BLE001  (out of memory, or a bug): this call's jobs fail, the server goes on
      return self._fail(jobs + offered, e)
    left = offered[len(offered) - len(result.left):]  # not admitted: they start the next call
    self.pending.extendleft(reversed(left))


class Api:
  """Requests (parsed JSON) -> jobs for the engine -> OpenAI's reply objects."""

  def __init__(self, engine: Engine, tok: Tokenizer, name: str, sampling: Sampling, seed: int, slots: int,
               grammars: Grammars | None = None):
    self.engine, self.tok, self.name, self.sampling, self.slots = engine, tok, name, sampling, slots
    self.grammars = grammars or Grammars(tok)
    self.seed, self.counter, self.lock = seed, itertools.count(), threading.Lock()

  def jobs(self, kind: str, body: dict, events: queue.Queue) -> tuple[list[Job], list[list[int]]]:
    """The request's jobs (choice k = prompt k // n, sample k % n) and prompts, checked; BadRequest when
    refused."""
    if not isinstance(body, dict):
      raise BadRequest("the request body must be a JSON object")
    for key, fine in ACCEPTED.items():
      if body.get(key) is not None and body[key] not in fine:
        raise BadRequest(f"{key} is not supported", key)
    for key in FLAGS + (("logprobs",) if kind == "chat" else ()):
      if body.get(key) is not None and not isinstance(body[key], bool):
        raise BadRequest(f"{key} must be true or false, got {body[key]!r:.100}", key)
    options = body.get("stream_options")
    usage = options.get("include_usage", False) if isinstance(options, dict) else None
    if options is not None and not isinstance(usage, bool):
      raise BadRequest(f'stream_options must be an object such as {{"include_usage": true}}, got {options!r:.100}',
                       "stream_options")
    prompts = self._prompts(kind, body)
    try:  # the settings by their flags' names (vLLM's too)
      given = given_settings(body, SETTINGS, "request")
      if given.get("top_k") == -1:  # vLLM's "off"
        given["top_k"] = 0
      sampling = dataclasses.replace(self.sampling, **given).validate("request")
    except UserError as e:
      message = str(e).removeprefix("request: ")
      raise BadRequest(message, next((k for k in SETTINGS if message.startswith(k)), None)) from None
    grammar = self.grammar(kind, body)
    if grammar is not None:
      if sampling.min_tokens or body.get("ignore_eos"):
        raise BadRequest("min_tokens and ignore_eos cannot hold the stop ids back under structured output (the "
                         "grammar says where the output ends)", "min_tokens")
      sampling = dataclasses.replace(sampling, grammar=grammar)
    n = _number(body, "n", int) if body.get("n") is not None else 1
    if not 1 <= n <= 128:
      raise BadRequest(f"n must be in [1, 128], got {n}", "n")
    seed = _number(body, "seed", int) if body.get("seed") is not None else None
    try:  # int64's and uint64's (vLLM takes int64's)
      seed = None if seed is None else checked_seed(seed, "seed")
    except UserError as e:
      raise BadRequest(str(e), "seed") from None
    stops = _stops(self.tok, body.get("stop"))
    if kind == "completions" and body.get("logprobs") is not None:  # its N likeliest ids at each token
      sampling = dataclasses.replace(sampling, top_logprobs=_number(body, "logprobs", int))
      if not 0 <= sampling.top_logprobs <= MAX_TOP_LOGPROBS:
        raise BadRequest(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {sampling.top_logprobs}", "logprobs")
    if kind == "chat" and sampling.top_logprobs and not body.get("logprobs"):
      raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
    limit_key = "max_completion_tokens" if kind == "chat" and body.get("max_completion_tokens") is not None \
        else "max_tokens"
    given_limit = _number(body, limit_key, int) if body.get(limit_key) is not None else None
    echo = body.get("echo") not in (None, False)
    if echo and (kind == "chat" or body.get("stream")):
      raise BadRequest("echo is for /v1/completions, not streamed", "echo")
    score = echo and body.get("logprobs") is not None  # the prompt's log-probabilities: scored, not generated
    least = 0 if score else 1
    if score and (n > 1 or sampling.temperature > 0 or (given_limit or 0) > 1):
      raise BadRequest("echo with logprobs scores the prompt (lm-eval's loglikelihood requests): it takes n 1 and "
                       f"{limit_key} 0, or 1 with temperature 0 (the greedy next token)", "echo")
    out = []
    for p, ids in enumerate(prompts):
      room = self.slots - len(ids)
      if room < 1:
        raise BadRequest(f"the prompt has {len(ids)} tokens: it leaves no room in the server's "
                         f"--max-model-len of {self.slots}", "prompt")
      limit = given_limit if given_limit is not None else (
        0 if score else min(16, room) if kind == "completions" else room)  # OpenAI's defaults
      if limit < least or limit > room:
        raise BadRequest(f"{limit_key} must be in [{least}, {room}] (--max-model-len {self.slots} minus the prompt's "
                         f"{len(ids)} tokens), got {limit}", limit_key)
      try:
        self.engine.generator.validate([ids], [max(limit, 1)], [sampling])
      except UserError as e:
        raise BadRequest(str(e), "logit_bias" if "logit_bias" in str(e) else "prompt") from None
      held = dataclasses.replace(sampling, min_tokens=limit) if body.get("ignore_eos") else sampling  # vLLM's
      for j in range(n):
        with self.lock:
          stream = Stream(seed, j) if seed is not None else Stream(self.seed, next(self.counter))
        out.append(Job(ids, limit, held, stream, stops, p * n + j, events,
                       TextStream(self.tok, stops) if body.get("stream") else None, score=score))
    return out, prompts

  def grammar(self, kind: str, body: dict) -> Grammar | None:
    """The structured output a request asks for: OpenAI's response_format ({"type": "json_object"}: any JSON
    object; {"type": "json_schema", "json_schema": {"schema": ...}}), vLLM's guided_json, guided_regex or
    guided_choice, or a chat's tool_choice forcing a call."""
    given = {k: body.get(k) for k in GUIDED}
    fmt = given.pop("response_format")
    form = fmt.get("type") if isinstance(fmt, dict) else None
    if fmt is not None and form not in ("text", "json_object", "json_schema"):
      raise BadRequest('response_format must be {"type": "text"}, {"type": "json_object"} or {"type": '
                       f'"json_schema", "json_schema": {{"schema": ...}}}}, got {fmt!r}', "response_format")
    if form == "json_object":
      given["response_format"] = JSON_OBJECT
    elif form == "json_schema":
      schema = fmt.get("json_schema")
      given["response_format"] = schema.get("schema") if isinstance(schema, dict) else None
      if not isinstance(given["response_format"], dict):
        raise BadRequest("response_format.json_schema.schema must be a JSON schema object", "response_format")
    names = GUIDED
    tools = self._tools(body) if kind == "chat" else None
    if tools:  # tool_choice "required" or a named function: the reply is the call (its arguments' schema followed)
      try:
        pattern = tool_calls.forced(tools, body.get("tool_choice"), body.get("parallel_tool_calls") is not False)
      except UserError as e:
        raise BadRequest(str(e), "tool_choice") from None
      given, names = given | {"tool_choice": pattern}, GUIDED | {"tool_choice": "regex"}
    try:
      return self.grammars.pick(given, "request", names)
    except UserError as e:
      raise BadRequest(str(e).removeprefix("request: "), next(k for k in names if given.get(k) is not None)) \
        from None

  def _tools(self, body: dict) -> list[dict] | None:
    """A chat request's `tools` (checked), or None when it gives none or its tool_choice is "none"."""
    tools = body.get("tools")
    if tools is None or tools == []:
      if body.get("tool_choice") not in (None, "none", "auto"):
        raise BadRequest("tool_choice needs tools", "tool_choice")
      return None
    try:
      tools = tool_calls.check_tools(tools)
    except UserError as e:
      raise BadRequest(str(e), "tools") from None
    if not self.tok.takes("tools"):
      raise BadRequest("the chat template does not take tools: give the checkpoint a template that does (Qwen's "
                       "Hermes-style <tool_call> format, as Qwen2.5's)", "tools")
    return None if body.get("tool_choice") == "none" else tools

  def tokenize(self, body: dict) -> dict:
    """vLLM's /tokenize: a completion's "prompt" or a chat's "messages" (through the chat template, with its
    "tools") as the ids a request would run, their count and --max-model-len."""
    if not isinstance(body, dict):
      raise BadRequest("the request body must be a JSON object")
    ids = self._prompts("chat" if "messages" in body else "completions", body)
    if len(ids) != 1:
      raise BadRequest("tokenize takes one prompt", "prompt")
    return {"count": len(ids[0]), "max_model_len": self.slots, "tokens": ids[0]}

  def detokenize(self, body: dict) -> dict:
    """vLLM's /detokenize: {"tokens": [ids]} -> {"prompt": their text}."""
    tokens = body.get("tokens") if isinstance(body, dict) else None
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) and
                                               0 <= t < self.engine.generator.config.vocab_size for t in tokens):
      raise BadRequest("tokens must be a list of token ids in the vocabulary", "tokens")
    return {"prompt": self.tok.decode(tokens)}

  def _prompts(self, kind: str, body: dict) -> list[list[int]]:
    if kind == "chat":
      messages = body.get("messages")
      if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", "messages")
      tools = self._tools(body)
      messages = [_template_form(m, f"messages[{i}]") for i, m in enumerate(messages)]
      try:
        return [self.tok.apply_chat_template(messages, add_generation_prompt=True,
                                             **({"tools": tools} if tools else {}))]
      except UserError as e:
        raise BadRequest(str(e), "messages") from None
    prompt = body.get("prompt")
    many = isinstance(prompt, list) and prompt and not all(isinstance(t, int) for t in prompt)
    prompts = prompt if many else [prompt]
    out = []
    for p in prompts:
      if isinstance(p, str) and p:
        out.append(self.tok.encode(p))
      elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        out.append(list(p))
      else:
        raise BadRequest("prompt must be a non-empty string, a list of token ids, or a list of those", "prompt")
    return out

  def reply(self, kind: str, body: dict, results: list[tuple], prompts: list[list[int]]) -> dict:
    """The whole reply once every job is done: results [(Output, scores or None)] by choice; with
    `echo`, a completion's text, tokens and log-probabilities begin with the prompt's (its first token's None)."""
    choices, stops = [], _stops(self.tok, body.get("stop"))
    wants_logprobs = _wants_logprobs(kind, body)
    echo, per_prompt = bool(body.get("echo")), len(results) // len(prompts)
    tools, piece = kind == "chat" and self._tools(body), self._piece
    for k, (out, scores) in enumerate(results):
      ids, text, reason = out.ids, text_of(self.tok, out.ids, stops), out.reason
      prompt = prompts[k // per_prompt] if echo else []
      logprobs = self._logprobs(kind, Piece(out.ids, out.logprobs, out.top)) if wants_logprobs else None
      if kind == "chat":
        content, calls = tool_calls.parse(text) if tools else (text, [])
        reason = "tool_calls" if calls else reason
        choice = {"message": {"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})},
                  "logprobs": logprobs}
      else:  # a scored prompt's log-probabilities (echo with logprobs), then the generated ones
        choice = {"text": self.tok.decode(prompt, skip_special_tokens=True) + text, "logprobs": {
          "tokens": [piece(t) for t in prompt + ids], "token_logprobs": scores.logprobs[:len(prompt)] + out.logprobs,
          "top_logprobs": _top(scores, prompt + ids, piece)} if scores else logprobs}
      choices.append({"index": k, "finish_reason": reason, **choice})
    return self._head(kind, chunk=False) | {"choices": choices, "usage": _usage(prompts, results)}

  def _piece(self, token: int) -> str:
    return self.tok.decode([token], skip_special_tokens=True)

  def _logprobs(self, kind: str, new: Piece) -> dict:
    """OpenAI's logprobs object for generated ids: chat's {"content": [...]}, completions' {"tokens", ...}."""
    tops = new.top or [[]] * len(new.ids)
    if kind == "chat":
      return {"content": [{"token": self._piece(t), "logprob": lp, "bytes": None, "top_logprobs": [
        {"token": self._piece(a), "logprob": alp, "bytes": None} for a, alp in top]}
        for t, lp, top in zip(new.ids, new.logprobs, tops)]}
    return {"tokens": [self._piece(t) for t in new.ids], "token_logprobs": new.logprobs,
            "top_logprobs": [{self._piece(a): alp for a, alp in top} for top in new.top] or None}

  def _head(self, kind: str, chunk: bool) -> dict:
    obj = ("chat.completion.chunk" if chunk else "chat.completion") if kind == "chat" else "text_completion"
    return {"id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", "object": obj,
            "created": int(time.time()), "model": self.name}

  def chunks(self, kind: str, body: dict, events: queue.Queue, total: int, prompts: list[list[int]]):
    """The streamed reply: a chunk per piece of text of each choice, its finish reason, [usage], then [DONE].
    With logprobs, a chunk carries those of the ids since the last chunk (ids whose text is held back, a stop
    string's first characters or part of a character, wait for the next; the finish chunk has the rest). With
    tools, text streams as content up to where a tool call could begin; then each call as OpenAI streams them: its
    id, type and name once its name is out, then its arguments' text in pieces as they come (`tool_calls.begun`),
    the rest (and calls not of the usual form, whole) when the reply ends. A reply whose calls turn out not to be
    calls (a block that is no JSON object) ends with its text from the first block on as content."""
    head = self._head(kind, chunk=True)
    results: list[tuple | None] = [None] * total
    wants, tools = _wants_logprobs(kind, body), kind == "chat" and self._tools(body)
    unsent = [Piece([], [], []) for _ in range(total)]  # per choice: ids whose log-probabilities are not out yet
    texts, sent = [""] * total, [0] * total  # each choice's text so far, and how much of it went out
    sent_arguments: list[list[int]] = [[] for _ in range(total)]  # per choice, per call begun: its arguments sent

    def content(k: int, final: bool) -> str:  # what choice k's text may send now (with tools: not a call's start)
      upto = tool_calls.streamable(texts[k]) if tools and not final else len(texts[k])  # never less than sent[k]
      new, sent[k] = texts[k][sent[k]:upto], upto
      return new

    def call_deltas(k: int) -> list[dict]:  # what of choice k's calls has not gone out yet
      deltas = []
      for j, (name, arguments) in enumerate(tool_calls.begun(texts[k])):
        if j == len(sent_arguments[k]):
          deltas.append({"index": j, "id": tool_calls.call_id(), "type": "function",
                         "function": {"name": name, "arguments": arguments}})
          sent_arguments[k].append(len(arguments))
        elif len(arguments) > sent_arguments[k][j]:  # (each a prefix of the final text: it grows)
          deltas.append({"index": j, "function": {"arguments": arguments[sent_arguments[k][j]:]}})
          sent_arguments[k][j] = len(arguments)
      return deltas

    def calls_chunk(k: int, deltas: list[dict]) -> dict:
      return head | {"choices": [{"index": k, "delta": {"tool_calls": deltas}, "finish_reason": None,
                                  "logprobs": None}]}

    def logprobs(k: int) -> dict | None:
      if not wants or not unsent[k].ids:
        return None
      out, unsent[k] = self._logprobs(kind, unsent[k]), Piece([], [], [])
      return out

    if kind == "chat":
      for k in range(total):
        yield head | {"choices": [{"index": k, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                                   "logprobs": None}]}
    while any(r is None for r in results):
      event = events.get()
      k = event[1]
      if event[0] == "error":
        raise RuntimeError(event[2])
      if event[0] == "text":
        if event[3] is not None:
          unsent[k] = Piece(*(a + b for a, b in zip(unsent[k], event[3])))
        texts[k] += event[2]
        new = content(k, final=False)
        if new:
          part = {"delta": {"content": new}} if kind == "chat" else {"text": new}
          yield head | {"choices": [{"index": k, **part, "finish_reason": None, "logprobs": logprobs(k)}]}
        deltas = call_deltas(k) if tools else []
        if deltas:
          yield calls_chunk(k, deltas)
        continue
      results[k], reason = event[2:], event[2].reason
      calls = tool_calls.parse(texts[k])[1] if tools else []
      if calls:
        reason = "tool_calls"
        deltas = call_deltas(k)  # the begun calls' rest, then the others whole
        deltas += [{"index": j, **call} for j, call in enumerate(calls) if j >= len(sent_arguments[k])]
        if deltas:
          yield calls_chunk(k, deltas)
      rest = content(k, final=True) if tools and not calls else ""  # held back, and no call after all: content
      if rest:
        yield head | {"choices": [{"index": k, "delta": {"content": rest}, "finish_reason": None, "logprobs": None}]}
      part = {"delta": {}} if kind == "chat" else {"text": ""}
      yield head | {"choices": [{"index": k, **part, "finish_reason": reason, "logprobs": logprobs(k)}]}
    if (body.get("stream_options") or {}).get("include_usage"):
      yield head | {"choices": [], "usage": _usage(prompts, results)}


def _template_form(message, where: str) -> dict:
  """An OpenAI chat message as chat templates read it: content given as parts, its text parts joined by newlines
  (as vLLM does); an assistant's tool calls with their arguments as objects (OpenAI sends JSON text) and its
  content "" when it has none (as vLLM passes them). A message without a role, or with parts that are not text,
  is refused (BadRequest naming it, `where`)."""
  if not isinstance(message, dict) or not isinstance(message.get("role"), str):
    raise BadRequest(f"{where} must be an object with a string role, got {message!r:.200}", "messages")
  content = message.get("content")
  if isinstance(content, list):
    bad = [part for part in content
           if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str))]
    if bad:
      raise BadRequest(f'{where}.content: parts must be {{"type": "text", "text": ...}} (the model reads text), got '
                       f"{bad[0]!r:.100}", "messages")
    message = message | {"content": "\n".join(part["text"] for part in content)}
  elif content is not None and not isinstance(content, str):
    raise BadRequest(f"{where}.content must be a string or a list of text parts, got {content!r:.100}", "messages")
  if not isinstance(message.get("tool_calls"), list):
    return message
  calls = []
  for call in message["tool_calls"]:
    function = call.get("function") if isinstance(call, dict) else None
    if isinstance(function, dict) and isinstance(function.get("arguments"), str):
      try:
        call = call | {"function": function | {"arguments": json.loads(function["arguments"])}}
      except json.JSONDecodeError:
        pass  # left as text, as given
    calls.append(call)
  return message | {"content": message.get("content") or "", "tool_calls": calls}


def _top(scores, ids: list[int], piece) -> list[dict | None]:
  """A scored prompt's top_logprobs: at each token after the first, {the token: its log-probability, the greedy
  choice there: its} (one entry when they are the same: lm-eval's is_greedy compares the token's to the largest);
  past the prompt, the greedy choice alone."""
  top: list[dict | None] = [None]
  for t in range(1, len(ids)):
    given = {piece(ids[t]): scores.logprobs[t]} if t < len(scores.logprobs) - 1 else {}
    top.append(given | {piece(scores.best[t]): scores.best_logprobs[t]})
  return top


def _wants_logprobs(kind: str, body: dict) -> bool:
  return bool(body.get("logprobs")) if kind == "chat" else body.get("logprobs") is not None


def _usage(prompts: list[list[int]], results: list[tuple]) -> dict:
  """OpenAI's usage, each prompt counted once (not once per sample), its cached tokens those of its samples' that
  ran the most (the keys and values of earlier requests' prompts and replies, which rows keep until taken)."""
  prompt = sum(map(len, prompts))
  completion = sum(len(out.ids) for out, _ in results)
  per_prompt = len(results) // len(prompts)
  cached = sum(min(out.cached for out, _ in results[k:k + per_prompt]) for k in range(0, len(results), per_prompt))
  return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
          "prompt_tokens_details": {"cached_tokens": cached}}


def _number(body: dict, key: str, kind: type) -> int | float:
  try:
    return json_number(body[key], kind is int, key)
  except UserError as e:
    raise BadRequest(str(e), key) from None


def _stops(tok: Tokenizer, stop) -> StopStrings | None:
  stops = [stop] if isinstance(stop, str) else stop
  if stops is None or stops == []:
    return None
  if not isinstance(stops, list):
    raise BadRequest(f"stop must be a string or a list of strings, got {stop!r}", "stop")
  try:
    return StopStrings(tok, stops, "stop")
  except UserError as e:
    raise BadRequest(str(e), "stop") from None


class Handler(BaseHTTPRequestHandler):
  protocol_version = "HTTP/1.1"
  timeout = READ_TIMEOUT_S  # on the socket: a client silent this long (mid-request, or idle between) is let go
  api: Api  # set by `make_server`
  api_key: str | None = None  # set by `make_server`: what every request but /health and /metrics must bear
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
      return self._json(403, _error(f"origin {self.headers.get('Origin')!r} is not allowed (--allowed-origins)",
                                    "permission_error"))
    self.send_response(204)
    self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
    self.send_header("Access-Control-Allow-Headers",
                     self.headers.get("Access-Control-Request-Headers", "Authorization, Content-Type"))
    self.send_header("Access-Control-Max-Age", "600")
    self.send_header("Content-Length", "0")
    self.end_headers()

  def _not_allowed(self) -> None:
    """405 naming the methods the server takes (the request's body, if any, unread: the connection closes)."""
    self.close_connection = True
    allowed = "GET, POST, OPTIONS" if self.origins else "GET, POST"
    self._json(405, _error(f"method {self.command} is not allowed ({allowed})", "method_not_allowed"),
               {"Allow": allowed})

  do_PUT = do_DELETE = do_PATCH = do_HEAD = do_CONNECT = do_TRACE = _not_allowed

  def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
    """The standard library's replies to requests it cannot parse (a bad request line, headers too long, an unknown
    method), as JSON errors; the connection closes."""
    self.close_connection = True
    message = message or self.responses.get(code, ("error",))[0]
    self._json(code, _error(message, "invalid_request_error" if code < 500 else "server_error"))

  def _refused(self) -> bool:
    """Answers 401 to a request without `Authorization: Bearer <api_key>` (when the server has a key)."""
    if self.api_key is None or self.route in ("/health", "/metrics"):
      return False
    given = self.headers.get("Authorization", "")
    if hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
      return False
    self.close_connection = True  # (its body unread)
    self._json(401, _error("missing or wrong API key: send 'Authorization: Bearer <key>'", "authentication_error"))
    return True

  @property
  def route(self) -> str:
    """The request's path without its query string (which no route reads)."""
    return urllib.parse.urlsplit(self.path).path

  def log_message(self, format: str, *args) -> None:  # noqa: A002  (one line per request on stderr)
    sys.stderr.write(f"{self.address_string()} {format % args}\n")

  def do_GET(self) -> None:  # noqa: N802
    if self.headers.get("Content-Length", "0") != "0" or self.headers.get("Transfer-Encoding"):
      self.close_connection = True  # (a body no GET reads: what follows it is no request's start)
    if self._refused():
      return
    if self.route == "/health":  # (503 tells a load balancer to send no more requests here)
      return self._json(503, {"status": "draining"}) if self.server.draining else self._json(200, {"status": "ok"})
    if self.route == "/metrics":
      return self._send(200, *self.api.engine.metrics.exposition())
    if self.route == "/v1/models":
      return self._json(200, {"object": "list", "data": [{"id": self.api.name, "object": "model",
                                                          "owned_by": "qwen-moe-jax", "created": 0,
                                                          "max_model_len": self.api.slots}]})  # (vLLM's too)
    self._json(404, _error(f"no such path: {self.path}", "not_found_error"))

  def do_POST(self) -> None:  # noqa: N802
    kind = {"/v1/completions": "completions", "/v1/chat/completions": "chat", "/tokenize": "tokenize",
            "/detokenize": "detokenize"}.get(self.route)
    if self._refused():
      return
    if kind is None:
      self.close_connection = True  # (its body unread)
      return self._json(404, _error(f"no such path: {self.path}", "not_found_error"))
    if not self.server.admit():
      self.close_connection = True  # (its body unread)
      return self._json(503, _error("the server is shutting down", "service_unavailable"))
    try:
      self._post(kind)
    finally:
      self.server.leave()

  def _post(self, kind: str) -> None:
    try:
      body = self._body()
      if kind in ("tokenize", "detokenize"):
        return self._json(200, getattr(self.api, kind)(body))
      events: queue.Queue = queue.Queue()
      jobs, prompts = self.api.jobs(kind, body, events)
    except BadRequest as e:
      return self._json(e.status, _error(str(e), param=e.param))
    except Exception as e:  # noqa: BLE001  (a bug: the client hears of it, the server goes on)
      print(f"error: {self.path}: {type(e).__name__}: {e}", file=sys.stderr)
      return self._json(500, _error(f"{type(e).__name__}: {e}", "server_error"))
    self.api.engine.submit(jobs)
    if body.get("stream"):
      return self._stream(kind, body, events, jobs, prompts)
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
        return self._json(500, _error(event[2], "server_error"))
      if event[0] == "done":
        results[event[1]] = event[2:]
    self._json(200, self.api.reply(kind, body, results, prompts))

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

  def _stream(self, kind: str, body: dict, events: queue.Queue, jobs: list[Job], prompts) -> None:
    self.send_response(200)
    self.send_header("Content-Type", "text/event-stream")
    self.send_header("Cache-Control", "no-cache")
    self.send_header("Connection", "close")
    self.end_headers()
    self.close_connection = True
    try:
      try:
        for chunk in self.api.chunks(kind, body, events, len(jobs), prompts):
          self._event(json.dumps(chunk, ensure_ascii=False))
      except RuntimeError as e:  # the engine failed this call
        self._event(json.dumps(_error(str(e), "server_error")))
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

  def _event(self, data: str) -> None:
    self.wfile.write(f"data: {data}\n\n".encode())
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


def prepare_json_object(grammars: Grammars) -> None:
  """Builds response_format json_object's grammar (any JSON object: seconds) on a thread of its own, or reads it
  from the store, so that its first request does not wait for it; nothing for a tokenizer without structured
  output."""
  def prepare() -> None:
    with contextlib.suppress(UserError):
      grammars.json_schema(JSON_OBJECT, "response_format json_object")

  if grammars.tok is not None:
    threading.Thread(target=prepare, daemon=True, name="json_object grammar").start()


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


def _error(message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict:
  return {"error": {"message": message, "type": kind, "param": param, "code": None}}


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
                origins: frozenset[str] = frozenset()) -> Server:
  """The HTTP server (not yet serving: call serve_forever), its engine thread started and warmed up; with
  `api_key`, requests but /health and /metrics must bear it (`Authorization: Bearer <api_key>`, as OpenAI's clients
  send their api_key); `grammars` builds the requests' grammars (default: Grammars(tok), the default limits);
  web pages from `origins` ("*": any) may call it (CORS). With several processes, this is process 0's; the others
  `follow`."""
  link = Link() if jax.process_count() > 1 else None
  engine = Engine(generator, rows, slots, stop_ids, Metrics(name), link)
  try:
    engine.warm_up(sampling)
    api = Api(engine, tok, name, sampling, seed, slots, grammars)
    server = Server((host, port), type("BoundHandler", (Handler,), {"api": api, "api_key": api_key,
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


def follow(generator: Generator, tok: Tokenizer, *, name: str, rows: int, slots: int, stop_ids: list[int],
           grammars: Grammars | None = None) -> None:
  """Another process than the first of a multi-process server: runs the engine as process 0's tells it (its
  `make_server` arguments), until that stops. SIGTERM and SIGINT here ask process 0 to stop the server (this process
  cannot leave alone: every generate call spans all processes)."""
  link = Link()
  for signum in (signal.SIGTERM, signal.SIGINT):  # (SIGTERM's default here is jax's preemption notice: it would
    signal.signal(signum, lambda *_: link.ask_to_stop())  # go on serving)
  Engine(generator, rows, slots, stop_ids, Metrics(name), link, tok, grammars).follow()
