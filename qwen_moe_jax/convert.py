"""The converters: Hugging Face qwen2_moe folders <-> our checkpoint folders (hf_layout.py's table).

Import checks everything the headers allow before anything is written, then streams one group (the embeddings /
norm / head, then one decoder layer at a time) through host memory, merging a peft LoRA adapter on the way if
given. Export writes the hub's per-expert layout, one safetensors shard per group.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from qwen_moe_jax import checkpoint, hf_io
from qwen_moe_jax.config import QwenMoeConfig
from qwen_moe_jax.errors import UserError
from qwen_moe_jax.hf_layout import Binding, HfWeights, hf_tensor, hub_bindings
from qwen_moe_jax.model import group_of


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
  weights = HfWeights(hf_dir, cfg, shapes, peft)  # every check the headers allow

  with hf_io.staged_output(out_dir, force, protect=(hf_dir,) + ((Path(peft),) if peft else ())) as staging:
    hf_io.copy_side_files(hf_dir, staging)  # first: a bad side file fails before the long part
    config_dict = dict(config_dict)
    config_dict["dtype" if "dtype" in config_dict else "torch_dtype"] = target.name
    (staging / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
    writer = checkpoint.StreamingWriter(staging / checkpoint.PARAMS_DIR)
    for group in tqdm(weights.groups, desc="converting", unit="group", disable=not progress):
      writer.write(weights.read(group, dict.fromkeys(shapes, target)))
    writer.finish()
  return cfg


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
