"""Temporaries of the XLA attention path (`layers.attend`: CPU, TPU, and GPU in float32) for one layer's
self-attention, in one block of queries (the [B, N, T, T] scores at once, as before query blocks) and in the
default query blocks, for a prefill (forward) and a training step (forward + backward).

XLA's memory analysis of programs compiled for abstract arrays: nothing is allocated, so sequences of any length
can be measured on a small machine. Prints one JSON object per shape.

python benchmarks/attention_memory.py [--preset qwen2-57b-a14b] [--batch 1] [--seq 4096 32768]
"""

from __future__ import annotations

import argparse
import datetime
import json

import jax
import jax.numpy as jnp

from qwen_moe_jax import layers
from qwen_moe_jax.config import PRESETS

GB = 1e9


def temp_gb(fn, *args) -> float:
  return round(jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes / GB, 3)


def measure(preset: str, batch: int, seq: int, dtype: jnp.dtype) -> dict:
  cfg = PRESETS[preset]
  q, k, v = (jax.ShapeDtypeStruct((batch, seq, heads, cfg.dim_per_head), dtype)
             for heads in (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_key_value_heads))
  positions = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  report = {"benchmark": "attention_memory", "config": preset, "batch": batch, "seq": seq, "dtype": dtype.name,
            "query_block": layers.query_block(seq, seq)}
  for name, block in (("one_block", seq), ("query_blocks", None)):
    def forward(q, k, v, positions, block=block):
      return layers.attend(q, k, v, layers.Mask.self_attention(positions, jnp.ones_like(positions)), block)

    def train(q, k, v, positions, forward=forward):
      return jax.grad(lambda q, k, v: jnp.sum(forward(q, k, v, positions).astype(jnp.float32)), (0, 1, 2))(q, k, v)

    report[name] = {"prefill_temp_gb": temp_gb(forward, q, k, v, positions),
                    "train_temp_gb": temp_gb(train, q, k, v, positions)}
  report["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  report["backend"] = jax.default_backend()
  return report


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--preset", default="qwen1.5-moe-a2.7b", choices=sorted(PRESETS))
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--seq", type=int, nargs="+", default=[4096, 32768])
  ap.add_argument("--dtype", default="bfloat16")
  args = ap.parse_args()
  for seq in args.seq:
    print(json.dumps(measure(args.preset, args.batch, seq, jnp.dtype(args.dtype))), flush=True)


if __name__ == "__main__":
  main()
