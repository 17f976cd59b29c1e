"""Orbax checkpoints of model parameters: streaming writes, strict restores onto any mesh.

A checkpoint folder (what the converter writes) holds config.json, the tokenizer files and `params/`, an
Orbax PyTree checkpoint of the parameters as nested dicts with string keys ({"layers": {"0": {...}}}).
A training run folder holds the same side files and `checkpoints/<step>/` with a `params` item; every
function here that takes a folder accepts either (a run folder means its latest complete step). A LoRA run
folder's steps hold an `adapters` item instead, and its `lora.json` names the frozen base checkpoint: reading
it gives the base weights with the adapters merged in (lora.merge). A Hugging Face model folder (config.json and
model*.safetensors, no params/) is read in place, through hf_layout's table, a layer at a time like the rest.
Experts are stored unpadded; a model built for an expert axis that does not divide the expert count is
padded on restore and sliced back on save, so checkpoints never show the padding.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
from flax import nnx
from jax.sharding import PartitionSpec as P

from qwen_moe_jax import hf_layout, quantize, sharding
from qwen_moe_jax import lora as lora_lib
from qwen_moe_jax.config import QwenMoeConfig
from qwen_moe_jax.errors import UserError
from qwen_moe_jax.kernels import Kernels
from qwen_moe_jax.model import QwenMoeForCausalLM, abstract_model, group_of

PARAMS_DIR = "params"
RUN_CHECKPOINTS_DIR = "checkpoints"
PARAMS_ITEM = "params"  # checkpointable name inside a training step
ADAPTERS_ITEM = "adapters"  # the same, for a LoRA run
LORA_FILE = "lora.json"  # in a LoRA run folder: the adapters' settings and the base checkpoint
EXPERT_LEAVES = ("experts_wi", "experts_wo")  # leading dimension is the (padded) expert axis (also of their adapters)


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


def param_shapes(cfg: QwenMoeConfig, lora: lora_lib.LoraConfig | None = None) -> dict[str, tuple[int, ...]]:
  """Checkpoint (unpadded) shape of every parameter, or with `lora` of every adapter."""
  flat = flatten(abstract_model(cfg, lora=lora)[1])
  return {k: v.shape for k, v in flat.items() if (lora is not None) == lora_lib.is_adapter(k)}


@dataclasses.dataclass(frozen=True)
class Location:
  path: Path  # what ocp.load takes
  item: str | None  # checkpointable name (None: the PyTree checkpoint's own)
  adapters: Location | None = None  # a LoRA run's latest step, whose adapters are merged into these weights
  lora: lora_lib.LoraConfig | None = None
  hf: bool = False  # `path` is a Hugging Face folder, its safetensors read in place
  peft: Path | None = None  # a peft LoRA adapter folder merged into an HF folder's weights as they are read
  # an HF folder's tensors bound and checked (by `checked`), then read from
  weights: hf_layout.HfWeights | None = dataclasses.field(default=None, compare=False, repr=False)


def latest_step(run_dir: Path) -> Path | None:
  """The newest finished step of a training run (Orbax only finalises complete steps)."""
  root = run_dir / RUN_CHECKPOINTS_DIR
  steps = [p for p in root.iterdir() if p.name.isdigit() and ocp.is_orbax_checkpoint(p)] if root.is_dir() else []
  return max(steps, key=lambda p: int(p.name)) if steps else None


def locate(folder: str | Path, peft: str | Path | None = None) -> Location:
  """The weights a folder holds (see the module's docstring); `peft`: a peft LoRA adapter folder to merge into a
  Hugging Face folder's weights as they are read."""
  if peft is not None:
    loc = locate(folder)
    if not loc.hf or loc.adapters is not None:
      raise UserError(f"--peft {peft}: merges into a Hugging Face model folder as it is read, and {folder} is an "
                      "Orbax checkpoint or run; merge it while converting (hf_to_orbax.py --peft), or give the "
                      "HF folder")
    return dataclasses.replace(loc, peft=Path(peft).absolute())
  folder = Path(folder).absolute()  # Orbax takes absolute paths only
  if not folder.is_dir():
    raise UserError(f"{folder}: checkpoint folder not found")
  if (folder / LORA_FILE).is_file():
    step = latest_step(folder)
    if step is None:
      raise UserError(f"{folder}: LoRA run folder with no finished step ({RUN_CHECKPOINTS_DIR}/<step>/)")
    lora = _read_lora_file(folder)[1]
    return dataclasses.replace(lora_base(folder), adapters=Location(step, ADAPTERS_ITEM), lora=lora)
  if ocp.is_orbax_checkpoint(folder / PARAMS_DIR):
    return Location(folder / PARAMS_DIR, None)
  step = latest_step(folder)
  if step is not None:
    return Location(step, PARAMS_ITEM)
  if (folder / "config.json").is_file() and not any((folder / d).exists() for d in (PARAMS_DIR, RUN_CHECKPOINTS_DIR)):
    return Location(folder, None, hf=True)  # its safetensors (or their absence) are checked when read
  raise UserError(f"{folder}: no finished parameter checkpoint ({PARAMS_DIR}/ or {RUN_CHECKPOINTS_DIR}/<step>/, or "
                  f"a Hugging Face folder's config.json and safetensors)")


def lora_base(folder: str | Path) -> Location:
  """The frozen base weights of a LoRA run folder, as its lora.json records them."""
  base = _read_lora_file(folder)[0]
  if not (base.path.is_dir() if base.hf else ocp.is_orbax_checkpoint(base.path)):
    raise UserError(f"{Path(folder) / LORA_FILE}: base checkpoint {base.path} not found (the LoRA run's frozen "
                    f"weights; put it back there or edit 'base')")
  return base


def reads(loc: Location) -> list[str | None]:
  """What a located checkpoint is read from (its weights, a LoRA run's adapters, a peft adapter merged in), as
  absolute paths: it changes when a run folder saved a newer step, or was moved."""
  return [str(loc.path.resolve()), loc.item, None if loc.adapters is None else str(loc.adapters.path.resolve()),
          *([str(loc.peft.resolve())] if loc.peft else [])]


def lora_record(base: Location, lora: lora_lib.LoraConfig) -> dict:
  """What a LoRA run's lora.json holds."""
  return {"base": str(base.path.resolve()), "base_item": base.item, "base_format": "hf" if base.hf else "orbax",
          "base_peft": base.peft and str(base.peft.resolve()), **lora.to_dict()}


def _read_lora_file(folder: str | Path) -> tuple[Location, lora_lib.LoraConfig]:
  """(base weights, adapter settings) from a LoRA run's lora.json."""
  path = Path(folder) / LORA_FILE
  try:
    d = json.loads(path.read_text())
    base = Location(Path(d["base"]), d["base_item"], hf=d.get("base_format") == "hf",  # absent: orbax
                    peft=d.get("base_peft") and Path(d["base_peft"]))
    return base, lora_lib.LoraConfig.from_dict(d)
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise UserError(f"{path}: unreadable or incomplete ({type(e).__name__}: {e})") from None


def load_config(folder: str | Path) -> QwenMoeConfig:
  return QwenMoeConfig.from_file(Path(folder) / "config.json")


def stored_shapes(loc: Location) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  if loc.hf:
    weights = _hf_weights(loc)
    return {k: (weights.shapes[k], dtype) for k, dtype in weights.dtypes().items()}
  try:
    meta = ocp.metadata(loc.path, **({"checkpointable_name": loc.item} if loc.item else {})).metadata
  except ocp.errors.InvalidLayoutError:  # Orbax takes any folder for a checkpoint until it reads one
    raise UserError(f"{loc.path}: not a finished parameter checkpoint (no Orbax PyTree found there)") from None
  return {k: (tuple(m.shape), np.dtype(m.dtype)) for k, m in flatten(meta).items()}


def checked(source: str | Path | Location,
            cfg: QwenMoeConfig) -> tuple[Location, dict[str, tuple[tuple[int, ...], np.dtype]]]:
  """(location, stored shapes and dtypes) of a folder's (or a Location's) weights, strictly checked against
  `cfg` (and those of a LoRA run's adapters against its lora.json). An HF folder's Location comes back holding
  its checked tensors, which reads of it use."""
  loc = source if isinstance(source, Location) else locate(source)
  if loc.hf:
    loc = dataclasses.replace(loc, weights=_hf_weights(loc))
  stored = stored_shapes(loc)
  check_shapes(stored, param_shapes(cfg), str(loc.path))
  if loc.adapters is not None:
    check_shapes(stored_shapes(loc.adapters), param_shapes(cfg, loc.lora), str(loc.adapters.path))
  return loc, stored


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


def _hf_weights(loc: Location) -> hf_layout.HfWeights:
  """An HF folder's tensors bound to its own config's parameters, every check the headers allow done (once:
  `checked` keeps them in the Location)."""
  if loc.weights is not None:
    return loc.weights
  cfg = load_config(loc.path)
  return hf_layout.HfWeights(loc.path, cfg, param_shapes(cfg), loc.peft)


def _load(loc: Location, abstract: dict[str, Any]) -> dict[str, Any]:
  ctx = ocp.Context()
  ctx.pytree.loading.partial_load = True
  with ctx:
    tree = ocp.load(loc.path, unflatten(abstract), **({"checkpointable_name": loc.item} if loc.item else {}))
  return flatten(tree)


def read_group(loc: Location, shapes: dict[str, tuple[tuple[int, ...], np.dtype]], group: str) -> dict[str, np.ndarray]:
  """One group's parameters as host numpy arrays in their stored dtype (with a LoRA run's adapters merged)."""
  abstract = {k: np.empty(shape, dtype) for k, (shape, dtype) in shapes.items() if group_of(k) == group}
  params = _hf_weights(loc).read(group) if loc.hf else _load(loc, abstract) if abstract else {}
  if loc.adapters is None:
    return params
  adapters = read_group(loc.adapters, stored_shapes(loc.adapters), group)
  return {k: np.asarray(v) for k, v in merged(params, adapters, loc.lora).items()}


def merged(params: dict[str, Any], adapters: dict[str, Any], lora: lora_lib.LoraConfig) -> dict[str, Any]:
  """`params` (flat) with a LoRA run's `adapters` merged, into the int8-rounded routed experts (all of them) if the
  run trained over those: the weights it trained with."""
  return lora_lib.merge_into(quantize.rounded(params) if lora.int8_experts else params, adapters, lora.scale)


def restore(source: str | Path | Location, mesh: jax.sharding.Mesh | None = None, dtype: jnp.dtype = jnp.bfloat16,
            kernels: Kernels = Kernels(), cfg: QwenMoeConfig | None = None) -> QwenMoeForCausalLM:
  """Builds the model from a checkpoint or run folder (a LoRA run's adapters merged into its base), or from a
  Location (`cfg` then required), every parameter created directly in its sharding, a layer at a time; with
  `kernels.expert_dtype` int8 the routed experts are quantized as their layer is read (after the merge). A LoRA
  run trained over int8 experts, read with int8 experts, keeps its adapters unmerged: the model it trained."""
  cfg = cfg or load_config(source)
  loc, _ = checked(source, cfg)
  mesh = mesh or sharding.make_mesh({}, jax.devices()[:1])
  int8 = kernels.expert_dtype == "int8"
  unmerged = loc.adapters is not None and loc.lora.int8_experts and int8
  graphdef, abstract = abstract_model(cfg, dtype, sharding.expert_shards(mesh), kernels, loc.lora if unmerged else None)
  wanted = wanted_params(abstract, mesh, dtype)
  stored = {k: v for k, v in wanted.items()  # as the checkpoint holds them
            if not k.endswith(quantize.SCALES) and not lora_lib.is_adapter(k)}
  adapters = {}  # in float32, as trained (merged: the merge rounds once, to `dtype`)
  if loc.adapters is not None:
    adapters = load_sharded(loc.adapters, wanted_adapters(cfg, loc.lora, mesh, jnp.float32, kernels), cfg.num_experts)
  values: dict[str, jax.Array] = dict(adapters) if unmerged else {}
  for part in load_groups(loc, stored, cfg.num_experts):  # one layer: int8 experts are quantized as they are read
    group = group_of(next(iter(part)))
    if adapters and not unmerged:
      part = merged(part, {k: v for k, v in adapters.items() if group_of(k) == group}, loc.lora)
    values.update(quantize.quantize_experts(part, wanted) if int8 else part)
  return nnx.merge(graphdef, nnx.State(unflatten_state(abstract, values)))


def restore_with_adapters(source: str | Path, runs: dict[str, str | Path], mesh: jax.sharding.Mesh | None = None,
                          dtype: jnp.dtype = jnp.bfloat16, kernels: Kernels = Kernels(),
                          cfg: QwenMoeConfig | None = None) -> tuple[QwenMoeForCausalLM, dict[str, dict[str, Any]]]:
  """The model of `source` with LoRA adapter leaves, all zero (so it is the base model exactly), where any of the
  LoRA run folders `runs` (name -> folder) has adapters, at their largest rank; and each run's values for those
  leaves (its adapters, rank padded with zeros, B times its scale; zeros where it has none), for `replaced` to put
  in. UserError naming a folder that is not a LoRA run or whose adapters do not fit the model."""
  cfg = cfg or load_config(source)
  mesh = mesh or sharding.make_mesh({}, jax.devices()[:1])
  locs = {}
  for name, folder in runs.items():
    if not (Path(folder) / LORA_FILE).is_file():
      raise UserError(f"--lora-modules {name}={folder}: not a LoRA run folder (train.py --lora-rank writes one, with "
                      f"{LORA_FILE})")
    locs[name] = checked(folder, cfg)[0]
  rank = max(loc.lora.rank for loc in locs.values())
  targets = tuple(t for t in lora_lib.TARGETS if any(t in loc.lora.targets for loc in locs.values()))
  union = lora_lib.LoraConfig(rank, float(rank), targets)  # (its scale is 1: each run's B carries its own)
  base = restore(source, mesh, dtype, kernels, cfg)
  if any(lora_lib.is_adapter(k) for k in flatten(nnx.state(base))):
    raise UserError("the checkpoint is a LoRA run over int8 experts, read unmerged: serve it as one of "
                    "--lora-modules over its base instead")
  graphdef, abstract = abstract_model(cfg, dtype, sharding.expert_shards(mesh), kernels, union)
  wanted = {k: w for k, w in wanted_params(abstract, mesh, dtype).items() if lora_lib.is_adapter(k)}
  zeros = {k: jax.device_put(jnp.zeros(w.shape, w.dtype), w.sharding) for k, w in wanted.items()}
  model = nnx.merge(graphdef, unflatten_state(abstract, flatten(nnx.state(base)) | zeros))
  values = {}
  for name, loc in locs.items():
    own = load_sharded(loc.adapters, wanted_adapters(cfg, loc.lora, mesh, jnp.float32, kernels), cfg.num_experts)
    values[name] = {k: jax.device_put(_padded_adapter(k, own[k], w, loc.lora), w.sharding) if k in own else zeros[k]
                    for k, w in wanted.items()}
  return model, values


def _padded_adapter(key: str, x: jax.Array, want: jax.ShapeDtypeStruct, lora: lora_lib.LoraConfig) -> jax.Array:
  """A run's adapter leaf at the served rank: A [..., r] and B [(E,) r, ...] padded with zeros along r, B times the
  run's scale."""
  b = key.endswith(lora_lib.SUFFIXES[1])
  axis = (1 if ".mlp.experts_" in key else 0) if b else x.ndim - 1
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, want.shape[axis] - x.shape[axis])
  return (jnp.pad(x, pad) * (lora.scale if b else 1.0)).astype(want.dtype)


