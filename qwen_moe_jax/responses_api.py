"""OpenAI's Responses API (POST /v1/responses: what OpenAI's newer clients and agent SDKs call) over the chat API:
a request becomes the chat request it means (`chat_request`: instructions and input items as messages, tools,
text.format as response_format, max_output_tokens), which openai_api.Api checks and runs (the same chat template,
sampling, tools and structured output), and the chat reply becomes the Response object (`response`), or its
streamed chunks Responses' typed events (`events`). A response is stored unless the request says `store: false`
(`Stored`: the most recent, up to STORED_CHARS of text, in memory; GET /v1/responses/{id} reads one, DELETE drops
it), so that a later request's `previous_response_id` continues it (its input items and output before the new
input; not its instructions, as OpenAI's); or a conversation sends its earlier turns as input items (messages,
function_call and function_call_output items). With `truncation: "auto"` a conversation too long for the server's
--max-model-len loses its oldest turns (`truncated`); `include: ["message.output_text.logprobs"]` (or
`top_logprobs`) gives the message's tokens' log-probabilities, as chat's `logprobs` does.
"""

from __future__ import annotations

import collections
import itertools
import json
import queue
import threading
import time
import uuid
from typing import Callable, Iterable, Iterator

from qwen_moe_jax.openai_api import Api, BadRequest
from qwen_moe_jax.sampling import SETTINGS
from qwen_moe_jax.serving_engine import Job

TEXT_PARTS = ("input_text", "output_text", "text")  # content parts the model reads
SAMPLING = tuple(k for k in SETTINGS if k != "top_logprobs")  # settings a request may give (by vLLM's names too)
ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
CHAT_NAMES = {"max_completion_tokens": "max_output_tokens", "response_format": "text.format", "messages": "input"}
CHAT_PARAMS = CHAT_NAMES | {"response_format": "text"}  # the chat API's fields -> the Responses fields they came from
LOGPROBS = "message.output_text.logprobs"  # the `include` value that asks for them
STORED_CHARS = 64 << 20  # the most text `Stored` keeps (responses and conversations as JSON; the least recently used
# go)


class Stored:
  """Stored responses, by id: each the Response object and its conversation (input and output messages, without
  instructions), for GET /v1/responses/{id} and a later request's previous_response_id; DELETE drops one."""

  def __init__(self, max_chars: int = STORED_CHARS):
    self.max_chars, self.chars, self.lock = max_chars, 0, threading.Lock()
    self.kept: collections.OrderedDict[str, tuple[dict, list[dict], int]] = collections.OrderedDict()  # (the
    # Response, its conversation, their size in characters), least recently used first

  def _get(self, response_id, param: str | None) -> tuple[dict, list[dict], int]:
    if response_id not in self.kept:
      where = f"{param}: " if param else ""
      raise BadRequest(f"{where}no stored response {response_id!r:.100} (responses made with store false are not "
                       f"kept, nor older ones past the last {self.max_chars >> 20} MB of them; a server restart "
                       "forgets them)", param, 404)
    self.kept.move_to_end(response_id)
    return self.kept[response_id]

  def conversation(self, response_id) -> list[dict]:
    """The messages that continue response `response_id` (previous_response_id); BadRequest 404 if not kept."""
    with self.lock:
      return self._get(response_id, "previous_response_id")[1]

  def response(self, response_id: str) -> dict:
    with self.lock:
      return self._get(response_id, None)[0]

  def delete(self, response_id: str) -> dict:
    with self.lock:
      self.chars -= self._get(response_id, None)[2]
      del self.kept[response_id]
    return {"id": response_id, "object": "response", "deleted": True}

  def put(self, body: dict, chat: dict, response: dict) -> None:
    """Keeps `response` and its conversation (the chat request `chat` it ran as, its output) unless `body` said
    store false."""
    if body.get("store") is False:
      return
    asked = chat["messages"][1:] if body.get("instructions") else chat["messages"]
    messages = asked + _messages(response["output"], "output")
    size = len(json.dumps([response, messages], ensure_ascii=False))
    with self.lock:
      self.kept[response["id"]], self.chars = (response, messages, size), self.chars + size
      while self.chars > self.max_chars and len(self.kept) > 1:  # (the newest stays)
        self.chars -= self.kept.popitem(last=False)[1][2]


