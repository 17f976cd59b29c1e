"""Qwen2 tokenizer: byte-level BPE from tokenizer.json, with transformers-compatible chat templates.

Matches transformers' `AutoTokenizer` for Qwen2 folders: `encode`/`decode` are the `tokenizers` backend calls
transformers makes, and `apply_chat_template` renders the template in the same jinja sandbox, then encodes the
rendered text with `add_special_tokens=False` (so control tokens typed by the user become control tokens too,
as transformers does unless `sanitize_control_tokens=True`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.sandbox
import jinja2.utils
import tokenizers

from qwen_moe_jax.errors import UserError

# Qwen1.5 chat models' ChatML template, used when the folder has none.
CHATML_TEMPLATE = (
  "{% for message in messages %}"
  "{% if loop.first and messages[0]['role'] != 'system' %}"
  "{{ '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}"
  "{% endif %}"
  "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
  "{% endfor %}"
  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# transformers' SPECIAL_TOKENS_ATTRIBUTES: the named tokens it passes to chat templates.
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class _TemplateRaised(jinja2.exceptions.TemplateError):
  """Raised by the template's own `raise_exception(message)`."""


def _raise_exception(message: str):
  raise _TemplateRaised(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
  """transformers' tojson: plain json.dumps, no HTML escaping, non-ASCII kept."""
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _Dict:
  """`dict(...)` and `dict.fromkeys(...)` without handing the template the type itself (transformers' TemplateDict)."""

  def __call__(self, *args, **kwargs):
    return dict(*args, **kwargs)

  def fromkeys(self, *args, **kwargs):
    return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
  """`namespace()` refusing underscore-prefixed names (transformers' TemplateNamespace)."""

  def __init__(*args, **kwargs):  # same signature trick as jinja's Namespace, so `namespace(self=...)` works
    self, attrs = args[0], dict(*args[1:], **kwargs)
    for name in attrs:
      _Namespace._check(name)
    jinja2.utils.Namespace.__init__(self, attrs)

  def __setitem__(self, name, value):
    _Namespace._check(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)

  @staticmethod
  def _check(name):
    if isinstance(name, str) and name.startswith("_"):
      raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is unsafe")


class _Sandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
  """transformers' environment, except that touching an unsafe attribute fails at once instead of rendering ''."""

  def unsafe_undefined(self, obj: Any, attribute: str):
    raise jinja2.exceptions.SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} is unsafe")


_ENV = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
_ENV.filters["tojson"] = _tojson
_ENV.globals.update(raise_exception=_raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                    dict=_Dict(), namespace=_Namespace)


class Tokenizer:
  """encode / decode / apply_chat_template with the results of transformers' AutoTokenizer."""

  def __init__(self, backend: tokenizers.Tokenizer, special_tokens: dict[str, str], chat_template: str,
               template_source: str):
    self._backend = backend
    self.special_tokens = special_tokens  # transformers' special_tokens_map: {"eos_token": "<|im_end|>", ...}
    self.chat_template = chat_template
    self._source = template_source  # names the template in errors
    self._compiled: jinja2.Template | None = None
    self.special_ids = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
    eos = special_tokens.get("eos_token")
    self.eos_token_id = None if eos is None else self.token_to_id(eos)

  @property
  def vocab_size(self) -> int:
    """len(tokenizer) in transformers: the BPE vocabulary plus added tokens (the model's embedding may be larger)."""
    return self._backend.get_vocab_size(with_added_tokens=True)

  def token_to_id(self, token: str) -> int | None:
    return self._backend.token_to_id(token)

  def encode(self, text: str) -> list[int]:
    """transformers' `encode(text, add_special_tokens=False)`; Qwen2 adds no BOS either way."""
    return self._backend.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    """`encode` of each text, run by `tokenizers` on every core (TOKENIZERS_PARALLELISM=false: one)."""
    return [e.ids for e in self._backend.encode_batch_fast(texts, add_special_tokens=False)]

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
    """transformers' `decode` (Qwen2 does no clean-up of tokenization spaces). Accepts any iterable of ints."""
    return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
    return StreamDecoder(self, skip_special_tokens)

  def token_bytes(self) -> dict[bytes, list[int]]:
    """The ids by the bytes each spells (what a grammar matches text against), added tokens left out: a grammar
    never writes `<|im_end|>` as text. A UserError unless the tokenizer is byte-level (Qwen2's)."""
    added, out = set(self._backend.get_added_tokens_decoder()), {}
    for i in range(self.vocab_size):
      token = self._backend.id_to_token(i)
      if i in added or token is None:
        continue
      if any(c not in _BYTE_OF for c in token):
        raise UserError(f"structured output needs a byte-level BPE tokenizer (Qwen2's); token {i} ({token!r}) is "
                        "not spelled in byte-level characters")
      out.setdefault(bytes(_BYTE_OF[c] for c in token), []).append(i)
    return out

  def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                          tokenize: bool = True, **kwargs) -> list[int] | str:
    """transformers' `apply_chat_template(messages, add_generation_prompt=..., tokenize=..., **kwargs)`."""
    if not messages or not all(isinstance(m, dict) for m in messages):
      raise UserError("apply_chat_template: messages must be a non-empty list of dicts with 'role' and 'content'")
    # Like transformers: keys whose value is None are dropped; special tokens, then kwargs, are template variables.
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    variables = {"tools": None, "documents": None, **self.special_tokens, **kwargs}
    text = self._render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
    return self.encode(text) if tokenize else text

  def takes(self, variable: str) -> bool:
    """Whether the chat template reads `variable` (such as "tools"); False when it does not parse."""
    return variable in self._variables

  @functools.cached_property
  def _variables(self) -> frozenset[str]:
    """The variables the chat template reads (parsed once; none when it does not parse)."""
    try:
      return frozenset(jinja2.meta.find_undeclared_variables(_ENV.parse(self.chat_template)))
    except jinja2.exceptions.TemplateSyntaxError:
      return frozenset()

  def _render(self, **variables) -> str:
    # The template is untrusted code: whatever it raises is reported as its failure, never as ours.
    try:
      if self._compiled is None:
        self._compiled = _ENV.from_string(self.chat_template)
      return self._compiled.render(**variables)
    except _TemplateRaised as e:
      raise UserError(f"{self._source}: {e.message}") from None
    except jinja2.exceptions.SecurityError as e:
      raise UserError(f"{self._source}: refused by the sandbox: {e}") from None
    except jinja2.exceptions.TemplateSyntaxError as e:
      raise UserError(f"{self._source}: invalid jinja at line {e.lineno}: {e.message}") from None
    except Exception as e:  # noqa: BLE001
      raise UserError(f"{self._source}: failed to render: {type(e).__name__}: {e}") from None