def replaced(state: nnx.State, values: dict[str, Any]) -> nnx.State:
  """`state` with the leaves `values` names (flat keys) replaced."""
  return nnx.from_flat_state([(p, v.replace(values[path_str(p)]) if path_str(p) in values else v)
                              for p, v in nnx.to_flat_state(state)])


def trained_expert_dtype(folder: str | Path) -> str:
  """"int8" for a LoRA run trained over int8 experts (read that way it is the model trained), else "auto"."""
  lora = locate(folder).lora
  return "int8" if lora is not None and lora.int8_experts else "auto"


def wanted_params(abstract: nnx.State, mesh: jax.sharding.Mesh, dtype: jnp.dtype) -> dict[str, jax.ShapeDtypeStruct]:
  """{path: ShapeDtypeStruct of `dtype` in the parameter's sharding on `mesh`} for an abstract model state."""
  target = flatten(sharding.param_shardings(abstract, mesh))
  return {k: jax.ShapeDtypeStruct(v.shape, dtype, sharding=target[k]) for k, v in flatten(abstract).items()}


def wanted_adapters(cfg: QwenMoeConfig, lora: lora_lib.LoraConfig, mesh: jax.sharding.Mesh, dtype: jnp.dtype,
                    kernels: Kernels = Kernels()) -> dict[str, jax.ShapeDtypeStruct]:
  """`wanted_params` of the LoRA adapters alone (experts padded for `mesh`)."""
  _, abstract = abstract_model(cfg, dtype, sharding.expert_shards(mesh), kernels, lora)
  return {k: v for k, v in wanted_params(abstract, mesh, dtype).items() if lora_lib.is_adapter(k)}


