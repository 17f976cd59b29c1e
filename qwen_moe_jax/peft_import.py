"""A peft LoRA adapter folder, read for merging into the weights as they convert (`hf_to_orbax.py --peft DIR`).

peft writes adapter_config.json and adapter_model.safetensors (a pickle adapter_model.bin is refused) with keys
`base_model.model.<module>.<tensor>`. What this reads, by the Hugging Face tensor each entry changes:
  Linear modules   lora_A.weight [r, in], lora_B.weight [out, r]: W [out, in] += s B A (attention, dense and
                   shared-expert MLPs, gates, lm_head, and transformers 4's per-expert Linear layers)
  embeddings       lora_embedding_A [r, V], lora_embedding_B [D, r]: W [V, D] += s (B A)^T
  fused experts    transformers 5's 3D gate_up_proj / down_proj through peft's `target_parameters` (what
                   `orbax_to_hf.py --peft` writes, see peft_export.py): lora_A [E r, in] expert-major rows,
                   lora_B [out, r E] rank-major columns; W[e] += s B_e A_e. The targeted parameters of one
                   experts module nest in the module's parameter order (peft wraps them as it meets them):
                   with both, gate_up_proj's keys are under `base_layer.` and down_proj's outside
  full weights     `modules_to_save` copies and saved base layers (`<module>.base_layer.weight`): they replace
                   the base checkpoint's tensor
s = alpha / r (alpha / sqrt(r) with use_rslora), r read from each pair's shapes (so rank_pattern needs nothing),
alpha from the first alpha_pattern entry matching the module's key as peft matches it, else lora_alpha (peft >=
0.22 writes both patterns for gate_up_proj when the targets name gate_proj and up_proj). DoRA, trained biases
and fan_in_fan_out are refused by name. Shapes are checked against the model by the converter, which binds these
names like the base checkpoint's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Iterator

import numpy as np

from qwen_moe_jax.errors import UserError
from qwen_moe_jax.hf_io import SafetensorsReader

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
PAIRS = {".lora_A.weight": ("linear", 0), ".lora_B.weight": ("linear", 1), ".lora_embedding_A": ("embedding", 0),
         ".lora_embedding_B": ("embedding", 1)}
EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")  # transformers 5's fused expert tensors, in module order


@dataclasses.dataclass
class Pair:
  kind: str  # "linear", "embedding" or "experts"
  keys: list  # [lora_A key, lora_B key] (None until found)
  alpha: float  # lora_alpha, or the alpha_pattern entry matching the adapted module or parameter


class LoraAdapter:
  """The adapter in `folder`: `pairs` (HF tensor name -> its A and B keys), `full` (HF tensor name -> the key of
  a full weight replacing it); `shape(name)` is the HF tensor shape a pair implies, `delta` its update."""

  def __init__(self, folder: str | Path):
    self.folder = Path(folder)
    config = _read_config(self.folder / CONFIG_FILE)
    self.rslora = bool(config.get("use_rslora"))
    self.reader = SafetensorsReader(self.folder, single=WEIGHTS_FILE, index=None)
    self.file = self.folder / WEIGHTS_FILE
    targets = config.get("target_parameters") or ()
    alpha = lambda key: next((a for p, a in config["alpha_pattern"].items()  # noqa: E731
                              if re.match(rf"(.*\.)?({p})$", key)), config["lora_alpha"])
    self.pairs: dict[str, Pair] = {}
    self.full: dict[str, str] = {}
    for key in self.reader.names():
      if not key.startswith(PREFIX):
        raise UserError(f"{self.file}: tensor '{key}' does not start with '{PREFIX}' (not a peft model's adapter)")
      name = key[len(PREFIX):]
      end = next((e for e in PAIRS if name.endswith(e)), None)
      if end is None:  # a full weight (modules_to_save, or a saved base layer)
        target = name.replace(".base_layer.", ".")
        if target in self.full:
          raise UserError(f"{self.file}: tensors '{self.full[target]}' and '{key}' both replace '{target}'")
        self.full[target] = key
        continue
      kind, i = PAIRS[end]
      module = name[: -len(end)]
      target = module + ".weight"
      root = module.removesuffix(".base_layer" * module.count(".base_layer"))
      if kind == "linear" and root.endswith("mlp.experts"):  # a fused expert tensor, by its nesting depth
        experts = [p for p in EXPERT_PARAMETERS if any(f".{root}.{p}".endswith(f".{t}") for t in targets)]
        index = len(experts) - 1 - module.count(".base_layer")  # the last one in module order is outermost
        if index < 0:
          raise UserError(f"{self.file}: tensor '{key}' adapts an expert tensor, but {CONFIG_FILE}'s "
                          f"target_parameters names {len(experts)} of {root}'s {', '.join(EXPERT_PARAMETERS)}")
        kind, target = "experts", f"{root}.{experts[index]}"
      peft_key = target if kind == "experts" else module  # what peft matches rank and alpha patterns against
      pair = self.pairs.setdefault(target, Pair(kind, [None, None], alpha(peft_key)))
      if pair.keys[i] is not None:
        raise UserError(f"{self.file}: tensors '{pair.keys[i]}' and '{key}' both adapt '{target}'")
      pair.keys[i] = key
    for target, pair in self.pairs.items():
      if None in pair.keys:
        have, want = (0, 1) if pair.keys[0] else (1, 0)
        raise UserError(f"{self.file}: tensor '{pair.keys[have]}' has no {'AB'[want]} matrix beside it "
                        f"(adapting '{target}')")
      self._check(target)

  def _check(self, name: str) -> None:
    """A and B are matrices agreeing on the rank (r; E r for fused experts): A [r, ...], B [..., r]."""
    a, b = (self.reader.shape(k) for k in self.pairs[name].keys)
    if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
      keys = self.pairs[name].keys
      raise UserError(f"{self.file}: tensors '{keys[0]}' {a} and '{keys[1]}' {b} are not a LoRA pair: expected "
                      "matrices A [r, in] and B [out, r]")

  def shape(self, name: str, experts: int = 1) -> tuple[int, ...]:
    """The shape of the HF tensor `name` the pair implies (`experts`: E of a fused expert tensor)."""
    pair = self.pairs[name]
    a, b = (self.reader.shape(k) for k in pair.keys)
    if pair.kind == "embedding":  # A [r, V], B [D, r] adapt W [V, D]
      return a[1], b[0]
    if pair.kind == "experts":
      return experts, b[0], a[1]
    return b[0], a[1]

  def scale(self, name: str, rank: int) -> float:
    return self.pairs[name].alpha / (math.sqrt(rank) if self.rslora else rank)

  def delta(self, name: str) -> np.ndarray:
    """float32 s B A in the HF tensor's layout: [out, in], or [V, D] for an embedding."""
    pair = self.pairs[name]
    a, b = (self.reader.read(k).astype(np.float32) for k in pair.keys)
    d = self.scale(name, a.shape[0]) * (b @ a)
    return d.T if pair.kind == "embedding" else d

  def expert_deltas(self, name: str, experts: int) -> Iterator[np.ndarray]:
    """A fused expert tensor's float32 s B_e A_e [out, in], expert by expert (A rows e r + k, B columns k E + e)."""
    a, b = (self.reader.read(k).astype(np.float32) for k in self.pairs[name].keys)
    r = a.shape[0] // experts
    for e in range(experts):
      yield self.scale(name, r) * (b[:, e::experts] @ a[e * r:(e + 1) * r])


