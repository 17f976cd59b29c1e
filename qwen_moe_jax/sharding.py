"""Meshes and the one table that maps logical axis names to mesh axes.

Weights carry logical names only (`nnx.Param(..., axes=("expert", "embed", None, "moe_mlp"))`); RULES says
which mesh axes each name is split over. A dimension that a mesh axis does not divide is replicated over
that axis (e.g. 4 kv heads on tensor=8), except experts, which the model pads to a multiple of the expert
axis. Two dimensions of one array mapped to the same mesh axis is a collision and an error.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qwen_moe_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# logical name -> mesh axes it is split over, outermost first.
RULES: dict[str, tuple[str, ...]] = {
  "batch": ("data", "fsdp", "expert"),  # activations: every axis that does not split the model's features
  "embed": ("fsdp",),  # weights' model dimension (ZeRO-3 style); activations keep it whole
  "vocab": ("tensor",),
  "q_heads": ("tensor",),
  "kv_heads": ("tensor",),
  "mlp": ("tensor",),  # dense MLP and shared-expert hidden
  "moe_mlp": ("tensor",),  # routed-expert hidden
  "expert": ("expert",),
}


def parse_mesh_spec(spec: str) -> dict[str, int]:
  """'data=2,expert=4' -> {'data': 2, 'expert': 4}; unknown axes and bad sizes are errors."""
  sizes: dict[str, int] = {}
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, eq, value = part.partition("=")
    name = name.strip()
    if not eq or name not in MESH_AXES:
      raise UserError(f"--mesh: '{part}' must be axis=size with axis one of {', '.join(MESH_AXES)}")
    if name in sizes:
      raise UserError(f"--mesh: axis '{name}' given twice")
    try:
      sizes[name] = int(value)
    except ValueError:
      raise UserError(f"--mesh: size of '{name}' must be an integer, got '{value.strip()}'") from None
    if sizes[name] < 1:
      raise UserError(f"--mesh: size of '{name}' must be >= 1, got {sizes[name]}")
  return sizes


def make_mesh(spec: str | dict[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
  """A Mesh over (data, fsdp, expert, tensor). Default: every device on the expert axis.

  The sizes must multiply to the number of devices used (all of `devices`, default all devices).
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = parse_mesh_spec(spec) if isinstance(spec, str) else dict(spec or {"expert": len(devices)})
  shape = tuple(sizes.get(a, 1) for a in MESH_AXES)
  if math.prod(shape) != len(devices):
    given = ",".join(f"{a}={n}" for a, n in zip(MESH_AXES, shape) if n > 1) or "1 device"
    raise UserError(f"--mesh: {given} uses {math.prod(shape)} devices, but {len(devices)} are available")
  return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES)


def spec_for(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh | jax.sharding.AbstractMesh,
             what: str = "array") -> P:
  """PartitionSpec for an array whose dims carry `names`, replicating dims a mesh axis does not divide."""
  if len(names) != len(shape):
    raise ValueError(f"{what}: {len(names)} axis names for shape {tuple(shape)}")
  used: dict[str, str] = {}
  out: list[tuple[str, ...] | None] = []
  for name, size in zip(names, shape):
    axes: list[str] = []
    if name is not None:
      if name not in RULES:
        raise ValueError(f"{what}: logical axis '{name}' has no rule")
      for axis in RULES[name]:
        n = mesh.shape.get(axis, 1)
        if n == 1:
          continue
        if axis in used:
          raise ValueError(f"{what}: logical axes '{used[axis]}' and '{name}' both map to mesh axis '{axis}'")
        if size % (math.prod(mesh.shape[a] for a in axes) * n) == 0:
          axes.append(axis)
          used[axis] = name
    out.append(tuple(axes) if len(axes) > 1 else axes[0] if axes else None)
  return P(*out)


def axes_of(entry: str | tuple[str, ...] | None) -> tuple[str, ...]:
  """The mesh axes of one PartitionSpec entry, as a tuple."""
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def param_shardings(abstract_state: nnx.State, mesh: Mesh) -> nnx.State:
  """NamedSharding for every Param from its `axes` metadata (params without names are replicated)."""

  def one(path, var):
    names = var.get_metadata().get("axes") or (None,) * len(var.shape)
    what = ".".join(str(k) for k in path)
    return var.replace(NamedSharding(mesh, spec_for(names, var.shape, mesh, what)))

  return nnx.map_state(one, abstract_state)


def with_shardings(tree: Any, shardings: Any) -> Any:
  """Abstract arrays (anything with shape and dtype) paired with shardings -> ShapeDtypeStructs carrying them."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def shard_index(axes: Sequence[str], mesh) -> jax.Array | int:
  """Inside shard_map: this device's row-major index among the shards of a dimension split over `axes`."""
  index = 0
  for a in axes:
    index = index * mesh.shape[a] + jax.lax.axis_index(a)
  return index


def replicated(x: jax.Array, axes: Sequence[str], mesh) -> jax.Array:
  """Inside shard_map: x, equal on every shard of `axes` but typed as varying over them (it was computed from
  all-gathered weights), as a value shard_map can return replicated: shard 0's copy, summed with zeros."""
  if not axes:
    return x
  return jax.lax.psum(jnp.where(shard_index(axes, mesh) == 0, x, jnp.zeros_like(x)), tuple(axes))


def current_mesh() -> jax.sharding.AbstractMesh | None:
  """The mesh set by `jax.set_mesh`, or None when running unsharded."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty or mesh.size == 1 else mesh


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """with_sharding_constraint by logical names under the current mesh; a no-op without one."""
  mesh = current_mesh()
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, spec_for(names, x.shape, mesh))


def local_size(name: str, size: int) -> int:
  """A dimension of `size` named `name`, as one device holds it under the current mesh (all of it without one)."""
  mesh = current_mesh()
  if mesh is None:
    return size
  return size // math.prod(mesh.shape[a] for a in axes_of(spec_for((name,), (size,), mesh)[0]))


def expert_shards(mesh: Mesh | None) -> int:
  """How many ways experts are split (the model pads the expert count to a multiple of this)."""
  if mesh is None:
    return 1
  return math.prod(mesh.shape.get(a, 1) for a in RULES["expert"])