def load_sharded(loc: Location, wanted: dict[str, jax.ShapeDtypeStruct], num_experts: int) -> dict[str, jax.Array]:
  """The arrays at `loc` (flat keys) into `wanted`'s shapes (experts padded), dtypes and shardings."""
  return {k: x for part in load_groups(loc, wanted, num_experts) for k, x in part.items()}


def load_groups(loc: Location, wanted: dict[str, jax.ShapeDtypeStruct],
                num_experts: int) -> Iterator[dict[str, jax.Array]]:
  """`load_sharded` a group (top-level, then each layer) at a time (see `read_groups`)."""
  if loc.hf:
    weights = _hf_weights(loc)
    for group in dict.fromkeys(group_of(k) for k in wanted):
      here = {k: w for k, w in wanted.items() if group_of(k) == group}
      host = weights.read(group, {k: np.dtype(w.dtype) for k, w in here.items()}, _held_experts(here))
      yield {k: _put(x, wanted[k]) for k, x in host.items()}
    return
  item = {"checkpointable_name": loc.item} if loc.item else {}
  for part in read_groups(lambda request: ocp.load(loc.path, request, **item), unflatten(wanted), num_experts):
    yield {path_str(p): x for p, x in part}


def _key_names(path) -> list:
  return [getattr(k, "key", getattr(k, "name", None)) for k in path]


