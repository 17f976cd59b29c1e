"""Many prompts, few rows: static waves against continuous batching, same prompts, same outputs.

N prompts whose answers differ in length (each prompt's own max_new_tokens, drawn from a long-tailed
distribution, as in real traffic) run through B rows two ways: in waves of B prompts (each wave decodes until
its longest answer ends, the engine without --batch-size), and continuously (`Generator(batch_size=B)`: a
prompt takes the row of one that finished). Greedy outputs are checked equal. Runs a demo-sized random model
on whatever device jax finds (compilation excluded: every shape runs once first) and prints one JSON object.

python benchmarks/continuous_batching.py [--prompts 64] [--rows 8] [--dtype float32]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

import jax
import numpy as np

from qwen_moe_jax.demo import demo_model
from qwen_moe_jax.generate import Generator


def long_tailed(rng: np.random.Generator, vocab: int, n: int, prompt_len: tuple[int, int],
                max_new: int) -> tuple[list[list[int]], list[int]]:
  """n prompts of random ids, their lengths drawn from [lo, hi], and their answer lengths from a long tail (4 +
  an exponential of mean max_new / 6, at most max_new), as in real traffic."""
  prompts = [rng.integers(0, vocab, int(rng.integers(prompt_len[0], prompt_len[1] + 1))).tolist() for _ in range(n)]
  return prompts, np.minimum(max_new, 4 + rng.exponential(max_new / 6, n).astype(int)).tolist()


def waves(gen: Generator, prompts: list[list[int]], limits: list[int], rows: int) -> list[list[int]]:
  out = []
  for i in range(0, len(prompts), rows):
    out += gen.generate(prompts[i:i + rows], limits[i:i + rows]).output_ids
  return out


def timed(fn) -> tuple[float, list[list[int]]]:
  fn()  # compiles every shape it needs
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--prompts", type=int, default=64)
  ap.add_argument("--rows", type=int, default=8)
  ap.add_argument("--prompt-len", type=int, nargs=2, default=[8, 64], help="prompt lengths drawn from [lo, hi]")
  ap.add_argument("--max-new", type=int, default=256, help="the longest answer")
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  args = ap.parse_args()
  cfg, mesh, model = demo_model(args.dtype)
  prompts, limits = long_tailed(np.random.default_rng(0), cfg.vocab_size, args.prompts, args.prompt_len, args.max_new)
  static = Generator(model, mesh)
  continuous = Generator(model, mesh, batch_size=args.rows)
  static_s, static_out = timed(lambda: waves(static, prompts, limits, args.rows))
  continuous_s, continuous_out = timed(lambda: continuous.generate(prompts, limits).output_ids)
  assert continuous_out == static_out, "continuous batching changed the outputs"
  generated = sum(len(o) for o in static_out)
  print(json.dumps({
    "benchmark": "continuous_batching", "prompts": args.prompts, "rows": args.rows, "generated_tokens": generated,
    "answer_lengths": {"min": min(limits), "median": int(np.median(limits)), "max": max(limits)},
    "waves_s": round(static_s, 3), "continuous_s": round(continuous_s, 3),
    "waves_tokens_per_s": round(generated / static_s, 1), "continuous_tokens_per_s": round(generated / continuous_s, 1),
    "speedup": round(static_s / continuous_s, 2), "same_outputs": True, "dtype": args.dtype,
    "device": jax.devices()[0].device_kind, "machine": platform.machine(), "jax": jax.__version__,
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }))


if __name__ == "__main__":
  main()
