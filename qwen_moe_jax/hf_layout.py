"""Hugging Face qwen2_moe safetensors tensors <-> our parameters, through one table.

Each row maps an HF tensor name template to a parameter path, the part of that parameter it fills, and a
layout transform (PyTorch Linear weights are [out, in]; ours are [in, ...out]). Reading is strict: every HF
tensor is bound exactly once and every parameter is filled exactly once, with shapes checked on both sides from
the headers alone (`HfWeights`, before any tensor is read), and so is a peft LoRA adapter merged into them as they
are read. The hub layout has one tensor per expert; transformers v5 saves fused experts, read as well.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path
from typing import Callable, Collection, Iterator

import jax
import ml_dtypes  # noqa: F401  (gives numpy the bfloat16 dtype)
import numpy as np

from qwen_moe_jax import hf_io
from qwen_moe_jax.config import QwenMoeConfig
from qwen_moe_jax.errors import UserError
from qwen_moe_jax.model import group_of
from qwen_moe_jax.peft_import import LoraAdapter

ALL = slice(None)

# Layout transforms: (HF tensor -> our part, our part -> HF tensor); `n` is the head count for head splits.
Transform = tuple[Callable[..., np.ndarray], Callable[..., np.ndarray]]
COPY: Transform = (lambda x, n: x, lambda x, n: x)
T: Transform = (lambda x, n: x.T, lambda x, n: x.T)  # [out, in] <-> [in, out]
IN_HEADS: Transform = (  # [N*H, D] <-> [D, N, H]
  lambda x, n: x.T.reshape(x.shape[1], n, -1), lambda x, n: x.reshape(x.shape[0], -1).T)
HEADS: Transform = (lambda x, n: x.reshape(n, -1), lambda x, n: x.reshape(-1))  # [N*H] <-> [N, H]
OUT_HEADS: Transform = (  # [D, N*H] <-> [N, H, D]
  lambda x, n: x.T.reshape(n, -1, x.shape[0]), lambda x, n: x.reshape(-1, x.shape[-1]).T)
ROW: Transform = (lambda x, n: x[0], lambda x, n: x[None])  # [1, D] <-> [D]
FUSED_GATE_UP: Transform = (  # [E, 2F, D] (gate rows first) <-> [E, D, 2, F]
  lambda x, n: x.reshape(x.shape[0], 2, -1, x.shape[2]).transpose(0, 3, 1, 2),
  lambda x, n: x.transpose(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1]))
BATCHED_T: Transform = (lambda x, n: x.transpose(0, 2, 1), lambda x, n: x.transpose(0, 2, 1))  # [E, D, F] <-> [E, F, D]


@dataclasses.dataclass(frozen=True)
class Row:
  hf: str  # HF name template with {i} (layer) and {e} (expert)
  path: str  # our parameter path template
  part: tuple  # index into our parameter; "e" stands for the expert number
  transform: Transform
  heads: str = ""  # config field with the head count the transform splits by
  hub: bool = True  # part of the layout we export (False: transformers v5's fused experts, experts first)


L = "model.layers.{i}."
P = "layers.{i}."
TABLE: tuple[Row, ...] = (
  Row("model.embed_tokens.weight", "embed", (), COPY),
  Row("lm_head.weight", "lm_head", (), T),
  Row("model.norm.weight", "norm.scale", (), COPY),
  Row(L + "input_layernorm.weight", P + "input_norm.scale", (), COPY),
  Row(L + "post_attention_layernorm.weight", P + "post_attn_norm.scale", (), COPY),
  Row(L + "self_attn.q_proj.weight", P + "attn.q_proj", (), IN_HEADS, "num_attention_heads"),
  Row(L + "self_attn.k_proj.weight", P + "attn.k_proj", (), IN_HEADS, "num_key_value_heads"),
  Row(L + "self_attn.v_proj.weight", P + "attn.v_proj", (), IN_HEADS, "num_key_value_heads"),
  Row(L + "self_attn.q_proj.bias", P + "attn.q_bias", (), HEADS, "num_attention_heads"),
  Row(L + "self_attn.k_proj.bias", P + "attn.k_bias", (), HEADS, "num_key_value_heads"),
  Row(L + "self_attn.v_proj.bias", P + "attn.v_bias", (), HEADS, "num_key_value_heads"),
  Row(L + "self_attn.o_proj.weight", P + "attn.o_proj", (), OUT_HEADS, "num_attention_heads"),
  # dense MLP layers
  Row(L + "mlp.gate_proj.weight", P + "mlp.wi", (ALL, 0, ALL), T),
  Row(L + "mlp.up_proj.weight", P + "mlp.wi", (ALL, 1, ALL), T),
  Row(L + "mlp.down_proj.weight", P + "mlp.wo", (), T),
  # sparse MoE layers
  Row(L + "mlp.gate.weight", P + "mlp.router", (), T),
  Row(L + "mlp.shared_expert.gate_proj.weight", P + "mlp.shared_expert.wi", (ALL, 0, ALL), T),
  Row(L + "mlp.shared_expert.up_proj.weight", P + "mlp.shared_expert.wi", (ALL, 1, ALL), T),
  Row(L + "mlp.shared_expert.down_proj.weight", P + "mlp.shared_expert.wo", (), T),
  Row(L + "mlp.shared_expert_gate.weight", P + "mlp.shared_gate", (), ROW),
  Row(L + "mlp.experts.{e}.gate_proj.weight", P + "mlp.experts_wi", ("e", ALL, 0, ALL), T),
  Row(L + "mlp.experts.{e}.up_proj.weight", P + "mlp.experts_wi", ("e", ALL, 1, ALL), T),
  Row(L + "mlp.experts.{e}.down_proj.weight", P + "mlp.experts_wo", ("e",), T),
  Row(L + "mlp.experts.gate_up_proj", P + "mlp.experts_wi", (), FUSED_GATE_UP, hub=False),
  Row(L + "mlp.experts.down_proj", P + "mlp.experts_wo", (), BATCHED_T, hub=False),
)
_PATTERNS = [
  (re.compile("^" + re.escape(r.hf).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)") + "$"), r)
  for r in TABLE]


@dataclasses.dataclass(frozen=True)
class Binding:
  """One HF tensor bound to one part of one of our parameters."""
  hf: str
  path: str
  part: tuple
  row: Row

  def heads(self, cfg: QwenMoeConfig) -> int:
    return getattr(cfg, self.row.heads) if self.row.heads else 0

  def part_shape(self, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    """Parts index with ints (dropping that axis) and full slices (keeping it)."""
    shape = shapes[self.path]
    return tuple(n for i, n in enumerate(shape) if i >= len(self.part) or not isinstance(self.part[i], int))

  def hf_shape(self, cfg: QwenMoeConfig, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    return _exported_shape(self.row.transform, self.part_shape(shapes), self.heads(cfg))


@functools.cache
def _exported_shape(transform: Transform, shape: tuple[int, ...], heads: int) -> tuple[int, ...]:
  return jax.eval_shape(lambda a: transform[1](a, heads), jax.ShapeDtypeStruct(shape, np.float32)).shape


def bind(name: str, shapes: dict[str, tuple[int, ...]]) -> Binding:
  """HF tensor name -> the parameter part it fills; unknown names are errors."""
  for pattern, row in _PATTERNS:
    m = pattern.match(name)
    if m:
      path = row.path.format(i=m.groupdict().get("i"))
      part = tuple(int(m["e"]) if p == "e" else p for p in row.part)
      if path not in shapes:
        raise UserError(f"tensor '{name}': the config has no parameter {path} for it "
                        f"(layer outside num_hidden_layers, or a dense tensor in a sparse layer / the reverse)")
      if "e" in row.part and not 0 <= part[0] < shapes[path][0]:
        raise UserError(f"tensor '{name}': expert {part[0]} is outside num_experts={shapes[path][0]}")
      return Binding(name, path, part, row)
  raise UserError(f"tensor '{name}' is not a qwen2_moe parameter (unknown name)")


def hub_bindings(cfg: QwenMoeConfig, shapes: dict[str, tuple[int, ...]]) -> Iterator[Binding]:
  """Every tensor of the hub (per-expert) layout for this config, in table order per group."""
  for group in dict.fromkeys(group_of(k) for k in shapes):
    i = group.split(".")[1] if group != "top" else None
    for row in TABLE:
      if not row.hub or ("{i}" in row.hf) != (i is not None):
        continue
      path = row.path.format(i=i)
      if path not in shapes:
        continue
      experts = range(shapes[path][0]) if "e" in row.part else [None]
      for e in experts:
        yield Binding(row.hf.format(i=i, e=e), path, tuple(e if p == "e" else p for p in row.part), row)


def hf_tensor(cfg: QwenMoeConfig, b: Binding, param: np.ndarray) -> np.ndarray:
  """The HF tensor `b` names, made from our (whole) parameter it binds to."""
  return b.row.transform[1](param[b.part], b.heads(cfg))


def _check_group(cfg, reader: hf_io.SafetensorsReader, group: str, bindings: list[Binding], shapes) -> None:
  """From the headers alone: every tensor has its expected shape and fills each parameter element once."""
  filled: dict[str, list[Binding]] = {path: [] for path in shapes if group_of(path) == group}
  for b in bindings:
    expected, got = b.hf_shape(cfg, shapes), reader.shape(b.hf)
    if got != expected:
      raise UserError(f"tensor '{b.hf}' has shape {got}, expected {expected} for this config")
    for other in filled[b.path]:
      if _overlaps(other.part, b.part):
        raise UserError(f"tensors '{other.hf}' and '{b.hf}' both fill parameter {b.path}")
    filled[b.path].append(b)
  for path, parts in filled.items():
    if sum(int(np.prod(b.part_shape(shapes))) for b in parts) != int(np.prod(shapes[path])):
      have = {b.hf for b in parts}
      first = next(b.hf for b in hub_bindings(cfg, shapes) if b.path == path and b.hf not in have)
      raise UserError(f"tensor '{first}' is missing (parameter {path} is incomplete)")


def copy_into(dst: np.ndarray, src: np.ndarray, block: int = 256) -> None:
  """dst[...] = src (casting to dst's dtype) in blocks of dst's last axis, so transposed copies stay in cache."""
  for i in range(0, dst.shape[-1], block):
    dst[..., i:i + block] = src[..., i:i + block]


def _overlaps(a: tuple, b: tuple) -> bool:
  """Parts are () (whole parameter) or tuples of ints and full slices; they overlap unless some int differs."""
  return not any(isinstance(x, int) and isinstance(y, int) and x != y for x, y in zip(a, b))


class HfWeights:
  """The tensors of an HF folder (safetensors shards), bound to the parameters of `cfg` (`shapes`: their
  unpadded shapes, checkpoint.param_shapes) and checked, all from the headers, when made; then read a group (the
  embeddings / norm / head, or one decoder layer) at a time. `peft`: a peft LoRA adapter folder, bound and checked
  as well, merged into each group as it is read (in float32, then cast)."""

  def __init__(self, folder: str | Path, cfg: QwenMoeConfig, shapes: dict[str, tuple[int, ...]],
               peft: str | Path | None = None):
    self.cfg, self.shapes = cfg, shapes
    self.reader = hf_io.SafetensorsReader(folder)
    self.by_group: dict[str, list[Binding]] = {}
    for name in self.reader.names():
      b = bind(name, shapes)
      self.by_group.setdefault(group_of(b.path), []).append(b)
    self.groups = list(dict.fromkeys(group_of(k) for k in shapes))  # top, then layers in order
    for group in self.groups:
      _check_group(cfg, self.reader, group, self.by_group.get(group, []), shapes)
    self.adapter = LoraAdapter(peft) if peft else None
    self.merges = _bind_adapter(cfg, self.adapter, shapes) if self.adapter else {}

  def dtypes(self) -> dict[str, np.dtype]:
    """Each parameter's dtype as stored (that of the first tensor filling it)."""
    stored: dict[str, np.dtype] = {}
    for bindings in self.by_group.values():
      for b in bindings:
        stored.setdefault(b.path, self.reader.dtype(b.hf))
    return stored

  def read(self, group: str, dtypes: dict[str, np.dtype] | None = None,
           experts: Collection[int] | None = None) -> dict[str, np.ndarray]:
    """One group's parameters as host arrays, each in its `dtypes` entry (default: as stored). With `experts`, of
    the expert tensors (per-expert, or fused: experts first) only those experts' are read (the rest of their rows
    stay 0): the ones a process's devices hold."""
    targets = dtypes or self.dtypes()
    bindings = self.by_group[group]
    params = {path: np.zeros(self.shapes[path], targets[path]) for path in dict.fromkeys(b.path for b in bindings)}
    for b in bindings:
      for rows in _rows_to_read(b, experts, self.shapes[b.path][0]):
        dst = params[b.path][b.part] if rows is None else params[b.path][rows[0]:rows[1]]
        copy_into(dst, b.row.transform[0](self.reader.read(b.hf, rows), b.heads(self.cfg)))
    if self.adapter:
      _merge(self.cfg, self.adapter, self.merges.get(group, []), params)
    return params


def _rows_to_read(b: Binding, experts: Collection[int] | None, num_experts: int) -> list[tuple[int, int] | None]:
  """What to read of `b`'s tensor for `experts` (None: all): [None] (all of it), [] (nothing: another expert's), or
  a fused tensor's runs of consecutive experts as (start, stop) rows."""
  if experts is None or (b.row.hub and "e" not in b.row.part):
    return [None]
  if b.row.hub:
    return [None] if b.part[0] in experts else []
  runs: list[list[int]] = []
  for e in sorted(e for e in experts if e < num_experts):  # held experts past num_experts are the mesh's padding
    if runs and runs[-1][1] == e:
      runs[-1][1] = e + 1
    else:
      runs.append([e, e + 1])
  return [(start, stop) for start, stop in runs]


def _bind_adapter(cfg, adapter: LoraAdapter, shapes) -> dict[str, list[tuple[Binding, str | None]]]:
  """Each full weight and LoRA pair of the adapter bound to the parameter part it changes, its shapes checked
  against the config: by group, [(binding, the full weight's key, or None for a pair)], full weights first."""
  merges: dict[str, list[tuple[Binding, str | None]]] = {}
  for name, key in [*adapter.full.items(), *((n, None) for n in adapter.pairs)]:
    keys = [key] if key else adapter.pairs[name].keys
    try:
      b = bind(name, shapes)
    except UserError as e:
      raise UserError(f"{adapter.file}: tensor '{keys[0]}': {e}") from None
    want = b.hf_shape(cfg, shapes)
    experts = want[0] if not key and adapter.pairs[name].kind == "experts" else 1
    got = adapter.reader.shape(key) if key else adapter.shape(name, experts)
    if got != want or adapter.reader.shape(keys[0])[0] % experts:
      shown = " and ".join(f"'{k}' {adapter.reader.shape(k)}" for k in keys)
      raise UserError(f"{adapter.file}: {shown} {'do' if len(keys) > 1 else 'does'} not fit '{name}' {want} of "
                      "this config"
                      + ("" if key else ": expected A [r, in] and B [out, r]"))
    merges.setdefault(group_of(b.path), []).append((b, key))
  return merges


def _merge(cfg, adapter: LoraAdapter, merges: list[tuple[Binding, str | None]], params: dict) -> None:
  """One group's parameters with the adapter's full weights put in, then its updates added in float32."""
  for b, key in merges:  # full weights first (_bind_adapter's order)
    dst, to_ours = params[b.path][b.part], functools.partial(b.row.transform[0], n=b.heads(cfg))
    if key:
      copy_into(dst, to_ours(adapter.reader.read(key)))
    elif adapter.pairs[b.hf].kind == "experts":  # [E, out, in], one expert at a time
      for e, d in enumerate(adapter.expert_deltas(b.hf, dst.shape[0])):
        copy_into(dst[e], dst[e].astype(np.float32) + to_ours(d[None])[0])
    else:
      copy_into(dst, dst.astype(np.float32) + to_ours(adapter.delta(b.hf)))


