"""OpenAI's API (and vLLM's additions) over the serving engine: a request's parsed JSON -> checked jobs (`Api.jobs`;
BadRequest, naming the field, when refused) -> OpenAI's reply object, whole (`reply`) or as streamed chunks
(`chunks`); vLLM's /tokenize and /detokenize. No HTTP here (server.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import queue
import threading
import time
import uuid

from qwen_moe_jax import tool_calls
from qwen_moe_jax.automaton import Grammar
from qwen_moe_jax.decoding import checked_seed
from qwen_moe_jax.errors import UserError, json_number
from qwen_moe_jax.generate import Piece, Stream
from qwen_moe_jax.grammar import Grammars
from qwen_moe_jax.sampling import MAX_TOP_LOGPROBS, SETTINGS, Sampling, given_settings
from qwen_moe_jax.serving_engine import Engine, Job
from qwen_moe_jax.stop_strings import StopStrings, TextStream, text_of
from qwen_moe_jax.tokenizer import Tokenizer

JSON_OBJECT = {"type": "object"}  # the schema of response_format json_object (any JSON object)
FLAGS = ("stream", "echo", "ignore_eos", "parallel_tool_calls")  # fields that are true or false (and chat's logprobs)
ACCEPTED = {"suffix": ("",), "best_of": (1,), "functions": ([],)}  # the values of fields not implemented that we
# take
MAX_SAMPLES = 4096  # a request's prompts x n: each a job the engine queues (its ids, its events) until a row takes it
GUIDED = {"guided_regex": "regex", "guided_json": "json_schema", "guided_choice": "choice",  # vLLM's
          "response_format": "json_schema"}  # OpenAI's (see Api.grammar)


class BadRequest(Exception):
  """A request the server refuses (HTTP 400, or `status`), with OpenAI's error fields."""

  def __init__(self, message: str, param: str | None = None, status: int = 400):
    super().__init__(message)
    self.param, self.status = param, status


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict:
  """OpenAI's error reply."""
  return {"error": {"message": message, "type": kind, "param": param, "code": None}}


class Api:
  """Requests (parsed JSON) -> jobs for the engine -> OpenAI's reply objects."""

  def __init__(self, engine: Engine, tok: Tokenizer, name: str, sampling: Sampling, seed: int, slots: int,
               grammars: Grammars | None = None):
    self.engine, self.tok, self.name, self.sampling, self.slots = engine, tok, name, sampling, slots
    self.adapters = tuple(engine.adapters)  # the served LoRA adapters' names (a request's model picks one)
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
    adapter = self.adapter(body)
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
    if len(prompts) * n > MAX_SAMPLES:
      raise BadRequest(f"a request asks for at most {MAX_SAMPLES} samples (prompts x n), got {len(prompts)} x {n}: "
                       "send the prompts in several requests", "n" if n > 1 else "prompt")
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
    out, given = [], "messages" if kind == "chat" else "prompt"  # the field the prompts came from
    for p, ids in enumerate(prompts):
      room = self.slots - len(ids)
      if room < 1:
        raise BadRequest(f"the prompt has {len(ids)} tokens: it leaves no room in the server's "
                         f"--max-model-len of {self.slots}", given)
      limit = given_limit if given_limit is not None else (
        0 if score else min(16, room) if kind == "completions" else room)  # OpenAI's defaults
      if limit < least or limit > room:
        raise BadRequest(f"{limit_key} must be in [{least}, {room}] (--max-model-len {self.slots} minus the prompt's "
                         f"{len(ids)} tokens), got {limit}", limit_key)
      try:
        self.engine.generator.validate([ids], [max(limit, 1)], [sampling])
      except UserError as e:
        raise BadRequest(str(e), "logit_bias" if "logit_bias" in str(e) else given) from None
      held = dataclasses.replace(sampling, min_tokens=limit) if body.get("ignore_eos") else sampling  # vLLM's
      for j in range(n):
        with self.lock:
          stream = Stream(seed, j) if seed is not None else Stream(self.seed, next(self.counter))
        out.append(Job(ids, limit, held, stream, stops, p * n + j, events,
                       TextStream(self.tok, stops) if body.get("stream") else None, score=score, adapter=adapter))
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

  def adapter(self, body: dict) -> str | None:
    """The served LoRA adapter a request's `model` names, or None: the base model (its name, or no model; any name
    when no adapter is served, as OpenAI's clients send one); BadRequest 404 for another name."""
    model = body.get("model")
    if not self.adapters or model is None or model == self.name:
      return None
    if model not in self.adapters:
      raise BadRequest(f"model {model!r:.100} is not served (the base model {self.name!r}, or one of its LoRA "
                       f"adapters: {', '.join(map(repr, self.adapters))})", "model", 404)
    return model

  def fits(self, body: dict) -> bool:
    """Whether chat request `body`'s prompt leaves room in --max-model-len for its max_completion_tokens (or one)."""
    [ids] = self._prompts("chat", body)
    limit = body.get("max_completion_tokens")
    return len(ids) + (1 if limit is None else _number(body, "max_completion_tokens", int)) <= self.slots

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
    return self._head(kind, body, chunk=False) | {"choices": choices, "usage": _usage(prompts, results)}

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

  def _head(self, kind: str, body: dict, chunk: bool) -> dict:
    obj = ("chat.completion.chunk" if chunk else "chat.completion") if kind == "chat" else "text_completion"
    return {"id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", "object": obj,
            "created": int(time.time()), "model": self.adapter(body) or self.name}

  def chunks(self, kind: str, body: dict, events: queue.Queue, total: int, prompts: list[list[int]]):
    """The streamed reply: a chunk per piece of text of each choice, its finish reason, [usage], then [DONE].
    With logprobs, a chunk carries those of the ids since the last chunk (ids whose text is held back, a stop
    string's first characters or part of a character, wait for the next; the finish chunk has the rest). With
    tools, text streams as content up to where a tool call could begin; then each call as OpenAI streams them: its
    id, type and name once its name is out, then its arguments' text in pieces as they come (`tool_calls.begun`),
    the rest (and calls not of the usual form, whole) when the reply ends. A reply whose calls turn out not to be
    calls (a block that is no JSON object) ends with its text from the first block on as content."""
    head = self._head(kind, body, chunk=True)
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


def prepare_json_object(grammars: Grammars) -> None:
  """Builds response_format json_object's grammar (any JSON object: seconds) on a thread of its own, or reads it
  from the store, so that its first request does not wait for it; nothing for a tokenizer without structured
  output."""
  def prepare() -> None:
    with contextlib.suppress(UserError):
      grammars.json_schema(JSON_OBJECT, "response_format json_object")

  if grammars.tok is not None:
    threading.Thread(target=prepare, daemon=True, name="json_object grammar").start()
