"""OpenAI's tool calling in the Hermes format that Qwen's chat templates write (Qwen2.5 on; a template given
`tools` lists them in the system turn and asks for `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`
blocks): the tools a request gives, checked; the regex that forces a call (`tool_choice` "required" or a named
function: structured output over the function's parameters schema); a reply's text split into its content and
its calls; and how much of a streamed reply may go out as content before a call could begin.
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
    calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {
      "name": call["name"], "arguments": json.dumps(call.get("arguments", {}), ensure_ascii=False)}})
  if not calls:
    return text, []
  content = text[:text.index(OPEN)]
  return content if content.strip() else None, calls


def streamable(text: str) -> int:
  """How many leading characters of a reply so far may stream as content: up to the first `<tool_call>`, and
  none of an end that could begin one."""
  if OPEN in text:
    return text.index(OPEN)
  return next((len(text) - k for k in range(min(len(OPEN) - 1, len(text)), 0, -1) if OPEN.startswith(text[-k:])),
              len(text))
