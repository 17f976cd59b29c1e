"""Decode attention over the KV cache as a Pallas kernel that reads only each row's live slots.

The einsum path (layers.attend) reads every slot of the cache at every decode step: a cache sized for the longest
prompt plus --max-new-tokens is read whole even while a row holds a tenth of it. This kernel (Triton on GPU,
interpreted elsewhere for tests) runs, per row and kv head, the G query heads of one decode step over that row's
slots [0, length) only, in blocks of up to 64 slots with an online softmax, split over about SPLITS programs
(flash decoding) whose partial results are merged after. Slots past a row's length are never loaded, so a step reads
the bytes the rows hold, not the cache's size. int8 caches are read as int8 and their scales applied to scores
and probabilities, as in layers.attend.

Shape letters as in layers.py; S cache slots, J splits, C slots per block, P query heads padded to a tile.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import PartitionSpec as P

from qwen_moe_jax import sharding

F32 = jnp.float32
SPLITS = 8  # programs per (row, kv head) aimed at, each over a contiguous run of the slots
BLOCK = 64  # most slots per loop iteration inside a program
MIN_TILE = 16  # Triton's smallest matmul tile: query heads per kv head are padded to a power of two >= it


def fits(slots: int, head_dim: int) -> bool:
  """Whether a cache of this many slots splits into programs of whole blocks (every cache bucket of at least
  128 slots does; smaller caches keep the einsum) and the head dim suits Triton: a power of two (the Pallas
  Triton lowering refuses other array sizes, e.g. a 96-wide head) of at least a tile (Qwen's heads are 128)."""
  return slots % (SPLITS * MIN_TILE) == 0 and head_dim >= MIN_TILE and head_dim & (head_dim - 1) == 0


def split_slots(slots: int) -> int:
  """Slots per program: a power of two (Triton's block shapes are), dividing `slots`, about slots / SPLITS
  (cache buckets past 256 slots are multiples of 256, e.g. 1,280 = 10 x 128)."""
  largest = slots & -slots  # the largest power of two dividing slots
  return min(largest, 1 << ((slots // SPLITS).bit_length() - 1))


def _kernel(q_ref, k_ref, v_ref, length_ref, *refs, block: int, quantized: bool):
  """One program: queries q [P, H] over the slots of its split, k / v [S / J, H] (scales [S / J]); writes the
  unnormalised output [P, H], the running max [P] and the softmax denominator [P]."""
  k_scale_ref, v_scale_ref, o_ref, m_ref, l_ref = refs if quantized else (None, None, *refs)
  per_split = k_ref.shape[0]
  first = pl.program_id(0) * per_split  # the split's first slot
  blocks = jnp.clip(pl.cdiv(length_ref[()] - first, block), 0, per_split // block)
  q = q_ref[...]

  def body(i, carry):
    o, m, denom = carry
    at = pl.ds(i * block, block)
    scores = plgpu.dot(q, k_ref[at, :].astype(F32), trans_b=True)  # [P, C]
    if quantized:
      scores = scores * k_scale_ref[at][None, :]
    live = first + i * block + jnp.arange(block) < length_ref[()]
    scores = jnp.where(live[None, :], scores, jnp.finfo(F32).min)
    m_next = jnp.maximum(m, scores.max(axis=-1))
    probs = jnp.exp(scores - m_next[:, None])  # [P, C]
    correction = jnp.exp(m - m_next)
    l_next = correction * denom + probs.sum(axis=-1)
    if quantized:
      probs = probs * v_scale_ref[at][None, :]
    o_next = correction[:, None] * o + plgpu.dot(probs, v_ref[at, :].astype(F32))
    return o_next, m_next, l_next

  p, h = q.shape
  init = (jnp.zeros((p, h), F32), jnp.full((p,), jnp.finfo(F32).min, F32), jnp.zeros((p,), F32))
  o, m, denom = jax.lax.fori_loop(0, blocks, body, init)
  o_ref[...], m_ref[...], l_ref[...] = o, m, denom


def _one_head(q, k, v, length, k_scale, v_scale, *, interpret: bool):
  """q [P, H] (float32, scaled), k / v [S, H], length [], scales [S] or None -> [P, H] float32: the queries
  over slots [0, length)."""
  slots, h = k.shape
  per_split = split_slots(slots)
  splits, block = slots // per_split, min(BLOCK, per_split)
  quantized = k_scale is not None
  split = lambda width: pl.BlockSpec((None, per_split) + width, lambda j: (j, 0) + (0,) * len(width))  # noqa: E731
  by_split = lambda x: x.reshape(splits, per_split, *x.shape[1:])  # noqa: E731
  whole = pl.BlockSpec(q.shape, lambda j: (0, 0))
  scalar = pl.BlockSpec((), lambda j: ())
  in_specs = [whole, split((h,)), split((h,)), scalar] + ([split(()), split(())] if quantized else [])
  args = (q, by_split(k), by_split(v), length) + ((by_split(k_scale), by_split(v_scale)) if quantized else ())
  p = q.shape[0]
  o, m, denom = pl.pallas_call(
    functools.partial(_kernel, block=block, quantized=quantized),
    grid=(splits,), in_specs=in_specs,
    out_specs=[pl.BlockSpec((None, p, h), lambda j: (j, 0, 0)), pl.BlockSpec((None, p), lambda j: (j, 0)),
               pl.BlockSpec((None, p), lambda j: (j, 0))],
    out_shape=[jax.ShapeDtypeStruct((splits, p, h), F32), jax.ShapeDtypeStruct((splits, p), F32),
               jax.ShapeDtypeStruct((splits, p), F32)],
    compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2), interpret=interpret, name="decode_attention",
  )(*args)
  top = m.max(axis=0)  # [P]: merge the splits' partial softmaxes (a split with no live slot weighs 0)
  weight = jnp.exp(m - top)  # [J, P]
  return (weight[..., None] * o).sum(axis=0) / (weight * denom).sum(axis=0)[:, None]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array,
           scales: tuple[jax.Array, jax.Array] | None = None, interpret: bool | None = None) -> jax.Array:
  """One decode step's attention: q [B, N, H] over the cache k / v [B, K, S, H] (scales [B, K, S] for an int8
  cache), row b seeing slots [0, lengths[b]) -> [B, N, H] in q's dtype. Under a mesh, a shard_map over rows
  (and kv heads, when the mesh splits query and kv heads alike). `interpret`: run the kernel in Python (default:
  off a GPU)."""
  interpret = jax.default_backend() != "gpu" if interpret is None else interpret
  b, n, h = q.shape
  kv_heads = k.shape[1]
  g = n // kv_heads
  tile = max(MIN_TILE, 1 << (g - 1).bit_length())  # P

  def local(q, k, v, lengths, *scale):  # per device: q [B', N', H], k / v [B', K', S, H]
    qg = q.reshape(q.shape[0], k.shape[1], g, h).astype(F32) * h ** -0.5  # [B', K', G, H]
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, tile - g), (0, 0)))  # [B', K', P, H]
    per_row = jax.vmap(functools.partial(_one_head, interpret=interpret), in_axes=(0, 0, 0, None, 0, 0))
    one = lambda q, k, v, n, *s: per_row(q, k, v, n, *(s or (None, None)))  # noqa: E731
    out = jax.vmap(one)(qg, k, v, lengths, *scale)[:, :, :g]  # [B', K', G, H]
    return out.reshape(q.shape).astype(q.dtype)

  args = (q, k, v, lengths) + (tuple(scales) if scales is not None else ())
  mesh = sharding.current_mesh()
  if mesh is None:
    return local(*args)
  k_spec = sharding.spec_for(("batch", "kv_heads", None, None), k.shape, mesh, "k")
  q_spec = sharding.spec_for(("batch", "q_heads", None), q.shape, mesh, "q")
  if q_spec[1] != k_spec[1]:  # e.g. 4 kv heads on tensor=8: every head on every device
    q_spec, k_spec = P(q_spec[0], None, None), P(k_spec[0], None, None, None)
  specs = (q_spec, k_spec, k_spec, P(q_spec[0])) + ((P(*k_spec[:3]),) * 2 if scales is not None else ())
  return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=q_spec, check_vma=False)(*args)