def jobs(api: Api, kind: str, body, events: queue.Queue, stored: Stored) -> tuple[dict, list[Job], list[list[int]]]:
  """A request to route `kind` (completions, chat or responses) as (the request it runs as, its jobs, its prompts:
  Api.jobs): a Responses request runs as the chat request it means (`chat_request`, `truncated` under truncation
  auto); BadRequest naming the request's own fields."""
  if kind != "responses":
    return body, *api.jobs(kind, body, events)
  asked = chat_request(body, stored)
  try:
    if body.get("truncation") == "auto":
      asked = truncated(asked, api.fits)
    return asked, *api.jobs("chat", asked, events)
  except BadRequest as e:
    raise refused(e) from None


def reply(api: Api, kind: str, body: dict, asked: dict, results: list[tuple], prompts: list[list[int]]) -> dict:
  """The whole reply to a request of `kind` that `jobs` made (Api.reply; a Responses request's as its Response)."""
  if kind != "responses":
    return api.reply(kind, asked, results, prompts)
  return response(api.reply("chat", asked, results, prompts), body)


def chat_request(body, stored: Stored) -> dict:
  """The chat completions request a Responses request means (continuing a `stored` conversation when it gives
  previous_response_id); BadRequest naming its field when it asks for what this server does not do (background
  runs, conversation objects, non-text input, tools other than functions), or for a response not stored."""
  if not isinstance(body, dict):
    raise BadRequest("the request body must be a JSON object")
  for key, why in (("background", "background responses are not supported"),
                   ("conversation", "conversation objects are not supported: give previous_response_id, or send the "
                    "turns as input items")):
    if body.get(key) not in (None, False):
      raise BadRequest(f"{key}: {why}", key)
  for key in ("instructions", "previous_response_id"):
    if body.get(key) is not None and not isinstance(body[key], str):
      raise BadRequest(f"{key} must be a string, got {body[key]!r:.100}", key)
  if body.get("store") is not None and not isinstance(body["store"], bool):
    raise BadRequest(f"store must be true or false, got {body['store']!r:.100}", "store")
  if body.get("truncation") not in (None, "auto", "disabled"):
    raise BadRequest(f'truncation must be "auto" or "disabled", got {body["truncation"]!r:.100}', "truncation")
  include = body.get("include") or []  # (other values than LOGPROBS name output this server never makes: reasoning,
  if not isinstance(include, list) or not all(isinstance(x, str) for x in include):  # built-in tools' results)
    raise BadRequest(f"include must be a list of strings, got {include!r:.100}", "include")
  earlier = stored.conversation(body["previous_response_id"]) if body.get("previous_response_id") else []
  instructions = body.get("instructions")
  messages = ([{"role": "system", "content": instructions}] if instructions else []) + earlier + _messages(
    body.get("input"), "input")
  chat = {k: body[k] for k in (*SAMPLING, "model", "seed", "parallel_tool_calls", "stream") if body.get(k) is not None}
  chat["messages"] = messages
  if LOGPROBS in include or body.get("top_logprobs"):
    chat["logprobs"] = True
  if body.get("top_logprobs") is not None:
    chat["top_logprobs"] = body["top_logprobs"]
  if body.get("stream"):
    chat["stream_options"] = {"include_usage": True}  # (the usage ends the chunks: the final event has it)
  if body.get("max_output_tokens") is not None:
    chat["max_completion_tokens"] = body["max_output_tokens"]
  if body.get("tools") is not None:
    chat["tools"] = _tools(body["tools"])
  if body.get("tool_choice") is not None:
    choice = body["tool_choice"]
    chat["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}} \
      if isinstance(choice, dict) and choice.get("type") == "function" else choice
  text = body.get("text")
  fmt = text.get("format") if isinstance(text, dict) else text
  if fmt is not None:
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema") or (
        fmt["type"] == "json_schema" and not isinstance(fmt.get("schema"), dict)):
      raise BadRequest('text.format must be {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", '
                       f'"name": ..., "schema": {{...}}}}, got {fmt!r:.200}', "text")
    chat["response_format"] = {"type": "json_schema", "json_schema": {"schema": fmt["schema"]}} \
      if fmt["type"] == "json_schema" else {"type": fmt["type"]}
  return chat


