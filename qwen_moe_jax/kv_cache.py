"""The KV cache: one key and one value buffer [B, S, K, H] per layer; slot s holds position s of each row."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from qwen_moe_jax import sharding
from qwen_moe_jax.config import QwenMoeConfig

CACHE_AXES = ("batch", None, "kv_heads", None)  # [B, S, K, H]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  k: tuple[jax.Array, ...]  # per layer [B, S, K, H]
  v: tuple[jax.Array, ...]  # per layer [B, S, K, H]

  @staticmethod
  def shape(cfg: QwenMoeConfig, batch: int, length: int) -> tuple[int, int, int, int]:
    return (batch, length, cfg.num_key_value_heads, cfg.dim_per_head)

  @classmethod
  def zeros(cls, cfg: QwenMoeConfig, batch: int, length: int, dtype: jnp.dtype) -> "KVCache":
    """An empty cache, laid out by the sharding rules when a mesh is set."""
    shape = cls.shape(cfg, batch, length)
    layers = range(cfg.num_hidden_layers)
    return cls(k=tuple(jnp.zeros(shape, dtype) for _ in layers),
               v=tuple(jnp.zeros(shape, dtype) for _ in layers)).laid_out()

  def laid_out(self) -> "KVCache":
    """Buffers constrained to the sharding rules' layout when a mesh is set."""
    return KVCache(k=tuple(sharding.constrain(x, CACHE_AXES) for x in self.k),
                   v=tuple(sharding.constrain(x, CACHE_AXES) for x in self.v))

  @classmethod
  def nbytes(cls, cfg: QwenMoeConfig, batch: int, length: int, dtype: jnp.dtype) -> int:
    """Bytes of a whole cache (keys and values, every layer)."""
    return 2 * cfg.num_hidden_layers * int(np.prod(cls.shape(cfg, batch, length))) * jnp.dtype(dtype).itemsize

  @property
  def length(self) -> int:
    return self.k[0].shape[1]

  def layer(self, i: int) -> tuple[jax.Array, jax.Array]:
    return self.k[i], self.v[i]
