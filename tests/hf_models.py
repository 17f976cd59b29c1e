"""Random tiny transformers Qwen2MoeForCausalLM checkpoints, built and saved in the tests (no downloads), a folder
laid out as the Hugging Face cache holds a download (hub_cache), and a random peft LoRA adapter (peft_adapter).

Weights are drawn wider than transformers' init (std 0.08) so routing is decisive and logits are peaked:
a wrong router, a swapped gate/up or a mis-ordered head split then changes the outputs visibly.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path

import torch
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

TINY = dict(
  vocab_size=101, hidden_size=48, intermediate_size=40, num_hidden_layers=3, num_attention_heads=6,
  num_key_value_heads=2, moe_intermediate_size=20, shared_expert_intermediate_size=28, num_experts=7,
  num_experts_per_tok=3, max_position_embeddings=256, rope_theta=10000.0,
)


def make_model(seed: int = 0, std: float = 0.08, rope: dict | None = None, **overrides) -> Qwen2MoeForCausalLM:
  """`rope`: rope scaling parameters (e.g. {"rope_type": "yarn", "factor": 4.0, ...}); default plain rope."""
  kwargs = dict(TINY, **overrides)
  rope = dict(rope or {"rope_type": "default"}, rope_theta=kwargs.pop("rope_theta"))
  cfg = Qwen2MoeConfig(**kwargs, rope_parameters=rope)
  torch.manual_seed(seed)
  model = Qwen2MoeForCausalLM(cfg).eval()
  model.set_experts_implementation("eager")  # the reference loop (grouped_mm needs 16-byte-aligned sizes)
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, std)
    for name, p in model.named_parameters():
      if "layernorm" in name or name.endswith("norm.weight"):
        p.add_(1.0)  # norms near 1, as in trained models
  return model


def save(model: Qwen2MoeForCausalLM, folder: str | Path, layout: str = "hub", style: str = "v5",
         shard: bool = False) -> Path:
  """layout: 'hub' (per-expert tensors) or 'fused' (transformers v5 gate_up_proj / down_proj);
  style: 'v5' (rope_parameters, dtype) or 'v4' (rope_theta, rope_scaling with a "type" key as Qwen's model
  cards write it, torch_dtype, no layer_types)."""
  folder = Path(folder)
  kwargs = {"save_original_format": layout == "hub"}
  if shard:
    kwargs["max_shard_size"] = "40KB"
  model.save_pretrained(folder, **kwargs)
  if style == "v4":
    path = folder / "config.json"
    d = json.loads(path.read_text())
    rope = d.pop("rope_parameters")
    d["rope_theta"] = rope.pop("rope_theta")
    kind = rope.pop("rope_type")
    d["rope_scaling"] = None if kind == "default" else {"type": kind, **rope}
    d["torch_dtype"] = d.pop("dtype")
    d.pop("layer_types", None)
    if d.get("qkv_bias", True):
      d.pop("qkv_bias", None)  # transformers v4 always had q/k/v bias and no such key
    path.write_text(json.dumps(d, indent=2))
  return folder


def hub_cache(root: Path, repo: str, folder: Path) -> None:
  """`folder` as the Hugging Face cache under `root` stores a download of `repo`: the files in blobs/, named by
  their hash, linked from snapshots/<commit>/ (`../../blobs/<hash>`), refs/main naming the commit."""
  storage = root / f"models--{repo.replace('/', '--')}"
  commit = "0123456789abcdef0123456789abcdef01234567"
  snapshot = storage / "snapshots" / commit
  for d in (storage / "blobs", storage / "refs", snapshot):
    d.mkdir(parents=True)
  (storage / "refs" / "main").write_text(commit)
  for f in folder.iterdir():
    blob = hashlib.sha256(f.read_bytes()).hexdigest()
    shutil.copyfile(f, storage / "blobs" / blob)
    (snapshot / f.name).symlink_to(Path("../../blobs") / blob)


PEFT_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "shared_expert_gate",
                "embed_tokens"]


def peft_adapter(model: Qwen2MoeForCausalLM, folder: Path, **config):
  """A peft LoRA adapter with random A and B (as if trained) on a copy of `model`, saved to `folder`: attention,
  the shared-expert MLPs, their gate and the embeddings as modules, the fused experts through target_parameters,
  and lm_head as a changed full copy (modules_to_save)."""
  from peft import LoraConfig, get_peft_model
  torch.manual_seed(3)
  peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(
    r=3, lora_alpha=5, init_lora_weights=False, target_modules=PEFT_MODULES, modules_to_save=["lm_head"],
    target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], **config))
  with torch.no_grad():
    head = peft_model.base_model.model.lm_head.modules_to_save["default"].weight
    head.add_(0.05 * torch.randn_like(head))
  peft_model.save_pretrained(folder)
  return peft_model.eval()
