"""LoRA adapters: a low-rank update W + (alpha / r) A B trained in place of a frozen weight W.

A weight is a projection from its input dims to its output dims (q_proj [D, N, H]: D -> N, H; o_proj
[N, H, D]: N, H -> D), routed-expert weights with the experts in front ([E, D, C, F]). Its adapter is
A [(E,) in..., r] (random) and B [(E,), r, out...] (zeros, so training starts from the base model exactly),
named `<weight>_lora_a` / `_lora_b` next to it, with the weight's logical axes (so they shard like it).
The model applies them on the activations, x W + ((x A) B) scale, which never forms the full-size update;
`merge` folds them into W for inference and export.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from qwen_moe_jax.errors import UserError

# target group -> the module's weights that get adapters: (attribute, number of input dims after the expert dim)
TARGETS: dict[str, tuple[tuple[str, int], ...]] = {
  "attention": (("q_proj", 1), ("k_proj", 1), ("v_proj", 1), ("o_proj", 2)),
  "shared_expert": (("wi", 1), ("wo", 1)),
  "experts": (("experts_wi", 1), ("experts_wo", 1)),
  "mlp": (("wi", 1), ("wo", 1)),  # dense-MLP layers
}
SUFFIXES = ("_lora_a", "_lora_b")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  rank: int
  alpha: float
  targets: tuple[str, ...] = tuple(TARGETS)
  int8_experts: bool = False  # trained over int8 routed experts (quantize.py): merges add to those rounded weights

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def validate(self) -> "LoraConfig":
    if self.rank < 1:
      raise UserError(f"--lora-rank must be >= 1, got {self.rank}")
    if not self.alpha > 0:
      raise UserError(f"--lora-alpha must be > 0, got {self.alpha}")
    unknown = [t for t in self.targets if t not in TARGETS]
    if unknown or not self.targets:
      raise UserError(f"--lora-targets: unknown group '{unknown[0] if unknown else ''}' (groups: {', '.join(TARGETS)})")
    return self

  def to_dict(self) -> dict:
    d = {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}
    return d | {"int8_experts": True} if self.int8_experts else d  # runs before int8 experts recorded no key

  @classmethod
  def from_dict(cls, d: dict) -> "LoraConfig":
    return cls(int(d["rank"]), float(d["alpha"]), tuple(d["targets"]), d.get("int8_experts") is True).validate()


def is_adapter(path: str) -> bool:
  return path.endswith(SUFFIXES)


def weight_of(path: str) -> str:
  """'layers.0.attn.q_proj_lora_a' -> 'layers.0.attn.q_proj'."""
  return path[: -len(SUFFIXES[0])]


def attach(module: nnx.Module, group: str, lora: LoraConfig | None, rngs: nnx.Rngs, experts: bool = False,
           dtype: jnp.dtype | None = None):
  """Gives `module`'s weights of target `group` adapters, if `lora` targets it, in `dtype` (default: the weights';
  int8 weights need a float one). `experts`: the weights' first dim is the experts, which A and B keep."""
  if lora is None or group not in lora.targets:
    return
  for name, n_in in TARGETS[group]:
    _attach_one(module, name, n_in, lora, rngs, int(experts), dtype)
  module.lora_scale = lora.scale


def _attach_one(module: nnx.Module, name: str, n_in: int, lora: LoraConfig, rngs: nnx.Rngs, lead: int,
                dtype: jnp.dtype | None):
  """`<name>_lora_a` ~ U(+-1/sqrt(fan_in)) (peft's default) and `<name>_lora_b` = 0 next to weight `name`."""
  w = getattr(module, name)
  dtype = dtype or w.dtype
  split = lead + n_in
  bound = 1 / math.sqrt(math.prod(w.shape[lead:split]))
  a_axes, b_axes = adapter_axes(w.get_metadata()["axes"], n_in, lead)
  a = jax.random.uniform(rngs.params(), (*w.shape[:split], lora.rank), jnp.float32, -bound, bound)
  setattr(module, name + "_lora_a", nnx.Param(a.astype(dtype), axes=a_axes))
  b = jnp.zeros((*w.shape[:lead], lora.rank, *w.shape[split:]), dtype)
  setattr(module, name + "_lora_b", nnx.Param(b, axes=b_axes))


def adapter_axes(axes: tuple, n_in: int, lead: int = 0) -> tuple[tuple, tuple]:
  """Logical axes of A and B for a weight with `axes`, `lead` leading (expert) dims and `n_in` input dims:
  A keeps the lead and input axes, B the lead and output axes; the rank dim is unsplit."""
  split = lead + n_in
  return (*axes[:split], None), (*axes[:lead], None, *axes[split:])


def adapter(module: nnx.Module, name: str) -> tuple[jax.Array, jax.Array] | None:
  """(A, B times the scale) of weight `name`, or None if it has no adapter."""
  if not hasattr(module, name + "_lora_a"):
    return None
  return getattr(module, name + "_lora_a")[...], getattr(module, name + "_lora_b")[...] * module.lora_scale


def project(module: nnx.Module, name: str, equation: str, x: jax.Array) -> jax.Array:
  """einsum(equation, x, W) plus the adapter's (x A) B when W has one; x ends with W's input dims."""
  y = jnp.einsum(equation, x, getattr(module, name)[...])
  ab = adapter(module, name)
  if ab is None:
    return y
  a, b = ab
  return y + jnp.tensordot(jnp.tensordot(x, a, a.ndim - 1), b, 1).astype(y.dtype)


def merge(w: jax.Array, a: jax.Array, b: jax.Array, scale: float, experts: bool) -> jax.Array:
  """W + scale A B (in float32, cast back to W's dtype): the weight the adapter makes."""
  product = lambda a, b: jnp.tensordot(a, b, 1)  # noqa: E731  [in..., r] x [r, out...] -> [in..., out...]
  delta = (jax.vmap(product) if experts else product)(a.astype(jnp.float32), b.astype(jnp.float32))
  return (w.astype(jnp.float32) + scale * delta).astype(w.dtype)


def merge_into(params: dict[str, jax.Array], adapters: dict[str, jax.Array], scale: float) -> dict[str, jax.Array]:
  """`params` (flat) with each weight that has an adapter in `adapters` (flat) replaced by `merge`."""
  out = dict(params)
  for key, a in adapters.items():
    if key.endswith(SUFFIXES[0]):
      w = weight_of(key)
      out[w] = _merge(params[w], a, adapters[w + SUFFIXES[1]], scale, ".mlp.experts_" in w)
  return out


_merge = jax.jit(merge, static_argnums=(3, 4))
