"""OpenAI's tool calling in the Hermes format that Qwen's chat templates write (Qwen2.5 on; a template given
`tools` lists them in the system turn and asks for `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`
blocks): the tools a request gives, checked; the regex that forces a call (`tool_choice` "required" or a named
function: structured output over the function's parameters schema); a reply's text split into its content and
its calls; how much of a streamed reply may go out as content before a call could begin, and what of its calls
(their names, their arguments as they come) may go out.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from qwen_moe_jax.errors import UserError
from qwen_moe_jax.grammar import literal, schema_regex

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.DOTALL)
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*')  # a block's start


def check_tools(tools: Any) -> list[dict]:
  """OpenAI's `tools`: a list of {"type": "function", "function": {"name": ..., "parameters": {...}}}."""
  if not isinstance(tools, list) or not tools:
    raise UserError(f"tools must be a non-empty list of functions, got {tools!r}")
  for i, tool in enumerate(tools):
    function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
      raise UserError(f'tools[{i}] must be {{"type": "function", "function": {{"name": ..., "parameters": ...}}}}, '
                      f"got {tool!r}")
    if not isinstance(function.get("parameters", {}), dict):
      raise UserError(f"tools[{i}].function.parameters must be a JSON schema object")
  return tools


def forced(tools: list[dict], choice: Any, parallel: bool) -> str | None:
  """The regex a reply must match for `tool_choice` (None for "auto" and "none"): "required", one call or more
  (one when not `parallel`) of any tool; {"type": "function", "function": {"name": N}}, one call of N. Each call's
  arguments follow its function's parameters schema."""
  names = [t["function"]["name"] for t in tools]
  if choice in (None, "auto", "none"):
    return None
  if choice == "required":
    chosen = tools
  elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict) \
      and choice["function"].get("name") in names:
    chosen = [tools[names.index(choice["function"]["name"])]]
  else:
    raise UserError(f'tool_choice must be "none", "auto", "required" or {{"type": "function", "function": {{"name": '
                    f"one of {names}}}}}, got {choice!r}")
  calls = "|".join(f"({_call(t['function'])})" for t in chosen)
  return f"({calls})" if len(chosen) == 1 or not parallel else f"({calls})(\n({calls}))*"


def _call(function: dict) -> str:
  schema = function.get("parameters") or {"type": "object", "properties": {}}
  arguments = schema_regex(schema, f"tools: {function['name']}'s parameters")
  head = literal(OPEN + '\n{"name": ' + json.dumps(function["name"]) + ', "arguments": ')
  return head + f"({arguments})" + literal("}\n" + CLOSE)


def parse(text: str) -> tuple[str | None, list[dict]]:
  """A reply's (content, tool calls): the calls are its `<tool_call>` blocks, each a JSON object with a "name" and
  "arguments" (OpenAI's form: the arguments as JSON text, an id each); the content is the text before the first
  block (None when blank). A block that is not such an object leaves the whole text as content, no calls (as
  vLLM's hermes parser does)."""
  calls = []
  for block in _BLOCK.findall(text):
    try:
      call = json.loads(block)
    except json.JSONDecodeError:
      return text, []
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
      return text, []
    calls.append({"id": call_id(), "type": "function", "function": {
      "name": call["name"], "arguments": json.dumps(call.get("arguments", {}), ensure_ascii=False)}})
  if not calls:
    return text, []
  content = text[:text.index(OPEN)]
  return content if content.strip() else None, calls


def call_id() -> str:
  return f"call_{uuid.uuid4().hex[:24]}"


def begun(text: str) -> list[tuple[str, str]]:
  """The calls a streamed reply has begun, in order: (name, the leading text of its arguments that is surely
  theirs) for each `<tool_call>` block from when its `{"name": ..., "arguments": ` is out (a block not of that
  form, and those after it, come whole at the end). Arguments that are an object come as they are written, but for
  their last `}` and what follows it (it may close the call), until the object is whole: each text given is a
  prefix of the arguments' final text. Other arguments come once their block is closed."""
  calls: list[tuple[str, str]] = []
  at = text.find(OPEN)
  while at >= 0:
    end = text.find(CLOSE, at)
    block = text[at + len(OPEN):] if end < 0 else text[at + len(OPEN):end]
    head = _HEAD.match(block)
    try:
      name = json.loads(head[1]) if head else None
    except json.JSONDecodeError:
      name = None
    if name is None:
      break
    arguments = block[head.end():]
    try:
      whole = arguments[:json.JSONDecoder().raw_decode(arguments)[1]]
    except json.JSONDecodeError:
      whole = None
    if whole is not None and (whole.startswith("{") or end >= 0):
      calls.append((name, whole))
    elif arguments.startswith("{"):
      calls.append((name, arguments[:arguments.rfind("}")].rstrip() if "}" in arguments else arguments))
    else:
      calls.append((name, ""))
    at = text.find(OPEN, end) if end >= 0 else -1
  return calls


def streamable(text: str) -> int:
  """How many leading characters of a reply so far may stream as content: up to the first `<tool_call>`, and
  none of an end that could begin one."""
  if OPEN in text:
    return text.index(OPEN)
  return next((len(text) - k for k in range(min(len(OPEN) - 1, len(text)), 0, -1) if OPEN.startswith(text[-k:])),
              len(text))
