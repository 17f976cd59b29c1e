"""Scoring prompts: each token's log-probability and rank given the tokens before it (`--prompt-logprobs`, as
vLLM's prompt_logprobs; a rank of 1 is lm-eval's is_greedy) and the greedy choice there (the server's `echo`),
and the logits at every position (`--dump-logits`).

Prompts run in groups of the generator's `prefill_rows` (else `batch_size`, else all), longest first, each group
padded to its own bucket. Prompts that begin alike (at least `share_prefix` ids in common: the choices of one
multiple-choice question, few-shot prompts; prefixes.families) run their common prefix once: a prefill puts its
keys and values in a cache, and each prompt's rest runs over a copy of that row, as a decode step would (vLLM's
prefix cache cannot serve prompt_logprobs, which it computes by running every prompt whole). A call holds the
cache rows of as many prompts as generation copies at once (generate.copy_rows: at most COPY_SLOTS slots).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen_moe_jax import sharding
from qwen_moe_jax.generate import Generator, bucket, cache_bucket, copy_rows, mesh_context
from qwen_moe_jax.kv_cache import KVCache
from qwen_moe_jax.losses import token_scores
from qwen_moe_jax.model import QwenMoeForCausalLM
from qwen_moe_jax.prefixes import families


@dataclasses.dataclass
class PromptScores:
  """A prompt's scores, one per token (None for the first, which nothing before it predicts)."""

  logprobs: list[float | None]  # log p(token | the tokens before it)
  ranks: list[int | None]  # 1 + the ids the model found likelier (1: the greedy choice)
  best: list[int | None]  # the greedy choice there (the token itself where its rank is 1)
  best_logprobs: list[float | None]  # its log-probability


def prompt_scores(gen: Generator, prompts: Sequence[Sequence[int]]) -> list[PromptScores]:
  """Each prompt token's log-probability and rank given the tokens before it, and the greedy choice there."""
  gen.validate(prompts, [1])
  rows = bucket(min(gen.prefill_rows or gen.batch_size or len(prompts), len(prompts)), minimum=1)
  least = max(gen.share_prefix, 2)  # (a head of one id has no key or value to share)
  most = copy_rows(rows, cache_bucket(max(len(p) for p in prompts)))  # prompts a call shares among
  groups = families(prompts, least, most) if gen.share_prefix else [(0, [i]) for i in range(len(prompts))]
  alone = sorted((g[0] for n, g in groups if not n), key=lambda i: -len(prompts[i]))
  shared = [(n, g) for n, g in groups if n]
  scores: list[PromptScores] = [PromptScores([], [], [], [])] * len(prompts)
  with mesh_context(gen.mesh):
    for start in range(0, len(alone), rows):
      part = alone[start:start + rows]
      got = jax.device_get(_prompt_scores(gen.graphdef, gen.params, *_shifted([prompts[i] for i in part], rows)))
      for r, i in enumerate(part):
        scores[i] = PromptScores(*([None] + x[r, :len(prompts[i]) - 1].tolist() for x in got))
    while shared:  # as many groups at once as `most` rows hold the prompts of (a group holds at most `most`)
      take, held = 0, 0
      while take < len(shared) and held + len(shared[take][1]) <= most:
        held, take = held + len(shared[take][1]), take + 1
      _score_families(gen, prompts, shared[:take], scores)
      shared = shared[take:]
  return scores


def _score_families(gen: Generator, prompts: Sequence[Sequence[int]], groups: list[tuple[int, list[int]]],
                    scores: list[PromptScores]) -> None:
  """Scores the prompts of `groups` [(n, indices)] into `scores`: a group's first n ids run once (the first n - 1
  into a cache row), each prompt's from the n-th (the slot it fills) to its last but one over a copy of that row."""
  heads = [prompts[g[0]][:n] for n, g in groups]
  cache_len = cache_bucket(max(len(prompts[i]) for _, g in groups for i in g) - 1)
  cache, head_scores = _prompt_scores(gen.graphdef, gen.params, *_shifted(heads, bucket(len(groups), minimum=1)),
                                      cache_len=cache_len)
  rests = [(f, i) for f, (n, g) in enumerate(groups) for i in g if len(prompts[i]) > n]  # (group, prompt)
  if rests:
    width = bucket(len(rests), minimum=1)
    tokens, targets, _ = _shifted([prompts[i][groups[f][0] - 1:] for f, i in rests], width)
    sources, starts = np.zeros((2, width), np.int32)
    sources[:len(rests)] = [f for f, _ in rests]
    starts[:len(rests)] = [groups[f][0] - 1 for f, _ in rests]
    rest_scores = jax.device_get(_rest_pass(gen.graphdef, gen.params, cache, sources, tokens, targets, starts))
  head_scores = jax.device_get(head_scores)
  row_of = {i: r for r, (_, i) in enumerate(rests)}
  for f, (n, g) in enumerate(groups):
    for i in g:
      rest = [x[row_of[i], :len(prompts[i]) - n].tolist() for x in rest_scores] if i in row_of else [[]] * 4
      scores[i] = PromptScores(*([None] + head[f, :n - 1].tolist() + r for head, r in zip(head_scores, rest)))


