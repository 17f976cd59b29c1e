"""int8 routed experts (`--expert-dtype int8`): weight-only quantization, for inference and for LoRA training.

Each expert's weight matrix is held as int8 with one float32 scale per output channel (its largest magnitude over
the input dimension / 127, as kv_cache.quantize computes it: symmetric, no calibration; the per-channel int8
weights of vLLM's and AQT's weight-only schemes). A matmul over such a weight is the matmul over the int8 values
times the scales of its output channels (x @ (q s) = (x @ q) s), so the experts stay int8 in memory and the
scales are applied to the outputs (moe.ExpertScales). The routed experts are 87% of Qwen1.5-MoE-A2.7B's and
86% of Qwen2-57B-A14B's parameters, so the model takes a little over half its bfloat16 bytes.

Weights are quantized as they are read, one layer at a time (checkpoint.restore), so the bfloat16 experts of
one layer at most are ever on the device. LoRA adapters trained over int8 experts (train.py --lora-rank R
--expert-dtype int8, as QLoRA trains over 4-bit weights) are merged into the `rounded` experts, the weights they
were trained with, so the merged model (infer.py, an export) is the one trained.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwen_moe_jax.kv_cache import quantize as quantize_last_axis

EXPERTS = (".mlp.experts_wi", ".mlp.experts_wo")  # [E, D, C, F] and [E, F, D]: the input dimension is axis 1
SCALE = "_scale"  # experts_wi_scale [E, C, F], experts_wo_scale [E, D]
SCALES = tuple(e + SCALE for e in EXPERTS)


def quantize(w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """w [E, in, ...out] -> (int8 [E, in, ...out], float32 scales [E, ...out]) with w ~ int8 x scale."""
  q, scale = quantize_last_axis(jnp.moveaxis(w, 1, -1))
  return jnp.moveaxis(q, -1, 1), scale


def quantize_experts(values: dict[str, jax.Array], wanted: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
  """`values` (flat, as read) with each routed-expert weight replaced by its int8 values and scales, laid out as
  `wanted` lays out the weight and its `_scale`."""
  out = dict(values)
  for key, w in values.items():
    if key.endswith(EXPERTS):
      layout = (wanted[key].sharding, wanted[key + SCALE].sharding)
      out[key], out[key + SCALE] = jax.jit(quantize, out_shardings=layout)(w)
  return out


@jax.jit
def _round(w: jax.Array) -> jax.Array:
  q, scale = quantize(w)
  return (q.astype(jnp.float32) * jnp.expand_dims(scale, 1)).astype(w.dtype)


def rounded(values: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """`values` (flat) with each routed-expert weight replaced by the weight its int8 values and scales stand for."""
  return {k: _round(w) if k.endswith(EXPERTS) else w for k, w in values.items()}
