"""Kernel choices for the hot spots, routed experts and attention, and the routed experts' weight format.

A kernel changes speed and memory, never the result beyond rounding; tests hold every choice to the reference.
int8 experts change the numbers by their quantization error (tests bound it).
`Kernels` is a frozen dataclass, so it sits in the model's static graph and keys compiled programs.

  experts    dense    every expert on every token (the reference)
             ragged   rows sorted by expert + jax.lax.ragged_dot (CPU / TPU; on GPU XLA computes it densely)
             tokamax  the same rows through tokamax's Mosaic GPU grouped GEMM (the `[gpu]` extra)
  attention  xla      einsum with an fp32 softmax over a materialised [B, N, T, S] score tensor
             cudnn    jax.nn.dot_product_attention's cuDNN flash attention for prefill and training (bf16 / fp16;
                      decoding over the cache and float32 runs keep the einsum)
             splash   the Pallas TPU splash attention kernel for prefill and training over T a multiple of 128
                      (other lengths and decoding keep the einsum)
  decode     xla      decoding's attention as the einsum over every cache slot
             pallas   a Pallas (Triton) kernel reading only each row's live slots (decode_attention.py; caches of
                      fewer than 128 slots, heads not a power of two >= 16 wide, and several new tokens at once
                      keep the einsum)
  expert_dtype  auto  the routed experts' weights in the model's dtype
             int8     int8 with a float32 scale per expert and output channel (quantize.py): for inference, and
                      frozen under LoRA adapters in training
"""

from __future__ import annotations

import dataclasses
import importlib.util
import warnings

import jax

EXPERT_BACKENDS = ("dense", "ragged", "tokamax")
ATTENTION_BACKENDS = ("xla", "cudnn", "splash")
DECODE_BACKENDS = ("xla", "pallas")
EXPERT_DTYPES = ("auto", "int8")


@dataclasses.dataclass(frozen=True)
class Kernels:
  experts: str = "ragged"
  attention: str = "xla"
  decode: str = "xla"
  expert_dtype: str = "auto"

  def __post_init__(self):
    if self.experts not in EXPERT_BACKENDS:
      raise ValueError(f"expert backend must be one of {EXPERT_BACKENDS}, got {self.experts!r}")
    if self.attention not in ATTENTION_BACKENDS:
      raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {self.attention!r}")
    if self.decode not in DECODE_BACKENDS:
      raise ValueError(f"decode attention backend must be one of {DECODE_BACKENDS}, got {self.decode!r}")
    if self.expert_dtype not in EXPERT_DTYPES:
      raise ValueError(f"expert dtype must be one of {EXPERT_DTYPES}, got {self.expert_dtype!r}")


def has_tokamax() -> bool:
  return importlib.util.find_spec("tokamax") is not None


def default_kernels(experts: str | None = None, attention: str | None = None, decode: str = "xla",
                    expert_dtype: str = "auto") -> Kernels:
  """The fastest choices for the default jax backend, where not given: tokamax and cuDNN on GPU, XLA elsewhere
  (the decode kernel is opt-in until measured on a GPU)."""
  on_gpu = jax.default_backend() == "gpu"
  if experts is None:
    installed = has_tokamax()
    if on_gpu and not installed:
      warnings.warn("tokamax is not installed, so the routed experts run through XLA's ragged_dot, which on GPU "
                    "computes every expert densely (~15x the work); pip install 'qwen-moe-jax[gpu]' (Python >= 3.12)")
    experts = "tokamax" if on_gpu and installed else "ragged"
  return Kernels(experts=experts, attention=attention or ("cudnn" if on_gpu else "xla"), decode=decode,
                 expert_dtype=expert_dtype)
