"""RMSNorm, rotary embedding, attention (GQA with q/k/v bias) and the dense SwiGLU MLP.

Shape letters: B batch, T query positions, S key positions, D model width, N query heads, K kv heads,
G query heads per kv head (N = K * G), H head dim, F MLP hidden, C gate/up pair (2).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec as P

from qwen_moe_jax import decode_attention, sharding
from qwen_moe_jax import lora as lora_lib
from qwen_moe_jax.config import QwenMoeConfig, RopeScaling
from qwen_moe_jax.kv_cache import LayerKV, round_trip

F32 = jnp.float32
FUSED_IMPLEMENTATION = "cudnn"  # jax.nn.dot_product_attention's backend for Kernels.attention == "cudnn"
FUSED_DTYPES = (jnp.bfloat16, jnp.float16)  # what cuDNN flash attention takes
INIT_STD = 0.02  # transformers' initializer_range for qwen2_moe


def param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None], dtype: jnp.dtype,
          init: str = "normal") -> nnx.Param:
  """A parameter with logical axis names (see sharding.RULES)."""
  if init == "normal":
    value = (INIT_STD * jax.random.normal(rngs.params(), shape, F32)).astype(dtype)
  elif init == "ones":
    value = jnp.ones(shape, dtype)
  else:
    value = jnp.zeros(shape, dtype)
  return nnx.Param(value, axes=tuple(axes))


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """transformers' Qwen2MoeRMSNorm: normalise in fp32, cast back, then multiply by the weight."""
  xf = x.astype(F32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return scale * y.astype(x.dtype)


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, dtype: jnp.dtype, rngs: nnx.Rngs):
    self.scale = param(rngs, (dim,), (None,), dtype, init="ones")
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(x, self.scale[...], self.eps)


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> tuple[np.ndarray, float]:
  """(inverse frequencies [H/2] float32, cos / sin scale), with transformers' float32 arithmetic."""
  exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
  pos_freqs = np.float32(theta) ** exponents  # [H/2]
  if scaling is None:
    return 1.0 / pos_freqs, 1.0
  if scaling.rope_type == "linear":
    return (1.0 / pos_freqs) / np.float32(scaling.factor), 1.0

  def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times over the context
    turns = scaling.original_max_position_embeddings / (rotations * 2 * math.pi)
    return head_dim * math.log(turns) / (2 * math.log(theta))

  low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
  if scaling.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, head_dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
  keep = 1 - ramp  # 1: extrapolate (high frequencies, unchanged), 0: interpolate (divided by factor)
  inv_freq = 1.0 / (np.float32(scaling.factor) * pos_freqs) * (1 - keep) + 1.0 / pos_freqs * keep
  return inv_freq.astype(np.float32), scaling.attention_factor