def truncated(chat: dict, fits: Callable[[dict], bool]) -> dict:
  """Chat request `chat` less the fewest of its oldest turns that make it `fits` (truncation "auto"): a leading
  system message (the instructions) stays, and the last message; tool messages left leading go with their call.
  Unchanged if it fits, or if even its last message alone does not (the chat API then refuses it)."""
  messages = chat["messages"]
  head = int(messages[0]["role"] == "system")

  def dropping(k: int) -> dict:  # `chat` less the k messages after the head (and tool messages that would lead)
    rest = messages[head + k:]
    while len(rest) > 1 and rest[0]["role"] == "tool":
      rest = rest[1:]
    return chat | {"messages": messages[:head] + rest}

  most = len(messages) - head - 1  # (the last message stays)
  if fits(chat) or most < 1 or not fits(dropping(most)):
    return chat
  low, high = 1, most  # the fewest that fit lie in [low, high]: dropping more leaves fewer tokens
  while low < high:
    mid = (low + high) // 2
    low, high = (low, mid) if fits(dropping(mid)) else (mid + 1, high)
  return dropping(low)


def refused(e: BadRequest) -> BadRequest:
  """A chat-level refusal of a Responses request, naming the Responses field (max_output_tokens, not
  max_completion_tokens)."""
  message = str(e)
  for chat_name, name in CHAT_NAMES.items():
    message = message.replace(chat_name, name)
  return BadRequest(message, CHAT_PARAMS.get(e.param, e.param), e.status)


def _messages(given, where: str) -> list[dict]:
  """Responses' input (a string, or a list of items; or a response's output items) as chat messages: a message
  item (its text parts joined), a function_call item as a tool call of the assistant's message before it (or of
  a message of its own), a function_call_output item as the tool's message."""
  if isinstance(given, str) and given:
    return [{"role": "user", "content": given}]
  if not isinstance(given, list) or (not given and where == "input"):
    raise BadRequest("input must be a non-empty string or a non-empty list of input items", "input")
  messages: list[dict] = []
  for i, item in enumerate(given):
    kind = item.get("type", "message") if isinstance(item, dict) else None
    if kind == "message" and ROLES.get(item.get("role")):
      messages.append({"role": ROLES[item["role"]], "content": _text(item.get("content"), f"{where}[{i}].content")})
    elif kind == "function_call" and all(isinstance(item.get(k), str) for k in ("call_id", "name", "arguments")):
      call = {"id": item["call_id"], "type": "function", "function": {"name": item["name"],
                                                                       "arguments": item["arguments"]}}
      if messages and messages[-1]["role"] == "assistant":  # (its text, or its calls before this one)
        messages[-1].setdefault("tool_calls", []).append(call)
      else:
        messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
    elif kind == "function_call_output" and isinstance(item.get("call_id"), str):
      messages.append({"role": "tool", "tool_call_id": item["call_id"],
                       "content": _text(item.get("output"), f"{where}[{i}].output")})
    elif kind == "reasoning":  # (a reasoning model's summary, sent back: Qwen's MoE models have none to read)
      continue
    else:
      raise BadRequest(f"{where}[{i}] must be a message (role user, assistant, system or developer), a function_call "
                       f"(call_id, name, arguments) or a function_call_output (call_id, output), got {item!r:.200}",
                       "input")
  return messages


