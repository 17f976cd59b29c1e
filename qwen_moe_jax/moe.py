"""The sparse MoE block: router, routed experts, shared expert, and the load-balancing loss.

Shape letters: N tokens (batch x time, flattened), D model width, E experts, F expert hidden, C gate/up (2),
K experts per token (top-k), R routed rows (N x K), r LoRA rank.

The routed experts sit behind one function, `routed_experts`, with interchangeable backends:
  dense   every expert on every token (the reference: simple, exact, O(N E) work)
  ragged  rows sorted by expert, two `jax.lax.ragged_dot`s (dropless; the CPU / TPU path)
  tokamax the same sorted rows through tokamax's Mosaic GPU grouped GEMM (optional `[gpu]` extra)
Both grouped-GEMM backends run few-row batches (decoding) through `experts_gathered`, which reads only the
weights of the experts in use. Every backend takes int8 expert weights with `scales` (quantize.py: one float32
scale per expert and output channel, which multiplies the matmul's output, so the weights stay int8 in memory).
Under a mesh with an expert axis the block runs inside `jax.shard_map`: each device computes the experts it
owns for every token routed to them and the partial outputs are summed across the expert axis.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from qwen_moe_jax import lora as lora_lib
from qwen_moe_jax import sharding
from qwen_moe_jax.config import QwenMoeConfig
from qwen_moe_jax.kernels import EXPERT_BACKENDS
from qwen_moe_jax.layers import F32, Mlp, param, swiglu


def route(x: jax.Array, router: jax.Array, top_k: int, normalize: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """x [N, D], router [D, E] -> logits [N, E] (x.dtype), weights [N, K] (x.dtype), expert ids [N, K].

  Softmax over all experts in fp32, then top-k, renormalised only if `normalize` (norm_topk_prob).
  """
  logits = jnp.einsum("ND,DE->NE", x, router)
  probs = jax.nn.softmax(logits.astype(F32), axis=-1)
  weights, ids = jax.lax.top_k(probs, top_k)
  if normalize:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return logits, weights.astype(x.dtype), ids


class ExpertScales(NamedTuple):
  """The scales of int8 expert weights (see quantize.py): weight = int8 x scale of its output channel."""

  wi: jax.Array  # [E, C, F] float32
  wo: jax.Array  # [E, D] float32


def _int8_as(x: jax.Array, w: jax.Array) -> jax.Array:
  """int8 weights w in x's dtype for a matmul with x (float weights as they are).

  The conversion is made to depend on x (adding 0 x[0]), so it runs where its matmul runs: XLA otherwise
  converts every layer's experts at the start of a program (measured: all layers' converted experts held at
  once, as many bytes as float experts; an optimization barrier did not stop it) and hoists the conversion out
  of a decode loop as loop-invariant code.
  """
  return w.astype(x.dtype) + 0 * x.reshape(-1)[0] if w.dtype == jnp.int8 else w


def _scaled(y: jax.Array, scale: jax.Array | None) -> jax.Array:
  """A matmul's output y [..., out] over int8 weights times its channels' scales [..., out] (None: float weights)."""
  return y if scale is None else (y * scale).astype(y.dtype)


class ExpertLora(NamedTuple):
  """The routed experts' LoRA adapters (see lora.py), B already times the scale."""

  wi_a: jax.Array  # [E, D, r]
  wi_b: jax.Array  # [E, r, C, F]
  wo_a: jax.Array  # [E, F, r]
  wo_b: jax.Array  # [E, r, D]


def experts_dense(x, ids, weights, wi, wo, first_expert, lora: ExpertLora | None = None,
                  scales: ExpertScales | None = None):
  """Reference: run every local expert on every token, keep the routed ones.

  x [N, D], ids / weights [N, K], wi [E, D, C, F], wo [E, F, D] -> [N, D]. Experts are numbered from
  `first_expert` (ids outside [first_expert, first_expert + E) belong to other devices). `lora`: adapters
  added to wi and wo, applied to the activations. `scales`: wi and wo are int8 (see ExpertScales).
  """
  e = wi.shape[0]
  combine = jnp.sum(jax.nn.one_hot(ids - first_expert, e, dtype=weights.dtype) * weights[..., None], axis=1)  # [N, E]
  h = _scaled(jnp.einsum("ND,EDCF->NECF", x, _int8_as(x, wi)), None if scales is None else scales.wi[None])
  if lora is not None:
    h += jnp.einsum("NEr,ErCF->NECF", jnp.einsum("ND,EDr->NEr", x, lora.wi_a), lora.wi_b)
  g = swiglu(h)  # [N, E, F]
  y = _scaled(jnp.einsum("NEF,EFD->NED", g, _int8_as(g, wo)), None if scales is None else scales.wo[None])
  if lora is not None:
    y += jnp.einsum("NEr,ErD->NED", jnp.einsum("NEF,EFr->NEr", g, lora.wo_a), lora.wo_b)
  return jnp.einsum("NED,NE->ND", y, combine)