def _shifted(seqs: Sequence[Sequence[int]], rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """seqs -> (inputs [rows, W], targets [rows, W], lengths [rows]): each seq's ids but its last, and but its
  first, right-padded with 0 to W = cache_bucket(longest); rows past seqs: length 1."""
  inputs, targets = (np.zeros((rows, cache_bucket(max(max(len(s) for s in seqs) - 1, 1))), np.int32)
                     for _ in range(2))
  lengths = np.ones((rows,), np.int32)
  for r, s in enumerate(seqs):
    inputs[r, :len(s) - 1], targets[r, :len(s) - 1], lengths[r] = s[:-1], s[1:], max(len(s) - 1, 1)
  return inputs, targets, lengths


def _scores(model: QwenMoeForCausalLM, hidden: jax.Array, targets: jax.Array) -> tuple[jax.Array, ...]:
  """hidden [B, T, D], targets [B, T] -> (fp32 log p(target | the tokens up to its position), its rank, the greedy
  choice there, its fp32 log-probability) [B, T]: PromptScores' fields."""
  b, t = targets.shape
  nll, *rest = token_scores(hidden.reshape(b * t, -1), model.lm_head[...], targets.reshape(-1))[:4]
  return tuple(sharding.constrain(x.reshape(b, t), (None, None)) for x in (-nll, *rest))  # every process reads them


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len"))
def _prompt_scores(graphdef, params, tokens, targets, lengths, cache_len: int = 0):
  """tokens / targets [B, T] right-padded, lengths [B] -> `_scores` of the targets given the tokens up to them;
  with `cache_len`, (a cache [B, cache_len] in the model's dtype holding the tokens' keys and values, those)."""
  model: QwenMoeForCausalLM = nnx.merge(graphdef, params)
  b, t = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  segments = (positions < lengths[:, None]).astype(jnp.int32)
  cache = KVCache.zeros(model.config, b, cache_len, model.embed[...].dtype) if cache_len else None
  out = model(tokens, positions, segments, cache=cache, packed=False)
  scores = _scores(model, out.hidden, targets)
  return (out.cache, scores) if cache_len else scores


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _rest_pass(graphdef, params, cache: KVCache, sources, tokens, targets, starts):
  """tokens / targets [R, T] right-padded, run at positions starts[r].. over a copy of cache row sources[r] (whose
  slots [0, starts[r]) hold the ids before them) -> `_scores` of the targets given the ids up to them."""
  model: QwenMoeForCausalLM = nnx.merge(graphdef, params)
  positions = starts[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
  rows = jax.tree.map(lambda c: c[sources], cache).laid_out()
  return _scores(model, model(tokens, positions, cache=rows, attend_cache=True).hidden, targets)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _prompt_logits(graphdef, params, tokens):
  model: QwenMoeForCausalLM = nnx.merge(graphdef, params)
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  return sharding.constrain(model.logits(model(tokens, positions).hidden), (None, None, None))  # every process reads it


def prompt_logits(model: QwenMoeForCausalLM, ids: Sequence[int], mesh: jax.sharding.Mesh | None = None) -> np.ndarray:
  """fp32 logits [T, V] at every prompt position (what --dump-logits saves)."""
  graphdef, params = nnx.split(model)
  with mesh_context(mesh):
    return np.asarray(_prompt_logits(graphdef, params, jnp.asarray([list(ids)], jnp.int32))[0])
