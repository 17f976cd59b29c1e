"""Sampling a next token from fp32 logits as transformers does: repetition penalty, temperature, top-k, top-p
and min-p, after OpenAI's logit bias and with its presence and frequency penalties after the repetition penalty
(`process_logits`), then argmax or a draw, each row with its own settings; and what the decode state tracks for
it (ids seen per row, ids generated counted, each drawn token's log-probability and the likeliest ids').
Shapes: B rows, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qwen_moe_jax.automaton import Grammar
from qwen_moe_jax.errors import UserError, json_number
from qwen_moe_jax.grammar import Registry, grammar_room


@dataclasses.dataclass(frozen=True)
class Sampling:
  """One prompt's settings (a --prompts-file line may give its own)."""
  temperature: float = 0.0  # 0: greedy
  top_k: int = 0  # 0: off
  top_p: float = 1.0  # 1: off
  repetition_penalty: float = 1.0  # 1: off; applies to greedy decoding too, as in transformers
  min_p: float = 0.0  # 0: off; drop ids less likely than min_p x the likeliest (transformers' MinPLogitsWarper)
  presence_penalty: float = 0.0  # subtracted from the logit of each id the row has generated (OpenAI, vLLM)
  frequency_penalty: float = 0.0  # subtracted once per time the row has generated the id (OpenAI, vLLM)
  top_logprobs: int = 0  # not a step: how many of the likeliest ids to report, with their log-probabilities, at
  # each generated token (OpenAI's top_logprobs, vLLM's SamplingParams.logprobs; at most MAX_TOP_LOGPROBS)
  min_tokens: int = 0  # the stop ids are not drawn until the row has generated this many tokens (vLLM's
  # min_tokens, transformers' min_new_tokens)
  logit_bias: tuple[tuple[int, float], ...] = ()  # (id, bias) pairs: the bias is added to the id's logit before
  # every other step (OpenAI's logit_bias: -100 bans the id, 100 forces it; at most MAX_LOGIT_BIAS ids)
  grammar: Grammar | None = None  # structured output: only ids its automaton allows are drawn, before all else
  # (grammar.py; not a flag's or a key's name: --regex, --json-schema, --choice and response_format give it)

  def validate(self, where: str | None = None, flags: str = "") -> "Sampling":
    """Bad values are errors naming the flag (`flags` its prefix: train.py's "grpo-"), or the key in `where` (a
    file) when given."""
    def name(field: str) -> str:
      return f"{where}: {field}" if where else "--" + flags + field.replace("_", "-")

    if not self.temperature >= 0:
      raise UserError(f"{name('temperature')} must be >= 0, got {self.temperature}")
    if not 0 <= self.top_k < INT32:
      raise UserError(f"{name('top_k')} must be in [0, 2^31), got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise UserError(f"{name('top_p')} must be in (0, 1], got {self.top_p}")
    if not self.repetition_penalty > 0:
      raise UserError(f"{name('repetition_penalty')} must be > 0, got {self.repetition_penalty}")
    if not 0 <= self.min_p <= 1:
      raise UserError(f"{name('min_p')} must be in [0, 1], got {self.min_p}")
    for field in ("presence_penalty", "frequency_penalty"):
      if not -2 <= getattr(self, field) <= 2:
        raise UserError(f"{name(field)} must be in [-2, 2] (OpenAI's range), got {getattr(self, field)}")
    if not 0 <= self.min_tokens < INT32:
      raise UserError(f"{name('min_tokens')} must be in [0, 2^31), got {self.min_tokens}")
    if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
      raise UserError(f"{name('top_logprobs')} must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
    if len(self.logit_bias) > MAX_LOGIT_BIAS:
      raise UserError(f"{name('logit_bias')} may hold {MAX_LOGIT_BIAS} ids at most, got {len(self.logit_bias)}")
    for token, bias in self.logit_bias:
      if token < 0 or not -100 <= bias <= 100:
        raise UserError(f"{name('logit_bias')} takes token ids >= 0 and biases in [-100, 100], got {token}: {bias}")
    if self.grammar is not None and self.min_tokens:
      raise UserError(f"{name('min_tokens')} cannot hold the stop ids back under structured output (the grammar "
                      "says where the output may end)")
    return self


MAX_TOP_LOGPROBS = 20  # OpenAI's and vLLM's
INT32 = 1 << 31  # the device holds integer settings as int32
MAX_LOGIT_BIAS = 300  # OpenAI's
SETTINGS = tuple(f.name for f in dataclasses.fields(Sampling) if f.name != "grammar")  # the flags', file lines'
# and requests' names
INTEGERS = ("top_k", "top_logprobs", "min_tokens")


def given_settings(obj: dict, keys: Sequence[str], where: str) -> dict:
  """The settings among `keys` that `obj` (a JSON object: a prompts file line, generation_config.json, a request)
  gives, as numbers of the field's type; a bad one is a UserError naming `where` and the key."""
  return {k: logit_bias(obj[k], f"{where}: {k}") if k == "logit_bias" else json_number(obj[k], k in INTEGERS,
                                                                                      f"{where}: {k}")
          for k in keys if obj.get(k) is not None}


def logit_bias(value, name: str) -> tuple[tuple[int, float], ...]:
  """OpenAI's logit_bias, a JSON object of token ids (as strings) to biases, as sorted (id, bias) pairs; else a
  UserError naming it."""
  if not isinstance(value, dict) or not all(isinstance(k, str) and k.isascii() and k.isdigit() for k in value):
    raise UserError(f"{name} must be an object of token ids to biases, such as {{\"151643\": -100}}, got {value!r}")
  return tuple(sorted((int(k), json_number(v, False, f'{name}["{k}"]')) for k, v in value.items()))


@dataclasses.dataclass(frozen=True)
class SamplingOps:
  """Which steps of `process_logits` some row needs: static (a compiled program's shape); each row's values are
  in a `RowSampling`, so prompts with their own settings share a batch and new values do not recompile."""
  repetition: bool = False  # a repetition penalty: rows track the ids of their prompt and output (`seen`)
  counted: bool = False  # a presence or frequency penalty: rows count the ids they generated (`counts`)
  draws: bool = False  # some row samples (temperature > 0); else every row is greedy
  top_k: int = 0  # the largest top-k of a sampling row (0: none truncates by rank)
  top_p: bool = False
  min_p: bool = False
  min_tokens: bool = False  # some row holds its stop ids back for its first tokens
  logit_bias: int = 0  # the most ids some row biases (0: none)
  top_logprobs: int = 0  # the most ids some row reports at each token with their log-probabilities (0: none)
  grammars: int = 0  # grammar slots G (slot 0: none; 0: no row follows a grammar), see grammar.py
  grammar_cells: int = 0  # their cells N

  @staticmethod
  def of(settings: Sequence[Sampling]) -> "SamplingOps":
    drawn = [s for s in settings if s.temperature > 0]
    return SamplingOps(
      repetition=any(s.repetition_penalty != 1 for s in settings),
      counted=any(s.presence_penalty or s.frequency_penalty for s in settings), draws=bool(drawn),
      top_k=max((s.top_k for s in drawn), default=0), top_p=any(s.top_p < 1 for s in drawn),
      min_p=any(s.min_p > 0 for s in drawn), min_tokens=any(s.min_tokens > 0 for s in settings),
      logit_bias=max(len(s.logit_bias) for s in settings),
      top_logprobs=max(s.top_logprobs for s in settings), **grammar_room({s.grammar for s in settings} - {None}))

  def __or__(self, other: "SamplingOps") -> "SamplingOps":
    """The steps either needs."""
    return SamplingOps(**{f.name: max(getattr(self, f.name), getattr(other, f.name))
                          for f in dataclasses.fields(SamplingOps)})

  def covers(self, other: "SamplingOps") -> bool:
    """Programs compiled for these steps can sample rows that need `other`'s."""
    return self | other == self


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RowSampling:
  """Each row's settings, [B] each (see Sampling; top_logprobs is only static, in SamplingOps)."""
  temperature: jax.Array
  top_k: jax.Array
  top_p: jax.Array
  repetition_penalty: jax.Array
  min_p: jax.Array
  presence_penalty: jax.Array
  frequency_penalty: jax.Array
  min_tokens: jax.Array
  bias_ids: jax.Array  # [B, K] int32 the ids each row biases (padded with NO_ID), K = SamplingOps.logit_bias
  biases: jax.Array  # [B, K] fp32 their biases
  grammar_slot: jax.Array  # [B] int32 the grammar each row follows (0: none)
  grammar_start: jax.Array  # [B] int32 the cell of its first state (see grammar.py)

  @staticmethod
  def of(settings: Sequence[Sampling], ops: SamplingOps | None = None,
         grammars: Registry | None = None) -> "RowSampling":
    """Host arrays [len(settings)] ([len(settings), K], K from `ops`, else from the settings); `grammars` places
    the rows' grammars (reserved there)."""
    k = (ops or SamplingOps.of(settings)).logit_bias
    starts = np.array([grammars.start(s.grammar) if grammars else (0, 0) for s in settings], np.int32).reshape(-1, 2)
    bias_ids, biases = np.full((len(settings), k), NO_ID, np.int32), np.zeros((len(settings), k), np.float32)
    for row, s in enumerate(settings):
      for j, (token, bias) in enumerate(s.logit_bias):
        bias_ids[row, j], biases[row, j] = token, bias
    return RowSampling(**{f.name: np.array([getattr(s, f.name) for s in settings],
                                           np.int32 if f.name in INTEGERS else np.float32)
                          for f in dataclasses.fields(RowSampling)
                          if f.name not in ("bias_ids", "biases", "grammar_slot", "grammar_start")},
                       bias_ids=bias_ids, biases=biases, grammar_slot=starts[:, 0], grammar_start=starts[:, 1])


NO_ID = np.iinfo(np.int32).max  # a padding id past any vocabulary: scatters drop it


def process_logits(logits: jax.Array, ops: SamplingOps, rs: RowSampling, seen: jax.Array | None = None,
                   counts: jax.Array | None = None) -> jax.Array:
  """logits [B, V] fp32 -> the logits a token is drawn from, in transformers' order: the repetition penalty on
  the ids each row has seen (seen [B, V] bool: its prompt and output so far; positive logits divided by the
  penalty, negative ones multiplied), then the presence and frequency penalties on the ids it generated
  (counts [B, V], as vLLM applies them after the repetition penalty), then temperature, top-k, top-p and min-p,
  which leave dropped ids at -inf. A greedy row (temperature 0) stops after the penalties. First of all, each
  row's logit bias is added (OpenAI's logit_bias)."""
  column = lambda x: x[:, None]  # noqa: E731  [B] -> [B, 1]
  if ops.logit_bias:
    logits = logits.at[jnp.arange(logits.shape[0])[:, None], rs.bias_ids].add(rs.biases, mode="drop")
  if ops.repetition:
    p = column(rs.repetition_penalty)
    logits = jnp.where(seen, jnp.where(logits < 0, logits * p, logits / p), logits)
  if ops.counted:
    logits = logits - column(rs.frequency_penalty) * counts - column(rs.presence_penalty) * (counts > 0)
  if not ops.draws:
    return logits
  greedy = column(rs.temperature == 0)
  penalized, logits = logits, logits / column(jnp.where(rs.temperature > 0, rs.temperature, 1.0))
  if ops.top_k:
    largest = jax.lax.top_k(logits, min(ops.top_k, logits.shape[-1]))[0]  # [B, K] descending
    kth = jnp.take_along_axis(largest, column(jnp.clip(rs.top_k, 1, largest.shape[-1]) - 1), axis=-1)
    logits = jnp.where((logits < kth) & column(rs.top_k > 0), -jnp.inf, logits)
  if ops.top_p:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
    cutoff = jnp.min(jnp.where(before < column(rs.top_p), sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where((logits < cutoff) & column(rs.top_p < 1), -jnp.inf, logits)
  if ops.min_p:
    probs = jax.nn.softmax(logits, axis=-1)
    floor = column(rs.min_p) * jnp.max(probs, axis=-1, keepdims=True)
    logits = jnp.where(probs < floor, -jnp.inf, logits)
  return jnp.where(greedy, penalized, logits)


def sample(logits: jax.Array, keys: jax.Array, ops: SamplingOps, rs: RowSampling, seen: jax.Array | None = None,
           counts: jax.Array | None = None, generated: jax.Array | None = None,
           stop_ids: jax.Array | None = None, allowed: jax.Array | None = None) -> jax.Array:
  """logits [B, V] fp32, keys [B], seen / counts [B, V] (with those penalties) -> token ids [B]: the argmax of a
  greedy row's logits, a draw from a sampling row's. With ops.min_tokens, a row that has generated [B] fewer
  tokens than its min_tokens cannot draw the stop ids [S] (-1: unused). With ops.grammars, only the ids its
  grammar allows [B, V] (bool) are drawn."""
  if ops.grammars:
    logits = jnp.where(allowed, logits, -jnp.inf)
  if ops.min_tokens:
    held = (generated < rs.min_tokens)[:, None]  # the token drawn now is the row's (generated + 1)-th
    rows = jnp.arange(logits.shape[0])[:, None]
    logits = logits.at[rows, jnp.where(held & (stop_ids >= 0)[None], stop_ids[None], NO_ID)].set(-jnp.inf,
                                                                                                  mode="drop")
  logits = process_logits(logits, ops, rs, seen, counts)
  best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if not ops.draws:
    return best
  drawn = jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)
  return jnp.where(rs.temperature > 0, drawn, best)


def chosen_logprob(logits: jax.Array, token: jax.Array) -> jax.Array:
  """logits [B, V] fp32, token [B] -> log-probability [B] of each token under the model (before sampling's
  penalty, temperature and truncation, as vLLM and OpenAI report it)."""
  return jnp.take_along_axis(logits, token[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(logits, axis=-1)


def likeliest(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """logits [B, V] fp32 -> the k likeliest ids [B, k] (int32, best first) and their log-probabilities [B, k] under
  the model (as chosen_logprob's)."""
  values, ids = jax.lax.top_k(logits, k)
  return ids.astype(jnp.int32), values - jax.nn.logsumexp(logits, axis=-1, keepdims=True)


def mark_seen(seen: jax.Array | None, tokens: jax.Array, real: jax.Array | bool = True) -> jax.Array | None:
  """seen [B, V] with ids tokens [B, T] (or [B]) added where `real`; None (no penalty) stays None."""
  if seen is None:
    return None
  b = tokens.shape[0]
  tokens = tokens.reshape(b, -1)
  real = jnp.broadcast_to(jnp.reshape(real, (b, -1)) if jnp.ndim(real) else real, tokens.shape)
  return seen.at[jnp.arange(b)[:, None], tokens].max(real)


def count_generated(counts: jax.Array | None, token: jax.Array, real: jax.Array | bool = True) -> jax.Array | None:
  """counts [B, V] with each row's new token [B] counted where `real`; None (no such penalty) stays None."""
  if counts is None:
    return None
  return counts.at[jnp.arange(token.shape[0]), token].add(jnp.broadcast_to(real, token.shape).astype(counts.dtype))
