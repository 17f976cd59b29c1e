"""QwenMoeConfig: the qwen2_moe hyper-parameters, read from either style of Hugging Face config.json.

transformers v4 writes `rope_theta`, `rope_scaling` and `torch_dtype` at the top level; v5 writes
`rope_parameters: {rope_theta, rope_type, ...}`, `dtype` and `layer_types`. Both are accepted; anything this
implementation does not compute (dynamic rope scaling, sliding windows, tied embeddings, ...) is refused by name.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable

from qwen_moe_jax.errors import UserError

BASE_EOS_ID = 151643  # <|endoftext|>: base models stop here
CHAT_EOS_ID = 151645  # <|im_end|>: chat models stop here


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Static rope scaling, as transformers computes it (modeling_rope_utils; the same for every position).

  'linear' divides every rotary frequency by `factor`. 'yarn' (what Qwen2's model cards prescribe past 32k
  tokens) keeps the high frequencies, divides the low ones by `factor` with a linear ramp between, and scales
  cos / sin by `attention_factor`.
  """

  rope_type: str  # "linear" | "yarn"
  factor: float
  original_max_position_embeddings: int = 0  # yarn: the pretraining context
  attention_factor: float = 1.0  # yarn: resolved from factor / mscale / mscale_all_dim when not given
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  truncate: bool = True

  def to_hf_dict(self) -> dict[str, Any]:
    if self.rope_type == "linear":
      return {"rope_type": "linear", "factor": self.factor}
    return {"rope_type": "yarn", **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)[1:]}}