def _leaf_group(path) -> str:
  keys = _key_names(path)
  return f"layers.{keys[keys.index('layers') + 1]}" if "layers" in keys else "top"


def is_expert_leaf(path, leaf) -> bool:
  """A routed-expert parameter (or optimizer state mirroring one): its leading axis is the experts.

  Works on nested trees ({"layers": {"0": {"mlp": {"experts_wi": ...}}}}) and on flat dotted keys alike.
  """
  name = str(_key_names(path)[-1]).rsplit(".", 1)[-1] if path else ""
  return name.startswith(EXPERT_LEAVES) and getattr(leaf, "ndim", 0) >= 1


def load_padded(load: Callable[[Any], Any], wanted: Any, num_experts: int) -> Any:
  """Loads a tree saved with unpadded experts into `wanted` (ShapeDtypeStructs with shardings): `read_groups`."""
  out = {jax.tree_util.keystr(p): x for part in read_groups(load, wanted, num_experts) for p, x in part}
  return jax.tree_util.tree_map_with_path(lambda p, _: out[jax.tree_util.keystr(p)], wanted)


def read_groups(load: Callable[[Any], Any], wanted: Any, num_experts: int) -> Iterator[list[tuple[Any, jax.Array]]]:
  """The leaves of `wanted` (a tree of ShapeDtypeStructs with shardings, saved with unpadded experts), one group
  (top-level, then each layer) at a time: [(path, array)] per group, each array in its wanted shape and layout.

  Routed-expert leaves (named in EXPERT_LEAVES, experts first) whose wanted length exceeds `num_experts` are
  read unpadded, then padded and laid out before the next group is read, so an unpadded leaf that the expert
  axis cannot split is replicated for at most one layer at a time.
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
  leaves = jax.tree_util.tree_flatten_with_path(wanted)[0]
  target = {jax.tree_util.keystr(p): w for p, w in leaves}
  for group in dict.fromkeys(_leaf_group(p) for p, _ in leaves):
    part = load(jax.tree_util.tree_map_with_path(
      lambda p, x, group=group: x if _leaf_group(p) == group else ocp.PLACEHOLDER, full))
    yield [(p, _pad_to(x, target[jax.tree_util.keystr(p)]))
           for p, x in jax.tree_util.tree_flatten_with_path(part, is_leaf=lambda x: x is ocp.PLACEHOLDER)[0]
           if x is not ocp.PLACEHOLDER]


def _held_experts(wanted: dict[str, jax.ShapeDtypeStruct]) -> set[int]:
  """The experts whose rows this process's devices hold in `wanted`'s expert leaves (all of them on one host)."""
  held: set[int] = set()
  for k, w in wanted.items():
    if is_expert_leaf((jax.tree_util.DictKey(k),), w):
      for index in w.sharding.addressable_devices_indices_map(w.shape).values():
        held.update(range(*index[0].indices(w.shape[0])))
  return held


def _put(x: np.ndarray, want: jax.ShapeDtypeStruct) -> jax.Array:
  """A host array in `want`'s shape and sharding (expert rows past x's, the padding, are zeros); each process
  copies only the blocks its devices hold."""
  if x.shape != want.shape:
    x = np.pad(x, [(0, t - s) for s, t in zip(x.shape, want.shape)])
  return jax.make_array_from_callback(want.shape, want.sharding, lambda index: x[index])


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
  """Drops padded experts: expert leaves (see is_expert_leaf) keep their first num_experts rows. The padded leaves
  are cut in one program (on several processes, a program per leaf would put many with collectives in flight at
  once, which XLA:CPU's collectives can run in a different order on each process, and hang); the rest are returned
  as they are."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  padded = [i for i, (p, x) in enumerate(leaves) if is_expert_leaf(p, x) and x.shape[0] > cfg.num_experts]
  cut = _first_rows([leaves[i][1] for i in padded], cfg.num_experts)
  out = [x for _, x in leaves]
  for i, x in zip(padded, cut):
    out[i] = x
  return jax.tree_util.tree_unflatten(treedef, out)


@functools.partial(jax.jit, static_argnums=1)
def _first_rows(xs: list[jax.Array], n: int) -> list[jax.Array]:
  return [x[:n] for x in xs]


def save_params(path: str | Path, model: QwenMoeForCausalLM) -> None:
  """Writes a model's parameters (unpadded) as a PyTree checkpoint at `path` (must not exist)."""
  flat = unpadded(model.config, flatten(nnx.state(model, nnx.Param)))
  ocp.save(Path(path).absolute(), unflatten(flat))


class StreamingWriter:
  """Writes a parameter checkpoint one group at a time (Orbax partial saves), finalised at the end.

  Until `finish()` the data lives in `<path>.partial_save`, which no reader takes for a checkpoint. Host
  memory stays at about one group: saves are synchronous, so Orbax need not copy the arrays, and writes are
  uncompressed (zstd would hold a compressed copy of the whole group until the save commits).
  """

  def __init__(self, path: str | Path):
    self.path = Path(path).absolute()  # Orbax takes absolute paths only
    self.context = ocp.Context()
    self.context.memory.deepcopy_host_arrays = False
    self.context.array.saving.use_compression = False

  def write(self, flat: dict[str, np.ndarray]) -> None:
    with self.context:
      ocp.partial.save(self.path, unflatten(flat))

  def finish(self) -> None:
    with self.context:
      ocp.partial.finalize(self.path)