def rope_tables(positions: jax.Array, inv_freq: np.ndarray, scale: float,
                dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
  """cos, sin [B, T, H] for integer positions [B, T] (NeoX half-split layout), computed in fp32, times `scale`."""
  freqs = positions.astype(F32)[..., None] * jnp.asarray(inv_freq, F32)  # [B, T, H/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, H]
  return (jnp.cos(emb) * scale).astype(dtype), (jnp.sin(emb) * scale).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x [B, T, heads, H] rotated by cos/sin [B, T, H]: x * cos + rotate_half(x) * sin."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Mask:
  """Which keys each query sees: key position <= query position, within the query's segment (padding is its own
  segment, id 0, so no row is empty). Kept factored, so attention can build it a block of queries at a time:
  the dense mask [B, T, S] is quadratic in the sequence.

  q_pos, q_seg [B, T]; kv_pos, kv_seg [B or 1, S]. `packed` False promises one sequence per row from position 0,
  right-padded (segments only mark padding): plain causal attention then gives the real tokens the same outputs,
  so the fused kernel runs without a mask.
  """

  q_pos: jax.Array
  q_seg: jax.Array
  kv_pos: jax.Array
  kv_seg: jax.Array
  packed: bool = dataclasses.field(default=True, metadata=dict(static=True))

  @classmethod
  def self_attention(cls, positions: jax.Array, segments: jax.Array, packed: bool = True) -> "Mask":
    """Prefill and training: positions / segments [B, T] for queries and keys alike."""
    return cls(positions, segments, positions, segments, packed)

  @classmethod
  def over_cache(cls, positions: jax.Array, slots: int) -> "Mask":
    """Decoding: queries at positions [B, T] see every cache slot up to their position (slot = position)."""
    kv_pos = jnp.arange(slots, dtype=positions.dtype)[None]
    return cls(positions, jnp.ones_like(positions), kv_pos, jnp.ones_like(kv_pos))

  def dense(self) -> jax.Array:
    """[B, T, S] bool."""
    causal = self.kv_pos[:, None, :] <= self.q_pos[:, :, None]
    same = self.kv_seg[:, None, :] == self.q_seg[:, :, None]
    return causal & same

  def queries(self, start: jax.Array | int, size: int) -> "Mask":
    """The mask of queries [start, start + size)."""
    take = lambda a: jax.lax.dynamic_slice_in_dim(a, start, size, axis=1)  # noqa: E731
    return dataclasses.replace(self, q_pos=take(self.q_pos), q_seg=take(self.q_seg))


QUERY_BLOCK = 512  # attend: most queries per block
BLOCK_SCORES = 1 << 22  # attend: most query x key scores per block (per row and head)


def query_block(t: int, s: int) -> int:
  """Queries per block for T queries over S keys: all T when that is at most QUERY_BLOCK, else a power of two
  <= QUERY_BLOCK with block x S <= BLOCK_SCORES (at least 16)."""
  if t <= QUERY_BLOCK:
    return t
  block = QUERY_BLOCK
  while block > 16 and block * s > BLOCK_SCORES:
    block //= 2
  return block


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask, block: int | None = None,
           scales: tuple[jax.Array, jax.Array] | None = None, kv_layout: str = "BSKH") -> jax.Array:
  """Grouped-query attention, softmax in fp32, over blocks of `block` queries (default: `query_block`).

  q [B, T, N, H], k / v [B, S, K, H] (`kv_layout` "BKSH": [B, K, S, H], the KV cache's) -> [B, T, N, H]. Each
  block sees every key, so blocks are exact; they run in a loop whose body is rematerialised in the backward
  pass, so memory is linear in T for a fixed S (the scores of one block at a time) in training as in prefill.
  `scales` (k_scale, v_scale [B, S, K], or [B, K, S] for "BKSH"): k and v are an int8 cache's (see kv_cache.py);
  a key's scale multiplies its scores, a value's its probabilities.
  """
  b, t, n, h = q.shape
  block = block or query_block(t, k.shape[kv_layout.index("S")])
  if block >= t:
    return _attend_block(q, k, v, mask.dense(), scales, kv_layout)
  blocks = -(-t // block)
  pad = blocks * block - t  # padded queries sit in segment 0 at position 0; their outputs are dropped
  q_pad = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
  mask = dataclasses.replace(mask, q_pos=jnp.pad(mask.q_pos, ((0, 0), (0, pad))),
                             q_seg=jnp.pad(mask.q_seg, ((0, 0), (0, pad))))

  @jax.checkpoint
  def one(i):  # block i: queries [i * block, (i + 1) * block)
    qi = jax.lax.dynamic_slice_in_dim(q_pad, i * block, block, axis=1)
    return _attend_block(qi, k, v, mask.queries(i * block, block).dense(), scales, kv_layout)

  out = jax.lax.map(one, jnp.arange(blocks))  # [blocks, B, block, N, H]
  return jnp.moveaxis(out, 0, 1).reshape(b, blocks * block, n, h)[:, :t]


def _attend_block(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                  scales: tuple[jax.Array, jax.Array] | None, kv_layout: str) -> jax.Array:
  """q [B, T, N, H], k / v in `kv_layout`, mask [B, T, S], scales as in `attend` -> [B, T, N, H]."""
  b, t, n, h = q.shape
  kv_heads = k.shape[kv_layout.index("K")]
  qg = q.reshape(b, t, kv_heads, n // kv_heads, h)  # [B, T, K, G, H]
  scale_layout = kv_layout.replace("H", "")  # [B, S, K] or [B, K, S]
  per_key = lambda s: jnp.einsum(f"{scale_layout}->BKS", s)[:, :, None, None, :]  # noqa: E731  [B, K, 1, 1, S]
  scores = jnp.einsum(f"BTKGH,{kv_layout}->BKGTS", qg, k.astype(q.dtype), preferred_element_type=F32) * (h ** -0.5)
  if scales is not None:
    scores = scores * per_key(scales[0])
  scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(F32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  if scales is not None:
    probs = probs * per_key(scales[1])
  out = jnp.einsum(f"BKGTS,{kv_layout}->BTKGH", probs.astype(q.dtype), v.astype(q.dtype))
  return out.reshape(b, t, n, h)


def attend_fused(q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask) -> jax.Array:
  """`attend` through jax.nn.dot_product_attention (cuDNN flash attention on GPU), for self-attention.

  `is_causal` lets the kernel skip the upper triangle; the [B, T, T] mask is passed only for packed rows (a
  32k-token prompt would need 1 GB of it per row).
  """
  dense = mask.dense()[:, None] if mask.packed else None
  return jax.nn.dot_product_attention(q, k, v, mask=dense, is_causal=True, implementation=FUSED_IMPLEMENTATION)


SPLASH_BLOCKS = (512, 256, 128)  # splash attention's block sizes, the largest that divides T; T % 128 == 0


def splash_fits(t: int) -> bool:
  return t % SPLASH_BLOCKS[-1] == 0


@functools.lru_cache(maxsize=None)
def _splash_kernel(t: int, heads: int, interpret: bool):
  block = next(b for b in SPLASH_BLOCKS if t % b == 0)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                            block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  causal = splash_mask.MultiHeadMask([splash_mask.CausalMask((t, t))] * heads)
  with jax.ensure_compile_time_eval():  # its block tables are constants, cached across traces
    return splash.make_splash_mha(causal, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret)


def attend_splash(q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask) -> jax.Array:
  """`attend` through the Pallas TPU splash attention kernel (flash attention that skips the blocks above the
  diagonal), for self-attention over T a multiple of 128. It masks by index within segments, which is our mask:
  positions rise by one within each segment. Under a mesh it runs per device in a shard_map over the batch (and
  the heads, when the mesh splits q and kv heads alike). Off TPU the kernel is interpreted (tests).
  """
  interpret = jax.default_backend() != "tpu"

  def local(q, k, v, q_seg, kv_seg):  # q [B', T, N', H], k / v [B', T, K', H], segments [B', T]
    kernel = _splash_kernel(q.shape[1], q.shape[2], interpret)
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
    one = lambda q, k, v, qs, ks: kernel(q, k, v, segment_ids=splash.SegmentIds(qs, ks))  # noqa: E731
    out = jax.vmap(one)(heads_first(q * q.shape[-1] ** -0.5), heads_first(k), heads_first(v), q_seg, kv_seg)
    return heads_first(out)

  mesh = sharding.current_mesh()
  if mesh is None:
    return local(q, k, v, mask.q_seg, mask.kv_seg)
  q_spec = sharding.spec_for(("batch", None, "q_heads", None), q.shape, mesh, "q")
  k_spec = sharding.spec_for(("batch", None, "kv_heads", None), k.shape, mesh, "k")
  if q_spec[2] != k_spec[2]:  # e.g. 4 kv heads on tensor=8: keep every head on every device
    q_spec, k_spec = P(q_spec[0], None, None, None), P(k_spec[0], None, None, None)
  rows = P(q_spec[0], None)
  return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, k_spec, k_spec, rows, rows), out_specs=q_spec,
                       check_vma=False)(q, k, v, mask.q_seg, mask.kv_seg)  # pallas_call outputs carry no vma


class Attention(nnx.Module):
  """Self-attention with q/k/v bias, no o bias; optional KV cache (see kv_cache.py) and LoRA adapters."""

  def __init__(self, cfg: QwenMoeConfig, dtype: jnp.dtype, rngs: nnx.Rngs, backend: str = "xla",
               lora: lora_lib.LoraConfig | None = None, decode: str = "xla"):
    d, n, k, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.dim_per_head
    self.q_proj = param(rngs, (d, n, h), ("embed", "q_heads", None), dtype)  # [D, N, H]
    self.k_proj = param(rngs, (d, k, h), ("embed", "kv_heads", None), dtype)  # [D, K, H]
    self.v_proj = param(rngs, (d, k, h), ("embed", "kv_heads", None), dtype)  # [D, K, H]
    self.o_proj = param(rngs, (n, h, d), ("q_heads", None, "embed"), dtype)  # [N, H, D]
    if cfg.qkv_bias:
      self.q_bias = param(rngs, (n, h), ("q_heads", None), dtype, init="zeros")  # [N, H]
      self.k_bias = param(rngs, (k, h), ("kv_heads", None), dtype, init="zeros")  # [K, H]
      self.v_bias = param(rngs, (k, h), ("kv_heads", None), dtype, init="zeros")  # [K, H]
    self.qkv_bias = cfg.qkv_bias
    self.backend, self.decode = backend, decode  # Kernels.attention, Kernels.decode
    lora_lib.attach(self, "attention", lora, rngs)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: Mask, cache: LayerKV | None = None,
               slots: jax.Array | None = None, cache_rows: tuple[jax.Array, jax.Array] | None = None,
               attend_cache: bool = False) -> tuple[jax.Array, LayerKV | None]:
    """x [B, T, D] -> [B, T, D].

    Without `attend_cache`, attention runs over x's own keys (prefill, training), and a cache
    (k, v [C, K, S, H], S >= T slots) gets this call's keys and values at slots [0, T): row b in cache row b,
    or with `cache_rows` (rows [R], source [R] or None for 0..R-1) x's row source[r] in cache row rows[r], so
    that one prompt run once can fill several rows (rows >= C: dropped) (prefill; over an int8 cache, attention
    sees the keys and values as the cache holds them, as the tokens after them will). With `attend_cache`
    (decoding), each row's keys and values go to its slots [B, T] and attention runs over the whole cache.
    """
    q = lora_lib.project(self, "q_proj", "BTD,DNH->BTNH", x)
    k = lora_lib.project(self, "k_proj", "BTD,DKH->BTKH", x)
    v = lora_lib.project(self, "v_proj", "BTD,DKH->BTKH", x)
    if self.qkv_bias:
      q, k, v = q + self.q_bias[...], k + self.k_bias[...], v + self.v_bias[...]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    scales, kv_layout = None, "BSKH"
    if cache is not None:
      b, t = x.shape[:2]
      if attend_cache:  # decoding: each row's keys and values at its slots
        cache = cache.write(jnp.arange(b), slots, k, v)
        k, v, kv_layout = cache.k, cache.v, "BKSH"
        scales = (cache.k_scale, cache.v_scale) if cache.quantized else None
      else:  # prefill: slots [0, T) of cache rows `rows` from x's rows `source`
        rows, source = (jnp.arange(b), None) if cache_rows is None else cache_rows
        new_k, new_v = (k, v) if source is None else (k[source], v[source])  # [R, T, K, H]
        cache = cache.write(rows, jnp.broadcast_to(jnp.arange(t), (rows.shape[0], t)), new_k, new_v)
      if not attend_cache and cache.quantized:
        k, v = round_trip(k), round_trip(v)
    if self.backend == "cudnn" and not attend_cache and q.dtype in FUSED_DTYPES:
      out = attend_fused(q, k, v, mask)
    elif self.backend == "splash" and not attend_cache and splash_fits(q.shape[1]):
      out = attend_splash(q, k, v, mask)
    elif self.decode == "pallas" and attend_cache and q.shape[1] == 1 and decode_attention.fits(*k.shape[2:]):
      out = decode_attention.attend(q[:, 0], k, v, mask.q_pos[:, 0] + 1, scales)[:, None]  # slots [0, position]
    else:
      out = attend(q, k, v, mask, scales=scales, kv_layout=kv_layout)
    return lora_lib.project(self, "o_proj", "BTNH,NHD->BTD", out), cache


def swiglu(h: jax.Array) -> jax.Array:
  """[..., C=2, F] gate/up pair -> silu(gate) * up [..., F]."""
  return jax.nn.silu(h[..., 0, :]) * h[..., 1, :]


class Mlp(nnx.Module):
  """down(silu(gate(x)) * up(x)); gate and up are stored side by side as wi [D, 2, F]. `lora_group`: the
  LoRA target group this MLP belongs to ("mlp" or "shared_expert")."""

  def __init__(self, hidden: int, width: int, dtype: jnp.dtype, rngs: nnx.Rngs,
               lora: lora_lib.LoraConfig | None = None, lora_group: str = "mlp"):
    self.wi = param(rngs, (hidden, 2, width), ("embed", None, "mlp"), dtype)  # [D, C, F]
    self.wo = param(rngs, (width, hidden), ("mlp", "embed"), dtype)  # [F, D]
    lora_lib.attach(self, lora_group, lora, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = lora_lib.project(self, "wi", "...D,DCF->...CF", x)
    return lora_lib.project(self, "wo", "...F,FD->...D", swiglu(h))