@dataclasses.dataclass(frozen=True)
class QwenMoeConfig:
  """Defaults are transformers' Qwen2MoeConfig defaults (Qwen1.5-MoE-A2.7B widths)."""

  vocab_size: int = 151936
  hidden_size: int = 2048
  intermediate_size: int = 5632  # dense-MLP layers (mlp_only_layers / decoder_sparse_step)
  num_hidden_layers: int = 24
  num_attention_heads: int = 16
  num_key_value_heads: int = 16
  head_dim: int = 0  # 0: hidden_size // num_attention_heads
  max_position_embeddings: int = 32768
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  qkv_bias: bool = True
  decoder_sparse_step: int = 1
  mlp_only_layers: tuple[int, ...] = ()
  num_experts: int = 60
  num_experts_per_tok: int = 4
  moe_intermediate_size: int = 1408
  shared_expert_intermediate_size: int = 5632
  norm_topk_prob: bool = False
  router_aux_loss_coef: float = 0.001
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int | None = None
  torch_dtype: str = "bfloat16"  # dtype of the source weights (informational)

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.hidden_size // self.num_attention_heads

  def is_moe_layer(self, i: int) -> bool:
    """transformers' rule: sparse unless listed in mlp_only_layers or off the decoder_sparse_step grid."""
    return (
      i not in self.mlp_only_layers
      and self.num_experts > 0
      and (i + 1) % self.decoder_sparse_step == 0
    )

  @property
  def context_length(self) -> int:
    """Positions the model takes: max_position_embeddings, or the scaled pretraining context if longer (as
    vLLM counts it: a yarn factor of 4 over 32768 pretraining positions gives 131072)."""
    if self.rope_scaling is None:
      return self.max_position_embeddings
    base = self.rope_scaling.original_max_position_embeddings or self.max_position_embeddings
    return max(self.max_position_embeddings, int(base * self.rope_scaling.factor))

  @property
  def moe_layers(self) -> tuple[int, ...]:
    return tuple(i for i in range(self.num_hidden_layers) if self.is_moe_layer(i))

  def stop_ids(self) -> tuple[int, ...]:
    """EOS ids to stop generation on: the config's, else both Qwen end tokens that fit the vocab."""
    ids = self.eos_token_ids or (BASE_EOS_ID, CHAT_EOS_ID)
    return tuple(i for i in ids if 0 <= i < self.vocab_size)

  def validate(self, source: str = "config") -> "QwenMoeConfig":
    def need(ok: bool, key: str, what: str) -> None:
      if not ok:
        raise UserError(f"{source}: {key} {what}")

    for key in (
      "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
      "max_position_embeddings", "decoder_sparse_step",
    ):
      need(getattr(self, key) > 0, key, f"must be > 0, got {getattr(self, key)}")
    need(self.num_experts >= 0, "num_experts", f"must be >= 0, got {self.num_experts}")
    need(self.head_dim >= 0, "head_dim", f"must be >= 0, got {self.head_dim}")
    if not self.head_dim:
      need(
        self.hidden_size % self.num_attention_heads == 0, "num_attention_heads",
        f"({self.num_attention_heads}) must divide hidden_size ({self.hidden_size}) when head_dim is unset",
      )
    need(self.dim_per_head % 2 == 0, "head_dim", f"must be even for rotary embeddings, got {self.dim_per_head}")
    need(
      self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
      f"({self.num_key_value_heads}) must divide num_attention_heads ({self.num_attention_heads})",
    )
    need(self.rms_norm_eps > 0, "rms_norm_eps", f"must be > 0, got {self.rms_norm_eps}")
    need(self.rope_theta > 0, "rope_theta", f"must be > 0, got {self.rope_theta}")
    bad_layers = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
    need(not bad_layers, "mlp_only_layers", f"has layer indices outside [0, {self.num_hidden_layers}): {bad_layers}")
    dense_layers = [i for i in range(self.num_hidden_layers) if not self.is_moe_layer(i)]
    if dense_layers:
      need(self.intermediate_size > 0, "intermediate_size", "must be > 0 (there are dense MLP layers)")
    if self.moe_layers:
      need(
        0 < self.num_experts_per_tok <= self.num_experts, "num_experts_per_tok",
        f"must be in [1, num_experts={self.num_experts}], got {self.num_experts_per_tok}",
      )
      need(self.moe_intermediate_size > 0, "moe_intermediate_size", "must be > 0")
      need(self.shared_expert_intermediate_size > 0, "shared_expert_intermediate_size", "must be > 0")
    return self

  @classmethod
  def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "QwenMoeConfig":
    """Reads a Hugging Face qwen2_moe config dict (v4 or v5 style) and validates it."""

    def fail(key: str, what: str) -> UserError:
      return UserError(f"{source}: {key} {what}")

    if d.get("model_type") != "qwen2_moe":
      raise fail("model_type", f"must be 'qwen2_moe', got {d.get('model_type')!r}")
    if d.get("hidden_act", "silu") != "silu":
      raise fail("hidden_act", f"must be 'silu', got {d.get('hidden_act')!r}")
    if d.get("tie_word_embeddings", False):
      raise fail("tie_word_embeddings", "is true; qwen2_moe models have untied embeddings (not implemented)")
    quantization = d.get("quantization_config")
    if quantization:
      method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else quantization
      raise fail("quantization_config", f"names quantized weights ({method}), which are not read: use the "
                 "unquantized release (e.g. Qwen/Qwen1.5-MoE-A2.7B-Chat, not ...-GPTQ-Int4)")
    if d.get("use_sliding_window", False):
      raise fail("use_sliding_window", "is true; sliding-window attention is not implemented")
    if any(t != "full_attention" for t in d.get("layer_types") or []):
      raise fail("layer_types", "contains a layer type other than 'full_attention' (not implemented)")
    if d.get("attention_dropout") not in (None, 0, 0.0):
      raise fail("attention_dropout", f"must be 0 (dropout is not implemented), got {d['attention_dropout']!r}")

    rope = d.get("rope_parameters")
    if rope is not None:
      if not isinstance(rope, dict):
        raise fail("rope_parameters", f"must be an object, got {rope!r}")
      theta, theta_key = rope.get("rope_theta", d.get("rope_theta", 10000.0)), "rope_parameters.rope_theta"
      scaling = _rope_scaling(rope, "rope_parameters", d, fail)
    else:
      theta, theta_key = d.get("rope_theta", 10000.0), "rope_theta"
      scaling = _rope_scaling(d.get("rope_scaling") or {}, "rope_scaling", d, fail)
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):
      raise fail(theta_key, f"must be a number, got {theta!r}")

    eos = d.get("eos_token_id")
    eos_ids = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
    if any(isinstance(i, bool) or not isinstance(i, int) for i in eos_ids):
      raise fail("eos_token_id", f"must be an integer or a list of integers, got {eos!r}")
    layers = d.get("mlp_only_layers") or []
    if not isinstance(layers, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
      raise fail("mlp_only_layers", f"must be a list of layer indices, got {layers!r}")

    def read(key: str, typ: type, default: Any) -> Any:
      value = d.get(key, default)
      if value is None:
        return default
      if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
      if typ is int and isinstance(value, bool) or not isinstance(value, typ):
        raise fail(key, f"must be {typ.__name__}, got {value!r}")
      return value

    base = cls()
    kv_heads = d.get("num_key_value_heads")
    heads = read("num_attention_heads", int, base.num_attention_heads)
    cfg = cls(
      vocab_size=read("vocab_size", int, base.vocab_size),
      hidden_size=read("hidden_size", int, base.hidden_size),
      intermediate_size=read("intermediate_size", int, base.intermediate_size),
      num_hidden_layers=read("num_hidden_layers", int, base.num_hidden_layers),
      num_attention_heads=heads,
      num_key_value_heads=heads if kv_heads is None else read("num_key_value_heads", int, heads),
      head_dim=read("head_dim", int, 0),
      max_position_embeddings=read("max_position_embeddings", int, base.max_position_embeddings),
      rms_norm_eps=read("rms_norm_eps", float, base.rms_norm_eps),
      rope_theta=float(theta),
      rope_scaling=scaling,
      qkv_bias=read("qkv_bias", bool, True),
      decoder_sparse_step=read("decoder_sparse_step", int, base.decoder_sparse_step),
      mlp_only_layers=tuple(layers),
      num_experts=read("num_experts", int, base.num_experts),
      num_experts_per_tok=read("num_experts_per_tok", int, base.num_experts_per_tok),
      moe_intermediate_size=read("moe_intermediate_size", int, base.moe_intermediate_size),
      shared_expert_intermediate_size=read(
        "shared_expert_intermediate_size", int, base.shared_expert_intermediate_size),
      norm_topk_prob=read("norm_topk_prob", bool, base.norm_topk_prob),
      router_aux_loss_coef=read("router_aux_loss_coef", float, base.router_aux_loss_coef),
      bos_token_id=read("bos_token_id", int, None),
      eos_token_ids=eos_ids,
      pad_token_id=read("pad_token_id", int, None),
      torch_dtype=str(d.get("dtype") or d.get("torch_dtype") or "bfloat16"),
    )
    return cfg.validate(source)

  @classmethod
  def from_file(cls, path: str | Path) -> "QwenMoeConfig":
    path = Path(path)
    try:
      d = json.loads(path.read_text())
    except FileNotFoundError:
      raise UserError(f"{path}: not found (expected a Hugging Face config.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
      raise UserError(f"{path}: expected a JSON object")
    return cls.from_hf_dict(d, source=str(path))

  def to_hf_dict(self) -> dict[str, Any]:
    """A config.json in the hub's (transformers v4) style, which v4 and v5 both read."""
    eos: int | list[int] | None = list(self.eos_token_ids) or None
    if eos is not None and len(eos) == 1:
      eos = eos[0]
    d = {
      "architectures": ["Qwen2MoeForCausalLM"],
      "model_type": "qwen2_moe",
      "hidden_act": "silu",
      "tie_word_embeddings": False,
      "use_sliding_window": False,
      "attention_dropout": 0.0,
      "rope_scaling": None if self.rope_scaling is None else self.rope_scaling.to_hf_dict(),
      "torch_dtype": self.torch_dtype,
      "eos_token_id": eos,
    }
    for f in dataclasses.fields(self):
      if f.name not in ("eos_token_ids", "torch_dtype", "head_dim", "mlp_only_layers", "rope_scaling"):
        d[f.name] = getattr(self, f.name)
    d["mlp_only_layers"] = list(self.mlp_only_layers)
    if self.head_dim:
      d["head_dim"] = self.head_dim
    return d


_ROPE_KEYS = {  # what each supported rope_type reads (besides rope_type / type and rope_theta)
  "linear": {"factor"},
  "yarn": {"factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "mscale",
           "mscale_all_dim", "truncate"},
}


def _rope_scaling(rope: Any, where: str, d: dict[str, Any],
                  fail: Callable[[str, str], UserError]) -> RopeScaling | None:
  """`rope_parameters` (v5) or `rope_scaling` (v4) -> RopeScaling, None for plain rope; the rest is refused."""
  if not isinstance(rope, dict):
    raise fail(where, f"must be an object or null, got {rope!r}")
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind == "default":
    return None
  if kind not in _ROPE_KEYS:
    raise fail(f"{where}.rope_type", f"must be one of default, {', '.join(_ROPE_KEYS)}, got {kind!r} "
               "(other rope scaling is not implemented)")
  extra = sorted(set(rope) - _ROPE_KEYS[kind] - {"rope_type", "type", "rope_theta"})
  if extra:
    raise fail(f"{where}.{extra[0]}", f"is not read by {kind!r} rope scaling here (not implemented)")

  def number(key: str, default: float | None, minimum: float = 0.0) -> float | None:
    value = rope.get(key)
    if value is None:
      return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > minimum:
      raise fail(f"{where}.{key}", f"must be a number > {minimum:g}, got {value!r}")
    return float(value)

  max_pos = d.get("max_position_embeddings", QwenMoeConfig.max_position_embeddings)
  if kind == "linear":
    factor = number("factor", None)
    if factor is None:
      raise fail(f"{where}.factor", "is required for linear rope scaling")
    return RopeScaling("linear", factor)
  original = rope.get("original_max_position_embeddings", max_pos)  # transformers' default
  if isinstance(original, bool) or not isinstance(original, int) or original < 1:
    raise fail(f"{where}.original_max_position_embeddings", f"must be a positive integer, got {original!r}")
  factor = number("factor", None)
  if factor is None:  # transformers: the ratio of the two contexts
    factor = max_pos / original
  truncate = rope.get("truncate", True)
  if not isinstance(truncate, bool):
    raise fail(f"{where}.truncate", f"must be true or false, got {truncate!r}")
  attention_factor = number("attention_factor", None)
  if attention_factor is None:
    mscale, mscale_all_dim = number("mscale", None, -math.inf), number("mscale_all_dim", None, -math.inf)
    attention_factor = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
                        if mscale and mscale_all_dim else _yarn_mscale(factor))
  return RopeScaling("yarn", factor, original, attention_factor, number("beta_fast", 32.0, -math.inf) or 32.0,
                     number("beta_slow", 1.0, -math.inf) or 1.0, truncate)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


PRESETS: dict[str, QwenMoeConfig] = {
  # Qwen/Qwen1.5-MoE-A2.7B: 14.3B parameters, ~2.7B active per token.
  "qwen1.5-moe-a2.7b": QwenMoeConfig(
    vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
    num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=8192, rope_theta=1e6,
    num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
    norm_topk_prob=False, bos_token_id=BASE_EOS_ID, eos_token_ids=(BASE_EOS_ID,),
  ),
  # Qwen/Qwen2-57B-A14B: ~57B parameters, ~14B active per token.
  "qwen2-57b-a14b": QwenMoeConfig(
    vocab_size=151936, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
    num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1e6,
    num_experts=64, num_experts_per_tok=8, moe_intermediate_size=2560, shared_expert_intermediate_size=20480,
    norm_topk_prob=False, bos_token_id=BASE_EOS_ID, eos_token_ids=(BASE_EOS_ID,),
  ),
}
