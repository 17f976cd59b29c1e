"""Stop strings (`--stop`, a prompts-file line's "stop"): a generated text ends where the first of them begins
(the string itself is left out, as OpenAI's and vLLM's `stop` leave it), and its prompt stops generating at
the token that completed it (the ids keep that token).

Text is matched as `Tokenizer.decode(ids, skip_special_tokens=True)` gives it, so a stop string may span tokens
or end inside one.
"""

from __future__ import annotations

from typing import Sequence

from qwen_moe_jax.errors import UserError
from qwen_moe_jax.tokenizer import Tokenizer

MAX_TOKENS_PER_CHAR = 4  # byte-level BPE: a character is 1 to 4 bytes, a token at least one byte


class StopStrings:
  def __init__(self, tokenizer: Tokenizer, stops: Sequence[str], where: str = "--stop"):
    if not stops or any(not isinstance(s, str) or not s for s in stops):
      raise UserError(f"{where}: stop strings must be non-empty strings, got {list(stops)!r}")
    self.tokenizer = tokenizer
    self.stops = list(stops)
    # the ids before the new ones that a stop string completed by them can have begun in (special tokens, which
    # decode to nothing, aside)
    self.lookback = MAX_TOKENS_PER_CHAR * max(len(s) for s in self.stops)

  def _found(self, ids: list[int]) -> bool:
    text = self.tokenizer.decode(ids, skip_special_tokens=True)
    return any(s in text for s in self.stops)

  def end(self, ids: list[int], new: int) -> int | None:
    """For generated `ids` whose last `new` are new (and whose earlier ids hold no stop string): how many ids to
    keep, up to the one that completes a stop string, or None when none is complete."""
    start = max(0, len(ids) - new - self.lookback)
    if not self._found(ids[start:]):
      return None
    return next(n for n in range(len(ids) - new + 1, len(ids) + 1) if self._found(ids[start:n]))

  def cut(self, text: str) -> str:
    """`text` up to the first stop string in it."""
    return text[:min([text.find(s) for s in self.stops if s in text], default=len(text))]

  def held(self, text: str) -> int:
    """How many characters at the end of `text` begin a stop string (streaming holds them back)."""
    return max((n for s in self.stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


def text_of(tokenizer: Tokenizer | None, ids: list[int], stops: StopStrings | None) -> str | None:
  """Generated ids as text (special tokens skipped), cut at a stop string; None without a tokenizer."""
  if tokenizer is None:
    return None
  text = tokenizer.decode(ids, skip_special_tokens=True)
  return stops.cut(text) if stops else text


class TextStream:
  """One prompt's generated text as its ids arrive: `push(ids)` and, at the end, `close()` return the text to show
  now, holding back an end that may begin a stop string and giving nothing past one (streamed output)."""

  def __init__(self, tokenizer: Tokenizer, stops: StopStrings | None):
    self.decoder = tokenizer.stream_decoder(skip_special_tokens=True)
    self.stops = stops
    self.held = ""
    self.stopped = False

  def push(self, ids: list[int]) -> str:
    return self._shown(self.decoder.push(ids))

  def close(self) -> str:
    return self._shown(self.decoder.flush(), final=True)

  def _shown(self, text: str, final: bool = False) -> str:
    if self.stopped:
      return ""
    text = self.held + text
    if not self.stops:
      return text
    shown = self.stops.cut(text)
    self.stopped = shown != text
    hold = 0 if final or self.stopped else self.stops.held(shown)
    self.held = shown[len(shown) - hold:]
    return shown[:len(shown) - hold]