def _text(content, where: str) -> str:
  """A message's content: a string, or text parts joined by newlines (the model reads text)."""
  if isinstance(content, str):
    return content
  if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") in TEXT_PARTS and
                                       isinstance(p.get("text"), str) for p in content):
    return "\n".join(p["text"] for p in content)
  raise BadRequest(f'{where} must be a string or a list of text parts ({{"type": "input_text", "text": ...}}: the '
                   f"model reads text), got {content!r:.200}", "input")


def _tools(tools) -> list[dict]:
  """Responses' function tools ({"type": "function", "name", "description", "parameters"}) in chat's form."""
  if not isinstance(tools, list):
    raise BadRequest(f"tools must be a list, got {tools!r:.100}", "tools")
  out = []
  for i, tool in enumerate(tools):
    if not isinstance(tool, dict) or tool.get("type") != "function":
      raise BadRequest(f"tools[{i}]: only function tools are supported, got {tool!r:.100}", "tools")
    out.append({"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters")
                                                  if k in tool}})
  return out


def response(chat: dict, body: dict) -> dict:
  """The Response object of a chat reply `chat` (one choice) to Responses request `body`: a message item with the
  reply's text (none when it is only tool calls), a function_call item per call; "incomplete" when it ran out of
  max_output_tokens. With logprobs asked, the message's text part has its tokens' (chat's `logprobs.content`)."""
  [choice] = chat["choices"]
  message, output = choice["message"], []
  if message.get("content") or not message.get("tool_calls"):
    output.append(_message_item(_id("msg"), message.get("content") or "", _status(choice["finish_reason"]),
                                (choice.get("logprobs") or {}).get("content") or []))
  for call in message.get("tool_calls") or []:
    output.append(_call_item(_id("fc"), call["id"], call["function"]["name"], call["function"]["arguments"],
                             "completed"))
  return _shell(body, _status(choice["finish_reason"]), output, chat["usage"], chat["model"])