def experts_sorted(x, ids, weights, wi, wo, first_expert, ragged_dot=jax.lax.ragged_dot,
                   lora: ExpertLora | None = None, scales: ExpertScales | None = None):
  """Dropless grouped GEMM: sort the N x K routed rows by expert, two ragged_dots, unsort, weight, sum.

  Same contract as `experts_dense`. Rows routed to experts on other devices sort last, outside every group.
  """
  n, k = ids.shape
  e, d, _, f = wi.shape
  local = ids.reshape(-1) - first_expert  # [R]
  local = jnp.where((local >= 0) & (local < e), local, e)  # e: not on this device
  order = jnp.argsort(local, stable=True)  # [R] sorted by expert
  sizes = jnp.bincount(local, length=e + 1)[:e].astype(jnp.int32)  # [E]
  rows = x[order // k]  # [R, D]
  expert = jnp.minimum(local[order], e - 1)  # [R] each sorted row's expert (rows of other devices: zeroed below)
  h = _scaled(ragged_dot(rows, _int8_as(x, wi.reshape(e, d, 2 * f)), sizes),  # [R, C x F]
              None if scales is None else scales.wi.reshape(e, 2 * f)[expert])
  if lora is not None:
    h += ragged_dot(ragged_dot(rows, lora.wi_a, sizes), lora.wi_b.reshape(e, -1, 2 * f), sizes)
  g = swiglu(h.reshape(-1, 2, f))  # [R, F]
  y = _scaled(ragged_dot(g, _int8_as(g, wo), sizes), None if scales is None else scales.wo[expert])  # [R, D]
  if lora is not None:
    y += ragged_dot(ragged_dot(g, lora.wo_a, sizes), lora.wo_b, sizes)
  y = jnp.where((local[order] < e)[:, None], y, 0)
  unsorted = jnp.zeros_like(y).at[order].set(y, unique_indices=True).reshape(n, k, d)  # [N, K, D]
  return jnp.einsum("NKD,NK->ND", unsorted, weights)


def experts_gathered(x, ids, weights, wi, wo, first_expert, lora: ExpertLora | None = None,
                     scales: ExpertScales | None = None):
  """Few routed rows (decoding): gather just the K experts each token uses and run them as batched matmuls.

  Reads N x K experts' weights instead of all E, which wins while N x K is small next to E. Same contract as
  `experts_dense`.
  """
  e = wi.shape[0]
  local = ids - first_expert  # [N, K]
  mine = (local >= 0) & (local < e)
  local = jnp.where(mine, local, 0)
  h = _scaled(jnp.einsum("ND,NKDCF->NKCF", x, _int8_as(x, wi[local])), None if scales is None else scales.wi[local])
  if lora is not None:
    h += jnp.einsum("NKr,NKrCF->NKCF", jnp.einsum("ND,NKDr->NKr", x, lora.wi_a[local]), lora.wi_b[local])
  g = swiglu(h)  # [N, K, F]
  y = _scaled(jnp.einsum("NKF,NKFD->NKD", g, _int8_as(g, wo[local])), None if scales is None else scales.wo[local])
  if lora is not None:
    y += jnp.einsum("NKr,NKrD->NKD", jnp.einsum("NKF,NKFr->NKr", g, lora.wo_a[local]), lora.wo_b[local])
  return jnp.einsum("NKD,NK->ND", y, jnp.where(mine, weights, 0))


WI_AXES = ("expert", "embed", None, "moe_mlp")  # experts_wi [E, D, C, F]
WO_AXES = ("expert", "moe_mlp", "embed")  # experts_wo [E, F, D]
LORA_AXES = ExpertLora(*lora_lib.adapter_axes(WI_AXES, 1, 1), *lora_lib.adapter_axes(WO_AXES, 1, 1))
SCALE_AXES = ExpertScales(wi=("expert", None, "moe_mlp"), wo=("expert", "embed"))  # [E, C, F], [E, D]

GATHER_MAX_ROWS_PER_EXPERT = 0.5  # routed rows / local experts below which the gathered path is used


def tokamax_ragged_dot() -> Callable:
  try:
    import tokamax  # optional [gpu] extra
  except ImportError as e:
    raise RuntimeError("expert backend 'tokamax' needs the [gpu] extra (pip install 'qwen-moe-jax[gpu]')") from e
  return tokamax.ragged_dot


def routed_experts(x, ids, weights, wi, wo, first_expert: int | jax.Array, backend: str,
                   lora: ExpertLora | None = None, scales: ExpertScales | None = None) -> jax.Array:
  """Dispatch to a backend; all take x [N, D], ids / weights [N, K], wi [E, D, C, F], wo [E, F, D], lora, scales.

  The grouped-GEMM backends hand small batches (fewer routed rows than half the local experts: decoding) to
  `experts_gathered`, which reads only the experts in use.
  """
  if backend == "dense":
    return experts_dense(x, ids, weights, wi, wo, first_expert, lora, scales)
  if backend not in ("ragged", "tokamax"):
    raise ValueError(f"expert backend must be one of {EXPERT_BACKENDS}, got {backend!r}")
  if ids.size < GATHER_MAX_ROWS_PER_EXPERT * wi.shape[0]:
    return experts_gathered(x, ids, weights, wi, wo, first_expert, lora, scales)
  ragged_dot = tokamax_ragged_dot() if backend == "tokamax" else jax.lax.ragged_dot
  return experts_sorted(x, ids, weights, wi, wo, first_expert, ragged_dot, lora, scales)


def _expert_parallel(x, ids, weights, wi, wo, backend: str, mesh, lora: ExpertLora | None = None,
                     scales: ExpertScales | None = None) -> jax.Array:
  """routed_experts under shard_map: experts split over the expert axis, their hidden over tensor.

  Tokens arrive split over the batch axes. If the expert axis splits tokens too, each device first gathers
  the tokens of its expert group, computes its own experts' share, and a reduce-scatter returns every token
  its summed output; otherwise the shares are summed with a psum. FSDP-split weights are gathered first (over
  an FSDP axis that does not split the tokens, e.g. one prompt, the output is then marked replicated).
  """
  tok_spec = sharding.spec_for(("batch", None), x.shape, mesh, "moe tokens")
  wi_spec = sharding.spec_for(WI_AXES, wi.shape, mesh, "experts.wi")
  wo_spec = sharding.spec_for(WO_AXES, wo.shape, mesh, "experts.wo")
  tok_axes = sharding.axes_of(tok_spec[0])
  expert_axes = sharding.axes_of(wi_spec[0])
  fsdp_axes = sharding.axes_of(wi_spec[1])
  gather_tokens = tuple(a for a in expert_axes if a in tok_axes)
  sum_axes = tuple(a for a in expert_axes if a not in tok_axes) + sharding.axes_of(wi_spec[3])
  unsplit = tuple(a for a in fsdp_axes if a not in tok_axes)
  local_experts = wi.shape[0] // math.prod(mesh.shape[a] for a in expert_axes)
  lora_specs = None if lora is None else ExpertLora(
    *(sharding.spec_for(names, a.shape, mesh, "experts lora") for names, a in zip(LORA_AXES, lora)))
  scale_specs = None if scales is None else ExpertScales(
    *(sharding.spec_for(names, a.shape, mesh, "experts scales") for names, a in zip(SCALE_AXES, scales)))

  def local(x, ids, weights, wi, wo, lora=None, scales=None):
    for a in fsdp_axes:  # the model dim: wi, wi_a axis 1; wo, wo_b axis 2; wo's scales axis 1
      wi = jax.lax.all_gather(wi, a, axis=1, tiled=True)
      wo = jax.lax.all_gather(wo, a, axis=2, tiled=True)
      if scales is not None:
        scales = scales._replace(wo=jax.lax.all_gather(scales.wo, a, axis=1, tiled=True))
      if lora is not None:
        lora = lora._replace(wi_a=jax.lax.all_gather(lora.wi_a, a, axis=1, tiled=True),
                             wo_b=jax.lax.all_gather(lora.wo_b, a, axis=2, tiled=True))
    if gather_tokens:
      x, ids, weights = (jax.lax.all_gather(t, gather_tokens, axis=0, tiled=True) for t in (x, ids, weights))
    first = sharding.shard_index(expert_axes, mesh) * local_experts
    y = routed_experts(x, ids, weights, wi, wo, first, backend, lora, scales)
    if sum_axes:
      y = jax.lax.psum(y, sum_axes)
    if gather_tokens:
      y = jax.lax.psum_scatter(y, gather_tokens, scatter_dimension=0, tiled=True)
    return sharding.replicated(y, unsplit, mesh)

  args, specs = (x, ids, weights, wi, wo, lora, scales), (tok_spec, tok_spec, tok_spec, wi_spec, wo_spec,
                                                          lora_specs, scale_specs)
  return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=tok_spec)(*args)


