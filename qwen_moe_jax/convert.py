"""The converters: Hugging Face qwen2_moe folders <-> our checkpoint folders (hf_layout.py's table).

Import checks everything the headers allow before anything is written, then streams one group (the embeddings /
norm / head, then one decoder layer at a time) through host memory, merging a peft LoRA adapter on the way if
given. Export writes the hub's per-expert layout, one safetensors shard per group.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from qwen_moe_jax import checkpoint, hf_io
from qwen_moe_jax.config import QwenMoeConfig
from qwen_moe_jax.errors import UserError
from qwen_moe_jax.hf_layout import Binding, HfWeights, bind, copy_into, hf_tensor, hub_bindings
from qwen_moe_jax.model import group_of
from qwen_moe_jax.peft_import import LoraAdapter


def import_hf(hf_dir: str | Path, out_dir: str | Path, dtype: str | None = None, force: bool = False,
              progress: bool = True, peft: str | Path | None = None) -> QwenMoeConfig:
  """HF folder -> checkpoint folder (config.json, tokenizer files, params/). Returns the config. `peft`: a peft
  LoRA adapter folder merged into the weights on the way (each group in float32, then cast).

  Every check that the headers allow (names, shapes, each parameter filled exactly once, every adapter tensor
  used) runs before anything is written, so a bad checkpoint fails at once rather than after most of the copying.
  """
  hf_dir = Path(hf_dir)
  config_dict = hf_io.read_config(hf_dir)
  cfg = QwenMoeConfig.from_hf_dict(config_dict, source=str(hf_dir / "config.json"))
  target = np.dtype(dtype_name(dtype) if dtype else dtype_name(cfg.torch_dtype, f"{hf_dir / 'config.json'}: dtype"))
  shapes = checkpoint.param_shapes(cfg)
  weights = HfWeights(hf_dir, cfg, shapes)  # every check the headers allow
  adapter = LoraAdapter(peft) if peft else None
  merges = _bind_adapter(cfg, adapter, shapes) if adapter else {}

  with hf_io.staged_output(out_dir, force, protect=(hf_dir,) + ((Path(peft),) if peft else ())) as staging:
    hf_io.copy_side_files(hf_dir, staging)  # first: a bad side file fails before the long part
    config_dict = dict(config_dict)
    config_dict["dtype" if "dtype" in config_dict else "torch_dtype"] = target.name
    (staging / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
    writer = checkpoint.StreamingWriter(staging / checkpoint.PARAMS_DIR)
    for group in tqdm(weights.groups, desc="converting", unit="group", disable=not progress):
      params = weights.read(group, dict.fromkeys(shapes, target))
      if adapter:
        _merge(cfg, adapter, merges.get(group, []), params)
      writer.write(params)
    writer.finish()
  return cfg


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


def export_hf(ckpt_dir: str | Path, out_dir: str | Path, dtype: str | None = None, force: bool = False,
              progress: bool = True) -> QwenMoeConfig:
  """Checkpoint or run folder -> HF folder in the hub layout (sharded safetensors + index, config, tokenizer)."""
  ckpt_dir = Path(ckpt_dir)
  dtype = dtype_name(dtype) if dtype else None  # a bad --dtype fails before anything is read
  cfg = checkpoint.load_config(ckpt_dir)
  loc, stored = checkpoint.checked(ckpt_dir, cfg)
  target = np.dtype(dtype) if dtype else stored["embed"][1]

  def tensors(group: str, bindings: list[Binding]) -> dict[str, np.ndarray]:
    params = checkpoint.read_group(loc, stored, group)
    return {b.hf: np.ascontiguousarray(hf_tensor(cfg, b, params[b.path]), dtype=target) for b in bindings}

  with hf_io.staged_output(out_dir, force, protect=(ckpt_dir,)) as staging:
    hf_io.copy_side_files(ckpt_dir, staging)
    config_dict = hf_io.read_config(ckpt_dir)
    config_dict["dtype" if "dtype" in config_dict else "torch_dtype"] = target.name
    (staging / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
    write_hub_shards(staging, cfg, tensors, progress)
  return cfg


def write_hub_shards(folder: Path, cfg: QwenMoeConfig,
                     tensors: Callable[[str, list[Binding]], dict[str, np.ndarray]], progress: bool = False) -> None:
  """The hub layout in one safetensors shard per group plus the index; `tensors(group, bindings)` makes a group."""
  by_group: dict[str, list[Binding]] = {}
  for b in hub_bindings(cfg, checkpoint.param_shapes(cfg)):
    by_group.setdefault(group_of(b.path), []).append(b)
  weight_map, total = {}, 0
  for n, (group, bindings) in enumerate(tqdm(by_group.items(), desc="writing", unit="group", disable=not progress)):
    made = tensors(group, bindings)
    shard = f"model-{n + 1:05d}-of-{len(by_group):05d}.safetensors"
    hf_io.write_shard(folder / shard, made)
    weight_map.update(dict.fromkeys(made, shard))
    total += sum(t.nbytes for t in made.values())
  hf_io.write_index(folder, weight_map, total)


def dtype_name(name: str, what: str = "--dtype") -> str:
  names = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float32": "float32", "fp32": "float32",
           "float16": "float16", "fp16": "float16"}
  if name not in names:
    raise UserError(f"{what} must be one of bfloat16, float32, float16, got '{name}'")
  return names[name]
