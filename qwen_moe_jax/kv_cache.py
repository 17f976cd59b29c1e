"""The KV cache: one key and one value buffer [B, K, S, H] per layer; slot s holds position s of each row.

Heads before slots: decoding's attention matmuls take (row, kv head) as their batch dimensions, which XLA wants
outermost, so this layout feeds them the cache as it lies ([B, S, K, H] made XLA copy each layer's whole key
cache into this layout at every decode step: see tests/test_infer.py::test_decode_reads_the_cache_in_place).

An int8 cache (`--kv-cache-dtype int8`) holds each slot's key and value vectors per kv head as int8 with one
float32 scale each ([B, K, S]: vector = int8 values x scale, the scale its largest magnitude / 127): half the
bytes of bf16 (plus 4 per 128 values for the scales), so twice the rows or context fit, and half the bytes each
decode step reads. Attention applies the scales to its scores and probabilities (see layers.attend), so the
cache is never expanded to the compute dtype as a whole.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qwen_moe_jax import sharding
from qwen_moe_jax.config import QwenMoeConfig

CACHE_AXES = ("batch", "kv_heads", None, None)  # [B, K, S, H]
SCALE_AXES = ("batch", "kv_heads", None)  # [B, K, S]
INT8_MAX = 127.0


class LayerKV(NamedTuple):
  """One layer's cache."""

  k: jax.Array  # [B, K, S, H]
  v: jax.Array  # [B, K, S, H]
  k_scale: jax.Array | None = None  # [B, K, S] (int8 cache only)
  v_scale: jax.Array | None = None

  @property
  def quantized(self) -> bool:
    return self.k_scale is not None

  def write(self, rows: jax.Array, slots: jax.Array, k: jax.Array, v: jax.Array) -> "LayerKV":
    """The cache with k, v [B, T, K, H] stored in cache rows `rows` [B] at slots [B, T] (rows or slots past the
    cache: dropped), quantized when the cache is: a scatter, in place when the cache is donated (XLA partitions
    a dynamic_update_slice at a traced row by gathering the whole split cache onto every device)."""
    new = (k, v)
    if self.quantized:
      (k, k_scale), (v, v_scale) = quantize(k), quantize(v)
      new = (k, v, k_scale, v_scale)
    at = (rows[:, None], slice(None), slots)  # selects [B, T, K, ...]: the indexed axes first
    return LayerKV(*(c.at[at].set(x.astype(c.dtype), unique_indices=True, mode="drop") for c, x in zip(self, new)))


def quantize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """x [..., H] -> (int8 [..., H], float32 scale [...]) with x ~ int8 * scale (error <= scale / 2)."""
  xf = x.astype(jnp.float32)
  scale = jnp.max(jnp.abs(xf), axis=-1) / INT8_MAX
  q = jnp.round(xf / jnp.where(scale > 0, scale, 1.0)[..., None])
  return q.astype(jnp.int8), scale


def round_trip(x: jax.Array) -> jax.Array:
  """x [..., H] as an int8 cache gives it back."""
  q, scale = quantize(x)
  return (q.astype(jnp.float32) * scale[..., None]).astype(x.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  k: tuple[jax.Array, ...]  # per layer [B, K, S, H] (int8 when quantized)
  v: tuple[jax.Array, ...]  # per layer [B, K, S, H]
  k_scale: tuple[jax.Array, ...] | None = None  # per layer [B, K, S] float32 (int8 cache only)
  v_scale: tuple[jax.Array, ...] | None = None

  @staticmethod
  def shape(cfg: QwenMoeConfig, batch: int, length: int) -> tuple[int, int, int, int]:
    return (batch, cfg.num_key_value_heads, length, cfg.dim_per_head)

  @classmethod
  def zeros(cls, cfg: QwenMoeConfig, batch: int, length: int, dtype: jnp.dtype) -> "KVCache":
    """An empty cache (int8 `dtype`: quantized, with scales), laid out by the sharding rules when a mesh is set."""
    shape = cls.shape(cfg, batch, length)
    layers = range(cfg.num_hidden_layers)
    buffers = lambda s, d: tuple(jnp.zeros(s, d) for _ in layers)  # noqa: E731
    scales = jnp.dtype(dtype) == jnp.int8
    return cls(k=buffers(shape, dtype), v=buffers(shape, dtype),
               k_scale=buffers(shape[:3], jnp.float32) if scales else None,
               v_scale=buffers(shape[:3], jnp.float32) if scales else None).laid_out()

  @classmethod
  def from_layers(cls, layers: list[LayerKV]) -> "KVCache":
    k, v, k_scale, v_scale = zip(*layers)
    quantized = layers[0].quantized
    return cls(k=k, v=v, k_scale=k_scale if quantized else None, v_scale=v_scale if quantized else None)

  def layer(self, i: int) -> LayerKV:
    if self.k_scale is None:
      return LayerKV(self.k[i], self.v[i])
    return LayerKV(self.k[i], self.v[i], self.k_scale[i], self.v_scale[i])

  def laid_out(self) -> "KVCache":
    """Buffers constrained to the sharding rules' layout when a mesh is set."""
    scales = lambda xs: None if xs is None else tuple(sharding.constrain(x, SCALE_AXES) for x in xs)  # noqa: E731
    return KVCache(k=tuple(sharding.constrain(x, CACHE_AXES) for x in self.k),
                   v=tuple(sharding.constrain(x, CACHE_AXES) for x in self.v),
                   k_scale=scales(self.k_scale), v_scale=scales(self.v_scale))

  def slots(self, rows: jax.Array, width: int) -> "KVCache":
    """Slots [0, width) of rows `rows` [R]: a cache of R rows."""
    return jax.tree.map(lambda c: c[rows, :, :width], self)

  def put(self, rows: jax.Array, part: "KVCache") -> "KVCache":
    """The cache with `part` (R rows of `slots`) written to its slots [0, width) of rows `rows` [R] (rows past the
    cache: dropped), a scatter as in LayerKV.write."""
    at = (rows[:, None], slice(None), jnp.arange(part.length)[None])  # [R, width] first, as LayerKV.write indexes
    return jax.tree.map(lambda c, x: c.at[at].set(jnp.moveaxis(x, 2, 1).astype(c.dtype), unique_indices=True,
                                                  mode="drop"), self, part)

  def grown(self, length: int) -> "KVCache":
    """The cache with its slots (axis 2 of buffers and scales) padded (empty) to `length`."""
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, length - self.length)) + ((0, 0),) * (x.ndim - 3))  # noqa: E731
    return jax.tree.map(pad, self)

  @classmethod
  def nbytes(cls, cfg: QwenMoeConfig, batch: int, length: int, dtype: jnp.dtype) -> int:
    """Bytes of a whole cache (keys and values, every layer; an int8 cache's scales included)."""
    shape = cls.shape(cfg, batch, length)
    per_buffer = int(np.prod(shape)) * jnp.dtype(dtype).itemsize
    if jnp.dtype(dtype) == jnp.int8:
      per_buffer += int(np.prod(shape[:3])) * 4
    return 2 * cfg.num_hidden_layers * per_buffer

  @property
  def length(self) -> int:
    return self.k[0].shape[2]