class MoeBlock(nnx.Module):
  """Routed experts plus a shared expert scaled by sigmoid(shared_expert_gate(x))."""

  def __init__(self, cfg: QwenMoeConfig, dtype: jnp.dtype, rngs: nnx.Rngs, expert_shards: int = 1,
               backend: str = "ragged", lora: lora_lib.LoraConfig | None = None, int8: bool = False):
    """`int8`: the routed experts' weights held as int8 with float32 scales (see quantize.py)."""
    d, f = cfg.hidden_size, cfg.moe_intermediate_size
    padded = -(-cfg.num_experts // expert_shards) * expert_shards  # never routed to: ids < num_experts
    weights = jnp.int8 if int8 else dtype
    self.router = param(rngs, (d, cfg.num_experts), ("embed", None), dtype)  # [D, E]
    self.experts_wi = param(rngs, (padded, d, 2, f), WI_AXES, weights)  # [E, D, C, F]
    self.experts_wo = param(rngs, (padded, f, d), WO_AXES, weights)  # [E, F, D]
    if int8:
      self.experts_wi_scale = param(rngs, (padded, 2, f), SCALE_AXES.wi, jnp.float32, init="ones")  # [E, C, F]
      self.experts_wo_scale = param(rngs, (padded, d), SCALE_AXES.wo, jnp.float32, init="ones")  # [E, D]
    self.int8 = int8
    self.shared_expert = Mlp(d, cfg.shared_expert_intermediate_size, dtype, rngs, lora, "shared_expert")
    self.shared_gate = param(rngs, (d,), ("embed",), dtype)  # [D]
    self.top_k = cfg.num_experts_per_tok
    self.normalize = cfg.norm_topk_prob
    self.backend = backend
    lora_lib.attach(self, "experts", lora, rngs, experts=True, dtype=dtype)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [B, T, D] -> (out [B, T, D], router logits [B*T, E])."""
    b, t, d = x.shape
    x2 = x.reshape(b * t, d)  # [N, D]
    with jax.named_scope("router"):
      logits, weights, ids = route(x2, self.router[...], self.top_k, self.normalize)
    with jax.named_scope("routed_experts"):
      mesh = sharding.current_mesh()
      wi, wo = self.experts_wi[...], self.experts_wo[...]
      adapters = lora_lib.adapter(self, "experts_wi"), lora_lib.adapter(self, "experts_wo")
      lora = None if adapters[0] is None else ExpertLora(*adapters[0], *adapters[1])
      scales = ExpertScales(self.experts_wi_scale[...], self.experts_wo_scale[...]) if self.int8 else None
      if mesh is None:
        routed = routed_experts(x2, ids, weights, wi, wo, 0, self.backend, lora, scales)
      else:
        routed = _expert_parallel(x2, ids, weights, wi, wo, self.backend, mesh, lora, scales)
    with jax.named_scope("shared_expert"):
      gate = jax.nn.sigmoid(jnp.einsum("ND,D->N", x2, self.shared_gate[...]))[:, None]
      shared = gate * self.shared_expert(x2)
    return (routed + shared).reshape(b, t, d), logits


def load_balancing_loss(router_logits: jax.Array, top_k: int, mask: jax.Array | None = None) -> jax.Array:
  """transformers' load_balancing_loss_func (without the coefficient) on raw router logits.

  router_logits [L, N, E] for the L sparse layers, mask [N] (1 = real token, 0 = padding). One softmax per
  layer; counts and probabilities are summed over layers and normalised by L x (real tokens).
  """
  num_experts = router_logits.shape[-1]
  probs = jax.nn.softmax(router_logits.astype(F32), axis=-1)  # [L, N, E]
  _, chosen = jax.lax.top_k(probs, top_k)  # [L, N, K]
  counts = jnp.sum(jax.nn.one_hot(chosen, num_experts, dtype=F32), axis=-2)  # [L, N, E]
  m = jnp.ones(router_logits.shape[1], F32) if mask is None else mask.astype(F32)
  rows = router_logits.shape[0] * jnp.sum(m)
  tokens_per_expert = jnp.einsum("LNE,N->E", counts, m) / rows
  prob_per_expert = jnp.einsum("LNE,N->E", probs, m) / rows
  return num_experts * jnp.sum(tokens_per_expert * prob_per_expert)
