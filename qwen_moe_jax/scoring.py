"""Scoring prompts with a forward pass (no cache): each token's log-probability given the tokens before it
(`--prompt-logprobs`, as vLLM's prompt_logprobs), and the logits at every position (`--dump-logits`)."""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen_moe_jax import sharding
from qwen_moe_jax.generate import Generator, bucket, cache_bucket, mesh_context
from qwen_moe_jax.losses import token_nll
from qwen_moe_jax.model import QwenMoeForCausalLM


def prompt_logprobs(gen: Generator, prompts: Sequence[Sequence[int]]) -> list[list[float | None]]:
  """Each prompt token's log-probability given the tokens before it (None for the first), the generator's
  `prefill_rows` (else `batch_size`, else all) prompts per call, right-padded to a bucket."""
  gen.validate(prompts, [1])
  rows = bucket(min(gen.prefill_rows or gen.batch_size or len(prompts), len(prompts)), minimum=1)
  width = cache_bucket(max(len(p) for p in prompts))
  scores = []
  with mesh_context(gen.mesh):
    for start in range(0, len(prompts), rows):
      group = prompts[start:start + rows]
      tokens, lengths = np.zeros((rows, width), np.int32), np.ones((rows,), np.int32)
      for g, p in enumerate(group):
        tokens[g, :len(p)], lengths[g] = p, len(p)
      got = np.asarray(_prompt_logprobs(gen.graphdef, gen.params, tokens, lengths))
      scores += [[None] + got[g, :len(p) - 1].tolist() for g, p in enumerate(group)]
  return scores


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _prompt_logprobs(graphdef, params, tokens, lengths):
  """tokens [B, T] right-padded, lengths [B] -> fp32 [B, T - 1]: log p(tokens[:, t + 1] | tokens[:, :t + 1])."""
  model: QwenMoeForCausalLM = nnx.merge(graphdef, params)
  b, t = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  segments = (positions < lengths[:, None]).astype(jnp.int32)
  hidden = model(tokens, positions, segments, packed=False).hidden[:, :-1]  # [B, T - 1, D]
  nll = token_nll(hidden.reshape(b * (t - 1), -1), model.lm_head[...], tokens[:, 1:].reshape(-1))
  return sharding.constrain(-nll.reshape(b, t - 1), (None, None))  # every process reads it


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
