"""Orbax checkpoints of model parameters: streaming writes, strict restores onto any mesh.

A checkpoint folder (what the converter writes) holds config.json, the tokenizer files and `params/`, an
Orbax PyTree checkpoint of the parameters as nested dicts with string keys ({"layers": {"0": {...}}}).
A training run folder holds the same side files and `checkpoints/<step>/` with a `params` item; every
function here that takes a folder accepts either (a run folder means its latest complete step).
Experts are stored unpadded; a model built for an expert axis that does not divide the expert count is
padded on restore and sliced back on save, so checkpoints never show the padding.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
from flax import nnx
from jax.sharding import PartitionSpec as P

from qwen_moe_jax import sharding
from qwen_moe_jax.config import QwenMoeConfig
from qwen_moe_jax.errors import UserError
from qwen_moe_jax.kernels import Kernels
from qwen_moe_jax.model import QwenMoeForCausalLM, abstract_model

PARAMS_DIR = "params"
RUN_CHECKPOINTS_DIR = "checkpoints"
PARAMS_ITEM = "params"  # checkpointable name inside a training step
EXPERT_LEAVES = ("experts_wi", "experts_wo")  # leading dimension is the (padded) expert axis


def path_str(path: Iterable[Any]) -> str:
  return ".".join(str(getattr(k, "key", k)) for k in path)


def flatten(tree: Any) -> dict[str, Any]:
  """Nested dicts / nnx.State -> {'layers.0.attn.q_proj': leaf}."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
  return {path_str(p): v.get_value() if isinstance(v, nnx.Variable) else v for p, v in leaves}


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
  """{'layers.0.attn.q_proj': leaf} -> {'layers': {'0': {'attn': {'q_proj': leaf}}}}."""
  tree: dict[str, Any] = {}
  for key, value in flat.items():
    node = tree
    *parents, last = key.split(".")
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = value
  return tree


def group_of(path: str) -> str:
  """Parameters are written and read one group at a time: 'top' or 'layers.<i>'."""
  parts = path.split(".")
  return ".".join(parts[:2]) if parts[0] == "layers" else "top"


def param_shapes(cfg: QwenMoeConfig) -> dict[str, tuple[int, ...]]:
  """Checkpoint (unpadded) shape of every parameter."""
  return {k: v.shape for k, v in flatten(abstract_model(cfg)[1]).items()}


@dataclasses.dataclass(frozen=True)
class Location:
  path: Path  # what ocp.load takes
  item: str | None  # checkpointable name (None: the PyTree checkpoint's own)


def latest_step(run_dir: Path) -> Path | None:
  """The newest finished step of a training run (Orbax only finalises complete steps)."""
  root = run_dir / RUN_CHECKPOINTS_DIR
  steps = [p for p in root.iterdir() if p.name.isdigit() and ocp.is_orbax_checkpoint(p)] if root.is_dir() else []
  return max(steps, key=lambda p: int(p.name)) if steps else None


def locate(folder: str | Path) -> Location:
  folder = Path(folder)
  if not folder.is_dir():
    raise UserError(f"{folder}: checkpoint folder not found")
  if ocp.is_orbax_checkpoint(folder / PARAMS_DIR):
    return Location(folder / PARAMS_DIR, None)
  step = latest_step(folder)
  if step is not None:
    return Location(step, PARAMS_ITEM)
  raise UserError(f"{folder}: no finished parameter checkpoint ({PARAMS_DIR}/ or {RUN_CHECKPOINTS_DIR}/<step>/)")


def load_config(folder: str | Path) -> QwenMoeConfig:
  return QwenMoeConfig.from_file(Path(folder) / "config.json")


def stored_shapes(loc: Location) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  meta = ocp.metadata(loc.path, **({"checkpointable_name": loc.item} if loc.item else {})).metadata
  return {k: (tuple(m.shape), np.dtype(m.dtype)) for k, m in flatten(meta).items()}


def check_shapes(stored: dict[str, tuple[tuple[int, ...], Any]], expected: dict[str, tuple[int, ...]],
                 where: str) -> None:
  """Strict: the checkpoint must hold exactly the expected parameters with the expected shapes."""
  for key, shape in expected.items():
    if key not in stored:
      raise UserError(f"{where}: parameter '{key}' is missing (expected shape {shape})")
    if tuple(stored[key][0]) != tuple(shape):
      raise UserError(f"{where}: parameter '{key}' has shape {tuple(stored[key][0])}, the config needs {tuple(shape)}")
  extra = sorted(set(stored) - set(expected))
  if extra:
    raise UserError(f"{where}: parameter '{extra[0]}' is not part of this config's model")


def _load(loc: Location, abstract: dict[str, Any]) -> dict[str, Any]:
  ctx = ocp.Context()
  ctx.pytree.loading.partial_load = True
  with ctx:
    tree = ocp.load(loc.path, unflatten(abstract), **({"checkpointable_name": loc.item} if loc.item else {}))
  return flatten(tree)


def read_group(loc: Location, shapes: dict[str, tuple[tuple[int, ...], np.dtype]], group: str) -> dict[str, np.ndarray]:
  """One group's parameters as host numpy arrays in their stored dtype."""
  abstract = {k: np.empty(shape, dtype) for k, (shape, dtype) in shapes.items() if group_of(k) == group}
  return _load(loc, abstract)