def _read_config(path: Path) -> dict:
  try:
    config = json.loads(path.read_text())
    assert isinstance(config, dict)
  except FileNotFoundError:
    raise UserError(f"{path}: not found (a peft adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE})") from None
  except (json.JSONDecodeError, UnicodeDecodeError, AssertionError):
    raise UserError(f"{path}: expected a JSON object") from None
  if config.get("peft_type") != "LORA":
    raise UserError(f"{path}: peft_type is {config.get('peft_type')!r}; only LORA adapters can be merged")
  refused = {"use_dora": "DoRA", "fan_in_fan_out": "fan_in_fan_out (Conv1D layers)", "lora_bias": "trained biases"}
  for field, what in refused.items():
    if config.get(field):
      raise UserError(f"{path}: {field} is set: {what} cannot be merged by this converter; merge in peft "
                      "(merge_and_unload) and convert the merged model")
  if config.get("bias", "none") != "none":
    raise UserError(f"{path}: bias is {config['bias']!r}: trained biases cannot be merged by this converter")
  config["alpha_pattern"] = config.get("alpha_pattern") or {}
  if not isinstance(config["alpha_pattern"], dict):
    raise UserError(f"{path}: alpha_pattern must be an object (pattern -> alpha), got {config['alpha_pattern']!r}")
  for field, alpha in [("lora_alpha", config.get("lora_alpha"))] + [
      (f"alpha_pattern['{p}']", a) for p, a in config["alpha_pattern"].items()]:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
      raise UserError(f"{path}: {field} must be a positive number, got {alpha!r}")
  for pattern in config["alpha_pattern"]:
    try:
      re.compile(rf"(.*\.)?({pattern})$")  # as matched above, the way peft does
    except re.error as e:
      raise UserError(f"{path}: alpha_pattern key {pattern!r} is not a regular expression ({e})") from None
  return config
