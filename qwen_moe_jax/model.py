"""Qwen2-MoE causal language model (transformers' Qwen2MoeForCausalLM) in Flax NNX.

Shape letters: B batch, T positions, S cache slots, D model width, V vocabulary, L sparse (MoE) layers,
N tokens (B x T), E experts. Projections are einsums over these letters; see layers.py and moe.py.

    tokens -> embed -> [DecoderLayer] x num_hidden_layers -> RMSNorm -> lm_head -> logits
    DecoderLayer: x + attn(norm(x)), then h + mlp(norm(h)), where mlp is a MoeBlock or a dense Mlp.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from qwen_moe_jax import sharding
from qwen_moe_jax.config import QwenMoeConfig
from qwen_moe_jax.kernels import Kernels
from qwen_moe_jax.kv_cache import KVCache
from qwen_moe_jax.layers import F32, Attention, Mask, Mlp, RMSNorm, param, rope_frequencies, rope_tables
from qwen_moe_jax.lora import LoraConfig
from qwen_moe_jax.moe import MoeBlock

ACTIVATION_AXES = ("batch", None, None)  # [B, T, D]
MLP_TOKENS = 16384  # most tokens per device that the MLP half of a layer takes at once (see in_token_blocks)

REMAT_POLICIES: dict[str, Callable | None] = {
  "none": None,  # no rematerialisation
  "full": jax.checkpoint_policies.nothing_saveable,  # recompute each layer in the backward pass
  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
}


class DecoderLayer(nnx.Module):
  def __init__(self, cfg: QwenMoeConfig, index: int, dtype: jnp.dtype, rngs: nnx.Rngs, expert_shards: int,
               kernels: Kernels, lora: LoraConfig | None = None):
    self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, rngs)
    self.attn = Attention(cfg, dtype, rngs, kernels.attention, lora, kernels.decode)
    self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, rngs)
    self.is_moe = cfg.is_moe_layer(index)
    if self.is_moe:
      self.mlp = MoeBlock(cfg, dtype, rngs, expert_shards, kernels.experts, lora, kernels.expert_dtype == "int8")
    else:
      self.mlp = Mlp(cfg.hidden_size, cfg.intermediate_size, dtype, rngs, lora, "mlp")

  def __call__(self, x, cos, sin, mask, cache=None, slots=None, cache_rows=None, attend_cache=False):
    """x [B, T, D] -> (x [B, T, D], router logits [N, E] or None, this layer's kv_cache.LayerKV or None)."""
    with jax.named_scope("attention"):
      h, cache = self.attn(self.input_norm(x), cos, sin, mask, cache, slots, cache_rows, attend_cache)
      x = sharding.constrain(x + h, ACTIVATION_AXES)
    with jax.named_scope("moe" if self.is_moe else "mlp"):
      h, router_logits = in_token_blocks(self.mlp_with_logits, self.post_attn_norm(x))
      x = sharding.constrain(x + h, ACTIVATION_AXES)
    return x, router_logits, cache

  def mlp_with_logits(self, h: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """h [B, T, D] -> (MLP output [B, T, D], router logits [B*T, E] for a MoE layer, else None)."""
    return self.mlp(h) if self.is_moe else (self.mlp(h), None)


def in_token_blocks(fn: Callable, h: jax.Array) -> tuple[jax.Array, jax.Array | None]:
  """fn (h [B, t, D] -> ([B, t, D], [B*t, E] or None)) over blocks of positions, so that a device holds at
  most MLP_TOKENS of its tokens in the MLP at once (the routed rows of one 131,072-token prompt to 57B-A14B are
  7.5 GB in bf16 on every device of an expert axis; the expert hidden states 1.4x that). Exact: the MLP acts on
  each token alone. Short inputs (decoding, usual training rows) run in one block."""
  b, t, d = h.shape
  rows = sharding.local_size("batch", b)
  if rows * t <= MLP_TOKENS:
    return fn(h)
  block = max(1, MLP_TOKENS // rows)
  blocks = -(-t // block)
  h = jnp.pad(h, ((0, 0), (0, blocks * block - t), (0, 0)))  # padded positions: outputs dropped below

  def one(i):  # positions [i * block, (i + 1) * block)
    part = sharding.constrain(jax.lax.dynamic_slice_in_dim(h, i * block, block, axis=1), ACTIVATION_AXES)
    return fn(part)

  y, logits = jax.lax.map(one, jnp.arange(blocks))  # [blocks, B, block, D], [blocks, B*block, E] or None
  y = jnp.moveaxis(y, 0, 1).reshape(b, blocks * block, d)[:, :t]
  if logits is not None:
    logits = jnp.moveaxis(logits.reshape(blocks, b, block, -1), 0, 1).reshape(b, blocks * block, -1)[:, :t]
    logits = logits.reshape(b * t, -1)
  return y, logits


def embed_lookup(table: jax.Array, tokens: jax.Array) -> jax.Array:
  """table [V, D], tokens [B, T] -> [B, T, D].

  Under a mesh this is an explicit shard_map (XLA's own partitioning of the gather replicates the table): each
  device gathers the table's model-dim shards, looks up the tokens in its vocabulary shard (zeros for ids
  outside it), and a psum over the vocabulary axes completes every row.
  """
  mesh = sharding.current_mesh()
  if mesh is None:
    return jnp.take(table, tokens, axis=0)
  table_spec = sharding.spec_for(("vocab", "embed"), table.shape, mesh, "embed")
  token_spec = sharding.spec_for(("batch", None), tokens.shape, mesh, "tokens")
  vocab_axes, embed_axes = sharding.axes_of(table_spec[0]), sharding.axes_of(table_spec[1])
  unsplit = tuple(a for a in embed_axes if a not in sharding.axes_of(token_spec[0]))  # e.g. one prompt on fsdp=2

  def local(table, tokens):  # table [V/v, D/e], tokens [B/b, T]
    for a in embed_axes:
      table = jax.lax.all_gather(table, a, axis=1, tiled=True)
    ids = tokens - sharding.shard_index(vocab_axes, mesh) * table.shape[0]
    mine = (ids >= 0) & (ids < table.shape[0])
    x = jnp.where(mine[..., None], jnp.take(table, jnp.where(mine, ids, 0), axis=0), 0)
    x = jax.lax.psum(x, vocab_axes) if vocab_axes else x
    return sharding.replicated(x, unsplit, mesh)

  return jax.shard_map(local, mesh=mesh, in_specs=(table_spec, token_spec),
                       out_specs=P(*token_spec, None))(table, tokens)


@dataclasses.dataclass
class Output:
  hidden: jax.Array  # [B, T, D] after the final norm
  router_logits: jax.Array | None  # [L, N, E] for the sparse layers (None if there are none)
  cache: KVCache | None
  layer_outputs: list[jax.Array] | None = None  # [B, T, D] per layer, before the final norm


class QwenMoeForCausalLM(nnx.Module):
  def __init__(self, cfg: QwenMoeConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.bfloat16,
               expert_shards: int = 1, kernels: Kernels = Kernels(), lora: LoraConfig | None = None):
    """`expert_shards`: the expert axis size; experts are padded to a multiple of it (never routed to).
    `kernels`: which implementations run the routed experts and attention (see kernels.py). `lora`: LoRA
    adapters on the weights of its target groups (see lora.py)."""
    self.config = cfg
    self.embed = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dtype)  # [V, D]
    self.layers = nnx.List([
      DecoderLayer(cfg, i, dtype, rngs, expert_shards, kernels, lora) for i in range(cfg.num_hidden_layers)
    ])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, rngs)
    self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dtype)  # [D, V]

  def __call__(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array | None = None,
               cache: KVCache | None = None, cache_rows: tuple[jax.Array, jax.Array] | None = None,
               attend_cache: bool = False, remat: str = "none", return_layer_outputs: bool = False,
               packed: bool = True) -> Output:
    """tokens, positions [B, T] int32 -> final hidden states [B, T, D] (call `logits` on what you need).

    segment_ids [B, T]: tokens attend only within their segment (packing); 0 marks padding; `packed` False
    promises one sequence per row, right-padded (see layers.Mask), which spares the fused kernel a mask. With a cache
    [C, S] and no `attend_cache` (prefill, positions 0..T-1), keys and values fill slots [0, T) of rows 0..B-1,
    or with `cache_rows` (rows [R], source [R] or None) tokens' row source[r] (or r) fills cache row rows[r]; with
    `attend_cache` (decoding), each token's go to slot = its position and attention runs over the whole cache.
    """
    cfg = self.config
    if segment_ids is None:
      segment_ids = jnp.ones_like(tokens)
    x = sharding.constrain(embed_lookup(self.embed[...], tokens), ACTIVATION_AXES)
    cos, sin = rope_tables(positions, *rope_frequencies(cfg.dim_per_head, cfg.rope_theta, cfg.rope_scaling), x.dtype)
    if attend_cache:
      mask = Mask.over_cache(positions, cache.length)
    else:
      mask = Mask.self_attention(positions, segment_ids, packed)

    def run(layer, x, cos, sin, mask, kv):
      return layer(x, cos, sin, mask, kv, positions, cache_rows, attend_cache)

    if REMAT_POLICIES[remat] is not None:
      run = nnx.remat(run, policy=REMAT_POLICIES[remat])
    router_logits, layer_outputs, new_cache = [], [], []
    for i, layer in enumerate(self.layers):
      x, logits, kv = run(layer, x, cos, sin, mask, None if cache is None else cache.layer(i))
      if logits is not None:
        router_logits.append(logits)
      if kv is not None:
        new_cache.append(kv)
      if return_layer_outputs:
        layer_outputs.append(x)
    return Output(
      hidden=self.norm(x),
      router_logits=jnp.stack(router_logits) if router_logits else None,
      cache=None if cache is None else KVCache.from_layers(new_cache),
      layer_outputs=layer_outputs if return_layer_outputs else None,
    )

  def logits(self, hidden: jax.Array) -> jax.Array:
    """hidden [..., D] -> fp32 logits [..., V]."""
    return jnp.einsum("...D,DV->...V", hidden, self.lm_head[...], preferred_element_type=F32)


def abstract_model(cfg: QwenMoeConfig, dtype: jnp.dtype = jnp.float32, expert_shards: int = 1,
                   kernels: Kernels = Kernels(), lora: LoraConfig | None = None) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, state of ShapeDtypeStructs): the model's structure without allocating it."""
  model = nnx.eval_shape(lambda: QwenMoeForCausalLM(
    cfg, rngs=nnx.Rngs(0), dtype=dtype, expert_shards=expert_shards, kernels=kernels, lora=lora))
  return nnx.split(model)


def create_model(cfg: QwenMoeConfig, mesh: jax.sharding.Mesh, dtype: jnp.dtype = jnp.bfloat16,
                 kernels: Kernels = Kernels(), seed: int = 0) -> QwenMoeForCausalLM:
  """A randomly initialised model whose parameters are created directly in their shardings on `mesh`."""
  shards = sharding.expert_shards(mesh)
  graphdef, abstract = abstract_model(cfg, dtype, shards, kernels)

  @functools.partial(jax.jit, out_shardings=sharding.param_shardings(abstract, mesh))
  def init():
    return nnx.state(QwenMoeForCausalLM(cfg, rngs=nnx.Rngs(seed), dtype=dtype, expert_shards=shards,
                                        kernels=kernels))

  return nnx.merge(graphdef, init())


def group_of(path: str) -> str:
  """Parameters are read and written one group at a time: 'top' (embeddings, final norm, head) or 'layers.<i>'."""
  parts = path.split(".")
  return ".".join(parts[:2]) if parts[0] == "layers" else "top"


def param_count(state: nnx.State) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(state))
