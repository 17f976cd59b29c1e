"""A LoRA run's adapters -> a peft adapter folder (adapter_config.json + adapter_model.safetensors) for the
base model in transformers' layout: `PeftModel.from_pretrained(Qwen2MoeForCausalLM..., folder)`.

peft stores each adapted Linear's update as lora_B @ lora_A (A [r, in], B [out, r], torch's [out, in] layout).
Our fused gate/up weight wi [D, 2, F] has one A for both halves, which peft holds as gate_proj and up_proj
adapters sharing that A. Routed experts are transformers' 3D parameters gate_up_proj [E, 2I, D] and down_proj
[E, D, I], which peft adapts through `target_parameters`: lora_A [E x r, in] (rows expert-major) and lora_B
[out, r x E] (columns rank-major), the second targeted parameter wrapping the first (its keys lose
`base_layer.`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from qwen_moe_jax import checkpoint, hf_io
from qwen_moe_jax.convert import dtype_name
from qwen_moe_jax.errors import UserError
from qwen_moe_jax.lora import SUFFIXES, LoraConfig

PREFIX = "base_model.model.model.layers"
ATTENTION = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
             "o_proj": "self_attn.o_proj"}
EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]  # down_proj wraps gate_up (module order)


def peft_tensors(path: str, a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
  """Our adapter of the weight at `path` ('layers.0.attn.q_proj') -> peft's lora_A / lora_B tensors."""
  _, layer, *rest = path.split(".")
  where, name = ".".join(rest[:-1]), rest[-1]
  key = lambda module: f"{PREFIX}.{layer}.{module}"  # noqa: E731
  pair = lambda module, lora_a, lora_b: {f"{key(module)}.lora_A.weight": lora_a,  # noqa: E731
                                          f"{key(module)}.lora_B.weight": lora_b}
  r = a.shape[-1]
  if where == "attn":  # A [in..., r], B [r, out...]
    return pair(ATTENTION[name], a.reshape(-1, r).T, b.reshape(r, -1).T)
  if where == "mlp" and name.startswith("experts_"):  # A [E, in, r], B [E, r, out...]
    e = a.shape[0]
    lora_a = np.swapaxes(a, 1, 2).reshape(e * r, -1)
    lora_b = np.transpose(b.reshape(e, r, -1), (2, 1, 0)).reshape(-1, r * e)
    return pair("mlp.experts.base_layer" if name == "experts_wi" else "mlp.experts", lora_a, lora_b)
  module = "mlp.shared_expert" if where == "mlp.shared_expert" else "mlp"
  if name == "wi":  # B [r, 2, F]: gate and up share A
    return pair(f"{module}.gate_proj", a.T, b[:, 0].T) | pair(f"{module}.up_proj", a.T, b[:, 1].T)
  return pair(f"{module}.down_proj", a.T, b.T)


def adapter_config(lora: LoraConfig, keys) -> dict:
  """The config of an adapter whose tensors are `keys`. target_modules names only the modules written, by their
  path in a layer: peft >= 0.22 reads a gate_proj / up_proj target that matches no Linear module (`mlp.gate_proj`
  in a model without dense MLP layers) as a transformers 4 adapter of the experts, and doubles gate_up_proj's
  rank."""
  modules = dict.fromkeys(k.split(".lora_")[0][len(PREFIX) + 1:].split(".", 1)[1] for k in sorted(keys))
  return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
          "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "fan_in_fan_out": False, "inference_mode": True,
          "target_modules": [m for m in modules if not m.startswith("mlp.experts")],
          "target_parameters": EXPERT_PARAMETERS if any(m.startswith("mlp.experts") for m in modules) else None,
          "base_model_name_or_path": None}  # the base in transformers' layout is wherever the user exported it


def export_peft(run_dir: str | Path, out_dir: str | Path, dtype: str | None = None, force: bool = False) -> None:
  """A LoRA run folder (latest step) -> a peft adapter folder in `out_dir` (the stored dtype unless `dtype`)."""
  run_dir = Path(run_dir)
  dtype = dtype_name(dtype) if dtype else None  # a bad --dtype fails before anything is read
  cfg = checkpoint.load_config(run_dir)
  loc, _ = checkpoint.checked(run_dir, cfg)
  if loc.adapters is None:
    raise UserError(f"{run_dir}: not a LoRA run (no {checkpoint.LORA_FILE}); export its weights without --peft")
  stored = checkpoint.stored_shapes(loc.adapters)
  tensors: dict[str, np.ndarray] = {}
  for group in dict.fromkeys(checkpoint.group_of(k) for k in stored):
    flat = checkpoint.read_group(loc.adapters, stored, group)
    for key, a in flat.items():
      if key.endswith(SUFFIXES[0]):
        weight = key[: -len(SUFFIXES[0])]
        made = peft_tensors(weight, np.asarray(a), np.asarray(flat[weight + SUFFIXES[1]]))
        tensors |= {k: np.ascontiguousarray(v, dtype=np.dtype(dtype) if dtype else v.dtype) for k, v in made.items()}
  with hf_io.staged_output(out_dir, force, protect=(run_dir,)) as staging:
    hf_io.write_shard(staging / "adapter_model.safetensors", tensors)
    (staging / "adapter_config.json").write_text(json.dumps(adapter_config(loc.lora, tensors), indent=2) + "\n")
  if loc.lora.int8_experts:
    print(f"note: {run_dir} trained its adapters over int8 routed experts; peft applies them to the base's "
          f"float experts, which differ by that rounding (orbax_to_hf.py without --peft merges them into the "
          f"rounded experts, the model trained)", file=sys.stderr)
