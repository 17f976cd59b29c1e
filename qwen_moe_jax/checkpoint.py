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
from pathlib import Path
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
from flax import nnx

from qwen_moe_jax import sharding
from qwen_moe_jax.config import QwenMoeConfig
from qwen_moe_jax.errors import UserError
from qwen_moe_jax.model import QwenMoeForCausalLM

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


def abstract_model(cfg: QwenMoeConfig, dtype: jnp.dtype = jnp.float32, expert_shards: int = 1,
                   expert_backend: str = "ragged") -> tuple[nnx.GraphDef, nnx.State]:
  model = nnx.eval_shape(lambda: QwenMoeForCausalLM(
    cfg, rngs=nnx.Rngs(0), dtype=dtype, expert_shards=expert_shards, expert_backend=expert_backend))
  return nnx.split(model)


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
            expert_backend: str = "ragged", cfg: QwenMoeConfig | None = None) -> QwenMoeForCausalLM:
  """Builds the model from a checkpoint or run folder, every parameter created directly in its sharding.

  Parameters load group by group (top-level, then each layer), so a padded expert leaf is replicated on the
  expert axis for at most one layer at a time before it is padded and laid out.
  """
  cfg = cfg or load_config(folder)
  loc = locate(folder)
  stored = stored_shapes(loc)
  check_shapes(stored, param_shapes(cfg), str(loc.path))
  mesh = mesh or sharding.make_mesh({}, jax.devices()[:1])
  graphdef, abstract = abstract_model(cfg, dtype, sharding.expert_shards(mesh), expert_backend)
  target = flatten(sharding.param_shardings(abstract, mesh))
  shapes = {k: v.shape for k, v in flatten(abstract).items()}
  loaded: dict[str, jax.Array] = {}
  for group in dict.fromkeys(group_of(k) for k in target):
    keys = [k for k in target if group_of(k) == group]
    request = {}
    for k in keys:
      spec = sharding.spec_for(_names(abstract, k), stored[k][0], mesh, k)
      request[k] = jax.ShapeDtypeStruct(stored[k][0], dtype, sharding=jax.sharding.NamedSharding(mesh, spec))
    values = _load(loc, request)
    for k in keys:
      loaded[k] = _pad_to(values[k], shapes[k], target[k])
  state = nnx.State(unflatten_state(abstract, loaded))
  return nnx.merge(graphdef, state)


def _names(abstract: nnx.State, key: str) -> tuple[str | None, ...]:
  var = dict((path_str(p), v) for p, v in nnx.to_flat_state(abstract))[key]
  return var.get_metadata().get("axes") or (None,) * len(var.shape)


def _pad_to(x: jax.Array, shape: tuple[int, ...], out_sharding) -> jax.Array:
  if x.shape == tuple(shape):
    return jax.device_put(x, out_sharding)
  pad = [(0, t - s) for s, t in zip(x.shape, shape)]
  return jax.jit(lambda a: jnp.pad(a, pad), out_shardings=out_sharding)(x)


def unflatten_state(abstract: nnx.State, values: dict[str, jax.Array]) -> nnx.State:
  """Fills a copy of `abstract` (an nnx.State of Variables) with `values` keyed by dotted path."""
  flat = nnx.to_flat_state(abstract)
  return nnx.from_flat_state([(p, v.replace(values[path_str(p)])) for p, v in flat])


def unpadded(cfg: QwenMoeConfig, flat: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Drops padded experts: leaves named in EXPERT_LEAVES keep their first num_experts rows."""
  return {k: v[: cfg.num_experts] if k.rsplit(".", 1)[-1] in EXPERT_LEAVES else v for k, v in flat.items()}


def save_params(path: str | Path, model: QwenMoeForCausalLM) -> None:
  """Writes a model's parameters (unpadded) as a PyTree checkpoint at `path` (must not exist)."""
  flat = unpadded(model.config, flatten(nnx.state(model, nnx.Param)))
  ocp.save(Path(path), unflatten(flat))


class StreamingWriter:
  """Writes a parameter checkpoint one group at a time (Orbax partial saves), finalised at the end.

  Until `finish()` the data lives in `<path>.partial_save`, which no reader takes for a checkpoint.
  """

  def __init__(self, path: str | Path):
    self.path = Path(path)

  def write(self, flat: dict[str, np.ndarray]) -> None:
    ocp.partial.save(self.path, unflatten(flat))

  def finish(self) -> None:
    ocp.partial.finalize(self.path)
