"""Decode cost per generated token as the output grows: 32, 128, 512 new tokens (KV cache, on-device loop).

A cache makes each step attend over the tokens so far, so the time per token grows with the context, not
with its square (recomputing the whole sequence per token would make 512 tokens ~16x costlier per token than
32). Runs a demo-sized random model on whatever device jax finds and prints one JSON object.

python benchmarks/decode_scaling.py [--batch 1] [--prompt-len 16] [--repeats 3] [--dtype float32]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform

import jax
import numpy as np

from qwen_moe_jax.demo import demo_model
from qwen_moe_jax.generate import Generator

LENGTHS = (32, 128, 512)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--prompt-len", type=int, default=16)
  ap.add_argument("--repeats", type=int, default=3, help="timed runs per length (the best is kept)")
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  args = ap.parse_args()
  cfg, mesh, model = demo_model(args.dtype)
  gen = Generator(model, mesh)
  prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.prompt_len)).tolist()
  rows = []
  for n in LENGTHS:
    gen.generate(prompts, n)  # compile
    best = min((gen.generate(prompts, n) for _ in range(args.repeats)), key=lambda r: r.decode_seconds)
    steps = n - 1  # the first token comes from the prefill
    rows.append({"new_tokens": n, "decode_ms_per_step": round(1e3 * best.decode_seconds / steps, 3),
                 "prefill_ms": round(1e3 * best.prefill_seconds, 3),
                 "generated_tokens_per_s": round(args.batch * steps / best.decode_seconds, 1)})
  print(json.dumps({
    "benchmark": "decode_scaling", "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
    "config": {"hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers, "experts": cfg.num_experts,
               "top_k": cfg.num_experts_per_tok, "vocab": cfg.vocab_size},
    "batch": args.batch, "prompt_len": args.prompt_len, "dtype": args.dtype, "results": rows,
    "ms_per_step_ratio_512_vs_32": round(rows[-1]["decode_ms_per_step"] / rows[0]["decode_ms_per_step"], 3),
    "machine": {"platform": platform.platform(), "jax": jax.__version__},
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }))


if __name__ == "__main__":
  main()