def restore(folder: str | Path, mesh: jax.sharding.Mesh | None = None, dtype: jnp.dtype = jnp.bfloat16,
            kernels: Kernels = Kernels(), cfg: QwenMoeConfig | None = None) -> QwenMoeForCausalLM:
  """Builds the model from a checkpoint or run folder, every parameter created directly in its sharding."""
  cfg = cfg or load_config(folder)
  loc = locate(folder)
  check_shapes(stored_shapes(loc), param_shapes(cfg), str(loc.path))
  mesh = mesh or sharding.make_mesh({}, jax.devices()[:1])
  graphdef, abstract = abstract_model(cfg, dtype, sharding.expert_shards(mesh), kernels)
  target = flatten(sharding.param_shardings(abstract, mesh))
  wanted = unflatten({k: jax.ShapeDtypeStruct(v.shape, dtype, sharding=target[k])
                      for k, v in flatten(abstract).items()})
  item = {"checkpointable_name": loc.item} if loc.item else {}
  values = load_padded(lambda request: ocp.load(loc.path, request, **item), wanted, cfg.num_experts)
  return nnx.merge(graphdef, nnx.State(unflatten_state(abstract, flatten(values))))


def _key_names(path) -> list:
  return [getattr(k, "key", getattr(k, "name", None)) for k in path]


def _leaf_group(path) -> str:
  keys = _key_names(path)
  return f"layers.{keys[keys.index('layers') + 1]}" if "layers" in keys else "top"


def is_expert_leaf(path, leaf) -> bool:
  """A routed-expert parameter (or optimizer state mirroring one): its leading axis is the experts.

  Works on nested trees ({"layers": {"0": {"mlp": {"experts_wi": ...}}}}) and on flat dotted keys alike.
  """
  return bool(path) and str(_key_names(path)[-1]).rsplit(".", 1)[-1] in EXPERT_LEAVES and getattr(leaf, "ndim", 0) >= 1


def load_padded(load: Callable[[Any], Any], wanted: Any, num_experts: int) -> Any:
  """Loads a tree saved with unpadded experts into `wanted` (ShapeDtypeStructs with shardings).

  Routed-expert leaves (named in EXPERT_LEAVES, experts first) whose wanted length exceeds `num_experts` are
  read unpadded, then padded and laid out. Reading goes one group (top-level, then each layer) at a time, so
  an unpadded leaf that the expert axis cannot split is replicated for at most one layer at a time.
  """
  def request(path, x):
    if not is_expert_leaf(path, x) or x.shape[0] == num_experts:
      return x
    spec = list(x.sharding.spec) + [None] * (x.ndim - len(x.sharding.spec))
    axes = sharding.axes_of(spec[0])
    if num_experts % math.prod(x.sharding.mesh.shape[a] for a in axes):
      spec[0] = None
    return jax.ShapeDtypeStruct((num_experts, *x.shape[1:]), x.dtype,
                                sharding=jax.sharding.NamedSharding(x.sharding.mesh, P(*spec)))

  full = jax.tree_util.tree_map_with_path(request, wanted)
  groups = dict.fromkeys(_leaf_group(p) for p, _ in jax.tree_util.tree_flatten_with_path(wanted)[0])
  out: dict[str, Any] = {}
  for group in groups:
    part = load(jax.tree_util.tree_map_with_path(
      lambda p, x, group=group: x if _leaf_group(p) == group else ocp.PLACEHOLDER, full))
    for p, x in jax.tree_util.tree_flatten_with_path(part, is_leaf=lambda x: x is ocp.PLACEHOLDER)[0]:
      if x is not ocp.PLACEHOLDER:
        out[jax.tree_util.keystr(p)] = x
  return jax.tree_util.tree_map_with_path(lambda p, w: _pad_to(out[jax.tree_util.keystr(p)], w), wanted)


def _pad_to(x: jax.Array, want: jax.ShapeDtypeStruct) -> jax.Array:
  if x.shape == want.shape:
    return jax.device_put(x, want.sharding)
  pad = [(0, t - s) for s, t in zip(x.shape, want.shape)]
  return jax.jit(lambda a: jnp.pad(a, pad), out_shardings=want.sharding)(x)


def unflatten_state(abstract: nnx.State, values: dict[str, jax.Array]) -> nnx.State:
  """Fills a copy of `abstract` (an nnx.State of Variables) with `values` keyed by dotted path."""
  flat = nnx.to_flat_state(abstract)
  return nnx.from_flat_state([(p, v.replace(values[path_str(p)])) for p, v in flat])


def unpadded(cfg: QwenMoeConfig, tree: Any) -> Any:
  """Drops padded experts: expert leaves (see is_expert_leaf) keep their first num_experts rows."""
  return jax.tree_util.tree_map_with_path(
    lambda p, x: x[: cfg.num_experts] if is_expert_leaf(p, x) else x, tree)


def save_params(path: str | Path, model: QwenMoeForCausalLM) -> None:
  """Writes a model's parameters (unpadded) as a PyTree checkpoint at `path` (must not exist)."""
  flat = unpadded(model.config, flatten(nnx.state(model, nnx.Param)))
  ocp.save(Path(path), unflatten(flat))


class StreamingWriter:
  """Writes a parameter checkpoint one group at a time (Orbax partial saves), finalised at the end.

  Until `finish()` the data lives in `<path>.partial_save`, which no reader takes for a checkpoint. Host
  memory stays at about one group: saves are synchronous, so Orbax need not copy the arrays, and writes are
  uncompressed (zstd would hold a compressed copy of the whole group until the save commits).
  """

  def __init__(self, path: str | Path):
    self.path = Path(path)
    self.context = ocp.Context()
    self.context.memory.deepcopy_host_arrays = False
    self.context.array.saving.use_compression = False

  def write(self, flat: dict[str, np.ndarray]) -> None:
    with self.context:
      ocp.partial.save(self.path, unflatten(flat))

  def finish(self) -> None:
    with self.context:
      ocp.partial.finalize(self.path)