def events(chunks: Iterable[dict], body: dict, model: str) -> Iterator[dict]:
  """Responses' streamed events from chat's streamed chunks (one choice, usage last): response.created and
  in_progress; the message item as its text comes (output_item.added, content_part.added, output_text.delta, ...,
  their done events); each tool call as a function_call item whose arguments stream as
  function_call_arguments.delta; then response.completed (or incomplete) with the whole Response; an engine
  failure as an error event. Each event is a new object (a consumer may keep them). With logprobs asked, each text
  delta has its chunk's (those of ids whose text came before are the message's too; those while no text streams,
  after a tool call's start, have no message to go to)."""
  counter = itertools.count()
  start = _shell(body, "in_progress", [], None, model)  # (its id and created_at, the final Response's too)
  items: list[list] = []  # the output items so far: ["message", id, text, logprobs] or ["call", id, call_id, name,
  # arguments]
  text_open = False  # the last item is a message whose text still streams
  calls: dict[int, int] = {}  # chat's call index -> its item's place in `items`
  reason = None

  def event(kind: str, **fields) -> dict:
    return {"type": kind, "sequence_number": next(counter), **fields}

  def item(at: int, status: str) -> dict:  # (a message's text that ran out of tokens is "incomplete" once done)
    kind, item_id, *rest = items[at]
    if kind == "message":
      return _message_item(item_id, rest[0], _status(reason) if status == "completed" else status, list(rest[1]))
    return _call_item(item_id, *rest, status)

  def close_text() -> Iterator[dict]:
    nonlocal text_open
    if text_open:
      at, (_, item_id, text, logprobs) = len(items) - 1, items[-1]
      yield event("response.output_text.done", item_id=item_id, output_index=at, content_index=0, text=text,
                  logprobs=list(logprobs))
      yield event("response.content_part.done", item_id=item_id, output_index=at, content_index=0,
                  part=item(at, "completed")["content"][0])
      yield event("response.output_item.done", output_index=at, item=item(at, "completed"))
      text_open = False

  yield event("response.created", response=dict(start))
  yield event("response.in_progress", response=dict(start))
  try:
    for chunk in chunks:
      if not chunk["choices"]:  # usage: the last chunk
        for at in calls.values():
          yield event("response.function_call_arguments.done", item_id=items[at][1], output_index=at,
                      arguments=items[at][4])
          yield event("response.output_item.done", output_index=at, item=item(at, "completed"))
        final = _shell(body, _status(reason), [item(at, "completed") for at in range(len(items))], chunk["usage"],
                       model) | {"id": start["id"], "created_at": start["created_at"]}
        yield event(f"response.{final['status']}", response=final)
        return
      [choice] = chunk["choices"]
      delta, reason = choice["delta"], choice["finish_reason"] or reason
      logprobs = (choice.get("logprobs") or {}).get("content") or []
      if delta.get("content"):
        at = len(items) - 1 if text_open else len(items)
        if not text_open:
          items.append(["message", _id("msg"), "", []])
          text_open = True
          yield event("response.output_item.added", output_index=at, item=item(at, "in_progress") | {"content": []})
          yield event("response.content_part.added", item_id=items[at][1], output_index=at, content_index=0,
                      part=item(at, "in_progress")["content"][0])
        items[at][2] += delta["content"]
        items[at][3] += logprobs
        yield event("response.output_text.delta", item_id=items[at][1], output_index=at, content_index=0,
                    delta=delta["content"], logprobs=logprobs)
      elif text_open:  # (the finish chunk's: ids whose text was held back, or has none)
        items[-1][3] += logprobs
      for piece in delta.get("tool_calls") or []:
        yield from close_text()
        function = piece.get("function", {})
        if piece["index"] not in calls:
          calls[piece["index"]] = len(items)
          items.append(["call", _id("fc"), piece.get("id"), function.get("name"), ""])
          yield event("response.output_item.added", output_index=len(items) - 1, item=item(-1, "in_progress"))
        at = calls[piece["index"]]
        if function.get("arguments"):
          items[at][4] += function["arguments"]
          yield event("response.function_call_arguments.delta", item_id=items[at][1], output_index=at,
                      delta=function["arguments"])
      if choice["finish_reason"]:
        yield from close_text()
  except RuntimeError as e:  # the engine failed this call
    yield event("error", code="server_error", message=str(e), param=None)


def _status(finish_reason: str) -> str:
  return "incomplete" if finish_reason == "length" else "completed"


def _message_item(item_id: str, text: str, status: str, logprobs: list[dict]) -> dict:
  return {"type": "message", "id": item_id, "status": status, "role": "assistant",
          "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}]}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict:
  return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments,
          "status": status}


def _shell(body: dict, status: str, output: list[dict], usage: dict | None, model: str) -> dict:
  """A Response object: its output items and usage, and the request's settings echoed as OpenAI's are."""
  return {
    "id": _id("resp"), "object": "response", "created_at": int(time.time()), "status": status, "model": model,
    "output": output, "error": None,
    "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
    "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
    "temperature": body.get("temperature"), "top_p": body.get("top_p"), "top_logprobs": body.get("top_logprobs") or 0,
    "truncation": body.get("truncation") or "disabled", "tools": body.get("tools") or [],
    "tool_choice": body.get("tool_choice") or "auto", "parallel_tool_calls": body.get("parallel_tool_calls", True),
    "text": body.get("text") or {"format": {"type": "text"}}, "previous_response_id": body.get("previous_response_id"),
    "store": body.get("store") is not False,
    "metadata": body.get("metadata") or {},
    "usage": None if usage is None else {
      "input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
      "total_tokens": usage["total_tokens"],
      "input_tokens_details": {"cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]},
      "output_tokens_details": {"reasoning_tokens": 0}}}


def _id(prefix: str) -> str:
  return f"{prefix}_{uuid.uuid4().hex}"

