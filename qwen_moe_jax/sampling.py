"""Sampling a next token from fp32 logits as transformers does: repetition penalty, temperature, top-k, top-p
(`process_logits`), then argmax or a draw; and what the decode state tracks for it (ids seen per row, each
drawn token's log-probability). Shapes: B rows, V vocabulary.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qwen_moe_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Sampling:
  temperature: float = 0.0  # 0: greedy
  top_k: int = 0  # 0: off
  top_p: float = 1.0  # 1: off
  repetition_penalty: float = 1.0  # 1: off; applies to greedy decoding too, as in transformers

  def validate(self, where: str | None = None) -> "Sampling":
    """Bad values are errors naming the flag, or the key in `where` (a file) when given."""
    def name(field: str) -> str:
      return f"{where}: {field}" if where else "--" + field.replace("_", "-")

    if not self.temperature >= 0:
      raise UserError(f"{name('temperature')} must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise UserError(f"{name('top_k')} must be >= 0, got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise UserError(f"{name('top_p')} must be in (0, 1], got {self.top_p}")
    if not self.repetition_penalty > 0:
      raise UserError(f"{name('repetition_penalty')} must be > 0, got {self.repetition_penalty}")
    return self

  @property
  def penalized(self) -> bool:
    return self.repetition_penalty != 1.0


def process_logits(logits: jax.Array, s: Sampling, seen: jax.Array | None = None) -> jax.Array:
  """logits [B, V] fp32 -> the logits a token is drawn from, in transformers' order: the repetition penalty on
  the ids each row has seen (seen [B, V] bool: its prompt and output so far; positive logits divided by the
  penalty, negative ones multiplied), then temperature, top-k and top-p, which leave dropped ids at -inf.
  Greedy (temperature 0) stops after the penalty."""
  if s.penalized:
    p = jnp.float32(s.repetition_penalty)
    logits = jnp.where(seen, jnp.where(logits < 0, logits * p, logits / p), logits)
  if s.temperature == 0:
    return logits
  logits = logits / s.temperature
  if s.top_k:
    kth = jax.lax.top_k(logits, min(s.top_k, logits.shape[-1]))[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if s.top_p < 1:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
    cutoff = jnp.min(jnp.where(before < s.top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return logits


def sample(logits: jax.Array, keys: jax.Array, s: Sampling, seen: jax.Array | None = None) -> jax.Array:
  """logits [B, V] fp32, keys [B], seen [B, V] (with a repetition penalty) -> token ids [B]."""
  logits = process_logits(logits, s, seen)
  if s.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


def chosen_logprob(logits: jax.Array, token: jax.Array) -> jax.Array:
  """logits [B, V] fp32, token [B] -> log-probability [B] of each token under the model (before sampling's
  penalty, temperature and truncation, as vLLM and OpenAI report it)."""
  return jnp.take_along_axis(logits, token[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(logits, axis=-1)


def mark_seen(seen: jax.Array | None, tokens: jax.Array, real: jax.Array | bool = True) -> jax.Array | None:
  """seen [B, V] with ids tokens [B, T] (or [B]) added where `real`; None (no penalty) stays None."""
  if seen is None:
    return None
  b = tokens.shape[0]
  tokens = tokens.reshape(b, -1)
  real = jnp.broadcast_to(jnp.reshape(real, (b, -1)) if jnp.ndim(real) else real, tokens.shape)
  return seen.at[jnp.arange(b)[:, None], tokens].max(real)