def stop_ids(cfg, tok: Tokenizer | None, generation: dict | None = None, chat_end: bool = False) -> list[int]:
  """Token ids that end a generation: the config's EOS ids, generation_config.json's `eos_token_id` (an id or a
  list), the tokenizer's EOS token and, with chat_end, ChatML's end of turn (GRPO's completions end there even when
  the model's own EOS is `<|endoftext|>`)."""
  eos = (generation or {}).get("eos_token_id")
  ids = [*cfg.stop_ids(), *(eos if isinstance(eos, list) else [eos])]
  if tok is not None:
    ids += [tok.eos_token_id, tok.token_to_id("<|im_end|>") if chat_end else None]
  return sorted({i for i in ids if isinstance(i, int) and 0 <= i < cfg.vocab_size})


def _byte_alphabet() -> dict[str, int]:
  """GPT-2's byte-level alphabet, which spells each byte with a printable character: character -> byte."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  rest = [b for b in range(256) if b not in printable]
  return {chr(c): b for b, c in [*zip(printable, printable), *zip(rest, range(256, 256 + len(rest)))]}


_BYTE_OF = _byte_alphabet()


class StreamDecoder:
  """Incremental decoding: `push(ids)` returns only newly completed text; `flush()` returns the rest.

  Byte-level BPE tokens can end inside a multi-byte UTF-8 character, which decodes to U+FFFD; such text is held
  back until later ids complete it. Pending ids always start on a character boundary, so the pieces join up to
  exactly `decode(all_ids)`.
  """

  def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
    self._tokenizer = tokenizer
    self._skip = skip_special_tokens
    self._pending: list[int] = []

  def push(self, ids: Iterable[int]) -> str:
    self._pending.extend(int(i) for i in ids)
    text = self._tokenizer.decode(self._pending, self._skip)
    if text.endswith("\ufffd"):
      return ""
    self._pending = []
    return text

  def flush(self) -> str:
    text = self._tokenizer.decode(self._pending, self._skip)
    self._pending = []
    return text


def _read_text(path: Path) -> str:
  try:
    return path.read_text(encoding="utf-8")
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f"{path}: not readable as UTF-8 text ({e})") from None


def _read_json(path: Path) -> Any:
  try:
    return json.loads(_read_text(path))
  except json.JSONDecodeError as e:
    raise UserError(f"{path}: invalid JSON ({e})") from None


def _token_text(value: Any) -> str | None:
  """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict with "content"."""
  return value.get("content") if isinstance(value, dict) else value


def _chat_template(folder: Path, config: dict, config_path: Path) -> tuple[str, str]:
  """(template, where it came from): chat_template.jinja first, as transformers, then tokenizer_config.json."""
  jinja_path = folder / "chat_template.jinja"
  if jinja_path.is_file():
    return _read_text(jinja_path), str(jinja_path)
  template = config.get("chat_template")
  if template is None:
    return CHATML_TEMPLATE, "built-in ChatML chat template"
  if isinstance(template, list):  # older multi-template format: [{"name": ..., "template": ...}]
    template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}.get("default")
  if not isinstance(template, str):
    raise UserError(f"{config_path}: chat_template must be a jinja string (or a list with a 'default' template)")
  return template, f"{config_path} chat_template"


def load_tokenizer(folder: str | Path) -> Tokenizer:
  """Loads tokenizer.json (required) and tokenizer_config.json (optional) from a Hugging Face model folder."""
  folder = Path(folder)
  if not folder.is_dir():
    raise UserError(f"{folder}: tokenizer folder not found")
  tokenizer_path = folder / "tokenizer.json"
  if not tokenizer_path.is_file():
    raise UserError(f"{tokenizer_path}: not found; tokenizer.json is required (vocab.json + merges.txt are not enough)")
  try:
    backend = tokenizers.Tokenizer.from_file(str(tokenizer_path))
  except Exception as e:  # noqa: BLE001 - the tokenizers library raises a bare Exception for bad files
    raise UserError(f"{tokenizer_path}: not a valid tokenizers file ({e})") from None
  backend.no_truncation()
  backend.no_padding()
  config_path = folder / "tokenizer_config.json"
  config = _read_json(config_path) if config_path.is_file() else {}
  if not isinstance(config, dict):
    raise UserError(f"{config_path}: expected a JSON object")
  backend.encode_special_tokens = bool(config.get("split_special_tokens", False))  # as transformers sets it
  special = {k: v for k in SPECIAL_TOKEN_KEYS if isinstance(v := _token_text(config.get(k)), str)}
  eos = special.get("eos_token")
  if eos is not None and backend.token_to_id(eos) is None:
    raise UserError(f"{config_path}: eos_token {eos!r} is not a token of tokenizer.json")
  return Tokenizer(backend, special, *_chat_template(folder, config, config_path))
